package proxy

import (
	"context"
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
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
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
	m.apply(workloadapi.AddressTypeURL,
		workload("a", "client", "client", clientIP.String(), extraAddr(clientIP6)),
		workload("a", "other", "other", otherIP.String()),
		workload("b", "namesake", "client", namesakeIP.String()),
		m.echo(),
	)
	return m
}

func extraAddr(ip netip.Addr) wopt {
	return func(w *workloadapi.Workload) { w.Addresses = append(w.Addresses, ip.AsSlice()) }
}

// echo is the echo pod's workload, with opts.
func (m *sourceMesh) echo(opts ...wopt) state.Update {
	opts = append([]wopt{inService(echoKey, 80, uint32(m.app.Port())), extraAddr(echoExtraIP)}, opts...)
	return workload("a", "echo", "echo", m.app.Addr().String(), opts...)
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
			wantConnect(t, c, err, http.StatusOK)

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
			wantConnect(t, c, err, http.StatusOK)
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
			wantConnect(t, c, err, tt.wantStatus)
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
	wantConnect(t, c, err, http.StatusOK)
	src := m.accessLog(t)["src"].(map[string]any)
	if got := fmt.Sprint(src["addr"]); got != netip.AddrPortFrom(lateIP, 40000).String() {
		t.Errorf("access log src.addr = %v, want the late client's %v", got, lateIP)
	}
	if srcs := m.dialSources(); len(srcs) != 1 || srcs[0] != lateIP {
		t.Errorf("app dialed from %v, want %v", srcs, lateIP)
	}
}

// The waypoint of these tests: a pod of sa waypoint, the one endpoint of
// service waypointKey. Until a test binds the echo pod or its service to it,
// it is the waypoint of nothing.
var (
	waypointIP = netip.MustParseAddr("10.1.0.5")
	waypointID = mustID("spiffe://cluster.local/ns/a/sa/waypoint")
)

const waypointKey = "a/waypoint.a.svc.cluster.local"

func (m *sourceMesh) addWaypoint() {
	m.apply(workloadapi.AddressTypeURL,
		waypointPodUpdate(),
		service("a", "waypoint.a.svc.cluster.local", "10.96.0.9", 15008, 15008),
	)
}

func waypointPodUpdate(opts ...wopt) state.Update {
	return workload("a", "waypoint", "waypoint", waypointIP.String(), append(opts, inService(waypointKey, 15008, 15008))...)
}

// newWaypointMesh is a sourceMesh with the waypoint's pod and service,
// bound by bind (nil: not bound).
func newWaypointMesh(t *testing.T, bind func(m *sourceMesh)) *sourceMesh {
	m := newSourceMesh(t)
	m.addWaypoint()
	if bind != nil {
		bind(m)
	}
	return m
}

// echoWaypoint binds the echo pod to the waypoint g.
func echoWaypoint(g *workloadapi.GatewayAddress) func(m *sourceMesh) {
	return func(m *sourceMesh) {
		m.apply(workloadapi.AddressTypeURL, m.echo(func(w *workloadapi.Workload) { w.Waypoint = g }))
	}
}

// echoServiceWaypoint binds the echo pod's service to the waypoint g.
func echoServiceWaypoint(g *workloadapi.GatewayAddress) func(m *sourceMesh) {
	return func(m *sourceMesh) {
		m.apply(workloadapi.AddressTypeURL, service("a", "echo.a.svc.cluster.local", "10.96.0.1", 80, uint32(m.app.Port()),
			func(s *workloadapi.Service) { s.Waypoint = g }))
	}
}

// waypointAddr is a waypoint named by the address of its pod.
func waypointAddr(ip netip.Addr) *workloadapi.GatewayAddress {
	return &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip.AsSlice()}},
		HboneMtlsPort: 15008,
	}
}

func TestHBONEClientForwardedByTheDestinationsWaypointIsBelieved(t *testing.T) {
	fromClient := netip.AddrPortFrom(clientIP, 40000)
	tests := []struct {
		name string
		bind func(m *sourceMesh) // nil: the echo pod has no waypoint
		id   spiffeid.ID
		// wantTrusted: the client is fromClient, of the waypoint's
		// workload; else the TCP peer, with wantReason logged.
		wantTrusted bool
		wantReason  string
	}{
		{"the waypoint of the destination pod vouches for the client it served",
			echoWaypoint(gatewayHost(waypointKey)), waypointID, true, ""},
		{"a waypoint named by its pod's address vouches for the client it served",
			echoWaypoint(waypointAddr(waypointIP)), waypointID, true, ""},
		{"the waypoint of the destination pod's service vouches for the client it served",
			echoServiceWaypoint(gatewayHost(waypointKey)), waypointID, true, ""},
		{"a pod of the waypoint that is not ready (draining) still vouches for the client it served",
			func(m *sourceMesh) {
				echoServiceWaypoint(gatewayHost(waypointKey))(m)
				m.apply(workloadapi.AddressTypeURL, waypointPodUpdate(func(w *workloadapi.Workload) {
					w.Status = workloadapi.WorkloadStatus_UNHEALTHY
				}))
			}, waypointID, true, ""},
		{"a peer that is not the destination's waypoint is not believed",
			echoWaypoint(gatewayHost(waypointKey)), otherID, false, "the peer is not a pod of the destination's waypoint"},
		{"a waypoint the destination is not bound to is not believed",
			nil, waypointID, false, "the destination has no waypoint"},
		{"a waypoint the state does not know is not believed",
			echoWaypoint(gatewayHost("a/missing.a.svc.cluster.local")), waypointID, false, "unknown waypoint: service a/missing.a.svc.cluster.local"},
		{"a waypoint address no workload or service has is not believed",
			echoWaypoint(waypointAddr(unknownIP)), waypointID, false, "waypoint 10.1.0.9 is not a known workload or service"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newWaypointMesh(t, tt.bind)
			c, err := m.connect(t, tt.id, fromClient)
			wantConnect(t, c, err, http.StatusOK)

			src := m.accessLog(t)["src"].(map[string]any)
			reasons := m.reasons(t, "hbone client address is the tcp peer")
			if !tt.wantTrusted {
				gotSrc, err := netip.ParseAddrPort(fmt.Sprint(src["addr"]))
				if err != nil || gotSrc.Addr() != sourceNode {
					t.Errorf("access log src.addr = %v, want the TCP peer %v", src["addr"], sourceNode)
				}
				if len(reasons) != 1 || !strings.Contains(reasons[0], tt.wantReason) {
					t.Errorf("debug reasons %q, want one with %q", reasons, tt.wantReason)
				}
				return
			}
			if len(reasons) > 0 {
				t.Errorf("the header was distrusted: %q", reasons)
			}
			if got := fmt.Sprint(src["addr"]); got != fromClient.String() {
				t.Errorf("access log src.addr = %v, want the client's %v", got, fromClient)
			}
			if got := fmt.Sprint(src["workload"]); got != "waypoint" {
				t.Errorf("access log src.workload = %v, want the waypoint's", got)
			}
			if got := fmt.Sprint(src["identity"]); got != waypointID.String() {
				t.Errorf("access log src.identity = %v, want the waypoint's %v", got, waypointID)
			}
			if srcs := m.dialSources(); len(srcs) != 1 || srcs[0] != clientIP {
				t.Errorf("the app was dialed asking for sources %v, want [%v]", srcs, clientIP)
			}
		})
	}
}

func TestSourceIPPoliciesSeeTheClientOfTheDestinationsWaypoint(t *testing.T) {
	tests := []struct {
		name       string
		bind       func(m *sourceMesh)
		policy     func(m *mesh)
		wantStatus int
	}{
		{"a DENY of the client's address denies it through the destination pod's waypoint",
			echoWaypoint(gatewayHost(waypointKey)), sourceIPPolicy("deny-client-ip", security.Action_DENY, clientIP, false), http.StatusUnauthorized},
		{"a DENY of the client's address denies it through the destination service's waypoint",
			echoServiceWaypoint(gatewayHost(waypointKey)), sourceIPPolicy("deny-client-ip", security.Action_DENY, clientIP, false), http.StatusUnauthorized},
		{"an ALLOW of the client's address allows it through the waypoint",
			echoWaypoint(gatewayHost(waypointKey)), sourceIPPolicy("allow-client-ip", security.Action_ALLOW, clientIP, false), http.StatusOK},
		{"an ALLOW of the client's address does not allow a waypoint the destination is not bound to claiming it",
			nil, sourceIPPolicy("allow-client-ip", security.Action_ALLOW, clientIP, false), http.StatusUnauthorized},
		{"principals still see the waypoint",
			echoWaypoint(gatewayHost(waypointKey)), deny("a", "deny-waypoint", "cluster.local/ns/a/sa/waypoint"), http.StatusUnauthorized},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := newWaypointMesh(t, tt.bind)
			tt.policy(m.mesh)
			c, err := m.connect(t, waypointID, netip.AddrPortFrom(clientIP, 40000))
			wantConnect(t, c, err, tt.wantStatus)
		})
	}
}
