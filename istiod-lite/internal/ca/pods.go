package ca

import (
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/labels"
	corelisters "k8s.io/client-go/listers/core/v1"
)

// podsOnNode answers PodsOnNode from an informer-backed pod lister.
type podsOnNode struct {
	lister corelisters.PodLister
}

// NewPodsOnNode answers PodsOnNode from l (an informer's lister, so no
// request reaches the API server).
func NewPodsOnNode(l corelisters.PodLister) PodsOnNode {
	return podsOnNode{lister: l}
}

// ServiceAccountOnNode reports whether a pod of service account ns/sa is
// scheduled to node and has not finished. A scheduled pod that is still
// Pending counts: the node agent hands new pods to ztunnel before their
// containers start, and ztunnel needs their certificate by then.
func (p podsOnNode) ServiceAccountOnNode(ns, sa, node string) bool {
	if ns == "" || sa == "" || node == "" {
		return false
	}
	pods, err := p.lister.Pods(ns).List(labels.Everything())
	if err != nil {
		return false
	}
	for _, pod := range pods {
		if pod.Spec.NodeName != node || serviceAccountOf(pod) != sa {
			continue
		}
		switch pod.Status.Phase {
		case corev1.PodSucceeded, corev1.PodFailed:
			continue
		}
		return true
	}
	return false
}

func serviceAccountOf(pod *corev1.Pod) string {
	if pod.Spec.ServiceAccountName == "" {
		return "default"
	}
	return pod.Spec.ServiceAccountName
}
