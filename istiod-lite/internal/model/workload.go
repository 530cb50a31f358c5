package model

import (
	"net/netip"
	"regexp"
	"sort"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	"github.com/ambient-mesh/ambient/api/workloadapi"
)

// Labels and annotations read from pods and nodes.
const (
	// AnnotationRedirection is written by the node agent once the pod's
	// traffic is redirected through ztunnel.
	AnnotationRedirection = "ambient.istio.io/redirection"
	// RedirectionEnabled is AnnotationRedirection's enrolled value.
	RedirectionEnabled = "enabled"

	labelCanonicalName     = "service.istio.io/canonical-name"
	labelCanonicalRevision = "service.istio.io/canonical-revision"
	labelWorkloadName      = "service.istio.io/workload-name"
	labelAppName           = "app.kubernetes.io/name"
	labelApp               = "app"
	labelAppVersion        = "app.kubernetes.io/version"
	labelVersion           = "version"
	labelPodTemplateHash   = "pod-template-hash"
	// labelTunnel marks workloads that speak HBONE natively.
	labelTunnel     = "networking.istio.io/tunnel"
	labelRegion     = "topology.kubernetes.io/region"
	labelZone       = "topology.kubernetes.io/zone"
	labelSubzone    = "topology.istio.io/subzone"
	defaultRevision = "latest"
)

// PodUID returns a pod's workload uid: "<cluster>//Pod/<namespace>/<name>".
func PodUID(c Cluster, namespace, name string) string {
	return c.ID + "//Pod/" + namespace + "/" + name
}

func (idx *index) buildPodWorkload(p *corev1.Pod) *workloadapi.Workload {
	if p.Status.Phase == corev1.PodSucceeded || p.Status.Phase == corev1.PodFailed {
		return nil
	}
	addrs := podAddresses(p)
	if len(addrs) == 0 {
		return nil
	}
	w := &workloadapi.Workload{
		Uid:                   PodUID(idx.c, p.Namespace, p.Name),
		Name:                  p.Name,
		Namespace:             p.Namespace,
		Addresses:             addrs,
		Node:                  p.Spec.NodeName,
		ServiceAccount:        serviceAccount(p),
		TrustDomain:           idx.c.TrustDomain,
		ClusterId:             idx.c.ID,
		Locality:              idx.locality(p.Spec.NodeName),
		Services:              idx.podServices(p),
		Status:                podStatus(p),
		Waypoint:              idx.workloadWaypoint(p).address(),
		AuthorizationPolicies: idx.workloadPolicies(p),
	}
	if p.Spec.HostNetwork {
		w.NetworkMode = workloadapi.NetworkMode_HOST_NETWORK
	}
	w.WorkloadType, w.WorkloadName = workloadOwner(p)
	w.CanonicalName, w.CanonicalRevision = canonicalService(p.Labels, w.WorkloadName)
	if p.Annotations[AnnotationRedirection] == RedirectionEnabled {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
	}
	if p.Labels[labelTunnel] == "http" {
		w.TunnelProtocol = workloadapi.TunnelProtocol_HBONE
		w.NativeTunnel = true
	}
	return w
}

func podAddresses(p *corev1.Pod) [][]byte {
	ips := p.Status.PodIPs
	if len(ips) == 0 && p.Status.PodIP != "" {
		ips = []corev1.PodIP{{IP: p.Status.PodIP}}
	}
	out := make([][]byte, 0, len(ips))
	for _, ip := range ips {
		a, err := netip.ParseAddr(ip.IP)
		if err != nil {
			return nil
		}
		out = append(out, a.AsSlice())
	}
	return out
}

func serviceAccount(p *corev1.Pod) string {
	if p.Spec.ServiceAccountName != "" {
		return p.Spec.ServiceAccountName
	}
	return "default"
}

// podStatus is HEALTHY only for a Ready pod that is not terminating, as an
// EndpointSlice's ready condition would say.
func podStatus(p *corev1.Pod) workloadapi.WorkloadStatus {
	if p.DeletionTimestamp != nil {
		return workloadapi.WorkloadStatus_UNHEALTHY
	}
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			if c.Status == corev1.ConditionTrue {
				return workloadapi.WorkloadStatus_HEALTHY
			}
			break
		}
	}
	return workloadapi.WorkloadStatus_UNHEALTHY
}

func (idx *index) locality(nodeName string) *workloadapi.Locality {
	n := idx.nodes[nodeName]
	if n == nil {
		return nil
	}
	l := &workloadapi.Locality{Region: n.Labels[labelRegion], Zone: n.Labels[labelZone], Subzone: n.Labels[labelSubzone]}
	if l.Region == "" && l.Zone == "" && l.Subzone == "" {
		return nil
	}
	return l
}

// cronJobName matches the Jobs a CronJob creates: "<cronjob>-<scheduled minute>".
var cronJobName = regexp.MustCompile(`^(.+)-\d{8,10}$`)

// workloadOwner derives the workload kind and name from the pod's controller
// chain without reading the owners themselves: a ReplicaSet named
// "<deployment>-<pod-template-hash>" is a Deployment's, a Job named
// "<cronjob>-<minutes>" a CronJob's; any other controller (StatefulSet,
// DaemonSet, ...) names the workload, and its type is POD, the closest the
// wire enum has.
func workloadOwner(p *corev1.Pod) (workloadapi.WorkloadType, string) {
	if n := p.Labels[labelWorkloadName]; n != "" {
		return workloadapi.WorkloadType_POD, n
	}
	var owner *struct{ kind, name string }
	for _, ref := range p.OwnerReferences {
		if ref.Controller != nil && *ref.Controller {
			owner = &struct{ kind, name string }{ref.Kind, ref.Name}
			break
		}
	}
	if owner == nil && len(p.OwnerReferences) > 0 {
		owner = &struct{ kind, name string }{p.OwnerReferences[0].Kind, p.OwnerReferences[0].Name}
	}
	if owner == nil {
		return workloadapi.WorkloadType_POD, p.Name
	}
	switch owner.kind {
	case "ReplicaSet":
		if h := p.Labels[labelPodTemplateHash]; h != "" && strings.HasSuffix(owner.name, "-"+h) {
			return workloadapi.WorkloadType_DEPLOYMENT, strings.TrimSuffix(owner.name, "-"+h)
		}
		return workloadapi.WorkloadType_POD, owner.name
	case "Job":
		if m := cronJobName.FindStringSubmatch(owner.name); m != nil {
			return workloadapi.WorkloadType_CRONJOB, m[1]
		}
		return workloadapi.WorkloadType_JOB, owner.name
	default:
		return workloadapi.WorkloadType_POD, owner.name
	}
}

// canonicalService returns the telemetry app name and version.
func canonicalService(l map[string]string, workloadName string) (string, string) {
	name := firstLabel(l, labelCanonicalName, labelAppName, labelApp)
	if name == "" {
		name = workloadName
	}
	rev := firstLabel(l, labelCanonicalRevision, labelAppVersion, labelVersion)
	if rev == "" {
		rev = defaultRevision
	}
	return name, rev
}

func firstLabel(l map[string]string, keys ...string) string {
	for _, k := range keys {
		if v := l[k]; v != "" {
			return v
		}
	}
	return ""
}

// podServices maps every service the pod backs to its port list: services
// whose selector matches the pod, and selector-less services whose
// EndpointSlices list the pod.
func (idx *index) podServices(p *corev1.Pod) map[string]*workloadapi.PortList {
	var out map[string]*workloadapi.PortList
	add := func(e *serviceEntry) {
		if e.built == nil {
			return
		}
		if out == nil {
			out = map[string]*workloadapi.PortList{}
		}
		key := e.built.Namespace + "/" + e.built.Hostname
		if _, seen := out[key]; seen {
			return
		}
		out[key] = podPorts(p, e)
	}
	for _, e := range idx.servicesByNamespace[p.Namespace] {
		if selectsLabels(e.svc.Spec.Selector, p.Labels) {
			add(e)
		}
	}
	for _, k := range idx.sliceServicesByPod[p.Namespace+"/"+p.Name] {
		if e := idx.servicesByName[k]; e != nil && len(e.svc.Spec.Selector) == 0 {
			add(e)
		}
	}
	return out
}

// podPorts resolves the service's target ports for one pod; a named target
// port the pod does not declare (TCP) leaves that port out.
func podPorts(p *corev1.Pod, e *serviceEntry) *workloadapi.PortList {
	pl := &workloadapi.PortList{Ports: make([]*workloadapi.Port, 0, len(e.svc.Spec.Ports))}
	for _, sp := range e.svc.Spec.Ports {
		target := numericTargetPort(sp)
		if name := sp.TargetPort.StrVal; name != "" {
			n, ok := containerPort(p, name)
			if !ok {
				continue
			}
			target = n
		}
		pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: target})
	}
	return pl
}

func containerPort(p *corev1.Pod, name string) (uint32, bool) {
	for _, c := range p.Spec.Containers {
		for _, cp := range c.Ports {
			if cp.Name == name && (cp.Protocol == "" || cp.Protocol == corev1.ProtocolTCP) {
				return uint32(cp.ContainerPort), true
			}
		}
	}
	return 0, false
}

// buildEndpointSliceWorkloads turns EndpointSlice endpoints that are not pods
// (manually managed endpoints of selector-less services) into workloads.
// Their addresses may be shared, so they are HOST_NETWORK: never resolved
// from an address alone.
func (idx *index) buildEndpointSliceWorkloads() []*workloadapi.Workload {
	var out []*workloadapi.Workload
	for _, es := range idx.slices {
		svcName, ok := es.Labels[discoveryv1.LabelServiceName]
		if !ok || es.AddressType == discoveryv1.AddressTypeFQDN {
			continue
		}
		e := idx.servicesByName[es.Namespace+"/"+svcName]
		if e == nil || e.built == nil {
			continue
		}
		var pl *workloadapi.PortList
		seen := map[string]bool{}
		for _, ep := range es.Endpoints {
			if ep.TargetRef != nil && ep.TargetRef.Kind == "Pod" {
				continue // the pod itself is the workload, with far more detail
			}
			if len(ep.Addresses) == 0 || seen[ep.Addresses[0]] {
				continue
			}
			seen[ep.Addresses[0]] = true
			addrs := make([][]byte, 0, len(ep.Addresses))
			for _, a := range ep.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					addrs = nil
					break
				}
				addrs = append(addrs, ip.AsSlice())
			}
			if len(addrs) == 0 {
				continue
			}
			if pl == nil {
				pl = slicePorts(es, e)
			}
			status := workloadapi.WorkloadStatus_HEALTHY
			if ep.Conditions.Ready != nil && !*ep.Conditions.Ready {
				status = workloadapi.WorkloadStatus_UNHEALTHY
			}
			out = append(out, &workloadapi.Workload{
				Uid:         idx.c.ID + "/discovery.k8s.io/EndpointSlice/" + es.Namespace + "/" + es.Name + "/" + ep.Addresses[0],
				Name:        es.Name,
				Namespace:   es.Namespace,
				Addresses:   addrs,
				TrustDomain: idx.c.TrustDomain,
				ClusterId:   idx.c.ID,
				Services:    map[string]*workloadapi.PortList{e.built.Namespace + "/" + e.built.Hostname: pl},
				Status:      status,
				NetworkMode: workloadapi.NetworkMode_HOST_NETWORK,
			})
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Uid < out[j].Uid })
	return out
}

// slicePorts joins the slice's ports (named after service ports, valued with
// target ports) with the Service's ports.
func slicePorts(es *discoveryv1.EndpointSlice, e *serviceEntry) *workloadapi.PortList {
	pl := &workloadapi.PortList{}
	for _, p := range es.Ports {
		if p.Port == nil {
			continue
		}
		if p.Protocol != nil && *p.Protocol != corev1.ProtocolTCP {
			continue
		}
		name := ""
		if p.Name != nil {
			name = *p.Name
		}
		for _, sp := range e.svc.Spec.Ports {
			if sp.Name == name {
				pl.Ports = append(pl.Ports, &workloadapi.Port{ServicePort: uint32(sp.Port), TargetPort: uint32(*p.Port)})
				break
			}
		}
	}
	return pl
}
