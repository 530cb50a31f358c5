package ca

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"testing"
	"time"

	"k8s.io/client-go/kubernetes/fake"
)

func newTestCA(t testing.TB, o Options) *CA {
	t.Helper()
	ca, err := LoadOrCreate(context.Background(), fake.NewClientset(), o)
	if err != nil {
		t.Fatal(err)
	}
	return ca
}

func TestSignTTL(t *testing.T) {
	ca := newTestCA(t, Options{DefaultTTL: 24 * time.Hour, MaxTTL: 48 * time.Hour})
	short := newTestCA(t, Options{RootTTL: 2 * time.Hour})
	id := "spiffe://cluster.local/ns/default/sa/sleep"
	tests := []struct {
		name string
		ca   *CA
		ttl  time.Duration
		want time.Duration
	}{
		{"no requested TTL gets the default", ca, 0, 24 * time.Hour},
		{"a short TTL is honoured", ca, time.Hour, time.Hour},
		{"a TTL above the max is capped at the max", ca, 10 * 365 * 24 * time.Hour, 48 * time.Hour},
		{"no leaf outlives the CA", short, 24 * time.Hour, 2 * time.Hour},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := time.Now()
			chain, err := tt.ca.Sign(newCSR(t, id), []string{id}, nil, tt.ttl)
			if err != nil {
				t.Fatal(err)
			}
			leaf := verifyLeaf(t, chain, tt.ca.RootPEM(), id)
			if got := leaf.NotAfter.Sub(before); got < tt.want-2*time.Minute || got > tt.want+time.Second {
				t.Errorf("leaf expires %s after issue, want %s", got, tt.want)
			}
			if !leaf.NotBefore.Before(before) {
				t.Errorf("NotBefore %s is not backdated", leaf.NotBefore)
			}
		})
	}
}

func TestSignKeyTypes(t *testing.T) {
	ca := newTestCA(t, Options{})
	id := "spiffe://cluster.local/ns/default/sa/sleep"
	rsa2048, _ := rsa.GenerateKey(rand.Reader, 2048)
	rsa1024, _ := rsa.GenerateKey(rand.Reader, 1024)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)

	if chain, err := ca.Sign(newCSRWithKey(t, rsa2048, id), []string{id}, nil, 0); err != nil {
		t.Errorf("RSA 2048 CSR refused: %v", err)
	} else {
		verifyLeaf(t, chain, ca.RootPEM(), id)
	}
	for name, key := range map[string]any{"RSA 1024": rsa1024, "Ed25519": ed} {
		if _, err := ca.Sign(newCSRWithKey(t, key, id), []string{id}, nil, 0); !errors.Is(err, ErrInvalidCSR) {
			t.Errorf("%s CSR: err = %v, want ErrInvalidCSR", name, err)
		}
	}
}

func TestSignRefusesBadInput(t *testing.T) {
	ca := newTestCA(t, Options{})
	id := "spiffe://cluster.local/ns/default/sa/sleep"
	tampered := newCSR(t, id)
	tampered[len(tampered)/2]++ // breaks the DER or the signature
	tests := []struct {
		name string
		csr  []byte
		uris []string
		want error
	}{
		{"a CSR that is not PEM", []byte("hello"), []string{id}, ErrInvalidCSR},
		{"a certificate instead of a CSR", ca.RootPEM(), []string{id}, ErrInvalidCSR},
		{"a tampered CSR", tampered, []string{id}, ErrInvalidCSR},
		{"an identity in another trust domain", newCSR(t), []string{"spiffe://evil.example/ns/a/sa/b"}, ErrInvalidIdentity},
		{"a URI that is not a SPIFFE ID", newCSR(t), []string{"https://example.com/x"}, ErrInvalidIdentity},
		{"a SPIFFE ID with an empty segment", newCSR(t), []string{"spiffe://cluster.local/ns//sa/b"}, ErrInvalidIdentity},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			if _, err := ca.Sign(tt.csr, tt.uris, nil, 0); !errors.Is(err, tt.want) {
				t.Errorf("err = %v, want %v", err, tt.want)
			}
		})
	}
}

func TestServingCert(t *testing.T) {
	ca := newTestCA(t, Options{})
	cert, err := ca.ServingCert([]string{"istiod.istio-system.svc", "istiod.istio-system.svc.cluster.local"}, 0)
	if err != nil {
		t.Fatal(err)
	}
	// A real TLS handshake, verified against the mesh root by name.
	ln, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{Certificates: []tls.Certificate{cert}})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			c.(*tls.Conn).Handshake()
			c.Close()
		}
	}()
	conn, err := tls.Dial("tcp", ln.Addr().String(), &tls.Config{RootCAs: ca.Roots(), ServerName: "istiod.istio-system.svc"})
	if err != nil {
		t.Fatalf("handshake against the serving certificate: %v", err)
	}
	conn.Close()
	if cert.Leaf.ExtKeyUsage[0] != x509.ExtKeyUsageServerAuth {
		t.Errorf("ExtKeyUsage = %v", cert.Leaf.ExtKeyUsage)
	}
	if life := cert.Leaf.NotAfter.Sub(cert.Leaf.NotBefore) - backdate; life != DefaultTTL {
		t.Errorf("serving certificate lives %s, want the default %s", life, DefaultTTL)
	}
	short, err := ca.ServingCert([]string{"istiod"}, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	if life := short.Leaf.NotAfter.Sub(short.Leaf.NotBefore) - backdate; life != time.Hour {
		t.Errorf("serving certificate asked for 1h lives %s", life)
	}
	if _, err := ca.ServingCert(nil, 0); err == nil || !strings.Contains(err.Error(), "DNS name") {
		t.Errorf("no DNS names: err = %v", err)
	}
}
