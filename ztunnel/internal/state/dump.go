package state

import (
	"math/rand/v2"
	"net/netip"
	"slices"
	"strconv"
	"strings"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"

	"github.com/ambient-mesh/ambient/ztunnel/internal/policy"
)

// randN is the endpoint picker's source of randomness (concurrency-safe).
func randN(n uint64) uint64 { return rand.Uint64N(n) }

// Dump is the state as the admin /config_dump shows it: plain JSON with
// addresses as text, sorted for stable output.
type Dump struct {
	Workloads []WorkloadDump `json:"workloads"`
	Services  []ServiceDump  `json:"services"`
	Policies  []PolicyDump   `json:"policies"`
}

// WorkloadDump is one workload in a Dump.
type WorkloadDump struct {
	UID                   string              `json:"uid"`
	Name                  string              `json:"name"`
	Namespace             string              `json:"namespace"`
	Addresses             []string            `json:"addresses,omitempty"`
	Hostname              string              `json:"hostname,omitempty"`
	Network               string              `json:"network,omitempty"`
	Identity              string              `json:"identity"`
	Protocol              string              `json:"protocol"`
	Node                  string              `json:"node,omitempty"`
	Locality              string              `json:"locality,omitempty"`
	ClusterID             string              `json:"clusterId,omitempty"`
	WorkloadName          string              `json:"workloadName,omitempty"`
	CanonicalName         string              `json:"canonicalName,omitempty"`
	CanonicalRevision     string              `json:"canonicalRevision,omitempty"`
	Status                string              `json:"status"`
	Waypoint              string              `json:"waypoint,omitempty"`
	Services              map[string][]string `json:"services,omitempty"`
	AuthorizationPolicies []string            `json:"authorizationPolicies,omitempty"`
}

// ServiceDump is one service in a Dump.
type ServiceDump struct {
	Key           string   `json:"key"`
	Name          string   `json:"name"`
	Namespace     string   `json:"namespace"`
	Hostname      string   `json:"hostname"`
	VIPs          []string `json:"vips,omitempty"`
	Ports         []string `json:"ports,omitempty"`
	Waypoint      string   `json:"waypoint,omitempty"`
	LoadBalancing string   `json:"loadBalancing,omitempty"`
	Endpoints     []string `json:"endpoints"`
}

// PolicyDump is one authorization policy in a Dump.
type PolicyDump struct {
	Name   string `json:"name"`
	Scope  string `json:"scope"`
	Action string `json:"action"`
	// DryRun is set for a policy that is evaluated and logged, not enforced.
	DryRun bool `json:"dryRun,omitempty"`
	// Rules are OR-ed; each is a list of clauses (AND-ed), each a list of
	// matches (OR-ed).
	Rules [][][]MatchDump `json:"rules"`
}

// MatchDump is one Match of a policy, CIDRs and string matches as text
// ("exact", "prefix*", "*suffix", "*" for presence).
type MatchDump struct {
	Namespaces          []string `json:"namespaces,omitempty"`
	NotNamespaces       []string `json:"notNamespaces,omitempty"`
	Principals          []string `json:"principals,omitempty"`
	NotPrincipals       []string `json:"notPrincipals,omitempty"`
	SourceIPs           []string `json:"sourceIps,omitempty"`
	NotSourceIPs        []string `json:"notSourceIps,omitempty"`
	DestinationIPs      []string `json:"destinationIps,omitempty"`
	NotDestinationIPs   []string `json:"notDestinationIps,omitempty"`
	DestinationPorts    []uint32 `json:"destinationPorts,omitempty"`
	NotDestinationPorts []uint32 `json:"notDestinationPorts,omitempty"`
}

// Snapshot returns a consistent copy of the state for /config_dump.
func (s *Store) Snapshot() Dump {
	s.mu.RLock()
	defer s.mu.RUnlock()
	d := Dump{
		Workloads: make([]WorkloadDump, 0, len(s.workloads)),
		Services:  make([]ServiceDump, 0, len(s.services)),
		Policies:  make([]PolicyDump, 0, len(s.policies)),
	}
	for _, w := range s.workloads {
		d.Workloads = append(d.Workloads, dumpWorkload(w))
	}
	for _, svc := range s.services {
		sd := dumpService(svc)
		for uid := range s.endpoints[svc.Key] {
			sd.Endpoints = append(sd.Endpoints, uid)
		}
		slices.Sort(sd.Endpoints)
		d.Services = append(d.Services, sd)
	}
	for _, p := range s.policies {
		d.Policies = append(d.Policies, dumpPolicy(p))
	}
	slices.SortFunc(d.Workloads, func(a, b WorkloadDump) int { return strings.Compare(a.UID, b.UID) })
	slices.SortFunc(d.Services, func(a, b ServiceDump) int { return strings.Compare(a.Key, b.Key) })
	slices.SortFunc(d.Policies, func(a, b PolicyDump) int { return strings.Compare(a.Name, b.Name) })
	return d
}

func dumpWorkload(w *Workload) WorkloadDump {
	i := w.Info
	wd := WorkloadDump{
		UID: i.GetUid(), Name: i.GetName(), Namespace: i.GetNamespace(), Hostname: i.GetHostname(),
		Network: i.GetNetwork(), Identity: w.Identity, Protocol: i.GetTunnelProtocol().String(),
		Node: i.GetNode(), ClusterID: i.GetClusterId(), WorkloadName: i.GetWorkloadName(),
		CanonicalName: i.GetCanonicalName(), CanonicalRevision: i.GetCanonicalRevision(),
		Status: i.GetStatus().String(), Waypoint: gatewayString(i.GetWaypoint()),
		AuthorizationPolicies: i.GetAuthorizationPolicies(),
	}
	for _, a := range w.Addresses {
		wd.Addresses = append(wd.Addresses, a.String())
	}
	if l := i.GetLocality(); l != nil {
		wd.Locality = l.GetRegion() + "/" + l.GetZone() + "/" + l.GetSubzone()
	}
	if len(i.GetServices()) > 0 {
		wd.Services = make(map[string][]string, len(i.GetServices()))
		for key, pl := range i.GetServices() {
			wd.Services[key] = portStrings(pl.GetPorts())
		}
	}
	return wd
}

func dumpService(svc *Service) ServiceDump {
	i := svc.Info
	sd := ServiceDump{
		Key: svc.Key, Name: i.GetName(), Namespace: i.GetNamespace(), Hostname: i.GetHostname(),
		Ports: portStrings(i.GetPorts()), Waypoint: gatewayString(i.GetWaypoint()),
		Endpoints: []string{},
	}
	for _, na := range svc.Addresses {
		sd.VIPs = append(sd.VIPs, na.String())
	}
	if lb := i.GetLoadBalancing(); lb != nil {
		var b strings.Builder
		b.WriteString(lb.GetMode().String())
		for _, p := range lb.GetRoutingPreference() {
			b.WriteString(" " + p.String())
		}
		b.WriteString(" " + lb.GetHealthPolicy().String())
		sd.LoadBalancing = b.String()
	}
	return sd
}

func portStrings(ps []*workloadapi.Port) []string {
	out := make([]string, 0, len(ps))
	for _, p := range ps {
		out = append(out, uitoa(p.GetServicePort())+"->"+uitoa(p.GetTargetPort()))
	}
	return out
}

func uitoa(v uint32) string { return strconv.FormatUint(uint64(v), 10) }

func gatewayString(g *workloadapi.GatewayAddress) string {
	if g == nil {
		return ""
	}
	port := ":" + uitoa(g.GetHboneMtlsPort())
	if h := g.GetHostname(); h != nil {
		return h.GetNamespace() + "/" + h.GetHostname() + port
	}
	ip, _ := netip.AddrFromSlice(g.GetAddress().GetAddress())
	return NetworkAddr{Network: g.GetAddress().GetNetwork(), Addr: ip}.String() + port
}

func dumpPolicy(p *security.Authorization) PolicyDump {
	pd := PolicyDump{Name: policy.Name(p), Scope: p.GetScope().String(), Action: p.GetAction().String(), DryRun: p.GetDryRun(), Rules: [][][]MatchDump{}}
	for _, r := range p.GetRules() {
		var clauses [][]MatchDump
		for _, c := range r.GetClauses() {
			var ms []MatchDump
			for _, m := range c.GetMatches() {
				ms = append(ms, MatchDump{
					Namespaces: strs(m.GetNamespaces()), NotNamespaces: strs(m.GetNotNamespaces()),
					Principals: strs(m.GetPrincipals()), NotPrincipals: strs(m.GetNotPrincipals()),
					SourceIPs: cidrs(m.GetSourceIps()), NotSourceIPs: cidrs(m.GetNotSourceIps()),
					DestinationIPs: cidrs(m.GetDestinationIps()), NotDestinationIPs: cidrs(m.GetNotDestinationIps()),
					DestinationPorts: m.GetDestinationPorts(), NotDestinationPorts: m.GetNotDestinationPorts(),
				})
			}
			clauses = append(clauses, ms)
		}
		pd.Rules = append(pd.Rules, clauses)
	}
	return pd
}

func strs(sms []*security.StringMatch) []string {
	var out []string
	for _, sm := range sms {
		switch t := sm.GetMatchType().(type) {
		case *security.StringMatch_Exact:
			out = append(out, t.Exact)
		case *security.StringMatch_Prefix:
			out = append(out, t.Prefix+"*")
		case *security.StringMatch_Suffix:
			out = append(out, "*"+t.Suffix)
		case *security.StringMatch_Presence:
			out = append(out, "*")
		}
	}
	return out
}

func cidrs(as []*security.Address) []string {
	var out []string
	for _, a := range as {
		if p, err := policy.Prefix(a); err == nil {
			out = append(out, p.String())
		}
	}
	return out
}
