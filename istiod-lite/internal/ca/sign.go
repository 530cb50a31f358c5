package ca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// backdate moves NotBefore into the past so that a peer whose clock is a
// little behind ours accepts a certificate the moment it is issued.
const backdate = 2 * time.Minute

// minRSABits is the smallest RSA key a CSR may carry.
const minRSABits = 2048

// maxCSRBytes bounds the CSR a caller may send.
const maxCSRBytes = 64 << 10

// ErrInvalidCSR is wrapped by errors about the CSR itself: not PEM, not a
// CSR, bad signature, unsupported key.
var ErrInvalidCSR = errors.New("invalid CSR")

// ErrInvalidIdentity is wrapped by errors about a requested SPIFFE ID.
var ErrInvalidIdentity = errors.New("invalid identity")

// Sign issues a leaf for the public key in csrPEM with exactly the given
// SPIFFE URI SANs (which must be in the CA's trust domain) and DNS SANs. The
// lifetime is ttl (the default when zero), capped by MaxTTL and by the CA's
// own expiry. The chain is leaf first, root last, one PEM certificate each.
func (ca *CA) Sign(csrPEM []byte, uris []string, dns []string, ttl time.Duration) (chainPEM []string, err error) {
	csr, err := ParseCSR(csrPEM)
	if err != nil {
		return nil, err
	}
	ids, err := ca.parseIDs(uris)
	if err != nil {
		return nil, err
	}
	if len(ids) == 0 && len(dns) == 0 {
		return nil, errors.New("no subject alternative names requested")
	}
	return ca.sign(csr.PublicKey, ids, dns, ttl, leafEKU)
}

// ParseCSR decodes a PEM CSR, checks its signature (proof that the caller
// holds the key) and that its key is ECDSA (P-256/384/521) or RSA of at least
// 2048 bits. Errors wrap ErrInvalidCSR.
func ParseCSR(csrPEM []byte) (*x509.CertificateRequest, error) {
	if len(csrPEM) > maxCSRBytes {
		return nil, fmt.Errorf("%w: larger than %d bytes", ErrInvalidCSR, maxCSRBytes)
	}
	b, _ := pem.Decode(csrPEM)
	if b == nil {
		return nil, fmt.Errorf("%w: no PEM block", ErrInvalidCSR)
	}
	if b.Type != "CERTIFICATE REQUEST" && b.Type != "NEW CERTIFICATE REQUEST" {
		return nil, fmt.Errorf("%w: PEM block is %q, want CERTIFICATE REQUEST", ErrInvalidCSR, b.Type)
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidCSR, err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("%w: signature: %w", ErrInvalidCSR, err)
	}
	switch k := csr.PublicKey.(type) {
	case *ecdsa.PublicKey:
		switch k.Curve {
		case elliptic.P256(), elliptic.P384(), elliptic.P521():
		default:
			return nil, fmt.Errorf("%w: unsupported ECDSA curve", ErrInvalidCSR)
		}
	case *rsa.PublicKey:
		if k.N.BitLen() < minRSABits {
			return nil, fmt.Errorf("%w: RSA key of %d bits, want at least %d", ErrInvalidCSR, k.N.BitLen(), minRSABits)
		}
	default:
		return nil, fmt.Errorf("%w: unsupported public key type %T (want ECDSA or RSA)", ErrInvalidCSR, csr.PublicKey)
	}
	return csr, nil
}

// parseIDs validates SPIFFE IDs and checks they are in our trust domain.
func (ca *CA) parseIDs(uris []string) ([]spiffeid.ID, error) {
	ids := make([]spiffeid.ID, 0, len(uris))
	for _, u := range uris {
		id, err := spiffeid.FromString(u)
		if err != nil {
			return nil, fmt.Errorf("%w: %q: %w", ErrInvalidIdentity, u, err)
		}
		if id.TrustDomain() != ca.trustDomain {
			return nil, fmt.Errorf("%w: %q is not in trust domain %q", ErrInvalidIdentity, u, ca.trustDomain.Name())
		}
		ids = append(ids, id)
	}
	return ids, nil
}

// effectiveTTL applies the default and the caps.
func (ca *CA) effectiveTTL(ttl time.Duration, now time.Time) time.Duration {
	if ttl <= 0 {
		ttl = ca.opts.DefaultTTL
	}
	if ttl > ca.opts.MaxTTL {
		ttl = ca.opts.MaxTTL
	}
	// A leaf that outlives its issuer would not verify for its last part.
	if left := ca.notAfter.Sub(now); ttl > left {
		ttl = left
	}
	return ttl
}

func (ca *CA) sign(pub any, ids []spiffeid.ID, dns []string, ttl time.Duration, eku []x509.ExtKeyUsage) ([]string, error) {
	serial, err := newSerial()
	if err != nil {
		return nil, err
	}
	now := time.Now()
	uris := make([]*url.URL, len(ids))
	for i, id := range ids {
		uris[i] = id.URL()
	}
	tmpl := &x509.Certificate{
		SerialNumber: serial,
		// The subject stays empty: identity is in the SAN, which Go then marks
		// critical as RFC 5280 asks.
		NotBefore:             now.Add(-backdate),
		NotAfter:              now.Add(ca.effectiveTTL(ttl, now)),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           eku,
		BasicConstraintsValid: true,
		URIs:                  uris,
		DNSNames:              dns,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, pub, ca.signer)
	if err != nil {
		return nil, fmt.Errorf("signing certificate: %w", err)
	}
	out := make([]string, 0, 1+len(ca.chain))
	out = append(out, string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})))
	return append(out, ca.chain...), nil
}

// ServingCert issues a fresh key and server certificate for dnsNames (the
// control plane's own TLS certificate). It lives ttl (0: DefaultTTL), within
// MaxTTL; the caller rotates it. The root is left out of the presented chain.
func (ca *CA) ServingCert(dnsNames []string, ttl time.Duration) (tls.Certificate, error) {
	life := ttl
	if len(dnsNames) == 0 {
		return tls.Certificate{}, errors.New("serving certificate needs at least one DNS name")
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("generating serving key: %w", err)
	}
	chain, err := ca.sign(key.Public(), nil, dnsNames, life, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth})
	if err != nil {
		return tls.Certificate{}, err
	}
	var out tls.Certificate
	for _, p := range chain[:len(chain)-1] {
		b, _ := pem.Decode([]byte(p))
		out.Certificate = append(out.Certificate, b.Bytes)
	}
	out.PrivateKey = key
	if out.Leaf, err = x509.ParseCertificate(out.Certificate[0]); err != nil {
		return tls.Certificate{}, fmt.Errorf("parsing serving certificate: %w", err)
	}
	return out, nil
}
