package load

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/ambient-mesh/ambient/e2e/internal/echo"
)

// startEcho runs an echo server on loopback until the test ends.
func startEcho(t *testing.T) *echo.Server {
	t.Helper()
	s, err := echo.New(echo.Config{
		Bind:            "127.0.0.1",
		HTTPPorts:       []int{0},
		GRPCPorts:       []int{0},
		TCPPorts:        []int{0},
		Identity:        echo.Identity{Pod: "echo-0", Namespace: "e2e"},
		MaxDelay:        10 * time.Second,
		MaxSize:         1 << 20,
		ShutdownTimeout: 5 * time.Second,
		Logger:          slog.New(slog.DiscardHandler),
	})
	if err != nil {
		t.Fatalf("starting echo server: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		_ = s.Close()
	})
	return s
}

// closedPort returns a loopback address nothing listens on.
func closedPort(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := ln.Addr().String()
	ln.Close()
	return addr
}

func TestRunAgainstTheEchoServerSucceedsEveryRequest(t *testing.T) {
	s := startEcho(t)
	httpURL := "http://" + s.HTTPAddrs()[0] + "/load"
	tests := []struct {
		name string
		cfg  Config
	}{
		{name: "HTTP/1.1 GETs over three keep-alive connections", cfg: Config{Mode: ModeHTTP, Target: httpURL, Connections: 3}},
		{name: "HTTP/1.1 POSTs ask for and get replies of their own size", cfg: Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0], Connections: 2, Size: 5000}},
		{name: "h2c requests share two connections, two streams each", cfg: Config{Mode: ModeH2C, Target: httpURL, Connections: 2, Streams: 2, Size: 100}},
		{name: "gRPC calls carry payloads both ways", cfg: Config{Mode: ModeGRPC, Target: s.GRPCAddrs()[0], Connections: 2, Streams: 3, Size: 1000}},
		{name: "TCP requests echo their bytes", cfg: Config{Mode: ModeTCP, Target: s.TCPAddrs()[0], Connections: 3, Size: 3000}},
		{name: "TCP requests echo the default size when none is given", cfg: Config{Mode: ModeTCP, Target: s.TCPAddrs()[0]}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := withDefaults(tt.cfg)
			cfg.Requests = 30
			res, err := Run(t.Context(), cfg)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if res.Planned != 30 || res.Sent != 30 || res.Succeeded != 30 || res.Failed != 0 || res.NotSent != 0 {
				t.Errorf("planned %d sent %d succeeded %d failed %d not sent %d, want 30 30 30 0 0; errors %v",
					res.Planned, res.Sent, res.Succeeded, res.Failed, res.NotSent, res.Errors)
			}
			if res.Latency.Count() != 30 || !res.OK() {
				t.Errorf("latency count %d, OK %v; want 30, true", res.Latency.Count(), res.OK())
			}
			if cfg.Mode != ModeGRPC && res.Dials != int64(cfg.Connections) {
				t.Errorf("%d connections opened, want %d (one per connection, none broken)", res.Dials, cfg.Connections)
			}
		})
	}
}

func TestRunCountsTheConnectionsOpenedAgainAfterOneBreaks(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	// An echo server that closes every connection after its second request.
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				buf := make([]byte, DefaultTCPSize)
				for range 2 {
					if _, err := io.ReadFull(c, buf); err != nil {
						return
					}
					if _, err := c.Write(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	cfg := withDefaults(Config{Mode: ModeTCP, Target: ln.Addr().String()})
	cfg.Requests = 7
	res, err := Run(t.Context(), cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	// Requests 1-2 on the first connection, 3 fails, 4-5 on the second, 6
	// fails, 7 on the third. A failure is eof, or a reset when the request
	// reaches the closed socket first.
	if res.Dials != 3 || res.Failed != 2 || res.Errors["eof"]+res.Errors["connection_reset"] != 2 {
		t.Errorf("dials %d, failed %d, errors %v; want 3 dials and 2 failures, eof or reset", res.Dials, res.Failed, res.Errors)
	}
}

func TestRunBoundedByDurationPlansRateTimesDuration(t *testing.T) {
	s := startEcho(t)
	cfg := withDefaults(Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0], Duration: 100 * time.Millisecond, Rate: 200})
	res, err := Run(t.Context(), cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if res.Planned != 20 || res.Sent != 20 || res.Succeeded != 20 {
		t.Errorf("planned %d sent %d succeeded %d, want 20 each; errors %v", res.Planned, res.Sent, res.Succeeded, res.Errors)
	}
}

func TestRunCountsErrorsByKind(t *testing.T) {
	s := startEcho(t)
	refused := closedPort(t)
	tests := []struct {
		name     string
		cfg      Config
		wantKind string
	}{
		{name: "a refused TCP connection is counted as connection_refused", cfg: Config{Mode: ModeTCP, Target: refused}, wantKind: "connection_refused"},
		{name: "a refused HTTP connection is counted as connection_refused", cfg: Config{Mode: ModeHTTP, Target: refused}, wantKind: "connection_refused"},
		{name: "an HTTP 503 is counted by its status", cfg: Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0] + "/status/503"}, wantKind: "http_503"},
		{name: "an h2c 403 is counted by its status", cfg: Config{Mode: ModeH2C, Target: s.HTTPAddrs()[0] + "/status/403"}, wantKind: "http_403"},
		{name: "a reply slower than the timeout is counted as timeout", cfg: Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0] + "/?delay=5s", Timeout: 20 * time.Millisecond, Rate: 20}, wantKind: "timeout"},
		{name: "a gRPC call to a closed port is counted as unavailable", cfg: Config{Mode: ModeGRPC, Target: refused}, wantKind: "grpc_unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := withDefaults(tt.cfg)
			cfg.Requests = 3
			res, err := Run(t.Context(), cfg)
			if err != nil {
				t.Fatalf("Run: %v", err)
			}
			if res.Failed != 3 || res.Errors[tt.wantKind] != 3 || res.OK() {
				t.Errorf("failed %d, errors %v, OK %v; want 3 %s", res.Failed, res.Errors, res.OK(), tt.wantKind)
			}
		})
	}
}

func TestRunPrintsWhatTheEchoServerSaw(t *testing.T) {
	s := startEcho(t)
	tests := []struct {
		name      string
		cfg       Config
		wantHost  string
		wantProto string
	}{
		{
			name:      "an HTTP reply shows the Host and headers sent",
			cfg:       Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0] + "/seen", Host: "svc.e2e.test", Headers: []string{"X-Test: one"}},
			wantHost:  "svc.e2e.test",
			wantProto: "HTTP/1.1",
		},
		{
			name:      "an h2c reply shows HTTP/2",
			cfg:       Config{Mode: ModeH2C, Target: s.HTTPAddrs()[0] + "/seen", Host: "svc.e2e.test", Headers: []string{"X-Test: one"}},
			wantHost:  "svc.e2e.test",
			wantProto: "HTTP/2.0",
		},
		{
			name:      "a gRPC reply shows the authority and metadata sent, as the same JSON",
			cfg:       Config{Mode: ModeGRPC, Target: s.GRPCAddrs()[0], Host: "svc.e2e.test", Headers: []string{"X-Test: one"}},
			wantHost:  "svc.e2e.test",
			wantProto: "HTTP/2.0",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			cfg := withDefaults(tt.cfg)
			cfg.Requests = 1
			cfg.Bodies = &out
			res, err := Run(t.Context(), cfg)
			if err != nil || !res.OK() {
				t.Fatalf("Run: %v, errors %v", err, res.Errors)
			}
			var r echo.Reply
			if err := json.Unmarshal(out.Bytes(), &r); err != nil {
				t.Fatalf("decoding %q: %v", out.String(), err)
			}
			header := r.Headers["X-Test"]
			if header == nil {
				header = r.Headers["x-test"]
			}
			if r.Host != tt.wantHost || r.Proto != tt.wantProto || !slices.Equal(header, []string{"one"}) || r.Pod != "echo-0" {
				t.Errorf("server saw host %q proto %q X-Test %q pod %q, want %q %q [one] echo-0",
					r.Host, r.Proto, header, r.Pod, tt.wantHost, tt.wantProto)
			}
			if !strings.HasSuffix(out.String(), "\n") || strings.Count(out.String(), "\n") != 1 {
				t.Errorf("printed body %q, want one line", out.String())
			}
		})
	}
}

func TestRunStopsWhenItsContextIsDone(t *testing.T) {
	s := startEcho(t)
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	res, err := Run(ctx, withDefaults(Config{Mode: ModeTCP, Target: s.TCPAddrs()[0], Requests: 1000}))
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if !res.Interrupted || res.NotSent != 0 || res.OK() {
		t.Errorf("interrupted %v not sent %d OK %v, want true 0 false", res.Interrupted, res.NotSent, res.OK())
	}
}

func TestValidate(t *testing.T) {
	tests := []struct {
		name    string
		change  func(*Config)
		wantErr string
	}{
		{name: "a complete config is accepted", change: func(*Config) {}},
		{name: "a run with neither requests nor duration is refused as unbounded", change: func(c *Config) { c.Requests = 0 }, wantErr: "unbounded"},
		{name: "a duration over the cap is refused", change: func(c *Config) { c.Duration = 11 * time.Minute }, wantErr: "longer than"},
		{name: "requests that would take longer than the cap are refused", change: func(c *Config) { c.Requests = 10_000; c.Rate = 1 }, wantErr: "longer than"},
		{name: "many requests are fine when a duration bounds them", change: func(c *Config) { c.Requests = 10_000; c.Rate = 1; c.Duration = time.Minute }},
		{name: "an unknown mode is refused", change: func(c *Config) { c.Mode = "quic" }, wantErr: "unknown mode"},
		{name: "a zero rate is refused", change: func(c *Config) { c.Rate = 0 }, wantErr: "rate"},
		{name: "no target is refused", change: func(c *Config) { c.Target = "" }, wantErr: "no target"},
		{name: "several streams on HTTP/1.1 are refused", change: func(c *Config) { c.Streams = 2 }, wantErr: "streams must be 1"},
		{name: "several streams on h2c are accepted", change: func(c *Config) { c.Mode = ModeH2C; c.Streams = 4 }},
		{name: "zero connections are refused", change: func(c *Config) { c.Connections = 0 }, wantErr: "connections"},
		{name: "a negative size is refused", change: func(c *Config) { c.Size = -1 }, wantErr: "size"},
		{name: "a zero timeout is refused", change: func(c *Config) { c.Timeout = 0 }, wantErr: "timeout"},
		{name: "a header without a colon is refused", change: func(c *Config) { c.Headers = []string{"X-Test"} }, wantErr: "Name: value"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := withDefaults(Config{Mode: ModeHTTP, Target: "127.0.0.1:8080", Requests: 10})
			tt.change(&cfg)
			err := cfg.Validate()
			if tt.wantErr == "" {
				if err != nil {
					t.Errorf("Validate: %v, want nil", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
				t.Errorf("Validate: %v, want an error about %q", err, tt.wantErr)
			}
		})
	}
	unbounded := withDefaults(Config{Mode: ModeHTTP, Target: "127.0.0.1:8080"})
	if err := unbounded.Validate(); !errors.Is(err, ErrUnbounded) {
		t.Errorf("unbounded run: %v, want ErrUnbounded", err)
	}
}

func TestErrorKind(t *testing.T) {
	refused := &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}
	tests := []struct {
		name string
		err  error
		want string
	}{
		{name: "an HTTP status error is named by its code", err: fmt.Errorf("request: %w", &StatusError{Code: 502}), want: "http_502"},
		{name: "a gRPC status is named by its code in snake case", err: status.Error(codes.PermissionDenied, "no"), want: "grpc_permission_denied"},
		{name: "a gRPC deadline is a timeout", err: status.Error(codes.DeadlineExceeded, "late"), want: "timeout"},
		{name: "a context deadline is a timeout", err: fmt.Errorf("get: %w", context.DeadlineExceeded), want: "timeout"},
		{name: "a refused dial is connection_refused", err: refused, want: "connection_refused"},
		{name: "a reset is connection_reset", err: os.NewSyscallError("read", syscall.ECONNRESET), want: "connection_reset"},
		{name: "a short read is eof", err: io.ErrUnexpectedEOF, want: "eof"},
		{name: "different echoed bytes are a mismatch", err: ErrMismatch, want: "mismatch"},
		{name: "anything else is other", err: errors.New("boom"), want: "other"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := ErrorKind(tt.err); got != tt.want {
				t.Errorf("ErrorKind(%v) = %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

func TestResultSummaryCarriesCountsAndPercentiles(t *testing.T) {
	h := NewHistogram()
	for _, v := range seq(1, 1000) {
		h.Record(v)
	}
	res := &Result{Mode: ModeHTTP, Target: "t", Rate: 10, Elapsed: time.Second, Planned: 1001, Sent: 1001,
		Succeeded: 1000, Failed: 1, Errors: map[string]int64{"http_503": 1}, Latency: h}
	var js bytes.Buffer
	if err := res.WriteJSON(&js); err != nil {
		t.Fatal(err)
	}
	var s Summary
	if err := json.Unmarshal(js.Bytes(), &s); err != nil {
		t.Fatalf("decoding %s: %v", js.String(), err)
	}
	if s.Succeeded != 1000 || s.Errors["http_503"] != 1 || s.LatencyNs["p99.9"] != 999 || s.LatencyNs["max"] != 1000 || s.AchievedRate != 1001 {
		t.Errorf("summary %+v", s)
	}
	var text bytes.Buffer
	if err := res.WriteText(&text); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"1000 succeeded, 1 failed", "http_503=1", "p50=500ns", "p99.9=999ns", "max=1µs"} {
		if !strings.Contains(text.String(), want) {
			t.Errorf("text summary lacks %q:\n%s", want, text.String())
		}
	}
}

// withDefaults fills what the command's flags would.
func withDefaults(c Config) Config {
	if c.Rate == 0 {
		c.Rate = 1000
	}
	if c.Connections == 0 {
		c.Connections = 1
	}
	if c.Streams == 0 {
		c.Streams = 1
	}
	if c.Timeout == 0 {
		c.Timeout = 5 * time.Second
	}
	return c
}

func TestRunCountsRequestsStillWaitingForAConnectionAsNotSent(t *testing.T) {
	s := startEcho(t)
	// One connection, each request held 5s, 20ms timeout: the first
	// requests time out in turn and the rest are given up one timeout after
	// the planned end.
	cfg := withDefaults(Config{Mode: ModeHTTP, Target: s.HTTPAddrs()[0] + "/?delay=5s",
		Timeout: 20 * time.Millisecond, Requests: 50, Rate: 1000})
	res, err := Run(t.Context(), cfg)
	if err != nil {
		t.Fatalf("Run: %v", err)
	}
	if res.NotSent == 0 || res.Sent+res.NotSent != 50 || res.Failed != res.Sent || res.OK() {
		t.Errorf("sent %d failed %d not sent %d OK %v, want some not sent, the rest failed",
			res.Sent, res.Failed, res.NotSent, res.OK())
	}
}
