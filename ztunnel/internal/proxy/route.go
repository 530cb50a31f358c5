package proxy

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// routeKind is how an outbound connection leaves ztunnel.
type routeKind int

const (
	// routeHBONE tunnels the connection over HBONE mTLS to a mesh
	// workload's (or a waypoint's) HBONE port.
	routeHBONE routeKind = iota + 1
	// routeDirect connects in plain TCP to a workload outside the mesh.
	routeDirect
	// routePassthrough connects in plain TCP to the original destination,
	// which the mesh does not know.
	routePassthrough
)

func (k routeKind) String() string {
	switch k {
	case routeHBONE:
		return "hbone"
	case routeDirect:
		return "direct"
	case routePassthrough:
		return "passthrough"
	}
	return "unknown"
}

// route is where an outbound connection goes.
type route struct {
	kind routeKind
	// dial is the TCP address to connect to: the HBONE port of the
	// endpoint or waypoint, the endpoint's target port, or the original
	// destination.
	dial netip.AddrPort
	// authority is the HBONE CONNECT :authority (routeHBONE only).
	authority netip.AddrPort
	// dst is the workload dialed (the endpoint or the waypoint), nil for
	// passthrough.
	dst *state.Workload
	// identity is dst's SPIFFE ID, which its certificate must carry
	// (routeHBONE only).
	identity string
	// service is the service the client addressed, nil for a pod address.
	service *state.Service
	// waypoint is set when the next hop is a waypoint.
	waypoint bool
}

// errNoRoute is wrapped by resolve's errors for destinations the mesh knows
// but cannot reach now (no endpoint, unknown waypoint): the connection is
// refused rather than sent somewhere it must not go.
var errNoRoute = errors.New("no route")

// resolve decides where a connection from src (nil when the source pod is
// not in the state yet) to origDst goes:
//
//   - a service VIP:port goes to the service's waypoint when it has one
//     (authority: the original VIP:port), else to an endpoint picked for
//     src, or to its workload's waypoint when that has one;
//   - a workload's IP goes to that workload, or its waypoint;
//   - anything else passes through to origDst.
//
// Mesh workloads (tunnel protocol HBONE) are reached over HBONE on their
// HBONE port with authority ip:targetPort; others in plain TCP.
func resolve(st *state.Store, src *state.Workload, origDst netip.AddrPort) (route, error) {
	var network string
	if src != nil {
		network = src.Info.GetNetwork()
	}
	ip, port := origDst.Addr().Unmap(), origDst.Port()
	origDst = netip.AddrPortFrom(ip, port)

	if svc := st.ServiceByVIPPort(network, ip, port); svc != nil {
		wp, ok, err := st.ServiceWaypoint(svc)
		if err != nil {
			return route{service: svc}, fmt.Errorf("%w: service %s: %w", errNoRoute, svc.Key, err)
		}
		if ok && !isWaypoint(src, wp) {
			r, err := waypointRoute(st, src, wp, origDst)
			r.service = svc
			return r, err
		}
		ep, err := st.PickEndpoint(src, svc, port)
		if errors.Is(err, state.ErrPassthrough) {
			return route{kind: routePassthrough, dial: origDst, service: svc}, nil
		}
		if err != nil {
			return route{service: svc}, fmt.Errorf("%w: service %s port %d: %w", errNoRoute, svc.Key, port, err)
		}
		addr, ok := ep.AddrPort(ip)
		if !ok {
			return route{service: svc}, fmt.Errorf("%w: endpoint %s of %s has no address", errNoRoute, ep.Workload.UID(), svc.Key)
		}
		addr = netip.AddrPortFrom(addr.Addr(), ep.TargetPort)
		r, err := workloadRoute(st, src, ep.Workload, addr)
		r.service = svc
		return r, err
	}

	if w := st.WorkloadByIP(network, ip); w != nil {
		return workloadRoute(st, src, w, origDst)
	}
	return route{kind: routePassthrough, dial: origDst}, nil
}

// workloadRoute reaches w at addr, through w's waypoint when it has one.
func workloadRoute(st *state.Store, src, w *state.Workload, addr netip.AddrPort) (route, error) {
	wp, ok, err := st.WorkloadWaypoint(w)
	if err != nil {
		return route{dst: w}, fmt.Errorf("%w: workload %s: %w", errNoRoute, w.UID(), err)
	}
	if ok && !isWaypoint(src, wp) && !isWaypoint(w, wp) {
		return waypointRoute(st, src, wp, addr)
	}
	if w.Info.GetTunnelProtocol() != workloadapi.TunnelProtocol_HBONE {
		return route{kind: routeDirect, dial: addr, dst: w}, nil
	}
	return route{
		kind:      routeHBONE,
		dial:      netip.AddrPortFrom(addr.Addr(), state.HBONEPort),
		authority: addr,
		dst:       w,
		identity:  w.Identity,
	}, nil
}

// waypointRoute reaches a waypoint, asking it for authority.
func waypointRoute(st *state.Store, src *state.Workload, wp state.Waypoint, authority netip.AddrPort) (route, error) {
	w := wp.Workload
	var ip netip.Addr
	switch {
	case wp.Service != nil:
		ep, err := pickWaypointEndpoint(st, src, wp)
		if err != nil {
			return route{}, err
		}
		w = ep.Workload
		ap, ok := ep.AddrPort(authority.Addr())
		if !ok {
			return route{}, fmt.Errorf("%w: waypoint endpoint %s has no address", errNoRoute, w.UID())
		}
		ip = ap.Addr()
	case w != nil:
		ip = wp.Address
		if !slices.Contains(w.Addresses, ip) && len(w.Addresses) > 0 {
			ip = w.Addresses[0]
		}
	default:
		return route{}, fmt.Errorf("%w: waypoint %s is not a known workload or service", errNoRoute, wp.Address)
	}
	return route{
		kind:      routeHBONE,
		dial:      netip.AddrPortFrom(ip, wp.Port),
		authority: authority,
		dst:       w,
		identity:  w.Identity,
		waypoint:  true,
	}, nil
}

// pickWaypointEndpoint picks a pod of the waypoint's service: one serving
// the waypoint's HBONE port, or any pod of it when the service does not
// list that port.
func pickWaypointEndpoint(st *state.Store, src *state.Workload, wp state.Waypoint) (state.Endpoint, error) {
	ep, err := st.PickEndpoint(src, wp.Service, wp.Port)
	if errors.Is(err, state.ErrNoEndpoint) {
		for _, p := range wp.Service.Info.GetPorts() {
			if ep, err2 := st.PickEndpoint(src, wp.Service, uint16(p.GetServicePort())); err2 == nil {
				return ep, nil
			}
		}
	}
	if err != nil {
		return state.Endpoint{}, fmt.Errorf("%w: waypoint %s: %w", errNoRoute, wp.Service.Key, err)
	}
	return ep, nil
}

// isWaypoint reports whether w is (a pod of) the waypoint wp, whose own
// traffic must not be sent back to itself.
func isWaypoint(w *state.Workload, wp state.Waypoint) bool {
	switch {
	case w == nil:
		return false
	case wp.Workload != nil:
		return wp.Workload.UID() == w.UID()
	case wp.Service != nil:
		_, ok := w.Info.GetServices()[wp.Service.Key]
		return ok
	}
	return false
}
