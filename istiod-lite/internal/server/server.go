// Package server wires istiod-lite together: the Kubernetes clients, the CA,
// the workload-discovery controller and the delta xDS server on one TLS gRPC
// port (15012), and metrics, readiness and debug endpoints on 15014.
package server

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"

	caapi "github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/ca"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/controller"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/model"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/xds"
)

// Ports of istiod-lite (ARCHITECTURE.md, Ports).
const (
	// GRPCPort serves delta xDS and the CA over TLS.
	GRPCPort = 15012
	// MonitoringPort serves /metrics, /ready and /debug.
	MonitoringPort = 15014
)

// Config is istiod-lite's configuration, from flags and environment.
type Config struct {
	// Kubeconfig is empty in a pod (in-cluster config).
	Kubeconfig string
	// Namespace is where istiod-lite runs and keeps the CA Secret.
	Namespace string
	// ServiceName is the Service clients dial; the serving certificate
	// carries its DNS names.
	ServiceName string
	GRPCAddr    string
	HTTPAddr    string
	Cluster     model.Cluster
	CA          ca.Options
	// ServingCertTTL is the lifetime of the gRPC serving certificate; it is
	// renewed at half of it.
	ServingCertTTL time.Duration
	Log            *slog.Logger
}

// DefaultConfig is the configuration of a standard install.
func DefaultConfig() Config {
	cluster := model.DefaultCluster()
	return Config{
		Namespace:      cluster.RootNamespace,
		ServiceName:    "istiod",
		GRPCAddr:       fmt.Sprintf(":%d", GRPCPort),
		HTTPAddr:       fmt.Sprintf(":%d", MonitoringPort),
		Cluster:        cluster,
		ServingCertTTL: 24 * time.Hour,
		Log:            slog.Default(),
	}
}

// Server is a running istiod-lite.
type Server struct {
	cfg        Config
	kube       kubernetes.Interface
	ca         *ca.CA
	xds        *xds.Server
	controller *controller.Controller
	grpc       *grpc.Server
	http       *http.Server
	registry   *prometheus.Registry
	serving    atomic.Pointer[tls.Certificate]
	grpcUp     atomic.Bool
	closeOnce  sync.Once
}

// New connects to the API server and loads (or creates) the CA; it serves
// nothing until Run.
func New(ctx context.Context, cfg Config) (*Server, error) {
	rc, err := restConfig(cfg.Kubeconfig)
	if err != nil {
		return nil, err
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("building kubernetes client: %w", err)
	}
	istio, err := istioclient.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("building istio client: %w", err)
	}
	gw, err := gatewayclient.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("building gateway client: %w", err)
	}
	reg := prometheus.NewRegistry()
	reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	caOpts := cfg.CA
	caOpts.Namespace = cfg.Namespace
	caOpts.TrustDomain = cfg.Cluster.TrustDomain
	authority, err := ca.LoadOrCreate(ctx, kube, caOpts)
	if err != nil {
		return nil, fmt.Errorf("loading the CA: %w", err)
	}
	auth := authn.NewAuthenticator(kube, []string{authn.DefaultAudience})
	s := &Server{cfg: cfg, kube: kube, ca: authority, registry: reg}
	s.xds = xds.NewServer(xds.Options{Authenticate: auth.Authenticate, Metrics: reg, Log: cfg.Log})
	s.controller = controller.New(kube, istio, gw, cfg.Cluster, s.push, controller.Options{Metrics: reg, Log: cfg.Log})
	caService := ca.NewService(authority, auth, ca.NewPodsOnNode(s.controller.PodLister()), reg)

	if err := s.rotateServingCert(); err != nil {
		return nil, err
	}
	creds := credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS12,
		GetCertificate: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return s.serving.Load(), nil
		},
	})
	s.grpc = grpc.NewServer(grpc.Creds(creds),
		grpc.MaxConcurrentStreams(100_000),
		grpc.KeepaliveParams(keepalive.ServerParameters{Time: 30 * time.Second, Timeout: 10 * time.Second}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
	)
	s.xds.Register(s.grpc)
	caapi.RegisterIstioCertificateServiceServer(s.grpc, caService)
	s.http = &http.Server{Handler: s.httpHandler(), ReadHeaderTimeout: 10 * time.Second}
	return s, nil
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	var rc *rest.Config
	var err error
	if kubeconfig == "" {
		rc, err = rest.InClusterConfig()
	} else {
		rc, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("loading kubernetes client config: %w", err)
	}
	rc.QPS, rc.Burst = 50, 100
	rc.UserAgent = "istiod-lite"
	return rc, nil
}

// push hands the controller's computed resources to the xDS server.
func (s *Server) push(typeURL string, resources map[string]proto.Message) {
	s.xds.Update(typeURL, resources)
}

// dnsNames are the names clients use for istiod-lite.
func (s *Server) dnsNames() []string {
	svc, ns, suffix := s.cfg.ServiceName, s.cfg.Namespace, s.cfg.Cluster.DomainSuffix
	return []string{svc + "." + ns + ".svc", svc + "." + ns + ".svc." + suffix, svc + "." + ns, svc}
}

func (s *Server) rotateServingCert() error {
	cert, err := s.ca.ServingCert(s.dnsNames(), s.cfg.ServingCertTTL)
	if err != nil {
		return fmt.Errorf("issuing the serving certificate: %w", err)
	}
	s.serving.Store(&cert)
	return nil
}

// Run serves until ctx ends; a cancelled ctx is a clean exit.
func (s *Server) Run(ctx context.Context) error {
	grpcLn, err := net.Listen("tcp", s.cfg.GRPCAddr)
	if err != nil {
		return fmt.Errorf("listening for gRPC: %w", err)
	}
	httpLn, err := net.Listen("tcp", s.cfg.HTTPAddr)
	if err != nil {
		grpcLn.Close()
		return fmt.Errorf("listening for monitoring: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 5)
	run := func(name string, f func() error) {
		go func() {
			err := f()
			if err != nil && !errors.Is(err, context.Canceled) && !errors.Is(err, http.ErrServerClosed) && !errors.Is(err, grpc.ErrServerStopped) {
				errc <- fmt.Errorf("%s: %w", name, err)
				return
			}
			errc <- nil
		}()
	}
	run("controller", func() error { return s.controller.Run(ctx) })
	run("root cert publisher", func() error { return ca.PublishRoot(ctx, s.kube, s.ca.RootPEM()) })
	run("serving cert rotation", func() error { return s.rotateLoop(ctx) })
	run("grpc", func() error { s.grpcUp.Store(true); return s.grpc.Serve(grpcLn) })
	run("http", func() error { return s.http.Serve(httpLn) })
	s.cfg.Log.Info("serving", "grpc", grpcLn.Addr().String(), "http", httpLn.Addr().String())

	var first error
	select {
	case <-ctx.Done():
	case first = <-errc:
	}
	cancel()
	s.Close()
	return first
}

func (s *Server) rotateLoop(ctx context.Context) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(s.cfg.ServingCertTTL / 2):
		}
		if err := s.rotateServingCert(); err != nil {
			s.cfg.Log.Error("rotating the serving certificate; keeping the old one", "err", err)
		}
	}
}

// Close stops serving; safe to call twice.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.grpcUp.Store(false)
		s.xds.Close()
		stopped := make(chan struct{})
		go func() { s.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(5 * time.Second):
			s.grpc.Stop()
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		s.http.Shutdown(ctx)
	})
}

// Ready says whether istiod-lite serves a complete view: informers synced,
// first push done and the gRPC port up.
func (s *Server) Ready() bool { return s.controller.Ready() && s.grpcUp.Load() }

func (s *Server) httpHandler() http.Handler {
	mux := http.NewServeMux()
	mux.Handle("/metrics", promhttp.HandlerFor(s.registry, promhttp.HandlerOpts{}))
	mux.HandleFunc("/ready", func(w http.ResponseWriter, r *http.Request) {
		if !s.Ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	mux.HandleFunc("/debug/resources", s.debugResources)
	mux.HandleFunc("/debug/clients", func(w http.ResponseWriter, r *http.Request) {
		writeJSON(w, s.xds.Clients())
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

// debugResources dumps the computed state: addresses, authorizations and
// policy status, as JSON with the protobuf field names.
func (s *Server) debugResources(w http.ResponseWriter, r *http.Request) {
	snap := s.controller.Snapshot()
	marshal := protojson.MarshalOptions{UseProtoNames: true}
	out := map[string]any{}
	addrs := map[string]json.RawMessage{}
	for name, a := range snap.Addresses {
		raw, _ := marshal.Marshal(a)
		addrs[name] = raw
	}
	authz := map[string]json.RawMessage{}
	for name, a := range snap.Authorizations {
		raw, _ := marshal.Marshal(a)
		authz[name] = raw
	}
	status := map[string]any{}
	for nn, conds := range snap.PolicyStatus {
		status[types.NamespacedName(nn).String()] = conds
	}
	out["addresses"], out["authorizations"], out["policy_status"] = addrs, authz, status
	writeJSON(w, out)
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}
