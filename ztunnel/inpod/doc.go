// Package inpod is ztunnel's side of in-pod redirection: it talks ZDS to the
// node agent, which hands over each enrolled pod's network namespace, and
// serves ztunnel's listeners from inside every such namespace.
//
// A [Manager] connects to the agent's SOCK_SEQPACKET socket (api/zds), says
// hello and acks every request. For each AddWorkload it enters the pod's
// netns on a locked OS thread and opens the outbound (15001, transparent),
// inbound plaintext (15006) and HBONE (15008) listeners there, all marked
// 0x539 so redirection lets their traffic out, with SO_REUSEPORT so a new
// ztunnel can bind the same ports during a rolling restart, and without
// MPTCP so the eBPF engine can hold them. 15001 and 15006 go into the pod's
// pinned SOCKMAP when the eBPF engine redirects the pod; otherwise the
// nftables engine is assumed and the original destination comes from
// SO_ORIGINAL_DST. The add is acked only once the listeners are up, so a
// pod is never enrolled without them (the agent fails the CNI ADD on an
// error ack).
//
// Accepted connections go to [Handlers] together with the [Workload] and
// the original destination; [Manager.Dial] opens a marked connection from
// inside a workload's netns, to reach the app on its pod IP or a peer.
// [Manager.DialFrom] opens it
// from a client's address instead, transparently (IP_TRANSPARENT, bound to
// lo), so the app sees the client of an inbound connection as its peer; the
// pod's redirection brings the app's replies back to that socket.
// DelWorkload closes a pod's listeners and leaves its connections alone;
// [Manager.Drain] does that for every pod and waits for the connections.
package inpod
