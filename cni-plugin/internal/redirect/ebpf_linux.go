package redirect

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"

	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// EBPF is the default engine: policy routing in the pod's netns sends the
// pod's unmarked outbound TCP to table 133, whose only routes are
// `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo`, so it arrives at the pod's
// own stack, where the sk_lookup program of bpf/redirect hands new connections
// to ztunnel's listeners (which ztunnel registers in the pinned socket map).
// The original destination is the accepted socket's local address.
//
// Rules (IPv4 and IPv6 unless noted), as cni-plugin/README.md describes:
//
//	99:  to 169.254.7.127 lookup main (IPv4; replies to probes)
//	100: fwmark 0x539/0xfff lookup main (ztunnel's own traffic)
//	101: ipproto tcp lookup 133 (everything else that is TCP)
//	101: ipproto udp dport 53 lookup 133 (only with CaptureDNS)
//	table 133: local 0.0.0.0/0 dev lo src <pod IPv4>, local ::/0 dev lo src <pod IPv6>
//
// Rule 101 matches TCP only (the contract's text says "everything else"):
// sending all protocols to the local table would also swallow the pod's UDP
// (its DNS queries to the cluster resolver included), ICMP and IPv6
// link-local traffic, none of which ztunnel handles; the nftables engine
// leaves them alone too. The kernel's priority-0 `lookup local` still serves
// the pod's own and loopback addresses.
//
// The routes carry the pod's address as source (see ebpfRouting), and the
// netns gets accept_local=1 and no strict rp_filter (see relaxSourceValidation):
// without them IPv4 outbound connects fail with ENETUNREACH and inbound IPv4
// packets are dropped as martians.
//
// ztunnel's outbound listener must be IP_TRANSPARENT/IPV6_TRANSPARENT (its
// accepted sockets have a non-local local address) and not MPTCP, and all its
// sockets carry ZtunnelMark.
//
// ztunnel connects inbound connections to the app from the client's address
// (a transparent socket bound to that foreign address) and binds that socket
// to lo. Bound to lo, its SYN misses the interface-bound local route of the
// pod's address and rule 100's main table, and takes rule 101 to table 133,
// so it arrives on lo for one of the pod's addresses, which the program
// leaves to the app. (Unbound, it would arrive as if on the pod's interface
// from a foreign address, and the program would hand it to ztunnel's own
// inbound listener.) The app's replies to the client's address are unmarked
// TCP: rule 101 delivers them over lo to ztunnel's socket. No rule is needed
// for either beyond those above.
type EBPF struct {
	// CaptureDNS also routes the pod's UDP/53 into the pod's stack, where the
	// program hands it to ztunnel's DNS socket if one is registered. Off until
	// ztunnel serves DNS.
	CaptureDNS bool

	// loader is bpf/redirect; tests replace it.
	loader bpfLoader
}

var _ Engine = (*EBPF)(nil)

// bpfLoader is the part of bpf/redirect the engine uses.
type bpfLoader interface {
	Attach(netnsPath, podUID string, podIPs []netip.Addr) error
	Detach(podUID string) error
	Status(podUID string) (any, error)
}

// kernelLoader is the real bpf/redirect.
type kernelLoader struct{}

func (kernelLoader) Attach(netnsPath, podUID string, podIPs []netip.Addr) error {
	return bpfredirect.Attach(netnsPath, podUID, podIPs)
}
func (kernelLoader) Detach(podUID string) error { return bpfredirect.Detach(podUID) }
func (kernelLoader) Status(podUID string) (any, error) {
	r, err := bpfredirect.Status(podUID)
	if errors.Is(err, bpfredirect.ErrNotAttached) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	return r, nil
}

func ebpfSupported() error {
	if err := bpfredirect.Supported(); err != nil {
		return fmt.Errorf("%w: %w", ErrUnsupported, err)
	}
	return nil
}

func (e *EBPF) bpf() bpfLoader {
	if e.loader == nil {
		return kernelLoader{}
	}
	return e.loader
}

// Name implements Engine.
func (*EBPF) Name() string { return EngineEBPF }

// Install implements Engine: routing first, then the program. In between,
// captured connections end in the pod's own stack, never on the network, so
// the pod is never open. On error, what this call created is
// undone; what an earlier Install made is left (it fails closed).
func (e *EBPF) Install(netnsPath string, pod Pod) (err error) {
	defer func() {
		if err != nil {
			err = fmt.Errorf("installing ebpf redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
		}
	}()
	if len(pod.IPs) == 0 {
		return errors.New("pod has no IPs")
	}
	var undo func() error
	err = Do(netnsPath, func(ns.NetNS) error {
		var err error
		if err := relaxSourceValidation(); err != nil {
			return err
		}
		undo, err = ensureRouting(func(lo int) routing { return ebpfRouting(e.CaptureDNS, lo, pod.IPs) })
		return err
	})
	if err != nil {
		return err
	}
	if err := e.bpf().Attach(netnsPath, pod.UID, pod.IPs); err != nil {
		err = fmt.Errorf("attaching sk_lookup program: %w", err)
		if uerr := Do(netnsPath, func(ns.NetNS) error { return undo() }); uerr != nil {
			err = errors.Join(err, fmt.Errorf("undoing routing: %w", uerr))
		}
		return err
	}
	return nil
}

// Remove implements Engine: the program first (pinned state outlives the netns,
// so it is detached even when the netns is gone), then the routing.
func (e *EBPF) Remove(netnsPath string, pod Pod) error {
	var errs []error
	if err := e.bpf().Detach(pod.UID); err != nil {
		errs = append(errs, fmt.Errorf("detaching sk_lookup program: %w", err))
	}
	err := Do(netnsPath, func(ns.NetNS) error { return removeRouting() })
	if err != nil && !errors.Is(err, ErrNetnsGone) {
		errs = append(errs, err)
	}
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("removing ebpf redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return nil
}

// EBPFReport is what EBPF.Describe returns.
type EBPFReport struct {
	Engine string   `json:"engine"`
	Rules  []string `json:"rules"`
	Routes []string `json:"routes"`
	// Program is bpf/redirect's status report; null when nothing is attached.
	Program any `json:"program"`
}

// Describe implements Engine.
func (e *EBPF) Describe(netnsPath string, pod Pod) (any, error) {
	report := EBPFReport{Engine: EngineEBPF}
	err := Do(netnsPath, func(ns.NetNS) (err error) {
		report.Rules, report.Routes, err = describeRouting()
		return err
	})
	if err == nil {
		report.Program, err = e.bpf().Status(pod.UID)
	}
	if err != nil {
		return nil, fmt.Errorf("describing ebpf redirection for pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return report, nil
}

// routing is an engine's policy routing for one pod netns.
type routing struct {
	rules  []netlink.Rule
	routes []netlink.Route
}

// ebpfRouting is the routing for a pod with the given addresses; lo is the
// index of the netns's loopback device.
func ebpfRouting(captureDNS bool, lo int, podIPs []netip.Addr) routing {
	var rt routing
	probe := newRule(unix.AF_INET, rulePriorityProbeReply, unix.RT_TABLE_MAIN)
	probe.Dst = &net.IPNet{IP: ProbeSource.AsSlice(), Mask: net.CIDRMask(32, 32)}
	rt.rules = append(rt.rules, probe)
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		mark := newRule(family, rulePriorityZtunnel, unix.RT_TABLE_MAIN)
		mark.Mark, mark.Mask = ZtunnelMark, new(ZtunnelMarkMask)
		capture := newRule(family, rulePriorityCapture, routeTable)
		capture.IPProto = unix.IPPROTO_TCP
		rt.rules = append(rt.rules, mark, capture)
		if captureDNS {
			dns := newRule(family, rulePriorityCapture, routeTable)
			dns.IPProto = unix.IPPROTO_UDP
			dns.Dport = netlink.NewRulePortRange(dnsServerPort, dnsServerPort)
			rt.rules = append(rt.rules, dns)
		}
	}
	rt.routes = localRoutes(lo, podIPs)
	return rt
}

func newRule(family, prio, table int) netlink.Rule {
	r := *netlink.NewRule()
	r.Family, r.Priority, r.Table = family, prio, table
	return r
}

// localRoutes are routeTable's routes: `local 0.0.0.0/0 dev lo` and
// `local ::/0 dev lo`, each with the pod's address of its family as source.
func localRoutes(lo int, podIPs []netip.Addr) []netlink.Route {
	var routes []netlink.Route
	for _, dst := range []netip.Prefix{netip.MustParsePrefix("0.0.0.0/0"), netip.MustParsePrefix("::/0")} {
		r := netlink.Route{
			LinkIndex: lo,
			Dst:       &net.IPNet{IP: dst.Addr().AsSlice(), Mask: net.CIDRMask(0, dst.Addr().BitLen())},
			Table:     routeTable,
			Type:      unix.RTN_LOCAL,
			Scope:     netlink.SCOPE_HOST,
			Family:    familyOf(dst.Addr()),
		}
		// The pod's own address as preferred source: without it, a connection
		// to a remote address through a local route would take the remote
		// address itself as its source, which IPv4 refuses (ENETUNREACH) and
		// which would send ztunnel's replies out of the pod.
		if i := slices.IndexFunc(podIPs, func(a netip.Addr) bool { return a.Unmap().Is4() == dst.Addr().Is4() }); i >= 0 {
			r.Src = podIPs[i].Unmap().AsSlice()
		}
		// Without an address of this family the route stays, without a source:
		// such traffic must still not leave the pod past ztunnel.
		routes = append(routes, r)
	}
	return routes
}

func familyOf(a netip.Addr) int {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// ensureRouting makes the current netns hold the routes and rules build
// returns (given the index of lo) and nothing else at the engines' priorities
// or in their table (a CaptureDNS change drops the DNS rules; the other
// engine's rules go). It returns how to undo what it added. On error it has
// undone it already.
func ensureRouting(build func(lo int) routing) (undo func() error, err error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, fmt.Errorf("opening netlink: %w", err)
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		h.Close()
		return nil, fmt.Errorf("finding lo: %w", err)
	}
	want := build(lo.Attrs().Index)
	haveRules, haveRoutes, err := listRouting(h)
	if err != nil {
		h.Close()
		return nil, err
	}

	var addedRules []netlink.Rule
	var addedRoutes []netlink.Route
	undo = func() error {
		uh, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("opening netlink: %w", err)
		}
		defer uh.Close()
		var errs []error
		for _, r := range addedRules {
			if err := uh.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("deleting rule %s: %w", formatRule(r), err))
			}
		}
		for _, r := range addedRoutes {
			if err := uh.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
				errs = append(errs, fmt.Errorf("deleting route %s: %w", formatRoute(uh, r), err))
			}
		}
		return errors.Join(errs...)
	}
	defer func() {
		h.Close()
		if err != nil {
			err = errors.Join(err, undo())
			undo = nil
		}
	}()

	// Routes before rules: a rule pointing at an empty table would send the
	// traffic on to the main table, past ztunnel.
	for _, r := range want.routes {
		if slices.ContainsFunc(haveRoutes, func(h netlink.Route) bool { return sameRoute(h, r) }) {
			continue
		}
		if err := h.RouteReplace(&r); err != nil {
			return nil, fmt.Errorf("adding route %s: %w", formatRoute(h, r), err)
		}
		addedRoutes = append(addedRoutes, r)
	}
	for _, r := range want.rules {
		if slices.ContainsFunc(haveRules, func(h netlink.Rule) bool { return sameRule(h, r) }) {
			continue
		}
		if err := h.RuleAdd(&r); err != nil && !errors.Is(err, unix.EEXIST) {
			return nil, fmt.Errorf("adding rule %s: %w", formatRule(r), err)
		}
		addedRules = append(addedRules, r)
	}
	// Anything else of ours (an older version's rules) goes.
	for _, r := range haveRules {
		if !slices.ContainsFunc(want.rules, func(w netlink.Rule) bool { return sameRule(r, w) }) {
			if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
				return nil, fmt.Errorf("deleting stale rule %s: %w", formatRule(r), err)
			}
		}
	}
	return undo, nil
}

// removeRouting deletes the engines' rules and table 133 from the current netns.
func removeRouting() error {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return fmt.Errorf("opening netlink: %w", err)
	}
	defer h.Close()
	rules, routes, err := listRouting(h)
	if err != nil {
		return err
	}
	var errs []error
	// Rules before routes, the reverse of installation.
	for _, r := range rules {
		if err := h.RuleDel(&r); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("deleting rule %s: %w", formatRule(r), err))
		}
	}
	for _, r := range routes {
		if err := h.RouteDel(&r); err != nil && !errors.Is(err, unix.ESRCH) {
			errs = append(errs, fmt.Errorf("deleting route %s: %w", formatRoute(h, r), err))
		}
	}
	return errors.Join(errs...)
}

// describeRouting lists the engines' rules and routes in the current netns,
// formatted for a report.
func describeRouting() (rules, routes []string, err error) {
	h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
	if err != nil {
		return nil, nil, fmt.Errorf("opening netlink: %w", err)
	}
	defer h.Close()
	rs, rts, err := listRouting(h)
	if err != nil {
		return nil, nil, err
	}
	for _, r := range rs {
		rules = append(rules, formatRule(r))
	}
	for _, r := range rts {
		routes = append(routes, formatRoute(h, r))
	}
	return rules, routes, nil
}

// listRouting returns the rules at the engines' priorities that point at the
// main table or table 133, and the routes in table 133.
func listRouting(h *netlink.Handle) ([]netlink.Rule, []netlink.Route, error) {
	var rules []netlink.Rule
	var routes []netlink.Route
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		rs, err := h.RuleList(family)
		if err != nil {
			return nil, nil, fmt.Errorf("listing rules: %w", err)
		}
		for _, r := range rs {
			if r.Priority >= rulePriorityProbeReply && r.Priority <= rulePriorityCapture &&
				(r.Table == unix.RT_TABLE_MAIN || r.Table == routeTable) {
				r.Family = family
				rules = append(rules, r)
			}
		}
		rts, err := h.RouteListFiltered(family, &netlink.Route{Table: routeTable}, netlink.RT_FILTER_TABLE)
		if err != nil {
			return nil, nil, fmt.Errorf("listing routes of table %d: %w", routeTable, err)
		}
		for _, r := range rts {
			r.Family = family
			routes = append(routes, r)
		}
	}
	return rules, routes, nil
}

func sameRule(a, b netlink.Rule) bool {
	return a.Family == b.Family && a.Priority == b.Priority && a.Table == b.Table &&
		a.Mark == b.Mark && maskOf(a) == maskOf(b) && a.IPProto == b.IPProto && a.OifName == b.OifName &&
		prefixString(a.Dst) == prefixString(b.Dst) && portString(a.Dport) == portString(b.Dport)
}

func sameRoute(a, b netlink.Route) bool {
	return a.Table == b.Table && a.Type == b.Type && a.LinkIndex == b.LinkIndex &&
		prefixString(a.Dst) == prefixString(b.Dst) && a.Src.Equal(b.Src)
}

func maskOf(r netlink.Rule) uint32 {
	if r.Mask == nil {
		if r.Mark != 0 {
			return 0xffffffff
		}
		return 0
	}
	return *r.Mask
}

// prefixString renders a rule or route prefix; nil is "all" (the kernel
// reports a default route's destination as nil or as a /0).
func prefixString(n *net.IPNet) string {
	if n == nil {
		return "all"
	}
	if ones, _ := n.Mask.Size(); ones == 0 {
		return "all"
	}
	return n.String()
}

func portString(p *netlink.RulePortRange) string {
	if p == nil {
		return ""
	}
	if p.Start == p.End {
		return fmt.Sprint(p.Start)
	}
	return fmt.Sprintf("%d-%d", p.Start, p.End)
}

func routeTableName(t int) string {
	if t == unix.RT_TABLE_MAIN {
		return "main"
	}
	return fmt.Sprint(t)
}

// formatRule renders a rule like `ip rule` does.
func formatRule(r netlink.Rule) string {
	var b strings.Builder
	fmt.Fprintf(&b, "%s %d: from all", familyWord(r.Family), r.Priority)
	if r.Dst != nil {
		fmt.Fprintf(&b, " to %s", prefixString(r.Dst))
	}
	if r.Mark != 0 || r.Mask != nil {
		fmt.Fprintf(&b, " fwmark %#x/%#x", r.Mark, maskOf(r))
	}
	if r.OifName != "" {
		fmt.Fprintf(&b, " oif %s", r.OifName)
	}
	switch r.IPProto {
	case 0:
	case unix.IPPROTO_TCP:
		b.WriteString(" ipproto tcp")
	case unix.IPPROTO_UDP:
		b.WriteString(" ipproto udp")
	default:
		fmt.Fprintf(&b, " ipproto %d", r.IPProto)
	}
	if r.Dport != nil {
		fmt.Fprintf(&b, " dport %s", portString(r.Dport))
	}
	fmt.Fprintf(&b, " lookup %s", routeTableName(r.Table))
	return b.String()
}

// formatRoute renders a route like `ip route show table N` does.
func formatRoute(h *netlink.Handle, r netlink.Route) string {
	kind := "unicast"
	if r.Type == unix.RTN_LOCAL {
		kind = "local"
	}
	dst := prefixString(r.Dst)
	if dst == "all" {
		dst = "0.0.0.0/0"
		if r.Family == unix.AF_INET6 {
			dst = "::/0"
		}
	}
	dev := fmt.Sprintf("if%d", r.LinkIndex)
	if h != nil {
		if l, err := h.LinkByIndex(r.LinkIndex); err == nil {
			dev = l.Attrs().Name
		}
	} else if r.LinkIndex == 1 {
		dev = "lo"
	}
	src := ""
	if r.Src != nil {
		src = " src " + r.Src.String()
	}
	return fmt.Sprintf("%s %s %s dev %s table %s%s", familyWord(r.Family), kind, dst, dev, routeTableName(r.Table), src)
}

func familyWord(f int) string {
	if f == unix.AF_INET6 {
		return "ipv6"
	}
	return "ipv4"
}

// relaxSourceValidation lets the pod's netns accept packets whose reverse
// route is table 133's local route. With policy rules in place the kernel
// validates every inbound packet's source with a full reverse lookup (rp_filter
// off or not), and the reverse lookup of an inbound TCP packet (rule 101)
// answers "local": without accept_local the packet is dropped as a martian, and
// strict rp_filter (1) drops it anyway. So: accept_local on, and rp_filter 1
// (strict) becomes 2 (loose) wherever it is set; 0 and 2 are left alone.
// Remove leaves these as they are: without the rules they change nothing.
func relaxSourceValidation() error {
	const conf = "/proc/sys/net/ipv4/conf"
	if err := os.WriteFile(filepath.Join(conf, "all", "accept_local"), []byte("1"), 0o644); err != nil {
		return fmt.Errorf("setting accept_local: %w", err)
	}
	entries, err := os.ReadDir(conf)
	if err != nil {
		return fmt.Errorf("reading %s: %w", conf, err)
	}
	for _, e := range entries {
		p := filepath.Join(conf, e.Name(), "rp_filter")
		v, err := os.ReadFile(p)
		if err != nil {
			return fmt.Errorf("reading rp_filter: %w", err)
		}
		if strings.TrimSpace(string(v)) == "1" {
			if err := os.WriteFile(p, []byte("2"), 0o644); err != nil {
				return fmt.Errorf("loosening rp_filter of %s: %w", e.Name(), err)
			}
		}
	}
	return nil
}
