package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

func TestCAClientAsksForTheImpersonatedIdentityWithAFreshP256Key(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	c := ca.client(t, testToken)
	key, csr, err := newKeyAndCSR(idA)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := c.CreateCertificate(t.Context(), csr, 90*time.Minute, idA.String())
	if err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	if len(chain) != 2 || chain[1] != ca.rootPEM {
		t.Errorf("chain has %d entries, want leaf and root", len(chain))
	}

	r := ca.nextRequest(t)
	if !r.impersonated || r.identity != idA.String() {
		t.Errorf("CA saw identity %q (impersonated %v), want %s impersonated", r.identity, r.impersonated, idA)
	}
	if r.validity != 90*60 {
		t.Errorf("validity_duration = %d, want %d seconds", r.validity, 90*60)
	}
	pub, ok := r.csr.PublicKey.(*ecdsa.PublicKey)
	if !ok || pub.Curve != elliptic.P256() || !pub.Equal(&key.PublicKey) {
		t.Errorf("CSR key is %T, want our ECDSA P-256 key", r.csr.PublicKey)
	}
	if len(r.csr.URIs) != 1 || r.csr.URIs[0].String() != idA.String() || len(r.csr.DNSNames) != 0 {
		t.Errorf("CSR SANs = %v %v, want only %s", r.csr.URIs, r.csr.DNSNames, idA)
	}
}

func TestCAClientSendsNoImpersonationForItsOwnIdentity(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	_, csr, err := newKeyAndCSR(ztunnelID)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ca.client(t, testToken).CreateCertificate(t.Context(), csr, time.Hour, ""); err != nil {
		t.Fatalf("CreateCertificate: %v", err)
	}
	if r := ca.nextRequest(t); r.impersonated {
		t.Errorf("request carried ImpersonatedIdentity %q, want no metadata", r.identity)
	}
}

func TestCAClientErrorsCarryTheStatusMessage(t *testing.T) {
	tests := []struct {
		name     string
		token    string
		fail     error
		wantCode codes.Code
		wantMsg  string
	}{
		{"a wrong token is refused as unauthenticated", "not-the-token", nil, codes.Unauthenticated, "bad token"},
		{"a refusal keeps the CA's reason", testToken, status.Error(codes.PermissionDenied, "identity not on your node"),
			codes.PermissionDenied, "identity not on your node"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ca := newFakeCA(t, realClock{})
			ca.setFail(tt.fail)
			_, csr, err := newKeyAndCSR(idA)
			if err != nil {
				t.Fatal(err)
			}
			_, err = ca.client(t, tt.token).CreateCertificate(t.Context(), csr, time.Hour, idA.String())
			if got := status.Code(err); got != tt.wantCode {
				t.Errorf("code = %v, want %v (error %v)", got, tt.wantCode, err)
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantMsg) {
				t.Errorf("error %v does not carry %q", err, tt.wantMsg)
			}
		})
	}
}

func TestCAClientTokenErrorStopsTheCall(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	c, err := NewCAClient(ca.addr, ca.serverRoots, CAServerName, func() (string, error) { return "", errTest })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, csr, err := newKeyAndCSR(idA)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := c.CreateCertificate(ctx, csr, time.Hour, idA.String()); err == nil || !strings.Contains(err.Error(), errTest.Error()) {
		t.Errorf("error = %v, want the token error", err)
	}
	if n := ca.count(idA); n != 0 {
		t.Errorf("CA saw %d requests, want none", n)
	}
}

func TestCAClientRefusesACAWithAnUntrustedCertificate(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	other := newFakeCA(t, realClock{})
	c, err := NewCAClient(ca.addr, other.serverRoots, CAServerName, func() (string, error) { return testToken, nil })
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	_, csr, err := newKeyAndCSR(idA)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if _, err := c.CreateCertificate(ctx, csr, time.Hour, idA.String()); status.Code(err) != codes.Unavailable {
		t.Errorf("error = %v, want Unavailable (TLS refused)", err)
	}
}
