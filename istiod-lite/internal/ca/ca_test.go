package ca

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net/url"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/kubernetes/fake"
	k8stesting "k8s.io/client-go/testing"
)

func TestRootIsCreatedOnceAndReusedAfterRestart(t *testing.T) {
	ctx := context.Background()
	c := fake.NewClientset()
	first, err := LoadOrCreate(ctx, c, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if first.Source() != SelfSignedSecretName {
		t.Errorf("source = %q, want %q", first.Source(), SelfSignedSecretName)
	}
	sec, err := c.CoreV1().Secrets(DefaultNamespace).Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
	if err != nil {
		t.Fatalf("root secret not stored: %v", err)
	}
	if sec.Type != selfSignedSecretType {
		t.Errorf("secret type = %q, want %q", sec.Type, selfSignedSecretType)
	}
	root := mustParseCert(t, first.RootPEM())
	if !root.IsCA || root.Subject.Organization[0] != DefaultTrustDomain {
		t.Errorf("root: IsCA=%v O=%v, want a CA with O=%s", root.IsCA, root.Subject.Organization, DefaultTrustDomain)
	}
	if _, ok := root.PublicKey.(*ecdsa.PublicKey); !ok {
		t.Errorf("root key is %T, want ECDSA", root.PublicKey)
	}
	if life := root.NotAfter.Sub(root.NotBefore); life < DefaultRootTTL || life > DefaultRootTTL+time.Hour {
		t.Errorf("root lifetime = %s, want about %s", life, DefaultRootTTL)
	}

	// A restart: a new CA from the same cluster state.
	second, err := LoadOrCreate(ctx, c, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if string(second.RootPEM()) != string(first.RootPEM()) {
		t.Fatal("restart generated a new root instead of reusing the stored one")
	}
	creates := 0
	for _, a := range c.Actions() {
		if a.GetVerb() == "create" && a.GetResource().Resource == "secrets" {
			creates++
		}
	}
	if creates != 1 {
		t.Errorf("secret creates = %d, want 1", creates)
	}
}

func TestConcurrentReplicaWinsTheRootRace(t *testing.T) {
	ctx := context.Background()
	other, err := newRoot(Options{}.withDefaults())
	if err != nil {
		t.Fatal(err)
	}
	c := fake.NewClientset()
	c.PrependReactor("create", "secrets", func(k8stesting.Action) (bool, runtime.Object, error) {
		// Another replica stores its root between our Get and Create.
		s := &corev1.Secret{ObjectMeta: metav1.ObjectMeta{Name: SelfSignedSecretName, Namespace: DefaultNamespace}, Data: other}
		if err := c.Tracker().Add(s); err != nil {
			t.Fatal(err)
		}
		return true, nil, apierrors.NewAlreadyExists(schema.GroupResource{Resource: "secrets"}, SelfSignedSecretName)
	})
	ca, err := LoadOrCreate(ctx, c, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if string(ca.RootPEM()) != string(other[caCertKey]) {
		t.Error("after losing the race the CA does not use the winner's root")
	}
}

func TestPluginCAIsUsedWithTheFullChain(t *testing.T) {
	ctx := context.Background()
	rootKey, root := selfSigned(t, "plug-in root")
	interKey, inter := issueCA(t, "plug-in intermediate", root, rootKey)
	c := fake.NewClientset(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: PluginSecretName, Namespace: DefaultNamespace},
		Data: map[string][]byte{
			caCertKey:    certPEM(inter),
			caKeyKey:     keyPEM(t, interKey),
			rootCertKey:  certPEM(root),
			certChainKey: append(certPEM(inter), certPEM(root)...),
		},
	})
	ca, err := LoadOrCreate(ctx, c, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if ca.Source() != PluginSecretName {
		t.Errorf("source = %q, want %q", ca.Source(), PluginSecretName)
	}
	if _, err := c.CoreV1().Secrets(DefaultNamespace).Get(ctx, SelfSignedSecretName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
		t.Errorf("a self-signed root was created although cacerts exists (err=%v)", err)
	}
	if string(ca.RootPEM()) != string(certPEM(root)) {
		t.Error("RootPEM is not the plug-in root")
	}
	id := "spiffe://cluster.local/ns/default/sa/sleep"
	chain, err := ca.Sign(newCSR(t, id), []string{id}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 {
		t.Fatalf("chain has %d certificates, want leaf, intermediate, root", len(chain))
	}
	if got := mustParseCert(t, []byte(chain[1])); !got.Equal(inter) {
		t.Error("chain[1] is not the intermediate")
	}
	if got := mustParseCert(t, []byte(chain[2])); !got.Equal(root) {
		t.Error("chain ends with something other than the root")
	}
	verifyLeaf(t, chain, certPEM(root), id)
}

func TestPluginCAWithoutCertChainStillEndsWithRoot(t *testing.T) {
	rootKey, root := selfSigned(t, "root")
	interKey, inter := issueCA(t, "intermediate", root, rootKey)
	c := fake.NewClientset(&corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: PluginSecretName, Namespace: DefaultNamespace},
		Data:       map[string][]byte{caCertKey: certPEM(inter), caKeyKey: keyPEM(t, interKey), rootCertKey: certPEM(root)},
	})
	ca, err := LoadOrCreate(context.Background(), c, Options{})
	if err != nil {
		t.Fatal(err)
	}
	id := "spiffe://cluster.local/ns/a/sa/b"
	chain, err := ca.Sign(newCSR(t, id), []string{id}, nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 {
		t.Fatalf("chain length = %d, want 3", len(chain))
	}
	verifyLeaf(t, chain, certPEM(root), id)
}

func TestInvalidCASecretsAreRefusedClearly(t *testing.T) {
	rootKey, root := selfSigned(t, "root")
	interKey, inter := issueCA(t, "intermediate", root, rootKey)
	_, otherRoot := selfSigned(t, "other root")
	otherKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	leafKey, leaf := issueLeaf(t, root, rootKey)

	tests := []struct {
		name   string
		secret string
		data   map[string][]byte
		want   string
	}{
		{"a key that does not match the certificate", SelfSignedSecretName,
			map[string][]byte{caCertKey: certPEM(root), caKeyKey: keyPEM(t, otherKey)}, "does not match the public key"},
		{"a certificate that is not a CA", SelfSignedSecretName,
			map[string][]byte{caCertKey: certPEM(leaf), caKeyKey: keyPEM(t, leafKey)}, "not a CA certificate"},
		{"an intermediate stored as the self-signed root", SelfSignedSecretName,
			map[string][]byte{caCertKey: certPEM(inter), caKeyKey: keyPEM(t, interKey)}, "not self-signed"},
		{"garbage instead of a certificate", SelfSignedSecretName,
			map[string][]byte{caCertKey: []byte("nope"), caKeyKey: keyPEM(t, rootKey)}, "no PEM certificate"},
		{"a plug-in CA that does not chain to its root", PluginSecretName,
			map[string][]byte{caCertKey: certPEM(inter), caKeyKey: keyPEM(t, interKey), rootCertKey: certPEM(otherRoot)}, "does not chain"},
		{"a plug-in CA without a root", PluginSecretName,
			map[string][]byte{caCertKey: certPEM(inter), caKeyKey: keyPEM(t, interKey)}, "root-cert.pem"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c := fake.NewClientset(&corev1.Secret{
				ObjectMeta: metav1.ObjectMeta{Name: tt.secret, Namespace: DefaultNamespace}, Data: tt.data,
			})
			_, err := LoadOrCreate(context.Background(), c, Options{})
			if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), tt.secret) {
				t.Fatalf("err = %v, want one naming %s and saying %q", err, tt.secret, tt.want)
			}
		})
	}
}

// Test fixtures.

func selfSigned(t testing.TB, cn string) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * 365 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return key, c
}

func issueCA(t testing.TB, cn string, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(24 * 300 * time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return key, c
}

func issueLeaf(t testing.TB, parent *x509.Certificate, parentKey *ecdsa.PrivateKey) (*ecdsa.PrivateKey, *x509.Certificate) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(3), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, key.Public(), parentKey)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return key, c
}

func certPEM(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}

func keyPEM(t testing.TB, k *ecdsa.PrivateKey) []byte {
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

func mustParseCert(t testing.TB, p []byte) *x509.Certificate {
	t.Helper()
	certs, err := parseCerts(p)
	if err != nil {
		t.Fatal(err)
	}
	return certs[0]
}

// newCSR returns a PEM CSR for a fresh P-256 key with the given URI SANs.
func newCSR(t testing.TB, uris ...string) []byte {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return newCSRWithKey(t, key, uris...)
}

func newCSRWithKey(t testing.TB, key any, uris ...string) []byte {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	for _, u := range uris {
		p, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = append(tmpl.URIs, p)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})
}

// verifyLeaf checks the chain the way a peer would: the leaf verifies against
// the root through the intermediates for both TLS roles, and carries id.
func verifyLeaf(t testing.TB, chain []string, rootPEM []byte, id string) *x509.Certificate {
	t.Helper()
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		t.Fatal("root PEM does not parse")
	}
	inter := x509.NewCertPool()
	for _, p := range chain[1 : len(chain)-1] {
		inter.AddCert(mustParseCert(t, []byte(p)))
	}
	leaf := mustParseCert(t, []byte(chain[0]))
	for _, eku := range []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth} {
		if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{eku}}); err != nil {
			t.Fatalf("leaf does not verify against the root: %v", err)
		}
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id {
		t.Fatalf("leaf URI SANs = %v, want exactly [%s]", leaf.URIs, id)
	}
	if leaf.IsCA || leaf.KeyUsage != x509.KeyUsageDigitalSignature|x509.KeyUsageKeyEncipherment {
		t.Errorf("leaf IsCA=%v KeyUsage=%v", leaf.IsCA, leaf.KeyUsage)
	}
	if !mustParseCert(t, []byte(chain[len(chain)-1])).IsCA {
		t.Error("chain does not end with a CA certificate")
	}
	return leaf
}
