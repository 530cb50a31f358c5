//go:build e2e

package cni

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

const (
	redirectionAnnotation = "ambient.istio.io/redirection"
	dataplaneLabel        = "istio.io/dataplane-mode"
)

// request opens a TCP connection from the pod to target, sends an HTTP GET
// and returns what came back: the echo server's JSON when the path is
// direct, the stand-in's one line when ztunnel's listener took it.
func request(t *testing.T, env *kubetest.Env, ns, pod, target string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return env.RunKubectl(ctx, "exec", "-n", ns, pod, "--", "curl", "--http0.9", "-sS", "--max-time", "5", "http://"+target+"/")
}

func redirected(out string) bool { return strings.HasPrefix(out, "standin ") }

func echoPod(ns, name, node string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": name}},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": node},
			Containers:                    []corev1.Container{kubetest.EchoContainer()},
			TerminationGracePeriodSeconds: ptr(int64(1)),
		},
	}
}

func ptr[T any](v T) *T { return &v }

func setNamespaceLabel(t *testing.T, env *kubetest.Env, ns string, value *string) {
	t.Helper()
	v := "null"
	if value != nil {
		v = fmt.Sprintf("%q", *value)
	}
	patch := []byte(fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, dataplaneLabel, v))
	if _, err := env.Client.CoreV1().Namespaces().Patch(context.Background(), ns, types.MergePatchType, patch, metav1.PatchOptions{}); err != nil {
		t.Fatal(err)
	}
}

func waitAnnotation(t *testing.T, env *kubetest.Env, ns, pod string, want bool) {
	t.Helper()
	env.WaitFor(t, 30*time.Second, fmt.Sprintf("%s/%s annotated=%v", ns, pod, want), func(ctx context.Context) (bool, error) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, pod, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		return (p.Annotations[redirectionAnnotation] == "enabled") == want, nil
	})
}

func TestLabelingANamespaceEnrollsRunningPodsWithoutRestarts(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, nil)
	for _, p := range []*corev1.Pod{echoPod(ns, "server1", "node1"), echoPod(ns, "server2", "node2")} {
		env.CreatePod(t, p)
	}
	client := kubetest.SleeperPod(ns, "client")
	client.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	env.CreatePod(t, client)
	servers := map[string]*corev1.Pod{}
	for _, name := range []string{"server1", "server2"} {
		servers[name] = env.WaitPodReady(t, ns, name, 30*time.Second)
	}
	before := env.WaitPodReady(t, ns, "client", 30*time.Second)
	target := fmt.Sprintf("%s:%d", servers["server2"].Status.PodIP, kubetest.EchoHTTPPort)

	out, err := request(t, env, ns, "client", target)
	if err != nil || redirected(out) || !strings.Contains(out, `"pod":"server2"`) {
		t.Fatalf("before enrollment the client reached %q (%v), want server2 directly", out, err)
	}

	ambient := "ambient"
	setNamespaceLabel(t, env, ns, &ambient)
	for _, name := range []string{"client", "server1", "server2"} {
		waitAnnotation(t, env, ns, name, true)
	}
	t.Run("outbound traffic of an enrolled pod reaches ztunnel's outbound listener", func(t *testing.T) {
		out, err := request(t, env, ns, "client", target)
		if err != nil || !redirected(out) || !strings.Contains(out, "listener=15001") || !strings.Contains(out, "original="+target) {
			t.Errorf("got %q (%v), want the stand-in's 15001 listener with original=%s", out, err, target)
		}
	})
	t.Run("the pods were not restarted and their probes still pass", func(t *testing.T) {
		after, err := env.Client.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if after.Status.ContainerStatuses[0].RestartCount != 0 || !after.Status.ContainerStatuses[0].State.Running.StartedAt.Equal(&before.Status.ContainerStatuses[0].State.Running.StartedAt) {
			t.Errorf("client container was restarted by enrollment")
		}
		// Readiness probes (HTTP, from the node) run every second; a few
		// periods after enrollment the servers must still be Ready.
		time.Sleep(3 * time.Second)
		for name := range servers {
			p, err := env.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			if err != nil || !kubetest.PodReady(p) {
				t.Errorf("%s lost readiness after enrollment", name)
			}
		}
	})
	t.Run("removing the label gives back the direct path", func(t *testing.T) {
		setNamespaceLabel(t, env, ns, nil)
		for _, name := range []string{"client", "server1", "server2"} {
			waitAnnotation(t, env, ns, name, false)
		}
		out, err := request(t, env, ns, "client", target)
		if err != nil || redirected(out) || !strings.Contains(out, `"pod":"server2"`) {
			t.Errorf("after unenrollment the client reached %q (%v), want server2 directly", out, err)
		}
	})
}

func TestANewPodIsEnrolledBeforeItsContainersStart(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, map[string]string{dataplaneLabel: "ambient"})
	server := echoPod(ns, "server", "node2")
	server.Labels[dataplaneLabel] = "none" // opted out: reached directly
	env.CreatePod(t, server)
	srv := env.WaitPodReady(t, ns, "server", 30*time.Second)
	target := fmt.Sprintf("%s:%d", srv.Status.PodIP, kubetest.EchoHTTPPort)

	// The container's very first action is the connection.
	pod := kubetest.SleeperPod(ns, "early")
	pod.Spec.Containers[0].Command = []string{"sh", "-c", "curl --http0.9 -sS --max-time 5 http://" + target + "/; echo; exec sleep 3600"}
	env.CreatePod(t, pod)
	env.WaitPodReady(t, ns, "early", 30*time.Second)
	waitAnnotation(t, env, ns, "early", true)
	var logs string
	env.WaitFor(t, 15*time.Second, "the first connection's outcome in the logs", func(ctx context.Context) (bool, error) {
		logs, _ = env.RunKubectl(ctx, "logs", "-n", ns, "early")
		return strings.TrimSpace(logs) != "", nil
	})
	if !redirected(logs) || !strings.Contains(logs, "original="+target) {
		t.Errorf("first connection of the container got %q, want it redirected to ztunnel", logs)
	}
	t.Run("an opted-out pod is not enrolled", func(t *testing.T) {
		p, _ := env.Client.CoreV1().Pods(ns).Get(context.Background(), "server", metav1.GetOptions{})
		if p.Annotations[redirectionAnnotation] != "" {
			t.Errorf("opted-out pod annotated %q", p.Annotations[redirectionAnnotation])
		}
	})
}

func TestAnAgentRestartKeepsPodsEnrolled(t *testing.T) {
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

	agents, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent", FieldSelector: "spec.nodeName=node1"})
	if err != nil || len(agents.Items) != 1 {
		t.Fatalf("cni-agent on node1: %v %v", agents, err)
	}
	if err := env.Client.CoreV1().Pods("istio-system").Delete(ctx, agents.Items[0].Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	env.WaitFor(t, 60*time.Second, "a new ready cni-agent on node1", func(ctx context.Context) (bool, error) {
		list, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=cni-agent", FieldSelector: "spec.nodeName=node1"})
		if err != nil {
			return false, nil
		}
		for _, p := range list.Items {
			if p.Name != agents.Items[0].Name && kubetest.PodReady(&p) {
				return true, nil
			}
		}
		return false, nil
	})
	out, err := request(t, env, ns, "client", target)
	if err != nil || !redirected(out) {
		t.Errorf("after the agent restart the client reached %q (%v), want still redirected", out, err)
	}
	p, _ := env.Client.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
	if p.Annotations[redirectionAnnotation] != "enabled" {
		t.Errorf("annotation lost after the agent restart")
	}
}
