package model

import (
	"net/netip"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/api/workloadapi"
)

// annotationTrafficDistribution is Istio's legacy spelling of
// spec.trafficDistribution, still honoured when the field is unset.
const annotationTrafficDistribution = "networking.istio.io/traffic-distribution"

// Hostname returns the fully qualified name of a Service.
func Hostname(c Cluster, name, namespace string) string {
	return name + "." + namespace + ".svc." + c.DomainSuffix
}

// ServiceResourceName returns the Address resource name of a Service.
func ServiceResourceName(c Cluster, name, namespace string) string {
	return namespace + "/" + Hostname(c, name, namespace)
}

func (idx *index) buildService(e *serviceEntry) *workloadapi.Service {
	s := e.svc
	ports := make([]*workloadapi.Port, 0, len(s.Spec.Ports))
	for _, p := range s.Spec.Ports {
		ports = append(ports, &workloadapi.Port{ServicePort: uint32(p.Port), TargetPort: numericTargetPort(p)})
	}
	var addrs []*workloadapi.NetworkAddress
	for _, ip := range serviceVIPs(s) {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			// The apiserver validates ClusterIPs; garbage here means a broken object.
			return nil
		}
		addrs = append(addrs, &workloadapi.NetworkAddress{Address: a.AsSlice()})
	}
	return &workloadapi.Service{
		Name:          s.Name,
		Namespace:     s.Namespace,
		Hostname:      Hostname(idx.c, s.Name, s.Namespace),
		Addresses:     addrs,
		Ports:         ports,
		Waypoint:      idx.serviceWaypoint(s).address(),
		LoadBalancing: loadBalancing(s),
		IpFamilies:    ipFamilies(s),
	}
}

// numericTargetPort is the target port when the Service names it by number;
// 0 for a named port, which each workload resolves from its containers.
func numericTargetPort(p corev1.ServicePort) uint32 {
	if p.TargetPort.StrVal != "" {
		return 0
	}
	if p.TargetPort.IntVal == 0 {
		// Unset targetPort defaults to port (the apiserver fills it in; fixtures may not).
		return uint32(p.Port)
	}
	return uint32(p.TargetPort.IntVal)
}

func serviceVIPs(s *corev1.Service) []string {
	ips := s.Spec.ClusterIPs
	if len(ips) == 0 && s.Spec.ClusterIP != "" {
		ips = []string{s.Spec.ClusterIP}
	}
	out := make([]string, 0, len(ips))
	for _, ip := range ips {
		if ip != "" && ip != corev1.ClusterIPNone {
			out = append(out, ip)
		}
	}
	return out
}

var (
	// preferCloseScopes keeps traffic as close as possible, spilling over
	// when nothing closer is healthy.
	preferCloseScopes = []workloadapi.LoadBalancing_Scope{
		workloadapi.LoadBalancing_NETWORK,
		workloadapi.LoadBalancing_REGION,
		workloadapi.LoadBalancing_ZONE,
		workloadapi.LoadBalancing_SUBZONE,
	}
	preferNodeScopes = append(append([]workloadapi.LoadBalancing_Scope{}, preferCloseScopes...), workloadapi.LoadBalancing_NODE)
)

func loadBalancing(s *corev1.Service) *workloadapi.LoadBalancing {
	var lb *workloadapi.LoadBalancing
	td := s.Annotations[annotationTrafficDistribution]
	if s.Spec.TrafficDistribution != nil {
		td = *s.Spec.TrafficDistribution
	}
	switch {
	case strings.EqualFold(td, corev1.ServiceTrafficDistributionPreferClose),
		strings.EqualFold(td, corev1.ServiceTrafficDistributionPreferSameZone):
		lb = &workloadapi.LoadBalancing{RoutingPreference: preferCloseScopes, Mode: workloadapi.LoadBalancing_FAILOVER}
	case strings.EqualFold(td, corev1.ServiceTrafficDistributionPreferSameNode):
		lb = &workloadapi.LoadBalancing{RoutingPreference: preferNodeScopes, Mode: workloadapi.LoadBalancing_FAILOVER}
	}
	if itp := s.Spec.InternalTrafficPolicy; itp != nil && *itp == corev1.ServiceInternalTrafficPolicyLocal {
		// Local means same node only, never spill over.
		lb = &workloadapi.LoadBalancing{
			RoutingPreference: []workloadapi.LoadBalancing_Scope{workloadapi.LoadBalancing_NODE},
			Mode:              workloadapi.LoadBalancing_STRICT,
		}
	}
	if s.Spec.PublishNotReadyAddresses {
		if lb == nil {
			lb = &workloadapi.LoadBalancing{}
		}
		lb.HealthPolicy = workloadapi.LoadBalancing_ALLOW_ALL
	}
	return lb
}

func ipFamilies(s *corev1.Service) workloadapi.IPFamilies {
	switch len(s.Spec.IPFamilies) {
	case 1:
		if s.Spec.IPFamilies[0] == corev1.IPv6Protocol {
			return workloadapi.IPFamilies_IPV6_ONLY
		}
		return workloadapi.IPFamilies_IPV4_ONLY
	case 2:
		return workloadapi.IPFamilies_DUAL
	}
	return workloadapi.IPFamilies_AUTOMATIC
}
