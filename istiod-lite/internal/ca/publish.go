package ca

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	corelisters "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// The ConfigMap through which workloads find the mesh root (Istio's names).
const (
	RootConfigMapName = "istio-ca-root-cert"
	RootConfigMapKey  = "root-cert.pem"
)

const (
	// publishResync re-checks every namespace now and then, as a safety net
	// for missed events.
	publishResync = 10 * time.Minute
	// publishWorkers lets a fresh install fill a cluster with many
	// namespaces quickly.
	publishWorkers = 4
)

// PublishRoot keeps ConfigMap istio-ca-root-cert with key root-cert.pem and
// content rootPEM in every namespace that is not terminating: it creates
// missing ones, recreates deleted ones and restores edited ones. It runs
// until ctx ends and then returns nil.
func PublishRoot(ctx context.Context, c kubernetes.Interface, rootPEM []byte) error {
	if len(rootPEM) == 0 {
		return errors.New("publishing root: empty root certificate")
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	nsFactory := informers.NewSharedInformerFactory(c, publishResync)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(c, publishResync,
		informers.WithTweakListOptions(func(o *metav1.ListOptions) {
			o.FieldSelector = fields.OneTermEqualSelector("metadata.name", RootConfigMapName).String()
		}))
	nsInformer := nsFactory.Core().V1().Namespaces()
	cmInformer := cmFactory.Core().V1().ConfigMaps()

	p := &publisher{
		client: c, root: string(rootPEM),
		namespaces: nsInformer.Lister(), configMaps: cmInformer.Lister(),
		queue: workqueue.NewTypedRateLimitingQueue(workqueue.DefaultTypedControllerRateLimiter[string]()),
	}
	defer p.queue.ShutDown()

	enqueueNS := func(obj any) {
		if ns, ok := obj.(*corev1.Namespace); ok {
			p.queue.Add(ns.Name)
		}
	}
	if _, err := nsInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueueNS,
		UpdateFunc: func(_, obj any) { enqueueNS(obj) },
	}); err != nil {
		return fmt.Errorf("watching namespaces: %w", err)
	}
	enqueueCM := func(obj any) {
		if t, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = t.Obj
		}
		// The field selector is a server-side filter; check again in case
		// the source ignores it.
		if cm, ok := obj.(*corev1.ConfigMap); ok && cm.Name == RootConfigMapName {
			p.queue.Add(cm.Namespace)
		}
	}
	if _, err := cmInformer.Informer().AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    enqueueCM,
		UpdateFunc: func(_, obj any) { enqueueCM(obj) },
		DeleteFunc: enqueueCM,
	}); err != nil {
		return fmt.Errorf("watching configmaps: %w", err)
	}

	nsFactory.Start(ctx.Done())
	cmFactory.Start(ctx.Done())
	defer nsFactory.Shutdown()
	defer cmFactory.Shutdown()
	if !cache.WaitForCacheSync(ctx.Done(), nsInformer.Informer().HasSynced, cmInformer.Informer().HasSynced) {
		if ctx.Err() != nil {
			return nil
		}
		return errors.New("publishing root: caches did not sync")
	}

	var wg sync.WaitGroup
	for range publishWorkers {
		wg.Go(func() {
			for p.processNext(ctx) {
			}
		})
	}
	<-ctx.Done()
	p.queue.ShutDown()
	wg.Wait()
	return nil
}

type publisher struct {
	client     kubernetes.Interface
	root       string
	namespaces corelisters.NamespaceLister
	configMaps corelisters.ConfigMapLister
	queue      workqueue.TypedRateLimitingInterface[string]
}

func (p *publisher) processNext(ctx context.Context) bool {
	ns, quit := p.queue.Get()
	if quit {
		return false
	}
	defer p.queue.Done(ns)
	if err := p.reconcile(ctx, ns); err != nil {
		if ctx.Err() == nil {
			slog.Default().Warn("publishing root certificate", "namespace", ns, "error", err)
		}
		p.queue.AddRateLimited(ns)
		return true
	}
	p.queue.Forget(ns)
	return true
}

// reconcile makes the root ConfigMap of namespace ns right.
func (p *publisher) reconcile(ctx context.Context, ns string) error {
	n, err := p.namespaces.Get(ns)
	if apierrors.IsNotFound(err) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("namespace %s: %w", ns, err)
	}
	if n.DeletionTimestamp != nil || n.Status.Phase == corev1.NamespaceTerminating {
		return nil
	}
	cms := p.client.CoreV1().ConfigMaps(ns)
	cm, err := p.configMaps.ConfigMaps(ns).Get(RootConfigMapName)
	switch {
	case apierrors.IsNotFound(err):
		_, err = cms.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{
				Name: RootConfigMapName, Namespace: ns,
				Labels: map[string]string{"istio.io/config": "true"},
			},
			Data: map[string]string{RootConfigMapKey: p.root},
		}, metav1.CreateOptions{})
		switch {
		case apierrors.IsAlreadyExists(err):
			return nil // the informer will bring it, and us back here
		case apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause):
			return nil
		case err != nil:
			return fmt.Errorf("creating configmap %s/%s: %w", ns, RootConfigMapName, err)
		}
		return nil
	case err != nil:
		return fmt.Errorf("configmap %s/%s: %w", ns, RootConfigMapName, err)
	case cm.Data[RootConfigMapKey] == p.root:
		return nil
	}
	cm = cm.DeepCopy()
	if cm.Data == nil {
		cm.Data = map[string]string{}
	}
	cm.Data[RootConfigMapKey] = p.root
	if _, err := cms.Update(ctx, cm, metav1.UpdateOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("updating configmap %s/%s: %w", ns, RootConfigMapName, err)
	}
	return nil
}
