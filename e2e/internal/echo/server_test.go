package echo

import (
	"context"
	"flag"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptrace"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
)

// testIdentity is what every test server reports.
var testIdentity = Identity{
	Pod:       "echo-7d9f",
	Namespace: "e2e",
	PodIP:     "10.244.0.7",
	Hostname:  "node-a",
	Version:   "v2",
}

// testConfig listens on free loopback ports.
func testConfig() Config {
	return Config{
		Bind:            "127.0.0.1",
		HTTPPorts:       []int{0},
		GRPCPorts:       []int{0},
		TCPPorts:        []int{0},
		Identity:        testIdentity,
		MaxDelay:        time.Second,
		MaxSize:         1 << 20,
		ShutdownTimeout: 5 * time.Second,
		Logger:          slog.New(slog.DiscardHandler),
	}
}

// startServer runs a server until the test ends.
func startServer(t *testing.T) *Server {
	t.Helper()
	s, err := New(testConfig())
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		_ = s.Close()
	})
	return s
}

// recordingDialer remembers the local address of the last connection it made,
// which is the peer address the server should report.
type recordingDialer struct {
	mu    sync.Mutex
	local string // guarded by mu
}

func (d *recordingDialer) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	c, err := (&net.Dialer{}).DialContext(ctx, network, addr)
	if err == nil {
		d.mu.Lock()
		d.local = c.LocalAddr().String()
		d.mu.Unlock()
	}
	return c, err
}

func (d *recordingDialer) Local() string {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.local
}

func TestRunDrainsRequestsInFlight(t *testing.T) {
	cfg := testConfig()
	s, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	defer s.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()

	type result struct {
		status int
		err    error
	}
	got := make(chan result, 1)
	// The server sends 100 Continue when the handler first reads the body:
	// from then on the request is in flight.
	inHandler := make(chan struct{})
	trace := &httptrace.ClientTrace{Got100Continue: func() { close(inHandler) }}
	go func() {
		ctx := httptrace.WithClientTrace(context.Background(), trace)
		req, _ := http.NewRequestWithContext(ctx, http.MethodPost,
			"http://"+s.HTTPAddrs()[0]+"/?delay=100ms", strings.NewReader("drain me"))
		req.Header.Set("Expect", "100-continue")
		tr := &http.Transport{ExpectContinueTimeout: time.Minute}
		defer tr.CloseIdleConnections()
		resp, err := tr.RoundTrip(req)
		if err != nil {
			got <- result{err: err}
			return
		}
		resp.Body.Close()
		got <- result{status: resp.StatusCode}
	}()
	<-inHandler
	cancel()

	if r := <-got; r.err != nil || r.status != http.StatusOK {
		t.Errorf("request in flight: status %d, error %v; want 200", r.status, r.err)
	}
	if err := <-done; err != nil {
		t.Errorf("Run: %v, want nil after cancel", err)
	}
	if s.ready.Load() {
		t.Error("still ready after Run returned")
	}
	if err := s.Close(); err != nil {
		t.Errorf("Close after Run: %v", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestNewClosesWhatItOpenedWhenAPortIsTaken(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	free, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	freePort := free.Addr().(*net.TCPAddr).Port
	free.Close()

	cfg := testConfig()
	cfg.HTTPPorts = []int{freePort}
	cfg.TCPPorts = []int{taken.Addr().(*net.TCPAddr).Port}
	if _, err := New(cfg); err == nil {
		t.Fatal("New succeeded on a taken port")
	}
	ln, err := net.Listen("tcp", net.JoinHostPort("127.0.0.1", strconv.Itoa(freePort)))
	if err != nil {
		t.Fatalf("the HTTP port New opened is still held: %v", err)
	}
	ln.Close()
}

func TestApplyEnv(t *testing.T) {
	tests := []struct {
		name      string
		args      []string
		env       map[string]string
		wantErr   bool
		wantHTTP  []int
		wantPod   string
		wantDelay time.Duration
	}{
		{
			name:      "flags not given keep their defaults without environment",
			wantHTTP:  []int{DefaultHTTPPort},
			wantDelay: 30 * time.Second,
		},
		{
			name:      "a flag not given takes its environment variable",
			env:       map[string]string{"POD_NAME": "echo-1", "HTTP_PORTS": "8080,8081", "MAX_DELAY": "2s"},
			wantHTTP:  []int{8080, 8081},
			wantPod:   "echo-1",
			wantDelay: 2 * time.Second,
		},
		{
			name:      "a flag on the command line wins over the environment",
			args:      []string{"--pod-name=from-flag", "--http-ports=9999"},
			env:       map[string]string{"POD_NAME": "from-env", "HTTP_PORTS": "8080"},
			wantHTTP:  []int{9999},
			wantPod:   "from-flag",
			wantDelay: 30 * time.Second,
		},
		{
			name:      "an empty port list in the environment serves none",
			env:       map[string]string{"HTTP_PORTS": ""},
			wantHTTP:  nil,
			wantDelay: 30 * time.Second,
		},
		{
			name:    "a malformed environment value is an error",
			env:     map[string]string{"TCP_PORTS": "seventy"},
			wantErr: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var cfg Config
			fs := flag.NewFlagSet("test", flag.ContinueOnError)
			cfg.RegisterFlags(fs)
			if err := fs.Parse(tt.args); err != nil {
				t.Fatal(err)
			}
			err := ApplyEnv(fs, func(k string) (string, bool) { v, ok := tt.env[k]; return v, ok })
			if tt.wantErr {
				if err == nil {
					t.Fatal("ApplyEnv succeeded, want an error")
				}
				return
			}
			if err != nil {
				t.Fatalf("ApplyEnv: %v", err)
			}
			if got := cfg.HTTPPorts; !slices.Equal(got, tt.wantHTTP) {
				t.Errorf("HTTP ports %v, want %v", got, tt.wantHTTP)
			}
			if cfg.Identity.Pod != tt.wantPod {
				t.Errorf("pod %q, want %q", cfg.Identity.Pod, tt.wantPod)
			}
			if cfg.MaxDelay != tt.wantDelay {
				t.Errorf("max delay %v, want %v", cfg.MaxDelay, tt.wantDelay)
			}
		})
	}
}

func TestValidateRefusesAServerWithNothingToServe(t *testing.T) {
	cfg := testConfig()
	cfg.HTTPPorts, cfg.GRPCPorts, cfg.TCPPorts = nil, nil, nil
	if _, err := New(cfg); err == nil || !strings.Contains(err.Error(), "no ports") {
		t.Errorf("New with no ports: %v, want a no ports error", err)
	}
}
