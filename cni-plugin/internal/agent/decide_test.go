package agent

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func TestDecide(t *testing.T) {
	ambientNS := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app", Labels: map[string]string{DataplaneModeLabel: DataplaneModeAmbient}}}
	plainNS := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "app"}}
	pod := func(mutate ...func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "app", Labels: map[string]string{}, Annotations: map[string]string{}},
			Status:     corev1.PodStatus{Phase: corev1.PodRunning},
		}
		for _, m := range mutate {
			m(p)
		}
		return p
	}
	label := func(k, v string) func(*corev1.Pod) { return func(p *corev1.Pod) { p.Labels[k] = v } }

	tests := []struct {
		name        string
		pod         *corev1.Pod
		ns          *corev1.Namespace
		wantAmbient bool
		wantReason  string
	}{
		{"a pod in an ambient namespace is enrolled", pod(), ambientNS, true, "namespace label"},
		{"a pod in a plain namespace is not", pod(), plainNS, false, "not labeled ambient"},
		{"a pod whose namespace is unknown is not", pod(), nil, false, "not labeled ambient"},
		{"a pod labeled ambient is enrolled in a plain namespace", pod(label(DataplaneModeLabel, "ambient")), plainNS, true, "pod label"},
		{"a pod labeled none opts out of an ambient namespace", pod(label(DataplaneModeLabel, "none")), ambientNS, false, "pod opted out"},
		{"a pod with another dataplane-mode value follows its namespace", pod(label(DataplaneModeLabel, "sidecar")), ambientNS, true, "namespace label"},
		{"a host-network pod is never enrolled", pod(func(p *corev1.Pod) { p.Spec.HostNetwork = true }, label(DataplaneModeLabel, "ambient")), ambientNS, false, "host network"},
		{"a pod in the mesh's own namespace is never enrolled", pod(func(p *corev1.Pod) { p.Namespace = "istio-system" }, label(DataplaneModeLabel, "ambient")), ambientNS, false, "mesh infrastructure namespace"},
		{"a waypoint is never enrolled", pod(label(gatewayManagedLabel, "istio.io-mesh-controller")), ambientNS, false, "gateway or waypoint"},
		{"a gateway is never enrolled", pod(label(gatewayNameLabel, "ingress")), ambientNS, false, "gateway or waypoint"},
		{"a pod with a sidecar is never enrolled", pod(func(p *corev1.Pod) { p.Annotations[sidecarStatusAnnotation] = "{}" }), ambientNS, false, "has a sidecar"},
		{"a succeeded pod is not enrolled", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodSucceeded }), ambientNS, false, "terminated"},
		{"a failed pod is not enrolled", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodFailed }), ambientNS, false, "terminated"},
		{"a pending pod is enrolled (by its CNI ADD)", pod(func(p *corev1.Pod) { p.Status.Phase = corev1.PodPending }), ambientNS, true, "namespace label"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := Decide(tt.pod, tt.ns, "istio-system")
			if got.Ambient != tt.wantAmbient || got.Reason != tt.wantReason {
				t.Errorf("Decide = %+v, want {Ambient:%v Reason:%q}", got, tt.wantAmbient, tt.wantReason)
			}
		})
	}
}
