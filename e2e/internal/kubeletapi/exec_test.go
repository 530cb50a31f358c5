package kubeletapi

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net/url"
	"os/exec"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/tools/remotecommand"
	utilexec "k8s.io/client-go/util/exec"
)

// execURL is the URL the apiserver proxies `kubectl exec` to.
func (e *testEnv) execURL(pod string, tty bool, argv ...string) *url.URL {
	q := url.Values{"command": argv, "input": {"1"}, "output": {"1"}}
	if tty {
		q.Set("tty", "1")
	} else {
		q.Set("error", "1")
	}
	return &url.URL{Scheme: "https", Host: e.addr, Path: "/exec/default/" + pod + "/app", RawQuery: q.Encode()}
}

type executorKind struct {
	name string
	make func(e *testEnv, u *url.URL) (remotecommand.Executor, error)
}

// executors are the two ways the apiserver talks to a kubelet: SPDY, and
// websockets (v5) when the node declares ExtendWebSocketsToKubelet.
var executors = []executorKind{
	{"spdy", func(e *testEnv, u *url.URL) (remotecommand.Executor, error) {
		return remotecommand.NewSPDYExecutor(e.restConfig(), "POST", u)
	}},
	{"websocket", func(e *testEnv, u *url.URL) (remotecommand.Executor, error) {
		return remotecommand.NewWebSocketExecutor(e.restConfig(), "GET", u.String())
	}},
}

func TestExecRunsInTheContainer(t *testing.T) {
	if !canUnshare(t) {
		t.Skip("needs root with unshare and nsenter")
	}
	env := newTestEnv(t)
	pid := startContainer(t, true)
	env.rt.set(func(f *fakeRuntime) { f.pid = pid })
	tests := []struct {
		name      string
		argv      []string
		stdin     string
		wantOut   string
		wantErr   string
		wantCode  int
		tty       bool
		outPrefix bool
	}{
		{name: "stdout and stderr come back apart", argv: []string{"sh", "-c", "echo out; echo err >&2"}, wantOut: "out\n", wantErr: "err\n"},
		{name: "stdin reaches the command", argv: []string{"cat"}, stdin: "piped in\n", wantOut: "piped in\n"},
		{name: "a failing command's exit code comes back", argv: []string{"sh", "-c", "exit 3"}, wantCode: 3},
		{name: "false exits 1", argv: []string{"false"}, wantCode: 1},
		{name: "an unknown command exits 127", argv: []string{"no-such-command"}, wantCode: 127, outPrefix: true},
		{name: "the command sees the container's environment", argv: []string{"sh", "-c", "echo $CONTAINER_GREETING"}, wantOut: "hello from the container\n"},
		{name: "the command is in the container's network namespace", argv: []string{"sh", "-c", "tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '"}, wantOut: "lo\n"},
		{name: "a tty command gets a terminal", argv: []string{"sh", "-c", "test -t 0 && echo is-a-tty"}, tty: true, wantOut: "is-a-tty\r\n"},
	}
	for _, kind := range executors {
		for _, tt := range tests {
			t.Run(kind.name+"/"+tt.name, func(t *testing.T) {
				ex, err := kind.make(env, env.execURL("web", tt.tty, tt.argv...))
				if err != nil {
					t.Fatal(err)
				}
				var stdout, stderr bytes.Buffer
				opts := remotecommand.StreamOptions{Stdin: strings.NewReader(tt.stdin), Stdout: &stdout, Tty: tt.tty}
				if !tt.tty {
					opts.Stderr = &stderr
				}
				ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
				defer cancel()
				err = ex.StreamWithContext(ctx, opts)
				code := 0
				var ee utilexec.CodeExitError
				if errors.As(err, &ee) {
					code = ee.Code
				} else if err != nil {
					t.Fatalf("exec: %v (stderr %q)", err, stderr.String())
				}
				if code != tt.wantCode {
					t.Errorf("exit code %d, want %d (stderr %q)", code, tt.wantCode, stderr.String())
				}
				if !tt.outPrefix && stdout.String() != tt.wantOut {
					t.Errorf("stdout %q, want %q", stdout.String(), tt.wantOut)
				}
				if tt.wantErr != "" && stderr.String() != tt.wantErr {
					t.Errorf("stderr %q, want %q", stderr.String(), tt.wantErr)
				}
			})
		}
	}
}

// TestExecResizesTheTerminal sends a terminal size and reads it back with
// stty inside the container.
func TestExecResizesTheTerminal(t *testing.T) {
	if !canUnshare(t) {
		t.Skip("needs root with unshare and nsenter")
	}
	env := newTestEnv(t)
	pid := startContainer(t, false)
	env.rt.set(func(f *fakeRuntime) { f.pid = pid })
	for _, kind := range executors {
		t.Run(kind.name, func(t *testing.T) {
			// Give the resize a moment to land before stty reads it.
			ex, err := kind.make(env, env.execURL("web", true, "sh", "-c", "sleep 0.5; stty size"))
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			sizes := &fixedSize{size: remotecommand.TerminalSize{Width: 123, Height: 45}}
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err = ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: blockingReader{ctx}, Stdout: &out, Tty: true, TerminalSizeQueue: sizes})
			if err != nil {
				t.Fatal(err)
			}
			if got := strings.TrimSpace(out.String()); got != "45 123" {
				t.Errorf("stty size %q, want \"45 123\"", got)
			}
		})
	}
}

func TestExecInAnUnknownContainerIsNotFound(t *testing.T) {
	env := newTestEnv(t)
	ex, err := remotecommand.NewSPDYExecutor(env.restConfig(), "POST", env.execURL("nope", false, "true"))
	if err != nil {
		t.Fatal(err)
	}
	err = ex.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdout: io.Discard})
	if err == nil || !strings.Contains(err.Error(), "404") && !strings.Contains(err.Error(), "not found") {
		t.Errorf("exec into an unknown pod: %v, want not found", err)
	}
}

// fixedSize hands out one terminal size, then blocks until told to stop.
type fixedSize struct {
	size remotecommand.TerminalSize
	sent bool
}

func (f *fixedSize) Next() *remotecommand.TerminalSize {
	if f.sent {
		return nil
	}
	f.sent = true
	return &f.size
}

// blockingReader is a stdin that never sends anything until ctx ends.
type blockingReader struct{ ctx context.Context }

func (b blockingReader) Read([]byte) (int, error) {
	<-b.ctx.Done()
	return 0, io.EOF
}

// TestCloseEndsRunningSessions checks that Close does not leave a hijacked
// exec connection behind.
func TestCloseEndsRunningSessions(t *testing.T) {
	if !canUnshare(t) {
		t.Skip("needs root with unshare and nsenter")
	}
	env := newTestEnv(t)
	pid := startContainer(t, false)
	env.rt.set(func(f *fakeRuntime) { f.pid = pid })
	ex, err := remotecommand.NewSPDYExecutor(env.restConfig(), "POST", env.execURL("web", false, "sleep", "60.4242"))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() {
		done <- ex.StreamWithContext(context.Background(), remotecommand.StreamOptions{Stdin: strings.NewReader(""), Stdout: io.Discard, Stderr: io.Discard})
	}()
	deadline := time.Now().Add(5 * time.Second)
	for env.activeConns() == 0 && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(200 * time.Millisecond) // let the streams open
	if err := env.srv.Close(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("exec session outlived Close")
	}
	// The command went with the session.
	deadline = time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("pgrep", "-f", "^sleep 60.4242$").Output()
		if len(bytes.TrimSpace(out)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec'd command still running: pids %s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestExecEndsWhenTheClientGoesAway checks that a command whose client hung
// up is killed rather than left running.
func TestExecEndsWhenTheClientGoesAway(t *testing.T) {
	if !canUnshare(t) {
		t.Skip("needs root with unshare and nsenter")
	}
	env := newTestEnv(t)
	pid := startContainer(t, false)
	env.rt.set(func(f *fakeRuntime) { f.pid = pid })
	ex, err := remotecommand.NewSPDYExecutor(env.restConfig(), "POST", env.execURL("web", false, "sleep", "61.4242"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- ex.StreamWithContext(ctx, remotecommand.StreamOptions{Stdin: blockingReader{ctx}, Stdout: io.Discard, Stderr: io.Discard})
	}()
	deadline := time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("pgrep", "-f", "^sleep 61.4242$").Output()
		if len(bytes.TrimSpace(out)) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("exec'd command did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cancel()
	<-done
	deadline = time.Now().Add(5 * time.Second)
	for {
		out, _ := exec.Command("pgrep", "-f", "^sleep 61.4242$").Output()
		if len(bytes.TrimSpace(out)) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("exec'd command still running after the client left: pids %s", out)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
