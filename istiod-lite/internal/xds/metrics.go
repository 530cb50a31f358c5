package xds

import (
	"errors"
	"log/slog"
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

// metrics are the server's Prometheus collectors. They always exist so the
// code that updates them has no nil checks; they are registered only when
// Options.Metrics is set.
type metrics struct {
	clients  prometheus.Gauge
	pushes   *prometheus.CounterVec
	latency  *prometheus.HistogramVec
	nacks    *prometheus.CounterVec
	sent     *prometheus.CounterVec
	removals *prometheus.CounterVec
}

func newMetrics(reg prometheus.Registerer, log *slog.Logger) *metrics {
	m := &metrics{
		clients: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "istiod_xds_connected_clients",
			Help: "Number of connected delta xDS streams.",
		}),
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_xds_pushes_total",
			Help: "Delta xDS responses sent, by resource type.",
		}, []string{"type"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "istiod_xds_push_latency_seconds",
			Help:    "Time from the Update that changed a resource to the response carrying it, by resource type.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 16), // 0.5 ms .. 16 s
		}, []string{"type"}),
		nacks: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_xds_nacks_total",
			Help: "Delta xDS responses rejected by clients, by resource type.",
		}, []string{"type"}),
		sent: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_xds_resources_sent_total",
			Help: "Resources (upserts) sent in delta xDS responses, by resource type.",
		}, []string{"type"}),
		removals: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_xds_removals_sent_total",
			Help: "Resource removals sent in delta xDS responses, by resource type.",
		}, []string{"type"}),
	}
	if reg == nil {
		return m
	}
	register := func(c prometheus.Collector) prometheus.Collector {
		err := reg.Register(c)
		var are prometheus.AlreadyRegisteredError
		switch {
		case err == nil:
			return c
		case errors.As(err, &are):
			// A second Server on the same registry (tests, restarts in
			// process) shares the first one's collectors.
			return are.ExistingCollector
		default:
			log.Error("registering xds metric", "error", err)
			return c
		}
	}
	m.clients = register(m.clients).(prometheus.Gauge)
	m.pushes = register(m.pushes).(*prometheus.CounterVec)
	m.latency = register(m.latency).(*prometheus.HistogramVec)
	m.nacks = register(m.nacks).(*prometheus.CounterVec)
	m.sent = register(m.sent).(*prometheus.CounterVec)
	m.removals = register(m.removals).(*prometheus.CounterVec)
	return m
}

// typeLabel shortens a type URL to the message name for metric labels:
// "type.googleapis.com/istio.workload.Address" -> "istio.workload.Address".
func typeLabel(typeURL string) string {
	return typeURL[strings.LastIndexByte(typeURL, '/')+1:]
}
