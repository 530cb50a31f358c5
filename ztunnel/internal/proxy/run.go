package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/pkg/xdsclient"
	"github.com/ambient-mesh/ambient/ztunnel/inpod"
	"github.com/ambient-mesh/ambient/ztunnel/internal/identity"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// Well-known addresses and files of a ztunnel pod.
const (
	// DefaultXDSAddress is istiod-lite's xDS and CA port.
	DefaultXDSAddress = "istiod.istio-system.svc:15012"
	// DefaultRootCertFile is the istio-ca-root-cert ConfigMap as mounted.
	DefaultRootCertFile = "/var/run/secrets/istio/root-cert.pem"
	// DefaultTokenFile is the projected service-account token (audience
	// istio-ca) as mounted.
	DefaultTokenFile = "/var/run/secrets/tokens/istio-token"
	// DefaultAdminAddr serves /config_dump, /logging and pprof, on
	// loopback only.
	DefaultAdminAddr = "127.0.0.1:15000"
	// DefaultMetricsAddr serves Prometheus /metrics.
	DefaultMetricsAddr = ":15020"
	// DefaultReadyAddr serves /healthz/ready.
	DefaultReadyAddr = ":15021"
	// DefaultDrainTimeout bounds how long a stopping ztunnel waits for open
	// connections.
	DefaultDrainTimeout = 30 * time.Second
)

// maintainEvery is how often Run prefetches certificates for the pods on
// the node and forgets what it held for pods that left.
const maintainEvery = 5 * time.Second

// Options configure Run.
type Options struct {
	XDSAddress string
	// XDSServerName is the name istiod-lite's certificate must carry; empty
	// means the host of XDSAddress (set it when dialing a Service IP).
	XDSServerName string
	RootCertFile  string
	TokenFile     string
	// ZDSSocket is the node agent's socket; empty means the default.
	ZDSSocket                         string
	AdminAddr, MetricsAddr, ReadyAddr string
	ClusterID                         string
	TrustDomain                       string
	NodeName, PodName, PodNamespace   string
	ServiceAccount                    string
	DrainTimeout                      time.Duration
	// LogLevel is the level /logging changes.
	LogLevel *slog.LevelVar
	Log      *slog.Logger
}

// Run runs ztunnel until ctx is done, then drains: it stops accepting in
// every pod, waits up to DrainTimeout for open connections, and returns.
func Run(ctx context.Context, o Options) error {
	if o.Log == nil {
		o.Log = slog.Default()
	}
	if o.LogLevel == nil {
		o.LogLevel = new(slog.LevelVar)
	}
	if o.DrainTimeout <= 0 {
		o.DrainTimeout = DefaultDrainTimeout
	}
	if o.ClusterID == "" {
		o.ClusterID = DefaultClusterID
	}
	if o.TrustDomain == "" {
		o.TrustDomain = identity.DefaultTrustDomain
	}
	log := o.Log

	td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
	if err != nil {
		return fmt.Errorf("trust domain: %w", err)
	}
	self, err := spiffeid.FromSegments(td, "ns", o.PodNamespace, "sa", o.ServiceAccount)
	if err != nil {
		return fmt.Errorf("ztunnel identity: %w", err)
	}
	roots, err := loadRoots(o.RootCertFile)
	if err != nil {
		return err
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	host, _, err := net.SplitHostPort(o.XDSAddress)
	if err != nil {
		return fmt.Errorf("xds address %q: %w", o.XDSAddress, err)
	}
	if o.XDSServerName != "" {
		host = o.XDSServerName
	}
	token := func() (string, error) {
		b, err := os.ReadFile(o.TokenFile)
		if err != nil {
			return "", fmt.Errorf("reading token: %w", err)
		}
		return strings.TrimSpace(string(b)), nil
	}

	ca, err := identity.NewCAClient(o.XDSAddress, pool, host, token)
	if err != nil {
		return fmt.Errorf("ca client: %w", err)
	}
	defer ca.Close()
	certs := identity.NewManager(ca, identity.Options{TrustDomain: td, Roots: roots, Self: self, Log: log})
	defer certs.Close()

	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics, err := telemetry.New(reg, log)
	if err != nil {
		return err
	}

	store := state.New()
	xc := xdsclient.New(xdsclient.Config{
		Address:  o.XDSAddress,
		TLS:      &tls.Config{RootCAs: pool, ServerName: host, MinVersion: tls.VersionTLS12},
		Token:    token,
		Node:     xdsNode(o),
		TypeURLs: []string{workloadapi.AddressTypeURL, security.AuthorizationTypeURL},
		OnUpdate: func(typeURL string, up []*xds.Resource, rm []string) error {
			return store.Apply(typeURL, state.Updates(up), rm)
		},
	})

	px := New(Config{State: store, Certs: certs, Metrics: metrics, TrustDomain: td, ClusterID: o.ClusterID, Log: log})
	var im *inpod.Manager
	pod := func(w *inpod.Workload) *Pod {
		return &Pod{UID: w.UID, Name: w.Name, Namespace: w.Namespace, ServiceAccount: w.ServiceAccount,
			Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
				return im.Dial(ctx, w, network, addr)
			},
			DialFrom: func(ctx context.Context, src netip.Addr, network, addr string) (net.Conn, error) {
				return im.DialFrom(ctx, w, src, network, addr)
			}}
	}
	im = inpod.New(inpod.Config{
		ZDSSocket: o.ZDSSocket,
		Log:       log,
		Handlers: inpod.Handlers{
			Outbound: func(w *inpod.Workload, c net.Conn, dst netip.AddrPort) { px.Outbound(pod(w), c, dst) },
			Inbound:  func(w *inpod.Workload, c net.Conn, dst netip.AddrPort) { px.Inbound(pod(w), c, dst) },
			HBONE:    func(w *inpod.Workload, c net.Conn) { px.HBONE(pod(w), c) },
		},
	})
	defer im.Close()
	defer px.Close()

	synced := func() bool {
		select {
		case <-xc.Synced():
			return true
		default:
			return false
		}
	}
	ready := func() bool { return im.Ready() && synced() }

	servers, err := listenServers(o, reg, ready, adminHandler(o, store, certs, px, im, synced))
	if err != nil {
		return err
	}

	runCtx, stop := context.WithCancel(context.Background())
	defer stop()
	var wg sync.WaitGroup
	errs := make(chan error, 3+len(servers))
	wg.Go(func() { errs <- xc.Run(runCtx) })
	wg.Go(func() { errs <- im.Run(runCtx) })
	// maintain stops when draining begins: once the pods' listeners are
	// closed it would take every pod for gone and shut their HBONE servers
	// down behind the drain's back.
	maintainCtx, stopMaintain := context.WithCancel(runCtx)
	defer stopMaintain()
	wg.Go(func() { maintain(maintainCtx, im, px, certs, td, log) })
	for _, s := range servers {
		wg.Go(func() {
			if err := s.srv.Serve(s.ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errs <- fmt.Errorf("serving %s: %w", s.ln.Addr(), err)
			}
		})
	}
	log.Info("ztunnel started", "xds", o.XDSAddress, "identity", self.String(), "node", o.NodeName)

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errs:
		if runErr == nil {
			runErr = errors.New("a component stopped")
		}
		log.Error("ztunnel stopping", "err", runErr)
	}

	stopMaintain()
	// The new ztunnel of a rolling restart shares the admin, metrics and
	// readiness ports (SO_REUSEPORT); closing ours now sends every probe
	// and scrape to it, instead of half of them to a ztunnel that is
	// leaving (and not ready).
	for _, s := range servers {
		s.srv.Close()
	}
	// Drain while xDS and ZDS stay up, so the state and pod deletes keep
	// arriving for the connections still open.
	log.Info("draining", "timeout", o.DrainTimeout)
	dctx, cancel := context.WithTimeout(context.Background(), o.DrainTimeout)
	var dwg sync.WaitGroup
	var imErr, pxErr error
	dwg.Go(func() { imErr = im.Drain(dctx) })
	dwg.Go(func() { pxErr = px.Shutdown(dctx) })
	dwg.Wait()
	cancel()
	if err := errors.Join(imErr, pxErr); err != nil {
		log.Warn("drain ended with connections open", "err", err)
	} else {
		log.Info("drained")
	}
	stop()
	im.Close()
	wg.Wait()
	return runErr
}

// xdsNode is how ztunnel introduces itself to istiod-lite.
func xdsNode(o Options) *xds.Node {
	md, _ := structpb.NewStruct(map[string]any{
		"NODE_NAME": o.NodeName, "NAMESPACE": o.PodNamespace, "NAME": o.PodName, "CLUSTER_ID": o.ClusterID,
	})
	return &xds.Node{Id: "ztunnel~" + o.PodName + "." + o.PodNamespace + "~" + o.NodeName, Metadata: md}
}

// loadRoots reads the mesh root certificates from a PEM file.
func loadRoots(path string) ([]*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("reading root certificates: %w", err)
	}
	var roots []*x509.Certificate
	for block, rest := pem.Decode(b); block != nil; block, rest = pem.Decode(rest) {
		if block.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing root certificate in %s: %w", path, err)
		}
		roots = append(roots, c)
	}
	if len(roots) == 0 {
		return nil, fmt.Errorf("no root certificate in %s", path)
	}
	return roots, nil
}

// maintain prefetches the certificates of the pods on the node, and drops
// what the proxy and the certificate manager hold for pods that left.
func maintain(ctx context.Context, im *inpod.Manager, px *Proxy, certs *identity.Manager, td spiffeid.TrustDomain, log *slog.Logger) {
	held := map[spiffeid.ID]bool{}
	t := time.NewTicker(maintainEvery)
	defer t.Stop()
	for {
		keep := map[string]bool{}
		ids := map[spiffeid.ID]bool{}
		for _, w := range im.Workloads() {
			keep[w.UID] = true
			id, err := spiffeid.FromSegments(td, "ns", w.Namespace, "sa", w.ServiceAccount)
			if err != nil {
				continue
			}
			ids[id] = true
			if err := certs.Prefetch(id); err != nil && !errors.Is(err, identity.ErrClosed) {
				log.Debug("prefetching certificate", "identity", id.String(), "err", err)
			}
		}
		for id := range held {
			if !ids[id] {
				certs.Forget(id)
			}
		}
		held = ids
		px.Forget(keep)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}
