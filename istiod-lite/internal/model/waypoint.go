package model

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	gatewayv1 "sigs.k8s.io/gateway-api/apis/v1"

	"github.com/ambient-mesh/ambient/api/workloadapi"
)

// Labels and values of Istio's waypoint conventions.
const (
	// WaypointGatewayClass is the GatewayClass of waypoint Gateways.
	WaypointGatewayClass = "istio-waypoint"
	// LabelUseWaypoint binds a Namespace, Service or Pod to a waypoint by name;
	// "none" opts out at that level.
	LabelUseWaypoint = "istio.io/use-waypoint"
	// LabelUseWaypointNamespace names the waypoint's namespace when it is not
	// the object's own.
	LabelUseWaypointNamespace = "istio.io/use-waypoint-namespace"
	// LabelWaypointFor on a Gateway says which traffic it serves.
	LabelWaypointFor = "istio.io/waypoint-for"
	// LabelGatewayManaged marks objects a gateway controller manages.
	LabelGatewayManaged = "gateway.istio.io/managed"
	// GatewayManagedMesh is LabelGatewayManaged's value for waypoints.
	GatewayManagedMesh = "istio.io-mesh-controller"
	// LabelGatewayName marks the pods and Service of a Gateway's deployment.
	LabelGatewayName = "gateway.networking.k8s.io/gateway-name"

	useWaypointNone = "none"

	waypointForService  = "service"
	waypointForWorkload = "workload"
	waypointForAll      = "all"

	// HBONEPort is the port waypoints (and ztunnel) accept HBONE on.
	HBONEPort = 15008
)

// waypoint is an istio-waypoint Gateway that has an address.
type waypoint struct {
	namespace, name string
	addr            *workloadapi.GatewayAddress
	trafficType     string
	// from and selector are the HBONE listener's allowedRoutes.namespaces:
	// which namespaces may bind to this waypoint.
	from     gatewayv1.FromNamespaces
	selector labels.Selector
}

func (w *waypoint) address() *workloadapi.GatewayAddress {
	if w == nil {
		return nil
	}
	return w.addr
}

func (w *waypoint) allowsNamespace(ns *corev1.Namespace, name string) bool {
	switch w.from {
	case gatewayv1.NamespacesFromAll:
		return true
	case gatewayv1.NamespacesFromSelector:
		return ns != nil && w.selector != nil && w.selector.Matches(labels.Set(ns.Labels))
	default:
		return w.namespace == name
	}
}

func buildWaypoints(c Cluster, gws []*gatewayv1.Gateway, services map[string]*serviceEntry) map[string]*waypoint {
	out := map[string]*waypoint{}
	for _, gw := range gws {
		if gw.Spec.GatewayClassName != WaypointGatewayClass {
			continue
		}
		addr := gatewayAddress(c, gw, services)
		if addr == nil {
			// Not deployed yet: bindings to it resolve to nothing until it is.
			continue
		}
		w := &waypoint{namespace: gw.Namespace, name: gw.Name, addr: addr, trafficType: waypointForService, from: gatewayv1.NamespacesFromSame}
		if tt, ok := gw.Labels[LabelWaypointFor]; ok {
			w.trafficType = tt
		}
		for _, l := range gw.Spec.Listeners {
			if l.Protocol != "HBONE" || l.Port != HBONEPort {
				continue
			}
			if l.AllowedRoutes != nil && l.AllowedRoutes.Namespaces != nil {
				if f := l.AllowedRoutes.Namespaces.From; f != nil {
					w.from = *f
				}
				if s := l.AllowedRoutes.Namespaces.Selector; s != nil {
					if sel, err := metav1.LabelSelectorAsSelector(s); err == nil {
						w.selector = sel
					}
				}
			}
			break
		}
		out[gw.Namespace+"/"+gw.Name] = w
	}
	return out
}

// gatewayAddress prefers the Gateway's status (hostname, then IP), as Istio
// does, and falls back to the Service the waypoint deployer creates under the
// Gateway's name, so bindings work before status is written.
func gatewayAddress(c Cluster, gw *gatewayv1.Gateway, services map[string]*serviceEntry) *workloadapi.GatewayAddress {
	for _, a := range gw.Status.Addresses {
		if a.Type != nil && *a.Type == gatewayv1.HostnameAddressType {
			return &workloadapi.GatewayAddress{
				Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: gw.Namespace, Hostname: a.Value}},
				HboneMtlsPort: HBONEPort,
			}
		}
	}
	for _, a := range gw.Status.Addresses {
		if a.Type == nil || *a.Type == gatewayv1.IPAddressType {
			if ip, err := netip.ParseAddr(a.Value); err == nil {
				return &workloadapi.GatewayAddress{
					Destination:   &workloadapi.GatewayAddress_Address{Address: &workloadapi.NetworkAddress{Address: ip.AsSlice()}},
					HboneMtlsPort: HBONEPort,
				}
			}
		}
	}
	if e, ok := services[gw.Namespace+"/"+gw.Name]; ok && isWaypointService(e.svc, gw.Name) {
		return &workloadapi.GatewayAddress{
			Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: gw.Namespace, Hostname: Hostname(c, gw.Name, gw.Namespace)}},
			HboneMtlsPort: HBONEPort,
		}
	}
	return nil
}

func isWaypointService(s *corev1.Service, gwName string) bool {
	return s.Labels[LabelGatewayManaged] == GatewayManagedMesh || s.Labels[LabelGatewayName] == gwName
}

// useWaypoint reads the use-waypoint labels of one object: the key of the
// waypoint it names, or none=true when it opts out.
func useWaypoint(objLabels map[string]string, defaultNamespace string) (key string, none bool) {
	name, ok := objLabels[LabelUseWaypoint]
	if !ok || name == "" {
		return "", false
	}
	if name == useWaypointNone {
		return "", true
	}
	ns := defaultNamespace
	if o, ok := objLabels[LabelUseWaypointNamespace]; ok && o != "" {
		ns = o
	}
	return ns + "/" + name, false
}

// waypointFor resolves the waypoint of an object: its own label first, then
// its namespace's. A label naming a waypoint that does not exist (or is not
// ready, or does not admit the namespace) yields no waypoint rather than
// falling back, as in Istio.
func (idx *index) waypointFor(objLabels map[string]string, namespace string) *waypoint {
	ns := idx.namespaces[namespace]
	key, none := useWaypoint(objLabels, namespace)
	if none {
		return nil
	}
	if key == "" && ns != nil {
		key, _ = useWaypoint(ns.Labels, namespace)
	}
	if key == "" {
		return nil
	}
	w := idx.waypoints[key]
	if w == nil || !w.allowsNamespace(ns, namespace) {
		return nil
	}
	return w
}

func (idx *index) serviceWaypoint(s *corev1.Service) *waypoint {
	if s.Labels[LabelGatewayManaged] == GatewayManagedMesh {
		// A waypoint's own Service never goes through a waypoint.
		return nil
	}
	w := idx.waypointFor(s.Labels, s.Namespace)
	if w == nil || (w.trafficType != waypointForService && w.trafficType != waypointForAll) {
		return nil
	}
	return w
}

func (idx *index) workloadWaypoint(p *corev1.Pod) *waypoint {
	if gw, ok := p.Labels[LabelGatewayName]; ok {
		if _, isWaypoint := idx.waypoints[p.Namespace+"/"+gw]; isWaypoint {
			// A waypoint's own pods never go through a waypoint.
			return nil
		}
	}
	w := idx.waypointFor(p.Labels, p.Namespace)
	if w == nil || (w.trafficType != waypointForWorkload && w.trafficType != waypointForAll) {
		return nil
	}
	return w
}
