package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	gwebsocket "github.com/gorilla/websocket"
	"k8s.io/client-go/rest"
	clientportforward "k8s.io/client-go/tools/portforward"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/streaming/pkg/httpstream"
	"k8s.io/streaming/pkg/httpstream/spdy"
	"k8s.io/streaming/pkg/httpstream/wsstream"
)

// kubelet serves pods/portforward with the kubelet's own streaming server
// (k8s.io/cri-streaming, as e2e's nodelet does), forwarding the admin port
// to a test admin server. With tunnel it also accepts SPDY tunneled over a
// websocket, what kubectl tries first; without, it refuses the websocket
// and the client falls back to SPDY.
type kubelet struct {
	tunnel bool
	// admin is the address the pod's admin port forwards to.
	admin string

	mu       sync.Mutex
	forwards int // guarded by mu; stream pairs handled
}

func (k *kubelet) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/pods/ztunnel-x4m9q/portforward") {
		http.Error(w, `pods "?" not found`, http.StatusNotFound)
		return
	}
	if wsstream.IsWebSocketRequest(r) {
		if !k.tunnel {
			http.Error(w, "websockets are not served here", http.StatusBadRequest)
			return
		}
		k.serveTunnel(w, r)
		return
	}
	portforward.ServePortForward(w, r, k, "ztunnel-x4m9q", "", &portforward.V4Options{},
		time.Minute, 10*time.Second, portforward.SupportedProtocols)
}

// serveTunnel accepts the websocket and serves SPDY inside it, as
// e2e/internal/kubeletapi does.
func (k *kubelet) serveTunnel(w http.ResponseWriter, r *http.Request) {
	var subprotocols []string
	for _, p := range portforward.SupportedProtocols {
		subprotocols = append(subprotocols, portforward.WebsocketsSPDYTunnelingPrefix+p)
	}
	up := gwebsocket.Upgrader{Subprotocols: subprotocols, CheckOrigin: func(*http.Request) bool { return true }}
	ws, err := up.Upgrade(w, r, nil)
	if err != nil {
		return
	}
	conn := clientportforward.NewTunnelingConnection("server", ws)
	defer conn.Close()
	req := r.Clone(r.Context())
	req.Header = http.Header{}
	req.Header.Set(httpstream.HeaderConnection, httpstream.HeaderUpgrade)
	req.Header.Set(httpstream.HeaderUpgrade, spdy.HeaderSpdy31)
	req.Header.Set(httpstream.HeaderProtocolVersion, strings.TrimPrefix(ws.Subprotocol(), portforward.WebsocketsSPDYTunnelingPrefix))
	portforward.ServePortForward(&tunnelResponse{conn: conn, header: http.Header{}}, req, k, "ztunnel-x4m9q", "", &portforward.V4Options{},
		time.Minute, 10*time.Second, portforward.SupportedProtocols)
}

// tunnelResponse is the ResponseWriter of the SPDY upgrade inside a
// websocket: its Hijack yields the tunnel.
type tunnelResponse struct {
	conn   net.Conn
	header http.Header
}

func (t *tunnelResponse) Header() http.Header         { return t.header }
func (t *tunnelResponse) WriteHeader(int)             {}
func (t *tunnelResponse) Write(b []byte) (int, error) { return 0, errors.New("no body in a tunnel") }
func (t *tunnelResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return t.conn, bufio.NewReadWriter(bufio.NewReader(t.conn), bufio.NewWriter(t.conn)), nil
}

// PortForward copies between stream and the admin server, as the kubelet
// does with the pod's port.
func (k *kubelet) PortForward(ctx context.Context, _, _ string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	k.mu.Lock()
	k.forwards++
	k.mu.Unlock()
	if port != adminPort {
		return fmt.Errorf("nothing listens on port %d", port)
	}
	conn, err := net.Dial("tcp", k.admin)
	if err != nil {
		return err
	}
	defer conn.Close()
	done := make(chan struct{})
	go func() {
		defer close(done)
		io.Copy(conn, stream)
		conn.(*net.TCPConn).CloseWrite()
	}()
	_, err = io.Copy(stream, conn)
	stream.Close()
	conn.Close()
	<-done
	return err
}

// forwardTo starts an API server stand-in whose pods/portforward reaches
// admin, and returns its config and the pod's portforward URL.
func forwardTo(t *testing.T, k *kubelet) (*rest.Config, *url.URL) {
	t.Helper()
	srv := httptest.NewServer(k)
	t.Cleanup(srv.Close)
	u, _ := url.Parse(srv.URL + "/api/v1/namespaces/istio-system/pods/ztunnel-x4m9q/portforward")
	return &rest.Config{Host: srv.URL}, u
}

func TestPortForwardReachesTheAdminServer(t *testing.T) {
	dump := marshal(t, node1Dump(t))
	for _, tunnel := range []bool{true, false} {
		name := "SPDY over a websocket"
		if !tunnel {
			name = "SPDY, after the websocket is refused"
		}
		t.Run(name, func(t *testing.T) {
			admin := newFakeAdmin(t, dump)
			k := &kubelet{tunnel: tunnel, admin: admin.Listener.Addr().String()}
			rc, u := forwardTo(t, k)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			a, release, err := openPortForward(ctx, rc, u, "ztunnel-x4m9q.istio-system")
			if err != nil {
				t.Fatal(err)
			}
			defer release()
			// Several requests, each on its own pair of streams.
			f, err := a.configDump(ctx)
			if err != nil {
				t.Fatalf("config_dump: %v", err)
			}
			if len(f.dump.Workloads) != 5 || len(f.dump.Pods) != 2 {
				t.Errorf("got %d workloads and %d pods, want 5 and 2", len(f.dump.Workloads), len(f.dump.Pods))
			}
			if _, l, err := a.logLevel(ctx, "warn"); err != nil || l.Level != "WARN" {
				t.Errorf("setting the level: %v, %v", l, err)
			}
			if _, l, err := a.logLevel(ctx, ""); err != nil || l.Level != "WARN" {
				t.Errorf("reading the level: %v, %v", l, err)
			}
			k.mu.Lock()
			defer k.mu.Unlock()
			if k.forwards != 3 {
				t.Errorf("%d forwarded connections, want 3", k.forwards)
			}
		})
	}
}

func TestPortForwardErrorsSayWhatFailed(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	t.Run("nothing listening on the admin port is the kubelet's error", func(t *testing.T) {
		ln, _ := net.Listen("tcp", "127.0.0.1:0")
		addr := ln.Addr().String()
		ln.Close()
		rc, u := forwardTo(t, &kubelet{tunnel: true, admin: addr})
		a, release, err := openPortForward(ctx, rc, u, "ztunnel-x4m9q.istio-system")
		if err != nil {
			t.Fatal(err)
		}
		defer release()
		_, err = a.configDump(ctx)
		t.Logf("error: %v", err)
		want := "port-forward: error forwarding port 15000 to pod ztunnel-x4m9q, uid : dial tcp " + addr + ": connect: connection refused"
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("got %v, want an error with %q", err, want)
		}
	})
	t.Run("a port-forward the API server refuses", func(t *testing.T) {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, `pods "ztunnel-x4m9q" is forbidden: User "dev" cannot create resource "pods/portforward"`, http.StatusForbidden)
		}))
		t.Cleanup(srv.Close)
		u, _ := url.Parse(srv.URL + "/api/v1/namespaces/istio-system/pods/ztunnel-x4m9q/portforward")
		_, _, err := openPortForward(ctx, &rest.Config{Host: srv.URL}, u, "ztunnel-x4m9q.istio-system")
		t.Logf("error: %v", err)
		if err == nil || !strings.HasPrefix(err.Error(), "port-forward to port 15000: ") || !strings.Contains(err.Error(), "forbidden") {
			t.Errorf("got %v, want the refusal", err)
		}
	})
	t.Run("an API server that does not answer", func(t *testing.T) {
		stop := make(chan struct{})
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			select {
			case <-r.Context().Done():
			case <-stop:
			}
		}))
		t.Cleanup(srv.Close)
		// The abandoned dial holds its request until the server gives up.
		t.Cleanup(func() { close(stop) })
		u, _ := url.Parse(srv.URL + "/portforward")
		ctx, cancel := context.WithTimeout(ctx, 200*time.Millisecond)
		defer cancel()
		_, _, err := openPortForward(ctx, &rest.Config{Host: srv.URL}, u, "ztunnel-x4m9q.istio-system")
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("got %v, want the deadline", err)
		}
	})
}
