//go:build e2e

package ztunnel

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestWithoutZtunnelTrafficFailsClosedAndComesBack(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	ctx := context.Background()
	target := fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)
	if out, err := get(t, env, f.ns, "client", target); err != nil {
		t.Fatalf("before: %q, %v", out, err)
	}
	setZtunnel := func(present bool) {
		sel := `{"spec":{"template":{"spec":{"nodeSelector":{"ambient-e2e/no-ztunnel":"true"}}}}}`
		if present {
			sel = `{"spec":{"template":{"spec":{"nodeSelector":null}}}}`
		}
		if _, err := env.RunKubectl(ctx, "-n", "istio-system", "patch", "daemonset", "ztunnel", "--type=merge", "-p", sel); err != nil {
			t.Fatal(err)
		}
		env.WaitFor(t, 90*time.Second, fmt.Sprintf("ztunnel present=%v", present), func(ctx context.Context) (bool, error) {
			pods, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel"})
			if err != nil {
				return false, nil
			}
			ready := 0
			for _, p := range pods.Items {
				if p.DeletionTimestamp == nil && kubetest.PodReady(&p) {
					ready++
				}
			}
			if present {
				return ready == 2, nil
			}
			return len(pods.Items) == 0, nil
		})
	}
	setZtunnel(false)
	t.Cleanup(func() { setZtunnel(true) })
	out, err := get(t, env, f.ns, "client", target)
	if err == nil || strings.Contains(out, `"pod":"far"`) {
		t.Errorf("with no ztunnel the client got %q (%v), want the connection to fail", out, err)
	}
	setZtunnel(true)
	env.WaitFor(t, 30*time.Second, "traffic through the new ztunnel", func(context.Context) (bool, error) {
		out, err := get(t, env, f.ns, "client", target)
		return err == nil && strings.Contains(out, `"pod":"far"`), nil
	})
}
