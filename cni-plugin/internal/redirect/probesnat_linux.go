package redirect

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// Probe SNAT, on the node.
//
// Kubelet probes an enrolled pod from the node's netns. Inside the pod that is
// plaintext arriving on the pod's interface, which redirection would hand to
// ztunnel's inbound listener (and STRICT PeerAuthentication would reject). As
// Istio does, the node rewrites the source of such connections to ProbeSource,
// and both engines let connections from ProbeSource reach the app directly.
//
// What is exempted, precisely: new TCP connections whose packets pass the
// node's output hook (so they were opened by a process on the node itself:
// kubelet, and also any hostNetwork pod) to an address in the @enrolled set
// (and, when pod CIDRs are given, inside one of them). Not exempted: traffic
// forwarded through the node (from pods on it, other nodes, or outside), which
// never passes the output hook; node traffic to pods that are not enrolled
// (they have no redirection, so need no exemption); and anything inside the pod
// that is not from ProbeSource. Only IPv4 is covered: ProbeSource is an IPv4
// address, so IPv6 probes to an enrolled pod are captured like other inbound
// plaintext.
//
// These functions work in the calling thread's network namespace: the agent is
// hostNetwork, so that is the node's. They write a table `ip ambient-node`:
// an output chain sets probeMark on matching packets and a postrouting chain
// SNATs marked packets. The agent keeps @enrolled up to date with
// AddProbeTarget/RemoveProbeTarget and must not call them concurrently with
// InstallProbeSNAT.

func nodeTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyIPv4, Name: nodeTableName}
}

func enrolledSet() *nftables.Set {
	return &nftables.Set{Table: nodeTable(), Name: enrolledSetName, KeyType: nftables.TypeIPAddr}
}

// InstallProbeSNAT installs or updates the node's probe SNAT table. It is
// idempotent and keeps the current members of @enrolled, so re-running it
// (agent restart, pod CIDR change) does not break probes of pods already
// enrolled. IPv6 prefixes in podCIDRs are ignored; with no IPv4 prefix, every
// address in @enrolled qualifies.
func InstallProbeSNAT(podCIDRs []netip.Prefix) error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	var enrolled []netip.Addr
	switch rs, err := readRuleset(c, nftables.TableFamilyIPv4, nodeTableName); {
	case errors.Is(err, errNoTable):
	case err != nil:
		return fmt.Errorf("reading probe snat table: %w", err)
	default:
		for _, s := range rs.sets {
			if s.set.Name != enrolledSetName {
				continue
			}
			for _, e := range s.elems {
				if a, ok := netip.AddrFromSlice(e.Key); ok {
					enrolled = append(enrolled, a)
				}
			}
		}
	}
	if err := probeRuleset(podCIDRs, enrolled).replace(c); err != nil {
		return fmt.Errorf("installing probe snat: %w", err)
	}
	return nil
}

// RemoveProbeSNAT deletes the node's probe SNAT table; a missing table is not an error.
func RemoveProbeSNAT() error {
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	if err := deleteTable(c, nodeTable()); err != nil {
		return fmt.Errorf("removing probe snat: %w", err)
	}
	return nil
}

// AddProbeTarget adds an enrolled pod's IP to @enrolled; adding it twice is
// not an error. An IPv6 address is ignored (see the package's probe notes).
// InstallProbeSNAT must have run.
func AddProbeTarget(ip netip.Addr) error {
	return updateProbeTarget(ip, true)
}

// RemoveProbeTarget removes a pod IP from @enrolled; a missing one is not an error.
func RemoveProbeTarget(ip netip.Addr) error {
	return updateProbeTarget(ip, false)
}

func updateProbeTarget(ip netip.Addr, add bool) error {
	ip = ip.Unmap()
	if !ip.Is4() {
		return nil
	}
	c, err := nftables.New()
	if err != nil {
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	elem := []nftables.SetElement{{Key: ip.AsSlice()}}
	// Adding an element that exists is fine; deleting one that does not is
	// ENOENT, so removal adds first, in the same all-or-nothing batch.
	if err := c.SetAddElements(enrolledSet(), elem); err != nil {
		return fmt.Errorf("updating probe target %s: %w", ip, err)
	}
	if !add {
		if err := c.SetDeleteElements(enrolledSet(), elem); err != nil {
			return fmt.Errorf("updating probe target %s: %w", ip, err)
		}
	}
	if err := c.Flush(); err != nil {
		verb := "adding"
		if !add {
			verb = "removing"
		}
		return fmt.Errorf("%s probe target %s (is probe snat installed?): %w", verb, ip, err)
	}
	return nil
}

// ProbeSNATReport is what DescribeProbeSNAT returns.
type ProbeSNATReport struct {
	Installed bool     `json:"installed"`
	Ruleset   []string `json:"ruleset,omitempty"`
}

// DescribeProbeSNAT reads the node's probe SNAT table back, for the debug endpoint.
func DescribeProbeSNAT() (ProbeSNATReport, error) {
	c, err := nftables.New()
	if err != nil {
		return ProbeSNATReport{}, fmt.Errorf("opening nftables netlink: %w", err)
	}
	rs, err := readRuleset(c, nftables.TableFamilyIPv4, nodeTableName)
	if errors.Is(err, errNoTable) {
		return ProbeSNATReport{}, nil
	}
	if err != nil {
		return ProbeSNATReport{}, fmt.Errorf("describing probe snat: %w", err)
	}
	return ProbeSNATReport{Installed: true, Ruleset: rs.lines()}, nil
}

// probeRuleset is the node-side table.
func probeRuleset(podCIDRs []netip.Prefix, enrolled []netip.Addr) *ruleset {
	set := enrolledSet()
	var elems []nftables.SetElement
	for _, a := range enrolled {
		elems = append(elems, nftables.SetElement{Key: a.Unmap().AsSlice()})
	}

	markIt := one(
		addrField(false, false),
		&expr.Lookup{SourceRegister: reg, SetName: set.Name},
		loadMeta(expr.MetaKeyMARK),
		&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(^probeMark), Xor: binaryutil.NativeEndian.PutUint32(probeMark)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg},
	)
	output := chainSpec{chain: &nftables.Chain{
		Name: "output", Type: nftables.ChainTypeFilter,
		Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle,
	}}
	const why = "node-originated connection to an enrolled pod: a probe"
	tcp := l4proto(unix.IPPROTO_TCP)
	var v4 []netip.Prefix
	for _, p := range podCIDRs {
		if p.Addr().Is4() {
			v4 = append(v4, p.Masked())
		}
	}
	if len(v4) == 0 {
		output.rules = append(output.rules, rule(why, tcp, markIt))
	}
	for _, p := range v4 {
		output.rules = append(output.rules, rule(why, tcp, one(addrField(false, false)), inPrefix(p), markIt))
	}

	postrouting := chainSpec{
		chain: &nftables.Chain{
			Name: "postrouting", Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPostrouting, Priority: nftables.ChainPriorityNATSource,
		},
		rules: []ruleSpec{rule("probes come from the address pods let through",
			one(loadMeta(expr.MetaKeyMARK),
				&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
					Mask: binaryutil.NativeEndian.PutUint32(probeMark), Xor: make([]byte, 4)},
				eq(binaryutil.NativeEndian.PutUint32(probeMark)),
				&expr.Counter{},
				&expr.Immediate{Register: reg, Data: ProbeSource.AsSlice()},
				&expr.NAT{Type: expr.NATTypeSourceNAT, Family: unix.NFPROTO_IPV4, RegAddrMin: reg},
			))},
	}
	return &ruleset{
		table:  nodeTable(),
		sets:   []setSpec{{set: set, elems: elems}},
		chains: []chainSpec{output, postrouting},
	}
}
