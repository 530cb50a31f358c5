package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniapi"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/zds"
)

var _ cniapi.Agent = (*Agent)(nil)

// podLookupTimeout bounds how long a CNI request waits for the pod to be
// visible: the runtime can run the ADD before the agent's watch has the pod.
const podLookupTimeout = 5 * time.Second

// Add implements cniapi.Agent: it enrolls the pod if it is ambient and
// succeeds only once redirection is installed and ztunnel acknowledged the
// pod. Without ztunnel it fails with cniapi.ErrUnavailable, having undone
// everything, so the runtime retries (fail closed).
func (a *Agent) Add(ctx context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	start := time.Now()
	pod, skip, err := a.ambientPod(ctx, r)
	if pod == nil {
		return skip, err
	}

	uid := string(pod.UID)
	unlock := a.locks.Lock(uid)
	defer unlock()

	netns, err := os.Open(r.Netns)
	if err != nil {
		return nil, fmt.Errorf("%w: opening netns of pod %s: %w", cniapi.ErrInvalidRequest, r, err)
	}
	if cur := a.enrolled(uid); cur != nil {
		if cur.inode == inodeOf(netns) {
			netns.Close()
			return &cniapi.Response{Outcome: cniapi.Enrolled, Message: "already enrolled"}, nil
		}
		// A new sandbox for the same pod: the old one's enrollment goes.
		if err := a.unenrollLocked(ctx, cur); err != nil {
			netns.Close()
			return nil, err
		}
	}

	ips := r.IPs
	if len(ips) == 0 {
		ips = podIPs(pod)
	}
	if len(ips) == 0 {
		netns.Close()
		return nil, fmt.Errorf("%w: pod %s has no IPs (no prevResult addresses, none in its status)", cniapi.ErrInvalidRequest, r)
	}
	p := podOf(pod, ips)
	p.sandbox, p.via = r.ContainerID, viaCNI
	if err := a.enrollLocked(ctx, p, netns, true); err != nil {
		if errors.Is(err, zds.ErrNoZtunnel) || errors.Is(err, zds.ErrDisconnected) ||
			errors.Is(err, context.DeadlineExceeded) || errors.Is(err, zds.ErrClosed) {
			return nil, fmt.Errorf("%w: enrolling pod %s: %w", cniapi.ErrUnavailable, r, err)
		}
		return nil, fmt.Errorf("enrolling pod %s: %w", r, err)
	}
	err = a.annotate(ctx, pod, true)
	a.log.Info("pod enrolled", "pod", p.String(), "netns", p.inode, "via", p.via,
		"took", time.Since(start), "install", p.installTook, "ztunnel", p.ztunnelTook)
	switch {
	case apierrors.IsNotFound(err):
		// Deleted meanwhile: leave nothing behind; the runtime tears the
		// sandbox down anyway.
		return nil, errors.Join(fmt.Errorf("pod %s was deleted while being enrolled", r), a.unenrollLocked(ctx, p))
	case err != nil:
		// The annotation reports the state; enrollment itself is done.
		// The watch writes it later.
		a.log.Warn("annotating enrolled pod; will retry", "pod", p.String(), "error", err)
		a.queue.AddRateLimited(uid)
	}
	return &cniapi.Response{Outcome: cniapi.Enrolled}, nil
}

// ambientPod finds the request's pod and decides whether it is ambient. It
// returns the pod when it is; otherwise nil and the response (skipped) or
// error to give the runtime.
func (a *Agent) ambientPod(ctx context.Context, r *cniapi.PodRequest) (*corev1.Pod, *cniapi.Response, error) {
	if !a.synced.Load() {
		return nil, nil, fmt.Errorf("%w: agent is starting", cniapi.ErrUnavailable)
	}
	pod, err := a.podForRequest(ctx, r)
	if err != nil {
		return nil, nil, err
	}
	ns, err := a.namespaceForPod(ctx, pod.Namespace)
	if err != nil {
		return nil, nil, err
	}
	if d := Decide(pod, ns, a.cfg.SystemNamespace); !d.Ambient {
		return nil, &cniapi.Response{Outcome: cniapi.Skipped, Message: d.Reason}, nil
	}
	return pod, nil, nil
}

// Del implements cniapi.Agent: it unenrolls the pod of the request's sandbox.
// It never fails: what cannot be removed now is retried from the watch.
func (a *Agent) Del(ctx context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	uid := r.PodUID
	if uid == "" {
		uid = a.enrolledUIDByName(r.PodNamespace, r.PodName)
	}
	if uid == "" {
		return &cniapi.Response{Outcome: cniapi.Removed, Message: "not enrolled"}, nil
	}
	unlock := a.locks.Lock(uid)
	defer unlock()
	cur := a.enrolled(uid)
	if cur == nil {
		return &cniapi.Response{Outcome: cniapi.Removed, Message: "not enrolled"}, nil
	}
	// A late DEL of an older sandbox must not unenroll the current one.
	if cur.sandbox != "" && r.ContainerID != "" && cur.sandbox != r.ContainerID {
		return &cniapi.Response{Outcome: cniapi.Removed, Message: "not the enrolled sandbox"}, nil
	}
	if r.Netns != "" {
		if f, err := os.Open(r.Netns); err == nil {
			other := inodeOf(f) != cur.inode
			f.Close()
			if other {
				return &cniapi.Response{Outcome: cniapi.Removed, Message: "not the enrolled netns"}, nil
			}
		}
	}
	if err := a.unenrollLocked(ctx, cur); err != nil {
		a.log.Warn("unenrolling pod on CNI DEL; will retry", "pod", cur.String(), "error", err)
		a.queue.AddRateLimited(uid)
		return &cniapi.Response{Outcome: cniapi.Removed, Message: "removal retried in the background: " + err.Error()}, nil
	}
	return &cniapi.Response{Outcome: cniapi.Removed}, nil
}

// Check implements cniapi.Agent: an ambient pod passes when its redirection
// is installed (per the engine's report) and ztunnel holds it.
func (a *Agent) Check(ctx context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	pod, skip, err := a.ambientPod(ctx, r)
	if pod == nil {
		return skip, err
	}
	uid := string(pod.UID)
	unlock := a.locks.Lock(uid)
	defer unlock()
	cur := a.enrolled(uid)
	if cur == nil {
		return nil, fmt.Errorf("pod %s is ambient but not enrolled", r)
	}
	report, err := a.engine.Describe(cur.netnsPath(), cur.redirectPod())
	if err != nil {
		return nil, fmt.Errorf("checking redirection of pod %s: %w", r, err)
	}
	if !redirectionInstalled(report) {
		return nil, fmt.Errorf("pod %s: %s redirection is not installed", r, a.engine.Name())
	}
	if !slices.Contains(a.zds.Workloads(), uid) {
		return nil, fmt.Errorf("pod %s: not handed to ztunnel", r)
	}
	return &cniapi.Response{Outcome: cniapi.Enrolled}, nil
}

// Status implements cniapi.Agent: the agent is ready once it has synced
// its watch. It does not wait for ztunnel: STATUS gates the node's pod
// network as a whole, and pods that are not ambient need no ztunnel.
func (a *Agent) Status(context.Context) (*cniapi.Response, error) {
	if !a.synced.Load() {
		return nil, errors.New("agent is starting")
	}
	return &cniapi.Response{Outcome: cniapi.Ready}, nil
}

// podForRequest finds the request's pod in the watch cache, then asks the
// API server, retrying briefly: the runtime may run the ADD before the watch
// has delivered the pod.
func (a *Agent) podForRequest(ctx context.Context, r *cniapi.PodRequest) (*corev1.Pod, error) {
	match := func(p *corev1.Pod) bool {
		return p != nil && (r.PodUID == "" || string(p.UID) == r.PodUID)
	}
	ctx, cancel := context.WithTimeout(ctx, podLookupTimeout)
	defer cancel()
	delay := 20 * time.Millisecond
	var lastErr error
	for {
		if obj, ok, _ := a.podInformer.GetIndexer().GetByKey(r.PodNamespace + "/" + r.PodName); ok && match(obj.(*corev1.Pod)) {
			return obj.(*corev1.Pod), nil
		}
		pod, err := a.client.CoreV1().Pods(r.PodNamespace).Get(ctx, r.PodName, metav1.GetOptions{})
		switch {
		case err == nil && match(pod):
			return pod, nil
		case err == nil:
			lastErr = fmt.Errorf("pod has uid %s, not %s", pod.UID, r.PodUID)
		default:
			lastErr = err
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("%w: looking up pod %s: %w", cniapi.ErrUnavailable, r, lastErr)
		case <-time.After(delay):
		}
		delay = min(2*delay, 500*time.Millisecond)
	}
}

// namespaceForPod is the pod's namespace from the watch cache or the API
// server; nil when it does not exist.
func (a *Agent) namespaceForPod(ctx context.Context, name string) (*corev1.Namespace, error) {
	if ns := a.cachedNamespace(name); ns != nil {
		return ns, nil
	}
	ns, err := a.client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("%w: looking up namespace %s: %w", cniapi.ErrUnavailable, name, err)
	}
	return ns, nil
}

// enrolledUIDByName finds an enrolled pod's UID by namespace and name.
func (a *Agent) enrolledUIDByName(namespace, name string) string {
	a.mu.Lock()
	defer a.mu.Unlock()
	for uid, p := range a.pods {
		if p.namespace == namespace && p.name == name {
			return uid
		}
	}
	return ""
}
