// Package agent is the node agent (cni-agent): it decides which pods on its
// node belong in the ambient mesh, installs and removes their traffic
// redirection (package redirect), hands their network namespaces to ztunnel
// over ZDS (package zds), answers the ambient-cni plugin (package cniapi), and
// keeps the plugin chained into the node's CNI configuration (package
// cniconf).
//
// Pods are enrolled two ways. A pod that starts after the agent is enrolled
// by the plugin's CNI ADD, before its containers start; the ADD fails (and
// the runtime retries) until redirection is installed and ztunnel has
// acknowledged the pod. A pod that is already running when its namespace or
// itself becomes ambient is enrolled from the Kubernetes watch, without a
// restart: the agent finds its network namespace by scanning the host's
// processes for one whose namespace holds the pod's IP. Enrolled pods carry
// the annotation ambient.istio.io/redirection=enabled; that annotation is
// also how a restarted agent finds the pods to re-enroll, so an agent
// restart leaves every pod as it was.
//
// Work on one pod is serialized: informer events go through a rate-limited
// workqueue keyed by pod UID, and CNI requests take the same per-UID lock.
package agent

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sync/errgroup"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniapi"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniconf"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/zds"
)

// Defaults for Config.
const (
	DefaultCNIConfDir      = "/etc/cni/net.d"
	DefaultCNIBinDir       = "/opt/cni/bin"
	DefaultAgentSocket     = cniapi.DefaultSocketPath
	DefaultZDSSocket       = zdsapi.SocketPath
	DefaultSystemNamespace = "istio-system"
	DefaultProcDir         = "/proc"
	DefaultNetnsDir        = "/var/run/netns"
	// DefaultDebugAddr serves /debug/* and /healthz/ready. 15030 is free in
	// the mesh's port plan (15000 admin, 15020 metrics, 15021 ztunnel's
	// readiness); loopback only, the node's kubelet probes it there.
	DefaultDebugAddr = "127.0.0.1:15030"
	// DefaultWorkers is how many pods are reconciled in parallel.
	DefaultWorkers = 8
)

// Config is the agent's configuration.
type Config struct {
	// NodeName is the Kubernetes node the agent runs on (env NODE_NAME).
	NodeName string
	// SystemNamespace is where the mesh's own components run (the agent's
	// namespace); its pods are never enrolled.
	SystemNamespace string
	// CNIConfDir and CNIBinDir are the node's CNI directories as mounted
	// into the agent; CNIBinary is the ambient-cni binary to install there.
	CNIConfDir, CNIBinDir, CNIBinary string
	// AgentSocket is where the plugin reaches the agent; it is written into
	// the conflist.
	AgentSocket string
	// ZDSSocket is where ztunnel connects.
	ZDSSocket string
	// Engine is the redirection engine: "auto", "ebpf" or "nftables".
	Engine string
	// PodCIDRs are the node's pod ranges (Node spec.podCIDRs), for the
	// node-side probe SNAT.
	PodCIDRs []netip.Prefix
	// DebugAddr serves /debug/enrolled, /debug/zds and /healthz/ready;
	// empty disables it.
	DebugAddr string
	// ProcDir is the host's /proc (mounted at /host/proc in the DaemonSet),
	// scanned for running pods' network namespaces.
	ProcDir string
	// NetnsDir holds the container runtime's named network namespaces
	// (/var/run/netns), scanned too, for pods whose processes are all gone
	// for a moment; empty skips it.
	NetnsDir string
	// UninstallOnExit removes the plugin from the CNI configuration and the
	// bin dir when Run returns. Only for removing the agent for good: after
	// a plain restart, new pods must keep failing closed until the agent is
	// back.
	UninstallOnExit bool
	// Workers is how many pods are reconciled in parallel (DefaultWorkers
	// when zero).
	Workers int
	// Log receives the agent's logs; nil discards them.
	Log *slog.Logger
}

func (c *Config) setDefaults() {
	def := func(s *string, v string) {
		if *s == "" {
			*s = v
		}
	}
	def(&c.SystemNamespace, DefaultSystemNamespace)
	def(&c.CNIConfDir, DefaultCNIConfDir)
	def(&c.CNIBinDir, DefaultCNIBinDir)
	def(&c.AgentSocket, DefaultAgentSocket)
	def(&c.ZDSSocket, DefaultZDSSocket)
	def(&c.Engine, redirect.EngineAuto)
	def(&c.ProcDir, DefaultProcDir)
	if c.Workers <= 0 {
		c.Workers = DefaultWorkers
	}
	if c.Log == nil {
		c.Log = slog.New(slog.DiscardHandler)
	}
}

// probeSNAT is the node-side probe SNAT of package redirect; tests replace it
// so they do not touch the host's nftables.
type probeSNAT interface {
	Install(podCIDRs []netip.Prefix) error
	AddTarget(ip netip.Addr) error
	RemoveTarget(ip netip.Addr) error
	Describe() (any, error)
}

// netnsFinder opens the network namespace that holds one of a running
// pod's IPs; it returns an error wrapping errNetnsNotFound when none does.
type netnsFinder interface {
	Find(ips []netip.Addr) (*os.File, error)
}

var errNetnsNotFound = errors.New("no network namespace holds the pod's IP")

// Agent is the node agent. Create it with New and start it with Run.
type Agent struct {
	cfg    Config
	log    *slog.Logger
	client kubernetes.Interface

	engine redirect.Engine
	probes probeSNAT
	finder netnsFinder
	zds    *zds.Server

	podInformer, nsInformer cache.SharedIndexInformer
	queue                   workqueue.TypedRateLimitingInterface[string]

	// synced is set once the informers have synced: CNI requests wait for it.
	synced atomic.Bool
	// ready is set once start-up is complete (/healthz/ready).
	ready atomic.Bool

	// locks serializes the work on one pod (by UID) across the workqueue and
	// CNI requests. A pod's entry in pods is only changed with its lock held.
	locks keyedMutex

	mu sync.Mutex
	// pods are the enrolled pods by UID; guarded by mu.
	pods map[string]*enrolledPod

	closeOnce sync.Once
}

// New builds the agent: it chooses the redirection engine and opens the ZDS
// socket, so a bad configuration fails before anything on the node changes.
func New(client kubernetes.Interface, cfg Config) (*Agent, error) {
	cfg.setDefaults()
	if cfg.NodeName == "" {
		return nil, errors.New("node name is required")
	}
	engine, err := redirect.Choose(cfg.Engine)
	if err != nil {
		return nil, err
	}
	return newAgent(client, cfg, engine, kernelProbeSNAT{}, newProcScanner(cfg.ProcDir, cfg.NetnsDir))
}

// newAgent is New with the kernel-facing parts given, for tests.
func newAgent(client kubernetes.Interface, cfg Config, engine redirect.Engine, probes probeSNAT, finder netnsFinder) (*Agent, error) {
	cfg.setDefaults()
	server, err := zds.NewServer(cfg.ZDSSocket, cfg.Log.With("part", "zds"))
	if err != nil {
		return nil, fmt.Errorf("starting zds server: %w", err)
	}
	a := &Agent{
		cfg:    cfg,
		log:    cfg.Log,
		client: client,
		engine: engine,
		probes: probes,
		finder: finder,
		zds:    server,
		pods:   map[string]*enrolledPod{},
		queue: workqueue.NewTypedRateLimitingQueueWithConfig(
			workqueue.NewTypedItemExponentialFailureRateLimiter[string](100*time.Millisecond, 30*time.Second),
			workqueue.TypedRateLimitingQueueConfig[string]{Name: "cni-agent"}),
	}
	a.setupInformers()
	return a, nil
}

// Ready reports whether start-up is complete: pods enrolled before a restart
// are enrolled again and the plugin is installed.
func (a *Agent) Ready() bool { return a.ready.Load() }

// Engine is the redirection engine in use.
func (a *Agent) Engine() string { return a.engine.Name() }

// Run starts the agent and blocks until ctx is done (a clean exit, nil) or a
// part of it fails. Start-up order matters for pods created meanwhile: the
// node's probe SNAT table first (enrolling adds to its set), then ZDS and the
// CNI API, then the watch and the re-enrollment of pods enrolled before a
// restart, and the plugin goes into the CNI configuration last, so no ADD
// reaches an agent that cannot answer it. Returning leaves every pod's
// redirection in place (see Close).
func (a *Agent) Run(ctx context.Context) error {
	defer a.Close()

	// Probe SNAT first: enrolling a pod adds its IP to the SNAT set.
	if err := a.probes.Install(a.cfg.PodCIDRs); err != nil {
		return fmt.Errorf("installing probe snat: %w", err)
	}
	cniLn, err := cniapi.Listen(a.cfg.AgentSocket)
	if err != nil {
		return fmt.Errorf("opening cni api socket: %w", err)
	}
	var dbgLn net.Listener
	if a.cfg.DebugAddr != "" {
		if dbgLn, err = net.Listen("tcp", a.cfg.DebugAddr); err != nil {
			cniLn.Close()
			return fmt.Errorf("opening debug listener: %w", err)
		}
	}

	installer := cniconf.New(cniconf.Config{
		ConfDir: a.cfg.CNIConfDir,
		Entry:   cniconf.Entry{AgentSocket: a.cfg.AgentSocket},
		Log:     a.log.With("part", "cniconf"),
	})
	if a.cfg.UninstallOnExit {
		defer a.uninstall(installer)
	}

	g, ctx := errgroup.WithContext(ctx)
	g.Go(func() error { return a.zds.Run(ctx) })
	cniSrv := &http.Server{Handler: cniapi.NewHandler(a, a.log.With("part", "cniapi")), ReadHeaderTimeout: 10 * time.Second}
	g.Go(func() error { return serve(ctx, cniSrv, cniLn) })
	if dbgLn != nil {
		dbgSrv := &http.Server{Handler: a.debugHandler(), ReadHeaderTimeout: 10 * time.Second}
		g.Go(func() error { return serve(ctx, dbgSrv, dbgLn) })
	}

	g.Go(func() error { a.podInformer.RunWithContext(ctx); return nil })
	g.Go(func() error { a.nsInformer.RunWithContext(ctx); return nil })
	g.Go(func() error {
		<-ctx.Done()
		a.queue.ShutDown()
		return nil
	})

	g.Go(func() error {
		if !cache.WaitForCacheSync(ctx.Done(), a.podInformer.HasSynced, a.nsInformer.HasSynced) {
			return nil // ctx done
		}
		a.synced.Store(true)
		a.rebuild(ctx)
		for range a.cfg.Workers {
			g.Go(func() error { a.work(ctx); return nil })
		}

		if a.cfg.CNIBinary != "" {
			dst, err := cniconf.InstallBinary(a.cfg.CNIBinary, a.cfg.CNIBinDir)
			if err != nil {
				return fmt.Errorf("installing plugin binary: %w", err)
			}
			a.log.Info("plugin binary installed", "path", dst)
		}
		// Not finding the primary configuration yet is no reason to stay
		// unready: the node has no pod network without it, and Watch
		// chains the plugin as soon as it appears.
		switch file, err := installer.Install(); {
		case errors.Is(err, cniconf.ErrNoPrimary):
			a.log.Warn("no primary CNI configuration yet; waiting for it", "dir", a.cfg.CNIConfDir)
		case err != nil:
			return fmt.Errorf("installing plugin into cni config: %w", err)
		default:
			a.log.Info("plugin chained", "file", file)
		}
		a.ready.Store(true)
		return installer.Watch(ctx)
	})

	err = g.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

// uninstall takes the plugin out of the node's CNI configuration and bin
// dir, for Config.UninstallOnExit.
func (a *Agent) uninstall(installer *cniconf.Installer) {
	if err := installer.Uninstall(); err != nil {
		a.log.Error("uninstalling plugin from cni config", "error", err)
	}
	if err := cniconf.RemoveBinary(a.cfg.CNIBinDir); err != nil {
		a.log.Error("removing plugin binary", "error", err)
	}
	a.log.Info("plugin uninstalled")
}

// serve runs srv on ln until ctx is done.
func serve(ctx context.Context, srv *http.Server, ln net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ln) }()
	select {
	case err := <-errc:
		return fmt.Errorf("serving %s: %w", ln.Addr(), err)
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		if err := srv.Shutdown(sctx); err != nil {
			srv.Close()
		}
		return nil
	}
}

// Close stops the ZDS server and releases the network namespaces the agent
// holds. It leaves every pod's redirection in place: a restarted agent picks
// them up again. Safe to call more than once.
func (a *Agent) Close() error {
	var err error
	a.closeOnce.Do(func() {
		a.queue.ShutDown()
		err = a.zds.Close()
		a.mu.Lock()
		defer a.mu.Unlock()
		for _, p := range a.pods {
			p.netns.Close()
		}
		clear(a.pods)
	})
	return err
}

// keyedMutex is a set of mutexes by key, created on demand and dropped when
// unused.
type keyedMutex struct {
	mu sync.Mutex
	// locks by key; guarded by mu.
	locks map[string]*refMutex
}

type refMutex struct {
	sync.Mutex
	refs int // guarded by keyedMutex.mu
}

// Lock locks key and returns the unlock function.
func (k *keyedMutex) Lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*refMutex{}
	}
	m := k.locks[key]
	if m == nil {
		m = &refMutex{}
		k.locks[key] = m
	}
	m.refs++
	k.mu.Unlock()

	m.Lock()
	return func() {
		m.Unlock()
		k.mu.Lock()
		if m.refs--; m.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
}

// podIPs are the addresses in a pod's status.
func podIPs(pod *corev1.Pod) []netip.Addr {
	var ips []netip.Addr
	for _, ip := range pod.Status.PodIPs {
		if a, err := netip.ParseAddr(ip.IP); err == nil {
			ips = append(ips, a.Unmap())
		}
	}
	if len(ips) == 0 && pod.Status.PodIP != "" {
		if a, err := netip.ParseAddr(pod.Status.PodIP); err == nil {
			ips = append(ips, a.Unmap())
		}
	}
	return ips
}
