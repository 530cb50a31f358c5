// Package policy makes ztunnel's L4 authorization decisions: it evaluates the
// Authorization resources that apply to a destination workload (mesh-wide,
// namespace-wide and those selecting the workload) against one connection,
// with Istio's AuthorizationPolicy semantics.
package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	"github.com/ambient-mesh/ambient/api/security"
)

// spiffeScheme prefixes SPIFFE IDs; Istio principals are SPIFFE IDs without it
// ("cluster.local/ns/default/sa/sleep").
const spiffeScheme = "spiffe://"

// maxPort is the largest TCP port; destination_ports values above it can never
// match and mark a malformed policy.
const maxPort = 65535

// Conn is what L4 authorization knows about a connection.
type Conn struct {
	// SrcIdentity is the peer's SPIFFE ID, "spiffe://<td>/ns/<ns>/sa/<sa>"
	// (the "spiffe://" prefix is optional). Empty for plaintext connections.
	SrcIdentity string
	// SrcIP is the client's address.
	SrcIP netip.Addr
	// DstIP and DstPort are the destination workload's address and port.
	DstIP   netip.Addr
	DstPort uint16
	// Plaintext is set for connections that did not arrive over mTLS (the
	// 15006 listener). They have no principal and no namespace, whatever
	// SrcIdentity says.
	Plaintext bool
}

// Decision is the outcome of Evaluate or EvaluateDryRun.
type Decision struct {
	// Allow says whether the connection may proceed.
	Allow bool
	// Policy is the "namespace/name" of the policy that decided: the DENY
	// policy that matched, or the ALLOW policy that matched. It is empty when
	// no policy applied (allowed by default) and when ALLOW policies applied
	// but none matched (denied by default).
	Policy string
	// DryRun marks a decision computed by EvaluateDryRun: what would happen
	// if the dry-run policies were enforced. It is to be logged, never
	// enforced.
	DryRun bool
}

// Evaluate decides whether conn is allowed by policies, the policies that
// apply to its destination workload, with Istio's semantics:
//
//  1. if any DENY policy matches, the connection is denied;
//  2. otherwise, if there are ALLOW policies, at least one must match
//     (an ALLOW policy with no rules matches nothing, so it denies all);
//  3. otherwise the connection is allowed.
//
// Policies marked dry_run are skipped: they never change an enforced
// decision (EvaluateDryRun reports what they would do). A policy that fails
// Validate is treated as a matching DENY: an enforcement point that cannot
// read a policy fails closed. Policies are evaluated in the order given,
// which decides Decision.Policy when several match.
func Evaluate(policies []*security.Authorization, conn Conn) Decision {
	return evaluate(nil, policies, conn)
}

// EvaluateDryRun reports the decision conn would get if the dryRun policies
// were enforced alongside the enforced ones (every policy of dryRun counts,
// whatever its dry_run flag; in enforced, dry-run policies are skipped as
// Evaluate skips them): a dry-run DENY that matches would deny, and a dry-run
// ALLOW makes ALLOW policies present, so that a connection no ALLOW policy
// matches would be denied. When several policies match, the dry-run ones are
// reported first, so that Decision.Policy names the dry-run policy that made
// the difference. The decision is marked DryRun: the caller logs it next to
// the enforced decision (Istio's shadow result) and never acts on it.
func EvaluateDryRun(enforced, dryRun []*security.Authorization, conn Conn) Decision {
	d := evaluate(dryRun, enforced, conn)
	d.DryRun = true
	return d
}

// evaluate applies Istio's semantics to every policy of shadow and to the
// policies of enforced not marked dry_run, shadow first.
func evaluate(shadow, enforced []*security.Authorization, conn Conn) Decision {
	peer := peerOf(conn)
	conn.SrcIP, conn.DstIP = conn.SrcIP.Unmap(), conn.DstIP.Unmap()
	lists := [2][]*security.Authorization{shadow, enforced}
	// skip leaves out nil policies and, in the enforced list, dry-run ones.
	skip := func(i int, p *security.Authorization) bool { return p == nil || (i == 1 && p.GetDryRun()) }

	haveAllow := false
	for i, list := range lists {
		for _, p := range list {
			if skip(i, p) {
				continue
			}
			if Validate(p) != nil {
				return Decision{Allow: false, Policy: Name(p)}
			}
			if p.GetAction() != security.Action_DENY {
				haveAllow = true
				continue
			}
			if matches(p, peer, conn) {
				return Decision{Allow: false, Policy: Name(p)}
			}
		}
	}
	if !haveAllow {
		return Decision{Allow: true}
	}
	for i, list := range lists {
		for _, p := range list {
			if skip(i, p) || p.GetAction() != security.Action_ALLOW {
				continue
			}
			if matches(p, peer, conn) {
				return Decision{Allow: true, Policy: Name(p)}
			}
		}
	}
	return Decision{Allow: false}
}

// Name is a policy's xDS resource name, "namespace/name".
func Name(p *security.Authorization) string {
	return p.GetNamespace() + "/" + p.GetName()
}

// ErrInvalid is wrapped by every error Validate returns.
var ErrInvalid = errors.New("invalid authorization policy")

// Validate reports whether p can be enforced exactly as written: known action
// and scope, CIDRs of 4 or 16 bytes with a prefix length that fits, ports that
// exist, and a value in every string match. The control-plane client rejects
// (NACKs) a policy that fails it, so Evaluate only meets one through a bug.
func Validate(p *security.Authorization) error {
	if p == nil {
		return fmt.Errorf("%w: nil", ErrInvalid)
	}
	if _, ok := security.Action_name[int32(p.GetAction())]; !ok {
		return fmt.Errorf("%w: unknown action %d", ErrInvalid, p.GetAction())
	}
	if _, ok := security.Scope_name[int32(p.GetScope())]; !ok {
		return fmt.Errorf("%w: unknown scope %d", ErrInvalid, p.GetScope())
	}
	for i, r := range p.GetRules() {
		for j, c := range r.GetClauses() {
			for k, m := range c.GetMatches() {
				if err := validateMatch(m); err != nil {
					return fmt.Errorf("%w: rule %d clause %d match %d: %w", ErrInvalid, i, j, k, err)
				}
			}
		}
	}
	return nil
}

func validateMatch(m *security.Match) error {
	for _, sms := range [][]*security.StringMatch{m.GetNamespaces(), m.GetNotNamespaces(), m.GetPrincipals(), m.GetNotPrincipals()} {
		for _, sm := range sms {
			if sm.GetMatchType() == nil {
				return errors.New("string match without a value")
			}
		}
	}
	for _, as := range [][]*security.Address{m.GetSourceIps(), m.GetNotSourceIps(), m.GetDestinationIps(), m.GetNotDestinationIps()} {
		for _, a := range as {
			if _, err := Prefix(a); err != nil {
				return err
			}
		}
	}
	for _, ps := range [][]uint32{m.GetDestinationPorts(), m.GetNotDestinationPorts()} {
		for _, port := range ps {
			if port > maxPort {
				return fmt.Errorf("port %d out of range", port)
			}
		}
	}
	return nil
}

// Prefix converts a wire CIDR to a netip.Prefix. An IPv4-mapped IPv6 prefix
// of length 96 or more becomes the equivalent IPv4 prefix, so that it matches
// the (unmapped) IPv4 addresses connections carry.
func Prefix(a *security.Address) (netip.Prefix, error) {
	ip, ok := netip.AddrFromSlice(a.GetAddress())
	if !ok {
		return netip.Prefix{}, fmt.Errorf("address of %d bytes, want 4 or 16", len(a.GetAddress()))
	}
	bits := int(a.GetLength())
	if a.GetLength() > uint32(ip.BitLen()) {
		return netip.Prefix{}, fmt.Errorf("prefix length %d longer than %d", a.GetLength(), ip.BitLen())
	}
	if ip.Is4In6() && bits >= 96 {
		ip, bits = ip.Unmap(), bits-96
	}
	return netip.PrefixFrom(ip, bits).Masked(), nil
}

// peer is the authenticated source as policies see it.
type peer struct {
	// principal is the SPIFFE ID without its scheme; empty when unknown.
	principal string
	// namespace is the principal's namespace; empty when unknown.
	namespace string
	// known is false for plaintext peers, which match no principal and no
	// namespace (not even presence).
	known bool
}

// peerOf extracts the principal and namespace from conn. An identity that is
// not of the form "<td>/ns/<ns>/sa/<sa>" still has a principal but no
// namespace.
func peerOf(conn Conn) peer {
	if conn.Plaintext || conn.SrcIdentity == "" {
		return peer{}
	}
	principal := strings.TrimPrefix(conn.SrcIdentity, spiffeScheme)
	p := peer{principal: principal, known: true}
	// "<td>/ns/<ns>/sa/<sa>", parsed without allocating: this runs per connection.
	_, rest, _ := strings.Cut(principal, "/")
	rest, ok := strings.CutPrefix(rest, "ns/")
	if !ok {
		return p
	}
	ns, sa, ok := strings.Cut(rest, "/sa/")
	if ok && ns != "" && !strings.Contains(ns, "/") && sa != "" && !strings.Contains(sa, "/") {
		p.namespace = ns
	}
	return p
}

// matches reports whether any rule of p matches: rules are OR-ed, a rule's
// clauses AND-ed, a clause's matches OR-ed. So a policy without rules matches
// nothing, a rule without clauses matches everything, and a clause without
// matches matches nothing.
func matches(p *security.Authorization, pr peer, conn Conn) bool {
	for _, r := range p.GetRules() {
		if ruleMatches(r, pr, conn) {
			return true
		}
	}
	return false
}

func ruleMatches(r *security.Rule, pr peer, conn Conn) bool {
	for _, c := range r.GetClauses() {
		if !clauseMatches(c, pr, conn) {
			return false
		}
	}
	return true
}

func clauseMatches(c *security.Clause, pr peer, conn Conn) bool {
	for _, m := range c.GetMatches() {
		if matchMatches(m, pr, conn) {
			return true
		}
	}
	return false
}

// matchMatches ANDs the fields that are set; within a field the values are
// OR-ed. A not_ field excludes the connection when any of its values matches.
func matchMatches(m *security.Match, pr peer, conn Conn) bool {
	ns := func(sm *security.StringMatch) bool {
		return pr.known && pr.namespace != "" && stringMatches(sm, pr.namespace)
	}
	principal := func(sm *security.StringMatch) bool { return pr.known && stringMatches(sm, pr.principal) }
	src := func(a *security.Address) bool { return cidrContains(a, conn.SrcIP) }
	dst := func(a *security.Address) bool { return cidrContains(a, conn.DstIP) }
	port := func(p uint32) bool { return p == uint32(conn.DstPort) }

	return field(m.GetNamespaces(), m.GetNotNamespaces(), ns) &&
		field(m.GetPrincipals(), m.GetNotPrincipals(), principal) &&
		field(m.GetSourceIps(), m.GetNotSourceIps(), src) &&
		field(m.GetDestinationIps(), m.GetNotDestinationIps(), dst) &&
		field(m.GetDestinationPorts(), m.GetNotDestinationPorts(), port)
}

// field is one attribute test: any of the positive values (or no positive
// values at all) and none of the negative ones.
func field[T any](positive, negative []T, match func(T) bool) bool {
	if len(positive) > 0 && !anyOf(positive, match) {
		return false
	}
	return !anyOf(negative, match)
}

func anyOf[T any](vs []T, match func(T) bool) bool {
	for _, v := range vs {
		if match(v) {
			return true
		}
	}
	return false
}

// stringMatches applies sm to a present value v.
func stringMatches(sm *security.StringMatch, v string) bool {
	switch t := sm.GetMatchType().(type) {
	case *security.StringMatch_Exact:
		return v == t.Exact
	case *security.StringMatch_Prefix:
		return strings.HasPrefix(v, t.Prefix)
	case *security.StringMatch_Suffix:
		return strings.HasSuffix(v, t.Suffix)
	case *security.StringMatch_Presence:
		return v != ""
	}
	return false
}

func cidrContains(a *security.Address, ip netip.Addr) bool {
	if !ip.IsValid() {
		return false
	}
	p, err := Prefix(a)
	return err == nil && p.Contains(ip)
}
