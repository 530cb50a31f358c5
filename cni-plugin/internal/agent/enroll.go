package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/zds"
)

// How a pod came to be enrolled, for the debug endpoint.
const (
	viaCNI   = "cni-add"
	viaWatch = "watch"
)

// goneNetns is a netns path that never exists: Remove given it only cleans
// up what lives outside the pod's netns (the eBPF engine's pinned program).
const goneNetns = "/proc/self/fd/-1"

// errPodGone means the pod or its network namespace went away while the
// agent worked on it; what was done has been undone.
var errPodGone = errors.New("pod is gone")

// enrolledPod is a pod the agent enrolled. Its fields do not change once it
// is in Agent.pods.
type enrolledPod struct {
	uid, namespace, name, serviceAccount string
	ips                                  []netip.Addr
	// netns is the pod's network namespace, held open while it is enrolled
	// so that the engine can remove redirection from it later, whatever
	// happens to the path it was found under.
	netns *os.File
	inode uint64
	// sandbox is the CNI container ID of the ADD that enrolled the pod; empty
	// when enrolled from the watch.
	sandbox string
	via     string
	since   time.Time
	// installTook and ztunnelTook are how long installing redirection and
	// ztunnel's acknowledgement took, reported in the log and /debug.
	installTook, ztunnelTook time.Duration
}

func (p *enrolledPod) String() string { return p.namespace + "/" + p.name + " (" + p.uid + ")" }

// netnsPath names the held namespace for the engine. Valid only while the
// pod's lock is held and p.netns is open (the descriptor number could be
// reused after).
func (p *enrolledPod) netnsPath() string {
	if p.netns == nil {
		return goneNetns
	}
	return fmt.Sprintf("/proc/self/fd/%d", p.netns.Fd())
}

func (p *enrolledPod) redirectPod() redirect.Pod {
	return redirect.Pod{UID: p.uid, Namespace: p.namespace, Name: p.name, IPs: p.ips}
}

func podOf(pod *corev1.Pod, ips []netip.Addr) *enrolledPod {
	sa := pod.Spec.ServiceAccountName
	if sa == "" {
		sa = "default"
	}
	return &enrolledPod{
		uid:            string(pod.UID),
		namespace:      pod.Namespace,
		name:           pod.Name,
		serviceAccount: sa,
		ips:            ips,
	}
}

func inodeOf(f *os.File) uint64 {
	fi, err := f.Stat()
	if err != nil {
		return 0
	}
	if st, ok := fi.Sys().(*syscall.Stat_t); ok {
		return st.Ino
	}
	return 0
}

// enrolled is the enrolled pod with this UID, or nil.
func (a *Agent) enrolled(uid string) *enrolledPod {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.pods[uid]
}

// enrollLocked installs redirection in netns, adds the pod's IPs to the
// probe SNAT set and hands the pod to ztunnel, then records it. It takes
// ownership of netns. On error nothing it did is left.
//
// With requireZtunnel (CNI ADD), any failure to get ztunnel's ack fails the
// enrollment: the ADD fails closed and the runtime retries. Without it (a
// running pod, or one enrolled before an agent restart), only ztunnel's
// explicit refusal does; when no ztunnel is connected (or it went away) the
// pod stays enrolled and redirected, failing closed, and the ZDS server hands
// it to the next ztunnel that connects.
//
// The caller holds the pod's lock.
func (a *Agent) enrollLocked(ctx context.Context, p *enrolledPod, netns *os.File, requireZtunnel bool) (err error) {
	p.netns, p.inode, p.since = netns, inodeOf(netns), time.Now()
	rp := p.redirectPod()
	path := p.netnsPath()

	var undo []func() error
	defer func() {
		if err == nil {
			return
		}
		var errs []error
		for i := len(undo) - 1; i >= 0; i-- {
			if uerr := undo[i](); uerr != nil {
				errs = append(errs, uerr)
			}
		}
		netns.Close()
		if uerr := errors.Join(errs...); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undoing enrollment: %w", uerr))
		}
	}()

	start := time.Now()
	if err := a.engine.Install(path, rp); err != nil {
		if errors.Is(err, redirect.ErrNetnsGone) {
			return fmt.Errorf("%w: %w", errPodGone, err)
		}
		return fmt.Errorf("installing redirection for pod %s: %w", p, err)
	}
	undo = append(undo, func() error { return a.engine.Remove(path, rp) })

	for _, ip := range p.ips {
		if err := a.probes.AddTarget(ip); err != nil {
			return fmt.Errorf("adding probe snat target %s: %w", ip, err)
		}
		undo = append(undo, func() error { return a.probes.RemoveTarget(ip) })
	}

	p.installTook = time.Since(start)
	info := &zdsapi.WorkloadInfo{Name: p.name, Namespace: p.namespace, ServiceAccount: p.serviceAccount}
	start = time.Now()
	err = a.zds.AddWorkload(ctx, p.uid, info, netns)
	p.ztunnelTook = time.Since(start)
	var refused *zds.AckError
	switch {
	case err == nil:
	case !requireZtunnel && !errors.As(err, &refused):
		a.log.Warn("pod enrolled; ztunnel gets it when it connects", "pod", p.String(), "error", err)
	default:
		// The server keeps the workload for the next snapshot: forget it.
		undo = append(undo, func() error {
			dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if err := a.zds.DelWorkload(dctx, p.uid); err != nil {
				a.log.Warn("telling ztunnel to forget pod", "pod", p.String(), "error", err)
			}
			return nil
		})
		return fmt.Errorf("handing pod %s to ztunnel: %w", p, err)
	}

	a.mu.Lock()
	a.pods[p.uid] = p
	a.mu.Unlock()
	return nil
}

// unenrollLocked removes a pod's redirection (first, so that new connections
// flow directly rather than to listeners that are going away), tells
// ztunnel to stop serving it, and drops its probe SNAT entries. The netns may
// be gone. On error the pod stays recorded so a retry finishes the job.
//
// The caller holds the pod's lock.
func (a *Agent) unenrollLocked(ctx context.Context, p *enrolledPod) error {
	var errs []error
	if err := a.engine.Remove(p.netnsPath(), p.redirectPod()); err != nil {
		errs = append(errs, fmt.Errorf("removing redirection: %w", err))
	}
	a.forgetInZtunnel(ctx, p.String(), p.uid)
	for _, ip := range p.ips {
		if err := a.probes.RemoveTarget(ip); err != nil {
			errs = append(errs, fmt.Errorf("removing probe snat target %s: %w", ip, err))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("unenrolling pod %s: %w", p, err)
	}
	a.mu.Lock()
	delete(a.pods, p.uid)
	a.mu.Unlock()
	if p.netns != nil {
		p.netns.Close()
	}
	a.log.Info("pod unenrolled", "pod", p.String())
	return nil
}

// forgetInZtunnel tells every ztunnel to stop serving the pod. ZDS drops the
// pod from its set whatever ztunnel answers, so errors are only logged.
func (a *Agent) forgetInZtunnel(ctx context.Context, pod, uid string) {
	dctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 10*time.Second)
	defer cancel()
	if err := a.zds.DelWorkload(dctx, uid); err != nil {
		a.log.Warn("telling ztunnel to forget pod", "pod", pod, "error", err)
	}
}

// unenrollOrphan removes redirection a previous agent installed in a pod
// this agent did not enroll. The caller holds the pod's lock.
func (a *Agent) unenrollOrphan(ctx context.Context, pod *corev1.Pod) error {
	ips := podIPs(pod)
	p := podOf(pod, ips)
	if len(ips) > 0 {
		netns, err := a.finder.Find(ips)
		switch {
		case errors.Is(err, errNetnsNotFound):
			// Not running: only state outside the netns can be left.
		case err != nil:
			return fmt.Errorf("finding netns of pod %s: %w", p, err)
		default:
			p.netns = netns
		}
	}
	err := a.unenrollLocked(ctx, p)
	if err != nil && p.netns != nil {
		p.netns.Close()
	}
	return err
}

// annotate sets (on) or removes the redirection annotation with a merge
// patch whose uid is a precondition, so a recreated pod of the same name is
// never touched. Removing it from a pod that is gone is not an error.
func (a *Agent) annotate(ctx context.Context, pod *corev1.Pod, on bool) error {
	value := `null`
	if on {
		value = `"` + RedirectionEnabled + `"`
	}
	patch := fmt.Sprintf(`{"metadata":{"uid":%q,"annotations":{%q:%s}}}`, pod.UID, RedirectionAnnotation, value)
	_, err := a.client.CoreV1().Pods(pod.Namespace).Patch(ctx, pod.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{})
	// A pod that is gone, or replaced by one of the same name (the uid
	// precondition fails), has no annotation of ours left to remove.
	if err != nil && !on && (apierrors.IsNotFound(err) || apierrors.IsConflict(err) || apierrors.IsInvalid(err)) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("patching annotation of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}
