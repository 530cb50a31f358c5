package telemetry

import (
	"bytes"
	"encoding/json"
	"fmt"
	"log/slog"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// world is a store with a client pod, a server pod and the server's service.
func world(t *testing.T) *state.Store {
	t.Helper()
	s := state.New()
	wl := func(w *workloadapi.Workload) state.Update {
		return state.Update{Name: w.GetUid(), Resource: &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}}
	}
	client := &workloadapi.Workload{
		Uid: "c1", Name: "sleep-7f9c", Namespace: "default", Addresses: [][]byte{{10, 0, 0, 1}},
		ServiceAccount: "sleep", WorkloadName: "sleep", CanonicalName: "sleep", CanonicalRevision: "v1", ClusterId: "Kubernetes",
	}
	server := &workloadapi.Workload{
		Uid: "s1", Name: "echo-55d8", Namespace: "apps", Addresses: [][]byte{{10, 0, 1, 5}},
		ServiceAccount: "echo", WorkloadName: "echo", CanonicalName: "echo", CanonicalRevision: "v2", ClusterId: "Kubernetes",
		Services: map[string]*workloadapi.PortList{"apps/echo.apps.svc.cluster.local": {}},
	}
	svc := &workloadapi.Service{Name: "echo", Namespace: "apps", Hostname: "echo.apps.svc.cluster.local",
		Addresses: []*workloadapi.NetworkAddress{{Address: []byte{10, 96, 0, 10}}}, Ports: []*workloadapi.Port{{ServicePort: 80, TargetPort: 8080}}}
	err := s.Apply(workloadapi.AddressTypeURL, []state.Update{
		wl(client),
		wl(server),
		{Name: "apps/echo.apps.svc.cluster.local", Resource: &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}}},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

type fixture struct {
	reg *prometheus.Registry
	m   *Metrics
	log *bytes.Buffer
	s   *state.Store
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	f := &fixture{reg: prometheus.NewRegistry(), log: &bytes.Buffer{}, s: world(t)}
	var err error
	f.m, err = New(f.reg, slog.New(slog.NewJSONHandler(f.log, nil)))
	if err != nil {
		t.Fatal(err)
	}
	clock := time.Date(2025, 1, 1, 0, 0, 0, 0, time.UTC)
	f.m.now = func() time.Time { clock = clock.Add(1500 * time.Millisecond); return clock }
	return f
}

// outbound is sleep -> echo's VIP, picked endpoint s1, as the client's
// ztunnel sees it.
func (f *fixture) outbound() ConnInfo {
	return ConnInfo{
		Reporter: ReporterSource,
		Src:      Peer{Addr: netip.MustParseAddrPort("10.0.0.1:40000"), Workload: f.s.Workload("c1")},
		Dst:      Peer{Addr: netip.MustParseAddrPort("10.0.1.5:8080"), Workload: f.s.Workload("s1")},
		Service:  f.s.Service("apps/echo.apps.svc.cluster.local"),
		MTLS:     true,
	}
}

const outboundLabels = `reporter="source",source_workload="sleep",source_workload_namespace="default",source_principal="spiffe://cluster.local/ns/default/sa/sleep",source_app="sleep",source_version="v1",source_canonical_service="sleep",source_canonical_revision="v1",source_cluster="Kubernetes",destination_workload="echo",destination_workload_namespace="apps",destination_principal="spiffe://cluster.local/ns/apps/sa/echo",destination_app="echo",destination_version="v2",destination_service="echo.apps.svc.cluster.local",destination_service_namespace="apps",destination_service_name="echo",destination_canonical_service="echo",destination_canonical_revision="v2",destination_cluster="Kubernetes",request_protocol="tcp",connection_security_policy="mutual_tls"`

// expo renders one counter sample in the text exposition format, with the
// labels sorted as the registry sorts them.
func expo(name, labels, flags string, v int) string {
	pairs := strings.Split(labels+`,response_flags="`+flags+`"`, ",")
	slices.Sort(pairs)
	return fmt.Sprintf("%s{%s} %d\n", name, strings.Join(pairs, ","), v)
}

func TestAnOutboundConnectionIsCountedWithIstiosLabels(t *testing.T) {
	f := newFixture(t)
	r := f.m.Open(f.outbound())
	r.AddReceived(100)
	r.AddReceived(28)
	r.AddSent(4096)
	r.Close(nil)
	r.Close(nil) // a second Close is a no-op

	want := ""
	for _, m := range []struct {
		name, help string
		v          int
	}{
		{"istio_tcp_connections_closed_total", "Total TCP connections closed", 1},
		{"istio_tcp_connections_opened_total", "Total TCP connections opened", 1},
		{"istio_tcp_received_bytes_total", "Bytes received during request (source to destination) of TCP connections", 128},
		{"istio_tcp_sent_bytes_total", "Bytes sent during response (destination to source) of TCP connections", 4096},
	} {
		want += fmt.Sprintf("# HELP %s %s\n# TYPE %s counter\n", m.name, m.help, m.name) + expo(m.name, outboundLabels, "-", m.v)
	}
	if err := testutil.GatherAndCompare(f.reg, strings.NewReader(want)); err != nil {
		t.Error(err)
	}
}

func TestResponseFlagsComeFromTheCloseError(t *testing.T) {
	tests := []struct {
		name  string
		err   error
		flags string
	}{
		{"a clean close has no flags", nil, "-"},
		{"a policy denial is DENY", fmt.Errorf("%w: default/deny-all", ErrDenied), "DENY"},
		{"an upstream failure is CONNECT", fmt.Errorf("dialing 10.0.1.5:8080: %w", ErrConnect), "CONNECT"},
		{"any other error has no flags", fmt.Errorf("copying: reset by peer"), "-"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			f := newFixture(t)
			f.m.Open(f.outbound()).Close(tt.err)
			labels := labelValues(f.outbound())
			if got := testutil.ToFloat64(f.m.opened.WithLabelValues(labels...)); got != 1 {
				t.Errorf("opened{response_flags=-} = %v, want 1", got)
			}
			labels[responseFlagsIndex] = tt.flags
			if got := testutil.ToFloat64(f.m.closed.WithLabelValues(labels...)); got != 1 {
				t.Errorf("closed{response_flags=%s} = %v, want 1", tt.flags, got)
			}
			if n := testutil.CollectAndCount(f.m.closed); n != 1 {
				t.Errorf("closed has %d series, want 1", n)
			}
		})
	}
}

func TestUnknownPeersAndPlaintextAreLabeledUnknown(t *testing.T) {
	f := newFixture(t)
	info := ConnInfo{
		Reporter: ReporterDestination,
		Src:      Peer{Addr: netip.MustParseAddrPort("192.168.0.7:5555")},
		Dst:      Peer{Addr: netip.MustParseAddrPort("10.0.1.5:8080"), Workload: f.s.Workload("s1")},
	}
	got := map[string]string{}
	for i, v := range labelValues(info) {
		got[labelNames[i]] = v
	}
	want := map[string]string{
		"reporter": "destination", "source_workload": "unknown", "source_principal": "unknown",
		"destination_workload": "echo", "destination_service": "unknown", "connection_security_policy": "unknown",
		"request_protocol": "tcp", "response_flags": "-",
	}
	for k, v := range want {
		if got[k] != v {
			t.Errorf("%s = %q, want %q", k, got[k], v)
		}
	}
	if len(labelNames) != 23 || labelNames[responseFlagsIndex] != "response_flags" {
		t.Fatalf("label set changed: %v", labelNames)
	}
}

func TestCloseWritesOneAccessLogLine(t *testing.T) {
	f := newFixture(t)
	info := f.outbound()
	info.Src.Identity = "spiffe://cluster.local/ns/default/sa/sleep"
	r := f.m.Open(info)
	r.AddReceived(10)
	r.AddSent(20)
	r.Close(fmt.Errorf("%w: reset", ErrConnect))
	r.Close(nil)

	lines := strings.Split(strings.TrimSpace(f.log.String()), "\n")
	if len(lines) != 1 {
		t.Fatalf("got %d log lines, want 1:\n%s", len(lines), f.log)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &got); err != nil {
		t.Fatal(err)
	}
	want := map[string]any{
		"level": "INFO", "msg": "connection complete", "direction": "outbound",
		"src":        map[string]any{"addr": "10.0.0.1:40000", "workload": "sleep-7f9c", "namespace": "default", "identity": "spiffe://cluster.local/ns/default/sa/sleep"},
		"dst":        map[string]any{"addr": "10.0.1.5:8080", "service": "echo.apps.svc.cluster.local", "workload": "echo-55d8", "namespace": "apps", "identity": "spiffe://cluster.local/ns/apps/sa/echo"},
		"bytes_sent": 20.0, "bytes_recv": 10.0, "duration_ms": 1500.0, "security": "mutual_tls",
		"response_flags": "CONNECT", "error": "upstream connect failed: reset",
	}
	delete(got, "time")
	gotJSON, _ := json.Marshal(got)
	wantJSON, _ := json.Marshal(want)
	if string(gotJSON) != string(wantJSON) {
		t.Errorf("access log\n got %s\nwant %s", gotJSON, wantJSON)
	}
}

func TestNewFailsWhenTheCountersAreAlreadyRegistered(t *testing.T) {
	reg := prometheus.NewRegistry()
	if _, err := New(reg, slog.Default()); err != nil {
		t.Fatal(err)
	}
	if _, err := New(reg, slog.Default()); err == nil {
		t.Error("second New on one registry succeeded")
	}
}

func BenchmarkConnection(b *testing.B) {
	reg := prometheus.NewRegistry()
	m, err := New(reg, slog.New(slog.DiscardHandler))
	if err != nil {
		b.Fatal(err)
	}
	s := state.New()
	info := ConnInfo{Reporter: ReporterSource, Src: Peer{Workload: s.Workload("none")}, MTLS: true}
	b.ReportAllocs()
	for b.Loop() {
		r := m.Open(info)
		for range 16 {
			r.AddReceived(1024)
			r.AddSent(1024)
		}
		r.Close(nil)
	}
}
