//go:build e2e

package istiod

import (
	"context"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestAfterARestartClientsReceiveOnlyTheDifference(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{"istio.io/dataplane-mode": "ambient"})
	for _, name := range []string{"a", "b", "c"} {
		env.CreatePod(t, kubetest.SleeperPod(ns, name))
	}
	for _, name := range []string{"a", "b", "c"} {
		env.WaitPodReady(t, ns, name, 30*time.Second)
	}
	w := watch(t, env, istiodService, token(t, env, ns, "default", caAudience, nil), "test~"+ns)
	total := len(w.Resources(workloadapi.AddressTypeURL))
	upsBefore, _ := w.counts()

	pods, err := env.Client.CoreV1().Pods(istioNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"})
	if err != nil || len(pods.Items) != 1 {
		t.Fatalf("istiod pods: %v %v", pods, err)
	}
	old := pods.Items[0]
	if err := env.Client.CoreV1().Pods(istioNamespace).Delete(ctx, old.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	// The client has the replacement istiod's own workload once it has
	// reconnected and synced with the new server.
	env.WaitFor(t, 90*time.Second, "the client to see the new istiod pod", func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods(istioNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.Name != old.Name && kubetest.PodReady(&p) {
				return w.address("Kubernetes//Pod/istio-system/"+p.Name) != nil, nil
			}
		}
		return false, nil
	})
	ups, redundant := w.counts()
	if redundant != 0 {
		t.Errorf("after the restart the client received %d resources it already had", redundant)
	}
	if got := ups - upsBefore; got >= total {
		t.Errorf("after the restart the client received %d resources of %d; want only the difference", got, total)
	}
	t.Logf("resources: %d; received after the restart: %d, none of them unchanged", total, ups-upsBefore)
}
