//go:build ignore

// sk_lookup program of the eBPF redirection engine (ARCHITECTURE.md,
// "Redirection inside the pod's network namespace"; cni-plugin/CONTRACT.md).
//
// Policy routing in the pod's netns already delivers every unmarked packet to
// the pod's own stack (table 133: local 0.0.0.0/0 dev lo). This program runs
// when the kernel looks for a listening socket for a new connection and picks
// ztunnel's listener instead, so the accepted socket's local address is the
// original destination: no NAT, no conntrack, no SO_ORIGINAL_DST.

#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#define AF_INET 2
#define AF_INET6 10

// Slots of the sockets map; ztunnel stores its listeners there (CONTRACT.md).
#define SLOT_OUTBOUND 0 // 15001
#define SLOT_INBOUND 1  // 15006, plaintext
#define SLOT_DNS 2      // 15053, UDP; empty until ztunnel serves DNS

#define PORT_OUTBOUND 15001
#define PORT_INBOUND 15006
#define PORT_HBONE 15008
#define PORT_DNS 15053

// 169.254.7.127: kubelet probes are SNATed to it on the node and must reach the
// application directly, not ztunnel.
#define PROBE_SRC_IP4 0xa9fe077f

// Interface on which connections of the pod's own processes arrive (routed to
// lo by table 133). A variable, not a literal, only because BPF_PROG_TEST_RUN
// zeroes ingress_ifindex: the unit tests rewrite it before loading.
volatile const __u32 loopback_ifindex = 1;

// ztunnel's listening sockets, keyed by SLOT_*. Sockets leave the map by
// themselves when closed, so a dead ztunnel leaves empty slots.
struct {
	__uint(type, BPF_MAP_TYPE_SOCKMAP);
	__uint(max_entries, 3);
	__type(key, __u32);
	__type(value, __u64);
} sockets SEC(".maps");

// The pod's addresses, IPv4 as IPv4-mapped IPv6. The program has no FIB
// lookup, so this is how it tells "the pod talks to itself" (left alone) from
// "the pod talks to the world" or "the world talks to the pod" (captured).
struct pod_addr {
	__u8 addr[16];
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 64);
	__type(key, struct pod_addr);
	__type(value, __u8);
} pod_addrs SEC(".maps");

// is_local tells whether ip (network byte order, IPv4 in ip[0] when family is
// AF_INET) is loopback, IPv6 link-local or one of the pod's addresses.
static __always_inline int is_local(__u32 family, const __u32 ip[4])
{
	struct pod_addr key = {};

	if (family == AF_INET) {
		if ((bpf_ntohl(ip[0]) >> 24) == 127)
			return 1;
		key.addr[10] = 0xff;
		key.addr[11] = 0xff;
		__builtin_memcpy(&key.addr[12], &ip[0], 4);
	} else if (family == AF_INET6) {
		if (!ip[0] && !ip[1] && !ip[2] && ip[3] == bpf_htonl(1))
			return 1;
		// Link-local addresses are never mesh destinations and are only
		// reachable with a scope the local route cannot give.
		if ((bpf_ntohl(ip[0]) & 0xffc00000) == 0xfe800000)
			return 1;
		__builtin_memcpy(key.addr, ip, 16);
	} else {
		return 1;
	}
	return bpf_map_lookup_elem(&pod_addrs, &key) != NULL;
}

// The context may only be read field by field, so copy before comparing.
static __always_inline int local_destination(struct bpf_sk_lookup *ctx)
{
	__u32 ip[4] = {};

	if (ctx->family == AF_INET) {
		ip[0] = ctx->local_ip4;
	} else {
		ip[0] = ctx->local_ip6[0];
		ip[1] = ctx->local_ip6[1];
		ip[2] = ctx->local_ip6[2];
		ip[3] = ctx->local_ip6[3];
	}
	return is_local(ctx->family, ip);
}

static __always_inline int local_source(struct bpf_sk_lookup *ctx)
{
	__u32 ip[4] = {};

	if (ctx->family == AF_INET) {
		ip[0] = ctx->remote_ip4;
	} else {
		ip[0] = ctx->remote_ip6[0];
		ip[1] = ctx->remote_ip6[1];
		ip[2] = ctx->remote_ip6[2];
		ip[3] = ctx->remote_ip6[3];
	}
	return is_local(ctx->family, ip);
}

// Assigns the socket in slot. A slot that must be used but is empty (ztunnel
// not there) or unusable (wrong address family) drops the lookup: the
// connection fails (a reset where the kernel can send one, else a dropped SYN)
// and nothing bypasses ztunnel, neither the pod's own wildcard listeners for
// outbound nor the application for inbound.
static __always_inline int assign(struct bpf_sk_lookup *ctx, __u32 slot, int optional)
{
	struct bpf_sock *sk;
	long err;

	sk = bpf_map_lookup_elem(&sockets, &slot);
	if (!sk)
		return optional ? SK_PASS : SK_DROP;
	err = bpf_sk_assign(ctx, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return optional ? SK_PASS : SK_DROP;
	return SK_PASS;
}

SEC("sk_lookup")
int ambient_redirect(struct bpf_sk_lookup *ctx)
{
	// Another program already chose: not ours to override.
	if (ctx->sk)
		return SK_PASS;

	if (ctx->protocol == IPPROTO_UDP) {
		// Only the pod's outbound queries; DNS capture is optional, so an
		// empty slot means "off", not "fail closed".
		if (ctx->local_port == 53 && ctx->ingress_ifindex == loopback_ifindex &&
		    !local_destination(ctx))
			return assign(ctx, SLOT_DNS, 1);
		return SK_PASS;
	}
	if (ctx->protocol != IPPROTO_TCP)
		return SK_PASS;

	if (ctx->ingress_ifindex == loopback_ifindex) {
		// Loopback traffic (untouched), or a connection of the pod to the
		// world that table 133 routed to lo.
		if (local_destination(ctx))
			return SK_PASS;
		return assign(ctx, SLOT_OUTBOUND, 0);
	}

	// A connection to one of the pod's own addresses is reported on the
	// interface that owns the address even when the pod (or ztunnel, reaching
	// the application) opened it: the source tells those apart from the
	// network, and they are left alone.
	if (local_source(ctx))
		return SK_PASS;
	// From the network. HBONE goes to ztunnel's 15008 as is; ztunnel's own
	// ports are not redirected onto each other.
	switch (ctx->local_port) {
	case PORT_HBONE:
	case PORT_OUTBOUND:
	case PORT_INBOUND:
	case PORT_DNS:
		return SK_PASS;
	}
	if (ctx->family == AF_INET && ctx->remote_ip4 == bpf_htonl(PROBE_SRC_IP4))
		return SK_PASS;
	return assign(ctx, SLOT_INBOUND, 0);
}

char __license[] SEC("license") = "Dual BSD/GPL";
