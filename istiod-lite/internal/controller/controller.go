// Package controller watches the Kubernetes API (core objects, Istio security
// policies, Gateway API Gateways) through shared informers, recomputes the mesh
// state with model.Compute after a short debounce, hands each resource type to
// the xDS server, and writes the ztunnel status conditions back on
// AuthorizationPolicies.
package controller

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	istioinformers "istio.io/client-go/pkg/informers/externalversions"
	securitylisters "istio.io/client-go/pkg/listers/security/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	discoverylisters "k8s.io/client-go/listers/discovery/v1"
	"k8s.io/client-go/tools/cache"
	gatewayclient "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned"
	gatewayinformers "sigs.k8s.io/gateway-api/pkg/client/informers/externalversions"
	gatewaylisters "sigs.k8s.io/gateway-api/pkg/client/listers/apis/v1"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/model"
)

// Defaults for Options.
const (
	DefaultDebounce = 10 * time.Millisecond
	DefaultMaxDelay = 100 * time.Millisecond
)

// gatewayGroupVersion is where the Gateway API serves Gateways.
const gatewayGroupVersion = "gateway.networking.k8s.io/v1"

// Options tune a Controller. The zero value is usable.
type Options struct {
	// Debounce is how long to wait after the last event before recomputing.
	Debounce time.Duration
	// MaxDelay bounds how long continuous churn can postpone a recompute.
	MaxDelay time.Duration
	// Metrics, when set, receives the controller's metrics.
	Metrics prometheus.Registerer
	// Log defaults to slog.Default().
	Log *slog.Logger
	// DisableStatus stops the controller from writing AuthorizationPolicy status.
	DisableStatus bool
}

// Controller keeps the computed mesh state in step with the cluster.
type Controller struct {
	client  kubernetes.Interface
	istio   istioclient.Interface
	gw      gatewayclient.Interface
	cluster model.Cluster
	push    func(typeURL string, resources map[string]proto.Message)
	opts    Options
	log     *slog.Logger

	kubeFactory  informers.SharedInformerFactory
	istioFactory istioinformers.SharedInformerFactory
	gwFactory    gatewayinformers.SharedInformerFactory // nil when the Gateway CRD is absent

	namespaces corelisters.NamespaceLister
	pods       corelisters.PodLister
	services   corelisters.ServiceLister
	nodes      corelisters.NodeLister
	slices     discoverylisters.EndpointSliceLister
	authz      securitylisters.AuthorizationPolicyLister
	peerAuthns securitylisters.PeerAuthenticationLister
	gateways   gatewaylisters.GatewayLister // nil when the Gateway CRD is absent

	// dirty has room for one signal: events coalesce while one is pending.
	dirty    chan struct{}
	ready    atomic.Bool
	snapshot atomic.Pointer[model.Resources]

	recomputeSeconds prometheus.Histogram
	resources        *prometheus.GaugeVec
	statusWrites     *prometheus.CounterVec

	closeOnce sync.Once
	closed    chan struct{}
}

// New builds a Controller; nothing runs until Run. gw may be nil to run
// without Gateways.
func New(client kubernetes.Interface, istio istioclient.Interface, gw gatewayclient.Interface, cluster model.Cluster,
	push func(typeURL string, resources map[string]proto.Message), opts Options,
) *Controller {
	if opts.Debounce <= 0 {
		opts.Debounce = DefaultDebounce
	}
	if opts.MaxDelay < opts.Debounce {
		opts.MaxDelay = max(DefaultMaxDelay, opts.Debounce)
	}
	if opts.Log == nil {
		opts.Log = slog.Default()
	}
	c := &Controller{
		client: client, istio: istio, gw: gw, cluster: cluster, push: push, opts: opts,
		log:    opts.Log.With("component", "controller"),
		dirty:  make(chan struct{}, 1),
		closed: make(chan struct{}),
		recomputeSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "istiod_lite_recompute_duration_seconds",
			Help:    "Time to recompute the mesh state from the informer caches.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		resources: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "istiod_lite_resources",
			Help: "Computed resources by type (workload, service, authorization).",
		}, []string{"type"}),
		statusWrites: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "istiod_lite_policy_status_writes_total",
			Help: "AuthorizationPolicy status updates by outcome.",
		}, []string{"outcome"}),
	}
	if opts.Metrics != nil {
		for _, col := range []prometheus.Collector{c.recomputeSeconds, c.resources, c.statusWrites} {
			if err := opts.Metrics.Register(col); err != nil && !errors.As(err, new(prometheus.AlreadyRegisteredError)) {
				c.log.Warn("registering metric", "err", err)
			}
		}
	}
	strip := func(obj any) (any, error) {
		// Managed fields are never read here and are a large share of each object.
		if acc, err := meta.Accessor(obj); err == nil {
			acc.SetManagedFields(nil)
		}
		return obj, nil
	}
	c.kubeFactory = informers.NewSharedInformerFactoryWithOptions(client, 0, informers.WithTransform(strip))
	c.istioFactory = istioinformers.NewSharedInformerFactoryWithOptions(istio, 0, istioinformers.WithTransform(strip))
	c.namespaces = watch(c, c.kubeFactory.Core().V1().Namespaces().Informer(), c.kubeFactory.Core().V1().Namespaces().Lister())
	c.pods = watch(c, c.kubeFactory.Core().V1().Pods().Informer(), c.kubeFactory.Core().V1().Pods().Lister())
	c.services = watch(c, c.kubeFactory.Core().V1().Services().Informer(), c.kubeFactory.Core().V1().Services().Lister())
	c.nodes = watch(c, c.kubeFactory.Core().V1().Nodes().Informer(), c.kubeFactory.Core().V1().Nodes().Lister())
	c.slices = watch(c, c.kubeFactory.Discovery().V1().EndpointSlices().Informer(), c.kubeFactory.Discovery().V1().EndpointSlices().Lister())
	sec := c.istioFactory.Security().V1()
	c.authz = watch(c, sec.AuthorizationPolicies().Informer(), sec.AuthorizationPolicies().Lister())
	c.peerAuthns = watch(c, sec.PeerAuthentications().Informer(), sec.PeerAuthentications().Lister())
	if gw != nil {
		c.gwFactory = gatewayinformers.NewSharedInformerFactoryWithOptions(gw, 0, gatewayinformers.WithTransform(strip))
	}
	return c
}

// watch registers the dirty-marking handler on an informer and returns its lister.
func watch[L any](c *Controller, inf cache.SharedIndexInformer, lister L) L {
	_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: func(any) { c.markDirty() },
		UpdateFunc: func(oldObj, newObj any) {
			o, err1 := meta.Accessor(oldObj)
			n, err2 := meta.Accessor(newObj)
			if err1 == nil && err2 == nil && o.GetResourceVersion() == n.GetResourceVersion() {
				return // a resync, nothing changed
			}
			c.markDirty()
		},
		DeleteFunc: func(any) { c.markDirty() },
	})
	return lister
}

func (c *Controller) markDirty() {
	select {
	case c.dirty <- struct{}{}:
	default:
	}
}

// Ready reports whether every informer has synced and the first push is done.
func (c *Controller) Ready() bool { return c.ready.Load() }

// Snapshot returns the last computed state (empty before the first push).
// Callers must not modify it.
func (c *Controller) Snapshot() model.Resources {
	if r := c.snapshot.Load(); r != nil {
		return *r
	}
	return model.Resources{}
}

// Close stops Run; safe to call more than once.
func (c *Controller) Close() { c.closeOnce.Do(func() { close(c.closed) }) }

// Run starts the informers, waits for them to sync, pushes the initial
// state, then recomputes after every burst of changes until ctx ends or
// Close is called. Cancellation is a clean exit (nil).
func (c *Controller) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-c.closed:
			cancel()
		case <-ctx.Done():
		}
	}()
	if c.gwFactory != nil {
		if ok, err := c.gatewayAPIServed(); !ok {
			c.log.Info("Gateway API not served; running without waypoints", "groupVersion", gatewayGroupVersion, "err", err)
			c.gwFactory = nil
		} else {
			inf := c.gwFactory.Gateway().V1().Gateways()
			c.gateways = watch(c, inf.Informer(), inf.Lister())
		}
	}
	c.kubeFactory.Start(ctx.Done())
	c.istioFactory.Start(ctx.Done())
	if c.gwFactory != nil {
		c.gwFactory.Start(ctx.Done())
	}
	defer c.kubeFactory.Shutdown()
	defer c.istioFactory.Shutdown()
	if c.gwFactory != nil {
		defer c.gwFactory.Shutdown()
	}
	if err := c.waitForSync(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	// Drain the events of the initial listing: the first recompute sees them all.
	select {
	case <-c.dirty:
	default:
	}
	c.recompute(ctx)
	c.ready.Store(true)
	c.log.Info("initial state pushed")
	return c.loop(ctx)
}

func (c *Controller) waitForSync(ctx context.Context) error {
	for typ, ok := range c.kubeFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("syncing %v informer: %w", typ, context.Cause(ctx))
		}
	}
	for typ, ok := range c.istioFactory.WaitForCacheSync(ctx.Done()) {
		if !ok {
			return fmt.Errorf("syncing %v informer: %w", typ, context.Cause(ctx))
		}
	}
	if c.gwFactory != nil {
		for typ, ok := range c.gwFactory.WaitForCacheSync(ctx.Done()) {
			if !ok {
				return fmt.Errorf("syncing %v informer: %w", typ, context.Cause(ctx))
			}
		}
	}
	return nil
}

// gatewayAPIServed asks discovery whether Gateways are served, so a cluster
// without the Gateway API CRDs does not leave an informer failing forever.
func (c *Controller) gatewayAPIServed() (bool, error) {
	res, err := c.gw.Discovery().ServerResourcesForGroupVersion(gatewayGroupVersion)
	if err != nil {
		return false, fmt.Errorf("discovering %s: %w", gatewayGroupVersion, err)
	}
	for _, r := range res.APIResources {
		if r.Name == "gateways" {
			return true, nil
		}
	}
	return false, nil
}

// loop recomputes Debounce after the last event, or MaxDelay after the
// first event of a burst that never pauses, whichever comes first.
func (c *Controller) loop(ctx context.Context) error {
	timer := time.NewTimer(time.Hour)
	timer.Stop()
	var first time.Time // first event of the pending burst; zero when none
	for {
		select {
		case <-ctx.Done():
			timer.Stop()
			return nil
		case <-c.dirty:
			now := time.Now()
			if first.IsZero() {
				first = now
			}
			deadline := now.Add(c.opts.Debounce)
			if limit := first.Add(c.opts.MaxDelay); deadline.After(limit) {
				deadline = limit
			}
			timer.Reset(time.Until(deadline))
		case <-timer.C:
			first = time.Time{}
			c.recompute(ctx)
		}
	}
}

func (c *Controller) inputs() (model.Inputs, error) {
	var in model.Inputs
	var errs []error
	var err error
	all := labels.Everything()
	in.Namespaces, err = c.namespaces.List(all)
	errs = append(errs, err)
	in.Pods, err = c.pods.List(all)
	errs = append(errs, err)
	in.Services, err = c.services.List(all)
	errs = append(errs, err)
	in.EndpointSlices, err = c.slices.List(all)
	errs = append(errs, err)
	in.Nodes, err = c.nodes.List(all)
	errs = append(errs, err)
	in.AuthorizationPolicies, err = c.authz.List(all)
	errs = append(errs, err)
	in.PeerAuthentications, err = c.peerAuthns.List(all)
	errs = append(errs, err)
	if c.gateways != nil {
		in.Gateways, err = c.gateways.List(all)
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return in, fmt.Errorf("listing from informer caches: %w", err)
	}
	return in, nil
}

func (c *Controller) recompute(ctx context.Context) {
	start := time.Now()
	in, err := c.inputs()
	if err != nil {
		// Listers read local caches and do not fail in practice; keep serving the old state.
		c.log.Error("recompute skipped", "err", err)
		return
	}
	res := model.Compute(c.cluster, in)
	c.recomputeSeconds.Observe(time.Since(start).Seconds())
	c.snapshot.Store(&res)

	addrs := make(map[string]proto.Message, len(res.Addresses))
	var workloads, services float64
	for k, v := range res.Addresses {
		addrs[k] = v
		if v.GetWorkload() != nil {
			workloads++
		} else {
			services++
		}
	}
	authz := make(map[string]proto.Message, len(res.Authorizations))
	for k, v := range res.Authorizations {
		authz[k] = v
	}
	c.resources.WithLabelValues("workload").Set(workloads)
	c.resources.WithLabelValues("service").Set(services)
	c.resources.WithLabelValues("authorization").Set(float64(len(authz)))
	c.push(workloadapi.AddressTypeURL, addrs)
	c.push(security.AuthorizationTypeURL, authz)
	c.log.Debug("pushed", "workloads", workloads, "services", services, "authorizations", len(authz), "took", time.Since(start))

	if !c.opts.DisableStatus {
		c.writeStatus(ctx, res)
	}
}

// isRetryable reports errors after which the next event will bring a fresh
// object (Conflict) or no object at all (NotFound).
func isRetryable(err error) bool {
	return apierrors.IsConflict(err) || apierrors.IsNotFound(err)
}

// PodLister reads pods from the controller's informer cache (filled once Run
// has synced), so other parts (the CA's node checks) need no watch of their own.
func (c *Controller) PodLister() corelisters.PodLister { return c.pods }
