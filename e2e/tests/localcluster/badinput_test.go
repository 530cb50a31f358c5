//go:build e2e

package localcluster

import (
	"context"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestBadInputFailsOnlyThatPod(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()
	bystander := env.CreatePod(t, kubetest.SleeperPod(ns, "bystander"))
	bystander = env.WaitPodReady(t, ns, bystander.Name, 30*time.Second)

	t.Run("an unknown image leaves the container waiting with ErrImagePull", func(t *testing.T) {
		pod := kubetest.SleeperPod(ns, "unknown-image")
		pod.Spec.Containers[0].Image = "example.invalid/no-such-image:1"
		env.CreatePod(t, pod)
		env.WaitFor(t, 30*time.Second, "ErrImagePull", func(ctx context.Context) (bool, error) {
			return waitingReason(env, ctx, ns, pod.Name) == "ErrImagePull", nil
		})
		waitEvent(t, env, ns, pod.Name, "Failed", "image table")
	})
	t.Run("a missing ConfigMap keeps the pod creating until it appears", func(t *testing.T) {
		pod := kubetest.SleeperPod(ns, "missing-configmap")
		pod.Spec.Volumes = []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "later"}},
		}}}
		pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "cfg", MountPath: "/etc/ambient-e2e-cfg"}}
		env.CreatePod(t, pod)
		waitEvent(t, env, ns, pod.Name, "FailedMount", "later")
		if p, _ := env.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{}); p.Status.Phase != corev1.PodPending {
			t.Errorf("phase with a missing ConfigMap = %s, want Pending", p.Status.Phase)
		}
		cm := &corev1.ConfigMap{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "later"}, Data: map[string]string{"k": "v"}}
		if _, err := env.Client.CoreV1().ConfigMaps(ns).Create(ctx, cm, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		env.WaitPodReady(t, ns, pod.Name, 60*time.Second)
		out, err := env.RunKubectl(ctx, "exec", "-n", ns, pod.Name, "--", "cat", "/etc/ambient-e2e-cfg/k")
		if err != nil || out != "v" {
			t.Errorf("ConfigMap file = %q, %v; want %q", out, err, "v")
		}
	})
	t.Run("the bystander pod is untouched", func(t *testing.T) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, bystander.Name, metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if !kubetest.PodReady(p) || p.Status.ContainerStatuses[0].RestartCount != 0 {
			t.Errorf("bystander ready=%v restarts=%d, want ready with no restarts", kubetest.PodReady(p), p.Status.ContainerStatuses[0].RestartCount)
		}
	})
}

func waitingReason(env *kubetest.Env, ctx context.Context, ns, name string) string {
	p, err := env.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
	if err != nil || len(p.Status.ContainerStatuses) == 0 || p.Status.ContainerStatuses[0].State.Waiting == nil {
		return ""
	}
	return p.Status.ContainerStatuses[0].State.Waiting.Reason
}

func waitEvent(t *testing.T, env *kubetest.Env, ns, pod, reason, msgPart string) {
	t.Helper()
	env.WaitFor(t, 30*time.Second, "event "+reason+" on "+pod, func(ctx context.Context) (bool, error) {
		evs, err := env.Client.CoreV1().Events(ns).List(ctx, metav1.ListOptions{FieldSelector: "involvedObject.name=" + pod})
		if err != nil {
			return false, nil
		}
		for _, e := range evs.Items {
			if e.Reason == reason && strings.Contains(e.Message, msgPart) {
				return true, nil
			}
		}
		return false, nil
	})
}
