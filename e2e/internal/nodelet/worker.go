package nodelet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apiequality "k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/retry"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/images"
	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/podenv"
	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/probe"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// Retry pacing for a pod's sandbox, its volumes and container start attempts
// that failed before a process ran.
const (
	sandboxRetryBase = 2 * time.Second
	sandboxRetryMax  = 30 * time.Second
	mountRetryBase   = time.Second
	mountRetryMax    = 30 * time.Second
	startRetryBase   = time.Second
	startRetryMax    = 20 * time.Second
	// warningRepeat is how often the same warning event is recorded again
	// while a problem lasts (the API server's event spam filter would
	// otherwise swallow the pod's later events).
	warningRepeat = time.Minute
	// cniTimeout bounds one CNI ADD or DEL.
	cniTimeout = 2 * time.Minute
)

// containerPath is the PATH a container gets when its pod sets none, as an
// image's default.
const containerPath = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// retryState paces retries with a doubling delay.
type retryState struct {
	delay time.Duration
	next  time.Time
}

// wait returns how long until the next attempt is due (0: now).
func (r *retryState) wait(now time.Time) time.Duration {
	if now.Before(r.next) {
		return r.next.Sub(now)
	}
	return 0
}

// fail records a failed attempt and returns the delay before the next.
func (r *retryState) fail(now time.Time, base, max time.Duration) time.Duration {
	if r.delay == 0 {
		r.delay = base
	} else {
		r.delay = min(2*r.delay, max)
	}
	r.next = now.Add(r.delay)
	return r.delay
}

func (r *retryState) reset() { *r = retryState{} }

// nextCrashBackoff returns the delay before restarting a container that just
// exited and the back-off to use after that: the first restart is immediate,
// then base, doubling up to max, as the kubelet does; a container that ran
// for resetAfter starts over.
func nextCrashBackoff(cur, ran, base, max, resetAfter time.Duration) (delay, after time.Duration) {
	if ran >= resetAfter {
		cur = 0
	}
	if cur == 0 {
		return 0, base
	}
	return cur, min(2*cur, max)
}

// container is nodelet's record of one container of a pod.
type container struct {
	name   string
	isInit bool

	// Guarded by the worker's mu.
	proc         *process
	state        corev1.ContainerState
	lastState    corev1.ContainerState
	restartCount int32
	containerID  string
	imageID      string
	ready        bool // readiness (probe, or started when there is none)
	started      bool // startup probe passed, or running without one
	everRan      bool // a process of this container has run
	exitHandled  bool // the current Terminated state has been acted on
	completed    bool // an init container that succeeded
	unhealthy    string
	killing      bool
	stopProbes   context.CancelFunc

	// Owned by the worker goroutine.
	backoff        time.Duration
	restartPending bool
	nextStart      time.Time
	startRetry     retryState
	lastStartErr   string
}

// podWorker runs one pod. Its run goroutine owns the pod's lifecycle; other
// goroutines (the informer, container waiters, probes, the kubelet API) only
// hand it news through update/poke or read fields under mu.
type podWorker struct {
	n    *Nodelet
	uid  types.UID
	key  string // namespace/name
	ref  podRef
	kick chan struct{}

	podMu sync.Mutex
	pod   *corev1.Pod // newest version; guarded by podMu
	gone  bool        // the pod object is gone from the API; guarded by podMu

	mu           sync.Mutex
	hostNetwork  bool                  // guarded by mu
	netns        string                // pod netns path; guarded by mu
	podIPs       []string              // guarded by mu
	sandboxReady bool                  // guarded by mu
	containers   map[string]*container // guarded by mu

	// Owned by the run goroutine.
	startTime    *metav1.Time
	sandboxRetry retryState
	mountRetry   retryState
	volumesReady bool
	lastRefresh  time.Time
	finished     bool // terminal: containers stopped, sandbox torn down
	deleted      bool // our delete of the pod object went through
	lastWritten  *corev1.PodStatus
	warned       map[string]time.Time // reason+message -> last recorded
}

func newPodWorker(n *Nodelet, pod *corev1.Pod) *podWorker {
	w := &podWorker{
		n:           n,
		uid:         pod.UID,
		key:         pod.Namespace + "/" + pod.Name,
		ref:         podRef{Namespace: pod.Namespace, Name: pod.Name, UID: string(pod.UID)},
		kick:        make(chan struct{}, 1),
		pod:         pod,
		hostNetwork: pod.Spec.HostNetwork,
		containers:  map[string]*container{},
		warned:      map[string]time.Time{},
	}
	// A pod that already ended (seen again after a nodelet restart) is not
	// run again.
	w.finished = isTerminal(pod.Status.Phase)
	return w
}

// update hands the worker a newer version of its pod.
func (w *podWorker) update(pod *corev1.Pod, gone bool) {
	w.podMu.Lock()
	w.pod = pod
	w.gone = w.gone || gone
	w.podMu.Unlock()
	w.poke()
}

func (w *podWorker) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

func (w *podWorker) latest() (*corev1.Pod, bool) {
	w.podMu.Lock()
	defer w.podMu.Unlock()
	return w.pod, w.gone
}

func (w *podWorker) run(ctx context.Context) {
	timer := time.NewTimer(0)
	defer timer.Stop()
	for {
		select {
		case <-ctx.Done():
			w.shutdown()
			return
		case <-w.kick:
		case <-timer.C:
		}
		pod, gone := w.latest()
		next, done := w.sync(ctx, pod, gone)
		if done {
			return
		}
		timer.Reset(max(next, 100*time.Millisecond))
	}
}

// sync moves the pod one step toward what its spec and deletion state ask
// for and returns when it wants to look again.
func (w *podWorker) sync(ctx context.Context, pod *corev1.Pod, gone bool) (time.Duration, bool) {
	if gone {
		// Force-deleted, or our own delete went through.
		if w.anyRunning() {
			w.logf("pod is gone from the API; killing its containers")
		}
		w.stopAll(pod, 0, false)
		w.teardown(ctx, pod)
		os.RemoveAll(w.n.podLogsDir(pod.Namespace, pod.Name, string(pod.UID)))
		return 0, true
	}
	if pod.DeletionTimestamp != nil {
		return w.terminate(ctx, pod), false
	}
	if w.finished {
		return podResyncInterval, false
	}
	now := time.Now()
	if w.startTime == nil {
		t := metav1.NewTime(now.Truncate(time.Second))
		w.startTime = &t
	}

	if !w.hasSandbox() {
		if d := w.sandboxRetry.wait(now); d > 0 {
			return d, false
		}
		if err := w.setupSandbox(ctx, pod); err != nil {
			w.warn(pod, "FailedCreatePodSandBox", "Failed to create pod sandbox: %v", err)
			d := w.sandboxRetry.fail(now, sandboxRetryBase, sandboxRetryMax)
			w.writeStatus(ctx, pod)
			return d, false
		}
		w.sandboxRetry.reset()
	}

	if !w.volumesReady {
		if d := w.mountRetry.wait(now); d > 0 {
			return d, false
		}
		if err := w.setupVolumes(ctx, pod); err != nil {
			w.warn(pod, "FailedMount", "MountVolume.SetUp failed: %v", err)
			d := w.mountRetry.fail(now, mountRetryBase, mountRetryMax)
			w.writeStatus(ctx, pod)
			return d, false
		}
		w.mountRetry.reset()
		w.volumesReady = true
		w.lastRefresh = now
	} else if now.Sub(w.lastRefresh) >= volumeRefreshPeriod {
		if err := w.n.volumes.Refresh(ctx, pod); err != nil && ctx.Err() == nil {
			w.warn(pod, "FailedMount", "MountVolume.SetUp failed: %v", err)
		}
		w.lastRefresh = now
	}

	w.killUnhealthy(pod)

	next := podResyncInterval
	initDone := true
	for i := range pod.Spec.InitContainers {
		spec := &pod.Spec.InitContainers[i]
		c := w.container(spec.Name, true)
		if !isSidecar(spec) && w.completed(c) {
			continue
		}
		next = min(next, w.ensureContainer(ctx, pod, spec, c))
		if isSidecar(spec) && w.isStarted(c) || !isSidecar(spec) && w.completed(c) {
			continue
		}
		initDone = false
		break
	}
	if initDone {
		for i := range pod.Spec.Containers {
			spec := &pod.Spec.Containers[i]
			next = min(next, w.ensureContainer(ctx, pod, spec, w.container(spec.Name, false)))
		}
	}

	st := w.writeStatus(ctx, pod)
	if isTerminal(st.Phase) {
		w.logf("pod %s", strings.ToLower(string(st.Phase)))
		w.stopAll(pod, gracePeriod(pod, nil), true)
		w.teardownSandbox(ctx)
		w.writeStatus(ctx, pod)
		w.finished = true
	}
	return next, false
}

// terminate runs a graceful deletion: stop the containers within the grace
// period, write their final status, tear the sandbox and volumes down, and
// delete the pod object for good.
func (w *podWorker) terminate(ctx context.Context, pod *corev1.Pod) time.Duration {
	if w.deleted {
		return podResyncInterval
	}
	w.stopAll(pod, gracePeriod(pod, pod.DeletionGracePeriodSeconds), true)
	if !w.finished && w.startTime != nil {
		w.writeStatusPhase(ctx, pod, func(in statusInput) corev1.PodPhase { return deletedPhase(in.Regular) })
	}
	w.teardown(ctx, pod)
	w.finished = true
	zero := int64(0)
	err := w.n.client.CoreV1().Pods(pod.Namespace).Delete(ctx, pod.Name, metav1.DeleteOptions{
		GracePeriodSeconds: &zero,
		Preconditions:      &metav1.Preconditions{UID: &pod.UID},
	})
	switch {
	case err == nil, apierrors.IsNotFound(err), apierrors.IsConflict(err):
		w.deleted = true
		return podResyncInterval
	default:
		if ctx.Err() == nil {
			w.logf("deleting pod: %v", err)
		}
		return 2 * time.Second
	}
}

// shutdown stops the pod because nodelet stops: containers, then the network.
// The pod object and its volumes stay; the next nodelet starts it again.
func (w *podWorker) shutdown() {
	pod, _ := w.latest()
	w.stopAll(pod, shutdownGrace, false)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	w.teardownSandbox(ctx)
}

// teardown removes everything the pod has on the node but its logs.
func (w *podWorker) teardown(ctx context.Context, pod *corev1.Pod) {
	w.teardownSandbox(ctx)
	if err := w.n.volumes.Teardown(w.uid); err != nil {
		w.logf("tearing down volumes: %v", err)
	}
	w.volumesReady = false
	if err := os.RemoveAll(w.n.podDir(w.uid)); err != nil {
		w.logf("removing pod dir: %v", err)
	}
}

func (w *podWorker) hasSandbox() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.sandboxReady
}

// setupSandbox gives the pod its network: the node's for host-network pods,
// otherwise a new netns set up by the CNI chain. On failure nothing is left.
func (w *podWorker) setupSandbox(ctx context.Context, pod *corev1.Pod) error {
	if pod.Spec.HostNetwork {
		w.mu.Lock()
		w.podIPs = []string{w.n.cfg.NodeIP}
		w.sandboxReady = true
		w.mu.Unlock()
		return nil
	}
	path := w.n.netnsPath(w.uid)
	// A namespace from an earlier failed attempt goes first.
	if err := removeNetNS(path); err != nil {
		return err
	}
	if err := createNetNS(path); err != nil {
		return fmt.Errorf("creating pod netns: %w", err)
	}
	records := w.n.sandboxRecords()
	if err := records.add(w.ref); err != nil {
		w.logf("recording sandbox: %v", err)
	}
	cctx, cancel := context.WithTimeout(ctx, cniTimeout)
	defer cancel()
	ips, err := w.n.network.add(cctx, w.ref, path)
	if err != nil {
		records.remove(string(w.uid))
		return errors.Join(err, removeNetNS(path))
	}
	w.mu.Lock()
	w.netns = path
	w.podIPs = ips
	w.sandboxReady = true
	w.mu.Unlock()
	w.logf("sandbox ready, ips %v", ips)
	return nil
}

// teardownSandbox runs CNI DEL and removes the netns; safe to repeat.
func (w *podWorker) teardownSandbox(ctx context.Context) {
	w.mu.Lock()
	path, host := w.netns, w.hostNetwork
	w.sandboxReady = false
	w.netns = ""
	w.mu.Unlock()
	if host {
		return
	}
	if path == "" {
		path = w.n.netnsPath(w.uid)
		if _, err := os.Stat(path); err != nil {
			return
		}
	}
	var err error
	for attempt := 0; attempt < 3; attempt++ {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cniTimeout)
		err = w.n.network.del(cctx, w.ref, path)
		cancel()
		if err == nil {
			break
		}
		time.Sleep(time.Second)
	}
	if err != nil {
		// The kubelet would retry forever; we give up so a pod can always be
		// deleted, and say so.
		w.logf("giving up on cni del: %v", err)
	}
	if err := removeNetNS(path); err != nil {
		w.logf("%v", err)
	}
	w.n.sandboxRecords().remove(string(w.uid))
}

func (w *podWorker) setupVolumes(ctx context.Context, pod *corev1.Pod) error {
	if err := os.MkdirAll(w.n.podDir(w.uid), 0o750); err != nil {
		return fmt.Errorf("creating pod dir: %w", err)
	}
	return w.n.volumes.Setup(ctx, pod)
}

// container returns the record of a container, making it on first use.
func (w *podWorker) container(name string, isInit bool) *container {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.containers[name]
	if c == nil {
		c = &container{name: name, isInit: isInit}
		w.containers[name] = c
	}
	return c
}

func (w *podWorker) completed(c *container) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return c.completed
}

func (w *podWorker) isStarted(c *container) bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	return c.started && c.proc != nil
}

func (w *podWorker) anyRunning() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.containers {
		if c.proc != nil {
			return true
		}
	}
	return false
}

// ensureContainer starts a container that should run and is not running:
// the first time, after a failed start attempt, or after an exit its restart
// policy restarts, once the back-off has passed. It returns when it wants to
// be called again.
func (w *podWorker) ensureContainer(ctx context.Context, pod *corev1.Pod, spec *corev1.Container, c *container) time.Duration {
	now := time.Now()
	w.mu.Lock()
	if c.proc != nil {
		w.mu.Unlock()
		return podResyncInterval
	}
	if c.everRan && c.state.Terminated != nil && !c.exitHandled {
		c.exitHandled = true
		t := c.state.Terminated
		if c.isInit && !isSidecar(spec) && t.ExitCode == 0 {
			c.completed = true
			c.ready = true
			w.mu.Unlock()
			return podResyncInterval
		}
		if !shouldRestart(pod.Spec.RestartPolicy, spec, c.isInit, t.ExitCode) {
			w.mu.Unlock()
			return podResyncInterval
		}
		var delay time.Duration
		delay, c.backoff = nextCrashBackoff(c.backoff, t.FinishedAt.Sub(t.StartedAt.Time),
			w.n.cfg.CrashBackoff, maxCrashBackoff, backoffResetAfterRun)
		c.restartPending = true
		c.nextStart = now.Add(delay)
		if delay > 0 {
			msg := fmt.Sprintf("back-off %s restarting failed container=%s pod=%s_%s(%s)",
				delay, c.name, pod.Name, pod.Namespace, pod.UID)
			c.lastState = c.state
			c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: reasonCrashLoopBackOff, Message: msg}}
			w.mu.Unlock()
			w.n.recorder.Eventf(pod, corev1.EventTypeWarning, "BackOff",
				"Back-off restarting failed container %s in pod %s_%s(%s)", c.name, pod.Name, pod.Namespace, pod.UID)
			return delay
		}
	}
	due := !c.everRan || c.restartPending
	w.mu.Unlock()
	if !due {
		return podResyncInterval
	}
	if now.Before(c.nextStart) {
		return c.nextStart.Sub(now)
	}
	if d := c.startRetry.wait(now); d > 0 {
		return d
	}
	if err := w.startContainer(ctx, pod, spec, c); err != nil {
		return c.startRetry.fail(now, startRetryBase, startRetryMax)
	}
	c.startRetry.reset()
	return podResyncInterval
}

// startError is a container start attempt that failed before a process ran;
// it leaves the container waiting with reason.
type startError struct {
	reason string
	err    error
}

func (e *startError) Error() string { return e.err.Error() }
func (e *startError) Unwrap() error { return e.err }

// startContainer starts one process for the container. A failure before the
// process exists leaves the container waiting with the reason; a failure to
// start the process counts as a run that exited with StartError.
func (w *podWorker) startContainer(ctx context.Context, pod *corev1.Pod, spec *corev1.Container, c *container) error {
	ps, entry, err := w.prepare(ctx, pod, spec, c)
	if err != nil {
		var se *startError
		if !errors.As(err, &se) {
			se = &startError{reason: reasonCreateContainerError, err: err}
		}
		w.mu.Lock()
		c.state = corev1.ContainerState{Waiting: &corev1.ContainerStateWaiting{Reason: se.reason, Message: se.err.Error()}}
		w.mu.Unlock()
		if c.lastStartErr != se.Error() {
			c.lastStartErr = se.Error()
			if se.reason == reasonErrImagePull {
				w.n.recorder.Eventf(pod, corev1.EventTypeWarning, "Failed", "Failed to pull image %q: %v", spec.Image, se.err)
			}
			w.n.recorder.Eventf(pod, corev1.EventTypeWarning, "Failed", "Error: %v", se.err)
		}
		return err
	}
	c.lastStartErr = ""

	w.mu.Lock()
	restarts := c.restartCount
	if c.everRan {
		restarts++
	}
	w.mu.Unlock()
	ps.LogPath = filepath.Join(w.n.podLogsDir(pod.Namespace, pod.Name, string(pod.UID)), c.name, strconv.Itoa(int(restarts))+".log")
	// The kubelet keeps the current and the previous log only.
	os.Remove(filepath.Join(filepath.Dir(ps.LogPath), strconv.Itoa(int(restarts)-2)+".log"))
	id := containerID(pod.UID, c.name, restarts)
	ps.Record = string(pod.UID) + " " + c.name

	w.n.recorder.Eventf(pod, corev1.EventTypeNormal, "Pulled", "Container image %q already present on machine", spec.Image)
	proc, err := startProcess(ps, w.n.records)
	now := metav1.NewTime(time.Now().Truncate(time.Second))

	w.mu.Lock()
	c.restartCount = restarts
	if c.state.Terminated != nil {
		c.lastState = c.state
	}
	c.everRan = true
	c.exitHandled = false
	c.restartPending = false
	c.containerID = "nodelet://" + id
	c.imageID = images.ImageID(spec.Image, entry)
	c.ready, c.started, c.unhealthy, c.killing = false, false, "", false
	if err != nil {
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode: 128, Reason: reasonStartError, Message: err.Error(),
			StartedAt: now, FinishedAt: now, ContainerID: c.containerID,
		}}
		w.mu.Unlock()
		w.n.recorder.Eventf(pod, corev1.EventTypeWarning, "Failed", "Error: %v", err)
		w.poke()
		return nil
	}
	c.proc = proc
	c.state = corev1.ContainerState{Running: &corev1.ContainerStateRunning{StartedAt: now}}
	probeCtx, stopProbes := context.WithCancel(context.WithoutCancel(ctx))
	c.stopProbes = stopProbes
	if spec.StartupProbe == nil {
		c.started = true
		if spec.ReadinessProbe == nil {
			c.ready = true
		}
	}
	w.mu.Unlock()

	w.n.recorder.Eventf(pod, corev1.EventTypeNormal, "Created", "Created container: %s", c.name)
	w.n.recorder.Eventf(pod, corev1.EventTypeNormal, "Started", "Started container %s", c.name)
	w.logf("container %s started (pid %d, restart %d)", c.name, proc.pid, restarts)

	go w.waitExit(c, proc, stopProbes)
	w.startProbes(probeCtx, pod, spec, c, proc, ps.Env)
	return nil
}

// prepare works out how to run a container: its program, environment and
// mounts. Errors are startErrors that say which waiting reason applies.
func (w *podWorker) prepare(ctx context.Context, pod *corev1.Pod, spec *corev1.Container, c *container) (processSpec, string, error) {
	entry, err := w.n.cfg.Images.Lookup(spec.Image)
	if err != nil {
		return processSpec{}, "", &startError{reasonErrImagePull, err}
	}
	w.mu.Lock()
	params := podenv.Params{
		PodIPs:                slices.Clone(w.podIPs),
		HostIPs:               []string{w.n.cfg.NodeIP},
		KubernetesServiceHost: w.n.cfg.KubernetesServiceHost,
		KubernetesServicePort: w.n.cfg.KubernetesServicePort,
	}
	netns := w.netns
	w.mu.Unlock()
	env, err := podenv.Resolve(ctx, w.n.client, pod, spec, params)
	if err != nil {
		return processSpec{}, "", &startError{reasonCreateContainerConfigError, fmt.Errorf("resolving env: %w", err)}
	}
	env = append(w.runtimeEnv(pod), env...)
	argv, err := entry.Command(spec.Command, spec.Args, w.n.cfg.BinDir, func(s []string) []string {
		return podenv.Expand(s, env)
	})
	if err != nil {
		return processSpec{}, "", &startError{reasonCreateContainerError, err}
	}
	mounts, err := w.n.volumes.Mounts(pod, spec)
	if err != nil {
		return processSpec{}, "", &startError{reasonCreateContainerConfigError, fmt.Errorf("preparing mounts: %w", err)}
	}
	dir := "/"
	if spec.WorkingDir != "" {
		if fi, err := os.Stat(spec.WorkingDir); err == nil && fi.IsDir() {
			dir = spec.WorkingDir
		} else {
			w.logf("container %s: working dir %s does not exist on the node; using /", spec.Name, spec.WorkingDir)
		}
	}
	return processSpec{
		NS: nsexec.Spec{
			NetNS:         netns,
			PrivateMounts: true,
			Mounts:        mounts,
			Capabilities:  capabilities(spec.SecurityContext),
			Hostname:      w.hostname(pod),
			Argv:          argv,
		},
		Env: env,
		Dir: dir,
	}, argv[0], nil
}

// runtimeEnv is what a container runtime puts in every container's
// environment before the pod's own variables (which override it).
func (w *podWorker) runtimeEnv(pod *corev1.Pod) []string {
	return []string{"PATH=" + containerPath, "HOSTNAME=" + w.hostname(pod), "HOME=/root"}
}

// hostname is the pod's host name: spec.hostname or the pod name, and the
// node's name for host-network pods.
func (w *podWorker) hostname(pod *corev1.Pod) string {
	switch {
	case pod.Spec.HostNetwork:
		return w.n.cfg.NodeName
	case pod.Spec.Hostname != "":
		return pod.Spec.Hostname
	}
	return pod.Name
}

// capabilities returns the capability bounding set for a container: nil
// (all) when privileged, else the runtime default plus add minus drop.
func capabilities(sc *corev1.SecurityContext) []string {
	if sc != nil && sc.Privileged != nil && *sc.Privileged {
		return nil
	}
	norm := func(c corev1.Capability) string {
		return strings.TrimPrefix(strings.ToUpper(string(c)), "CAP_")
	}
	set := map[string]bool{}
	for _, c := range nsexec.DefaultCapabilities {
		set[norm(corev1.Capability(c))] = true
	}
	if sc != nil && sc.Capabilities != nil {
		for _, c := range sc.Capabilities.Drop {
			if norm(c) == "ALL" {
				clear(set)
				continue
			}
			delete(set, norm(c))
		}
		for _, c := range sc.Capabilities.Add {
			if norm(c) == "ALL" {
				return nil
			}
			set[norm(c)] = true
		}
	}
	out := make([]string, 0, len(set))
	for c := range set {
		out = append(out, c)
	}
	slices.Sort(out)
	return out
}

// containerID is a runtime-style 64-hex-digit id, unique per container run.
func containerID(uid types.UID, name string, restart int32) string {
	sum := sha256.Sum256(fmt.Appendf(nil, "%s/%s/%d/%d", uid, name, restart, time.Now().UnixNano()))
	return hex.EncodeToString(sum[:])
}

// waitExit records a container process's exit and wakes the worker.
func (w *podWorker) waitExit(c *container, p *process, stopProbes context.CancelFunc) {
	<-p.done
	stopProbes()
	w.mu.Lock()
	if c.proc == p {
		c.proc = nil
		reason := reasonCompleted
		if p.exitCode != 0 {
			reason = reasonError
		}
		var started metav1.Time
		if c.state.Running != nil {
			started = c.state.Running.StartedAt
		}
		c.state = corev1.ContainerState{Terminated: &corev1.ContainerStateTerminated{
			ExitCode:    p.exitCode,
			Signal:      int32(p.signal),
			Reason:      reason,
			StartedAt:   started,
			FinishedAt:  metav1.NewTime(p.finishedAt.Truncate(time.Second)),
			ContainerID: c.containerID,
		}}
		c.ready = false
		c.started = false
	}
	w.mu.Unlock()
	w.logf("container %s exited with %d", c.name, p.exitCode)
	w.poke()
}

// startProbes runs the container's probes: startup first, then liveness and
// readiness once it has passed (or at once without a startup probe).
func (w *podWorker) startProbes(ctx context.Context, pod *corev1.Pod, spec *corev1.Container, c *container, p *process, env []string) {
	w.mu.Lock()
	target := probe.Target{ContainerPID: p.pid, Env: env}
	if len(w.podIPs) > 0 {
		target.PodIP = w.podIPs[0]
	}
	w.mu.Unlock()
	current := func() bool { return c.proc == p } // call with mu held
	var once sync.Once
	startRest := func() {
		once.Do(func() {
			if spec.LivenessProbe != nil {
				go probe.Watch(ctx, spec.LivenessProbe, probe.Liveness, target, spec.Ports, func(ok bool, msg string) {
					if ok {
						return
					}
					w.event(corev1.EventTypeWarning, "Unhealthy", "Liveness probe failed: %s", msg)
					w.mu.Lock()
					if current() {
						c.unhealthy = fmt.Sprintf("Container %s failed liveness probe, will be restarted", c.name)
					}
					w.mu.Unlock()
					w.poke()
				})
			}
			if spec.ReadinessProbe != nil {
				go probe.Watch(ctx, spec.ReadinessProbe, probe.Readiness, target, spec.Ports, func(ok bool, msg string) {
					if !ok {
						w.event(corev1.EventTypeWarning, "Unhealthy", "Readiness probe failed: %s", msg)
					}
					w.mu.Lock()
					if current() {
						c.ready = ok
					}
					w.mu.Unlock()
					w.poke()
				})
			}
		})
	}
	if spec.StartupProbe == nil {
		startRest()
		return
	}
	go probe.Watch(ctx, spec.StartupProbe, probe.Startup, target, spec.Ports, func(ok bool, msg string) {
		w.mu.Lock()
		if !current() {
			w.mu.Unlock()
			return
		}
		if ok {
			c.started = true
			if spec.ReadinessProbe == nil {
				c.ready = true
			}
		} else {
			c.unhealthy = fmt.Sprintf("Container %s failed startup probe, will be restarted", c.name)
		}
		w.mu.Unlock()
		if ok {
			startRest()
		} else {
			w.event(corev1.EventTypeWarning, "Unhealthy", "Startup probe failed: %s", msg)
		}
		w.poke()
	})
}

// killUnhealthy stops containers whose liveness or startup probe failed; the
// exit then goes through the restart policy like any other.
func (w *podWorker) killUnhealthy(pod *corev1.Pod) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for _, c := range w.containers {
		if c.proc == nil || c.unhealthy == "" || c.killing {
			continue
		}
		c.killing = true
		spec := findContainer(pod, c.name)
		var probeGrace *int64
		if spec != nil && spec.LivenessProbe != nil {
			probeGrace = spec.LivenessProbe.TerminationGracePeriodSeconds
		}
		w.n.recorder.Eventf(pod, corev1.EventTypeNormal, "Killing", "%s", c.unhealthy)
		go c.proc.stop(gracePeriod(pod, probeGrace))
	}
}

// stopAll stops every running container within grace, sidecars after the
// others as the kubelet does; with events it records Killing for each.
func (w *podWorker) stopAll(pod *corev1.Pod, grace time.Duration, events bool) {
	for _, sidecars := range []bool{false, true} {
		var procs []*process
		w.mu.Lock()
		for _, c := range w.containers {
			spec := findContainer(pod, c.name)
			isSide := c.isInit && spec != nil && isSidecar(spec)
			if c.proc == nil || isSide != sidecars {
				continue
			}
			procs = append(procs, c.proc)
			if events {
				w.n.recorder.Eventf(pod, corev1.EventTypeNormal, "Killing", "Stopping container %s", c.name)
			}
		}
		w.mu.Unlock()
		var wg sync.WaitGroup
		for _, p := range procs {
			wg.Go(func() { p.stop(grace) })
		}
		wg.Wait()
	}
	// Let the waiters record the exits before a final status is written.
	deadline := time.Now().Add(2 * time.Second)
	for w.anyRunning() && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
}

// gracePeriod picks the termination grace period: override (a deletion's or
// a probe's) if set, else the pod's, else 30 s.
func gracePeriod(pod *corev1.Pod, override *int64) time.Duration {
	switch {
	case override != nil:
		return time.Duration(*override) * time.Second
	case pod.Spec.TerminationGracePeriodSeconds != nil:
		return time.Duration(*pod.Spec.TerminationGracePeriodSeconds) * time.Second
	default:
		return 30 * time.Second
	}
}

func findContainer(pod *corev1.Pod, name string) *corev1.Container {
	for i := range pod.Spec.InitContainers {
		if pod.Spec.InitContainers[i].Name == name {
			return &pod.Spec.InitContainers[i]
		}
	}
	for i := range pod.Spec.Containers {
		if pod.Spec.Containers[i].Name == name {
			return &pod.Spec.Containers[i]
		}
	}
	return nil
}

// statusInput snapshots what the worker knows, for computeStatus.
func (w *podWorker) statusInput(pod *corev1.Pod) statusInput {
	w.mu.Lock()
	defer w.mu.Unlock()
	in := statusInput{
		SandboxReady: w.sandboxReady,
		PodIPs:       slices.Clone(w.podIPs),
		HostIP:       w.n.cfg.NodeIP,
		StartTime:    w.startTime,
		Now:          metav1.NewTime(time.Now().Truncate(time.Second)),
	}
	initDone := true
	for i := range pod.Spec.InitContainers {
		spec := &pod.Spec.InitContainers[i]
		c := w.containers[spec.Name]
		in.Init = append(in.Init, containerStatus(spec, c, reasonPodInitializing, true))
		if c == nil || (isSidecar(spec) && !(c.started && c.proc != nil)) || (!isSidecar(spec) && !c.completed) {
			initDone = false
		}
	}
	waiting := reasonContainerCreating
	if !initDone {
		waiting = reasonPodInitializing
	}
	for i := range pod.Spec.Containers {
		spec := &pod.Spec.Containers[i]
		in.Regular = append(in.Regular, containerStatus(spec, w.containers[spec.Name], waiting, false))
	}
	return in
}

// containerStatus renders a container record as the API shows it; c may be
// nil for a container not tried yet.
func containerStatus(spec *corev1.Container, c *container, waiting string, isInit bool) corev1.ContainerStatus {
	f := false
	cs := corev1.ContainerStatus{Name: spec.Name, Image: spec.Image, Started: &f}
	if c == nil || (c.state == corev1.ContainerState{}) {
		cs.State.Waiting = &corev1.ContainerStateWaiting{Reason: waiting}
		if c != nil {
			cs.RestartCount = c.restartCount
		}
		return cs
	}
	cs.State = *c.state.DeepCopy()
	cs.LastTerminationState = *c.lastState.DeepCopy()
	cs.RestartCount = c.restartCount
	cs.ContainerID = c.containerID
	cs.ImageID = c.imageID
	running := c.state.Running != nil
	started := running && c.started
	cs.Started = &started
	cs.Ready = running && c.started && c.ready
	if isInit && !isSidecar(spec) {
		cs.Ready = c.completed
	}
	return cs
}

// writeStatus computes the pod's status and writes it through pods/status
// when it differs from what the API server has, retrying on conflicts with a
// fresh copy of the pod. It returns the status it computed.
func (w *podWorker) writeStatus(ctx context.Context, pod *corev1.Pod) corev1.PodStatus {
	return w.writeStatusPhase(ctx, pod, nil)
}

// writeStatusPhase is writeStatus with the phase chosen by phase, when not nil.
func (w *podWorker) writeStatusPhase(ctx context.Context, pod *corev1.Pod, phase func(statusInput) corev1.PodPhase) corev1.PodStatus {
	in := w.statusInput(pod)
	if phase != nil {
		in.Phase = phase(in)
	}
	if w.lastWritten != nil && isTerminal(w.lastWritten.Phase) {
		in.Phase = w.lastWritten.Phase
	}
	st := computeStatus(pod, in)
	st.ObservedGeneration = pod.Generation
	if apiequality.Semantic.DeepEqual(st, pod.Status) ||
		(w.lastWritten != nil && apiequality.Semantic.DeepEqual(&st, w.lastWritten)) {
		return st
	}
	pods := w.n.client.CoreV1().Pods(pod.Namespace)
	cur := pod
	err := retry.RetryOnConflict(retry.DefaultBackoff, func() error {
		next := computeStatus(cur, in)
		next.ObservedGeneration = cur.Generation
		if apiequality.Semantic.DeepEqual(next, cur.Status) {
			st = next
			return nil
		}
		cp := cur.DeepCopy()
		cp.Status = next
		updated, err := pods.UpdateStatus(ctx, cp, metav1.UpdateOptions{})
		if apierrors.IsConflict(err) {
			fresh, getErr := pods.Get(ctx, pod.Name, metav1.GetOptions{})
			if getErr != nil {
				return getErr
			}
			if fresh.UID != w.uid {
				return nil
			}
			cur = fresh
			return err
		}
		if err != nil {
			return err
		}
		st = updated.Status
		return nil
	})
	if err != nil {
		if ctx.Err() == nil && !apierrors.IsNotFound(err) {
			w.logf("writing pod status: %v", err)
		}
		return st
	}
	w.lastWritten = st.DeepCopy()
	return st
}

// warn records a warning event, once per warningRepeat for the same text.
func (w *podWorker) warn(pod *corev1.Pod, reason, format string, args ...any) {
	msg := fmt.Sprintf(format, args...)
	w.logf("%s: %s", reason, msg)
	key := reason + "\x00" + msg
	if t, ok := w.warned[key]; ok && time.Since(t) < warningRepeat {
		return
	}
	w.warned[key] = time.Now()
	w.n.recorder.Event(pod, corev1.EventTypeWarning, reason, msg)
}

// event records an event on the pod's newest version; probe callbacks use it.
func (w *podWorker) event(eventType, reason, format string, args ...any) {
	pod, _ := w.latest()
	w.n.recorder.Eventf(pod, eventType, reason, format, args...)
}

func (w *podWorker) logf(format string, args ...any) {
	w.n.logf("pod %s (%s): %s", w.key, w.uid, fmt.Sprintf(format, args...))
}
