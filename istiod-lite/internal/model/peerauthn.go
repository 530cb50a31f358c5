package model

import (
	"sort"

	"google.golang.org/protobuf/types/known/emptypb"
	securityapi "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/api/security"
)

// ConvertedPeerAuthnPrefix starts the name of the Authorization a
// PeerAuthentication is converted to (Istio's convention; "_" cannot occur in
// Kubernetes names, so it never collides with an AuthorizationPolicy).
const ConvertedPeerAuthnPrefix = "istio_converted_peer_authentication_"

// peerAuthnEntry is one PeerAuthentication and the DENY policy it became.
type peerAuthnEntry struct {
	obj *securityv1.PeerAuthentication
	// authz is the converted policy, nil when this PeerAuthentication never
	// needs one (PERMISSIVE/DISABLE without STRICT ports, or not in effect).
	authz *security.Authorization
	// portLevel is set when authz carries port exceptions, so it replaces,
	// rather than adds to, any inherited STRICT.
	portLevel bool
}

func (e *peerAuthnEntry) resourceName() string {
	return e.obj.Namespace + "/" + ConvertedPeerAuthnPrefix + e.obj.Name
}

func (e *peerAuthnEntry) mode() securityapi.PeerAuthentication_MutualTLS_Mode {
	return e.obj.Spec.GetMtls().GetMode()
}

func (e *peerAuthnEntry) isWorkloadLevel() bool {
	return len(e.obj.Spec.GetSelector().GetMatchLabels()) > 0
}

// denyPlaintext matches connections without a peer identity: what STRICT
// mTLS rejects.
func denyPlaintext() *security.Match {
	return &security.Match{NotPrincipals: []*security.StringMatch{{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}}}
}

// convertPeerAuthentications converts the PeerAuthentications in effect.
// Inheritance follows Istio: mesh (root namespace, no selector) < namespace
// (no selector) < workload (selector, never from the root namespace); among
// several at one level the oldest wins; UNSET inherits.
func convertPeerAuthentications(c Cluster, pas []*securityv1.PeerAuthentication) []*peerAuthnEntry {
	entries := make([]*peerAuthnEntry, 0, len(pas))
	levels := map[string]*peerAuthnEntry{} // namespace -> effective selector-less policy
	for _, pa := range pas {
		e := &peerAuthnEntry{obj: pa}
		entries = append(entries, e)
		if !e.isWorkloadLevel() {
			if cur := levels[pa.Namespace]; cur == nil || olderThan(pa, cur.obj) {
				levels[pa.Namespace] = e
			}
		}
	}
	mesh := levels[c.RootNamespace]
	for _, e := range entries {
		switch {
		case !e.isWorkloadLevel():
			if levels[e.obj.Namespace] == e && e.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT {
				e.authz = strictAuthz(e, []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{denyPlaintext()}}}}})
			}
		case e.obj.Namespace == c.RootNamespace:
			// Selector policies in the root namespace do not apply mesh-wide.
		default:
			ns := levels[e.obj.Namespace]
			if rules := portLevelRules(e, ns, mesh); rules != nil {
				e.authz, e.portLevel = strictAuthz(e, rules), true
			} else if e.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT {
				e.authz = strictAuthz(e, []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{denyPlaintext()}}}}})
			}
		}
	}
	return entries
}

func strictAuthz(e *peerAuthnEntry, rules []*security.Rule) *security.Authorization {
	return &security.Authorization{
		Name:      ConvertedPeerAuthnPrefix + e.obj.Name,
		Namespace: e.obj.Namespace,
		Scope:     security.Scope_WORKLOAD_SELECTOR,
		Action:    security.Action_DENY,
		Rules:     rules,
	}
}

// parentStrict reports whether a workload without its own mode would be STRICT.
func parentStrict(ns, mesh *peerAuthnEntry) bool {
	if ns != nil && ns.mode() != securityapi.PeerAuthentication_MutualTLS_UNSET {
		return ns.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT
	}
	return mesh != nil && mesh.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT
}

// portLevelRules converts a workload policy's portLevelMtls: under an
// effective STRICT, one rule denies plaintext except on the PERMISSIVE or
// DISABLE ports; otherwise one rule per STRICT port denies plaintext there.
// It returns nil when the port settings change nothing.
func portLevelRules(e, ns, mesh *peerAuthnEntry) []*security.Rule {
	pl := e.obj.Spec.PortLevelMtls
	if len(pl) == 0 {
		return nil
	}
	portList := make([]uint32, 0, len(pl))
	for p := range pl {
		portList = append(portList, p)
	}
	sort.Slice(portList, func(i, j int) bool { return portList[i] < portList[j] })
	mode := e.mode()
	strict := mode == securityapi.PeerAuthentication_MutualTLS_STRICT ||
		(mode == securityapi.PeerAuthentication_MutualTLS_UNSET && parentStrict(ns, mesh))
	var exempt []uint32
	var rules []*security.Rule
	for _, p := range portList {
		switch pl[p].GetMode() {
		case securityapi.PeerAuthentication_MutualTLS_STRICT:
			if !strict {
				m := denyPlaintext()
				m.DestinationPorts = []uint32{p}
				rules = append(rules, &security.Rule{Clauses: []*security.Clause{{Matches: []*security.Match{m}}}})
			}
		case securityapi.PeerAuthentication_MutualTLS_PERMISSIVE, securityapi.PeerAuthentication_MutualTLS_DISABLE:
			if strict {
				exempt = append(exempt, p)
			}
		}
	}
	if strict {
		if len(exempt) == 0 {
			return nil
		}
		m := denyPlaintext()
		m.NotDestinationPorts = exempt
		return []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{m}}}}}
	}
	return rules
}

// effectivePeerAuthn returns the resource name of the converted
// PeerAuthentication in effect for the pod, or "" when plaintext is allowed.
func (idx *index) effectivePeerAuthn(p *corev1.Pod) string {
	var mesh, ns, wl *peerAuthnEntry
	for _, e := range idx.peerAuthnsByNS[idx.c.RootNamespace] {
		if !e.isWorkloadLevel() && (mesh == nil || olderThan(e.obj, mesh.obj)) {
			mesh = e
		}
	}
	if p.Namespace != idx.c.RootNamespace {
		for _, e := range idx.peerAuthnsByNS[p.Namespace] {
			if e.isWorkloadLevel() {
				if selectsLabels(e.obj.Spec.Selector.MatchLabels, p.Labels) && (wl == nil || olderThan(e.obj, wl.obj)) {
					wl = e
				}
			} else if ns == nil || olderThan(e.obj, ns.obj) {
				ns = e
			}
		}
	}
	var source *peerAuthnEntry
	if mesh != nil && mesh.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT {
		source = mesh
	}
	if ns != nil && ns.mode() != securityapi.PeerAuthentication_MutualTLS_UNSET {
		source = nil
		if ns.mode() == securityapi.PeerAuthentication_MutualTLS_STRICT {
			source = ns
		}
	}
	if wl != nil {
		if wl.portLevel {
			return wl.resourceName()
		}
		switch wl.mode() {
		case securityapi.PeerAuthentication_MutualTLS_STRICT:
			source = wl
		case securityapi.PeerAuthentication_MutualTLS_PERMISSIVE, securityapi.PeerAuthentication_MutualTLS_DISABLE:
			source = nil
		}
	}
	if source == nil || source.authz == nil {
		return ""
	}
	return source.resourceName()
}
