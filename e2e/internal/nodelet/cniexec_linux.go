package nodelet

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// pluginExec runs CNI plugins the way libcni's default executor does, but
// inside a private mount namespace holding the node's /var/run view (see
// volume.Manager.NodeRunMounts): the nodes of the local cluster share one
// filesystem, and a chained plugin must find the socket its node's agent
// wrote into the conflist, not another node's.
type pluginExec struct {
	*invoke.DefaultExec
	mounts func() ([]nsexec.Mount, error)
	// helper is the binary that enters the mount namespace (cmd/nsexec
	// next to nodelet, else nodelet itself).
	helper string
}

func (e *pluginExec) ExecPlugin(ctx context.Context, pluginPath string, stdin []byte, environ []string) ([]byte, error) {
	mounts, err := e.mounts()
	if err != nil {
		return nil, err
	}
	if len(mounts) == 0 {
		return e.DefaultExec.ExecPlugin(ctx, pluginPath, stdin, environ)
	}
	cmd, err := nsexec.CommandVia(e.helper, nsexec.Spec{PrivateMounts: true, Mounts: mounts, Argv: []string{pluginPath}})
	if err != nil {
		return nil, err
	}
	nsexec.SetEnv(cmd, environ)
	var stdout, stderr bytes.Buffer
	cmd.Stdin, cmd.Stdout, cmd.Stderr = bytes.NewReader(stdin), &stdout, &stderr
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("starting CNI plugin %s: %w", pluginPath, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-ctx.Done():
		cmd.Process.Kill()
		<-done
		return nil, fmt.Errorf("CNI plugin %s: %w", pluginPath, ctx.Err())
	}
	if err != nil {
		return nil, pluginError(pluginPath, err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes(), nil
}

// pluginError turns a failed plugin run into the CNI error it printed, as
// libcni's own executor does, or a plain error with its stderr.
func pluginError(path string, runErr error, stdout, stderr []byte) error {
	var cniErr types.Error
	if len(stdout) > 0 && json.Unmarshal(stdout, &cniErr) == nil && (cniErr.Code != 0 || cniErr.Msg != "") {
		return &cniErr
	}
	if msg := strings.TrimSpace(string(stderr)); msg != "" {
		return fmt.Errorf("CNI plugin %s: %s: %w", path, msg, runErr)
	}
	return fmt.Errorf("CNI plugin %s: %w", path, runErr)
}
