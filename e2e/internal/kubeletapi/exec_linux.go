package kubeletapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"sync"
	"syscall"
	"time"

	"github.com/creack/pty"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// command builds the nsenter command line of nsexec.EnterArgv (the
// container's namespaces, working directory and capability bounding set) with
// the container's environment, so PATH lookups are the container's.
func (e containerExecutor) command(ctx context.Context, argv []string) (*exec.Cmd, error) {
	full, err := nsexec.EnterArgv(e.pid, true, argv)
	if err != nil {
		return nil, err
	}
	cmd := exec.CommandContext(ctx, full[0], full[1:]...)
	if env, err := os.ReadFile(fmt.Sprintf("/proc/%d/environ", e.pid)); err == nil {
		for kv := range bytes.SplitSeq(env, []byte{0}) {
			if len(kv) > 0 {
				cmd.Env = append(cmd.Env, string(kv))
			}
		}
	}
	if cmd.Env == nil {
		cmd.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	cmd.WaitDelay = execWaitDelay
	return cmd, nil
}

// ExecInContainer runs cmd in the container, copying in to its stdin and its
// stdout and stderr to out and errw; with tty it runs on a pseudo-terminal
// resized by resize. A non-zero exit is an exitError.
func (e containerExecutor) ExecInContainer(ctx context.Context, _, _, _ string, argv []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommand.TerminalSize, timeout time.Duration) error {
	if timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, timeout)
		defer cancel()
	}
	cmd, err := e.command(ctx, argv)
	if err != nil {
		return err
	}
	if tty {
		return runTTY(cmd, in, out, resize)
	}
	if out != nil {
		cmd.Stdout = out
	}
	if errw != nil {
		cmd.Stderr = errw
	}
	var stdin io.WriteCloser
	if in != nil {
		var err error
		if stdin, err = cmd.StdinPipe(); err != nil {
			return fmt.Errorf("creating stdin pipe: %w", err)
		}
	}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting nsenter: %w", err)
	}
	if stdin != nil {
		// Not waited for: the client may never close stdin, and the command's
		// exit must not wait on it.
		go func() {
			io.Copy(stdin, in)
			stdin.Close()
		}()
	}
	return exitStatus(cmd.Wait())
}

// runTTY runs cmd as the session leader on a new pty.
func runTTY(cmd *exec.Cmd, in io.Reader, out io.Writer, resize <-chan remotecommand.TerminalSize) error {
	ptmx, err := pty.Start(cmd)
	if err != nil {
		return fmt.Errorf("starting nsenter on a pty: %w", err)
	}
	// Setsize reads ptmx's fd number, which Close resets: mu orders them.
	var mu sync.Mutex
	closed := false // guarded by mu
	defer func() {
		mu.Lock()
		defer mu.Unlock()
		closed = true
		ptmx.Close()
	}()
	if resize != nil {
		go func() {
			for size := range resize {
				mu.Lock()
				if !closed && size.Height > 0 && size.Width > 0 {
					pty.Setsize(ptmx, &pty.Winsize{Rows: size.Height, Cols: size.Width})
				}
				mu.Unlock()
			}
		}()
	}
	if in != nil {
		go io.Copy(ptmx, in)
	}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		if out != nil {
			// Ends with EIO once no process holds the terminal open.
			io.Copy(out, ptmx)
		} else {
			io.Copy(io.Discard, ptmx)
		}
	}()
	err = cmd.Wait()
	select {
	case <-copied:
	case <-time.After(execWaitDelay):
	}
	return exitStatus(err)
}

// exitStatus turns Wait's error into an exitError for a non-zero exit; a
// command killed by a signal exits 128+signal, as a shell reports it.
func exitStatus(err error) error {
	if errors.Is(err, exec.ErrWaitDelay) {
		return nil
	}
	var ee *exec.ExitError
	if !errors.As(err, &ee) {
		return err
	}
	if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return exitError{code: 128 + int(ws.Signal())}
	}
	return exitError{code: ee.ExitCode()}
}
