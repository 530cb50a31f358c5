//go:build e2e

package ztunnel

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// TestTrafficFlowsWhileIstiodIsAway scales istiod-lite to zero: ztunnel
// keeps serving the pods it knows with the last state and the certificates
// it holds, and picks the control plane up again when it returns.
func TestTrafficFlowsWhileIstiodIsAway(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	ctx := context.Background()
	targets := map[string]string{
		"far":  fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort),
		"near": fmt.Sprintf("%s:%d", f.near.Status.PodIP, kubetest.EchoHTTPPort),
	}
	for _, target := range targets {
		if out, err := get(t, env, f.ns, "client", target); err != nil {
			t.Fatalf("before scaling istiod down, to %s: %v\n%s", target, err, out)
		}
	}

	scale := func(replicas int) {
		t.Helper()
		if out, err := env.RunKubectl(ctx, "-n", "istio-system", "scale", "deployment/istiod", fmt.Sprintf("--replicas=%d", replicas)); err != nil {
			t.Fatalf("scaling istiod to %d: %v\n%s", replicas, err, out)
		}
	}
	scale(0)
	t.Cleanup(func() {
		scale(1)
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		defer cancel()
		if out, err := env.RunKubectl(ctx, "-n", "istio-system", "rollout", "status", "deployment/istiod", "--timeout=120s"); err != nil {
			t.Errorf("istiod back: %v\n%s", err, out)
		}
	})
	env.WaitFor(t, 30*time.Second, "no istiod pod left", func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"})
		return err == nil && len(pods.Items) == 0, err
	})

	// New connections, each through both ztunnels, with istiod gone.
	for i := range 5 {
		for pod, target := range targets {
			out, err := get(t, env, f.ns, "client", target)
			if err != nil || !strings.Contains(out, fmt.Sprintf(`"pod":%q`, pod)) {
				t.Errorf("request %d to %s with istiod away: %v\n%s", i, target, err, out)
			}
		}
	}
	// The ztunnels stay ready on the state they hold.
	for _, node := range []string{f.far.Status.HostIP, f.near.Status.HostIP} {
		resp, err := http.Get("http://" + node + ":15021/healthz/ready")
		if err != nil {
			t.Errorf("ztunnel readiness on %s with istiod away: %v", node, err)
			continue
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("ztunnel readiness on %s with istiod away: %s", node, resp.Status)
		}
	}

	// istiod-lite back: the ztunnels reconnect and learn of a pod created
	// since (the next tests depend on it too).
	scale(1)
	rctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	if out, err := env.RunKubectl(rctx, "-n", "istio-system", "rollout", "status", "deployment/istiod", "--timeout=120s"); err != nil {
		t.Fatalf("istiod back: %v\n%s", err, out)
	}
	env.CreatePod(t, echoPod(f.ns, "late", "node2"))
	late := env.WaitPodReady(t, f.ns, "late", 30*time.Second)
	target := fmt.Sprintf("%s:%d", late.Status.PodIP, kubetest.EchoHTTPPort)
	back := time.Now()
	env.WaitFor(t, 45*time.Second, "a pod created after istiod's return to be reachable", func(context.Context) (bool, error) {
		out, err := get(t, env, f.ns, "client", target)
		return err == nil && strings.Contains(out, `"pod":"late"`), nil
	})
	t.Logf("a pod created after istiod's return reachable after %v", time.Since(back).Round(10*time.Millisecond))
}
