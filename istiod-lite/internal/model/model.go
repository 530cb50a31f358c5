package model

import (
	"sort"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
)

// Cluster holds the mesh-wide settings that shape resource names and identities.
type Cluster struct {
	// ID is the cluster ID, the first segment of every workload uid.
	ID string
	// TrustDomain is the SPIFFE trust domain of workload identities.
	TrustDomain string
	// RootNamespace holds mesh-wide policies.
	RootNamespace string
	// DomainSuffix ends every service hostname.
	DomainSuffix string
}

// DefaultCluster returns Istio's defaults: cluster Kubernetes, trust domain
// and domain suffix cluster.local, root namespace istio-system.
func DefaultCluster() Cluster {
	return Cluster{ID: "Kubernetes", TrustDomain: "cluster.local", RootNamespace: "istio-system", DomainSuffix: "cluster.local"}
}

// Inputs are the watched objects Compute reads. Slices may be in any order.
type Inputs struct {
	Namespaces            []*corev1.Namespace
	Pods                  []*corev1.Pod
	Services              []*corev1.Service
	EndpointSlices        []*discoveryv1.EndpointSlice
	Nodes                 []*corev1.Node
	AuthorizationPolicies []*securityv1.AuthorizationPolicy
	PeerAuthentications   []*securityv1.PeerAuthentication
	Gateways              []*gatewayv1.Gateway
}

// Resources is the computed mesh state.
type Resources struct {
	// Addresses by xDS resource name: a workload's uid or a service's
	// "namespace/hostname".
	Addresses map[string]*workloadapi.Address
	// Authorizations by xDS resource name "namespace/name".
	Authorizations map[string]*security.Authorization
	// PolicyStatus holds, for every AuthorizationPolicy, the conditions of the
	// types this package owns (ConditionZtunnelAccepted). An empty slice means
	// none of them should be present on the object.
	PolicyStatus map[types.NamespacedName][]metav1.Condition
}

// Compute derives the mesh state from in. It is pure and deterministic.
func Compute(c Cluster, in Inputs) Resources {
	idx := newIndex(c, in)
	res := Resources{
		Addresses:      make(map[string]*workloadapi.Address, len(in.Pods)+len(in.Services)),
		Authorizations: make(map[string]*security.Authorization),
		PolicyStatus:   make(map[types.NamespacedName][]metav1.Condition, len(in.AuthorizationPolicies)),
	}
	for _, p := range idx.policies {
		res.PolicyStatus[p.key] = p.conditions
		if p.authz != nil {
			res.Authorizations[p.resourceName()] = p.authz
		}
	}
	for _, pa := range idx.peerAuthns {
		if pa.authz != nil {
			res.Authorizations[pa.resourceName()] = pa.authz
		}
	}
	for _, s := range idx.services {
		svc := idx.buildService(s)
		if svc == nil {
			continue
		}
		s.built = svc
		res.Addresses[svc.Namespace+"/"+svc.Hostname] = &workloadapi.Address{Type: &workloadapi.Address_Service{Service: svc}}
	}
	for _, p := range idx.pods {
		w := idx.buildPodWorkload(p)
		if w == nil {
			continue
		}
		res.Addresses[w.Uid] = &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
	}
	for _, w := range idx.buildEndpointSliceWorkloads() {
		if _, dup := res.Addresses[w.Uid]; dup {
			continue
		}
		res.Addresses[w.Uid] = &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}
	}
	return res
}

// sortedByName orders objects by namespace then name, so every loop over
// inputs is independent of the order the informers listed them in.
func sortedByName[T metav1.Object](objs []T) []T {
	out := append([]T(nil), objs...)
	sort.Slice(out, func(i, j int) bool {
		if out[i].GetNamespace() != out[j].GetNamespace() {
			return out[i].GetNamespace() < out[j].GetNamespace()
		}
		return out[i].GetName() < out[j].GetName()
	})
	return out
}

// olderThan orders by creation time, then namespace/name: Istio's rule for
// picking the effective one among conflicting policies.
func olderThan(a, b metav1.Object) bool {
	ta, tb := a.GetCreationTimestamp(), b.GetCreationTimestamp()
	if !ta.Equal(&tb) {
		return ta.Before(&tb)
	}
	if a.GetNamespace() != b.GetNamespace() {
		return a.GetNamespace() < b.GetNamespace()
	}
	return a.GetName() < b.GetName()
}

// selectsLabels reports whether every matchLabels entry is in labels; an
// empty matchLabels selects everything.
func selectsLabels(matchLabels, labels map[string]string) bool {
	for k, v := range matchLabels {
		if lv, ok := labels[k]; !ok || lv != v {
			return false
		}
	}
	return true
}
