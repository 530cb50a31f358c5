package redirect

import (
	"errors"
	"fmt"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// NFTables is the fallback engine: NAT redirect rules in one `inet ambient`
// table inside the pod's netns, written over netlink. Removing the table removes
// everything it installed. ztunnel recovers the original destination of a
// redirected connection with SO_ORIGINAL_DST (IP6T_SO_ORIGINAL_DST for IPv6).
type NFTables struct {
	// CaptureDNS also redirects the pod's UDP/53 queries to non-local resolvers
	// to ztunnel's DNS proxy (DNSPort). Off until ztunnel serves DNS.
	CaptureDNS bool
}

var _ Engine = (*NFTables)(nil)

// Name implements Engine.
func (*NFTables) Name() string { return EngineNFTables }

// Install implements Engine. It writes the table in one batch that replaces any
// previous version, so it is atomic and idempotent.
func (e *NFTables) Install(netnsPath string, pod Pod) error {
	err := doNFT(netnsPath, func(c *nftables.Conn) error {
		return podRuleset(e.CaptureDNS).replace(c)
	})
	if err != nil {
		return fmt.Errorf("installing nftables redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

// Remove implements Engine.
func (e *NFTables) Remove(netnsPath string, pod Pod) error {
	err := doNFT(netnsPath, func(c *nftables.Conn) error {
		return deleteTable(c, podTable())
	})
	if err != nil && !errors.Is(err, ErrNetnsGone) {
		return fmt.Errorf("removing nftables redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

// NFTablesReport is what NFTables.Describe returns.
type NFTablesReport struct {
	Engine    string   `json:"engine"`
	Installed bool     `json:"installed"`
	Ruleset   []string `json:"ruleset,omitempty"`
}

// Describe implements Engine: it reads the table back from the kernel.
func (e *NFTables) Describe(netnsPath string, pod Pod) (any, error) {
	report := NFTablesReport{Engine: EngineNFTables}
	err := doNFT(netnsPath, func(c *nftables.Conn) error {
		rs, err := readRuleset(c, nftables.TableFamilyINet, tableName)
		if errors.Is(err, errNoTable) {
			return nil
		}
		if err != nil {
			return err
		}
		report.Installed, report.Ruleset = true, rs.lines()
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("describing nftables redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return report, nil
}

// doNFT runs fn with an nftables connection inside the netns at netnsPath.
func doNFT(netnsPath string, fn func(*nftables.Conn) error) error {
	return Do(netnsPath, func(target ns.NetNS) error {
		c, err := nftables.New(nftables.WithNetNSFd(int(target.Fd())))
		if err != nil {
			return fmt.Errorf("opening nftables netlink: %w", err)
		}
		return fn(c)
	})
}

func podTable() *nftables.Table {
	return &nftables.Table{Family: nftables.TableFamilyINet, Name: tableName}
}

// podRuleset is the pod-side table. The order of the return rules does not
// matter; each capture rule comes last in its chain.
func podRuleset(captureDNS bool) *ruleset {
	var (
		tcp  = l4proto(unix.IPPROTO_TCP)
		ipv4 = nfproto(unix.NFPROTO_IPV4)
		ipv6 = nfproto(unix.NFPROTO_IPV6)
		ret  = one(verdict(expr.VerdictReturn))
		lo   = make([]byte, unix.IFNAMSIZ)
	)
	copy(lo, "lo")

	prerouting := chainSpec{
		chain: &nftables.Chain{
			Name: "prerouting", Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest,
		},
		rules: []ruleSpec{
			rule("the pod's own loopback traffic", one(loadMeta(expr.MetaKeyIIFNAME), eq(lo)), ret),
			rule("kubelet probes, SNATed by the node, reach the app directly",
				ipv4, one(addrField(false, true), eq(ProbeSource.AsSlice())), ret),
			rule("HBONE is ztunnel's own listener", tcp, dport(HBONEPort), ret),
			rule("already at ztunnel", tcp, dport(InboundPlaintextPort), ret),
			rule("already at ztunnel", tcp, dport(OutboundPort), ret),
			rule("inbound plaintext to ztunnel", tcp, redirectTo(InboundPlaintextPort)),
		},
	}

	output := chainSpec{
		chain: &nftables.Chain{
			Name: "output", Type: nftables.ChainTypeNAT,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityNATDest,
		},
		rules: []ruleSpec{
			rule("ztunnel's own sockets",
				one(loadMeta(expr.MetaKeyMARK),
					&expr.Bitwise{SourceRegister: reg, DestRegister: reg, Len: 4,
						Mask: binaryutil.NativeEndian.PutUint32(ZtunnelMarkMask), Xor: make([]byte, 4)},
					eq(binaryutil.NativeEndian.PutUint32(ZtunnelMark))),
				ret),
			rule("the pod's own addresses",
				one(&expr.Fib{Register: reg, FlagDADDR: true, ResultADDRTYPE: true},
					eq(binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL))),
				ret),
			rule("loopback", ipv4, one(addrField(false, false)), inPrefix(loopback4), ret),
			rule("loopback", ipv6, one(addrField(true, false), eq(loopback6.AsSlice())), ret),
			rule("outbound TCP to ztunnel", tcp, redirectTo(OutboundPort)),
		},
	}
	if captureDNS {
		output.rules = append(output.rules,
			rule("DNS to ztunnel's DNS proxy", l4proto(unix.IPPROTO_UDP), dport(dnsServerPort), redirectTo(DNSPort)))
	}
	return &ruleset{table: podTable(), chains: []chainSpec{prerouting, output}}
}
