package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// sourceNode is the address HBONE connections come from in these tests:
// the client's node, as the TCP peer of a real tunnel is.
var sourceNode = netip.MustParseAddr("127.0.0.50")

// Addresses of workloads in the state only: the forwarded header is all
// that carries them, so they need not exist on the machine.
var (
	clientIP    = netip.MustParseAddr("10.1.0.1") // the client pod (sa client)
	otherIP     = netip.MustParseAddr("10.1.0.3") // a pod of sa other
	namesakeIP  = netip.MustParseAddr("10.1.0.4") // a pod of sa client in namespace b
	echoExtraIP = netip.MustParseAddr("10.1.0.2") // a second address of the echo pod
	clientIP6   = netip.MustParseAddr("fd00:1::1")
	unknownIP   = netip.MustParseAddr("10.1.0.9") // no workload
	otherID     = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/other")
)

// sourceMesh is a mesh whose workloads have the addresses above, whose
// access log and debug log are kept, and whose echo pod records the source
// each dial to its app asks for.
type sourceMesh struct {
	*mesh
	access, debug *logBuffer

	mu      sync.Mutex
	sources []netip.Addr // guarded by mu; per dial, invalid when none was asked for
}

func newSourceMesh(t *testing.T) *sourceMesh {
	t.Helper()
	m := &sourceMesh{mesh: newMesh(t), access: &logBuffer{}, debug: &logBuffer{}}
	// Before the first connection: a registry and log of our own.
	m.reg = prometheus.NewRegistry()
	metrics, err := telemetry.New(m.reg, slog.New(slog.NewJSONHandler(m.access, nil)))
	if err != nil {
		t.Fatal(err)
	}
	m.proxy.cfg.Metrics = metrics
	m.proxy.cfg.Log = slog.New(slog.NewJSONHandler(m.debug, &slog.HandlerOptions{Level: slog.LevelDebug}))
	record := func(src netip.Addr) {
		m.mu.Lock()
		m.sources = append(m.sources, src)
		m.mu.Unlock()
	}
	m.echoPod.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		record(netip.Addr{})
		return dialer()(ctx, network, addr)
	}
	m.echoPod.DialFrom = func(ctx context.Context, src netip.Addr, network, addr string) (net.Conn, error) {
		record(src)
		return dialer()(ctx, network, addr)
	}
	extraAddr := func(ip netip.Addr) wopt {
		return func(w *workloadapi.Workload) { w.Addresses = append(w.Addresses, ip.AsSlice()) }
	}
	m.apply(workloadapi.AddressTypeURL,
		workload("a", "client", "client", clientIP.String(), extraAddr(clientIP6)),
		workload("a", "other", "other", otherIP.String()),
		workload("b", "namesake", "client", namesakeIP.String()),
		workload("a", "echo", "echo", m.app.Addr().String(), inService(echoKey, 80, uint32(m.app.Port())), extraAddr(echoExtraIP)),
	)
	return m
}

// connect opens a CONNECT stream to the echo app as id, from sourceNode,
// with fwd (when valid) in forwarded.
func (m *sourceMesh) connect(t *testing.T, id spiffeid.ID, fwd netip.AddrPort) (net.Conn, error) {
	t.Helper()
	pool := hbone.NewPool(hbone.PoolOptions{Dial: (&net.Dialer{LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(sourceNode, 0))}).DialContext})
	t.Cleanup(func() { pool.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	key := hbone.Key{Src: id, Dst: m.echoID, Addr: m.hboneAddr}
	return pool.Connect(ctx, key, m.certs.ClientTLS(id, []spiffeid.ID{m.echoID}), m.app.String(), hbone.Headers{ForwardedFor: fwd})
}

// accessLog waits for the access-log line of the one connection.
func (m *sourceMesh) accessLog(t *testing.T) map[string]any {
	t.Helper()
	var recs []map[string]any
	eventually(t, "the access log line", func() bool {
		recs = m.access.records(t, "connection complete")
		return len(recs) > 0
	})
	if len(recs) != 1 {
		t.Fatalf("%d access-log lines, want 1: %v", len(recs), recs)
	}
	return recs[0]
}

// reasons returns the reason of each debug line with msg.
func (m *sourceMesh) reasons(t *testing.T, msg string) []string {
	t.Helper()
	var out []string
	for _, r := range m.debug.records(t, msg) {
		out = append(out, fmt.Sprint(r["reason"]))
	}
	return out
}

// dialSources returns the sources the app's dials asked for.
func (m *sourceMesh) dialSources() []netip.Addr {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]netip.Addr(nil), m.sources...)
}

func TestHBONEClientIsTheForwardedAddressOnlyWhenTheStateVouchesForIt(t *testing.T) {
	tests := []struct {
		name string
		id   spiffeid.ID
		fwd  netip.AddrPort // zero: no header
		// wantSrc is the client address; zero means the TCP peer.
		wantSrc netip.AddrPort
		// wantWorkload is the client's workload; "" for none.
		wantWorkload string
		// wantReason is in the debug line of a distrusted header; "" when
		// the header is believed.
		wantReason string
	}{
		{"the address of the peer's own workload is the client",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(clientIP, 40000),
			netip.AddrPortFrom(clientIP, 40000), "client", ""},
		{"another address of the peer's own workload is the client",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(clientIP6, 40000),
			netip.AddrPortFrom(clientIP6, 40000), "client", ""},
		{"the address of a workload of another identity is not believed",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(otherIP, 40000),
			netip.AddrPort{}, "", "another identity (spiffe://cluster.local/ns/a/sa/other)"},
		{"the same service account name in another namespace is another identity",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(namesakeIP, 40000),
			netip.AddrPort{}, "", "another identity (spiffe://cluster.local/ns/b/sa/client)"},
		{"a workload cannot claim the address of the client",
			otherID, netip.AddrPortFrom(clientIP, 40000),
			netip.AddrPort{}, "", "another identity (spiffe://cluster.local/ns/a/sa/client)"},
		{"an address no workload has is not believed",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(unknownIP, 40000),
			netip.AddrPort{}, "", "no workload has the forwarded address"},
		{"without the header the TCP peer is the client",
			mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPort{},
			netip.AddrPort{}, "", "no forwarded address"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newSourceMesh(t)
			c, err := m.connect(t, tt.id, tt.fwd)
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			got, err := roundTrip(c, "hello")
			c.Close()
			if err != nil || got != "hello" {
				t.Fatalf("echo = %q, %v; want hello", got, err)
			}

			rec := m.accessLog(t)
			src := rec["src"].(map[string]any)
			gotSrc, err := netip.ParseAddrPort(fmt.Sprint(src["addr"]))
			if err != nil {
				t.Fatalf("access log src.addr %v: %v", src["addr"], err)
			}
			if tt.wantSrc.IsValid() && gotSrc != tt.wantSrc || !tt.wantSrc.IsValid() && gotSrc.Addr() != sourceNode {
				t.Errorf("access log src.addr = %v, want %v (the TCP peer is %v)", gotSrc, tt.wantSrc, sourceNode)
			}
			wantWorkload := tt.wantWorkload
			if wantWorkload == "" {
				wantWorkload = "unknown" // what the access log says of no workload
			}
			if got := fmt.Sprint(src["workload"]); got != wantWorkload {
				t.Errorf("access log src.workload = %v, want %q", got, wantWorkload)
			}

			reasons := m.reasons(t, "hbone client address is the tcp peer")
			switch {
			case tt.wantReason == "" && len(reasons) > 0:
				t.Errorf("the header was distrusted: %q", reasons)
			case tt.wantReason != "" && (len(reasons) != 1 || !strings.Contains(reasons[0], tt.wantReason)):
				t.Errorf("debug reasons %q, want one with %q", reasons, tt.wantReason)
			}
		})
	}
}

func mustID(s string) spiffeid.ID { return spiffeid.RequireFromString(s) }

func TestTheAppIsDialedFromTheClientAddressWhereItCanBe(t *testing.T) {
	clientID := mustID("spiffe://cluster.local/ns/a/sa/client")
	echoID := mustID("spiffe://cluster.local/ns/a/sa/echo")
	tests := []struct {
		name string
		id   spiffeid.ID
		fwd  netip.AddrPort
		// wantSource is what the dial asks for; invalid: the pod's own
		// address, with wantReason logged.
		wantSource netip.Addr
		wantReason string
	}{
		{"a validated client is the source", clientID, netip.AddrPortFrom(clientIP, 40000), clientIP, ""},
		{"a client of the other address family is not", clientID, netip.AddrPortFrom(clientIP6, 40000),
			netip.Addr{}, "not of the address family"},
		{"the pod itself is not (hairpin)", echoID, netip.AddrPortFrom(echoExtraIP, 40000),
			netip.Addr{}, "the client is the pod itself"},
		{"the pod's address the app is dialed at is not (hairpin)", echoID, netip.AddrPortFrom(netip.MustParseAddr("127.0.0.2"), 40000),
			netip.Addr{}, "the client is the pod itself"},
		{"a loopback TCP peer is not", clientID, netip.AddrPort{}, netip.Addr{}, "loopback"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newSourceMesh(t)
			c, err := m.connect(t, tt.id, tt.fwd)
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			got, err := roundTrip(c, "hello")
			c.Close()
			if err != nil || got != "hello" {
				t.Fatalf("echo = %q, %v; want hello", got, err)
			}
			if srcs := m.dialSources(); len(srcs) != 1 || srcs[0] != tt.wantSource {
				t.Errorf("the app was dialed asking for sources %v, want [%v]", srcs, tt.wantSource)
			}
			reasons := m.reasons(t, "connecting to the app from the pod's own address")
			switch {
			case tt.wantReason == "" && len(reasons) > 0:
				t.Errorf("fell back to the pod's address: %q", reasons)
			case tt.wantReason != "" && (len(reasons) != 1 || !strings.Contains(reasons[0], tt.wantReason)):
				t.Errorf("debug reasons %q, want one with %q", reasons, tt.wantReason)
			}
		})
	}

	t.Run("plaintext from a loopback client keeps the pod's own address", func(t *testing.T) {
		m := newSourceMesh(t)
		ln := serve(t, "127.0.0.2:0", func(c net.Conn) { m.proxy.Inbound(m.echoPod, c, m.app) })
		c, err := net.Dial("tcp", ln.String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if got, err := roundTrip(c, "hello"); err != nil || got != "hello" {
			t.Fatalf("echo = %q, %v; want hello", got, err)
		}
		if srcs := m.dialSources(); len(srcs) != 1 || srcs[0].IsValid() {
			t.Errorf("the app was dialed asking for sources %v, want none", srcs)
		}
		if reasons := m.reasons(t, "connecting to the app from the pod's own address"); len(reasons) != 1 || !strings.Contains(reasons[0], "loopback") {
			t.Errorf("debug reasons %q, want one saying loopback", reasons)
		}
	})
}

// sourceIPPolicy is a namespace-wide policy of action matching connections
// from ip (sourceIps) or, with not, from anywhere else (notSourceIps).
func sourceIPPolicy(name string, action security.Action, ip netip.Addr, not bool) func(m *mesh) {
	return func(m *mesh) {
		addrs := []*security.Address{{Address: ip.AsSlice(), Length: uint32(ip.BitLen())}}
		match := &security.Match{SourceIps: addrs}
		if not {
			match = &security.Match{NotSourceIps: addrs}
		}
		m.apply(security.AuthorizationTypeURL, policyUpdate(&security.Authorization{
			Name: name, Namespace: "a", Scope: security.Scope_NAMESPACE, Action: action,
			Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{match}}}}},
		}))
	}
}

func TestSourceIPPoliciesSeeTheValidatedClient(t *testing.T) {
	clientID := mustID("spiffe://cluster.local/ns/a/sa/client")
	fromClient := netip.AddrPortFrom(clientIP, 40000)
	tests := []struct {
		name       string
		policy     func(m *mesh)
		id         spiffeid.ID
		wantStatus int
	}{
		{"a DENY of the client's address denies the client",
			sourceIPPolicy("deny-client-ip", security.Action_DENY, clientIP, false), clientID, http.StatusUnauthorized},
		{"a DENY of the client's address does not deny another identity claiming it",
			sourceIPPolicy("deny-client-ip", security.Action_DENY, clientIP, false), otherID, http.StatusOK},
		{"an ALLOW of the client's address allows the client",
			sourceIPPolicy("allow-client-ip", security.Action_ALLOW, clientIP, false), clientID, http.StatusOK},
		{"an ALLOW of the client's address does not allow another identity claiming it",
			sourceIPPolicy("allow-client-ip", security.Action_ALLOW, clientIP, false), otherID, http.StatusUnauthorized},
		{"a DENY of all but the client's address (not_source_ips) lets the client through",
			sourceIPPolicy("deny-not-client-ip", security.Action_DENY, clientIP, true), clientID, http.StatusOK},
		{"a DENY of all but the client's address (not_source_ips) denies another identity claiming it",
			sourceIPPolicy("deny-not-client-ip", security.Action_DENY, clientIP, true), otherID, http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newSourceMesh(t)
			tt.policy(m.mesh)
			c, err := m.connect(t, tt.id, fromClient)
			if tt.wantStatus != http.StatusOK {
				var se *hbone.StatusError
				if !errors.As(err, &se) || se.Code != tt.wantStatus {
					t.Fatalf("Connect error = %v, want status %d", err, tt.wantStatus)
				}
				return
			}
			if err != nil {
				t.Fatalf("Connect: %v", err)
			}
			got, err := roundTrip(c, "hello")
			c.Close()
			if err != nil || got != "hello" {
				t.Fatalf("echo = %q, %v; want hello", got, err)
			}
		})
	}
}

// A client pod that has just started can reach the destination ztunnel
// before its xDS update does: its forwarded address is waited for (up to
// StateWait) and then believed.
func TestHBONEClientOfAWorkloadNotYetInTheStateIsWaitedFor(t *testing.T) {
	m := newSourceMesh(t)
	m.proxy.cfg.StateWait = 5 * time.Second
	lateIP := netip.MustParseAddr("10.1.0.7")
	go func() {
		time.Sleep(200 * time.Millisecond)
		m.apply(workloadapi.AddressTypeURL, workload("a", "late", "client", lateIP.String()))
	}()
	c, err := m.connect(t, mustID("spiffe://cluster.local/ns/a/sa/client"), netip.AddrPortFrom(lateIP, 40000))
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	got, err := roundTrip(c, "hello")
	c.Close()
	if err != nil || got != "hello" {
		t.Fatalf("echo = %q, %v; want hello", got, err)
	}
	src := m.accessLog(t)["src"].(map[string]any)
	if got := fmt.Sprint(src["addr"]); got != netip.AddrPortFrom(lateIP, 40000).String() {
		t.Errorf("access log src.addr = %v, want the late client's %v", got, lateIP)
	}
	if srcs := m.dialSources(); len(srcs) != 1 || srcs[0] != lateIP {
		t.Errorf("app dialed from %v, want %v", srcs, lateIP)
	}
}
