package main

import (
	"encoding/json"
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/ztunnel/inpod"
	"github.com/ambient-mesh/ambient/ztunnel/internal/proxy"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// ztunnelDump is what ztunnel's /config_dump serves (proxy's unexported
// configDump), built from ztunnel's own types so that the tests serve the
// real field names.
type ztunnelDump struct {
	state.Dump
	Certificates []ztunnelCert          `json:"certificates"`
	Pods         []inpod.WorkloadStatus `json:"pods"`
	Connections  []proxy.ConnStats      `json:"connections"`
	ZDS          inpod.ZDSStatus        `json:"zds"`
	XDSSynced    bool                   `json:"xdsSynced"`
}

// ztunnelCert is proxy's unexported certDump (ztunnel/internal/proxy/admin.go),
// the one part of the dump the tests cannot take from ztunnel's types: keep
// the two in step.
type ztunnelCert struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	RotateAt  time.Time `json:"rotateAt"`
}

// testNow is the plugin's clock in the tests.
var testNow = time.Date(2026, 11, 21, 12, 0, 0, 0, time.UTC)

func podUID(ns, name string) string { return "Kubernetes//Pod/" + ns + "/" + name }

func meshWorkload(ns, name, node, addr string) *workloadapi.Workload {
	return &workloadapi.Workload{
		Uid: podUID(ns, name), Name: name, Namespace: ns, Node: node,
		Addresses:      [][]byte{netip.MustParseAddr(addr).AsSlice()},
		ServiceAccount: "default", TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
		WorkloadName: name, CanonicalName: name, CanonicalRevision: "latest",
		Services: map[string]*workloadapi.PortList{
			ns + "/echo." + ns + ".svc.cluster.local": {Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}},
		},
	}
}

func address(w *workloadapi.Workload) state.Update {
	return state.Update{Name: w.GetUid(), Resource: &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}}
}

func serviceAddress(s *workloadapi.Service) state.Update {
	return state.Update{Name: s.GetNamespace() + "/" + s.GetHostname(), Resource: &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}}}
}

// testState is the xDS state of the e2e fixture: client and near on node1,
// far on node2, an echo Service over near and far, a pod outside the mesh,
// a waypoint, a DENY policy in the mesh namespace and a global ALLOW.
func testState(t *testing.T) state.Dump {
	t.Helper()
	s := state.New()
	waypoint := &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: "demo", Hostname: "waypoint.demo.svc.cluster.local"}},
		HboneMtlsPort: 15008,
	}
	client := meshWorkload("demo", "client", "node1", "10.244.1.5")
	client.Services = nil
	client.Waypoint = waypoint
	outsider := &workloadapi.Workload{
		Uid: podUID("plain", "outsider"), Name: "outsider", Namespace: "plain", Node: "node2",
		Addresses: [][]byte{netip.MustParseAddr("10.244.2.9").AsSlice()},
	}
	wp := meshWorkload("demo", "waypoint-7d9f", "node2", "10.244.2.3")
	wp.ServiceAccount, wp.Services = "waypoint", nil
	if err := s.Apply(workloadapi.AddressTypeURL, []state.Update{
		address(meshWorkload("demo", "near", "node1", "10.244.1.7")),
		address(meshWorkload("demo", "far", "node2", "10.244.2.8")),
		address(client),
		address(outsider),
		address(wp),
		serviceAddress(&workloadapi.Service{
			Name: "echo", Namespace: "demo", Hostname: "echo.demo.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.20").AsSlice()}},
			Ports:     []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}},
			Waypoint:  waypoint,
		}),
		serviceAddress(&workloadapi.Service{
			Name: "waypoint", Namespace: "demo", Hostname: "waypoint.demo.svc.cluster.local",
			Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr("10.96.0.30").AsSlice()}},
			Ports:     []*workloadapi.Port{{ServicePort: 15008, TargetPort: 15008}, {ServicePort: 15021, TargetPort: 15021}},
		}),
	}, nil); err != nil {
		t.Fatalf("applying addresses: %v", err)
	}
	exact := func(s string) *security.StringMatch {
		return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
	}
	if err := s.Apply(security.AuthorizationTypeURL, []state.Update{
		{Name: "demo/deny-own-namespace", Resource: &security.Authorization{
			Name: "deny-own-namespace", Namespace: "demo", Scope: security.Scope_WORKLOAD_SELECTOR, Action: security.Action_DENY,
			Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{Namespaces: []*security.StringMatch{exact("demo")}}}}}}},
		}},
		{Name: "istio-system/allow-nothing", Resource: &security.Authorization{
			Name: "allow-nothing", Namespace: "istio-system", Scope: security.Scope_GLOBAL, Action: security.Action_ALLOW,
		}},
		{Name: "demo/audit-ports", Resource: &security.Authorization{
			Name: "audit-ports", Namespace: "demo", Scope: security.Scope_NAMESPACE, Action: security.Action_DENY, DryRun: true,
			Rules: []*security.Rule{
				{Clauses: []*security.Clause{{Matches: []*security.Match{{DestinationPorts: []uint32{9000}}}}}},
				{Clauses: []*security.Clause{{Matches: []*security.Match{{NotPrincipals: []*security.StringMatch{exact("spiffe://cluster.local/ns/demo/sa/default")}}}}}},
			},
		}},
	}, nil); err != nil {
		t.Fatalf("applying policies: %v", err)
	}
	return s.Snapshot()
}

func listeners(ip string, accepted ...uint64) []inpod.ListenerStatus {
	var out []inpod.ListenerStatus
	for i, port := range []int{15001, 15006, 15008} {
		out = append(out, inpod.ListenerStatus{Port: port, Address: ip + ":" + itoa(int64(port)), Accepted: accepted[i]})
	}
	return out
}

// node1Dump is node1's ztunnel: it serves client and near.
func node1Dump(t *testing.T) ztunnelDump {
	return ztunnelDump{
		Dump: testState(t),
		Certificates: []ztunnelCert{
			{Identity: "spiffe://cluster.local/ns/demo/sa/default", Serial: "5f2a9c01e4",
				NotBefore: testNow.Add(-6 * time.Hour), NotAfter: testNow.Add(18 * time.Hour), RotateAt: testNow.Add(6 * time.Hour)},
			{Identity: "spiffe://cluster.local/ns/demo/sa/old", Serial: "77",
				NotBefore: testNow.Add(-48 * time.Hour), NotAfter: testNow.Add(-24 * time.Hour), RotateAt: testNow.Add(-36 * time.Hour)},
			{Identity: "spiffe://cluster.local/ns/other/sa/late", Serial: "a1",
				NotBefore: testNow.Add(-20 * time.Hour), NotAfter: testNow.Add(4 * time.Hour), RotateAt: testNow.Add(-8 * time.Hour)},
		},
		Pods: []inpod.WorkloadStatus{
			{UID: "0b4e-client", Workload: "demo/client", Namespace: "demo", Name: "client", ServiceAccount: "default",
				Redirection: inpod.RedirectionEBPF, NetnsInode: 4026532301, Added: testNow.Add(-time.Hour), ActiveConnections: 1,
				Listeners: listeners("10.244.1.5", 12, 0, 0)},
			{UID: "9c1d-near", Workload: "demo/near", Namespace: "demo", Name: "near", ServiceAccount: "default",
				Redirection: inpod.RedirectionNAT, NetnsInode: 4026532377, Added: testNow.Add(-time.Hour), ActiveConnections: 0,
				Listeners: listeners("10.244.1.7", 0, 1, 11)},
		},
		Connections: []proxy.ConnStats{
			{UID: "0b4e-client", Outbound: 1, Total: 12},
			{UID: "9c1d-near", InboundPlaintext: 0, InboundHBONE: 0, Total: 12, Denied: 3},
			{UID: "ffff-gone", Total: 2},
		},
		ZDS:       inpod.ZDSStatus{Socket: "/var/run/ztunnel/ztunnel.sock", Connected: true, SnapshotReceived: true, Connects: 1, AcksOK: 2},
		XDSSynced: true,
	}
}

// node2Dump is node2's ztunnel: it serves far, and has lost the node agent.
func node2Dump(t *testing.T) ztunnelDump {
	return ztunnelDump{
		Dump: testState(t),
		Certificates: []ztunnelCert{
			{Identity: "spiffe://cluster.local/ns/demo/sa/default", Serial: "6a",
				NotBefore: testNow.Add(-time.Hour), NotAfter: testNow.Add(23 * time.Hour), RotateAt: testNow.Add(11 * time.Hour)},
		},
		Pods: []inpod.WorkloadStatus{
			{UID: "3e7f-far", Workload: "demo/far", Namespace: "demo", Name: "far", ServiceAccount: "default",
				Redirection: inpod.RedirectionEBPF, NetnsInode: 4026532412, Added: testNow.Add(-time.Hour), ActiveConnections: 2,
				Listeners: listeners("10.244.2.8", 0, 0, 7)},
		},
		Connections: []proxy.ConnStats{{UID: "3e7f-far", InboundHBONE: 2, Total: 7}},
		ZDS:         inpod.ZDSStatus{Socket: "/var/run/ztunnel/ztunnel.sock", SnapshotReceived: true, Connects: 3, LastProtocolError: "connection reset"},
		XDSSynced:   true,
	}
}

// marshal encodes a dump as ztunnel's admin server does.
func marshal(t *testing.T, v any) []byte {
	t.Helper()
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	return append(b, '\n')
}

// TestViewMatchesZtunnelsTypes checks that every JSON name the plugin reads
// is one ztunnel writes, with a compatible type, so a rename in ztunnel
// fails here rather than showing empty columns.
func TestViewMatchesZtunnelsTypes(t *testing.T) {
	tests := []struct {
		name       string
		view, real reflect.Type
	}{
		{"the dump's sections", reflect.TypeFor[configDump](), reflect.TypeFor[ztunnelDump]()},
		{"a workload", reflect.TypeFor[workload](), reflect.TypeFor[state.WorkloadDump]()},
		{"a service", reflect.TypeFor[service](), reflect.TypeFor[state.ServiceDump]()},
		{"a policy", reflect.TypeFor[policy](), reflect.TypeFor[state.PolicyDump]()},
		{"a certificate", reflect.TypeFor[certificate](), reflect.TypeFor[ztunnelCert]()},
		{"a served pod", reflect.TypeFor[inpodWorkload](), reflect.TypeFor[inpod.WorkloadStatus]()},
		{"a listener", reflect.TypeFor[listenerStatus](), reflect.TypeFor[inpod.ListenerStatus]()},
		{"a pod's connections", reflect.TypeFor[connStats](), reflect.TypeFor[proxy.ConnStats]()},
		{"the ZDS status", reflect.TypeFor[zdsStatus](), reflect.TypeFor[inpod.ZDSStatus]()},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			real := jsonFields(tt.real)
			for name, vt := range jsonFields(tt.view) {
				rt, ok := real[name]
				if !ok {
					t.Errorf("the plugin reads %q, which %v does not have", name, tt.real)
					continue
				}
				if !compatible(vt, rt) {
					t.Errorf("%q is a %v in the plugin, a %v in ztunnel", name, vt, rt)
				}
			}
		})
	}
}

// jsonFields maps the JSON names of a struct's fields, embedded structs'
// included, to their types.
func jsonFields(t reflect.Type) map[string]reflect.Type {
	out := map[string]reflect.Type{}
	for f := range t.Fields() {
		name, _, _ := strings.Cut(f.Tag.Get("json"), ",")
		switch {
		case name == "-":
		case f.Anonymous && name == "":
			for n, ft := range jsonFields(f.Type) {
				out[n] = ft
			}
		case name == "":
			out[f.Name] = f.Type
		default:
			out[name] = f.Type
		}
	}
	return out
}

// compatible reports whether JSON written from a real value decodes into a
// view value: the same JSON shape, and json.RawMessage takes anything.
func compatible(view, real reflect.Type) bool {
	if view == reflect.TypeFor[json.RawMessage]() {
		return true
	}
	if view == reflect.TypeFor[time.Time]() || real == reflect.TypeFor[time.Time]() {
		return view == real
	}
	switch view.Kind() {
	case reflect.Slice:
		return real.Kind() == reflect.Slice && compatible(view.Elem(), real.Elem())
	case reflect.Map:
		return real.Kind() == reflect.Map && compatible(view.Elem(), real.Elem())
	case reflect.Struct:
		return real.Kind() == reflect.Struct // fields are checked on their own
	case reflect.Int, reflect.Int64, reflect.Uint64:
		return number(real)
	}
	return view.Kind() == real.Kind()
}

func number(t reflect.Type) bool {
	switch t.Kind() {
	case reflect.Int, reflect.Int8, reflect.Int16, reflect.Int32, reflect.Int64,
		reflect.Uint, reflect.Uint8, reflect.Uint16, reflect.Uint32, reflect.Uint64:
		return true
	}
	return false
}
