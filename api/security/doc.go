// Package security holds the L4 authorization wire types (package
// istio.security): the Authorization resource the control plane serves to
// ztunnel over delta xDS.
package security

// AuthorizationTypeURL is the delta xDS resource type URL of Authorization.
const AuthorizationTypeURL = "type.googleapis.com/istio.security.Authorization"
