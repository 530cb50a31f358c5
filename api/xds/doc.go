// Package xds holds the delta xDS wire types (package ambient.xds.v1): the
// subset of envoy's DeltaDiscoveryRequest, DeltaDiscoveryResponse, Resource,
// Node and google.rpc.Status that our data plane uses, with envoy's field
// numbers and types, and the stream of envoy's AggregatedDiscoveryService
// that carries them. A client built on it talks to any delta xDS server
// (istiod-lite, Istio's istiod) without linking go-control-plane, whose
// generated code costs megabytes of binary and resident memory.
//
// Only field numbers and types travel on the stream, never message names; so
// the protobuf package is our own and the Go package can share a binary with
// go-control-plane (istiod-lite's tests do).
package xds
