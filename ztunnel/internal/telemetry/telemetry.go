// Package telemetry records what ztunnel carries, in the shape Istio's
// dashboards expect: the istio_tcp_* Prometheus counters with Istio's label
// set, and one structured access-log line per closed connection.
package telemetry

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net/netip"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// Reporter says which end of a connection records it (label reporter).
type Reporter string

const (
	// ReporterSource is the client's ztunnel (outbound).
	ReporterSource Reporter = "source"
	// ReporterDestination is the server's ztunnel (inbound).
	ReporterDestination Reporter = "destination"
)

// Label values Istio uses.
const (
	unknown = "unknown"
	// protocolTCP is request_protocol for everything ztunnel carries.
	protocolTCP = "tcp"
	// securityMTLS and securityNone are connection_security_policy values.
	securityMTLS = "mutual_tls"
	securityNone = "unknown"
	// flagNone, flagDenied and flagConnect are response_flags values, as
	// Istio's ztunnel writes them.
	flagNone    = "-"
	flagDenied  = "DENY"
	flagConnect = "CONNECT"
)

// Errors a connection's Close classifies into response_flags; callers wrap
// them (fmt.Errorf("%w: ...", telemetry.ErrDenied)).
var (
	// ErrDenied means authorization policy rejected the connection (DENY).
	ErrDenied = errors.New("denied by authorization policy")
	// ErrConnect means the upstream could not be reached (CONNECT).
	ErrConnect = errors.New("upstream connect failed")
)

// labelNames is Istio's TCP metric label set, in order.
var labelNames = []string{
	"reporter",
	"source_workload", "source_workload_namespace", "source_principal",
	"source_app", "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
	"destination_workload", "destination_workload_namespace", "destination_principal",
	"destination_app", "destination_version",
	"destination_service", "destination_service_namespace", "destination_service_name",
	"destination_canonical_service", "destination_canonical_revision", "destination_cluster",
	"request_protocol", "response_flags", "connection_security_policy",
}

// responseFlagsIndex is the position of response_flags in labelNames: the
// one label that is known only when a connection closes.
const responseFlagsIndex = 21

// Metrics holds the counters and the access log. Create it with New; it is
// safe for concurrent use.
type Metrics struct {
	opened, closed, sent, received *prometheus.CounterVec
	log                            *slog.Logger
	now                            func() time.Time
}

// New registers the istio_tcp_* counters with reg and writes access logs to
// log (a JSON slog handler in production).
func New(reg prometheus.Registerer, log *slog.Logger) (*Metrics, error) {
	counter := func(name, help string) *prometheus.CounterVec {
		return prometheus.NewCounterVec(prometheus.CounterOpts{Name: name, Help: help}, labelNames)
	}
	m := &Metrics{
		opened:   counter("istio_tcp_connections_opened_total", "Total TCP connections opened"),
		closed:   counter("istio_tcp_connections_closed_total", "Total TCP connections closed"),
		sent:     counter("istio_tcp_sent_bytes_total", "Bytes sent during response (destination to source) of TCP connections"),
		received: counter("istio_tcp_received_bytes_total", "Bytes received during request (source to destination) of TCP connections"),
		log:      log,
		now:      time.Now,
	}
	for _, c := range []prometheus.Collector{m.opened, m.closed, m.sent, m.received} {
		if err := reg.Register(c); err != nil {
			return nil, fmt.Errorf("registering tcp metrics: %w", err)
		}
	}
	return m, nil
}

// Peer is one end of a connection.
type Peer struct {
	// Addr is the end's address.
	Addr netip.AddrPort
	// Workload is the end's workload, nil when it is not a known workload.
	Workload *state.Workload
	// Identity is the end's SPIFFE ID as authenticated (or expected, for a
	// destination we dial); empty means the workload's own identity, if any.
	Identity string
}

// ConnInfo describes a connection as it opens.
type ConnInfo struct {
	Reporter Reporter
	Src, Dst Peer
	// Service is the service the client addressed, nil for a pod address.
	Service *state.Service
	// MTLS is set when the connection is carried over HBONE mutual TLS.
	MTLS bool
}

// ConnectionRecorder records one connection: created by Open, fed with byte
// counts as they flow, finished by Close.
type ConnectionRecorder struct {
	m      *Metrics
	info   ConnInfo
	labels []string
	start  time.Time
	// sent and received are the byte totals for the access log.
	sent, received atomic.Int64
	// sentC and receivedC are the resolved counters, so that adding bytes
	// on the data path costs one atomic add.
	sentC, receivedC prometheus.Counter
	closed           atomic.Bool
}

// Open counts a new connection and returns its recorder.
func (m *Metrics) Open(info ConnInfo) *ConnectionRecorder {
	r := &ConnectionRecorder{m: m, info: info, labels: labelValues(info), start: m.now()}
	m.opened.WithLabelValues(r.labels...).Inc()
	r.sentC = m.sent.WithLabelValues(r.labels...)
	r.receivedC = m.received.WithLabelValues(r.labels...)
	return r
}

// AddReceived counts n bytes received from the source (request direction,
// istio_tcp_received_bytes_total).
func (r *ConnectionRecorder) AddReceived(n int) {
	if n > 0 {
		r.received.Add(int64(n))
		r.receivedC.Add(float64(n))
	}
}

// AddSent counts n bytes sent back to the source (response direction,
// istio_tcp_sent_bytes_total).
func (r *ConnectionRecorder) AddSent(n int) {
	if n > 0 {
		r.sent.Add(int64(n))
		r.sentC.Add(float64(n))
	}
}

// Close counts the connection closed, with response_flags from err
// (ErrDenied, ErrConnect), and writes its access-log line. Later calls do
// nothing.
func (r *ConnectionRecorder) Close(err error) {
	if !r.closed.CompareAndSwap(false, true) {
		return
	}
	labels := r.labels
	if f := responseFlags(err); f != flagNone {
		labels = append([]string(nil), r.labels...)
		labels[responseFlagsIndex] = f
	}
	r.m.closed.WithLabelValues(labels...).Inc()

	src, dst := r.info.Src, r.info.Dst
	attrs := []slog.Attr{
		slog.String("direction", direction(r.info.Reporter)),
		slog.Group("src",
			slog.String("addr", addrString(src.Addr)),
			slog.String("workload", workloadName(src.Workload)),
			slog.String("namespace", namespace(src.Workload)),
			slog.String("identity", identity(src)),
		),
		slog.Group("dst",
			slog.String("addr", addrString(dst.Addr)),
			slog.String("service", serviceHost(r.info.Service)),
			slog.String("workload", workloadName(dst.Workload)),
			slog.String("namespace", namespace(dst.Workload)),
			slog.String("identity", identity(dst)),
		),
		slog.Int64("bytes_sent", r.sent.Load()),
		slog.Int64("bytes_recv", r.received.Load()),
		slog.Float64("duration_ms", float64(r.m.now().Sub(r.start).Microseconds())/1000),
		slog.String("security", securityPolicy(r.info.MTLS)),
		slog.String("response_flags", labels[responseFlagsIndex]),
	}
	if err != nil {
		attrs = append(attrs, slog.String("error", err.Error()))
	}
	r.m.log.LogAttrs(context.Background(), slog.LevelInfo, "connection complete", attrs...)
}

func responseFlags(err error) string {
	switch {
	case err == nil:
		return flagNone
	case errors.Is(err, ErrDenied):
		return flagDenied
	case errors.Is(err, ErrConnect):
		return flagConnect
	}
	return flagNone
}

// labelValues fills labelNames' values from info; response_flags starts as "-".
func labelValues(info ConnInfo) []string {
	s, d := info.Src.Workload, info.Dst.Workload
	return []string{
		string(info.Reporter),
		or(s, func(w *state.Workload) string { return w.Info.GetWorkloadName() }),
		or(s, func(w *state.Workload) string { return w.Info.GetNamespace() }),
		identity(info.Src),
		or(s, func(w *state.Workload) string { return w.Info.GetCanonicalName() }),
		or(s, func(w *state.Workload) string { return w.Info.GetCanonicalRevision() }),
		or(s, func(w *state.Workload) string { return w.Info.GetCanonicalName() }),
		or(s, func(w *state.Workload) string { return w.Info.GetCanonicalRevision() }),
		or(s, func(w *state.Workload) string { return w.Info.GetClusterId() }),
		or(d, func(w *state.Workload) string { return w.Info.GetWorkloadName() }),
		or(d, func(w *state.Workload) string { return w.Info.GetNamespace() }),
		identity(info.Dst),
		or(d, func(w *state.Workload) string { return w.Info.GetCanonicalName() }),
		or(d, func(w *state.Workload) string { return w.Info.GetCanonicalRevision() }),
		serviceHost(info.Service),
		orSvc(info.Service, func(s *state.Service) string { return s.Info.GetNamespace() }),
		orSvc(info.Service, func(s *state.Service) string { return s.Info.GetName() }),
		or(d, func(w *state.Workload) string { return w.Info.GetCanonicalName() }),
		or(d, func(w *state.Workload) string { return w.Info.GetCanonicalRevision() }),
		or(d, func(w *state.Workload) string { return w.Info.GetClusterId() }),
		protocolTCP,
		flagNone,
		securityPolicy(info.MTLS),
	}
}

func or(w *state.Workload, f func(*state.Workload) string) string {
	if w == nil {
		return unknown
	}
	if v := f(w); v != "" {
		return v
	}
	return unknown
}

func orSvc(s *state.Service, f func(*state.Service) string) string {
	if s == nil {
		return unknown
	}
	if v := f(s); v != "" {
		return v
	}
	return unknown
}

func serviceHost(s *state.Service) string {
	return orSvc(s, func(s *state.Service) string { return s.Info.GetHostname() })
}

func identity(p Peer) string {
	switch {
	case p.Identity != "":
		return p.Identity
	case p.Workload != nil:
		return p.Workload.Identity
	}
	return unknown
}

func workloadName(w *state.Workload) string {
	return or(w, func(w *state.Workload) string { return w.Info.GetName() })
}

func namespace(w *state.Workload) string {
	return or(w, func(w *state.Workload) string { return w.Info.GetNamespace() })
}

func securityPolicy(mtls bool) string {
	if mtls {
		return securityMTLS
	}
	return securityNone
}

func direction(r Reporter) string {
	if r == ReporterDestination {
		return "inbound"
	}
	return "outbound"
}

func addrString(a netip.AddrPort) string {
	if !a.IsValid() {
		return unknown
	}
	return a.String()
}
