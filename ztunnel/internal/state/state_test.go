package state

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/netip"
	"strings"
	"sync"
	"testing"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambient-mesh/ambient/ztunnel/internal/policy"
)

// resource stands in for envoy's discovery.v3.Resource.
type resource struct {
	name string
	any  *anypb.Any
}

func (r *resource) GetName() string         { return r.name }
func (r *resource) GetResource() *anypb.Any { return r.any }

func ip(s string) []byte { return netip.MustParseAddr(s).AsSlice() }

type wopt func(*workloadapi.Workload)

func inService(key string, ports ...uint32) wopt {
	return func(w *workloadapi.Workload) {
		if w.Services == nil {
			w.Services = map[string]*workloadapi.PortList{}
		}
		pl := &workloadapi.PortList{}
		for i := 0; i+1 < len(ports); i += 2 {
			pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: ports[i], TargetPort: ports[i+1]})
		}
		w.Services[key] = pl
	}
}
func onNode(node, region, zone string) wopt {
	return func(w *workloadapi.Workload) {
		w.Node, w.Locality = node, &workloadapi.Locality{Region: region, Zone: zone}
	}
}
func unhealthy(w *workloadapi.Workload) { w.Status = workloadapi.WorkloadStatus_UNHEALTHY }
func capacity(c uint32) wopt {
	return func(w *workloadapi.Workload) { w.Capacity = wrapperspb.UInt32(c) }
}

func workload(uid, ns, addr string, opts ...wopt) *workloadapi.Workload {
	w := &workloadapi.Workload{Uid: uid, Name: uid, Namespace: ns, ServiceAccount: "sa-" + uid, TunnelProtocol: workloadapi.TunnelProtocol_HBONE}
	if addr != "" {
		w.Addresses = [][]byte{ip(addr)}
	}
	for _, o := range opts {
		o(w)
	}
	return w
}

func service(ns, host, vip string, ports ...uint32) *workloadapi.Service {
	s := &workloadapi.Service{Name: strings.Split(host, ".")[0], Namespace: ns, Hostname: host}
	if vip != "" {
		s.Addresses = []*workloadapi.NetworkAddress{{Address: ip(vip)}}
	}
	for i := 0; i+1 < len(ports); i += 2 {
		s.Ports = append(s.Ports, &workloadapi.Port{ServicePort: ports[i], TargetPort: ports[i+1]})
	}
	return s
}

func wu(w *workloadapi.Workload) Update {
	return Update{Name: w.GetUid(), Resource: &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}}
}
func su(s *workloadapi.Service) Update {
	return Update{Name: s.GetNamespace() + "/" + s.GetHostname(), Resource: &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}}}
}
func pu(p *security.Authorization) Update {
	return Update{Name: p.GetNamespace() + "/" + p.GetName(), Resource: p}
}

func mustApply(t *testing.T, s *Store, typeURL string, ups ...Update) {
	t.Helper()
	if err := s.Apply(typeURL, ups, nil); err != nil {
		t.Fatalf("Apply: %v", err)
	}
}

func TestApplyDecodesWhatTheXDSClientHandsOver(t *testing.T) {
	any1, err := anypb.New(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: workload("w1", "default", "10.0.0.1")}})
	if err != nil {
		t.Fatal(err)
	}
	any2, err := anypb.New(&workloadapi.Address{Type: &workloadapi.Address_Service{Service: service("default", "echo.default.svc.cluster.local", "10.96.0.10", 80, 8080)}})
	if err != nil {
		t.Fatal(err)
	}
	s := New()
	rs := []*resource{{"w1", any1}, {"default/echo.default.svc.cluster.local", any2}}
	if err := s.Apply(workloadapi.AddressTypeURL, Updates(rs), nil); err != nil {
		t.Fatalf("Apply: %v", err)
	}
	w := s.WorkloadByIP("", netip.MustParseAddr("10.0.0.1"))
	if w == nil || w.UID() != "w1" || w.Identity != "spiffe://cluster.local/ns/default/sa/sa-w1" {
		t.Errorf("WorkloadByIP = %+v", w)
	}
	if svc := s.ServiceByVIPPort("", netip.MustParseAddr("10.96.0.10"), 80); svc == nil || svc.Key != "default/echo.default.svc.cluster.local" {
		t.Errorf("ServiceByVIPPort = %+v", svc)
	}
}

func TestApplyRejectsAnInvalidUpdateAndKeepsTheStore(t *testing.T) {
	good := wu(workload("w1", "default", "10.0.0.1"))
	wrongType, _ := anypb.New(&security.Authorization{Name: "p", Namespace: "default"})
	tests := []struct {
		name    string
		typeURL string
		update  Update
	}{
		{"a workload with a 5-byte address is rejected", workloadapi.AddressTypeURL,
			Update{Name: "w2", Resource: &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{Uid: "w2", Namespace: "default", Addresses: [][]byte{{1, 2, 3, 4, 5}}}}}}},
		{"a workload named other than its uid is rejected", workloadapi.AddressTypeURL, Update{Name: "other", Resource: wu(workload("w2", "default", "10.0.0.2")).Resource}},
		{"a workload without uid is rejected", workloadapi.AddressTypeURL, wu(workload("", "default", "10.0.0.2"))},
		{"an empty address is rejected", workloadapi.AddressTypeURL, Update{Name: "x", Resource: &workloadapi.Address{}}},
		{"a service without hostname is rejected", workloadapi.AddressTypeURL, su(service("default", "", "10.96.0.1"))},
		{"a service port above 65535 is rejected", workloadapi.AddressTypeURL, su(service("default", "a.default", "10.96.0.1", 70000, 80))},
		{"a waypoint without a destination is rejected", workloadapi.AddressTypeURL,
			wu(workload("w2", "default", "10.0.0.2", func(w *workloadapi.Workload) { w.Waypoint = &workloadapi.GatewayAddress{} }))},
		{"an Any of the wrong type is rejected", workloadapi.AddressTypeURL, Update{Name: "x", Resource: wrongType}},
		{"an undecodable Any is rejected", workloadapi.AddressTypeURL,
			Update{Name: "x", Resource: &anypb.Any{TypeUrl: workloadapi.AddressTypeURL, Value: []byte{0xff}}}},
		{"a missing resource is rejected", workloadapi.AddressTypeURL, Update{Name: "x"}},
		{"a policy with a bad CIDR is rejected", security.AuthorizationTypeURL, pu(&security.Authorization{Name: "p", Namespace: "default",
			Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{SourceIps: []*security.Address{{Address: []byte{1}}}}}}}}}})},
		{"a policy named other than namespace/name is rejected", security.AuthorizationTypeURL,
			Update{Name: "default/q", Resource: &security.Authorization{Name: "p", Namespace: "default"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New()
			mustApply(t, s, workloadapi.AddressTypeURL, good)
			before, _ := json.Marshal(s.Snapshot())
			err := s.Apply(tt.typeURL, []Update{wu(workload("w3", "default", "10.0.0.3")), tt.update}, []string{"w1"})
			if !errors.Is(err, ErrInvalidResource) {
				t.Fatalf("Apply = %v, want ErrInvalidResource", err)
			}
			after, _ := json.Marshal(s.Snapshot())
			if string(before) != string(after) {
				t.Errorf("store changed by a rejected update:\n%s\n%s", before, after)
			}
		})
	}
}

func TestApplyRejectsAnUnknownType(t *testing.T) {
	if err := New().Apply("type.googleapis.com/other", nil, nil); !errors.Is(err, ErrUnknownType) {
		t.Errorf("Apply = %v, want ErrUnknownType", err)
	}
}

func TestApplyReplacesAndRemovesWithTheirIndexes(t *testing.T) {
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL,
		wu(workload("w1", "default", "10.0.0.1", inService("default/echo"))),
		su(service("default", "echo", "10.96.0.10", 80, 8080)))

	// The workload moves to a new address and leaves the service.
	mustApply(t, s, workloadapi.AddressTypeURL, wu(workload("w1", "default", "10.0.0.9")))
	if w := s.WorkloadByIP("", netip.MustParseAddr("10.0.0.1")); w != nil {
		t.Errorf("old address still resolves to %s", w.UID())
	}
	if w := s.WorkloadByIP("", netip.MustParseAddr("10.0.0.9")); w == nil {
		t.Error("new address does not resolve")
	}
	if eps := s.Endpoints(s.Service("default/echo"), 80); len(eps) != 0 {
		t.Errorf("Endpoints = %v, want none", eps)
	}

	if err := s.Apply(workloadapi.AddressTypeURL, nil, []string{"w1", "default/echo", "never-existed"}); err != nil {
		t.Fatal(err)
	}
	if s.Workload("w1") != nil || s.Service("default/echo") != nil || s.ServiceByVIPPort("", netip.MustParseAddr("10.96.0.10"), 80) != nil {
		t.Error("removed resources still present")
	}
	if d := s.Snapshot(); len(d.Workloads)+len(d.Services) != 0 {
		t.Errorf("Snapshot after removal = %+v", d)
	}
}

func TestWorkloadByIP(t *testing.T) {
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL,
		wu(workload("old", "default", "10.0.0.5", unhealthy)),
		wu(workload("new", "default", "10.0.0.5")),
		wu(workload("v6", "default", "fd00::5")),
		wu(workload("hostnet", "kube-system", "192.168.1.10", func(w *workloadapi.Workload) { w.NetworkMode = workloadapi.NetworkMode_HOST_NETWORK })),
		wu(workload("remote", "default", "10.0.0.6", func(w *workloadapi.Workload) { w.Network = "net2" })),
	)
	tests := []struct {
		name    string
		network string
		addr    string
		want    string
	}{
		{"a reused IP resolves to the healthy workload", "", "10.0.0.5", "new"},
		{"an IPv4-mapped address resolves like IPv4", "", "::ffff:10.0.0.5", "new"},
		{"an IPv6 address resolves", "", "fd00::5", "v6"},
		{"a host-network address resolves to nothing", "", "192.168.1.10", ""},
		{"an address on another network does not resolve on the default one", "", "10.0.0.6", ""},
		{"an address resolves on its own network", "net2", "10.0.0.6", "remote"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := ""
			if w := s.WorkloadByIP(tt.network, netip.MustParseAddr(tt.addr)); w != nil {
				got = w.UID()
			}
			if got != tt.want {
				t.Errorf("WorkloadByIP = %q, want %q", got, tt.want)
			}
		})
	}
	mustApply(t, s, workloadapi.AddressTypeURL)
	if err := s.Apply(workloadapi.AddressTypeURL, nil, []string{"new"}); err != nil {
		t.Fatal(err)
	}
	if w := s.WorkloadByIP("", netip.MustParseAddr("10.0.0.5")); w == nil || w.UID() != "old" {
		t.Errorf("after removing the new pod, WorkloadByIP = %v, want old", w)
	}
}

func TestEndpoints(t *testing.T) {
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL,
		su(service("default", "echo", "10.96.0.10", 80, 8080, 81, 0)),
		su(func() *workloadapi.Service {
			svc := service("default", "all", "10.96.0.11", 80, 8080)
			svc.LoadBalancing = &workloadapi.LoadBalancing{HealthPolicy: workloadapi.LoadBalancing_ALLOW_ALL}
			return svc
		}()),
		wu(workload("a", "default", "10.0.0.1", inService("default/echo"), inService("default/all"))),
		wu(workload("b", "default", "10.0.0.2", inService("default/echo", 80, 9090))),
		wu(workload("c", "default", "10.0.0.3", inService("default/echo"), inService("default/all"), unhealthy)),
	)
	str := func(eps []Endpoint) string {
		var b []string
		for _, ep := range eps {
			b = append(b, fmt.Sprintf("%s:%d", ep.Workload.UID(), ep.TargetPort))
		}
		return strings.Join(b, ",")
	}
	tests := []struct {
		name string
		svc  string
		port uint16
		want string
	}{
		{"healthy endpoints with the workload's own target port first", "default/echo", 80, "a:8080,b:9090"},
		{"a service port without target port targets the same port", "default/echo", 81, "a:81,b:81"},
		{"a port the service does not serve has no endpoints", "default/echo", 82, ""},
		{"ALLOW_ALL includes unhealthy endpoints", "default/all", 80, "a:8080,c:8080"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := str(s.Endpoints(s.Service(tt.svc), tt.port)); got != tt.want {
				t.Errorf("Endpoints = %q, want %q", got, tt.want)
			}
		})
	}
	var uids []string
	for _, w := range s.ServiceWorkloads(s.Service("default/echo")) {
		uids = append(uids, w.UID())
	}
	if got := strings.Join(uids, ","); got != "a,b,c" {
		t.Errorf("ServiceWorkloads = %q, want every selected workload, unhealthy too: a,b,c", got)
	}
	if s.ServiceByVIPPort("", netip.MustParseAddr("10.96.0.10"), 82) != nil {
		t.Error("ServiceByVIPPort matched a port the service does not serve")
	}
}

func TestPickEndpointPrefersLocality(t *testing.T) {
	lbService := func(host string, mode workloadapi.LoadBalancing_Mode, prefs ...workloadapi.LoadBalancing_Scope) *workloadapi.Service {
		svc := service("default", host, "", 80, 8080)
		svc.LoadBalancing = &workloadapi.LoadBalancing{Mode: mode, RoutingPreference: prefs}
		return svc
	}
	const (
		region = workloadapi.LoadBalancing_REGION
		zone   = workloadapi.LoadBalancing_ZONE
		node   = workloadapi.LoadBalancing_NODE
	)
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL,
		su(lbService("failover", workloadapi.LoadBalancing_FAILOVER, region, zone, node)),
		su(lbService("unspecified", workloadapi.LoadBalancing_UNSPECIFIED_MODE, region, zone, node)),
		su(lbService("strict-node", workloadapi.LoadBalancing_STRICT, node)),
		su(lbService("passthrough", workloadapi.LoadBalancing_PASSTHROUGH)),
		wu(workload("client", "default", "10.0.0.100", onNode("n1", "eu", "eu-a"))),
		wu(workload("client-alone", "default", "10.0.0.101", onNode("n9", "us", "us-a"))),
		wu(workload("same-node", "default", "10.0.0.1", onNode("n1", "eu", "eu-a"),
			inService("default/failover"), inService("default/unspecified"), inService("default/strict-node"))),
		wu(workload("same-zone", "default", "10.0.0.2", onNode("n2", "eu", "eu-a"),
			inService("default/failover"), inService("default/unspecified"), inService("default/strict-node"))),
		wu(workload("same-region", "default", "10.0.0.3", onNode("n3", "eu", "eu-b"), inService("default/failover"))),
		wu(workload("elsewhere", "default", "10.0.0.4", onNode("n4", "ap", "ap-a"), inService("default/failover"))),
		wu(workload("same-region-us", "default", "10.0.0.5", onNode("n5", "us", "us-b"), inService("default/failover"))),
	)
	tests := []struct {
		name    string
		src     string
		svc     string
		want    []string // any of
		wantErr error
	}{
		{"FAILOVER picks the endpoint on the same node", "client", "default/failover", []string{"same-node"}, nil},
		{"an unspecified mode with preferences fails over", "client", "default/unspecified", []string{"same-node"}, nil},
		{"FAILOVER falls back to the same region", "client-alone", "default/failover", []string{"same-region-us"}, nil},
		{"FAILOVER from an unknown source picks among all", "", "default/failover",
			[]string{"same-node", "same-zone", "same-region", "elsewhere", "same-region-us"}, nil},
		{"STRICT picks only the same node", "client", "default/strict-node", []string{"same-node"}, nil},
		{"STRICT without a local endpoint has none", "client-alone", "default/strict-node", nil, ErrNoEndpoint},
		{"PASSTHROUGH skips selection", "client", "default/passthrough", nil, ErrPassthrough},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := s.Workload(tt.src)
			for range 20 {
				ep, err := s.PickEndpoint(src, s.Service(tt.svc), 80)
				if !errors.Is(err, tt.wantErr) {
					t.Fatalf("PickEndpoint error = %v, want %v", err, tt.wantErr)
				}
				if err != nil {
					return
				}
				if !strings.Contains(" "+strings.Join(tt.want, " ")+" ", " "+ep.Workload.UID()+" ") || ep.TargetPort != 8080 {
					t.Fatalf("PickEndpoint = %s:%d, want one of %v on 8080", ep.Workload.UID(), ep.TargetPort, tt.want)
				}
			}
		})
	}
}

func TestPickWeightedFollowsCapacity(t *testing.T) {
	mk := func(uid string, opts ...wopt) Endpoint {
		w, err := newWorkload(workload(uid, "default", "10.0.0.1", opts...))
		if err != nil {
			t.Fatal(err)
		}
		return Endpoint{Workload: w}
	}
	eps := []Endpoint{mk("one"), mk("drained", capacity(0)), mk("three", capacity(3))}
	counts := map[string]int{}
	for r := range uint64(4) {
		ep, ok := pickWeighted(eps, func(n uint64) uint64 {
			if n != 4 {
				t.Fatalf("total weight %d, want 4", n)
			}
			return r
		})
		if !ok {
			t.Fatal("nothing picked")
		}
		counts[ep.Workload.UID()]++
	}
	if counts["one"] != 1 || counts["three"] != 3 || counts["drained"] != 0 {
		t.Errorf("picks over the whole range = %v", counts)
	}
	if _, ok := pickWeighted([]Endpoint{mk("drained", capacity(0))}, randN); ok {
		t.Error("picked a drained endpoint")
	}
}

func TestEndpointAddrPortMatchesTheDialedFamily(t *testing.T) {
	w, err := newWorkload(&workloadapi.Workload{Uid: "d", Namespace: "n", Addresses: [][]byte{ip("10.0.0.1"), ip("fd00::1")}})
	if err != nil {
		t.Fatal(err)
	}
	ep := Endpoint{Workload: w, TargetPort: 8080}
	if ap, _ := ep.AddrPort(netip.MustParseAddr("fd00:96::1")); ap.String() != "[fd00::1]:8080" {
		t.Errorf("AddrPort(v6) = %s", ap)
	}
	if ap, _ := ep.AddrPort(netip.MustParseAddr("10.96.0.1")); ap.String() != "10.0.0.1:8080" {
		t.Errorf("AddrPort(v4) = %s", ap)
	}
}

func TestWaypoints(t *testing.T) {
	byHost := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: "wp.default.svc.cluster.local"}}}
	byAddr := func(a string) *workloadapi.GatewayAddress {
		return &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip(a)}}, HboneMtlsPort: 15009}
	}
	missing := &workloadapi.GatewayAddress{Destination: &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "default", Hostname: "gone"}}}
	withWaypoint := func(g *workloadapi.GatewayAddress) wopt { return func(w *workloadapi.Workload) { w.Waypoint = g } }

	s := New()
	svc := service("default", "echo", "10.96.0.10", 80, 8080)
	svc.Waypoint = byAddr("10.96.0.99")
	mustApply(t, s, workloadapi.AddressTypeURL,
		su(service("default", "wp.default.svc.cluster.local", "10.96.0.99", 15008, 15008)),
		su(svc),
		wu(workload("wp-pod", "default", "10.0.0.99")),
		wu(workload("by-host", "default", "10.0.0.1", withWaypoint(byHost))),
		wu(workload("by-pod", "default", "10.0.0.2", withWaypoint(byAddr("10.0.0.99")))),
		wu(workload("missing", "default", "10.0.0.3", withWaypoint(missing))),
		wu(workload("none", "default", "10.0.0.4")),
	)
	t.Run("a waypoint named by hostname is its service on 15008", func(t *testing.T) {
		wp, ok, err := s.WorkloadWaypoint(s.Workload("by-host"))
		if err != nil || !ok || wp.Service.Key != "default/wp.default.svc.cluster.local" || wp.Port != 15008 {
			t.Errorf("= %+v %v %v", wp, ok, err)
		}
	})
	t.Run("a waypoint named by a pod address is that workload", func(t *testing.T) {
		wp, ok, err := s.WorkloadWaypoint(s.Workload("by-pod"))
		if err != nil || !ok || wp.Workload.UID() != "wp-pod" || wp.Port != 15009 || wp.Address.String() != "10.0.0.99" {
			t.Errorf("= %+v %v %v", wp, ok, err)
		}
	})
	t.Run("a service's waypoint named by VIP is that service", func(t *testing.T) {
		wp, ok, err := s.ServiceWaypoint(s.Service("default/echo"))
		if err != nil || !ok || wp.Service == nil || wp.Service.Info.GetHostname() != "wp.default.svc.cluster.local" {
			t.Errorf("= %+v %v %v", wp, ok, err)
		}
	})
	t.Run("an unknown waypoint is an error, never a bypass", func(t *testing.T) {
		if _, ok, err := s.WorkloadWaypoint(s.Workload("missing")); !ok || !errors.Is(err, ErrUnknownWaypoint) {
			t.Errorf("= %v %v", ok, err)
		}
	})
	t.Run("a workload without waypoint has none", func(t *testing.T) {
		if _, ok, err := s.WorkloadWaypoint(s.Workload("none")); ok || err != nil {
			t.Errorf("= %v %v", ok, err)
		}
	})
}

func TestPoliciesByScope(t *testing.T) {
	p := func(ns, name string, scope security.Scope) *security.Authorization {
		return &security.Authorization{Namespace: ns, Name: name, Scope: scope}
	}
	s := New()
	mustApply(t, s, security.AuthorizationTypeURL,
		pu(p("istio-system", "mesh", security.Scope_GLOBAL)),
		pu(p("default", "ns-wide", security.Scope_NAMESPACE)),
		pu(p("other", "ns-wide", security.Scope_NAMESPACE)),
		pu(p("default", "selected", security.Scope_WORKLOAD_SELECTOR)),
		pu(p("default", "not-selected", security.Scope_WORKLOAD_SELECTOR)),
	)
	mustApply(t, s, workloadapi.AddressTypeURL,
		wu(workload("w", "default", "10.0.0.1", func(w *workloadapi.Workload) {
			w.AuthorizationPolicies = []string{"default/selected", "default/ns-wide", "default/unknown-yet"}
		})))
	names := func() string {
		enforced, dryRun := s.Policies(s.Workload("w"))
		if dryRun != nil {
			t.Errorf("dry-run policies %v without any marked dry_run", dryRun)
		}
		return policyNames(enforced)
	}
	if got, want := names(), "default/ns-wide default/selected istio-system/mesh"; got != want {
		t.Errorf("Policies = %q, want %q", got, want)
	}
	// A policy changing scope moves between indexes; a removed one is gone.
	mustApply(t, s, security.AuthorizationTypeURL, pu(p("istio-system", "mesh", security.Scope_WORKLOAD_SELECTOR)))
	if err := s.Apply(security.AuthorizationTypeURL, nil, []string{"default/selected"}); err != nil {
		t.Fatal(err)
	}
	if got, want := names(), "default/ns-wide"; got != want {
		t.Errorf("Policies after update = %q, want %q", got, want)
	}
}

func policyNames(ps []*security.Authorization) string {
	var out []string
	for _, p := range ps {
		out = append(out, policy.Name(p))
	}
	return strings.Join(out, " ")
}

func TestDryRunPoliciesAreKeptApartFromEnforcedOnes(t *testing.T) {
	p := func(ns, name string, scope security.Scope, action security.Action, dryRun bool) *security.Authorization {
		return &security.Authorization{Namespace: ns, Name: name, Scope: scope, Action: action, DryRun: dryRun,
			Rules: []*security.Rule{{}}} // matches everything
	}
	s := New()
	mustApply(t, s, security.AuthorizationTypeURL,
		pu(p("istio-system", "mesh-trial", security.Scope_GLOBAL, security.Action_DENY, true)),
		pu(p("default", "ns-trial", security.Scope_NAMESPACE, security.Action_ALLOW, true)),
		pu(p("default", "selected-trial", security.Scope_WORKLOAD_SELECTOR, security.Action_DENY, true)),
		pu(p("default", "selected", security.Scope_WORKLOAD_SELECTOR, security.Action_DENY, false)),
	)
	mustApply(t, s, workloadapi.AddressTypeURL,
		wu(workload("w", "default", "10.0.0.1", func(w *workloadapi.Workload) {
			w.AuthorizationPolicies = []string{"default/selected-trial"}
		})))
	conn := policy.Conn{SrcIdentity: "spiffe://cluster.local/ns/default/sa/client", SrcIP: netip.MustParseAddr("10.0.0.2"),
		DstIP: netip.MustParseAddr("10.0.0.1"), DstPort: 80}

	t.Run("each set holds its own policies of every scope", func(t *testing.T) {
		enforced, dryRun := s.Policies(s.Workload("w"))
		if got, want := policyNames(enforced), ""; got != want {
			t.Errorf("enforced = %q, want %q", got, want)
		}
		if got, want := policyNames(dryRun), "default/ns-trial default/selected-trial istio-system/mesh-trial"; got != want {
			t.Errorf("dry-run = %q, want %q", got, want)
		}
	})
	t.Run("a dry-run DENY does not deny and a dry-run ALLOW does not turn on default deny", func(t *testing.T) {
		enforced, dryRun := s.Policies(s.Workload("w"))
		if d := policy.Evaluate(enforced, conn); !d.Allow {
			t.Errorf("enforced decision %+v, want allowed", d)
		}
		if d := policy.EvaluateDryRun(enforced, dryRun, conn); d.Allow || !d.DryRun || d.Policy != "default/selected-trial" {
			t.Errorf("dry-run decision %+v, want denied by default/selected-trial", d)
		}
	})
	t.Run("a policy leaving dry-run moves to the enforced set", func(t *testing.T) {
		mustApply(t, s, security.AuthorizationTypeURL, pu(p("default", "ns-trial", security.Scope_NAMESPACE, security.Action_ALLOW, false)))
		enforced, dryRun := s.Policies(s.Workload("w"))
		if got, want := policyNames(enforced), "default/ns-trial"; got != want {
			t.Errorf("enforced = %q, want %q", got, want)
		}
		if got, want := policyNames(dryRun), "default/selected-trial istio-system/mesh-trial"; got != want {
			t.Errorf("dry-run = %q, want %q", got, want)
		}
	})
	t.Run("the dump marks dry-run policies", func(t *testing.T) {
		b, err := json.Marshal(s.Snapshot())
		if err != nil {
			t.Fatal(err)
		}
		if n := strings.Count(string(b), `"dryRun":true`); n != 2 {
			t.Errorf("%d policies marked dryRun in the dump, want 2:\n%s", n, b)
		}
	})
}

// Without dry-run policies the lookup allocates no more than it did before
// dry-run existed: the names it collects and the enforced list.
func TestPoliciesWithoutDryRunAllocateNothingForIt(t *testing.T) {
	s := New()
	mustApply(t, s, security.AuthorizationTypeURL,
		pu(&security.Authorization{Namespace: "istio-system", Name: "mesh", Scope: security.Scope_GLOBAL}),
		pu(&security.Authorization{Namespace: "default", Name: "ns", Scope: security.Scope_NAMESPACE}))
	mustApply(t, s, workloadapi.AddressTypeURL, wu(workload("w", "default", "10.0.0.1")))
	w := s.Workload("w")
	if _, dryRun := s.Policies(w); dryRun != nil {
		t.Fatalf("dry-run = %v, want nil", dryRun)
	}
	if n := testing.AllocsPerRun(100, func() { _, _ = s.Policies(w) }); n > 2 {
		t.Errorf("Policies allocates %v times, want at most 2", n)
	}
}

func BenchmarkPolicies(b *testing.B) {
	s := New()
	var ups []Update
	for i := range 10 {
		ups = append(ups, pu(&security.Authorization{Namespace: "default", Name: fmt.Sprintf("p%d", i), Scope: security.Scope_NAMESPACE}))
	}
	if err := s.Apply(security.AuthorizationTypeURL, ups, nil); err != nil {
		b.Fatal(err)
	}
	if err := s.Apply(workloadapi.AddressTypeURL, []Update{wu(workload("w", "default", "10.0.0.1"))}, nil); err != nil {
		b.Fatal(err)
	}
	w := s.Workload("w")
	b.ReportAllocs()
	for b.Loop() {
		_, _ = s.Policies(w)
	}
}

func TestSnapshotIsJSON(t *testing.T) {
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL,
		su(service("default", "echo", "fd00:96::10", 80, 8080)),
		wu(workload("w", "default", "10.0.0.1", inService("default/echo", 80, 9090), onNode("n1", "eu", "eu-a"))))
	mustApply(t, s, security.AuthorizationTypeURL, pu(&security.Authorization{Namespace: "default", Name: "p", Action: security.Action_DENY,
		Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{
			SourceIps: []*security.Address{{Address: ip("10.1.2.0"), Length: 24}},
		}}}}}}}))
	b, err := json.Marshal(s.Snapshot())
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"uid":"w"`, `"addresses":["10.0.0.1"]`, `"default/echo":["80-\u003e9090"]`,
		`"vips":["/fd00:96::10"]`, `"endpoints":["w"]`, `"sourceIps":["10.1.2.0/24"]`, `"action":"DENY"`,
		`"identity":"spiffe://cluster.local/ns/default/sa/sa-w"`} {
		if !strings.Contains(string(b), want) {
			t.Errorf("snapshot lacks %s:\n%s", want, b)
		}
	}
}

func TestStoreIsSafeForConcurrentUse(t *testing.T) {
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL, su(service("default", "echo", "10.96.0.10", 80, 8080)))
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range 200 {
			w := workload(fmt.Sprintf("w%d", i%10), "default", fmt.Sprintf("10.0.0.%d", i%10+1), inService("default/echo"))
			if err := s.Apply(workloadapi.AddressTypeURL, []Update{wu(w)}, []string{fmt.Sprintf("w%d", (i+5)%10)}); err != nil {
				t.Error(err)
				return
			}
		}
	})
	for range 4 {
		wg.Go(func() {
			for range 200 {
				svc := s.ServiceByVIPPort("", netip.MustParseAddr("10.96.0.10"), 80)
				_, _ = s.PickEndpoint(nil, svc, 80)
				_ = s.WorkloadByIP("", netip.MustParseAddr("10.0.0.3"))
				_ = s.Snapshot()
			}
		})
	}
	wg.Wait()
}

// proto.Message values returned by the store are the ones applied: the store
// must not copy or modify them.
func TestStoreKeepsMessagesUnmodified(t *testing.T) {
	w := workload("w", "default", "10.0.0.1")
	before := proto.Clone(w)
	s := New()
	mustApply(t, s, workloadapi.AddressTypeURL, wu(w))
	if got := s.Workload("w").Info; got != w || !proto.Equal(got, before) {
		t.Error("stored workload differs from the applied one")
	}
}

// FuzzApply feeds arbitrary bytes as an Address resource: Apply either
// accepts it or rejects it, never panics, and lookups keep working.
func FuzzApply(f *testing.F) {
	seed, err := proto.Marshal(&workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: workload("w", "default", "10.0.0.1", inService("default/echo", 80, 8080))}})
	if err != nil {
		f.Fatal(err)
	}
	f.Add("w", seed)
	f.Add("x", []byte{0x12, 0x00})
	f.Fuzz(func(t *testing.T, name string, b []byte) {
		s := New()
		mustApply(t, s, workloadapi.AddressTypeURL, su(service("default", "echo", "10.96.0.10", 80, 8080)))
		err := s.Apply(workloadapi.AddressTypeURL, []Update{{Name: name, Resource: &anypb.Any{TypeUrl: workloadapi.AddressTypeURL, Value: b}}}, nil)
		if err != nil && !errors.Is(err, ErrInvalidResource) {
			t.Fatalf("Apply = %v", err)
		}
		_, _ = s.PickEndpoint(s.Workload(name), s.Service("default/echo"), 80)
		if w := s.Workload(name); w != nil {
			_, _, _ = s.WorkloadWaypoint(w)
			_, _ = s.Policies(w)
		}
		_ = s.Snapshot()
	})
}
