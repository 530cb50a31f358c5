// Package model turns Kubernetes, Istio and Gateway API objects into the
// state ztunnel consumes: Address resources (a Workload per pod, a Service per
// Kubernetes Service), L4 Authorization resources, and the status conditions
// to write back on AuthorizationPolicies.
//
// Everything here is a pure, deterministic function of its inputs (Compute):
// no clients, no clocks, no map-order dependence, so equal inputs always give
// byte-identical resources and the xDS server only pushes real changes.
// The semantics follow Istio's ambient control plane.
package model
