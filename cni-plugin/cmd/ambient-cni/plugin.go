package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/netip"
	"strings"
	"time"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"
	current "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/cni/pkg/version"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniapi"
)

// How long each command waits for the agent. ADD covers installing
// redirection and ztunnel's ack; DEL is best effort and must not hold up
// pod teardown.
const (
	addTimeout    = 30 * time.Second
	checkTimeout  = 10 * time.Second
	statusTimeout = 5 * time.Second
	delTimeout    = 5 * time.Second
)

// PluginConf is the plugin's entry in the network configuration list.
type PluginConf struct {
	types.PluginConf
	// AgentSocket is the node agent's unix socket (default
	// cniapi.DefaultSocketPath).
	AgentSocket string `json:"agentSocket,omitempty"`
	// LogLevel is one of debug, info, warn, error (default warn). Logs go to
	// stderr, which the runtime keeps in its own log.
	LogLevel string `json:"log_level,omitempty"`
}

// parsedConf is the configuration plus what the plugin derives from it.
type parsedConf struct {
	PluginConf
	// rawPrevResult is prevResult exactly as the runtime passed it, printed
	// back unchanged on ADD.
	rawPrevResult json.RawMessage
	// prevResult is the same, converted to the current result version.
	prevResult *current.Result
	log        *slog.Logger
}

// plugin holds where the CNI commands write.
type plugin struct {
	stdout io.Writer
	stderr io.Writer
}

func (p *plugin) parseConf(stdin []byte, needPrevResult bool) (*parsedConf, error) {
	var c parsedConf
	if err := json.Unmarshal(stdin, &c.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("ambient-cni: parsing network config: %v", err), "")
	}
	level, err := parseLevel(c.LogLevel)
	if err != nil {
		return nil, types.NewError(types.ErrInvalidNetworkConfig, fmt.Sprintf("ambient-cni: %v", err), "")
	}
	c.log = slog.New(slog.NewTextHandler(p.stderr, &slog.HandlerOptions{Level: level})).With("plugin", "ambient-cni")
	if c.AgentSocket == "" {
		c.AgentSocket = cniapi.DefaultSocketPath
	}

	var raw struct {
		PrevResult json.RawMessage `json:"prevResult"`
	}
	if err := json.Unmarshal(stdin, &raw); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("ambient-cni: parsing network config: %v", err), "")
	}
	if len(raw.PrevResult) == 0 || bytes.Equal(raw.PrevResult, []byte("null")) {
		if needPrevResult {
			return nil, types.NewError(types.ErrInvalidNetworkConfig,
				"ambient-cni: no prevResult: it is a chained plugin and must follow the primary plugin in a conflist", "")
		}
		return &c, nil
	}
	c.rawPrevResult = raw.PrevResult
	if err := version.ParsePrevResult(&c.PluginConf.PluginConf); err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("ambient-cni: parsing prevResult: %v", err), "")
	}
	res, err := current.NewResultFromResult(c.PrevResult)
	if err != nil {
		return nil, types.NewError(types.ErrDecodingFailure, fmt.Sprintf("ambient-cni: converting prevResult: %v", err), "")
	}
	c.prevResult = res
	return &c, nil
}

func parseLevel(s string) (slog.Level, error) {
	switch strings.ToLower(s) {
	case "", "warn", "warning":
		return slog.LevelWarn, nil
	case "debug":
		return slog.LevelDebug, nil
	case "info":
		return slog.LevelInfo, nil
	case "error":
		return slog.LevelError, nil
	}
	return 0, fmt.Errorf("log_level %q: want debug, info, warn or error", s)
}

// k8sArgs are the CNI_ARGS keys Kubernetes runtimes pass.
type k8sArgs struct {
	PodName, PodNamespace, PodUID, SandboxID string
}

// parseArgs reads CNI_ARGS ("K=V;K=V"), ignoring keys it does not know, as
// runtimes ask with IgnoreUnknown=1.
func parseArgs(s string) (k8sArgs, error) {
	var a k8sArgs
	if s == "" {
		return a, nil
	}
	for pair := range strings.SplitSeq(s, ";") {
		if pair == "" {
			continue
		}
		k, v, ok := strings.Cut(pair, "=")
		if !ok {
			return a, fmt.Errorf("CNI_ARGS: %q is not KEY=VALUE", pair)
		}
		switch k {
		case "K8S_POD_NAME":
			a.PodName = v
		case "K8S_POD_NAMESPACE":
			a.PodNamespace = v
		case "K8S_POD_UID":
			a.PodUID = v
		case "K8S_POD_INFRA_CONTAINER_ID":
			a.SandboxID = v
		}
	}
	return a, nil
}

// podRequest builds the request to the agent; ok is false when CNI_ARGS
// name no Kubernetes pod, which the mesh has nothing to do with.
func podRequest(args *skel.CmdArgs, c *parsedConf) (req *cniapi.PodRequest, ok bool, err error) {
	k, err := parseArgs(args.Args)
	if err != nil {
		return nil, false, err
	}
	if k.PodName == "" || k.PodNamespace == "" {
		return nil, false, nil
	}
	req = &cniapi.PodRequest{
		ContainerID:  args.ContainerID,
		Netns:        args.Netns,
		IfName:       args.IfName,
		PodName:      k.PodName,
		PodNamespace: k.PodNamespace,
		PodUID:       k.PodUID,
		SandboxID:    k.SandboxID,
	}
	if c.prevResult != nil {
		for _, ip := range c.prevResult.IPs {
			if a, ok := netip.AddrFromSlice(ip.Address.IP); ok {
				req.IPs = append(req.IPs, a.Unmap())
			}
		}
	}
	return req, true, nil
}

func (p *plugin) add(args *skel.CmdArgs) error {
	c, err := p.parseConf(args.StdinData, true)
	if err != nil {
		return err
	}
	req, ok, err := podRequest(args, c)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "ambient-cni: "+err.Error(), "")
	}
	if !ok {
		c.log.Debug("not a Kubernetes pod; passing through", "container", args.ContainerID)
		return p.printPrevResult(c)
	}
	ctx, cancel := context.WithTimeout(context.Background(), addTimeout)
	defer cancel()
	resp, err := cniapi.NewClient(c.AgentSocket).Add(ctx, req)
	if err != nil {
		c.log.Error("ADD failed", "pod", req.String(), "error", err)
		return agentError("ADD", req, err)
	}
	c.log.Info("ADD", "pod", req.String(), "outcome", resp.Outcome, "message", resp.Message)
	return p.printPrevResult(c)
}

func (p *plugin) printPrevResult(c *parsedConf) error {
	out := append(bytes.Clone(c.rawPrevResult), '\n')
	if _, err := p.stdout.Write(out); err != nil {
		return types.NewError(types.ErrIOFailure, fmt.Sprintf("ambient-cni: writing result: %v", err), "")
	}
	return nil
}

// del forwards to the agent and always succeeds: the pod is going away
// whether or not the agent, the netns or the config is still there, and a
// failing DEL would leave the pod stuck terminating. The agent cleans up
// what a lost DEL leaves behind when it next sees the pod gone.
func (p *plugin) del(args *skel.CmdArgs) error {
	c, err := p.parseConf(args.StdinData, false)
	if err != nil {
		fmt.Fprintf(p.stderr, "ambient-cni: DEL of %s: ignoring unusable config: %v\n", args.ContainerID, err)
		return nil
	}
	req, ok, err := podRequest(args, c)
	if err != nil || !ok {
		c.log.Debug("DEL of a container that names no pod", "container", args.ContainerID, "error", err)
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), delTimeout)
	defer cancel()
	if _, err := cniapi.NewClient(c.AgentSocket).Del(ctx, req); err != nil {
		c.log.Warn("DEL not delivered to the node agent; it will clean up when it sees the pod gone", "pod", req.String(), "error", err)
		return nil
	}
	c.log.Info("DEL", "pod", req.String())
	return nil
}

func (p *plugin) check(args *skel.CmdArgs) error {
	c, err := p.parseConf(args.StdinData, true)
	if err != nil {
		return err
	}
	req, ok, err := podRequest(args, c)
	if err != nil {
		return types.NewError(types.ErrInvalidEnvironmentVariables, "ambient-cni: "+err.Error(), "")
	}
	if !ok {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), checkTimeout)
	defer cancel()
	resp, err := cniapi.NewClient(c.AgentSocket).Check(ctx, req)
	if err != nil {
		return agentError("CHECK", req, err)
	}
	c.log.Debug("CHECK", "pod", req.String(), "outcome", resp.Outcome)
	return nil
}

func (p *plugin) status(args *skel.CmdArgs) error {
	c, err := p.parseConf(args.StdinData, false)
	if err != nil {
		return err
	}
	ctx, cancel := context.WithTimeout(context.Background(), statusTimeout)
	defer cancel()
	if _, err := cniapi.NewClient(c.AgentSocket).Status(ctx); err != nil {
		return types.NewError(types.ErrPluginNotAvailable, fmt.Sprintf("ambient-cni: node agent not ready: %v", err), "")
	}
	return nil
}

// agentError turns a failed agent call into the CNI error the runtime
// sees; when retrying can help (agent restarting, ztunnel not connected)
// the code says "try again later".
func agentError(cmd string, req *cniapi.PodRequest, err error) error {
	code := types.ErrInternal
	var msg string
	var ae *cniapi.AgentError
	switch {
	case errors.Is(err, cniapi.ErrUnreachable):
		code = types.ErrTryAgainLater
		msg = fmt.Sprintf("ambient-cni: %s of pod %s: node agent unreachable (is cni-agent running on this node?)", cmd, req)
	case errors.Is(err, context.DeadlineExceeded):
		code = types.ErrTryAgainLater
		msg = fmt.Sprintf("ambient-cni: %s of pod %s: node agent did not answer in time", cmd, req)
	case errors.As(err, &ae):
		if errors.Is(err, cniapi.ErrUnavailable) {
			code = types.ErrTryAgainLater
		}
		msg = fmt.Sprintf("ambient-cni: %s of pod %s refused by node agent: %s", cmd, req, ae.Message)
	default:
		msg = fmt.Sprintf("ambient-cni: %s of pod %s", cmd, req)
	}
	return types.NewError(code, msg, err.Error())
}
