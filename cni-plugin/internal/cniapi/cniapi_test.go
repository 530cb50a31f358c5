package cniapi

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fakeAgent answers with fixed outcomes or errors and records requests.
type fakeAgent struct {
	mu       sync.Mutex
	requests map[string][]PodRequest
	outcome  Outcome
	err      error
	block    chan struct{} // when set, calls wait on it or their context
}

func (a *fakeAgent) record(path string, r *PodRequest) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.requests == nil {
		a.requests = map[string][]PodRequest{}
	}
	a.requests[path] = append(a.requests[path], *r)
}

func (a *fakeAgent) answer(ctx context.Context) (*Response, error) {
	if a.block != nil {
		select {
		case <-a.block:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if a.err != nil {
		return nil, a.err
	}
	return &Response{Outcome: a.outcome, Message: "fake"}, nil
}

func (a *fakeAgent) Add(ctx context.Context, r *PodRequest) (*Response, error) {
	a.record(PathAdd, r)
	return a.answer(ctx)
}

func (a *fakeAgent) Del(ctx context.Context, r *PodRequest) (*Response, error) {
	a.record(PathDel, r)
	return a.answer(ctx)
}

func (a *fakeAgent) Check(ctx context.Context, r *PodRequest) (*Response, error) {
	a.record(PathCheck, r)
	return a.answer(ctx)
}

func (a *fakeAgent) Status(ctx context.Context) (*Response, error) { return a.answer(ctx) }

func serve(t *testing.T, h http.Handler) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cni.sock")
	ln, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

func pod() *PodRequest {
	return &PodRequest{
		ContainerID:  "c1",
		Netns:        "/var/run/netns/cni-1",
		IfName:       "eth0",
		PodName:      "web-0",
		PodNamespace: "shop",
		PodUID:       "0b5c6c5e-uid",
		SandboxID:    "c1",
		IPs:          []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00::5")},
	}
}

func TestRequestsReachTheAgentIntact(t *testing.T) {
	a := &fakeAgent{outcome: Enrolled}
	c := NewClient(serve(t, NewHandler(a, nil)))
	ctx := context.Background()
	for path, call := range map[string]func(context.Context, *PodRequest) (*Response, error){PathAdd: c.Add, PathDel: c.Del, PathCheck: c.Check} {
		resp, err := call(ctx, pod())
		if err != nil || resp.Outcome != Enrolled || resp.Message != "fake" {
			t.Fatalf("%s: %+v, %v", path, resp, err)
		}
		got := a.requests[path]
		if len(got) != 1 || fmt.Sprint(got[0]) != fmt.Sprint(*pod()) {
			t.Fatalf("%s: agent got %+v, want %+v", path, got, *pod())
		}
	}
	if resp, err := c.Status(ctx); err != nil || resp.Outcome != Enrolled {
		t.Fatalf("Status: %+v, %v", resp, err)
	}
}

func TestAgentErrorsKeepTheirMessageAndKind(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		wantCode int
		wantIs   error
	}{
		{"an unavailable ztunnel answers 503", fmt.Errorf("shop/web-0: %w: no ztunnel connected", ErrUnavailable), 503, ErrUnavailable},
		{"a bad request answers 400", fmt.Errorf("%w: netns gone", ErrInvalidRequest), 400, ErrInvalidRequest},
		{"any other failure answers 500", errors.New("installing redirection: boom"), 500, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := NewClient(serve(t, NewHandler(&fakeAgent{err: tt.err}, nil)))
			_, err := c.Add(context.Background(), pod())
			ae, ok := errors.AsType[*AgentError](err)
			if !ok || ae.StatusCode != tt.wantCode || ae.Message != tt.err.Error() {
				t.Fatalf("Add: %v, want status %d with the agent's message", err, tt.wantCode)
			}
			if tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
				t.Fatalf("errors.Is(%v, %v) = false", err, tt.wantIs)
			}
			if errors.Is(err, ErrUnreachable) {
				t.Fatal("an agent answer counted as unreachable")
			}
		})
	}
}

func TestHandlerRejectsIncompleteRequests(t *testing.T) {
	a := &fakeAgent{outcome: Enrolled}
	c := NewClient(serve(t, NewHandler(a, nil)))
	r := pod()
	r.Netns = ""
	if _, err := c.Add(context.Background(), r); !errors.Is(err, ErrInvalidRequest) || !strings.Contains(err.Error(), "netns") {
		t.Fatalf("Add without netns: %v, want a 400 naming netns", err)
	}
	// A late DEL may have lost its netns; the agent still hears about it.
	if _, err := c.Del(context.Background(), r); err != nil {
		t.Fatalf("Del without netns: %v", err)
	}
	r.PodName = ""
	if _, err := c.Del(context.Background(), r); !errors.Is(err, ErrInvalidRequest) {
		t.Fatalf("Del without pod name: %v, want a 400", err)
	}
	if len(a.requests[PathAdd]) != 0 || len(a.requests[PathDel]) != 1 {
		t.Fatalf("agent saw %v, want only the valid DEL", a.requests)
	}
}

func TestHandlerRejectsMalformedBodies(t *testing.T) {
	path := serve(t, NewHandler(&fakeAgent{outcome: Enrolled}, nil))
	hc := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", path)
	}}}
	resp, err := hc.Post("http://agent"+PathAdd, "application/json", strings.NewReader(`{"podName": 7`))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != 400 {
		t.Fatalf("malformed body answered %d, want 400", resp.StatusCode)
	}
}

func TestClientReportsAnAbsentAgentAsUnreachable(t *testing.T) {
	path := filepath.Join(t.TempDir(), "nobody.sock")
	_, err := NewClient(path).Add(context.Background(), pod())
	if !errors.Is(err, ErrUnreachable) || !strings.Contains(err.Error(), path) {
		t.Fatalf("Add with no agent: %v, want ErrUnreachable naming the socket", err)
	}
	if strings.Contains(err.Error(), "http://") {
		t.Fatalf("error %q leaks the made-up URL", err)
	}
}

func TestClientGivesUpWithItsContext(t *testing.T) {
	a := &fakeAgent{outcome: Enrolled, block: make(chan struct{})}
	defer close(a.block)
	c := NewClient(serve(t, NewHandler(a, nil)))
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := c.Add(ctx, pod()); !errors.Is(err, context.DeadlineExceeded) || errors.Is(err, ErrUnreachable) {
		t.Fatalf("Add to a stuck agent: %v, want DeadlineExceeded", err)
	}
}

func TestClientReadsNonJSONErrors(t *testing.T) {
	path := serve(t, http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Error(w, "agent is shutting down", http.StatusServiceUnavailable)
	}))
	_, err := NewClient(path).Add(context.Background(), pod())
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "agent is shutting down") {
		t.Fatalf("Add: %v", err)
	}
}

func TestListenIsPrivateReplacesStaleSocketsAndCleansUp(t *testing.T) {
	path := filepath.Join(t.TempDir(), "run", "cni.sock")
	first, err := Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	// A second agent replaces the first one's socket; the first one's
	// Close must then leave the new socket alone.
	second, err := Listen(path)
	if err != nil {
		t.Fatalf("Listen over an existing socket: %v", err)
	}
	first.Close()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatalf("socket gone after the old listener closed: %v", err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode %v, want a 0600 socket", fi.Mode())
	}
	second.Close()
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket after Close: %v, want it removed", err)
	}
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := Listen(path); err == nil {
		t.Fatal("Listen replaced a regular file")
	}
}
