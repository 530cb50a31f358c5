// Package identity gives ztunnel the workload certificates it presents on
// behalf of the pods on its node.
//
// A [CAClient] asks the control plane's CA (istio.v1.auth
// IstioCertificateService, port 15012) for a certificate of each workload
// identity, authenticating with ztunnel's own service-account token and
// naming the workload's SPIFFE ID in the ImpersonatedIdentity metadata. A
// [Manager] keeps one key and certificate per identity: fetched on demand or
// ahead of time, shared by concurrent callers, rotated at half its lifetime
// and retried with backoff while the old certificate stays in use. It also
// builds the TLS configurations of HBONE's two ends: [Manager.ServerTLS]
// presents the destination workload's certificate and accepts any peer of
// the trust domain, [Manager.ClientTLS] presents the source workload's
// certificate and accepts only the expected peers.
package identity
