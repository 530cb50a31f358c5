package proxy

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/pkg/hbone"
)

// mesh is two pods on loopback addresses: client (127.0.0.1) and echo
// (127.0.0.2, an echo app and its HBONE listener), and a service echo with
// VIP 10.96.0.1:80 in front of the app.
type mesh struct {
	*env
	clientPod, echoPod *Pod
	app                netip.AddrPort // echo's application
	hboneAddr          netip.AddrPort // echo's HBONE listener
	clientID, echoID   spiffeid.ID
}

const echoKey = "a/echo.a.svc.cluster.local"

func newMesh(t *testing.T) *mesh {
	t.Helper()
	m := &mesh{
		clientPod: &Pod{UID: "uid-client", Name: "client", Namespace: "a", ServiceAccount: "client", Dial: dialer()},
		echoPod:   &Pod{UID: "uid-echo", Name: "echo", Namespace: "a", ServiceAccount: "echo", Dial: dialer()},
		clientID:  spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/client"),
		echoID:    spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/echo"),
	}
	// The proxy dials the echo pod's HBONE port; the test listener stands
	// in for it at a free port.
	m.env = newEnv(t, func(ctx context.Context, network, addr string) (net.Conn, error) {
		if addr == "127.0.0.2:15008" {
			addr = m.hboneAddr.String()
		}
		return dialer()(ctx, network, addr)
	})
	m.app = echoServer(t, "127.0.0.2:0")
	m.hboneAddr = serve(t, "127.0.0.2:0", func(c net.Conn) { m.proxy.HBONE(m.echoPod, c) })
	m.apply(workloadapi.AddressTypeURL,
		workload("a", "client", "client", "127.0.0.1"),
		workload("a", "echo", "echo", "127.0.0.2", inService(echoKey, 80, uint32(m.app.Port()))),
		service("a", "echo.a.svc.cluster.local", "10.96.0.1", 80, uint32(m.app.Port())),
	)
	return m
}

// outbound returns a connection captured from the client pod to origDst.
// outbound connects the client pod's app to origDst through the proxy's
// outbound path. The proxy may refuse the connection so fast (a reset) that
// the dial itself fails: that error is returned, any other is fatal.
func (m *mesh) outbound(t *testing.T, origDst string) (net.Conn, error) {
	t.Helper()
	ln := serve(t, "127.0.0.1:0", func(c net.Conn) { m.proxy.Outbound(m.clientPod, c, netip.MustParseAddrPort(origDst)) })
	c, err := net.Dial("tcp", ln.String())
	if errors.Is(err, syscall.ECONNRESET) {
		return nil, err
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c, nil
}

// eventually waits for cond, which the proxy makes true once a connection
// is fully closed on both ends.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("never happened: %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func deny(ns, name, principal string) func(m *mesh) {
	return func(m *mesh) {
		m.apply(security.AuthorizationTypeURL, principalPolicy(ns, name, security.Action_DENY, principal))
	}
}

func allow(ns, name, principal string) func(m *mesh) {
	return func(m *mesh) {
		m.apply(security.AuthorizationTypeURL, principalPolicy(ns, name, security.Action_ALLOW, principal))
	}
}

func strict(ns string) func(m *mesh) {
	return func(m *mesh) {
		m.apply(security.AuthorizationTypeURL, policyUpdate(&security.Authorization{
			Name: "istio_converted_static_strict", Namespace: ns, Scope: security.Scope_NAMESPACE, Action: security.Action_DENY,
			Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{
				NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}},
			}}}}}},
		}))
	}
}

func TestHBONERequestsAreAuthorizedThenConnected(t *testing.T) {
	tests := []struct {
		name       string
		setup      func(m *mesh)
		authority  func(m *mesh) string
		wantStatus int
		wantFlags  string
	}{
		{"a request to the pod's app without policy is connected",
			nil, func(m *mesh) string { return m.app.String() }, http.StatusOK, "-"},
		{"a request allowed by an ALLOW policy is connected",
			allow("a", "allow-client", "cluster.local/ns/a/sa/client"), func(m *mesh) string { return m.app.String() }, http.StatusOK, "-"},
		{"a request from a denied principal is refused with 401",
			deny("a", "deny-client", "cluster.local/ns/a/sa/client"), func(m *mesh) string { return m.app.String() }, http.StatusUnauthorized, "DENY"},
		{"a request no ALLOW policy matches is refused with 401",
			allow("a", "allow-other", "cluster.local/ns/a/sa/other"), func(m *mesh) string { return m.app.String() }, http.StatusUnauthorized, "DENY"},
		{"a request to a port nothing listens on is answered 503",
			nil, func(m *mesh) string { return netip.AddrPortFrom(m.app.Addr(), closedPort(t)).String() }, http.StatusServiceUnavailable, "CONNECT"},
		{"a request for an address that is not the pod's is refused with 400",
			nil, func(m *mesh) string {
				return netip.AddrPortFrom(netip.MustParseAddr("127.0.0.3"), m.app.Port()).String()
			}, http.StatusBadRequest, "-"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMesh(t)
			if tt.setup != nil {
				tt.setup(m)
			}
			pool := hbone.NewPool(hbone.PoolOptions{})
			defer pool.Close()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			key := hbone.Key{Src: m.clientID, Dst: m.echoID, Addr: m.hboneAddr}
			c, err := pool.Connect(ctx, key, m.certs.ClientTLS(m.clientID, []spiffeid.ID{m.echoID}), tt.authority(m),
				hbone.Headers{ForwardedFor: netip.MustParseAddrPort("127.0.0.1:40000")})
			wantConnect(t, c, err, tt.wantStatus)
			want := map[string]string{"reporter": "destination", "response_flags": tt.wantFlags,
				"source_principal": m.clientID.String(), "destination_workload": "echo", "connection_security_policy": "mutual_tls"}
			if tt.wantStatus == http.StatusBadRequest {
				delete(want, "destination_workload")
			}
			eventually(t, "the destination records the closed connection", func() bool {
				return m.counter("istio_tcp_connections_closed_total", want) == 1
			})
			if tt.wantStatus == http.StatusOK {
				eventually(t, "the destination counts the bytes", func() bool {
					return m.counter("istio_tcp_received_bytes_total", want) == 5 && m.counter("istio_tcp_sent_bytes_total", want) == 5
				})
			}
		})
	}
}

func TestOutboundConnectionsReachTheirDestination(t *testing.T) {
	tests := []struct {
		name      string
		setup     func(m *mesh)
		origDst   func(m *mesh) string
		wantEcho  bool
		wantFlags string
		wantMTLS  bool
	}{
		{"a service VIP is reached over HBONE",
			nil, func(*mesh) string { return "10.96.0.1:80" }, true, "-", true},
		{"a pod IP is reached over HBONE",
			nil, func(m *mesh) string { return m.app.String() }, true, "-", true},
		{"an address outside the mesh is passed through",
			nil, func(t *mesh) string { return echoServer(t.t, "127.0.0.5:0").String() }, true, "-", false},
		{"a destination denying the source is reported denied",
			deny("a", "deny-client", "cluster.local/ns/a/sa/client"), func(*mesh) string { return "10.96.0.1:80" }, false, "DENY", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMesh(t)
			if tt.setup != nil {
				tt.setup(m)
			}
			var got string
			c, err := m.outbound(t, tt.origDst(m))
			if err == nil {
				got, err = roundTrip(c, "hello")
			}
			if tt.wantEcho && (err != nil || got != "hello") {
				t.Fatalf("echo = %q, %v; want hello", got, err)
			}
			if !tt.wantEcho && got != "" {
				t.Fatalf("echo = %q from a refused connection", got)
			}
			security := "unknown"
			if tt.wantMTLS {
				security = "mutual_tls"
			}
			want := map[string]string{"reporter": "source", "response_flags": tt.wantFlags,
				"source_workload": "client", "source_principal": m.clientID.String(), "connection_security_policy": security}
			eventually(t, "the source records the closed connection", func() bool {
				return m.counter("istio_tcp_connections_closed_total", want) == 1
			})
			if tt.wantEcho {
				eventually(t, "the source counts the bytes", func() bool {
					return m.counter("istio_tcp_received_bytes_total", want) == 5 && m.counter("istio_tcp_sent_bytes_total", want) == 5
				})
			}
		})
	}
}

func TestInboundPlaintextIsAuthorizedAsAPeerWithoutIdentity(t *testing.T) {
	tests := []struct {
		name      string
		setup     func(m *mesh)
		wantEcho  bool
		wantFlags string
	}{
		{"plaintext is connected without policy", nil, true, "-"},
		{"plaintext is refused under STRICT", strict("a"), false, "DENY"},
		{"plaintext is refused when only principals are allowed", allow("a", "allow-client", "cluster.local/ns/a/sa/client"), false, "DENY"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newMesh(t)
			if tt.setup != nil {
				tt.setup(m)
			}
			ln := serve(t, "127.0.0.2:0", func(c net.Conn) { m.proxy.Inbound(m.echoPod, c, m.app) })
			c, err := net.Dial("tcp", ln.String())
			if err == nil {
				defer c.Close()
			} else if tt.wantEcho {
				t.Fatal(err)
			}
			// A refusal may reset the connection before Dial returns.
			got := ""
			if err == nil {
				got, err = roundTrip(c, "hello")
			}
			if tt.wantEcho && (err != nil || got != "hello") {
				t.Fatalf("echo = %q, %v; want hello", got, err)
			}
			if !tt.wantEcho && got != "" {
				t.Fatalf("echo = %q from a refused connection", got)
			}
			want := map[string]string{"reporter": "destination", "response_flags": tt.wantFlags,
				"destination_workload": "echo", "connection_security_policy": "unknown"}
			eventually(t, "the destination records the closed connection", func() bool {
				return m.counter("istio_tcp_connections_closed_total", want) == 1
			})
		})
	}
}

// closedPort is a port on 127.0.0.2 that nothing listens on.
func closedPort(t *testing.T) uint16 {
	ln, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Fatal(err)
	}
	p := addrOf(ln.Addr()).Port()
	ln.Close()
	return p
}

// plaintextEchoed opens a plaintext connection to m's echo pod through its
// inbound path (closed at the end of the test) and exchanges one message
// with the app over it, leaving it open both ways.
func plaintextEchoed(t *testing.T, m *mesh) net.Conn {
	t.Helper()
	ln := serve(t, "127.0.0.2:0", func(c net.Conn) { m.proxy.Inbound(m.echoPod, c, m.app) })
	c, err := net.Dial("tcp", ln.String())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	return c
}

// Between two sockets the kernel moves the bytes (splice); they are
// counted as they pass, not once a large chunk has or the connection ends.
func TestPlaintextBytesAreCountedWhileTheConnectionLives(t *testing.T) {
	m := newMesh(t)
	plaintextEchoed(t, m) // open until the test ends
	want := map[string]string{"reporter": "destination", "destination_workload": "echo"}
	eventually(t, "the destination counts the bytes of the open connection", func() bool {
		return m.counter("istio_tcp_received_bytes_total", want) == 5 && m.counter("istio_tcp_sent_bytes_total", want) == 5
	})
	if n := m.counter("istio_tcp_connections_closed_total", want); n != 0 {
		t.Fatalf("%v connections closed, want the connection still open", n)
	}
}

// Close ends connections that are open and idle in both directions: the
// client's side is closed, and the app's side, which would wait on the app
// for ever, is aborted with it. (It used to hang: the direction reading
// the closed client returned without aborting the other.)
func TestCloseEndsIdleConnections(t *testing.T) {
	m := newMesh(t)
	c := plaintextEchoed(t, m)
	closed := make(chan error, 1)
	go func() { closed <- m.proxy.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close did not return while a connection was open and idle")
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	if n, err := c.Read(make([]byte, 5)); err == nil {
		t.Fatalf("the client read %d bytes after Close, want the connection ended", n)
	}
}
