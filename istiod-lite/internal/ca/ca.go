// Package ca is the mesh certificate authority: it keeps the signing key and
// root in Kubernetes Secrets (Istio's self-signed and plug-in formats), signs
// workload certificates with SPIFFE identities, serves Istio's
// CreateCertificate gRPC API to ztunnel and waypoints, and publishes the root
// to every namespace.
package ca

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
)

// Secret names and keys, as Istio names them so that existing tooling and
// documentation for plugging in a CA carry over.
const (
	// PluginSecretName is the operator-provided intermediate CA (plug-in CA).
	PluginSecretName = "cacerts"
	// SelfSignedSecretName holds the root istiod-lite generates on first start.
	SelfSignedSecretName = "istio-ca-secret"
	// selfSignedSecretType is the Secret type Istio gives istio-ca-secret.
	selfSignedSecretType = "istio.io/ca-root"

	caCertKey    = "ca-cert.pem"
	caKeyKey     = "ca-key.pem"
	rootCertKey  = "root-cert.pem"
	certChainKey = "cert-chain.pem"
)

// Defaults for Options.
const (
	DefaultNamespace   = "istio-system"
	DefaultTrustDomain = "cluster.local"
	DefaultTTL         = 24 * time.Hour
	DefaultMaxTTL      = 90 * 24 * time.Hour
	DefaultRootTTL     = 10 * 365 * 24 * time.Hour
)

// DefaultZtunnelServiceAccount is the only identity allowed to ask for
// certificates of other identities.
var DefaultZtunnelServiceAccount = types.NamespacedName{Namespace: "istio-system", Name: "ztunnel"}

// Options configure the CA. Zero fields take the defaults above.
type Options struct {
	// Namespace holds the CA Secrets (the root namespace).
	Namespace   string
	TrustDomain string
	// DefaultTTL is the lifetime of a leaf when the request names none;
	// MaxTTL caps what a request may ask for; RootTTL is the lifetime of a
	// generated root.
	DefaultTTL, MaxTTL, RootTTL time.Duration
	// ZtunnelServiceAccount may request ImpersonatedIdentity.
	ZtunnelServiceAccount types.NamespacedName
}

func (o Options) withDefaults() Options {
	if o.Namespace == "" {
		o.Namespace = DefaultNamespace
	}
	if o.TrustDomain == "" {
		o.TrustDomain = DefaultTrustDomain
	}
	if o.DefaultTTL <= 0 {
		o.DefaultTTL = DefaultTTL
	}
	if o.MaxTTL <= 0 {
		o.MaxTTL = DefaultMaxTTL
	}
	if o.DefaultTTL > o.MaxTTL {
		o.DefaultTTL = o.MaxTTL
	}
	if o.RootTTL <= 0 {
		o.RootTTL = DefaultRootTTL
	}
	if o.ZtunnelServiceAccount.Name == "" {
		o.ZtunnelServiceAccount = DefaultZtunnelServiceAccount
	}
	return o
}

// CA signs certificates with one key. It is immutable after LoadOrCreate and
// safe for concurrent use.
type CA struct {
	opts        Options
	trustDomain spiffeid.TrustDomain
	// source says where the key came from, for logs and errors.
	source string

	signer crypto.Signer
	cert   *x509.Certificate
	// chain is the signing certificate, then any intermediates, then the
	// root, as PEM; it follows every leaf in a response.
	chain []string
	// notAfter is the earliest expiry in chain; no leaf may outlive it.
	notAfter time.Time
	rootPEM  []byte
	roots    *x509.CertPool
}

// LoadOrCreate returns the CA of the cluster: the plug-in CA from Secret
// cacerts when it exists, else the self-signed root from Secret
// istio-ca-secret, generating and storing that root on first start.
func LoadOrCreate(ctx context.Context, c kubernetes.Interface, o Options) (*CA, error) {
	o = o.withDefaults()
	td, err := spiffeid.TrustDomainFromString(o.TrustDomain)
	if err != nil {
		return nil, fmt.Errorf("trust domain %q: %w", o.TrustDomain, err)
	}
	secrets := c.CoreV1().Secrets(o.Namespace)

	plugin, err := secrets.Get(ctx, PluginSecretName, metav1.GetOptions{})
	switch {
	case err == nil:
		ca, err := fromPluginSecret(plugin.Data, o, td)
		if err != nil {
			return nil, fmt.Errorf("secret %s/%s: %w", o.Namespace, PluginSecretName, err)
		}
		return ca, nil
	case !apierrors.IsNotFound(err):
		return nil, fmt.Errorf("reading secret %s/%s: %w", o.Namespace, PluginSecretName, err)
	}

	self, err := secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		var data map[string][]byte
		data, err = newRoot(o)
		if err != nil {
			return nil, err
		}
		self, err = secrets.Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: SelfSignedSecretName, Namespace: o.Namespace},
			Type:       selfSignedSecretType,
			Data:       data,
		}, metav1.CreateOptions{})
		if apierrors.IsAlreadyExists(err) {
			// Another replica won the race; use its root.
			self, err = secrets.Get(ctx, SelfSignedSecretName, metav1.GetOptions{})
		}
	}
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", o.Namespace, SelfSignedSecretName, err)
	}
	ca, err := fromSelfSignedSecret(self.Data, o, td)
	if err != nil {
		return nil, fmt.Errorf("secret %s/%s: %w", o.Namespace, SelfSignedSecretName, err)
	}
	return ca, nil
}

// newRoot generates a self-signed root in the istio-ca-secret layout.
func newRoot(o Options) (map[string][]byte, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, fmt.Errorf("generating root key: %w", err)
	}
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	tmpl := &x509.Certificate{
		SerialNumber:          serial,
		Subject:               pkix.Name{Organization: []string{o.TrustDomain}},
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(o.RootTTL),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign | x509.KeyUsageDigitalSignature,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		return nil, fmt.Errorf("creating root certificate: %w", err)
	}
	keyDER, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		return nil, fmt.Errorf("encoding root key: %w", err)
	}
	return map[string][]byte{
		caCertKey: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		caKeyKey:  pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: keyDER}),
	}, nil
}

func fromSelfSignedSecret(data map[string][]byte, o Options, td spiffeid.TrustDomain) (*CA, error) {
	cert, signer, err := loadKeyPair(data)
	if err != nil {
		return nil, err
	}
	if err := cert.CheckSignatureFrom(cert); err != nil {
		return nil, fmt.Errorf("%s is not self-signed (use the %s secret for an intermediate): %w", caCertKey, PluginSecretName, err)
	}
	ca := &CA{opts: o, trustDomain: td, source: SelfSignedSecretName, signer: signer, cert: cert}
	ca.rootPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert.Raw})
	ca.chain = []string{string(ca.rootPEM)}
	ca.roots = x509.NewCertPool()
	ca.roots.AddCert(cert)
	ca.notAfter = cert.NotAfter
	return ca, ca.checkValidity()
}

func fromPluginSecret(data map[string][]byte, o Options, td spiffeid.TrustDomain) (*CA, error) {
	cert, signer, err := loadKeyPair(data)
	if err != nil {
		return nil, err
	}
	rootPEM := data[rootCertKey]
	roots, err := parseCerts(rootPEM)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", rootCertKey, err)
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	// cert-chain.pem is optional; in Istio's samples it holds ca-cert and
	// the intermediates above it, sometimes the root too.
	var inter []*x509.Certificate
	if len(bytes.TrimSpace(data[certChainKey])) > 0 {
		if inter, err = parseCerts(data[certChainKey]); err != nil {
			return nil, fmt.Errorf("%s: %w", certChainKey, err)
		}
	}
	ipool := x509.NewCertPool()
	for _, c := range inter {
		ipool.AddCert(c)
	}
	chains, err := cert.Verify(x509.VerifyOptions{
		Roots: pool, Intermediates: ipool,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny},
	})
	if err != nil {
		return nil, fmt.Errorf("%s does not chain to %s through %s: %w", caCertKey, rootCertKey, certChainKey, err)
	}
	ca := &CA{opts: o, trustDomain: td, source: PluginSecretName, signer: signer, cert: cert, rootPEM: rootPEM, roots: pool}
	ca.notAfter = cert.NotAfter
	for _, c := range chains[0] {
		ca.chain = append(ca.chain, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})))
		if c.NotAfter.Before(ca.notAfter) {
			ca.notAfter = c.NotAfter
		}
	}
	return ca, ca.checkValidity()
}

// loadKeyPair parses ca-cert.pem and ca-key.pem and checks that they belong
// together and form a CA.
func loadKeyPair(data map[string][]byte) (*x509.Certificate, crypto.Signer, error) {
	certs, err := parseCerts(data[caCertKey])
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", caCertKey, err)
	}
	cert := certs[0]
	signer, err := parseKey(data[caKeyKey])
	if err != nil {
		return nil, nil, fmt.Errorf("%s: %w", caKeyKey, err)
	}
	if !publicKeysEqual(cert.PublicKey, signer.Public()) {
		return nil, nil, fmt.Errorf("%s does not match the public key of %s", caKeyKey, caCertKey)
	}
	if !cert.BasicConstraintsValid || !cert.IsCA {
		return nil, nil, fmt.Errorf("%s is not a CA certificate (basic constraints CA:TRUE missing)", caCertKey)
	}
	if cert.KeyUsage != 0 && cert.KeyUsage&x509.KeyUsageCertSign == 0 {
		return nil, nil, fmt.Errorf("%s may not sign certificates (key usage lacks certSign)", caCertKey)
	}
	return cert, signer, nil
}

func (ca *CA) checkValidity() error {
	now := time.Now()
	if now.After(ca.notAfter) {
		return fmt.Errorf("CA certificate chain expired at %s (delete or replace the secret)", ca.notAfter.UTC().Format(time.RFC3339))
	}
	if now.Before(ca.cert.NotBefore) {
		return fmt.Errorf("CA certificate not valid before %s", ca.cert.NotBefore.UTC().Format(time.RFC3339))
	}
	return nil
}

// RootPEM returns the root certificate(s) workloads must trust.
func (ca *CA) RootPEM() []byte { return bytes.Clone(ca.rootPEM) }

// Roots returns a pool of the roots, for verifying issued certificates.
func (ca *CA) Roots() *x509.CertPool { return ca.roots.Clone() }

// TrustDomain returns the trust domain the CA issues identities in.
func (ca *CA) TrustDomain() spiffeid.TrustDomain { return ca.trustDomain }

// Source names the Secret the signing key came from.
func (ca *CA) Source() string { return ca.source }

func parseCerts(data []byte) ([]*x509.Certificate, error) {
	var certs []*x509.Certificate
	for rest := data; ; {
		var b *pem.Block
		b, rest = pem.Decode(rest)
		if b == nil {
			break
		}
		if b.Type != "CERTIFICATE" {
			continue
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return nil, fmt.Errorf("parsing certificate: %w", err)
		}
		certs = append(certs, c)
	}
	if len(certs) == 0 {
		return nil, errors.New("no PEM certificate found")
	}
	return certs, nil
}

func parseKey(data []byte) (crypto.Signer, error) {
	b, _ := pem.Decode(data)
	if b == nil {
		return nil, errors.New("no PEM private key found")
	}
	var key any
	var err error
	switch b.Type {
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(b.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(b.Bytes)
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(b.Bytes)
	default:
		return nil, fmt.Errorf("unsupported PEM block %q", b.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("parsing private key: %w", err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("key type %T cannot sign", key)
	}
	switch s.(type) {
	case *ecdsa.PrivateKey, *rsa.PrivateKey:
	default:
		// ed25519 CA keys would sign leaves many TLS stacks cannot verify.
		return nil, fmt.Errorf("unsupported CA key type %T (want ECDSA or RSA)", key)
	}
	return s, nil
}

func publicKeysEqual(a, b crypto.PublicKey) bool {
	type equaler interface{ Equal(crypto.PublicKey) bool }
	e, ok := a.(equaler)
	return ok && e.Equal(b)
}

func newSerial() (*big.Int, error) {
	s, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		return nil, fmt.Errorf("generating serial number: %w", err)
	}
	return s.Add(s, big.NewInt(1)), nil
}
