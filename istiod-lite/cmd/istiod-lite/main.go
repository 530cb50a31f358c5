// Command istiod-lite is the control plane of the ambient mesh: it serves
// workload and authorization state over delta xDS and signs workload
// certificates, both on port 15012. See istiod-lite/README.md for flags.
package main

import (
	"context"
	"flag"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/server"
)

func main() {
	cfg := server.DefaultConfig()
	flag.StringVar(&cfg.Kubeconfig, "kubeconfig", "", "kubeconfig path; empty in a pod (in-cluster config)")
	flag.StringVar(&cfg.Namespace, "namespace", envOr("POD_NAMESPACE", cfg.Namespace), "namespace istiod-lite runs in and keeps its CA Secret in (env POD_NAMESPACE)")
	flag.StringVar(&cfg.ServiceName, "service-name", cfg.ServiceName, "Service name clients dial; the serving certificate carries its DNS names")
	flag.StringVar(&cfg.GRPCAddr, "grpc-addr", cfg.GRPCAddr, "address of the xDS + CA gRPC server (TLS)")
	flag.StringVar(&cfg.HTTPAddr, "monitoring-addr", cfg.HTTPAddr, "address of /metrics, /ready and /debug")
	flag.StringVar(&cfg.Cluster.ID, "cluster-id", cfg.Cluster.ID, "cluster ID in workload uids")
	flag.StringVar(&cfg.Cluster.TrustDomain, "trust-domain", cfg.Cluster.TrustDomain, "SPIFFE trust domain")
	flag.StringVar(&cfg.Cluster.RootNamespace, "root-namespace", cfg.Cluster.RootNamespace, "namespace whose selector-less policies apply mesh-wide")
	flag.StringVar(&cfg.Cluster.DomainSuffix, "domain-suffix", cfg.Cluster.DomainSuffix, "DNS suffix of Service hostnames")
	flag.DurationVar(&cfg.CA.DefaultTTL, "workload-cert-ttl", 0, "lifetime of a workload certificate when the request names none (0: the CA default, 24h)")
	flag.DurationVar(&cfg.CA.MaxTTL, "max-workload-cert-ttl", 0, "cap on a requested workload certificate lifetime (0: the CA default)")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	flag.Parse()

	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		slog.Error("bad --log-level", "err", err)
		os.Exit(2)
	}
	cfg.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	s, err := server.New(ctx, cfg)
	if err != nil {
		cfg.Log.Error("starting", "err", err)
		os.Exit(1)
	}
	if err := s.Run(ctx); err != nil {
		cfg.Log.Error("serving", "err", err)
		os.Exit(1)
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
