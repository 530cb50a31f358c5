// Package ca holds the certificate signing wire types and gRPC service
// (package istio.v1.auth) that ztunnel and waypoints use to obtain workload
// certificates from the control plane.
//
// Do not link this package into a binary together with
// istio.io/api/security/v1alpha1: both register the same protobuf message
// names and the binary panics at start-up.
package ca

// ImpersonatedIdentityKey is the IstioCertificateRequest.metadata key with
// which ztunnel asks for a certificate of another identity (a SPIFFE URI).
const ImpersonatedIdentityKey = "ImpersonatedIdentity"
