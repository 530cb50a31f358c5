package controller

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	securityapi "istio.io/api/security/v1beta1"
	typeapi "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istiofake "istio.io/client-go/pkg/clientset/versioned/fake"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	fakediscovery "k8s.io/client-go/discovery/fake"
	kubefake "k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"
	gatewayfake "sigs.k8s.io/gateway-api/pkg/client/clientset/versioned/fake"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/model"
)

// recorder collects pushes and lets tests wait for one that satisfies a condition.
type recorder struct {
	mu     sync.Mutex
	pushes map[string][]map[string]proto.Message // by type URL, in order
	notify chan struct{}
}

func newRecorder() *recorder {
	return &recorder{pushes: map[string][]map[string]proto.Message{}, notify: make(chan struct{}, 1)}
}

func (r *recorder) push(typeURL string, res map[string]proto.Message) {
	r.mu.Lock()
	r.pushes[typeURL] = append(r.pushes[typeURL], res)
	r.mu.Unlock()
	select {
	case r.notify <- struct{}{}:
	default:
	}
}

func (r *recorder) count(typeURL string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.pushes[typeURL])
}

// waitFor blocks until the latest push of typeURL satisfies ok.
func (r *recorder) waitFor(t *testing.T, typeURL string, what string, ok func(map[string]proto.Message) bool) map[string]proto.Message {
	t.Helper()
	deadline := time.After(10 * time.Second)
	for {
		r.mu.Lock()
		list := r.pushes[typeURL]
		var last map[string]proto.Message
		if len(list) > 0 {
			last = list[len(list)-1]
		}
		r.mu.Unlock()
		if last != nil && ok(last) {
			return last
		}
		select {
		case <-r.notify:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("no %s push where %s", typeURL, what)
		}
	}
}

type fixture struct {
	kube  *kubefake.Clientset
	istio *istiofake.Clientset
	gw    *gatewayfake.Clientset
	rec   *recorder
	ctrl  *Controller
}

func start(t *testing.T, opts Options, gatewayAPI bool, objs ...runtime.Object) *fixture {
	t.Helper()
	var kubeObjs, istioObjs, gwObjs []runtime.Object
	for _, o := range objs {
		switch o.(type) {
		case *securityv1.AuthorizationPolicy, *securityv1.PeerAuthentication:
			istioObjs = append(istioObjs, o)
		case *gatewayv1.Gateway:
			gwObjs = append(gwObjs, o)
		default:
			kubeObjs = append(kubeObjs, o)
		}
	}
	f := &fixture{
		kube:  kubefake.NewSimpleClientset(kubeObjs...),
		istio: istiofake.NewSimpleClientset(istioObjs...),
		gw:    gatewayfake.NewSimpleClientset(gwObjs...),
		rec:   newRecorder(),
	}
	if gatewayAPI {
		f.gw.Discovery().(*fakediscovery.FakeDiscovery).Resources = []*metav1.APIResourceList{{
			GroupVersion: "gateway.networking.k8s.io/v1",
			APIResources: []metav1.APIResource{{Name: "gateways", Kind: "Gateway", Namespaced: true}},
		}}
	}
	opts.Log = slog.New(slog.DiscardHandler)
	f.ctrl = New(f.kube, f.istio, f.gw, model.DefaultCluster(), f.rec.push, opts)
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- f.ctrl.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		f.ctrl.Close()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	deadline := time.Now().Add(10 * time.Second)
	for !f.ctrl.Ready() {
		if time.Now().After(deadline) {
			t.Fatal("controller never became ready")
		}
		time.Sleep(5 * time.Millisecond)
	}
	return f
}

func pod(ns, name, ip string, labels map[string]string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, Labels: labels},
		Spec:       corev1.PodSpec{NodeName: "node-1", Containers: []corev1.Container{{Name: "app"}}},
		Status: corev1.PodStatus{Phase: corev1.PodRunning, PodIP: ip,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue}}},
	}
}

func TestInitialStateAndChangesArePushed(t *testing.T) {
	c := model.DefaultCluster()
	f := start(t, Options{}, true,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}},
		pod("shop", "cart-1", "10.1.0.5", map[string]string{"app": "cart"}),
		&corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "cart", Namespace: "shop"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "cart"}, ClusterIP: "10.96.0.10",
				Ports: []corev1.ServicePort{{Port: 80}}},
		},
		&securityv1.AuthorizationPolicy{
			ObjectMeta: metav1.ObjectMeta{Name: "cart-allow", Namespace: "shop"},
			Spec: securityapi.AuthorizationPolicy{Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "cart"}},
				Rules: []*securityapi.Rule{{From: []*securityapi.Rule_From{{Source: &securityapi.Source{Namespaces: []string{"shop"}}}}}}},
		},
	)
	uid := model.PodUID(c, "shop", "cart-1")
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "the pod and service are present", func(m map[string]proto.Message) bool {
		w, ok := m[uid].(*workloadapi.Address)
		_, svc := m[model.ServiceResourceName(c, "cart", "shop")]
		return ok && svc && len(w.GetWorkload().GetServices()) == 1 &&
			len(w.GetWorkload().GetAuthorizationPolicies()) == 1
	})
	f.rec.waitFor(t, security.AuthorizationTypeURL, "the policy is present", func(m map[string]proto.Message) bool {
		_, ok := m["shop/cart-allow"]
		return ok
	})

	// A new pod appears; a deleted one disappears.
	ctx := context.Background()
	if _, err := f.kube.CoreV1().Pods("shop").Create(ctx, pod("shop", "cart-2", "10.1.0.6", map[string]string{"app": "cart"}), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := f.kube.CoreV1().Pods("shop").Delete(ctx, "cart-1", metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "cart-2 replaced cart-1", func(m map[string]proto.Message) bool {
		_, added := m[model.PodUID(c, "shop", "cart-2")]
		_, stale := m[uid]
		return added && !stale
	})
	if got := len(f.ctrl.Snapshot().Addresses); got != 2 {
		t.Errorf("snapshot has %d addresses, want 2 (cart-2 and the service)", got)
	}
}

func TestBurstOfEventsIsCoalesced(t *testing.T) {
	// A long debounce makes the coalescing visible in push counts alone.
	f := start(t, Options{Debounce: 200 * time.Millisecond, MaxDelay: 5 * time.Second}, true)
	before := f.rec.count(workloadapi.AddressTypeURL)
	const n = 100
	for i := 0; i < n; i++ {
		p := pod("shop", fmt.Sprintf("p-%d", i), fmt.Sprintf("10.1.0.%d", i+1), nil)
		if _, err := f.kube.CoreV1().Pods("shop").Create(context.Background(), p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "every pod is present", func(m map[string]proto.Message) bool { return len(m) == n })
	pushes := f.rec.count(workloadapi.AddressTypeURL) - before
	if pushes > 5 {
		t.Errorf("%d events caused %d pushes, want them coalesced into at most 5", n, pushes)
	}
}

func TestStatusIsWrittenForL7ConvertedPolicy(t *testing.T) {
	pol := &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "web-l7", Namespace: "shop", Generation: 4},
		Spec: securityapi.AuthorizationPolicy{
			Selector: &typeapi.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Rules:    []*securityapi.Rule{{To: []*securityapi.Rule_To{{Operation: &securityapi.Operation{Methods: []string{"GET"}}}}}},
		},
	}
	f := start(t, Options{}, false, pol)
	ctx := context.Background()
	deadline := time.Now().Add(10 * time.Second)
	for {
		got, err := f.istio.SecurityV1().AuthorizationPolicies("shop").Get(ctx, "web-l7", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if conds := got.Status.Conditions; len(conds) == 1 {
			c := conds[0]
			if c.Type != model.ConditionZtunnelAccepted || c.Status != "True" || c.Reason != model.ReasonUnsupportedValue || c.ObservedGeneration != 4 {
				t.Fatalf("condition = %v", c)
			}
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("status never written")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Unrelated churn recomputes, but the unchanged status is not written again.
	for i := 0; i < 3; i++ {
		if _, err := f.kube.CoreV1().Pods("shop").Create(ctx, pod("shop", fmt.Sprintf("p-%d", i), fmt.Sprintf("10.1.0.%d", i+1), nil), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "the pods are present", func(m map[string]proto.Message) bool { return len(m) == 3 })
	if n := statusUpdates(f.istio.Actions()); n != 1 {
		t.Errorf("%d status updates, want exactly 1", n)
	}
}

func statusUpdates(actions []k8stesting.Action) int {
	n := 0
	for _, a := range actions {
		if a.GetVerb() == "update" && a.GetSubresource() == "status" {
			n++
		}
	}
	return n
}

func TestWaypointBindingFollowsGateways(t *testing.T) {
	c := model.DefaultCluster()
	hostname := gatewayv1.HostnameAddressType
	f := start(t, Options{}, true,
		&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: map[string]string{model.LabelUseWaypoint: "waypoint"}}},
		&corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "reviews", Namespace: "app"},
			Spec: corev1.ServiceSpec{ClusterIP: "10.96.0.10", Ports: []corev1.ServicePort{{Port: 80}}}},
	)
	key := model.ServiceResourceName(c, "reviews", "app")
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "the service has no waypoint yet", func(m map[string]proto.Message) bool {
		a, ok := m[key].(*workloadapi.Address)
		return ok && a.GetService().GetWaypoint() == nil
	})
	gw := &gatewayv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "waypoint", Namespace: "app"},
		Spec: gatewayv1.GatewaySpec{GatewayClassName: model.WaypointGatewayClass,
			Listeners: []gatewayv1.Listener{{Name: "mesh", Port: model.HBONEPort, Protocol: "HBONE"}}},
		Status: gatewayv1.GatewayStatus{Addresses: []gatewayv1.GatewayStatusAddress{{Type: &hostname, Value: "waypoint.app.svc.cluster.local"}}},
	}
	if _, err := f.gw.GatewayV1().Gateways("app").Create(context.Background(), gw, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "the service is bound to the waypoint", func(m map[string]proto.Message) bool {
		a, ok := m[key].(*workloadapi.Address)
		return ok && a.GetService().GetWaypoint().GetHostname().GetHostname() == "waypoint.app.svc.cluster.local"
	})
}

func TestRunsWithoutGatewayAPI(t *testing.T) {
	f := start(t, Options{}, false, pod("shop", "a", "10.1.0.1", nil))
	f.rec.waitFor(t, workloadapi.AddressTypeURL, "the pod is present", func(m map[string]proto.Message) bool { return len(m) == 1 })
}
