package agent

import (
	corev1 "k8s.io/api/core/v1"
)

// Kubernetes labels and annotations the agent reads and writes
// (../../shared/ARCHITECTURE.md, user-facing APIs).
const (
	// DataplaneModeLabel on a Namespace or Pod enrolls it with value
	// DataplaneModeAmbient; on a Pod, DataplaneModeNone opts it out.
	DataplaneModeLabel   = "istio.io/dataplane-mode"
	DataplaneModeAmbient = "ambient"
	DataplaneModeNone    = "none"

	// RedirectionAnnotation is written on a pod once it is enrolled
	// (value RedirectionEnabled) and removed when it is unenrolled.
	RedirectionAnnotation = "ambient.istio.io/redirection"
	RedirectionEnabled    = "enabled"

	// Labels that mark gateway and waypoint pods, which carry their own HBONE
	// and are never captured.
	gatewayManagedLabel = "gateway.istio.io/managed"
	gatewayNameLabel    = "gateway.networking.k8s.io/gateway-name"
	// sidecarStatusAnnotation marks a pod with an injected Istio sidecar,
	// which does its own redirection.
	sidecarStatusAnnotation = "sidecar.istio.io/status"
)

// Decision says whether a pod belongs in the mesh and why; Reason is short
// and stable, for logs, the CNI response and tests.
type Decision struct {
	Ambient bool
	Reason  string
}

// Decide says whether pod should be enrolled, given its namespace (nil when
// unknown) and the namespace the mesh's own components run in. It is a pure
// function of its arguments.
//
// The pod label wins over the namespace label in both directions: a pod
// labeled ambient is enrolled in any namespace, a pod labeled none never is.
// Host-network pods (nothing to redirect), mesh infrastructure (the
// system namespace: ztunnel, istiod), gateway and waypoint pods, pods with a
// sidecar and pods that have terminated are never enrolled.
func Decide(pod *corev1.Pod, ns *corev1.Namespace, systemNamespace string) Decision {
	switch {
	case pod.Spec.HostNetwork:
		return Decision{Reason: "host network"}
	case pod.Namespace == systemNamespace:
		return Decision{Reason: "mesh infrastructure namespace"}
	case pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed:
		return Decision{Reason: "terminated"}
	case pod.Labels[gatewayManagedLabel] != "" || pod.Labels[gatewayNameLabel] != "":
		return Decision{Reason: "gateway or waypoint"}
	case pod.Annotations[sidecarStatusAnnotation] != "":
		return Decision{Reason: "has a sidecar"}
	}
	switch pod.Labels[DataplaneModeLabel] {
	case DataplaneModeNone:
		return Decision{Reason: "pod opted out"}
	case DataplaneModeAmbient:
		return Decision{Ambient: true, Reason: "pod label"}
	}
	if ns != nil && ns.Labels[DataplaneModeLabel] == DataplaneModeAmbient {
		return Decision{Ambient: true, Reason: "namespace label"}
	}
	return Decision{Reason: "not labeled ambient"}
}
