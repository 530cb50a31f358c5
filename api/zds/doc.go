// Package zds holds the wire types of ZDS (package istio.workload.zds), the
// protocol the node agent uses to hand enrolled pods' network namespaces to
// ztunnel over a SOCK_SEQPACKET unix socket.
package zds

// SocketPath is where the node agent listens and ztunnel connects.
const SocketPath = "/var/run/ztunnel/ztunnel.sock"
