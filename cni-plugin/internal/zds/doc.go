// Package zds is the node agent's side of ZDS, the protocol that hands
// enrolled pods' network namespaces to ztunnel (wire types in the api
// module's zds package).
//
// The agent listens on a SOCK_SEQPACKET unix socket; each ztunnel that
// connects says hello, receives a snapshot (an AddWorkload with the pod's
// netns fd attached for every workload the server holds, then SnapshotSent),
// and from then on incremental adds and deletes. Every message the server
// sends is acknowledged by ztunnel before the next one goes out on that
// connection. Adds go to the newest connection only, so a ztunnel replacing
// an old one during a rolling restart takes over new pods, while deletes go
// to every connection.
//
// Wire framing follows Istio's ZDS: one protobuf message per datagram, the
// netns fd carried as SCM_RIGHTS on the AddWorkload datagram.
package zds
