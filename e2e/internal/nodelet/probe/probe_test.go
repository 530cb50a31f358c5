package probe

import (
	"context"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
)

func init() { tick = 5 * time.Millisecond }

var local = Target{PodIP: "127.0.0.1"}

func port(t *testing.T, addr string) int {
	t.Helper()
	_, p, err := net.SplitHostPort(addr)
	if err != nil {
		t.Fatal(err)
	}
	n, _ := strconv.Atoi(p)
	return n
}

func TestHTTPGet(t *testing.T) {
	mux := http.NewServeMux()
	mux.HandleFunc("/ok", func(w http.ResponseWriter, r *http.Request) { fmt.Fprint(w, "fine") })
	mux.HandleFunc("/redirect", func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, "http://elsewhere.invalid/", http.StatusFound)
	})
	mux.HandleFunc("/bad", func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusServiceUnavailable)
		fmt.Fprint(w, strings.Repeat("E", 5000))
	})
	mux.HandleFunc("/headers", func(w http.ResponseWriter, r *http.Request) {
		if r.Header.Get("X-Probe") != "yes" || r.Host != "svc.example" || r.UserAgent() != userAgent {
			w.WriteHeader(http.StatusBadRequest)
		}
	})
	mux.HandleFunc("/query", func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Query().Get("full") != "1" {
			w.WriteHeader(http.StatusBadRequest)
		}
	})
	mux.HandleFunc("/slow", func(w http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-time.After(3 * time.Second):
		}
	})
	plain := httptest.NewServer(mux)
	defer plain.Close()
	secure := httptest.NewTLSServer(mux)
	defer secure.Close()
	pp, sp := port(t, plain.Listener.Addr().String()), port(t, secure.Listener.Addr().String())
	ports := []corev1.ContainerPort{{Name: "http", ContainerPort: int32(pp)}}

	tests := []struct {
		name    string
		action  corev1.HTTPGetAction
		wantOK  bool
		wantMsg string
	}{
		{"a 200 passes and carries the body", corev1.HTTPGetAction{Path: "/ok", Port: intstr.FromInt(pp)}, true, "fine"},
		{"a named port resolves from the container's ports", corev1.HTTPGetAction{Path: "/ok", Port: intstr.FromString("http")}, true, "fine"},
		{"an unknown named port fails", corev1.HTTPGetAction{Path: "/ok", Port: intstr.FromString("admin")}, false, `no container port named "admin"`},
		{"HTTPS does not verify the certificate", corev1.HTTPGetAction{Path: "/ok", Port: intstr.FromInt(sp), Scheme: corev1.URISchemeHTTPS}, true, "fine"},
		{"a redirect to another host passes unfollowed", corev1.HTTPGetAction{Path: "/redirect", Port: intstr.FromInt(pp)}, true, ""},
		{"a 503 fails with a truncated body", corev1.HTTPGetAction{Path: "/bad", Port: intstr.FromInt(pp)}, false, "HTTP probe failed with statuscode: 503"},
		{"headers and the Host header are sent", corev1.HTTPGetAction{Path: "/headers", Port: intstr.FromInt(pp), HTTPHeaders: []corev1.HTTPHeader{{Name: "X-Probe", Value: "yes"}, {Name: "Host", Value: "svc.example"}}}, true, ""},
		{"a query in the path is kept", corev1.HTTPGetAction{Path: "/query?full=1", Port: intstr.FromInt(pp)}, true, ""},
		{"a slow server fails on the timeout", corev1.HTTPGetAction{Path: "/slow", Port: intstr.FromInt(pp)}, false, "deadline exceeded"},
		{"a closed port fails", corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt(closedPort(t))}, false, "connection refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ok, msg := Run(context.Background(), &corev1.Probe{ProbeHandler: corev1.ProbeHandler{HTTPGet: &tt.action}}, local, ports)
			if ok != tt.wantOK || !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("Run = %v, %.200q; want %v, containing %q", ok, msg, tt.wantOK, tt.wantMsg)
			}
			if len(msg) > maxMsg+len("...(truncated)") {
				t.Errorf("message of %d bytes is not truncated", len(msg))
			}
		})
	}
}

// closedPort returns a loopback port nothing listens on.
func closedPort(t *testing.T) int {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := port(t, l.Addr().String())
	l.Close()
	return p
}

func TestTCPSocket(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	open := port(t, l.Addr().String())
	ports := []corev1.ContainerPort{{Name: "tcp", ContainerPort: int32(open)}}
	for _, tt := range []struct {
		name   string
		port   intstr.IntOrString
		wantOK bool
	}{
		{"a listening port passes", intstr.FromInt(open), true},
		{"a named listening port passes", intstr.FromString("tcp"), true},
		{"a closed port fails", intstr.FromInt(closedPort(t)), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ok, msg := Run(context.Background(), &corev1.Probe{ProbeHandler: corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: tt.port}}}, local, ports)
			if ok != tt.wantOK {
				t.Errorf("Run = %v, %q; want %v", ok, msg, tt.wantOK)
			}
		})
	}
}

func TestGRPC(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("ready", healthpb.HealthCheckResponse_SERVING)
	hs.SetServingStatus("draining", healthpb.HealthCheckResponse_NOT_SERVING)
	healthpb.RegisterHealthServer(srv, hs)
	go srv.Serve(l)
	defer srv.Stop()
	p := int32(port(t, l.Addr().String()))
	str := func(s string) *string { return &s }
	for _, tt := range []struct {
		name    string
		action  corev1.GRPCAction
		wantOK  bool
		wantMsg string
	}{
		{"the server's overall health passes", corev1.GRPCAction{Port: p}, true, ""},
		{"a serving service passes", corev1.GRPCAction{Port: p, Service: str("ready")}, true, ""},
		{"a not-serving service fails", corev1.GRPCAction{Port: p, Service: str("draining")}, false, "NOT_SERVING"},
		{"an unknown service fails", corev1.GRPCAction{Port: p, Service: str("nope")}, false, "NotFound"},
		{"a closed port fails", corev1.GRPCAction{Port: int32(closedPort(t))}, false, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ok, msg := Run(context.Background(), &corev1.Probe{ProbeHandler: corev1.ProbeHandler{GRPC: &tt.action}}, local, nil)
			if ok != tt.wantOK || !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("Run = %v, %q; want %v, containing %q", ok, msg, tt.wantOK, tt.wantMsg)
			}
		})
	}
}

func TestExec(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("nsenter needs root")
	}
	if _, err := exec.LookPath("nsenter"); err != nil {
		t.Skip("no nsenter")
	}
	// The test process stands in for the container: its namespaces are the
	// host's, which is what nodelet's containers share but for mounts.
	target := Target{ContainerPID: os.Getpid(), Env: []string{"PATH=/usr/bin:/bin", "GREETING=hello"}}
	for _, tt := range []struct {
		name    string
		cmd     []string
		timeout int32
		wantOK  bool
		wantMsg string
	}{
		{"exit 0 passes with the output", []string{"sh", "-c", "echo $GREETING"}, 0, true, "hello"},
		{"a non-zero exit fails with the code", []string{"sh", "-c", "echo bad; exit 3"}, 0, false, "exited with 3: bad"},
		{"a command past its timeout fails", []string{"sleep", "5"}, 1, false, "timed out after 1s"},
		{"a missing command fails", []string{"/no/such/binary"}, 0, false, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			p := &corev1.Probe{ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: tt.cmd}}, TimeoutSeconds: tt.timeout}
			ok, msg := Run(context.Background(), p, target, nil)
			if ok != tt.wantOK || !strings.Contains(msg, tt.wantMsg) {
				t.Errorf("Run = %v, %q; want %v, containing %q", ok, msg, tt.wantOK, tt.wantMsg)
			}
		})
	}
}

// scripted is an HTTP server whose answers follow a script of pass/fail
// results, one per request; past the end it repeats the last one.
type scripted struct {
	script []bool
	n      atomic.Int32
}

func (s *scripted) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	i := int(s.n.Add(1)) - 1
	ok := s.script[min(i, len(s.script)-1)]
	if !ok {
		w.WriteHeader(http.StatusInternalServerError)
	}
	fmt.Fprintf(w, "attempt %d", i)
}

type recorder struct {
	mu      sync.Mutex
	updates []bool
	done    chan struct{}
	want    int
}

func (r *recorder) update(passing bool, msg string) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.updates = append(r.updates, passing)
	if len(r.updates) == r.want {
		close(r.done)
	}
}

func TestWatchThresholds(t *testing.T) {
	P, F := true, false
	tests := []struct {
		name      string
		kind      Kind
		success   int32
		failure   int32
		script    []bool
		attempts  int // attempts to let run before stopping
		want      []bool
		stopsSelf bool
	}{
		{
			name: "readiness starts failing and turns passing after one success",
			kind: Readiness, script: []bool{P, P, P}, attempts: 3,
			want: []bool{P},
		},
		{
			name: "readiness needs successThreshold passes in a row",
			kind: Readiness, success: 3, script: []bool{P, P, F, P, P, P, P}, attempts: 7,
			want: []bool{P},
		},
		{
			name: "readiness flips back after failureThreshold failures",
			kind: Readiness, failure: 2, script: []bool{P, F, P, F, F, F, P}, attempts: 7,
			want: []bool{P, F, P},
		},
		{
			name: "liveness starts passing, reports only the thresholded failure, then stops",
			kind: Liveness, script: []bool{P, F, F, P, F, F, F, P}, attempts: 7,
			want: []bool{F}, stopsSelf: true,
		},
		{
			name: "startup reports its first success and stops",
			kind: Startup, script: []bool{F, F, P}, attempts: 3,
			want: []bool{P}, stopsSelf: true,
		},
		{
			name: "startup reports reaching failureThreshold and stops",
			kind: Startup, failure: 4, script: []bool{F, F, F, F, P}, attempts: 4,
			want: []bool{F}, stopsSelf: true,
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			srv := &scripted{script: tt.script}
			ts := httptest.NewServer(srv)
			defer ts.Close()
			p := &corev1.Probe{
				ProbeHandler:     corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromInt(port(t, ts.Listener.Addr().String()))}},
				PeriodSeconds:    1,
				SuccessThreshold: tt.success,
				FailureThreshold: tt.failure,
			}
			rec := &recorder{want: len(tt.want), done: make(chan struct{})}
			ctx, cancel := context.WithCancel(context.Background())
			defer cancel()
			finished := make(chan struct{})
			go func() {
				Watch(ctx, p, tt.kind, local, nil, rec.update)
				close(finished)
			}()
			if tt.stopsSelf {
				<-finished
			} else {
				// Wait for the expected updates and for the script to play
				// out, then stop the watch; extra updates would still show.
				select {
				case <-rec.done:
				case <-time.After(10 * time.Second):
					t.Error("expected updates did not come")
				}
				for int(srv.n.Load()) < tt.attempts {
					time.Sleep(time.Millisecond)
				}
				cancel()
				<-finished
			}
			rec.mu.Lock()
			defer rec.mu.Unlock()
			if !slices.Equal(rec.updates, tt.want) {
				t.Errorf("updates = %v, want %v", rec.updates, tt.want)
			}
			if tt.stopsSelf && int(srv.n.Load()) != tt.attempts {
				t.Errorf("%d attempts before stopping, want %d", srv.n.Load(), tt.attempts)
			}
		})
	}
}

func TestWatchWaitsInitialDelayAndStopsOnCancel(t *testing.T) {
	srv := &scripted{script: []bool{true}}
	ts := httptest.NewServer(srv)
	defer ts.Close()
	p := &corev1.Probe{
		ProbeHandler:        corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Port: intstr.FromInt(port(t, ts.Listener.Addr().String()))}},
		InitialDelaySeconds: 1000, // 5s at the test's tick: cancelled long before
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{})
	go func() {
		Watch(ctx, p, Readiness, local, nil, func(bool, string) { t.Error("update during the initial delay") })
		close(done)
	}()
	cancel()
	<-done
	if srv.n.Load() != 0 {
		t.Errorf("%d attempts during the initial delay", srv.n.Load())
	}
}
