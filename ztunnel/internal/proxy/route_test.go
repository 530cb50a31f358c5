package proxy

import (
	"errors"
	"net/netip"
	"testing"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

func TestResolveChoosesTheNextHop(t *testing.T) {
	e := newEnv(t, nil)
	const (
		echo     = "a/echo.a.svc.cluster.local"
		legacy   = "a/legacy.a.svc.cluster.local"
		bound    = "a/bound.a.svc.cluster.local"
		waypoint = "a/waypoint.a.svc.cluster.local"
		empty    = "a/empty.a.svc.cluster.local"
		headless = "a/headless.a.svc.cluster.local"
	)
	e.apply(workloadapi.AddressTypeURL,
		workload("a", "client", "client", "10.0.0.1"),
		workload("a", "echo", "echo", "10.0.1.1", inService(echo, 80, 8080)),
		workload("a", "legacy", "legacy", "10.0.2.1", plaintext, inService(legacy, 80, 9090)),
		workload("a", "wp", "waypoint", "10.0.3.1", inService(waypoint, 15008, 15008)),
		workload("a", "behind", "behind", "10.0.4.1", waypointHost(waypoint), inService(bound, 80, 8080)),
		service("a", "echo.a.svc.cluster.local", "10.96.0.1", 80, 8080),
		service("a", "legacy.a.svc.cluster.local", "10.96.0.2", 80, 9090),
		service("a", "bound.a.svc.cluster.local", "10.96.0.3", 80, 8080,
			func(s *workloadapi.Service) { s.Waypoint = gatewayHost(waypoint) }),
		service("a", "waypoint.a.svc.cluster.local", "10.96.0.4", 15008, 15008),
		service("a", "empty.a.svc.cluster.local", "10.96.0.5", 80, 8080),
		service("a", "headless.a.svc.cluster.local", "10.96.0.6", 80, 80, func(s *workloadapi.Service) {
			s.LoadBalancing = &workloadapi.LoadBalancing{Mode: workloadapi.LoadBalancing_PASSTHROUGH}
		}),
	)
	ap := netip.MustParseAddrPort

	tests := []struct {
		name    string
		src     string // pod name, "" for an unknown source
		dst     string
		want    hop
		wantErr error
	}{
		{"a service VIP goes over HBONE to an endpoint's HBONE port, asking for its target port", "client", "10.96.0.1:80",
			hop{kind: routeHBONE, dial: ap("10.0.1.1:15008"), authority: ap("10.0.1.1:8080"), identity: "spiffe://cluster.local/ns/a/sa/echo", service: echo}, nil},
		{"a pod IP goes over HBONE to that pod", "client", "10.0.1.1:8080",
			hop{kind: routeHBONE, dial: ap("10.0.1.1:15008"), authority: ap("10.0.1.1:8080"), identity: "spiffe://cluster.local/ns/a/sa/echo"}, nil},
		{"an unknown source still reaches a service", "", "10.96.0.1:80",
			hop{kind: routeHBONE, dial: ap("10.0.1.1:15008"), authority: ap("10.0.1.1:8080"), identity: "spiffe://cluster.local/ns/a/sa/echo", service: echo}, nil},
		{"a service of pods outside the mesh is reached in plain TCP on the target port", "client", "10.96.0.2:80",
			hop{kind: routeDirect, dial: ap("10.0.2.1:9090"), service: legacy}, nil},
		{"a pod outside the mesh is reached in plain TCP", "client", "10.0.2.1:9090",
			hop{kind: routeDirect, dial: ap("10.0.2.1:9090")}, nil},
		{"a service bound to a waypoint goes to the waypoint, asking for the VIP", "client", "10.96.0.3:80",
			hop{kind: routeHBONE, dial: ap("10.0.3.1:15008"), authority: ap("10.96.0.3:80"), identity: "spiffe://cluster.local/ns/a/sa/waypoint", service: bound, waypoint: true}, nil},
		{"a pod bound to a waypoint is reached through it", "client", "10.0.4.1:8080",
			hop{kind: routeHBONE, dial: ap("10.0.3.1:15008"), authority: ap("10.0.4.1:8080"), identity: "spiffe://cluster.local/ns/a/sa/waypoint", waypoint: true}, nil},
		{"the waypoint's own traffic to a bound service goes to an endpoint", "wp", "10.96.0.3:80",
			hop{kind: routeHBONE, dial: ap("10.0.4.1:15008"), authority: ap("10.0.4.1:8080"), identity: "spiffe://cluster.local/ns/a/sa/behind", service: bound}, nil},
		{"an unknown address passes through", "client", "192.0.2.1:443",
			hop{kind: routePassthrough, dial: ap("192.0.2.1:443")}, nil},
		{"a VIP on a port the service does not serve passes through", "client", "10.96.0.1:81",
			hop{kind: routePassthrough, dial: ap("10.96.0.1:81")}, nil},
		{"a passthrough service goes to the original destination", "client", "10.96.0.6:80",
			hop{kind: routePassthrough, dial: ap("10.96.0.6:80"), service: headless}, nil},
		{"a service without endpoints is refused", "client", "10.96.0.5:80",
			hop{service: empty}, errNoRoute},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var src *state.Workload
			if tt.src != "" {
				src = e.store.Workload(podUID("a", tt.src))
			}
			r, err := resolve(e.store, src, ap(tt.dst))
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("resolve(%s) error = %v, want %v", tt.dst, err, tt.wantErr)
			}
			if got := hopOf(r); got != tt.want {
				t.Errorf("resolve(%s) =\n %+v, want\n %+v", tt.dst, got, tt.want)
			}
		})
	}
}

// hop is the comparable part of a route.
type hop struct {
	kind            routeKind
	dial, authority netip.AddrPort
	identity        string
	service         string
	waypoint        bool
}

func hopOf(r route) hop {
	h := hop{kind: r.kind, dial: r.dial, authority: r.authority, identity: r.identity, waypoint: r.waypoint}
	if r.service != nil {
		h.service = r.service.Key
	}
	return h
}
