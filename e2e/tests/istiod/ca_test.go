//go:build e2e

package istiod

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	caapi "github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestTheCAIssuesOnlyWhatTheCallerMayHave(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{"istio.io/dataplane-mode": "ambient"})

	// A stand-in ztunnel on node1 (the real one comes with issue 5) and two
	// workloads, one on each node.
	for _, sa := range []struct{ ns, name string }{{istioNamespace, "ztunnel"}, {ns, "on-node1"}, {ns, "on-node2"}} {
		_, err := env.Client.CoreV1().ServiceAccounts(sa.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: sa.name}}, metav1.CreateOptions{})
		if err != nil && !strings.Contains(err.Error(), "already exists") {
			t.Fatal(err)
		}
	}
	zt := kubetest.SleeperPod(istioNamespace, "ztunnel-test-"+ns[len(ns)-5:])
	zt.Spec.ServiceAccountName, zt.Spec.HostNetwork = "ztunnel", true
	zt.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	env.CreatePod(t, zt)
	t.Cleanup(func() { env.Client.CoreV1().Pods(istioNamespace).Delete(ctx, zt.Name, metav1.DeleteOptions{}) })
	for _, n := range []string{"on-node1", "on-node2"} {
		p := kubetest.SleeperPod(ns, n)
		p.Spec.ServiceAccountName = n
		p.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": strings.TrimPrefix(n, "on-")}
		env.CreatePod(t, p)
	}
	ztPod := env.WaitPodReady(t, istioNamespace, zt.Name, 30*time.Second)
	env.WaitPodReady(t, ns, "on-node1", 30*time.Second)
	env.WaitPodReady(t, ns, "on-node2", 30*time.Second)

	conn := dialCA(t, env)
	ztToken := token(t, env, istioNamespace, "ztunnel", caAudience, ztPod)
	spiffe := func(ns, sa string) string { return "spiffe://cluster.local/ns/" + ns + "/sa/" + sa }

	tests := []struct {
		name        string
		token       string
		impersonate string
		csrSAN      string
		wantCode    codes.Code
		wantMsg     string
	}{
		{"ztunnel gets a certificate for a pod on its node", ztToken, spiffe(ns, "on-node1"), spiffe(ns, "on-node1"), codes.OK, ""},
		{"a workload gets its own identity", token(t, env, ns, "on-node2", caAudience, nil), "", spiffe(ns, "on-node2"), codes.OK, ""},
		{"ztunnel is refused a pod on another node", ztToken, spiffe(ns, "on-node2"), spiffe(ns, "on-node2"), codes.PermissionDenied, "node"},
		{"a token for another audience is refused", token(t, env, istioNamespace, "ztunnel", "not-istio-ca", ztPod), spiffe(ns, "on-node1"), spiffe(ns, "on-node1"), codes.Unauthenticated, "audience"},
		{"an expired token is refused", expiredToken(t, env, ns, "on-node1"), "", spiffe(ns, "on-node1"), codes.Unauthenticated, "expired"},
		{"a workload may not impersonate", token(t, env, ns, "on-node1", caAudience, nil), spiffe(ns, "on-node2"), spiffe(ns, "on-node2"), codes.PermissionDenied, "impersonat"},
		{"a CSR for another identity is refused", token(t, env, ns, "on-node1", caAudience, nil), "", spiffe(ns, "on-node2"), codes.InvalidArgument, "SAN"},
	}
	seen := map[string]string{}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := &caapi.IstioCertificateRequest{Csr: string(csrFor(t, tt.csrSAN)), ValidityDuration: 3600}
			if tt.impersonate != "" {
				req.Metadata, _ = structpb.NewStruct(map[string]any{caapi.ImpersonatedIdentityKey: tt.impersonate})
			}
			callCtx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tt.token)
			resp, err := caapi.NewIstioCertificateServiceClient(conn).CreateCertificate(callCtx, req)
			if got := status.Code(err); got != tt.wantCode {
				t.Fatalf("code %v (%v), want %v", got, err, tt.wantCode)
			}
			if tt.wantCode != codes.OK {
				msg := status.Convert(err).Message()
				if !strings.Contains(strings.ToLower(msg), strings.ToLower(tt.wantMsg)) {
					t.Errorf("refusal %q does not say %q", msg, tt.wantMsg)
				}
				if prev, dup := seen[msg]; dup {
					t.Errorf("refusal %q is the same as for %q", msg, prev)
				}
				seen[msg] = tt.name
				return
			}
			verifyChain(t, env, resp.GetCertChain(), tt.csrSAN)
		})
	}
}

func dialCA(t testing.TB, env *kubetest.Env) *grpc.ClientConn {
	t.Helper()
	creds := credentials.NewTLS(&tls.Config{RootCAs: meshRoots(t, env), ServerName: istiodServerName, MinVersion: tls.VersionTLS12})
	conn, err := grpc.NewClient(istiodAddr(t, env), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

func csrFor(t testing.TB, spiffeID string) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(spiffeID)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{u}}, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// verifyChain checks that the chain is leaf first, root last, that the leaf
// carries the SPIFFE ID, and that it verifies against the published root.
func verifyChain(t *testing.T, env *kubetest.Env, chain []string, spiffeID string) {
	t.Helper()
	if len(chain) < 2 {
		t.Fatalf("chain has %d certificates, want leaf and root", len(chain))
	}
	var certs []*x509.Certificate
	for _, c := range chain {
		block, _ := pem.Decode([]byte(c))
		if block == nil {
			t.Fatalf("chain entry is not PEM: %q", c)
		}
		cert, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		certs = append(certs, cert)
	}
	leaf := certs[0]
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != spiffeID {
		t.Errorf("leaf URIs %v, want %s", leaf.URIs, spiffeID)
	}
	inter := x509.NewCertPool()
	for _, c := range certs[1 : len(certs)-1] {
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: meshRoots(t, env), Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Errorf("leaf does not verify against the mesh root: %v", err)
	}
	if ttl := leaf.NotAfter.Sub(time.Now()); ttl > time.Hour+time.Minute || ttl < 50*time.Minute {
		t.Errorf("leaf lifetime %s, want the 1h asked for", ttl)
	}
}

// expiredToken signs, with the cluster's service-account key, a token that is
// valid in every way but its expiry: the one case TokenRequest cannot make.
func expiredToken(t *testing.T, env *kubetest.Env, ns, sa string) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(env.Config.Dir, "pki", "sa.key"))
	if err != nil {
		t.Fatal(err)
	}
	block, _ := pem.Decode(raw)
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	key := k.(*ecdsa.PrivateKey)
	acct, err := env.Client.CoreV1().ServiceAccounts(ns).Get(context.Background(), sa, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	claims := map[string]any{
		"iss": "https://kubernetes.default.svc.cluster.local",
		"aud": []string{caAudience},
		"sub": "system:serviceaccount:" + ns + ":" + sa,
		"iat": now.Add(-2 * time.Hour).Unix(), "nbf": now.Add(-2 * time.Hour).Unix(),
		"exp": now.Add(-time.Hour).Unix(),
		"kubernetes.io": map[string]any{
			"namespace":      ns,
			"serviceaccount": map[string]string{"name": sa, "uid": string(acct.UID)},
		},
	}
	enc := func(v any) string {
		b, _ := json.Marshal(v)
		return base64.RawURLEncoding.EncodeToString(b)
	}
	signing := enc(map[string]string{"alg": "ES256", "typ": "JWT"}) + "." + enc(claims)
	digest := sha256.Sum256([]byte(signing))
	r, s, err := ecdsa.Sign(rand.Reader, key, digest[:])
	if err != nil {
		t.Fatal(err)
	}
	sig := make([]byte, 64)
	r.FillBytes(sig[:32])
	s.FillBytes(sig[32:])
	return signing + "." + base64.RawURLEncoding.EncodeToString(sig)
}
