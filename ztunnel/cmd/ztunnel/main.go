// Command ztunnel is the mesh's per-node L4 proxy: it serves the listeners
// of every enrolled pod on its node, carries their traffic over HBONE mTLS,
// enforces L4 authorization and records TCP telemetry. See ztunnel/README.md
// for its flags, ports and privileges.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/ztunnel/internal/proxy"
)

func main() {
	o := proxy.Options{
		NodeName:     os.Getenv("NODE_NAME"),
		PodName:      os.Getenv("POD_NAME"),
		PodNamespace: envOr("POD_NAMESPACE", "istio-system"),
	}
	logLevel := "info"
	flag.StringVar(&o.XDSAddress, "xds-address", proxy.DefaultXDSAddress, "istiod-lite xDS and CA address (host:port); the host is the name its certificate carries")
	flag.StringVar(&o.XDSServerName, "xds-server-name", "", "name istiod-lite's certificate must carry; empty: the host of --xds-address")
	flag.StringVar(&o.RootCertFile, "root-cert", proxy.DefaultRootCertFile, "PEM file of the mesh root certificates (istio-ca-root-cert ConfigMap)")
	flag.StringVar(&o.TokenFile, "token-file", proxy.DefaultTokenFile, "projected service-account token (audience istio-ca), re-read for every call")
	flag.StringVar(&o.ZDSSocket, "zds-socket", zds.SocketPath, "node agent's ZDS socket")
	flag.StringVar(&o.AdminAddr, "admin-address", proxy.DefaultAdminAddr, "admin server (/config_dump, /logging, /debug/pprof/); empty disables")
	flag.StringVar(&o.MetricsAddr, "metrics-address", proxy.DefaultMetricsAddr, "Prometheus /metrics server; empty disables")
	flag.StringVar(&o.ReadyAddr, "ready-address", proxy.DefaultReadyAddr, "/healthz/ready server; empty disables")
	flag.StringVar(&o.ClusterID, "cluster-id", proxy.DefaultClusterID, "cluster ID in workload uids (istiod-lite's --cluster-id)")
	flag.StringVar(&o.TrustDomain, "trust-domain", "cluster.local", "mesh trust domain")
	flag.StringVar(&o.ServiceAccount, "service-account", "ztunnel", "ztunnel's own service account")
	flag.DurationVar(&o.DrainTimeout, "drain-timeout", proxy.DefaultDrainTimeout, "on SIGTERM, how long open connections may take to end")
	flag.StringVar(&logLevel, "log-level", logLevel, "debug, info, warn or error")
	flag.Parse()

	o.LogLevel = new(slog.LevelVar)
	if err := o.LogLevel.UnmarshalText([]byte(logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "ztunnel: --log-level: %v\n", err)
		os.Exit(2)
	}
	o.Log = slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: o.LogLevel}))
	slog.SetDefault(o.Log)

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	if err := proxy.Run(ctx, o); err != nil {
		o.Log.Error("ztunnel exiting", "err", err)
		os.Exit(1)
	}
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
