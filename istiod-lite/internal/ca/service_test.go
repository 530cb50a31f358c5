package ca

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"log/slog"
	"net"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes/fake"
	corelisters "k8s.io/client-go/listers/core/v1"
	k8stesting "k8s.io/client-go/testing"
	"k8s.io/client-go/tools/cache"

	caapi "github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

// Tokens of the test cluster. They look like tokens on purpose, so that the
// log check below would catch one.
const (
	tokZtunnel       = "eyJhbGciOiJSUzI1NiJ9.ztunnel-node-1.sig"
	tokZtunnelNoNode = "eyJhbGciOiJSUzI1NiJ9.ztunnel-unbound.sig"
	tokSleep         = "eyJhbGciOiJSUzI1NiJ9.sleep.sig"
	tokWrongAudience = "eyJhbGciOiJSUzI1NiJ9.wrong-audience.sig"
	tokExpired       = "eyJhbGciOiJSUzI1NiJ9.expired.sig"
	tokUser          = "eyJhbGciOiJSUzI1NiJ9.alice.sig"
)

var allTokens = []string{tokZtunnel, tokZtunnelNoNode, tokSleep, tokWrongAudience, tokExpired, tokUser}

func saUser(ns, sa, node string) authenticationv1.UserInfo {
	u := authenticationv1.UserInfo{Username: "system:serviceaccount:" + ns + ":" + sa}
	if node != "" {
		u.Extra = map[string]authenticationv1.ExtraValue{
			"authentication.kubernetes.io/pod-name":  {sa + "-pod"},
			"authentication.kubernetes.io/pod-uid":   {"uid-" + sa},
			"authentication.kubernetes.io/node-name": {node},
		}
	}
	return u
}

// tokenReviews plays the API server's TokenReview endpoint.
type tokenReviews struct {
	calls atomic.Int32
	down  atomic.Bool
}

func (r *tokenReviews) react(action k8stesting.Action) (bool, runtime.Object, error) {
	r.calls.Add(1)
	if r.down.Load() {
		return true, nil, errors.New("connection refused")
	}
	tr := action.(k8stesting.CreateAction).GetObject().(*authenticationv1.TokenReview).DeepCopy()
	ok := func(u authenticationv1.UserInfo) authenticationv1.TokenReviewStatus {
		return authenticationv1.TokenReviewStatus{Authenticated: true, User: u, Audiences: tr.Spec.Audiences}
	}
	switch tr.Spec.Token {
	case tokZtunnel:
		tr.Status = ok(saUser("istio-system", "ztunnel", "node-1"))
	case tokZtunnelNoNode:
		tr.Status = ok(saUser("istio-system", "ztunnel", ""))
	case tokSleep:
		tr.Status = ok(saUser("default", "sleep", "node-1"))
	case tokUser:
		tr.Status = ok(authenticationv1.UserInfo{Username: "alice"})
	case tokWrongAudience:
		tr.Status.Error = `[invalid bearer token, token audiences ["https://kubernetes.default.svc.cluster.local"] is invalid for the target audiences ["istio-ca"]]`
	case tokExpired:
		tr.Status.Error = "[invalid bearer token, service account token has expired]"
	default:
		tr.Status.Error = "invalid bearer token"
	}
	return true, tr, nil
}

func pod(ns, name, sa, node string, phase corev1.PodPhase) *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: node},
		Status:     corev1.PodStatus{Phase: phase},
	}
}

type testEnv struct {
	ca      *CA
	svc     *Service
	reviews *tokenReviews
	reg     *prometheus.Registry
	logs    *bytes.Buffer
	client  caapi.IstioCertificateServiceClient
}

// newTestService builds the service against a fake API server, without gRPC.
func newTestService(t testing.TB) *testEnv {
	t.Helper()
	c := fake.NewClientset()
	reviews := &tokenReviews{}
	c.PrependReactor("create", "tokenreviews", reviews.react)
	ca, err := LoadOrCreate(context.Background(), c, Options{MaxTTL: 48 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	idx := cache.NewIndexer(cache.MetaNamespaceKeyFunc, cache.Indexers{cache.NamespaceIndex: cache.MetaNamespaceIndexFunc})
	for _, p := range []*corev1.Pod{
		pod("default", "sleep-1", "sleep", "node-1", corev1.PodRunning),
		pod("default", "starting-1", "starting", "node-1", corev1.PodPending),
		pod("default", "httpbin-1", "httpbin", "node-2", corev1.PodRunning),
		pod("default", "job-1", "batch", "node-1", corev1.PodSucceeded),
	} {
		idx.Add(p)
	}
	env := &testEnv{ca: ca, reviews: reviews, reg: prometheus.NewRegistry(), logs: &bytes.Buffer{}}
	env.svc = NewService(ca, authn.NewAuthenticator(c, nil), NewPodsOnNode(corelisters.NewPodLister(idx)), env.reg)
	env.svc.Log = slog.New(slog.NewTextHandler(env.logs, &slog.HandlerOptions{Level: slog.LevelDebug}))
	return env
}

// newTestEnv serves the CA over real gRPC and TLS on loopback; only the API
// server is faked.
func newTestEnv(t testing.TB) *testEnv {
	t.Helper()
	env := newTestService(t)
	ca := env.ca
	serving, err := ca.ServingCert([]string{"istiod.istio-system.svc"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{serving}})))
	caapi.RegisterIstioCertificateServiceServer(g, env.svc)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	go g.Serve(ln)
	t.Cleanup(g.Stop)
	conn, err := grpc.NewClient(ln.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: ca.Roots(), ServerName: "istiod.istio-system.svc",
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	env.client = caapi.NewIstioCertificateServiceClient(conn)
	return env
}

func withToken(tok string) context.Context {
	if tok == "" {
		return context.Background()
	}
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok)
}

func impersonate(id string) *structpb.Struct {
	return &structpb.Struct{Fields: map[string]*structpb.Value{caapi.ImpersonatedIdentityKey: structpb.NewStringValue(id)}}
}

const (
	sleepID   = "spiffe://cluster.local/ns/default/sa/sleep"
	httpbinID = "spiffe://cluster.local/ns/default/sa/httpbin"
	ztunnelID = "spiffe://cluster.local/ns/istio-system/sa/ztunnel"
)

func TestCreateCertificateGrants(t *testing.T) {
	env := newTestEnv(t)
	tests := []struct {
		name  string
		token string
		meta  *structpb.Struct
		id    string
	}{
		{"a workload gets its own identity", tokSleep, nil, sleepID},
		{"ztunnel gets its own identity", tokZtunnel, nil, ztunnelID},
		{"ztunnel gets the identity of a running pod on its node", tokZtunnel, impersonate(sleepID), sleepID},
		{"ztunnel gets the identity of a scheduled pod still starting on its node", tokZtunnel, impersonate("spiffe://cluster.local/ns/default/sa/starting"), "spiffe://cluster.local/ns/default/sa/starting"},
		{"an empty ImpersonatedIdentity means the caller's own", tokSleep, impersonate(""), sleepID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := env.client.CreateCertificate(withToken(tt.token), &caapi.IstioCertificateRequest{
				Csr: string(newCSR(t, tt.id)), ValidityDuration: 3600, Metadata: tt.meta,
			})
			if err != nil {
				t.Fatal(err)
			}
			leaf := verifyLeaf(t, resp.CertChain, env.ca.RootPEM(), tt.id)
			if life := leaf.NotAfter.Sub(leaf.NotBefore); life > time.Hour+backdate {
				t.Errorf("leaf lifetime %s, asked for 1h", life)
			}
		})
	}
}

func TestCreateCertificateRefusals(t *testing.T) {
	env := newTestEnv(t)
	tampered := newCSR(t, sleepID)
	tampered[len(tampered)/2]++
	tests := []struct {
		name     string
		token    string
		csr      []byte
		meta     *structpb.Struct
		validity int64
		code     codes.Code
		outcome  string
		msg      string
	}{
		{"a request without a token", "", newCSR(t, sleepID), nil, 0,
			codes.Unauthenticated, OutcomeNoToken, "bad token: unauthenticated: no bearer token"},
		{"a token for another audience", tokWrongAudience, newCSR(t, sleepID), nil, 0,
			codes.Unauthenticated, OutcomeTokenRejected, `token rejected: [invalid bearer token, token audiences ["https://kubernetes.default.svc.cluster.local"] is invalid for the target audiences ["istio-ca"]]`},
		{"an expired token", tokExpired, newCSR(t, sleepID), nil, 0,
			codes.Unauthenticated, OutcomeTokenRejected, "token rejected: [invalid bearer token, service account token has expired]"},
		{"a user that is not a service account", tokUser, newCSR(t, sleepID), nil, 0,
			codes.PermissionDenied, OutcomeNotServiceAccount, `caller "alice" is not a service account`},
		{"a workload token asking to impersonate", tokSleep, newCSR(t, httpbinID), impersonate(httpbinID), 0,
			codes.PermissionDenied, OutcomeImpersonationDenied, "impersonation refused: only service account istio-system/ztunnel may request ImpersonatedIdentity, caller is default/sleep"},
		{"ztunnel asking for a pod on another node", tokZtunnel, newCSR(t, httpbinID), impersonate(httpbinID), 0,
			codes.PermissionDenied, OutcomeNotOnNode, `identity not on your node: no pod with service account default/httpbin is running on node "node-1"`},
		{"ztunnel asking for a finished pod on its node", tokZtunnel, newCSR(t, "spiffe://cluster.local/ns/default/sa/batch"), impersonate("spiffe://cluster.local/ns/default/sa/batch"), 0,
			codes.PermissionDenied, OutcomeNotOnNode, "identity not on your node"},
		{"ztunnel with a token not bound to a node", tokZtunnelNoNode, newCSR(t, sleepID), impersonate(sleepID), 0,
			codes.PermissionDenied, OutcomeNoNodeBinding, "impersonation refused: caller token is not bound to a node"},
		{"ztunnel impersonating another trust domain", tokZtunnel, newCSR(t, "spiffe://other.example/ns/default/sa/sleep"), impersonate("spiffe://other.example/ns/default/sa/sleep"), 0,
			codes.InvalidArgument, OutcomeInvalidImpersonation, `not in trust domain "cluster.local"`},
		{"ztunnel impersonating something that is not a SPIFFE ID", tokZtunnel, newCSR(t, sleepID), impersonate("default/sleep"), 0,
			codes.InvalidArgument, OutcomeInvalidImpersonation, `invalid ImpersonatedIdentity "default/sleep"`},
		{"ztunnel impersonating a non-workload path", tokZtunnel, newCSR(t, sleepID), impersonate("spiffe://cluster.local/ns/default"), 0,
			codes.InvalidArgument, OutcomeInvalidImpersonation, "path is not /ns/<namespace>/sa/<service-account>"},
		{"a CSR that is not PEM", tokSleep, []byte("not a csr"), nil, 0,
			codes.InvalidArgument, OutcomeMalformedCSR, "malformed CSR: invalid CSR: no PEM block"},
		{"a CSR whose signature does not verify", tokSleep, tampered, nil, 0,
			codes.InvalidArgument, OutcomeMalformedCSR, "malformed CSR"},
		{"a CSR for another identity", tokSleep, newCSR(t, httpbinID), nil, 0,
			codes.InvalidArgument, OutcomeSANMismatch, `CSR SAN mismatch: CSR asks for ["spiffe://cluster.local/ns/default/sa/httpbin"], caller may have spiffe://cluster.local/ns/default/sa/sleep`},
		{"a CSR without a SAN", tokSleep, newCSR(t), nil, 0,
			codes.InvalidArgument, OutcomeSANMismatch, "CSR SAN mismatch"},
		{"a CSR asking for an extra identity", tokSleep, newCSR(t, sleepID, httpbinID), nil, 0,
			codes.InvalidArgument, OutcomeSANMismatch, "CSR SAN mismatch"},
		{"ztunnel impersonating with a CSR for its own identity", tokZtunnel, newCSR(t, ztunnelID), impersonate(sleepID), 0,
			codes.InvalidArgument, OutcomeSANMismatch, "CSR SAN mismatch"},
		{"a negative validity", tokSleep, newCSR(t, sleepID), nil, -5,
			codes.InvalidArgument, OutcomeInvalidRequest, "validity_duration -5 is negative"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := counter(t, env.reg, tt.outcome)
			_, err := env.client.CreateCertificate(withToken(tt.token), &caapi.IstioCertificateRequest{
				Csr: string(tt.csr), ValidityDuration: tt.validity, Metadata: tt.meta,
			})
			st := status.Convert(err)
			if st.Code() != tt.code || !strings.Contains(st.Message(), tt.msg) {
				t.Fatalf("got %s %q\nwant %s containing %q", st.Code(), st.Message(), tt.code, tt.msg)
			}
			if got := counter(t, env.reg, tt.outcome); got != before+1 {
				t.Errorf("csr_requests_total{outcome=%q} went %v -> %v, want +1", tt.outcome, before, got)
			}
		})
	}
	for _, tok := range allTokens {
		if strings.Contains(env.logs.String(), tok) {
			t.Fatalf("a token appears in the logs:\n%s", env.logs)
		}
	}
	if !strings.Contains(env.logs.String(), "outcome=identity_not_on_node") {
		t.Errorf("refusals are not logged:\n%s", env.logs)
	}
}

func TestCreateCertificateWhenTokenReviewIsDown(t *testing.T) {
	env := newTestEnv(t)
	env.reviews.down.Store(true)
	_, err := env.client.CreateCertificate(withToken(tokSleep), &caapi.IstioCertificateRequest{Csr: string(newCSR(t, sleepID))})
	if st := status.Convert(err); st.Code() != codes.Unavailable || !strings.Contains(st.Message(), "token review failed") {
		t.Fatalf("got %s %q, want Unavailable saying the review failed", st.Code(), st.Message())
	}
	// The failure is not remembered: once the API server is back, it works.
	env.reviews.down.Store(false)
	if _, err := env.client.CreateCertificate(withToken(tokSleep), &caapi.IstioCertificateRequest{Csr: string(newCSR(t, sleepID))}); err != nil {
		t.Fatal(err)
	}
}

func TestCreateCertificateTTLIsCapped(t *testing.T) {
	env := newTestEnv(t) // MaxTTL 48h
	for _, tt := range []struct {
		validity int64
		want     time.Duration
	}{
		{0, DefaultTTL},
		{600, 10 * time.Minute},
		{1 << 62, 48 * time.Hour}, // also must not overflow
	} {
		resp, err := env.client.CreateCertificate(withToken(tokSleep), &caapi.IstioCertificateRequest{
			Csr: string(newCSR(t, sleepID)), ValidityDuration: tt.validity,
		})
		if err != nil {
			t.Fatal(err)
		}
		leaf := verifyLeaf(t, resp.CertChain, env.ca.RootPEM(), sleepID)
		if got := leaf.NotAfter.Sub(leaf.NotBefore) - backdate; got < tt.want-time.Second || got > tt.want+time.Second {
			t.Errorf("validity %d: lifetime %s, want %s", tt.validity, got, tt.want)
		}
	}
}

func TestAuthenticationIsCachedAcrossRequests(t *testing.T) {
	env := newTestEnv(t)
	for i := 0; i < 5; i++ {
		if _, err := env.client.CreateCertificate(withToken(tokZtunnel), &caapi.IstioCertificateRequest{
			Csr: string(newCSR(t, sleepID)), Metadata: impersonate(sleepID),
		}); err != nil {
			t.Fatal(err)
		}
	}
	if n := env.reviews.calls.Load(); n != 1 {
		t.Errorf("5 requests with one token did %d TokenReviews, want 1", n)
	}
	if got := counter(t, env.reg, OutcomeSuccess); got != 5 {
		t.Errorf("success count = %v, want 5", got)
	}
}

// counter reads csr_requests_total{outcome} from the registry.
func counter(t testing.TB, reg *prometheus.Registry, outcome string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "csr_requests_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "outcome" && l.GetValue() == outcome {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no csr_requests_total{outcome=%q}", outcome)
	return 0
}
