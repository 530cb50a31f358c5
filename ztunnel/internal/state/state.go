// Package state is ztunnel's view of the mesh as served over delta xDS:
// workloads and services (Address resources) indexed by uid, name and
// address, and authorization policies (Authorization resources) indexed by
// the scope they apply to. It answers the data path's questions: who owns an
// address, which endpoint of a service to connect to, which waypoint to go
// through, and which policies guard a workload.
package state

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"
	"sync"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/ambient-mesh/ambient/ztunnel/internal/policy"
)

// DefaultTrustDomain is the trust domain of a workload that names none.
const DefaultTrustDomain = "cluster.local"

// defaultServiceAccount is the service account of a workload that names none.
const defaultServiceAccount = "default"

// HBONEPort is the port waypoints (and workloads) accept HBONE on when a
// GatewayAddress leaves hbone_mtls_port unset.
const HBONEPort = 15008

// Sentinel errors callers branch on.
var (
	// ErrInvalidResource is wrapped by Apply's error for a resource that
	// cannot be used; the whole update is rejected.
	ErrInvalidResource = errors.New("invalid resource")
	// ErrUnknownType is returned by Apply for a type URL the store does not hold.
	ErrUnknownType = errors.New("unknown resource type")
	// ErrNoEndpoint means a service has no eligible endpoint for the port.
	ErrNoEndpoint = errors.New("no eligible endpoint")
	// ErrPassthrough means the service asks to skip endpoint selection and
	// connect to the original destination (LoadBalancing mode PASSTHROUGH).
	ErrPassthrough = errors.New("passthrough service")
	// ErrUnknownWaypoint means a waypoint is named but not (yet) known; the
	// caller must not bypass it.
	ErrUnknownWaypoint = errors.New("unknown waypoint")
)

// NetworkAddr is an IP address on a network ("" is the default network).
type NetworkAddr struct {
	Network string
	Addr    netip.Addr
}

func (a NetworkAddr) String() string { return a.Network + "/" + a.Addr.String() }

// Workload is a workload as the data path uses it: the wire message and what
// is derived from it once.
type Workload struct {
	// Info is the resource as received; never modified.
	Info *workloadapi.Workload
	// Addresses are Info.Addresses parsed (IPv4 unmapped).
	Addresses []netip.Addr
	// Identity is the workload's SPIFFE ID,
	// "spiffe://<trust domain>/ns/<namespace>/sa/<service account>".
	Identity string
}

// UID is the workload's uid, its resource name.
func (w *Workload) UID() string { return w.Info.GetUid() }

// Healthy reports whether the workload takes traffic.
func (w *Workload) Healthy() bool { return w.Info.GetStatus() == workloadapi.WorkloadStatus_HEALTHY }

// weight is the workload's relative capacity; unset means 1.
func (w *Workload) weight() uint64 {
	if c := w.Info.GetCapacity(); c != nil {
		return uint64(c.GetValue())
	}
	return 1
}

// Service is a service as the data path uses it.
type Service struct {
	// Info is the resource as received; never modified.
	Info *workloadapi.Service
	// Key is "namespace/hostname", the resource name.
	Key string
	// Addresses are the service's VIPs.
	Addresses []NetworkAddr
}

// port returns the service's port entry for port, and whether it serves it.
// A service that lists no ports serves every port.
func (s *Service) port(port uint16) (*workloadapi.Port, bool) {
	ps := s.Info.GetPorts()
	if len(ps) == 0 {
		return nil, true
	}
	for _, p := range ps {
		if p.GetServicePort() == uint32(port) {
			return p, true
		}
	}
	return nil, false
}

// Endpoint is a workload backing a service, with the port that serves the
// requested service port.
type Endpoint struct {
	Workload   *Workload
	TargetPort uint16
}

// AddrPort returns the endpoint's address of the same family as like (the
// address the client dialed), falling back to its first address; ok is false
// for a workload without addresses (known by hostname).
func (e Endpoint) AddrPort(like netip.Addr) (ap netip.AddrPort, ok bool) {
	if len(e.Workload.Addresses) == 0 {
		return netip.AddrPort{}, false
	}
	for _, a := range e.Workload.Addresses {
		if a.Is4() == like.Unmap().Is4() {
			return netip.AddrPortFrom(a, e.TargetPort), true
		}
	}
	return netip.AddrPortFrom(e.Workload.Addresses[0], e.TargetPort), true
}

// Store holds the state. Its zero value is not usable; create it with New.
// All methods are safe for concurrent use. The *Workload, *Service and
// *security.Authorization values it returns are shared and never modified:
// an update replaces them.
type Store struct {
	mu sync.RWMutex
	// All maps below are guarded by mu.

	// workloads by uid.
	workloads map[string]*Workload
	// workloadsByAddr holds the uids owning each address, sorted; usually
	// one, more while a pod IP is reused.
	workloadsByAddr map[NetworkAddr][]string
	// services by "namespace/hostname".
	services map[string]*Service
	// servicesByVIP maps a VIP to its service's key.
	servicesByVIP map[NetworkAddr]string
	// endpoints maps a service key to the uids of the workloads that list it.
	endpoints map[string]map[string]struct{}
	// policies by "namespace/name".
	policies map[string]*security.Authorization
	// globalPolicies holds the names of GLOBAL policies.
	globalPolicies map[string]struct{}
	// namespacePolicies maps a namespace to the names of its NAMESPACE policies.
	namespacePolicies map[string]map[string]struct{}
}

// New returns an empty Store.
func New() *Store {
	return &Store{
		workloads:         map[string]*Workload{},
		workloadsByAddr:   map[NetworkAddr][]string{},
		services:          map[string]*Service{},
		servicesByVIP:     map[NetworkAddr]string{},
		endpoints:         map[string]map[string]struct{}{},
		policies:          map[string]*security.Authorization{},
		globalPolicies:    map[string]struct{}{},
		namespacePolicies: map[string]map[string]struct{}{},
	}
}

// Update is one resource to add or replace.
type Update struct {
	// Name is the xDS resource name: a workload's uid, a service's
	// "namespace/hostname", a policy's "namespace/name".
	Name string
	// Resource is the resource: an *anypb.Any as received, or the decoded
	// *workloadapi.Address or *security.Authorization.
	Resource proto.Message
}

// xdsResource is what an xDS client hands over for each resource
// (api/xds's Resource, envoy's discovery.v3.Resource on the wire).
type xdsResource interface {
	GetName() string
	GetResource() *anypb.Any
}

// Updates adapts the resources of an xDS response, as pkg/xdsclient's
// OnUpdate receives them, to Apply:
//
//	OnUpdate: func(typeURL string, up []*xds.Resource, rm []string) error {
//		return store.Apply(typeURL, state.Updates(up), rm)
//	}
func Updates[R xdsResource](rs []R) []Update {
	out := make([]Update, len(rs))
	for i, r := range rs {
		out[i] = Update{Name: r.GetName(), Resource: r.GetResource()}
	}
	return out
}

// Apply applies one xDS response of typeURL (workloadapi.AddressTypeURL or
// security.AuthorizationTypeURL): upserts added or replaced, removals (by
// resource name) deleted; removing an unknown name is not an error. Every
// resource is decoded and validated first: if any is invalid, Apply returns
// an error wrapping ErrInvalidResource (the client NACKs the response) and
// the store is unchanged.
func (s *Store) Apply(typeURL string, upserts []Update, removals []string) error {
	switch typeURL {
	case workloadapi.AddressTypeURL:
		ws, svcs, err := decodeAddresses(upserts)
		if err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, name := range removals {
			s.removeWorkloadLocked(name)
			s.removeServiceLocked(name)
		}
		for _, w := range ws {
			s.removeServiceLocked(w.UID())
			s.removeWorkloadLocked(w.UID())
			s.addWorkloadLocked(w)
		}
		for _, svc := range svcs {
			s.removeWorkloadLocked(svc.Key)
			s.removeServiceLocked(svc.Key)
			s.addServiceLocked(svc)
		}
		return nil
	case security.AuthorizationTypeURL:
		ps, err := decodePolicies(upserts)
		if err != nil {
			return err
		}
		s.mu.Lock()
		defer s.mu.Unlock()
		for _, name := range removals {
			s.removePolicyLocked(name)
		}
		for _, p := range ps {
			name := policy.Name(p)
			s.removePolicyLocked(name)
			s.policies[name] = p
			switch p.GetScope() {
			case security.Scope_GLOBAL:
				s.globalPolicies[name] = struct{}{}
			case security.Scope_NAMESPACE:
				addToSet(s.namespacePolicies, p.GetNamespace(), name)
			}
		}
		return nil
	}
	return fmt.Errorf("%w %q", ErrUnknownType, typeURL)
}

func invalid(name string, err error) error {
	return fmt.Errorf("%w %q: %w", ErrInvalidResource, name, err)
}

// unpack turns u.Resource into a message of type T.
func unpack[T proto.Message](u Update, newT func() T) (T, error) {
	switch m := u.Resource.(type) {
	case T:
		return m, nil
	case *anypb.Any:
		t := newT()
		if err := m.UnmarshalTo(t); err != nil {
			return t, invalid(u.Name, fmt.Errorf("decoding: %w", err))
		}
		return t, nil
	case nil:
		var zero T
		return zero, invalid(u.Name, errors.New("no resource"))
	default:
		var zero T
		return zero, invalid(u.Name, fmt.Errorf("unexpected message %s", m.ProtoReflect().Descriptor().FullName()))
	}
}

func decodeAddresses(upserts []Update) ([]*Workload, []*Service, error) {
	var ws []*Workload
	var svcs []*Service
	for _, u := range upserts {
		a, err := unpack(u, func() *workloadapi.Address { return &workloadapi.Address{} })
		if err != nil {
			return nil, nil, err
		}
		switch {
		case a.GetWorkload() != nil:
			w, err := newWorkload(a.GetWorkload())
			if err == nil && u.Name != w.UID() {
				err = fmt.Errorf("workload named by uid %q", w.UID())
			}
			if err != nil {
				return nil, nil, invalid(u.Name, err)
			}
			ws = append(ws, w)
		case a.GetService() != nil:
			svc, err := newService(a.GetService())
			if err == nil && u.Name != svc.Key {
				err = fmt.Errorf("service named by %q", svc.Key)
			}
			if err != nil {
				return nil, nil, invalid(u.Name, err)
			}
			svcs = append(svcs, svc)
		default:
			return nil, nil, invalid(u.Name, errors.New("address is neither a workload nor a service"))
		}
	}
	return ws, svcs, nil
}

func decodePolicies(upserts []Update) ([]*security.Authorization, error) {
	ps := make([]*security.Authorization, 0, len(upserts))
	for _, u := range upserts {
		p, err := unpack(u, func() *security.Authorization { return &security.Authorization{} })
		if err != nil {
			return nil, err
		}
		if err := policy.Validate(p); err != nil {
			return nil, invalid(u.Name, err)
		}
		if p.GetName() == "" || p.GetNamespace() == "" {
			return nil, invalid(u.Name, errors.New("policy without name or namespace"))
		}
		if policy.Name(p) != u.Name {
			return nil, invalid(u.Name, fmt.Errorf("policy named by %q", policy.Name(p)))
		}
		ps = append(ps, p)
	}
	return ps, nil
}

func newWorkload(info *workloadapi.Workload) (*Workload, error) {
	if info.GetUid() == "" {
		return nil, errors.New("workload without uid")
	}
	if info.GetNamespace() == "" {
		return nil, errors.New("workload without namespace")
	}
	if len(info.GetAddresses()) == 0 && info.GetHostname() == "" {
		return nil, errors.New("workload without addresses or hostname")
	}
	w := &Workload{Info: info, Addresses: make([]netip.Addr, 0, len(info.GetAddresses()))}
	for _, b := range info.GetAddresses() {
		ip, ok := netip.AddrFromSlice(b)
		if !ok {
			return nil, fmt.Errorf("address of %d bytes, want 4 or 16", len(b))
		}
		w.Addresses = append(w.Addresses, ip.Unmap())
	}
	for key, pl := range info.GetServices() {
		if _, _, ok := strings.Cut(key, "/"); !ok {
			return nil, fmt.Errorf("service key %q is not namespace/hostname", key)
		}
		if err := validatePorts(pl.GetPorts()); err != nil {
			return nil, fmt.Errorf("service %q: %w", key, err)
		}
	}
	if err := validateGateway(info.GetWaypoint()); err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	if err := validateGateway(info.GetNetworkGateway()); err != nil {
		return nil, fmt.Errorf("network gateway: %w", err)
	}
	td, sa := info.GetTrustDomain(), info.GetServiceAccount()
	if td == "" {
		td = DefaultTrustDomain
	}
	if sa == "" {
		sa = defaultServiceAccount
	}
	w.Identity = "spiffe://" + td + "/ns/" + info.GetNamespace() + "/sa/" + sa
	return w, nil
}

func newService(info *workloadapi.Service) (*Service, error) {
	if info.GetNamespace() == "" || info.GetHostname() == "" {
		return nil, errors.New("service without namespace or hostname")
	}
	svc := &Service{Info: info, Key: info.GetNamespace() + "/" + info.GetHostname()}
	for _, na := range info.GetAddresses() {
		ip, ok := netip.AddrFromSlice(na.GetAddress())
		if !ok {
			return nil, fmt.Errorf("address of %d bytes, want 4 or 16", len(na.GetAddress()))
		}
		svc.Addresses = append(svc.Addresses, NetworkAddr{Network: na.GetNetwork(), Addr: ip.Unmap()})
	}
	if err := validatePorts(info.GetPorts()); err != nil {
		return nil, err
	}
	if err := validateGateway(info.GetWaypoint()); err != nil {
		return nil, fmt.Errorf("waypoint: %w", err)
	}
	return svc, nil
}

func validatePorts(ps []*workloadapi.Port) error {
	for _, p := range ps {
		if p.GetServicePort() == 0 || p.GetServicePort() > 65535 || p.GetTargetPort() > 65535 {
			return fmt.Errorf("port %d -> %d out of range", p.GetServicePort(), p.GetTargetPort())
		}
	}
	return nil
}

func validateGateway(g *workloadapi.GatewayAddress) error {
	if g == nil {
		return nil
	}
	if g.GetHboneMtlsPort() > 65535 {
		return fmt.Errorf("port %d out of range", g.GetHboneMtlsPort())
	}
	switch {
	case g.GetHostname() != nil:
		if g.GetHostname().GetNamespace() == "" || g.GetHostname().GetHostname() == "" {
			return errors.New("hostname without namespace or name")
		}
	case g.GetAddress() != nil:
		if _, ok := netip.AddrFromSlice(g.GetAddress().GetAddress()); !ok {
			return fmt.Errorf("address of %d bytes, want 4 or 16", len(g.GetAddress().GetAddress()))
		}
	default:
		return errors.New("neither hostname nor address")
	}
	return nil
}

func addToSet(m map[string]map[string]struct{}, key, v string) {
	set := m[key]
	if set == nil {
		set = map[string]struct{}{}
		m[key] = set
	}
	set[v] = struct{}{}
}

func removeFromSet(m map[string]map[string]struct{}, key, v string) {
	if set := m[key]; set != nil {
		delete(set, v)
		if len(set) == 0 {
			delete(m, key)
		}
	}
}

func (s *Store) addWorkloadLocked(w *Workload) {
	uid := w.UID()
	s.workloads[uid] = w
	if w.Info.GetNetworkMode() != workloadapi.NetworkMode_HOST_NETWORK {
		// Host-network workloads share the node's address: it must never
		// resolve to one of them.
		for _, ip := range w.Addresses {
			na := NetworkAddr{Network: w.Info.GetNetwork(), Addr: ip}
			uids := s.workloadsByAddr[na]
			if i, found := slices.BinarySearch(uids, uid); !found {
				s.workloadsByAddr[na] = slices.Insert(uids, i, uid)
			}
		}
	}
	for key := range w.Info.GetServices() {
		addToSet(s.endpoints, key, uid)
	}
}

func (s *Store) removeWorkloadLocked(uid string) {
	w := s.workloads[uid]
	if w == nil {
		return
	}
	delete(s.workloads, uid)
	for _, ip := range w.Addresses {
		na := NetworkAddr{Network: w.Info.GetNetwork(), Addr: ip}
		uids := s.workloadsByAddr[na]
		if i, found := slices.BinarySearch(uids, uid); found {
			uids = slices.Delete(uids, i, i+1)
		}
		if len(uids) == 0 {
			delete(s.workloadsByAddr, na)
		} else {
			s.workloadsByAddr[na] = uids
		}
	}
	for key := range w.Info.GetServices() {
		removeFromSet(s.endpoints, key, uid)
	}
}

func (s *Store) addServiceLocked(svc *Service) {
	s.services[svc.Key] = svc
	for _, na := range svc.Addresses {
		s.servicesByVIP[na] = svc.Key
	}
}

func (s *Store) removeServiceLocked(key string) {
	svc := s.services[key]
	if svc == nil {
		return
	}
	delete(s.services, key)
	for _, na := range svc.Addresses {
		if s.servicesByVIP[na] == key {
			delete(s.servicesByVIP, na)
		}
	}
}

func (s *Store) removePolicyLocked(name string) {
	p := s.policies[name]
	if p == nil {
		return
	}
	delete(s.policies, name)
	delete(s.globalPolicies, name)
	removeFromSet(s.namespacePolicies, p.GetNamespace(), name)
}

// Workload returns the workload with uid, or nil.
func (s *Store) Workload(uid string) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.workloads[uid]
}

// WorkloadByIP returns the workload that owns ip on network, or nil. When
// several claim it (a pod IP reused before the old pod's removal arrived), a
// healthy one wins, then the smallest uid.
func (s *Store) WorkloadByIP(network string, ip netip.Addr) *Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	uids := s.workloadsByAddr[NetworkAddr{Network: network, Addr: ip.Unmap()}]
	var first *Workload
	for _, uid := range uids {
		w := s.workloads[uid]
		if w.Healthy() {
			return w
		}
		if first == nil {
			first = w
		}
	}
	return first
}

// Service returns the service "namespace/hostname", or nil.
func (s *Store) Service(key string) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.services[key]
}

// ServiceByVIPPort returns the service with VIP ip on network that serves
// port, or nil.
func (s *Store) ServiceByVIPPort(network string, ip netip.Addr, port uint16) *Service {
	s.mu.RLock()
	defer s.mu.RUnlock()
	svc := s.services[s.servicesByVIP[NetworkAddr{Network: network, Addr: ip.Unmap()}]]
	if svc == nil {
		return nil
	}
	if _, ok := svc.port(port); !ok {
		return nil
	}
	return svc
}

// Endpoints returns the workloads backing svc on port, sorted by uid, each
// with its target port: the workload's own mapping for the service if it has
// one, else the service's target port, else the service port itself. Only
// healthy workloads are returned unless the service's health policy is
// ALLOW_ALL. None if svc does not serve port.
func (s *Store) Endpoints(svc *Service, port uint16) []Endpoint {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.endpointsLocked(svc, port)
}

func (s *Store) endpointsLocked(svc *Service, port uint16) []Endpoint {
	sp, ok := svc.port(port)
	if !ok {
		return nil
	}
	allowAll := svc.Info.GetLoadBalancing().GetHealthPolicy() == workloadapi.LoadBalancing_ALLOW_ALL
	uids := s.endpoints[svc.Key]
	eps := make([]Endpoint, 0, len(uids))
	for uid := range uids {
		w := s.workloads[uid]
		if !allowAll && !w.Healthy() {
			continue
		}
		target := uint32(port)
		if t := sp.GetTargetPort(); t != 0 {
			target = t
		}
		for _, p := range w.Info.GetServices()[svc.Key].GetPorts() {
			if p.GetServicePort() == uint32(port) && p.GetTargetPort() != 0 {
				target = p.GetTargetPort()
			}
		}
		eps = append(eps, Endpoint{Workload: w, TargetPort: uint16(target)})
	}
	slices.SortFunc(eps, func(a, b Endpoint) int { return strings.Compare(a.Workload.UID(), b.Workload.UID()) })
	return eps
}

// ServiceWorkloads returns every workload svc selects, healthy or not,
// whatever the port, in uid order: the pods of a waypoint's service, say.
func (s *Store) ServiceWorkloads(svc *Service) []*Workload {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ws := make([]*Workload, 0, len(s.endpoints[svc.Key]))
	for uid := range s.endpoints[svc.Key] {
		ws = append(ws, s.workloads[uid])
	}
	slices.SortFunc(ws, func(a, b *Workload) int { return strings.Compare(a.UID(), b.UID()) })
	return ws
}

// PickEndpoint chooses the endpoint of svc on port for a connection from src
// (nil when the source is not a known workload). Candidates are Endpoints;
// with a routing preference they are narrowed by locality relative to src:
// STRICT keeps only endpoints matching every preferred scope; FAILOVER (also
// used when the mode is unspecified) keeps those matching the longest prefix
// of the preference list. Among the rest, the choice is random, weighted by
// capacity. It returns ErrPassthrough for a PASSTHROUGH service and
// ErrNoEndpoint when nothing is eligible.
func (s *Store) PickEndpoint(src *Workload, svc *Service, port uint16) (Endpoint, error) {
	lb := svc.Info.GetLoadBalancing()
	if lb.GetMode() == workloadapi.LoadBalancing_PASSTHROUGH {
		return Endpoint{}, ErrPassthrough
	}
	eps := s.Endpoints(svc, port)
	if prefs := lb.GetRoutingPreference(); len(prefs) > 0 {
		eps = preferLocal(eps, src, prefs, lb.GetMode() == workloadapi.LoadBalancing_STRICT)
	}
	if ep, ok := pickWeighted(eps, randN); ok {
		return ep, nil
	}
	return Endpoint{}, fmt.Errorf("service %s port %d: %w", svc.Key, port, ErrNoEndpoint)
}

// preferLocal ranks each endpoint by how many scopes of prefs, in order, it
// shares with src, and keeps the best ranked; strict keeps only those sharing
// all of them. An unknown source shares nothing.
func preferLocal(eps []Endpoint, src *Workload, prefs []workloadapi.LoadBalancing_Scope, strict bool) []Endpoint {
	best, kept := -1, eps[:0:0]
	for _, ep := range eps {
		rank := 0
		for _, scope := range prefs {
			if src == nil || !sameScope(scope, src.Info, ep.Workload.Info) {
				break
			}
			rank++
		}
		if strict && rank < len(prefs) {
			continue
		}
		switch {
		case rank > best:
			best, kept = rank, append(kept[:0], ep)
		case rank == best:
			kept = append(kept, ep)
		}
	}
	return kept
}

// sameScope reports whether a and b share the locality dimension scope.
func sameScope(scope workloadapi.LoadBalancing_Scope, a, b *workloadapi.Workload) bool {
	switch scope {
	case workloadapi.LoadBalancing_REGION:
		return a.GetLocality().GetRegion() == b.GetLocality().GetRegion()
	case workloadapi.LoadBalancing_ZONE:
		return a.GetLocality().GetZone() == b.GetLocality().GetZone()
	case workloadapi.LoadBalancing_SUBZONE:
		return a.GetLocality().GetSubzone() == b.GetLocality().GetSubzone()
	case workloadapi.LoadBalancing_NODE:
		return a.GetNode() == b.GetNode()
	case workloadapi.LoadBalancing_CLUSTER:
		return a.GetClusterId() == b.GetClusterId()
	case workloadapi.LoadBalancing_NETWORK:
		return a.GetNetwork() == b.GetNetwork()
	}
	return true
}

// pickWeighted draws one endpoint with probability proportional to its
// capacity; rnd returns a uniform value in [0, n). Endpoints of capacity 0
// are drained and never picked.
func pickWeighted(eps []Endpoint, rnd func(n uint64) uint64) (Endpoint, bool) {
	var total uint64
	for _, ep := range eps {
		total += ep.Workload.weight()
	}
	if total == 0 {
		return Endpoint{}, false
	}
	r := rnd(total)
	for _, ep := range eps {
		w := ep.Workload.weight()
		if r < w {
			return ep, true
		}
		r -= w
	}
	return Endpoint{}, false // unreachable: r < total
}

// Waypoint is where traffic bound to a waypoint goes next.
type Waypoint struct {
	// Service is the waypoint's service when it is named by hostname or its
	// address is a service VIP; connect to one of its endpoints.
	Service *Service
	// Workload is the waypoint when its address is a workload's.
	Workload *Workload
	// Address is the address named by the GatewayAddress, if any.
	Address netip.Addr
	// Port is the waypoint's HBONE port.
	Port uint16
}

// WorkloadWaypoint returns the waypoint of w; ok is false when w has none.
// A waypoint that is named but unknown is ErrUnknownWaypoint.
func (s *Store) WorkloadWaypoint(w *Workload) (wp Waypoint, ok bool, err error) {
	return s.resolveGateway(w.Info.GetWaypoint())
}

// ServiceWaypoint returns the waypoint of svc, as WorkloadWaypoint.
func (s *Store) ServiceWaypoint(svc *Service) (wp Waypoint, ok bool, err error) {
	return s.resolveGateway(svc.Info.GetWaypoint())
}

func (s *Store) resolveGateway(g *workloadapi.GatewayAddress) (Waypoint, bool, error) {
	if g == nil {
		return Waypoint{}, false, nil
	}
	wp := Waypoint{Port: HBONEPort}
	if p := g.GetHboneMtlsPort(); p != 0 {
		wp.Port = uint16(p)
	}
	s.mu.RLock()
	defer s.mu.RUnlock()
	if h := g.GetHostname(); h != nil {
		key := h.GetNamespace() + "/" + h.GetHostname()
		if wp.Service = s.services[key]; wp.Service == nil {
			return Waypoint{}, true, fmt.Errorf("%w: service %s", ErrUnknownWaypoint, key)
		}
		return wp, true, nil
	}
	ip, _ := netip.AddrFromSlice(g.GetAddress().GetAddress()) // validated on receipt
	na := NetworkAddr{Network: g.GetAddress().GetNetwork(), Addr: ip.Unmap()}
	wp.Address = na.Addr
	if svc := s.services[s.servicesByVIP[na]]; svc != nil {
		wp.Service = svc
	} else if uids := s.workloadsByAddr[na]; len(uids) > 0 {
		wp.Workload = s.workloads[uids[0]]
	}
	return wp, true, nil
}

// Policies returns the policies that apply to w: the mesh-wide ones, those
// of w's namespace, and those w lists (by label selection), each once,
// sorted by name. They come in two sets: enforced decide w's connections;
// dryRun, the policies marked dry_run, are only evaluated and logged and
// must never change an enforced decision (a dry-run ALLOW in enforced would
// turn on "no ALLOW matched, deny"). dryRun is nil, without allocating, when
// none applies. Listed policies that are not known yet are skipped.
func (s *Store) Policies(w *Workload) (enforced, dryRun []*security.Authorization) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	ns := s.namespacePolicies[w.Info.GetNamespace()]
	names := make([]string, 0, len(s.globalPolicies)+len(ns)+len(w.Info.GetAuthorizationPolicies()))
	for name := range s.globalPolicies {
		names = append(names, name)
	}
	for name := range ns {
		names = append(names, name)
	}
	for _, name := range w.Info.GetAuthorizationPolicies() {
		if _, ok := s.policies[name]; ok {
			names = append(names, name)
		}
	}
	slices.Sort(names)
	names = slices.Compact(names)
	enforced = make([]*security.Authorization, 0, len(names))
	for _, name := range names {
		if p := s.policies[name]; p.GetDryRun() {
			dryRun = append(dryRun, p)
		} else {
			enforced = append(enforced, p)
		}
	}
	return enforced, dryRun
}

// Policy returns the policy "namespace/name", or nil.
func (s *Store) Policy(name string) *security.Authorization {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.policies[name]
}
