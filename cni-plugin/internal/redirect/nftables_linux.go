package redirect

import (
	"errors"
	"fmt"
	"net/netip"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"golang.org/x/sys/unix"
)

// NFTables is the fallback engine: NAT redirect rules in one `inet ambient`
// table inside the pod's netns, written over netlink. ztunnel recovers the
// original destination of a redirected connection with SO_ORIGINAL_DST
// (IP6T_SO_ORIGINAL_DST for IPv6).
//
// ztunnel connects inbound connections to the app from the client's address
// (a transparent socket, marked, bound to lo; see ztunnel/inpod DialFrom), so
// the engine also brings those connections and the app's replies home, as
// Istio's in-pod rules do:
//
//   - the table's connmark chain gives every connection ztunnel opens to the
//     pod's own addresses (its marked packets coming back in over lo) the
//     connmark replyMark; its replymark chain (type route, so the kernel routes
//     again) gives the app's packets of those connections the packet mark
//     replyMark;
//
//   - policy routing (IPv4 and IPv6, at the eBPF engine's priority 101 and in
//     its table 133):
//
//     101: fwmark 0x111/0xfff lookup 133 (the app's replies)
//     101: fwmark 0x539/0xfff oif lo lookup 133 (ztunnel's lo-bound sockets)
//     table 133: local 0.0.0.0/0 dev lo src <pod IPv4>, local ::/0 dev lo src <pod IPv6>
//
// Without the connmark, replymark and the first rule, the app's replies to a
// client address leave the pod by its interface and the connection never
// completes; without the second rule a lo-bound socket finds no route to the
// pod's IPv6 address (IPv4 falls back to delivering it over lo as on-link).
// Removing the table and the rules removes everything installed.
type NFTables struct {
	// CaptureDNS also redirects the pod's UDP/53 queries to non-local resolvers
	// to ztunnel's DNS proxy (DNSPort). Off until ztunnel serves DNS.
	CaptureDNS bool
}

var _ Engine = (*NFTables)(nil)

// Name implements Engine.
func (*NFTables) Name() string { return EngineNFTables }

// Install implements Engine. Routing first: until the table marks packets the
// rules match nothing, and a failed table write undoes the routing this call
// added. The table is written in one batch that replaces any previous version,
// so it is atomic, and installing twice equals installing once.
func (e *NFTables) Install(netnsPath string, pod Pod) error {
	err := Do(netnsPath, func(target ns.NetNS) error {
		undo, err := ensureRouting(func(lo int) routing { return nftRouting(lo, pod.IPs) })
		if err != nil {
			return err
		}
		if err := writeNFT(target, podRuleset(e.CaptureDNS).replace); err != nil {
			if uerr := undo(); uerr != nil {
				err = errors.Join(err, fmt.Errorf("undoing routing: %w", uerr))
			}
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("installing nftables redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

// Remove implements Engine: the table, then the routing.
func (e *NFTables) Remove(netnsPath string, pod Pod) error {
	err := Do(netnsPath, func(target ns.NetNS) error {
		return errors.Join(
			writeNFT(target, func(c *nftables.Conn) error { return deleteTable(c, podTable()) }),
			removeRouting())
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
	Rules     []string `json:"rules,omitempty"`
	Routes    []string `json:"routes,omitempty"`
}

// Describe implements Engine: it reads the table and the routing back from
// the kernel.
func (e *NFTables) Describe(netnsPath string, pod Pod) (any, error) {
	report := NFTablesReport{Engine: EngineNFTables}
	err := Do(netnsPath, func(target ns.NetNS) error {
		err := writeNFT(target, func(c *nftables.Conn) error {
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
			return err
		}
		report.Rules, report.Routes, err = describeRouting()
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("describing nftables redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return report, nil
}

// nftRouting is the engine's policy routing for a pod with the given
// addresses; lo is the index of the netns's loopback device.
func nftRouting(lo int, podIPs []netip.Addr) routing {
	rt := routing{routes: localRoutes(lo, podIPs)}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		replies := newRule(family, rulePriorityCapture, routeTable)
		replies.Mark, replies.Mask = replyMark, new(ZtunnelMarkMask)
		boundToLo := newRule(family, rulePriorityCapture, routeTable)
		boundToLo.Mark, boundToLo.Mask = ZtunnelMark, new(ZtunnelMarkMask)
		boundToLo.OifName = loopbackName
		rt.rules = append(rt.rules, replies, boundToLo)
	}
	return rt
}

// doNFT runs fn with an nftables connection inside the netns at netnsPath.
func doNFT(netnsPath string, fn func(*nftables.Conn) error) error {
	return Do(netnsPath, func(target ns.NetNS) error { return writeNFT(target, fn) })
}

// writeNFT runs fn with an nftables connection inside target.
func writeNFT(target ns.NetNS, fn func(*nftables.Conn) error) error {
	c, err := nftables.New(nftables.WithNetNSFd(int(target.Fd())))
	if err != nil {
		return fmt.Errorf("opening nftables netlink: %w", err)
	}
	return fn(c)
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
	copy(lo, loopbackName)

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
			rule("ztunnel's own sockets", markIs(metaMark(), ZtunnelMarkMask, ZtunnelMark), ret),
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

	// The return path of ztunnel's connections to the app from a client's
	// address (see NFTables): mangle priority, after conntrack has attached
	// the connection, before NAT.
	connmark := chainSpec{
		chain: &nftables.Chain{
			Name: "connmark", Type: nftables.ChainTypeFilter,
			Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityMangle,
		},
		rules: []ruleSpec{
			rule("ztunnel's connections to the pod's own addresses: replies go back to ztunnel",
				one(loadMeta(expr.MetaKeyIIFNAME), eq(lo)),
				markIs(metaMark(), ZtunnelMarkMask, ZtunnelMark),
				setMarkBits(connMark(), setConnMark(), ZtunnelMarkMask, replyMark)),
		},
	}
	replymark := chainSpec{
		chain: &nftables.Chain{
			// A route chain: the kernel routes a packet again when the chain
			// changes its mark.
			Name: "replymark", Type: nftables.ChainTypeRoute,
			Hooknum: nftables.ChainHookOutput, Priority: nftables.ChainPriorityMangle,
		},
		rules: []ruleSpec{
			rule("the app's packets on ztunnel's connections: routed to ztunnel's socket",
				markIsNot(metaMark(), ZtunnelMarkMask, ZtunnelMark),
				markIs(connMark(), ZtunnelMarkMask, replyMark),
				setMarkBits(metaMark(), setMetaMark(), ZtunnelMarkMask, replyMark)),
		},
	}
	return &ruleset{table: podTable(), chains: []chainSpec{prerouting, output, connmark, replymark}}
}
