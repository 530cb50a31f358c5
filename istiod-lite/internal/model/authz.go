package model

import (
	"fmt"
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/protobuf/types/known/emptypb"
	securityapi "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/ambient-mesh/ambient/api/security"
)

// Status conditions written on AuthorizationPolicies, named as Istio names them.
const (
	// ConditionZtunnelAccepted says whether ztunnel enforces the policy, and how.
	ConditionZtunnelAccepted = "ZtunnelAccepted"
	// ReasonAccepted: the policy is enforced as written.
	ReasonAccepted = "Accepted"
	// ReasonUnsupportedValue: part or all of the policy cannot be enforced at L4.
	ReasonUnsupportedValue = "UnsupportedValue"

	// AnnotationDryRun marks a policy to be evaluated without being enforced.
	AnnotationDryRun = "istio.io/dry-run"

	msgAccepted       = "attached to ztunnel"
	msgAcceptedDryRun = "attached to ztunnel in dry-run mode: ztunnel logs what the policy would decide and does not enforce it"
	msgHTTPRule       = "ztunnel does not support HTTP attributes (found: %s). In ambient mode you must use a waypoint proxy to enforce HTTP rules. %s"
	msgHTTPAllowRule  = "Within an ALLOW policy, rules matching HTTP attributes are omitted. This will be more restrictive than requested."
	msgHTTPDenyRule   = "DENY policy with HTTP attributes is enforced without the HTTP rules. This will be more restrictive than requested."
	msgDryRun         = "The policy is in dry-run mode: ztunnel logs what it would decide and does not enforce it."
	msgAction         = "ztunnel does not support the %s action"
)

// l4Conditions are the `when` keys ztunnel can evaluate.
var l4Conditions = map[string]bool{
	"source.ip":        true,
	"source.namespace": true,
	"source.principal": true,
	"destination.ip":   true,
	"destination.port": true,
}

// policyEntry is one AuthorizationPolicy and what it became.
type policyEntry struct {
	key types.NamespacedName
	// selector is the policy's matchLabels (non-nil, maybe empty, when the
	// policy has a selector).
	selector   map[string]string
	authz      *security.Authorization // nil: not served to ztunnel
	conditions []metav1.Condition
}

func (p *policyEntry) resourceName() string { return p.key.Namespace + "/" + p.key.Name }

func convertAuthorizationPolicies(c Cluster, pols []*securityv1.AuthorizationPolicy) []*policyEntry {
	out := make([]*policyEntry, 0, len(pols))
	for _, obj := range pols {
		out = append(out, convertAuthorizationPolicy(c, obj))
	}
	return out
}

// convertAuthorizationPolicy converts one policy to its L4 form, following
// Istio's ambient semantics: targetRef policies belong to waypoints; AUDIT
// and CUSTOM are not enforced by ztunnel; HTTP-only attributes make an ALLOW
// rule never match (dropped) and are ignored in a DENY rule (so it matches
// more), both more restrictive than written. A dry-run policy is converted
// the same way and sent with dry_run set: ztunnel evaluates and logs it but
// never enforces it.
func convertAuthorizationPolicy(c Cluster, obj *securityv1.AuthorizationPolicy) *policyEntry {
	spec := &obj.Spec
	e := &policyEntry{key: nsName(obj.Namespace, obj.Name), conditions: []metav1.Condition{}}
	if spec.GetTargetRef() != nil || len(spec.GetTargetRefs()) > 0 {
		return e // enforced by a waypoint, not ztunnel
	}
	cond := func(status metav1.ConditionStatus, reason, msg string) {
		e.conditions = []metav1.Condition{{
			Type: ConditionZtunnelAccepted, Status: status, Reason: reason, Message: msg, ObservedGeneration: obj.Generation,
		}}
	}
	var action security.Action
	boilerplate := msgHTTPAllowRule
	switch spec.Action {
	case securityapi.AuthorizationPolicy_ALLOW:
		action = security.Action_ALLOW
	case securityapi.AuthorizationPolicy_DENY:
		action = security.Action_DENY
		boilerplate = msgHTTPDenyRule
	default:
		cond(metav1.ConditionFalse, ReasonUnsupportedValue, fmt.Sprintf(msgAction, spec.Action))
		return e
	}
	dryRun := strings.EqualFold(obj.Annotations[AnnotationDryRun], "true")
	scope := security.Scope_WORKLOAD_SELECTOR
	if spec.Selector == nil {
		scope = security.Scope_NAMESPACE
		if obj.Namespace == c.RootNamespace {
			scope = security.Scope_GLOBAL
		}
	} else {
		e.selector = spec.Selector.MatchLabels
		if e.selector == nil {
			e.selector = map[string]string{}
		}
	}
	authz := &security.Authorization{Name: obj.Name, Namespace: obj.Namespace, Scope: scope, Action: action, DryRun: dryRun}
	unsupported := map[string]bool{}
	for _, r := range spec.Rules {
		if r == nil {
			continue
		}
		rule, found := convertRule(c, action, r, obj.Namespace)
		for _, f := range found {
			unsupported[f] = true
		}
		if rule != nil {
			authz.Rules = append(authz.Rules, rule)
		}
	}
	e.authz = authz
	if len(unsupported) > 0 {
		names := make([]string, 0, len(unsupported))
		for n := range unsupported {
			names = append(names, n)
		}
		sort.Strings(names)
		msg := fmt.Sprintf(msgHTTPRule, strings.Join(names, ", "), boilerplate)
		if dryRun {
			msg += " " + msgDryRun
		}
		cond(metav1.ConditionTrue, ReasonUnsupportedValue, msg)
	} else if dryRun {
		cond(metav1.ConditionTrue, ReasonAccepted, msgAcceptedDryRun)
	} else {
		cond(metav1.ConditionTrue, ReasonAccepted, msgAccepted)
	}
	return e
}

// convertRule converts one rule: its to, from and when sections become
// AND-ed clauses. It returns nil when the rule can never match at L4 (an
// ALLOW rule with HTTP attributes), and the unsupported fields it found.
func convertRule(c Cluster, action security.Action, r *securityapi.Rule, ns string) (*security.Rule, []string) {
	var found []string
	rule := &security.Rule{}
	var to []*security.Match
	for _, t := range r.To {
		op := t.GetOperation()
		if op == nil {
			to = append(to, &security.Match{})
			continue
		}
		found = appendIf(found, len(op.Hosts) > 0, "hosts")
		found = appendIf(found, len(op.NotHosts) > 0, "notHosts")
		found = appendIf(found, len(op.Methods) > 0, "methods")
		found = appendIf(found, len(op.NotMethods) > 0, "notMethods")
		found = appendIf(found, len(op.Paths) > 0, "paths")
		found = appendIf(found, len(op.NotPaths) > 0, "notPaths")
		to = append(to, &security.Match{DestinationPorts: ports(op.Ports), NotDestinationPorts: ports(op.NotPorts)})
	}
	var from []*security.Match
	for _, f := range r.From {
		src := f.GetSource()
		if src == nil {
			from = append(from, &security.Match{})
			continue
		}
		found = appendIf(found, len(src.RemoteIpBlocks) > 0, "remoteIpBlocks")
		found = appendIf(found, len(src.NotRemoteIpBlocks) > 0, "notRemoteIpBlocks")
		found = appendIf(found, len(src.RequestPrincipals) > 0, "requestPrincipals")
		found = appendIf(found, len(src.NotRequestPrincipals) > 0, "notRequestPrincipals")
		m := &security.Match{
			SourceIps:     cidrs(src.IpBlocks),
			NotSourceIps:  cidrs(src.NotIpBlocks),
			Namespaces:    stringMatches(src.Namespaces),
			NotNamespaces: stringMatches(src.NotNamespaces),
			Principals:    stringMatches(src.Principals),
			NotPrincipals: stringMatches(src.NotPrincipals),
		}
		// serviceAccounts and trustDomains are principals in disguise. The
		// wire Match has one principals list (OR-ed), so one of them folds into
		// it only when nothing else constrains principals; a second one is
		// reported unsupported and ignored like an HTTP attribute.
		var extra []*security.StringMatch
		switch {
		case len(src.ServiceAccounts) > 0:
			for _, sa := range src.ServiceAccounts {
				extra = append(extra, exact(saPrincipal(c, sa, ns)))
			}
			found = appendIf(found, len(src.TrustDomains) > 0, "trustDomains")
			if len(m.Principals) > 0 {
				found, extra = append(found, "serviceAccounts"), nil
			}
		case len(src.TrustDomains) > 0:
			for _, td := range src.TrustDomains {
				extra = append(extra, trustDomainMatch(td))
			}
			if len(m.Principals) > 0 {
				found, extra = append(found, "trustDomains"), nil
			}
		}
		if extra != nil {
			m.Principals = extra
		}
		// NOT lists are OR-ed exclusions, so adding to them is exact.
		for _, sa := range src.NotServiceAccounts {
			m.NotPrincipals = append(m.NotPrincipals, exact(saPrincipal(c, sa, ns)))
		}
		for _, td := range src.NotTrustDomains {
			m.NotPrincipals = append(m.NotPrincipals, trustDomainMatch(td))
		}
		from = append(from, m)
	}
	if len(to) > 0 {
		rule.Clauses = append(rule.Clauses, &security.Clause{Matches: to})
	}
	if len(from) > 0 {
		rule.Clauses = append(rule.Clauses, &security.Clause{Matches: from})
	}
	for _, w := range r.When {
		if w == nil {
			continue
		}
		if !l4Conditions[w.Key] {
			found = append(found, w.Key)
			// In DENY the condition is dropped, so the rule matches more.
			continue
		}
		m := &security.Match{}
		switch w.Key {
		case "source.ip":
			m.SourceIps, m.NotSourceIps = cidrs(w.Values), cidrs(w.NotValues)
		case "source.namespace":
			m.Namespaces, m.NotNamespaces = stringMatches(w.Values), stringMatches(w.NotValues)
		case "source.principal":
			m.Principals, m.NotPrincipals = stringMatches(w.Values), stringMatches(w.NotValues)
		case "destination.ip":
			m.DestinationIps, m.NotDestinationIps = cidrs(w.Values), cidrs(w.NotValues)
		case "destination.port":
			m.DestinationPorts, m.NotDestinationPorts = ports(w.Values), ports(w.NotValues)
		}
		rule.Clauses = append(rule.Clauses, &security.Clause{Matches: []*security.Match{m}})
	}
	if action == security.Action_ALLOW && len(found) > 0 {
		// An HTTP attribute can never be seen at L4, so this ALLOW rule never matches.
		return nil, found
	}
	return rule, found
}

// saPrincipal is the principal of "ns/sa" or, unqualified, of "sa" in the
// policy's namespace: "<trust domain>/ns/<ns>/sa/<sa>".
func saPrincipal(c Cluster, sa, ns string) string {
	if n, s, ok := strings.Cut(sa, "/"); ok {
		ns, sa = n, s
	}
	return c.TrustDomain + "/ns/" + ns + "/sa/" + sa
}

func trustDomainMatch(td string) *security.StringMatch {
	if td == "*" {
		return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
	}
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: td + "/"}}
}

func appendIf(list []string, cond bool, v string) []string {
	if cond {
		return append(list, v)
	}
	return list
}

func exact(v string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: v}}
}

// stringMatches converts Istio's string patterns: "*" is presence, a leading
// or trailing "*" a suffix or prefix match, anything else exact.
func stringMatches(vals []string) []*security.StringMatch {
	if len(vals) == 0 {
		return nil
	}
	out := make([]*security.StringMatch, 0, len(vals))
	for _, v := range vals {
		switch {
		case v == "*":
			out = append(out, &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}})
		case strings.HasPrefix(v, "*"):
			out = append(out, &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: strings.TrimPrefix(v, "*")}})
		case strings.HasSuffix(v, "*"):
			out = append(out, &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: strings.TrimSuffix(v, "*")}})
		default:
			out = append(out, exact(v))
		}
	}
	return out
}

func ports(vals []string) []uint32 {
	var out []uint32
	for _, v := range vals {
		p, err := strconv.ParseUint(v, 10, 16)
		if err != nil {
			continue // CRD validation rejects these; nothing to enforce
		}
		out = append(out, uint32(p))
	}
	return out
}

func cidrs(vals []string) []*security.Address {
	var out []*security.Address
	for _, v := range vals {
		var pfx netip.Prefix
		if strings.Contains(v, "/") {
			p, err := netip.ParsePrefix(v)
			if err != nil {
				continue
			}
			pfx = p
		} else {
			a, err := netip.ParseAddr(v)
			if err != nil {
				continue
			}
			pfx = netip.PrefixFrom(a, a.BitLen())
		}
		out = append(out, &security.Address{Address: pfx.Addr().AsSlice(), Length: uint32(pfx.Bits())})
	}
	return out
}

// workloadPolicies lists the policies that select the pod by label (from its
// namespace and, mesh-wide, the root namespace) and the converted
// PeerAuthentication in effect for it, sorted. Namespace and GLOBAL scoped
// policies are not listed: ztunnel applies those by scope.
func (idx *index) workloadPolicies(p *corev1.Pod) []string {
	var out []string
	add := func(list []*policyEntry) {
		for _, e := range list {
			if selectsLabels(e.selector, p.Labels) {
				out = append(out, e.resourceName())
			}
		}
	}
	add(idx.selectorPolicies[p.Namespace])
	if p.Namespace != idx.c.RootNamespace {
		add(idx.selectorPolicies[idx.c.RootNamespace])
	}
	if k := idx.effectivePeerAuthn(p); k != "" {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}
