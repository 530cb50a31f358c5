package agent

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"sync"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	coreinformers "k8s.io/client-go/informers/core/v1"
	"k8s.io/client-go/tools/cache"
)

// uidIndex indexes the pod cache by UID: the workqueue's key.
const uidIndex = "uid"

// maxRetries bounds how often a pod's reconciliation is retried after
// errors before the agent waits for the pod's next event.
const maxRetries = 12

func (a *Agent) setupInformers() {
	a.podInformer = coreinformers.NewFilteredPodInformer(a.client, metav1.NamespaceAll, 0,
		cache.Indexers{
			cache.NamespaceIndex: cache.MetaNamespaceIndexFunc,
			uidIndex: func(obj any) ([]string, error) {
				return []string{string(obj.(*corev1.Pod).UID)}, nil
			},
		},
		func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("spec.nodeName", a.cfg.NodeName).String()
		})
	a.nsInformer = coreinformers.NewNamespaceInformer(a.client, 0, cache.Indexers{})
	_ = a.podInformer.SetTransform(stripManagedFields)
	_ = a.nsInformer.SetTransform(stripManagedFields)

	_, _ = a.podInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    a.enqueuePod,
		UpdateFunc: func(_, obj any) { a.enqueuePod(obj) },
		DeleteFunc: a.enqueuePod,
	})
	_, _ = a.nsInformer.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc: a.enqueueNamespace,
		UpdateFunc: func(old, obj any) {
			o, n := old.(*corev1.Namespace), obj.(*corev1.Namespace)
			if o.Labels[DataplaneModeLabel] != n.Labels[DataplaneModeLabel] {
				a.enqueueNamespace(obj)
			}
		},
		// A deleted namespace deletes its pods, which unenrolls them.
	})
}

func stripManagedFields(obj any) (any, error) {
	if m, ok := obj.(metav1.Object); ok {
		m.SetManagedFields(nil)
	}
	return obj, nil
}

func (a *Agent) enqueuePod(obj any) {
	if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
		obj = t.Obj
	}
	pod, ok := obj.(*corev1.Pod)
	if !ok || pod.Spec.NodeName != a.cfg.NodeName {
		return
	}
	a.queue.Add(string(pod.UID))
}

func (a *Agent) enqueueNamespace(obj any) {
	ns, ok := obj.(*corev1.Namespace)
	if !ok {
		return
	}
	objs, _ := a.podInformer.GetIndexer().ByIndex(cache.NamespaceIndex, ns.Name)
	for _, o := range objs {
		a.enqueuePod(o)
	}
}

// work processes the queue until it shuts down.
func (a *Agent) work(ctx context.Context) {
	for {
		uid, shutdown := a.queue.Get()
		if shutdown {
			return
		}
		err := a.reconcile(ctx, uid)
		switch {
		case err == nil || ctx.Err() != nil:
			a.queue.Forget(uid)
		case a.queue.NumRequeues(uid) < maxRetries:
			a.log.Warn("reconciling pod; will retry", "uid", uid, "error", err)
			a.queue.AddRateLimited(uid)
		default:
			a.log.Error("reconciling pod; giving up until its next change", "uid", uid, "error", err)
			a.queue.Forget(uid)
		}
		a.queue.Done(uid)
	}
}

// rebuild reconciles every pod of the node once, before the plugin is
// installed: pods enrolled before an agent restart (annotated) are enrolled
// again, pods that became ambient meanwhile are enrolled, and pods that
// stopped being ambient meanwhile are unenrolled. Failures are retried by
// the workers.
func (a *Agent) rebuild(ctx context.Context) {
	objs := a.podInformer.GetIndexer().List()
	sem := make(chan struct{}, a.cfg.Workers)
	var wg sync.WaitGroup
	for _, o := range objs {
		pod := o.(*corev1.Pod)
		if pod.Spec.NodeName != a.cfg.NodeName {
			continue
		}
		uid := string(pod.UID)
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			if err := a.reconcile(ctx, uid); err != nil {
				a.log.Warn("re-enrolling pod after start; will retry", "pod", pod.Namespace+"/"+pod.Name, "error", err)
				a.queue.AddRateLimited(uid)
			}
		})
	}
	wg.Wait()
	a.log.Info("pods of the node reconciled after start", "pods", len(objs), "enrolled", a.enrolledCount())
}

func (a *Agent) enrolledCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return len(a.pods)
}

// cachedPod is the pod with this UID from the watch, or nil.
func (a *Agent) cachedPod(uid string) *corev1.Pod {
	objs, _ := a.podInformer.GetIndexer().ByIndex(uidIndex, uid)
	if len(objs) == 0 {
		return nil
	}
	return objs[0].(*corev1.Pod)
}

// cachedNamespace is the namespace from the watch, or nil.
func (a *Agent) cachedNamespace(name string) *corev1.Namespace {
	obj, ok, _ := a.nsInformer.GetStore().GetByKey(name)
	if !ok {
		return nil
	}
	return obj.(*corev1.Namespace)
}

// reconcile brings one pod (by UID) to its desired state: enrolled when it
// is ambient, not enrolled otherwise or when it is gone.
func (a *Agent) reconcile(ctx context.Context, uid string) error {
	unlock := a.locks.Lock(uid)
	defer unlock()

	pod := a.cachedPod(uid)
	cur := a.enrolled(uid)
	if pod == nil {
		if cur == nil {
			return nil
		}
		// The watch may not have delivered yet a pod a CNI ADD just
		// enrolled: only the API server says it is gone.
		switch p, err := a.client.CoreV1().Pods(cur.namespace).Get(ctx, cur.name, metav1.GetOptions{}); {
		case err == nil && string(p.UID) == uid:
			return nil // its watch events reconcile it
		case err != nil && !apierrors.IsNotFound(err):
			return fmt.Errorf("confirming pod %s is gone: %w", cur, err)
		}
		a.log.Info("unenrolling deleted pod", "pod", cur.String())
		return a.unenrollLocked(ctx, cur)
	}
	d := Decide(pod, a.cachedNamespace(pod.Namespace), a.cfg.SystemNamespace)
	annotated := pod.Annotations[RedirectionAnnotation] == RedirectionEnabled
	switch {
	case d.Ambient && cur != nil:
		if !annotated {
			return a.annotate(ctx, pod, true)
		}
		return nil

	case d.Ambient:
		// A terminating pod is not newly enrolled (its sandbox may already
		// be gone), but one enrolled before an agent restart is kept.
		if pod.DeletionTimestamp != nil && !annotated {
			return nil
		}
		ips := podIPs(pod)
		if len(ips) == 0 {
			return nil // not started; the CNI ADD or a later update enrolls it
		}
		err := a.enrollRunning(ctx, pod, ips)
		if errors.Is(err, errPodGone) {
			return nil
		}
		return err

	case cur != nil:
		a.log.Info("unenrolling pod", "pod", cur.String(), "reason", d.Reason)
		if err := a.unenrollLocked(ctx, cur); err != nil {
			return err
		}
		return a.annotate(ctx, pod, false)

	case annotated:
		// Enrolled by an earlier agent and no longer ambient (its label
		// went while no agent ran): remove what that agent installed.
		a.log.Info("unenrolling pod enrolled before restart", "pod", pod.Namespace+"/"+pod.Name, "reason", d.Reason)
		if err := a.unenrollOrphan(ctx, pod); err != nil {
			return err
		}
		return a.annotate(ctx, pod, false)
	}
	return nil
}

// enrollRunning enrolls a running pod, finding its network namespace by IP.
// Caller holds the pod's lock.
func (a *Agent) enrollRunning(ctx context.Context, pod *corev1.Pod, ips []netip.Addr) error {
	netns, err := a.finder.Find(ips)
	if err != nil {
		return fmt.Errorf("finding netns of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	p := podOf(pod, ips)
	p.via = viaWatch
	if err := a.enrollLocked(ctx, p, netns, false); err != nil {
		return err
	}
	a.log.Info("pod enrolled", "pod", p.String(), "netns", p.inode, "via", p.via)
	err = a.annotate(ctx, pod, true)
	if apierrors.IsNotFound(err) {
		// Deleted while we enrolled it: leave nothing behind.
		return errors.Join(errPodGone, a.unenrollLocked(ctx, p))
	}
	return err
}
