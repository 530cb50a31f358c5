//go:build e2e

package cni

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// standinRedirection asks the stand-in on node (its admin port on the node's
// address) how the pod with uid is redirected: "ebpf" or "nftables".
func standinRedirection(t *testing.T, nodeIP string, uid types.UID) string {
	t.Helper()
	resp, err := http.Get("http://" + nodeIP + ":15021/workloads")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var wls []struct {
		UID         string `json:"uid"`
		Redirection string `json:"redirection"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&wls); err != nil {
		t.Fatal(err)
	}
	for _, w := range wls {
		if w.UID == string(uid) {
			return w.Redirection
		}
	}
	return ""
}

func TestInboundTrafficToAnEnrolledPodReachesTheInboundListener(t *testing.T) {
	env := kubetest.Get(t)
	meshNS := env.Namespace(t, map[string]string{dataplaneLabel: "ambient"})
	plainNS := env.Namespace(t, nil)
	env.CreatePod(t, echoPod(meshNS, "server", "node2"))
	client := kubetest.SleeperPod(plainNS, "client")
	client.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	env.CreatePod(t, client)
	srv := env.WaitPodReady(t, meshNS, "server", 30*time.Second)
	cl := env.WaitPodReady(t, plainNS, "client", 30*time.Second)
	waitAnnotation(t, env, meshNS, "server", true)

	target := fmt.Sprintf("%s:%d", srv.Status.PodIP, kubetest.EchoHTTPPort)
	out, err := request(t, env, plainNS, "client", target)
	if err != nil || !strings.Contains(out, "listener=15006") || !strings.Contains(out, "original="+target) || !strings.Contains(out, "peer="+cl.Status.PodIP+":") {
		t.Errorf("a plaintext connection into the enrolled pod got %q (%v), want the 15006 listener with original=%s from %s", out, err, target, cl.Status.PodIP)
	}
	t.Run("HBONE's port is left to ztunnel's own listener", func(t *testing.T) {
		out, err := request(t, env, plainNS, "client", srv.Status.PodIP+":15008")
		if err != nil || !strings.Contains(out, "listener=15008") {
			t.Errorf("a connection to port 15008 got %q (%v), want the 15008 listener itself", out, err)
		}
	})
}

func TestTheNftablesEngineRedirectsTheSameWay(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	setEngine := func(engine string) {
		args := `["--proc-dir=/host/proc","--log-level=info"]`
		if engine != "" {
			args = fmt.Sprintf(`["--proc-dir=/host/proc","--log-level=info","--engine=%s"]`, engine)
		}
		patch := fmt.Sprintf(`[{"op":"replace","path":"/spec/template/spec/containers/0/args","value":%s}]`, args)
		if _, err := env.RunKubectl(ctx, "-n", "istio-system", "patch", "daemonset", "cni-agent", "--type=json", "-p", patch); err != nil {
			t.Fatal(err)
		}
		if _, err := env.RunKubectl(ctx, "-n", "istio-system", "rollout", "status", "daemonset/cni-agent", "--timeout=120s"); err != nil {
			t.Fatal(err)
		}
	}
	setEngine("nftables")
	t.Cleanup(func() { setEngine("") })

	ns := env.Namespace(t, map[string]string{dataplaneLabel: "ambient"})
	server := echoPod(ns, "server", "node2")
	server.Labels[dataplaneLabel] = "none"
	env.CreatePod(t, server)
	client := kubetest.SleeperPod(ns, "client")
	client.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	env.CreatePod(t, client)
	srv := env.WaitPodReady(t, ns, "server", 30*time.Second)
	cl := env.WaitPodReady(t, ns, "client", 30*time.Second)
	waitAnnotation(t, env, ns, "client", true)

	if got := standinRedirection(t, cl.Status.HostIP, cl.UID); got != "nftables" {
		t.Errorf("client redirected by %q, want nftables", got)
	}
	target := fmt.Sprintf("%s:%d", srv.Status.PodIP, kubetest.EchoHTTPPort)
	out, err := request(t, env, ns, "client", target)
	if err != nil || !strings.Contains(out, "listener=15001") || !strings.Contains(out, "original="+target) {
		t.Errorf("with nftables the client got %q (%v), want the 15001 listener with original=%s", out, err, target)
	}
}

func TestWithoutZtunnelEnrolledPodsFailClosed(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{dataplaneLabel: "ambient"})
	server := echoPod(ns, "server", "node2")
	server.Labels[dataplaneLabel] = "none"
	env.CreatePod(t, server)
	client := kubetest.SleeperPod(ns, "client")
	client.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	env.CreatePod(t, client)
	srv := env.WaitPodReady(t, ns, "server", 30*time.Second)
	env.WaitPodReady(t, ns, "client", 30*time.Second)
	waitAnnotation(t, env, ns, "client", true)
	target := fmt.Sprintf("%s:%d", srv.Status.PodIP, kubetest.EchoHTTPPort)

	// Take the node's ztunnel away.
	setStandin := func(present bool) {
		sel := `{"spec":{"template":{"spec":{"nodeSelector":{"ambient-e2e/no-ztunnel":"true"}}}}}`
		if present {
			sel = `{"spec":{"template":{"spec":{"nodeSelector":null}}}}`
		}
		if _, err := env.RunKubectl(ctx, "-n", "istio-system", "patch", "daemonset", "ztunnel-standin", "--type=merge", "-p", sel); err != nil {
			t.Fatal(err)
		}
		env.WaitFor(t, 60*time.Second, fmt.Sprintf("stand-in present=%v", present), func(ctx context.Context) (bool, error) {
			pods, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel-standin"})
			if err != nil {
				return false, nil
			}
			ready := 0
			for _, p := range pods.Items {
				if kubetest.PodReady(&p) && p.DeletionTimestamp == nil {
					ready++
				}
			}
			if present {
				return ready == 2, nil
			}
			return len(pods.Items) == 0, nil
		})
	}
	setStandin(false)
	t.Cleanup(func() { setStandin(true) })

	t.Run("an enrolled pod's traffic does not leave it", func(t *testing.T) {
		out, err := request(t, env, ns, "client", target)
		if err == nil || strings.Contains(out, `"pod":"server"`) {
			t.Errorf("with no ztunnel the client got %q (%v), want the connection to fail", out, err)
		}
	})
	t.Run("a new ambient pod is not started until ztunnel is back", func(t *testing.T) {
		late := kubetest.SleeperPod(ns, "late")
		late.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
		env.CreatePod(t, late)
		env.WaitFor(t, 30*time.Second, "FailedCreatePodSandBox naming ztunnel", func(ctx context.Context) (bool, error) {
			evs, err := env.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=late"})
			if err != nil {
				return false, nil
			}
			for _, e := range evs.Items {
				if e.Reason == "FailedCreatePodSandBox" && strings.Contains(e.Message, "ztunnel") {
					return true, nil
				}
			}
			return false, nil
		})
		p, _ := env.Client.CoreV1().Pods(ns).Get(ctx, "late", metav1.GetOptions{})
		if p.Status.Phase != corev1.PodPending {
			t.Errorf("pod started without ztunnel: phase %s", p.Status.Phase)
		}
		setStandin(true)
		env.WaitPodReady(t, ns, "late", 90*time.Second)
		waitAnnotation(t, env, ns, "late", true)
	})
}
