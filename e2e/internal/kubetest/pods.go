package kubetest

import (
	"context"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Images of the test workloads, as named in e2e/cluster/images.yaml.
const (
	EchoImage    = "ambient-mesh/echo-server:latest"
	LoadImage    = "ambient-mesh/load-client:latest"
	ShellImage   = "busybox:1.36"
	EchoHTTPPort = 8080
)

// CreatePod creates pod and returns it as stored.
func (e *Env) CreatePod(t testing.TB, pod *corev1.Pod) *corev1.Pod {
	t.Helper()
	out, err := e.Client.CoreV1().Pods(pod.Namespace).Create(context.Background(), pod, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating pod %s/%s: %v", pod.Namespace, pod.Name, err)
	}
	return out
}

// WaitPodReady waits until the pod is Ready and returns it.
func (e *Env) WaitPodReady(t testing.TB, ns, name string, timeout time.Duration) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	e.WaitFor(t, timeout, "pod "+ns+"/"+name+" Ready", func(ctx context.Context) (bool, error) {
		p, err := e.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pod = p
		return PodReady(p), nil
	})
	return pod
}

// PodReady says whether the pod's Ready condition is true.
func PodReady(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

// WaitDeploymentPods waits until the deployment's replicas are all Ready and
// returns its pods.
func (e *Env) WaitDeploymentPods(t testing.TB, d *appsv1.Deployment, timeout time.Duration) []corev1.Pod {
	t.Helper()
	var pods []corev1.Pod
	sel := labels.SelectorFromSet(d.Spec.Selector.MatchLabels).String()
	e.WaitFor(t, timeout, "deployment "+d.Name+" ready", func(ctx context.Context) (bool, error) {
		list, err := e.Client.CoreV1().Pods(d.Namespace).List(ctx, metav1.ListOptions{LabelSelector: sel})
		if err != nil {
			return false, nil
		}
		pods = pods[:0]
		for _, p := range list.Items {
			if p.DeletionTimestamp == nil && PodReady(&p) {
				pods = append(pods, p)
			}
		}
		return int32(len(pods)) == *d.Spec.Replicas, nil
	})
	return pods
}

// EchoContainer is an echo-server container reporting its pod's identity.
func EchoContainer() corev1.Container {
	return corev1.Container{
		Name:  "echo",
		Image: EchoImage,
		Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: EchoHTTPPort}, {Name: "grpc", ContainerPort: 9090}, {Name: "tcp", ContainerPort: 9000}},
		Env: []corev1.EnvVar{
			{Name: "POD_NAME", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.name"}}},
			{Name: "POD_NAMESPACE", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "metadata.namespace"}}},
			{Name: "POD_IP", ValueFrom: &corev1.EnvVarSource{FieldRef: &corev1.ObjectFieldSelector{FieldPath: "status.podIP"}}},
		},
		ReadinessProbe: &corev1.Probe{
			ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/healthz", Port: intOrName("http")}},
			PeriodSeconds: 1,
		},
	}
}

// SleeperPod is a long-running shell pod to exec into.
func SleeperPod(ns, name string) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.PodSpec{
			Containers: []corev1.Container{{
				Name: "sh", Image: ShellImage,
				Command: []string{"sh", "-c", "echo started; exec sleep 3600"},
			}},
			TerminationGracePeriodSeconds: ptr(int64(1)),
		},
	}
}

func ptr[T any](v T) *T { return &v }
