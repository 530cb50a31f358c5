// Package nodelet is the local cluster's stand-in kubelet. One nodelet runs
// per node, inside the node's network namespace. It registers the Node and
// keeps its lease, and runs the pods bound to the node: each in a network
// namespace the node's CNI chain sets up, each container as a local process
// picked by image name, with volumes, environment, probes, restarts, events
// and pod status as a kubelet would provide them.
package nodelet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/record"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/images"
	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/volume"
)

// Component is the event source nodelet records events as.
const Component = "nodelet"

// KubeletVersion is the version nodelet reports in the Node's nodeInfo: the
// version of the control plane it is tested against.
const KubeletVersion = "v1.36.3"

// Timing of the node's heartbeats and of the pod workers' periodic work.
const (
	leaseDuration        = 40 * time.Second
	leaseRenewInterval   = 10 * time.Second
	nodeStatusInterval   = time.Minute
	podResyncInterval    = 10 * time.Second
	volumeRefreshPeriod  = 10 * time.Second
	maxCrashBackoff      = 5 * time.Minute
	backoffResetAfterRun = 10 * time.Minute
	// shutdownGrace is how long a container gets after SIGTERM when nodelet
	// itself stops; the launcher gives nodelet 20 s in all.
	shutdownGrace = 5 * time.Second
	// shutdownTimeout bounds the whole shutdown.
	shutdownTimeout = 15 * time.Second
)

// Config is what nodelet needs to run a node.
type Config struct {
	NodeName string
	NodeIP   string
	// PodCIDRs are the node's pod ranges, primary first.
	PodCIDRs []string
	// Root is the node's root dir: pod netns mounts, pod dirs, logs, libcni's
	// cache and hostPath volumes live under it.
	Root       string
	CNIConfDir string
	CNIBinDir  string
	// BinDir is searched first for image entrypoints.
	BinDir string
	Images *images.Table
	// Port is the kubelet API port, reported in the Node's daemonEndpoints.
	Port                  int32
	KubernetesServiceHost string
	KubernetesServicePort string
	// CrashBackoff is the first restart back-off; it doubles per restart up
	// to 5 minutes.
	CrashBackoff time.Duration
	MaxPods      int
	Client       kubernetes.Interface
	// Logf logs nodelet's own messages; nil uses the standard logger.
	Logf func(format string, args ...any)
}

// Nodelet runs one node. Build it with New, run it with Run.
type Nodelet struct {
	cfg      Config
	client   kubernetes.Interface
	logf     func(format string, args ...any)
	volumes  *volume.Manager
	network  *network
	records  pidRecords
	netnsDir string
	podsDir  string
	logsDir  string

	broadcaster record.EventBroadcaster
	recorder    record.EventRecorder

	// sharedNetnsDir is set when Run made the netns dir a mount point.
	sharedNetnsDir bool

	mu sync.Mutex
	// workers and byName are guarded by mu. byName maps "ns/name" to the
	// UID of the newest pod of that name.
	workers map[types.UID]*podWorker
	byName  map[string]types.UID
	wg      sync.WaitGroup // running pod workers

	closeOnce sync.Once
}

// New checks cfg and builds a Nodelet; it changes nothing on the node.
func New(cfg Config) (*Nodelet, error) {
	var errs []error
	if cfg.NodeName == "" {
		errs = append(errs, errors.New("no node name"))
	}
	if net.ParseIP(cfg.NodeIP) == nil {
		errs = append(errs, fmt.Errorf("node ip %q is not an IP address", cfg.NodeIP))
	}
	for _, c := range cfg.PodCIDRs {
		if _, _, err := net.ParseCIDR(c); err != nil {
			errs = append(errs, fmt.Errorf("pod cidr: %w", err))
		}
	}
	if cfg.Root == "" || !filepath.IsAbs(cfg.Root) {
		errs = append(errs, fmt.Errorf("root %q is not an absolute path", cfg.Root))
	}
	if cfg.Client == nil {
		errs = append(errs, errors.New("no API client"))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("nodelet config: %w", err)
	}
	if cfg.CNIConfDir == "" {
		cfg.CNIConfDir = filepath.Join(cfg.Root, "etc/cni/net.d")
	}
	if cfg.CNIBinDir == "" {
		cfg.CNIBinDir = filepath.Join(cfg.Root, "opt/cni/bin")
	}
	if cfg.CrashBackoff <= 0 {
		cfg.CrashBackoff = 10 * time.Second
	}
	if cfg.MaxPods <= 0 {
		cfg.MaxPods = 110
	}
	if cfg.Port == 0 {
		cfg.Port = 10250
	}
	logf := cfg.Logf
	if logf == nil {
		logf = log.Printf
	}
	n := &Nodelet{
		cfg:      cfg,
		client:   cfg.Client,
		logf:     logf,
		netnsDir: filepath.Join(cfg.Root, "var/run/netns"),
		podsDir:  filepath.Join(cfg.Root, "var/lib/kubelet/pods"),
		logsDir:  filepath.Join(cfg.Root, "var/log/pods"),
		records:  pidRecords{dir: filepath.Join(cfg.Root, "var/lib/nodelet/pids")},
		workers:  map[types.UID]*podWorker{},
		byName:   map[string]types.UID{},
	}
	n.volumes = &volume.Manager{Client: cfg.Client, NodeRoot: cfg.Root, PodsDir: n.podsDir}
	helper := filepath.Join(cfg.BinDir, "nsexec")
	if _, err := os.Stat(helper); err != nil {
		helper = "/proc/self/exe"
	}
	n.network = newNetwork(cfg.CNIConfDir, cfg.CNIBinDir, filepath.Join(cfg.Root, "var/lib/cni"), helper, n.volumes.NodeRunMounts)
	return n, nil
}

// Run registers the node and runs its pods until ctx is cancelled, then stops
// every pod (bounded in time) and returns. A cancelled ctx is a clean exit.
func (n *Nodelet) Run(ctx context.Context) error {
	for _, d := range []string{n.podsDir, n.logsDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("creating %s: %w", d, err)
		}
	}
	n.cleanLeftovers(ctx)
	if err := shareDir(n.netnsDir); err != nil {
		return err
	}
	n.sharedNetnsDir = true

	n.broadcaster = record.NewBroadcaster(record.WithContext(ctx))
	n.broadcaster.StartRecordingToSink(&typedcorev1.EventSinkImpl{Interface: n.client.CoreV1().Events("")})
	n.recorder = n.broadcaster.NewRecorder(scheme.Scheme, corev1.EventSource{Component: Component, Host: n.cfg.NodeName})

	node, err := n.registerNode(ctx)
	if err != nil {
		n.Close()
		return ignoreCanceled(err)
	}
	n.logf("node %s registered", node.Name)

	var bg sync.WaitGroup
	bg.Go(func() { n.renewLease(ctx, node) })
	bg.Go(func() { n.heartbeat(ctx) })

	// Pod workers outlive ctx by their shutdown; they get their own context
	// so that cancelling ctx starts, rather than aborts, their cleanup.
	workCtx, stopWork := context.WithCancel(context.WithoutCancel(ctx))
	defer stopWork()
	factory := informers.NewSharedInformerFactoryWithOptions(n.client, 0,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = "spec.nodeName=" + n.cfg.NodeName
		}))
	podInformer := factory.Core().V1().Pods().Informer()
	if _, err := podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    func(obj any) { n.podChanged(workCtx, obj) },
		UpdateFunc: func(_, obj any) { n.podChanged(workCtx, obj) },
		DeleteFunc: func(obj any) { n.podGone(obj) },
	}); err != nil {
		return fmt.Errorf("watching pods: %w", err)
	}
	factory.Start(ctx.Done())
	if cache.WaitForCacheSync(ctx.Done(), podInformer.HasSynced) {
		n.removeOrphans(podInformer.GetStore())
	}

	<-ctx.Done()
	n.logf("stopping: shutting down pods")
	factory.Shutdown()
	stopWork()
	n.waitWorkers(shutdownTimeout)
	bg.Wait()
	n.Close()
	return nil
}

// Close releases what Run set up on the node that outlives the pods: the
// shared netns dir mount and the event broadcaster. Safe to call twice.
func (n *Nodelet) Close() error {
	var err error
	n.closeOnce.Do(func() {
		if n.broadcaster != nil {
			n.broadcaster.Shutdown()
		}
		if n.sharedNetnsDir {
			err = unshareDir(n.netnsDir)
		}
	})
	return err
}

func (n *Nodelet) waitWorkers(limit time.Duration) {
	done := make(chan struct{})
	go func() { n.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(limit):
		n.logf("pod shutdown did not finish within %s", limit)
	}
}

// podChanged hands the newest version of a pod to its worker, starting one
// for a pod not seen before.
func (n *Nodelet) podChanged(ctx context.Context, obj any) {
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName != n.cfg.NodeName {
		return
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	w := n.workers[pod.UID]
	if w == nil {
		if ctx.Err() != nil {
			return
		}
		w = newPodWorker(n, pod)
		n.workers[pod.UID] = w
		n.byName[pod.Namespace+"/"+pod.Name] = pod.UID
		n.wg.Go(func() {
			w.run(ctx)
			n.mu.Lock()
			delete(n.workers, w.uid)
			if n.byName[w.key] == w.uid {
				delete(n.byName, w.key)
			}
			n.mu.Unlock()
		})
		return
	}
	w.update(pod, false)
}

// podGone tells a pod's worker that the pod object is gone from the API.
func (n *Nodelet) podGone(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok {
		return
	}
	n.mu.Lock()
	w := n.workers[pod.UID]
	n.mu.Unlock()
	if w != nil {
		w.update(pod, true)
		return
	}
	// No worker (it finished after its own delete): only the logs are left.
	os.RemoveAll(n.podLogsDir(pod.Namespace, pod.Name, string(pod.UID)))
}

// worker returns the worker of the newest pod named namespace/name.
func (n *Nodelet) worker(namespace, name string) *podWorker {
	n.mu.Lock()
	defer n.mu.Unlock()
	uid, ok := n.byName[namespace+"/"+name]
	if !ok {
		return nil
	}
	return n.workers[uid]
}

func (n *Nodelet) podLogsDir(namespace, name, uid string) string {
	return filepath.Join(n.logsDir, namespace+"_"+name+"_"+uid)
}

func (n *Nodelet) podDir(uid types.UID) string {
	return filepath.Join(n.podsDir, string(uid))
}

func (n *Nodelet) netnsPath(uid types.UID) string {
	return filepath.Join(n.netnsDir, string(uid))
}

// removeOrphans removes pod dirs and log dirs of pods that no longer exist,
// left by an earlier run.
func (n *Nodelet) removeOrphans(store cache.Store) {
	live := map[string]bool{}
	for _, obj := range store.List() {
		if pod, ok := obj.(*corev1.Pod); ok {
			live[string(pod.UID)] = true
		}
	}
	entries, _ := os.ReadDir(n.podsDir)
	for _, e := range entries {
		if live[e.Name()] {
			continue
		}
		if err := n.volumes.Teardown(types.UID(e.Name())); err != nil {
			n.logf("tearing down volumes of gone pod %s: %v", e.Name(), err)
		}
		os.RemoveAll(filepath.Join(n.podsDir, e.Name()))
	}
	entries, _ = os.ReadDir(n.logsDir)
	for _, e := range entries {
		parts := strings.Split(e.Name(), "_")
		if len(parts) == 3 && !live[parts[2]] {
			os.RemoveAll(filepath.Join(n.logsDir, e.Name()))
		}
	}
}

// cleanLeftovers undoes what a previous nodelet run on this node left: it
// kills recorded container processes and detaches and removes every pod
// netns, so pods start from scratch.
func (n *Nodelet) cleanLeftovers(ctx context.Context) {
	if k, err := n.records.killLeftovers(); err != nil {
		n.logf("cleaning leftovers: %v", err)
	} else if k > 0 {
		n.logf("killed %d container processes left by an earlier run", k)
	}
	entries, _ := os.ReadDir(n.netnsDir)
	for _, e := range entries {
		path := filepath.Join(n.netnsDir, e.Name())
		ref := n.sandboxRecords().get(e.Name())
		dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		if err := n.network.del(dctx, ref, path); err != nil {
			n.logf("cni del of leftover netns %s: %v", e.Name(), err)
		}
		cancel()
		if err := removeNetNS(path); err != nil {
			n.logf("cleaning leftovers: %v", err)
		}
		n.sandboxRecords().remove(e.Name())
	}
}

// sandboxRecords remembers which pod each netns belongs to, for the CNI DEL
// of a namespace a crashed nodelet left behind.
func (n *Nodelet) sandboxRecords() sandboxRecords {
	return sandboxRecords{dir: filepath.Join(n.cfg.Root, "var/lib/nodelet/sandboxes")}
}

type sandboxRecords struct{ dir string }

func (r sandboxRecords) add(p podRef) error {
	raw, err := json.Marshal(p)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return fmt.Errorf("creating sandbox record dir: %w", err)
	}
	return os.WriteFile(filepath.Join(r.dir, p.UID+".json"), raw, 0o644)
}

// get returns the pod a sandbox belongs to; without a record only the UID,
// the CNI container ID, is known.
func (r sandboxRecords) get(uid string) podRef {
	ref := podRef{UID: uid}
	if raw, err := os.ReadFile(filepath.Join(r.dir, uid+".json")); err == nil {
		json.Unmarshal(raw, &ref)
	}
	ref.UID = uid
	return ref
}

func (r sandboxRecords) remove(uid string) {
	os.Remove(filepath.Join(r.dir, uid+".json"))
}

func ignoreCanceled(err error) error {
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}
