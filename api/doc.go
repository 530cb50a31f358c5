// Package api is the root of the wire-types module: the protobuf messages and
// gRPC services shared by every component, wire-compatible with Istio's
// ambient protocols. The Go code lives in the subpackages (workloadapi,
// security, zds, ca, xds); this package only holds their cross-cutting tests.
package api
