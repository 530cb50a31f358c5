package policy

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/ambient-mesh/ambient/api/security"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/emptypb"
)

func exact(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Exact{Exact: s}}
}
func prefix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Prefix{Prefix: s}}
}
func suffix(s string) *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Suffix{Suffix: s}}
}
func presence() *security.StringMatch {
	return &security.StringMatch{MatchType: &security.StringMatch_Presence{Presence: &emptypb.Empty{}}}
}

func cidr(s string) *security.Address {
	p := netip.MustParsePrefix(s)
	return &security.Address{Address: p.Addr().AsSlice(), Length: uint32(p.Bits())}
}

// pol builds a policy whose rules each hold one clause per match group.
func pol(ns, name string, scope security.Scope, action security.Action, rules ...*security.Rule) *security.Authorization {
	return &security.Authorization{Name: name, Namespace: ns, Scope: scope, Action: action, Rules: rules}
}

// rule ANDs clauses, each clause ORing its matches.
func rule(clauses ...[]*security.Match) *security.Rule {
	r := &security.Rule{}
	for _, ms := range clauses {
		r.Clauses = append(r.Clauses, &security.Clause{Matches: ms})
	}
	return r
}

func clause(ms ...*security.Match) []*security.Match { return ms }

const (
	sleep   = "spiffe://cluster.local/ns/default/sa/sleep"
	other   = "spiffe://cluster.local/ns/other/sa/client"
	foreign = "spiffe://example.org/ns/default/sa/sleep"
)

func mtls(id, src string) Conn {
	return Conn{SrcIdentity: id, SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr("10.0.1.5"), DstPort: 8080}
}

func plaintext(src string) Conn {
	return Conn{SrcIP: netip.MustParseAddr(src), DstIP: netip.MustParseAddr("10.0.1.5"), DstPort: 8080, Plaintext: true}
}

// strict is a PeerAuthentication STRICT as the control plane converts it: a
// DENY of every connection without a principal.
func strict(ns string) *security.Authorization {
	return pol(ns, "istio_converted_static_strict", security.Scope_NAMESPACE, security.Action_DENY,
		rule(clause(&security.Match{NotPrincipals: []*security.StringMatch{presence()}})))
}

func TestEvaluate(t *testing.T) {
	allowSleep := pol("default", "allow-sleep", security.Scope_WORKLOAD_SELECTOR, security.Action_ALLOW,
		rule(clause(&security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}})))
	denyOther := pol("default", "deny-other", security.Scope_NAMESPACE, security.Action_DENY,
		rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("other")}})))

	tests := []struct {
		name     string
		policies []*security.Authorization
		conn     Conn
		want     Decision
	}{
		{"no policy allows everything", nil, mtls(sleep, "10.0.0.1"), Decision{Allow: true}},
		{"no policy allows plaintext too", nil, plaintext("10.0.0.1"), Decision{Allow: true}},
		{"an ALLOW naming the principal allows it", []*security.Authorization{allowSleep}, mtls(sleep, "10.0.0.1"),
			Decision{Allow: true, Policy: "default/allow-sleep"}},
		{"a principal without the spiffe scheme is the same principal", []*security.Authorization{allowSleep},
			mtls("cluster.local/ns/default/sa/sleep", "10.0.0.1"), Decision{Allow: true, Policy: "default/allow-sleep"}},
		{"an ALLOW that does not match denies by default", []*security.Authorization{allowSleep}, mtls(other, "10.0.0.1"),
			Decision{Allow: false}},
		{"the same service account in another trust domain is another principal", []*security.Authorization{allowSleep},
			mtls(foreign, "10.0.0.1"), Decision{Allow: false}},
		{"an ALLOW with no rules denies everything",
			[]*security.Authorization{pol("default", "allow-nothing", security.Scope_NAMESPACE, security.Action_ALLOW)},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"an ALLOW with an empty rule allows everything",
			[]*security.Authorization{pol("default", "allow-all", security.Scope_NAMESPACE, security.Action_ALLOW, rule())},
			plaintext("10.0.0.1"), Decision{Allow: true, Policy: "default/allow-all"}},
		{"a DENY with no rules denies nothing",
			[]*security.Authorization{pol("default", "deny-nothing", security.Scope_NAMESPACE, security.Action_DENY)},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true}},
		{"a clause without matches matches nothing",
			[]*security.Authorization{pol("default", "deny", security.Scope_NAMESPACE, security.Action_DENY, rule(clause()))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true}},
		{"a match without fields matches everything",
			[]*security.Authorization{pol("default", "deny-all", security.Scope_NAMESPACE, security.Action_DENY, rule(clause(&security.Match{})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false, Policy: "default/deny-all"}},
		{"a DENY wins over an ALLOW that also matches",
			[]*security.Authorization{allowSleep, pol("default", "deny-sleep", security.Scope_WORKLOAD_SELECTOR, security.Action_DENY,
				rule(clause(&security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false, Policy: "default/deny-sleep"}},
		{"a namespace-wide DENY rejects that source namespace", []*security.Authorization{denyOther}, mtls(other, "10.0.0.1"),
			Decision{Allow: false, Policy: "default/deny-other"}},
		{"a namespace-wide DENY leaves other namespaces alone", []*security.Authorization{denyOther}, mtls(sleep, "10.0.0.1"),
			Decision{Allow: true}},
		{"a namespace match does not match a plaintext peer", []*security.Authorization{denyOther},
			Conn{SrcIdentity: other, Plaintext: true, SrcIP: netip.MustParseAddr("10.0.0.1")}, Decision{Allow: true}},
		{"a global ALLOW by namespace prefix allows a matching namespace",
			[]*security.Authorization{pol("istio-system", "mesh", security.Scope_GLOBAL, security.Action_ALLOW,
				rule(clause(&security.Match{Namespaces: []*security.StringMatch{prefix("oth")}})))},
			mtls(other, "10.0.0.1"), Decision{Allow: true, Policy: "istio-system/mesh"}},
		{"a global ALLOW by namespace prefix denies the rest",
			[]*security.Authorization{pol("istio-system", "mesh", security.Scope_GLOBAL, security.Action_ALLOW,
				rule(clause(&security.Match{Namespaces: []*security.StringMatch{prefix("oth")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"converted STRICT denies plaintext", []*security.Authorization{strict("default")}, plaintext("10.0.0.1"),
			Decision{Allow: false, Policy: "default/istio_converted_static_strict"}},
		{"converted STRICT denies plaintext that claims an identity", []*security.Authorization{strict("default")},
			Conn{SrcIdentity: sleep, Plaintext: true}, Decision{Allow: false, Policy: "default/istio_converted_static_strict"}},
		{"converted STRICT allows mTLS", []*security.Authorization{strict("default")}, mtls(sleep, "10.0.0.1"),
			Decision{Allow: true}},
		{"principal presence does not match plaintext",
			[]*security.Authorization{pol("default", "any-mtls", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{Principals: []*security.StringMatch{presence()}})))},
			plaintext("10.0.0.1"), Decision{Allow: false}},
		{"not_namespaces excludes the listed namespace",
			[]*security.Authorization{pol("default", "not-other", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{NotNamespaces: []*security.StringMatch{exact("other")}})))},
			mtls(other, "10.0.0.1"), Decision{Allow: false}},
		{"not_namespaces admits the others",
			[]*security.Authorization{pol("default", "not-other", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{NotNamespaces: []*security.StringMatch{exact("other")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true, Policy: "default/not-other"}},
		{"not_principals with another value still needs the positive fields",
			[]*security.Authorization{pol("default", "p", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{
					Namespaces:    []*security.StringMatch{exact("default")},
					NotPrincipals: []*security.StringMatch{exact("cluster.local/ns/default/sa/admin")},
				})))},
			mtls(other, "10.0.0.1"), Decision{Allow: false}},
		{"an IPv4 source CIDR matches an address inside it",
			[]*security.Authorization{pol("default", "cidr", security.Scope_NAMESPACE, security.Action_DENY,
				rule(clause(&security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}})))},
			mtls(sleep, "10.0.0.77"), Decision{Allow: false, Policy: "default/cidr"}},
		{"an IPv4 source CIDR does not match an address outside it",
			[]*security.Authorization{pol("default", "cidr", security.Scope_NAMESPACE, security.Action_DENY,
				rule(clause(&security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}})))},
			mtls(sleep, "10.0.1.77"), Decision{Allow: true}},
		{"an IPv4-mapped IPv6 source matches an IPv4 CIDR",
			[]*security.Authorization{pol("default", "cidr", security.Scope_NAMESPACE, security.Action_DENY,
				rule(clause(&security.Match{SourceIps: []*security.Address{cidr("10.0.0.0/24")}})))},
			mtls(sleep, "::ffff:10.0.0.9"), Decision{Allow: false, Policy: "default/cidr"}},
		{"an IPv6 source CIDR matches an address inside it",
			[]*security.Authorization{pol("default", "v6", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{SourceIps: []*security.Address{cidr("fd00:10::/64")}})))},
			mtls(sleep, "fd00:10::abcd"), Decision{Allow: true, Policy: "default/v6"}},
		{"an IPv6 CIDR never matches an IPv4 source",
			[]*security.Authorization{pol("default", "v6", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{SourceIps: []*security.Address{cidr("::/0")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"not_source_ips excludes a source inside the CIDR",
			[]*security.Authorization{pol("default", "not-src", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{NotSourceIps: []*security.Address{cidr("10.0.0.1/32")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"destination IPs and ports are AND-ed",
			[]*security.Authorization{pol("default", "dst", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{DestinationIps: []*security.Address{cidr("10.0.1.0/24")}, DestinationPorts: []uint32{9090}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"destination ports are OR-ed",
			[]*security.Authorization{pol("default", "dst", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{DestinationIps: []*security.Address{cidr("10.0.1.0/24")}, DestinationPorts: []uint32{9090, 8080}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true, Policy: "default/dst"}},
		{"not_destination_ports excludes the port",
			[]*security.Authorization{pol("default", "dst", security.Scope_NAMESPACE, security.Action_DENY,
				rule(clause(&security.Match{NotDestinationPorts: []uint32{8080}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true}},
		{"not_destination_ips excludes the destination",
			[]*security.Authorization{pol("default", "dst", security.Scope_NAMESPACE, security.Action_DENY,
				rule(clause(&security.Match{NotDestinationIps: []*security.Address{cidr("10.0.1.5/32")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true}},
		{"clauses are AND-ed (from and to must both match)",
			[]*security.Authorization{pol("default", "from-to", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("default")}}),
					clause(&security.Match{DestinationPorts: []uint32{9090}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false}},
		{"matches in a clause are OR-ed",
			[]*security.Authorization{pol("default", "either", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("nope")}},
					&security.Match{DestinationPorts: []uint32{8080}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true, Policy: "default/either"}},
		{"rules are OR-ed",
			[]*security.Authorization{pol("default", "rules", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{DestinationPorts: []uint32{1}})),
				rule(clause(&security.Match{Principals: []*security.StringMatch{suffix("sa/sleep")}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true, Policy: "default/rules"}},
		{"the first matching ALLOW is reported",
			[]*security.Authorization{
				pol("default", "a", security.Scope_NAMESPACE, security.Action_ALLOW, rule(clause(&security.Match{DestinationPorts: []uint32{1}}))),
				pol("default", "b", security.Scope_NAMESPACE, security.Action_ALLOW, rule()),
				pol("default", "c", security.Scope_NAMESPACE, security.Action_ALLOW, rule()),
			},
			mtls(sleep, "10.0.0.1"), Decision{Allow: true, Policy: "default/b"}},
		{"a malformed policy denies (fail closed)",
			[]*security.Authorization{pol("default", "bad", security.Scope_NAMESPACE, security.Action_ALLOW,
				rule(clause(&security.Match{SourceIps: []*security.Address{{Address: []byte{1, 2, 3}, Length: 8}}})))},
			mtls(sleep, "10.0.0.1"), Decision{Allow: false, Policy: "default/bad"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Evaluate(tt.policies, tt.conn); got != tt.want {
				t.Errorf("Evaluate() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

// dryRun returns p marked dry_run.
func dryRun(p *security.Authorization) *security.Authorization {
	p = proto.Clone(p).(*security.Authorization)
	p.DryRun = true
	return p
}

func TestDryRunPoliciesNeverChangeTheEnforcedDecision(t *testing.T) {
	denySleep := pol("default", "deny-sleep", security.Scope_NAMESPACE, security.Action_DENY,
		rule(clause(&security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}})))
	allowOther := pol("default", "allow-other", security.Scope_NAMESPACE, security.Action_ALLOW,
		rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("other")}})))
	allowSleep := pol("default", "allow-sleep", security.Scope_WORKLOAD_SELECTOR, security.Action_ALLOW,
		rule(clause(&security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}})))
	bad := pol("default", "bad", security.Scope_NAMESPACE, security.Action_ALLOW,
		rule(clause(&security.Match{SourceIps: []*security.Address{{Address: []byte{1, 2, 3}}}})))

	tests := []struct {
		name     string
		policies []*security.Authorization
		want     Decision
	}{
		{"a matching dry-run DENY does not deny",
			[]*security.Authorization{dryRun(denySleep)}, Decision{Allow: true}},
		{"a dry-run ALLOW that does not match does not turn on default deny",
			[]*security.Authorization{dryRun(allowOther)}, Decision{Allow: true}},
		{"a matching dry-run DENY does not override an enforced ALLOW",
			[]*security.Authorization{dryRun(denySleep), allowSleep}, Decision{Allow: true, Policy: "default/allow-sleep"}},
		{"a matching dry-run ALLOW does not rescue a connection no enforced ALLOW matches",
			[]*security.Authorization{allowOther, dryRun(allowSleep)}, Decision{Allow: false}},
		{"a malformed dry-run policy does not deny",
			[]*security.Authorization{dryRun(bad)}, Decision{Allow: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := Evaluate(tt.policies, mtls(sleep, "10.0.0.1")); got != tt.want {
				t.Errorf("Evaluate() = %+v, want %+v", got, tt.want)
			}
		})
	}
}

func TestEvaluateDryRunReportsWhatWouldHappen(t *testing.T) {
	denySleep := dryRun(pol("default", "deny-sleep", security.Scope_NAMESPACE, security.Action_DENY,
		rule(clause(&security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/sleep")}}))))
	allowOther := dryRun(pol("default", "allow-other", security.Scope_NAMESPACE, security.Action_ALLOW,
		rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("other")}}))))
	allowSleep := dryRun(pol("default", "allow-sleep", security.Scope_WORKLOAD_SELECTOR, security.Action_ALLOW,
		rule(clause(&security.Match{Principals: []*security.StringMatch{suffix("/sa/sleep")}}))))
	enforcedAllowAll := pol("default", "allow-all", security.Scope_NAMESPACE, security.Action_ALLOW, rule())
	enforcedDenyAll := pol("default", "deny-all", security.Scope_NAMESPACE, security.Action_DENY, rule())

	fromSleep := mtls(sleep, "10.0.0.1")

	tests := []struct {
		name     string
		enforced []*security.Authorization
		dryRun   []*security.Authorization
		conn     Conn
		want     Decision
	}{
		{"a matching dry-run DENY would deny",
			nil, []*security.Authorization{denySleep}, fromSleep,
			Decision{Allow: false, Policy: "default/deny-sleep", DryRun: true}},
		{"a matching dry-run DENY would deny what an enforced ALLOW allows, and is named",
			[]*security.Authorization{enforcedAllowAll}, []*security.Authorization{denySleep}, fromSleep,
			Decision{Allow: false, Policy: "default/deny-sleep", DryRun: true}},
		{"a dry-run ALLOW that does not match would deny by default",
			nil, []*security.Authorization{allowOther}, fromSleep,
			Decision{Allow: false, DryRun: true}},
		{"a matching dry-run ALLOW would allow, and is named",
			nil, []*security.Authorization{allowOther, allowSleep}, fromSleep,
			Decision{Allow: true, Policy: "default/allow-sleep", DryRun: true}},
		{"an enforced ALLOW that matches keeps allowing next to a dry-run ALLOW that does not",
			[]*security.Authorization{enforcedAllowAll}, []*security.Authorization{allowOther}, fromSleep,
			Decision{Allow: true, Policy: "default/allow-all", DryRun: true}},
		{"an enforced DENY still denies whatever the dry-run policies say",
			[]*security.Authorization{enforcedDenyAll}, []*security.Authorization{allowSleep}, fromSleep,
			Decision{Allow: false, Policy: "default/deny-all", DryRun: true}},
		{"the dry-run list is evaluated as given, flagged dry-run or not",
			nil, []*security.Authorization{strict("default")}, plaintext("10.0.0.1"),
			Decision{Allow: false, Policy: "default/istio_converted_static_strict", DryRun: true}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if got := EvaluateDryRun(tt.enforced, tt.dryRun, tt.conn); got != tt.want {
				t.Errorf("EvaluateDryRun() = %+v, want %+v", got, tt.want)
			}
			if !allDryRun(tt.dryRun) {
				return
			}
			// Mixed into the enforced list, dry-run policies change nothing.
			mixed := append(slices.Clone(tt.dryRun), tt.enforced...)
			if got, want := Evaluate(mixed, tt.conn), Evaluate(tt.enforced, tt.conn); got != want {
				t.Errorf("dry-run policies changed Evaluate() from %+v to %+v", want, got)
			}
		})
	}
}

func allDryRun(ps []*security.Authorization) bool {
	for _, p := range ps {
		if !p.GetDryRun() {
			return false
		}
	}
	return true
}

func TestValidate(t *testing.T) {
	withMatch := func(m *security.Match) *security.Authorization {
		return pol("default", "p", security.Scope_NAMESPACE, security.Action_ALLOW, rule(clause(m)))
	}
	tests := []struct {
		name    string
		policy  *security.Authorization
		wantErr bool
	}{
		{"a policy with every kind of field is valid", withMatch(&security.Match{
			Namespaces: []*security.StringMatch{exact("a")}, NotPrincipals: []*security.StringMatch{presence()},
			SourceIps: []*security.Address{cidr("10.0.0.0/8"), cidr("fd00::/8")}, DestinationPorts: []uint32{65535},
		}), false},
		{"a nil policy is invalid", nil, true},
		{"an unknown action is invalid", &security.Authorization{Action: 7}, true},
		{"an unknown scope is invalid", &security.Authorization{Scope: 9}, true},
		{"an address of 5 bytes is invalid", withMatch(&security.Match{DestinationIps: []*security.Address{{Address: make([]byte, 5)}}}), true},
		{"an IPv4 prefix longer than 32 is invalid", withMatch(&security.Match{NotSourceIps: []*security.Address{{Address: make([]byte, 4), Length: 33}}}), true},
		{"a port above 65535 is invalid", withMatch(&security.Match{NotDestinationPorts: []uint32{65536}}), true},
		{"a string match without a value is invalid", withMatch(&security.Match{Principals: []*security.StringMatch{{}}}), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if err := Validate(tt.policy); (err != nil) != tt.wantErr {
				t.Errorf("Validate() = %v, want error %v", err, tt.wantErr)
			}
		})
	}
}

func FuzzEvaluate(f *testing.F) {
	seed, err := proto.Marshal(pol("default", "p", security.Scope_GLOBAL, security.Action_DENY,
		rule(clause(&security.Match{
			Namespaces: []*security.StringMatch{exact("x")}, NotPrincipals: []*security.StringMatch{presence()},
			SourceIps: []*security.Address{cidr("10.0.0.0/8")}, NotDestinationIps: []*security.Address{cidr("fd00::/8")},
			DestinationPorts: []uint32{80},
		}))))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(seed, sleep, []byte{10, 0, 0, 1}, []byte{10, 0, 1, 5}, uint16(80), false)
	f.Add([]byte{}, "", []byte{}, []byte{}, uint16(0), true)
	f.Fuzz(func(t *testing.T, policy []byte, id string, src, dst []byte, port uint16, plain bool) {
		var p security.Authorization
		if err := proto.Unmarshal(policy, &p); err != nil {
			return
		}
		srcIP, _ := netip.AddrFromSlice(src)
		dstIP, _ := netip.AddrFromSlice(dst)
		conn := Conn{SrcIdentity: id, SrcIP: srcIP, DstIP: dstIP, DstPort: port, Plaintext: plain}
		d := Evaluate([]*security.Authorization{&p, nil, &p}, conn)
		if Validate(&p) != nil && !p.GetDryRun() && d.Allow {
			t.Errorf("a policy that fails validation allowed a connection: %+v", d)
		}
		if p.GetDryRun() && d != (Decision{Allow: true}) {
			t.Errorf("a dry-run policy decided a connection: %+v", d)
		}
		if d := EvaluateDryRun(nil, []*security.Authorization{&p}, conn); Validate(&p) != nil && d.Allow {
			t.Errorf("a dry-run policy that fails validation would allow a connection: %+v", d)
		}
	})
}

func BenchmarkEvaluate(b *testing.B) {
	policies := []*security.Authorization{
		strict("default"),
		pol("default", "allow", security.Scope_WORKLOAD_SELECTOR, security.Action_ALLOW,
			rule(clause(&security.Match{Principals: []*security.StringMatch{exact("cluster.local/ns/default/sa/other")}})),
			rule(clause(&security.Match{Namespaces: []*security.StringMatch{exact("default")}, SourceIps: []*security.Address{cidr("10.0.0.0/16")}}))),
	}
	conn := mtls(sleep, "10.0.0.1")
	b.ReportAllocs()
	for b.Loop() {
		if !Evaluate(policies, conn).Allow {
			b.Fatal("denied")
		}
	}
}
