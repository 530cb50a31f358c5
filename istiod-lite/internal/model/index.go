package model

import (
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-mesh/ambient/api/workloadapi"
)

// index holds the inputs sorted and keyed the ways the builders look them up.
type index struct {
	c          Cluster
	namespaces map[string]*corev1.Namespace
	nodes      map[string]*corev1.Node
	pods       []*corev1.Pod
	services   []*serviceEntry
	// servicesByNamespace lists the services with a selector, per namespace.
	servicesByNamespace map[string][]*serviceEntry
	// servicesByName is keyed "namespace/name".
	servicesByName map[string]*serviceEntry
	slices         []*discoveryv1.EndpointSlice
	// sliceServicesByPod maps a pod ("namespace/name") to the services
	// ("namespace/name") whose EndpointSlices list it by targetRef.
	sliceServicesByPod map[string][]string
	waypoints          map[string]*waypoint
	policies           []*policyEntry
	// selectorPolicies lists, per namespace, the converted policies with a
	// workload selector (the root namespace's apply mesh-wide).
	selectorPolicies map[string][]*policyEntry
	peerAuthns       []*peerAuthnEntry
	peerAuthnsByNS   map[string][]*peerAuthnEntry
}

type serviceEntry struct {
	svc   *corev1.Service
	built *workloadapi.Service
}

func newIndex(c Cluster, in Inputs) *index {
	idx := &index{
		c:                   c,
		namespaces:          make(map[string]*corev1.Namespace, len(in.Namespaces)),
		nodes:               make(map[string]*corev1.Node, len(in.Nodes)),
		pods:                sortedByName(in.Pods),
		servicesByNamespace: map[string][]*serviceEntry{},
		servicesByName:      make(map[string]*serviceEntry, len(in.Services)),
		slices:              sortedByName(in.EndpointSlices),
		sliceServicesByPod:  map[string][]string{},
		selectorPolicies:    map[string][]*policyEntry{},
		peerAuthnsByNS:      map[string][]*peerAuthnEntry{},
	}
	for _, ns := range in.Namespaces {
		idx.namespaces[ns.Name] = ns
	}
	for _, n := range in.Nodes {
		idx.nodes[n.Name] = n
	}
	for _, s := range sortedByName(in.Services) {
		if s.Spec.Type == corev1.ServiceTypeExternalName {
			// ExternalName services are plain DNS aliases; ambient leaves them to DNS.
			continue
		}
		e := &serviceEntry{svc: s}
		idx.services = append(idx.services, e)
		idx.servicesByName[s.Namespace+"/"+s.Name] = e
		if len(s.Spec.Selector) > 0 {
			idx.servicesByNamespace[s.Namespace] = append(idx.servicesByNamespace[s.Namespace], e)
		}
	}
	for _, es := range idx.slices {
		svcName, ok := es.Labels[discoveryv1.LabelServiceName]
		if !ok || es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		for _, ep := range es.Endpoints {
			if ep.TargetRef == nil || ep.TargetRef.Kind != "Pod" {
				continue
			}
			ns := ep.TargetRef.Namespace
			if ns == "" {
				ns = es.Namespace
			}
			k := ns + "/" + ep.TargetRef.Name
			idx.sliceServicesByPod[k] = appendUnique(idx.sliceServicesByPod[k], es.Namespace+"/"+svcName)
		}
	}
	idx.waypoints = buildWaypoints(c, in.Gateways, idx.servicesByName)
	idx.policies = convertAuthorizationPolicies(c, sortedByName(in.AuthorizationPolicies))
	for _, p := range idx.policies {
		if p.authz != nil && p.selector != nil {
			idx.selectorPolicies[p.key.Namespace] = append(idx.selectorPolicies[p.key.Namespace], p)
		}
	}
	idx.peerAuthns = convertPeerAuthentications(c, sortedByName(in.PeerAuthentications))
	for _, pa := range idx.peerAuthns {
		idx.peerAuthnsByNS[pa.obj.Namespace] = append(idx.peerAuthnsByNS[pa.obj.Namespace], pa)
	}
	return idx
}

func appendUnique(list []string, v string) []string {
	for _, e := range list {
		if e == v {
			return list
		}
	}
	return append(list, v)
}

func nsName(namespace, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: namespace, Name: name}
}
