// Package proxy is ztunnel's data path and its wiring: it carries the
// connections the node agent's redirection hands to ztunnel inside each
// enrolled pod's network namespace.
//
// Outbound connections (15001) are resolved against the mesh state (service
// VIP to endpoint, pod IP to workload, waypoint next hop) and carried over
// HBONE with the source pod's certificate, as plain TCP to destinations
// outside the mesh, or passed through to their original destination. Inbound
// HBONE streams (15008) present the destination pod's certificate, pass L4
// authorization and are connected to the application; inbound plaintext
// (15006) passes authorization as an unauthenticated peer. Both ends record
// telemetry.
//
// Run builds the whole ztunnel process around it: the xDS client, the
// certificate manager, the in-pod listener manager, and the admin, metrics
// and readiness servers.
package proxy
