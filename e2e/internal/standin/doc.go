// Package standin is a minimal stand-in for ztunnel, used by the end-to-end
// tests of the CNI agent until the real ztunnel exists. It speaks the ztunnel
// side of ZDS to the node agent, and for every workload the agent hands over
// it opens ztunnel's listeners (15001, 15006, 15008) inside the pod's network
// namespace, marked and registered with the eBPF engine the way ztunnel's
// must be. Every connection that lands on them is answered with one line
// naming the workload, the listener, the original destination and the peer,
// then closed.
//
// It is not ztunnel and must never be mistaken for it: no mTLS, no HBONE, no
// policy, no forwarding. README.md beside this file lists its flags, ports
// and privileges.
package standin
