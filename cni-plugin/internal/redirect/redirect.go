// Package redirect installs, inside an enrolled pod's network namespace, the
// redirection that steers the pod's TCP traffic into ztunnel, and removes it.
//
// Two engines implement [Engine] with the same observable behaviour:
//
//   - eBPF (the default where the kernel supports sk_lookup): policy routing sends
//     the pod's unmarked outbound TCP to a `local` route table so it arrives at the
//     pod's own stack, and the sk_lookup program of bpf/redirect hands new
//     connections to ztunnel's listeners. No netfilter at all.
//   - nftables (the fallback): NAT redirect rules in one `inet ambient` table,
//     written over netlink (no nft or iptables binaries); ztunnel recovers the
//     original destination with SO_ORIGINAL_DST.
//
// In both, new TCP connections the pod opens to a non-local address go to
// ztunnel's outbound listener (15001); new TCP connections arriving on the pod's
// interface for any port but HBONE (15008) go to the inbound plaintext listener
// (15006); ztunnel's own sockets (mark 0x539) and loopback traffic are untouched.
// Both fail closed: when ztunnel is not listening, a captured connection is
// refused (nftables) or its SYN dropped (eBPF); it never bypasses ztunnel.
//
// ztunnel connects inbound connections to the app from the client's address
// (a transparent socket, marked and bound to lo). Both engines deliver such a
// connection to the app over lo, uncaptured, and the app's replies to the
// client's address back to ztunnel's socket rather than out of the pod: the
// eBPF engine with the routing it has anyway, the nftables engine with a
// connmark and policy routing into the same table 133.
//
// Kubelet probes come from the node, so they would be captured as inbound
// plaintext. [InstallProbeSNAT] (run by the hostNetwork agent in the node's netns)
// rewrites the source of TCP connections that processes on the node itself open to
// enrolled pod IPs to [ProbeSource], and both engines let connections from
// [ProbeSource] reach the application directly. Exempted is exactly that: traffic
// originated on the node (the output hook) to an IP in the enrolled set; traffic
// forwarded through the node (other pods, other nodes, anything from outside) and
// node traffic to pods that are not enrolled keep their source and are captured
// as usual.
//
// All namespace work runs on a locked OS thread through [Do].
package redirect

import (
	"errors"
	"net/netip"
)

// Pod identifies the pod whose netns an Engine works in.
type Pod struct {
	UID, Namespace, Name string
	IPs                  []netip.Addr
}

// Engine installs and removes the redirection of one pod's network namespace.
type Engine interface {
	// Name is "ebpf" or "nftables".
	Name() string
	// Install is idempotent (installing twice equals installing once); on error
	// nothing half-installed is left.
	Install(netnsPath string, pod Pod) error
	// Remove is idempotent; a netns that is already gone is not an error.
	Remove(netnsPath string, pod Pod) error
	// Describe reports, JSON-able, what is installed (for the agent's debug endpoint).
	Describe(netnsPath string, pod Pod) (any, error)
}

// Engine names, as accepted by Choose and returned by Engine.Name.
const (
	EngineAuto     = "auto"
	EngineEBPF     = "ebpf"
	EngineNFTables = "nftables"
)

var (
	// ErrNetnsGone is returned (wrapped) when the network namespace does not exist.
	ErrNetnsGone = errors.New("network namespace is gone")
	// ErrUnsupported is returned (wrapped) when an engine cannot run on this kernel
	// or system.
	ErrUnsupported = errors.New("redirection engine not supported")
)
