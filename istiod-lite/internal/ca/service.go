package ca

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	caapi "github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

// PodsOnNode answers whether a pod with a service account runs on a node;
// it decides which identities a ztunnel may impersonate.
type PodsOnNode interface {
	ServiceAccountOnNode(ns, sa, node string) bool
}

// Outcomes counted in csr_requests_total; every refusal has its own.
const (
	OutcomeSuccess              = "success"
	OutcomeNoToken              = "no_token"
	OutcomeTokenRejected        = "token_rejected"
	OutcomeAuthnUnavailable     = "authn_unavailable"
	OutcomeNotServiceAccount    = "not_service_account"
	OutcomeImpersonationDenied  = "impersonation_denied"
	OutcomeInvalidImpersonation = "invalid_impersonated_identity"
	OutcomeNoNodeBinding        = "no_node_binding"
	OutcomeNotOnNode            = "identity_not_on_node"
	OutcomeMalformedCSR         = "malformed_csr"
	OutcomeSANMismatch          = "csr_san_mismatch"
	OutcomeInvalidRequest       = "invalid_request"
	OutcomeSignError            = "sign_error"
)

var outcomes = []string{
	OutcomeSuccess, OutcomeNoToken, OutcomeTokenRejected, OutcomeAuthnUnavailable,
	OutcomeNotServiceAccount, OutcomeImpersonationDenied, OutcomeInvalidImpersonation,
	OutcomeNoNodeBinding, OutcomeNotOnNode, OutcomeMalformedCSR, OutcomeSANMismatch,
	OutcomeInvalidRequest, OutcomeSignError,
}

// Service serves istio.v1.auth.IstioCertificateService.
type Service struct {
	caapi.UnimplementedIstioCertificateServiceServer

	ca   *CA
	auth *authn.Authenticator
	pods PodsOnNode

	requests *prometheus.CounterVec
	duration prometheus.Histogram

	// Log receives one line per refusal (never a token). Set it before
	// serving; nil means slog.Default().
	Log *slog.Logger
}

var _ caapi.IstioCertificateServiceServer = (*Service)(nil)

// NewService returns the CreateCertificate service. reg may be nil.
func NewService(ca *CA, auth *authn.Authenticator, pods PodsOnNode, reg prometheus.Registerer) *Service {
	s := &Service{
		ca: ca, auth: auth, pods: pods,
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "csr_requests_total",
			Help: "CreateCertificate requests by outcome (success or the reason for refusal).",
		}, []string{"outcome"}),
		duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "csr_signing_duration_seconds",
			Help:    "Time to serve a successful CreateCertificate request, authentication included.",
			Buckets: []float64{.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1},
		}),
	}
	for _, o := range outcomes {
		s.requests.WithLabelValues(o)
	}
	if reg != nil {
		s.requests = register(reg, s.requests)
		s.duration = register(reg, s.duration)
	}
	return s
}

// register registers c, or reuses the collector already registered under its
// name (a second Service in the same process).
func register[C prometheus.Collector](reg prometheus.Registerer, c C) C {
	if err := reg.Register(c); err != nil {
		var are prometheus.AlreadyRegisteredError
		if errors.As(err, &are) {
			if existing, ok := are.ExistingCollector.(C); ok {
				return existing
			}
		}
	}
	return c
}

// refusal is a refused request: its metric outcome and its gRPC status.
type refusal struct {
	outcome string
	err     error
}

func refuse(outcome string, code codes.Code, format string, args ...any) *refusal {
	return &refusal{outcome: outcome, err: status.Errorf(code, format, args...)}
}

// CreateCertificate issues a certificate for the caller's own identity, or
// for the identity ztunnel asks for on behalf of a pod on its node.
func (s *Service) CreateCertificate(ctx context.Context, req *caapi.IstioCertificateRequest) (*caapi.IstioCertificateResponse, error) {
	start := time.Now()
	id, r := s.authenticate(ctx)
	var chain []string
	var granted spiffeid.ID
	if r == nil {
		chain, granted, r = s.issue(req, id)
	}
	if r != nil {
		s.requests.WithLabelValues(r.outcome).Inc()
		s.log().LogAttrs(ctx, slog.LevelInfo, "certificate request refused",
			slog.String("outcome", r.outcome), slog.String("caller", id.Username),
			slog.String("reason", status.Convert(r.err).Message()))
		return nil, r.err
	}
	s.requests.WithLabelValues(OutcomeSuccess).Inc()
	s.duration.Observe(time.Since(start).Seconds())
	s.log().LogAttrs(ctx, slog.LevelDebug, "certificate issued",
		slog.String("caller", id.Username), slog.String("identity", granted.String()))
	return &caapi.IstioCertificateResponse{CertChain: chain}, nil
}

func (s *Service) log() *slog.Logger {
	if s.Log != nil {
		return s.Log
	}
	return slog.Default()
}

// authenticate maps the authenticator's verdict to a refusal.
func (s *Service) authenticate(ctx context.Context) (authn.Identity, *refusal) {
	id, err := s.auth.Authenticate(ctx)
	switch {
	case err == nil:
		return id, nil
	case errors.Is(err, authn.ErrNoToken):
		return id, refuse(OutcomeNoToken, codes.Unauthenticated, "bad token: %v", err)
	case errors.Is(err, authn.ErrReviewFailed):
		// Not the caller's fault: Unavailable tells it to retry.
		return id, refuse(OutcomeAuthnUnavailable, codes.Unavailable, "cannot authenticate now: %v", err)
	default: // authn.ErrTokenRejected
		return id, refuse(OutcomeTokenRejected, codes.Unauthenticated, "%v", err)
	}
}

// issue decides the identity for an authenticated caller, checks the CSR
// against it and signs.
func (s *Service) issue(req *caapi.IstioCertificateRequest, id authn.Identity) ([]string, spiffeid.ID, *refusal) {
	if id.Namespace == "" || id.ServiceAccount == "" {
		return nil, spiffeid.ID{}, refuse(OutcomeNotServiceAccount, codes.PermissionDenied,
			"caller %q is not a service account; only service accounts get workload certificates", id.Username)
	}
	own, err := spiffeid.FromSegments(s.ca.trustDomain, "ns", id.Namespace, "sa", id.ServiceAccount)
	if err != nil {
		return nil, spiffeid.ID{}, refuse(OutcomeNotServiceAccount, codes.PermissionDenied,
			"caller %q has no valid SPIFFE identity: %v", id.Username, err)
	}
	grant, r := s.grantedIdentity(req, id, own)
	if r != nil {
		return nil, spiffeid.ID{}, r
	}

	csr, err := ParseCSR([]byte(req.GetCsr()))
	if err != nil {
		return nil, spiffeid.ID{}, refuse(OutcomeMalformedCSR, codes.InvalidArgument, "malformed CSR: %v", err)
	}
	if err := sanMatches(csr.URIs, csr.DNSNames, len(csr.IPAddresses)+len(csr.EmailAddresses), grant); err != nil {
		return nil, spiffeid.ID{}, refuse(OutcomeSANMismatch, codes.InvalidArgument, "CSR SAN mismatch: %v", err)
	}

	// validity_duration is in seconds; compare before multiplying so a huge
	// value cannot overflow.
	secs := req.GetValidityDuration()
	if secs < 0 {
		return nil, spiffeid.ID{}, refuse(OutcomeInvalidRequest, codes.InvalidArgument, "validity_duration %d is negative", secs)
	}
	ttl := s.ca.opts.MaxTTL
	if secs < int64(ttl/time.Second) {
		ttl = time.Duration(secs) * time.Second
	}
	chain, err := s.ca.sign(csr.PublicKey, []spiffeid.ID{grant}, nil, ttl, leafEKU)
	if err != nil {
		return nil, spiffeid.ID{}, refuse(OutcomeSignError, codes.Internal, "signing: %v", err)
	}
	return chain, grant, nil
}

// grantedIdentity decides which identity the certificate will carry.
func (s *Service) grantedIdentity(req *caapi.IstioCertificateRequest, id authn.Identity, own spiffeid.ID) (spiffeid.ID, *refusal) {
	v, ok := req.GetMetadata().GetFields()[caapi.ImpersonatedIdentityKey]
	if !ok {
		return own, nil
	}
	sv, isString := v.GetKind().(*structpb.Value_StringValue)
	if !isString {
		return spiffeid.ID{}, refuse(OutcomeInvalidImpersonation, codes.InvalidArgument,
			"invalid ImpersonatedIdentity: metadata value must be a string")
	}
	target := sv.StringValue
	if target == "" {
		return own, nil
	}
	zt := s.ca.opts.ZtunnelServiceAccount
	if id.Namespace != zt.Namespace || id.ServiceAccount != zt.Name {
		return spiffeid.ID{}, refuse(OutcomeImpersonationDenied, codes.PermissionDenied,
			"impersonation refused: only service account %s may request ImpersonatedIdentity, caller is %s/%s",
			zt, id.Namespace, id.ServiceAccount)
	}
	tid, err := spiffeid.FromString(target)
	if err != nil {
		return spiffeid.ID{}, refuse(OutcomeInvalidImpersonation, codes.InvalidArgument,
			"invalid ImpersonatedIdentity %q: %v", target, err)
	}
	if tid.TrustDomain() != s.ca.trustDomain {
		return spiffeid.ID{}, refuse(OutcomeInvalidImpersonation, codes.InvalidArgument,
			"invalid ImpersonatedIdentity %q: not in trust domain %q", target, s.ca.trustDomain.Name())
	}
	ns, sa, ok := parseWorkloadPath(tid.Path())
	if !ok {
		return spiffeid.ID{}, refuse(OutcomeInvalidImpersonation, codes.InvalidArgument,
			"invalid ImpersonatedIdentity %q: path is not /ns/<namespace>/sa/<service-account>", target)
	}
	if id.NodeName == "" {
		return spiffeid.ID{}, refuse(OutcomeNoNodeBinding, codes.PermissionDenied,
			"impersonation refused: caller token is not bound to a node (use a projected token of a ztunnel pod)")
	}
	if !s.pods.ServiceAccountOnNode(ns, sa, id.NodeName) {
		return spiffeid.ID{}, refuse(OutcomeNotOnNode, codes.PermissionDenied,
			"identity not on your node: no pod with service account %s/%s is running on node %q", ns, sa, id.NodeName)
	}
	return tid, nil
}

// leafEKU lets workload certificates serve both ends of mutual TLS.
var leafEKU = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}

// parseWorkloadPath splits /ns/<ns>/sa/<sa>.
func parseWorkloadPath(p string) (ns, sa string, ok bool) {
	parts := strings.Split(p, "/")
	if len(parts) != 5 || parts[0] != "" || parts[1] != "ns" || parts[3] != "sa" || parts[2] == "" || parts[4] == "" {
		return "", "", false
	}
	return parts[2], parts[4], true
}

// sanMatches requires the CSR to ask for exactly the granted identity and
// nothing else.
func sanMatches(uris []*url.URL, dns []string, others int, grant spiffeid.ID) error {
	var got []string
	for _, u := range uris {
		got = append(got, u.String())
	}
	switch {
	case len(dns) > 0 || others > 0:
		return fmt.Errorf("CSR asks for DNS, IP or email SANs; only %s can be granted", grant)
	case len(got) != 1 || got[0] != grant.String():
		return fmt.Errorf("CSR asks for %q, caller may have %s", got, grant)
	}
	return nil
}
