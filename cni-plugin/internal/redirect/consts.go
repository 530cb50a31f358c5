package redirect

import "net/netip"

// Protocol facts shared by the engines, the node-side probe SNAT and ztunnel.
// Each is defined once here; bpf/ repeats the ones its C code needs.
const (
	// ZtunnelMark is the SO_MARK ztunnel puts on every socket it opens in a pod's
	// netns, so that nothing it sends is captured again.
	ZtunnelMark uint32 = 0x539
	// ZtunnelMarkMask is the part of the packet mark that carries ZtunnelMark;
	// other bits belong to whoever else marks packets.
	ZtunnelMarkMask uint32 = 0xfff

	// OutboundPort is ztunnel's outbound capture listener inside the pod netns.
	OutboundPort uint16 = 15001
	// InboundPlaintextPort is ztunnel's inbound plaintext capture listener.
	InboundPlaintextPort uint16 = 15006
	// HBONEPort is ztunnel's inbound HBONE (mTLS) listener; never redirected.
	HBONEPort uint16 = 15008
	// DNSPort is ztunnel's DNS proxy listener (UDP), used only when DNS capture is on.
	DNSPort uint16 = 15053
	// dnsServerPort is the port of the DNS queries captured when DNS capture is on.
	dnsServerPort uint16 = 53

	// replyMark is the packet mark (within ZtunnelMarkMask; Istio's in-pod
	// 0x111) the nftables engine puts on the connections ztunnel opens to the
	// pod's own addresses (as a connmark) and restores on the app's packets of
	// those connections, so that policy routing delivers the app's replies to
	// ztunnel's socket in the pod even when ztunnel connected from the client's
	// (foreign) address, instead of sending them out of the pod to that address.
	replyMark uint32 = 0x111

	// routeTable is the policy-routing table of both engines whose only routes
	// are `local 0.0.0.0/0 dev lo` and `local ::/0 dev lo`: what is looked up
	// there is delivered to the pod's own stack.
	routeTable = 133
	// Rule priorities of the engines, below the main table's 32766 and above
	// the kernel's priority-0 `lookup local`. Rules at these priorities that
	// look up main or routeTable are the engines' own: installing either engine
	// replaces them, removing either deletes them.
	rulePriorityProbeReply = 99  // eBPF: to ProbeSource lookup main
	rulePriorityZtunnel    = 100 // eBPF: fwmark ZtunnelMark/ZtunnelMarkMask lookup main
	rulePriorityCapture    = 101 // both: ... lookup routeTable

	// loopbackName is the loopback device of every network namespace.
	loopbackName = "lo"

	// tableName is the nftables table (family inet) inside a pod's netns.
	tableName = "ambient"
	// nodeTableName is the nftables table (family ip) in the node's netns.
	nodeTableName = "ambient-node"
	// enrolledSetName is the set of enrolled pod IPs in nodeTableName.
	enrolledSetName = "enrolled"

	// probeMark is the packet-mark bit the node's output chain sets on node-originated
	// TCP to an enrolled pod and the node's postrouting chain consumes (and clears)
	// to SNAT it to ProbeSource. A single bit outside the ranges kube-proxy
	// (0x4000, 0x8000), Cilium (0x0f00) and ztunnel (0xfff) use.
	probeMark uint32 = 0x0020_0000
)

// ProbeSource is the source address (Istio's) of node-originated traffic to an
// enrolled pod after the node's probe SNAT; redirection inside the pod leaves
// traffic from it alone, so kubelet probes reach the application directly.
var ProbeSource = netip.MustParseAddr("169.254.7.127")

var (
	loopback4 = netip.MustParsePrefix("127.0.0.0/8")
	loopback6 = netip.IPv6Loopback()
)
