// Package redirect loads and attaches the kernel half of the eBPF redirection
// engine: an sk_lookup program (redirect.c) attached to a pod's network
// namespace that hands new connections to ztunnel's listening sockets
// (ARCHITECTURE.md, "Redirection inside the pod's network namespace";
// cni-plugin/README.md).
//
// The program only picks sockets. Getting packets to the pod's own stack is the
// job of policy routing that the caller installs in the same netns (rules 99,
// 100, 101 and table 133 with a local default route; see the contract): this
// package neither reads nor writes routes.
//
// Decisions, for new connections only (established ones never reach sk_lookup):
//   - TCP arriving on lo for a destination that is neither loopback, IPv6
//     link-local nor one of the pod's addresses: the socket in slot 0
//     (ztunnel's outbound listener, 15001);
//   - TCP arriving on any other interface from a source that is not local
//     (loopback or a pod address: the kernel reports a connection to the pod's
//     own address on that address's interface, also when the pod or ztunnel
//     opened it), to any port but 15008, 15001, 15006 and 15053, from any
//     source but the probe address 169.254.7.127: slot 1 (inbound plaintext
//     listener, 15006);
//   - UDP to port 53 arriving on lo for a non-local destination: slot 2 (DNS,
//     15053) when that slot holds a socket, else untouched;
//   - everything else: untouched.
//
// A TCP connection that must go to ztunnel while its slot is empty (ztunnel not
// started, restarting, or its socket unusable for that address family) is
// dropped (the connection fails: a reset where the kernel can send one, else
// the SYN is lost): nothing bypasses ztunnel in either direction. SK_PASS there
// would hand outbound connections to any wildcard listener of the pod on that
// port and inbound ones to the application itself.
//
// State lives in bpffs under PinRoot/<pod-uid>/: "link" (the sk_lookup link, so
// the program stays attached when the agent exits), "sockets" (the SOCKMAP
// ztunnel fills, see [RegisterSockets]) and "pod_addrs". The sockets side of
// that contract (pin path, slots, ztunnel's mark and ports, registration)
// lives in the subpackage sockmap, which does not need the eBPF library, so
// ztunnel links it alone. Attach mounts bpffs at
// /sys/fs/bpf in the caller's mount namespace when nothing is mounted there;
// the node agent should run with the host's /sys/fs/bpf (hostPath, mount
// propagation Bidirectional) so that pins outlive its container.
//
// The routing and ztunnel's sockets have requirements the tests here found
// (bpf/README.md, "What the other parts must do"): table 133's IPv4 route with
// the pod's address as source, accept_local on the pod's interface, ztunnel's
// listeners marked, transparent (15001) and not MPTCP.
//
// Privileges: loading needs CAP_BPF (or CAP_SYS_ADMIN); attaching to a netns
// and inserting sockets need CAP_NET_ADMIN; mounting bpffs and opening another
// process's namespace need CAP_SYS_ADMIN. Kernel: 5.9 or newer (sk_lookup
// with bpf_link, BPF_PROG_TEST_RUN for sk_lookup); ingress_ifindex needs 5.17.
package redirect
