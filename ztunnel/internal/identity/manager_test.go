package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/x509"
	"errors"
	"log/slog"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// testWait is a wait no healthy test comes near; the tests never assert on
// timing.
const testWait = 30 * time.Second

// quiet drops the warnings that failing fetches log.
var quiet = slog.New(slog.DiscardHandler)

// newTestManager returns a Manager on a fake clock talking gRPC to a fake CA.
func newTestManager(t *testing.T, opts Options) (*Manager, *fakeCA, *fakeClock) {
	t.Helper()
	clk := newFakeClock()
	ca := newFakeCA(t, clk)
	opts.Clock = clk
	opts.Log = quiet
	if opts.WaitTimeout == 0 {
		opts.WaitTimeout = testWait
	}
	if opts.CertTTL == 0 {
		opts.CertTTL = time.Hour
	}
	m := NewManager(ca.client(t, testToken), opts)
	t.Cleanup(m.Close)
	return m, ca, clk
}

func mustGet(t *testing.T, m *Manager, id spiffeid.ID) *Certificate {
	t.Helper()
	c, err := m.Get(t.Context(), id)
	if err != nil {
		t.Fatalf("Get(%s): %v", id, err)
	}
	return c
}

func TestGetFetchesOnDemandAndThenServesFromCache(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{Self: ztunnelID})
	c := mustGet(t, m, idA)
	if c.ID != idA || c.TLS.Leaf.URIs[0].String() != idA.String() {
		t.Errorf("certificate is for %s, want %s", c.ID, idA)
	}
	if len(c.TLS.Certificate) != 1 || len(c.Roots) != 1 || !c.Roots[0].Equal(ca.root) {
		t.Errorf("presents %d certificates with %d roots, want the leaf alone and the CA's root", len(c.TLS.Certificate), len(c.Roots))
	}
	if got := c.NotAfter.Sub(c.NotBefore); got != time.Hour {
		t.Errorf("lifetime = %v, want the asked-for hour", got)
	}
	if r := ca.nextRequest(t); !r.impersonated || r.identity != idA.String() {
		t.Errorf("CA saw %q (impersonated %v), want %s impersonated", r.identity, r.impersonated, idA)
	}
	clk.nextTimer(t)

	if again := mustGet(t, m, idA); again != c {
		t.Error("second Get returned a different certificate")
	}
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests for %s, want 1", n, idA)
	}
	if got := m.Certificates(); len(got) != 1 || got[0] != c {
		t.Errorf("Certificates() = %v, want the one held", got)
	}
}

func TestOwnIdentityIsNotImpersonated(t *testing.T) {
	m, ca, _ := newTestManager(t, Options{Self: ztunnelID})
	mustGet(t, m, ztunnelID)
	if r := ca.nextRequest(t); r.impersonated {
		t.Errorf("request for ztunnel's own identity impersonated %q", r.identity)
	}
}

func TestConcurrentGetsShareOneFetch(t *testing.T) {
	m, ca, _ := newTestManager(t, Options{})
	release := ca.hold()
	defer release()

	const callers = 16
	certs := make([]*Certificate, callers)
	errs := make([]error, callers)
	var wg sync.WaitGroup
	for i := range callers {
		wg.Go(func() { certs[i], errs[i] = m.Get(t.Context(), idA) })
	}
	ca.nextRequest(t) // the fetch is in flight; callers are waiting on it
	release()
	wg.Wait()
	for i := range callers {
		if errs[i] != nil || certs[i] != certs[0] {
			t.Fatalf("caller %d got %p, %v; want the shared certificate %p", i, certs[i], errs[i], certs[0])
		}
	}
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests, want 1", n)
	}
}

func TestGetGivesUpAfterTheWaitButTheFetchGoesOn(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{WaitTimeout: 20 * time.Millisecond})
	release := ca.hold()
	defer release()

	if _, err := m.Get(t.Context(), idA); !errors.Is(err, ErrNotReady) {
		t.Fatalf("Get while the CA holds = %v, want ErrNotReady", err)
	}
	ca.nextRequest(t)
	release()
	clk.nextTimer(t) // the fetch finished and scheduled rotation
	mustGet(t, m, idA)
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests, want the one fetch", n)
	}
}

func TestGetReportsTheCAsRefusal(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{})
	ca.setFail(status.Error(codes.PermissionDenied, "identity not on your node"))
	_, err := m.Get(t.Context(), idA)
	if status.Code(err) != codes.PermissionDenied || !strings.Contains(err.Error(), "identity not on your node") {
		t.Fatalf("Get = %v, want the CA's PermissionDenied and reason", err)
	}
	// The refusal is retried with backoff; the next success is served.
	ca.setFail(nil)
	clk.Advance(clk.nextTimer(t))
	clk.nextTimer(t)
	mustGet(t, m, idA)
	if n := ca.count(idA); n != 2 {
		t.Errorf("CA saw %d requests, want 2", n)
	}
}

func TestPrefetchFetchesBeforeTheFirstGet(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{})
	if err := m.Prefetch(idA); err != nil {
		t.Fatal(err)
	}
	if err := m.Prefetch(idA); err != nil {
		t.Fatal(err)
	}
	ca.nextRequest(t)
	clk.nextTimer(t) // fetched and rotation scheduled
	mustGet(t, m, idA)
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests, want 1", n)
	}
}

func TestForgetDropsTheCertificateAndStopsRotation(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{})
	first := mustGet(t, m, idA)
	mustGet(t, m, idB)
	clk.nextTimer(t)
	clk.nextTimer(t)
	e := entryOf(m, idA)

	m.Forget(idA)
	m.Forget(idA) // forgetting twice is harmless
	<-e.done
	clk.Advance(time.Hour) // past every rotation time
	clk.nextTimer(t)       // idB rotated, idA did not
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests for the forgotten identity, want 1", n)
	}
	if n := ca.count(idB); n != 2 {
		t.Errorf("CA saw %d requests for the kept identity, want 2", n)
	}
	for _, c := range m.Certificates() {
		if c.ID == idA {
			t.Error("Certificates() still holds the forgotten identity")
		}
	}

	if again := mustGet(t, m, idA); again == first {
		t.Error("Get after Forget returned the forgotten certificate")
	}
	if n := ca.count(idA); n != 2 {
		t.Errorf("CA saw %d requests for %s, want a fresh fetch", n, idA)
	}
}

func TestRotationAtHalfLife(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{CertTTL: time.Hour})
	first := mustGet(t, m, idA)
	if d := clk.nextTimer(t); d != 30*time.Minute {
		t.Fatalf("rotation scheduled in %v, want half the hour", d)
	}
	clk.Advance(30 * time.Minute)
	if d := clk.nextTimer(t); d != 30*time.Minute {
		t.Errorf("next rotation scheduled in %v, want half the new certificate's hour", d)
	}
	if n := ca.count(idA); n != 2 {
		t.Fatalf("CA saw %d requests, want 2", n)
	}
	second := mustGet(t, m, idA)
	if second == first || second.TLS.Leaf.SerialNumber.Cmp(first.TLS.Leaf.SerialNumber) == 0 {
		t.Error("Get still returns the first certificate after rotation")
	}
	if second.TLS.PrivateKey.(*ecdsa.PrivateKey).Equal(first.TLS.PrivateKey) {
		t.Error("rotation reused the private key")
	}
}

func TestFailedRotationBacksOffAndKeepsTheOldCertificate(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{CertTTL: time.Hour, BackoffInitial: time.Second, BackoffMax: 4 * time.Second})
	first := mustGet(t, m, idA)
	rotation := clk.nextTimer(t)

	ca.setFail(status.Error(codes.Unavailable, "ca down"))
	clk.Advance(rotation)
	// Each pause is the backoff with jitter: in [backoff/2, backoff].
	for i, backoff := range []time.Duration{time.Second, 2 * time.Second, 4 * time.Second, 4 * time.Second} {
		d := clk.nextTimer(t)
		if d < backoff/2 || d > backoff {
			t.Errorf("retry %d after %v, want within [%v, %v]", i+1, d, backoff/2, backoff)
		}
		if got := mustGet(t, m, idA); got != first {
			t.Fatalf("after failure %d Get returned another certificate, want the old one", i+1)
		}
		if i == 3 {
			ca.setFail(nil)
		}
		clk.Advance(d)
	}
	// The jittered clock is off the whole second the certificate's NotBefore
	// is rounded down to.
	if d := clk.nextTimer(t); d <= 30*time.Minute-time.Second || d > 30*time.Minute {
		t.Errorf("after recovering, rotation scheduled in %v, want half the new hour", d)
	}
	if n := ca.count(idA); n != 6 {
		t.Errorf("CA saw %d requests, want 1 + 4 failures + 1 success", n)
	}
	if got := mustGet(t, m, idA); got == first {
		t.Error("Get still returns the old certificate after recovery")
	}
}

func TestAnExpiredCertificateIsNotServed(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{CertTTL: time.Hour, WaitTimeout: 20 * time.Millisecond})
	if err := m.Prefetch(idA); err != nil {
		t.Fatal(err)
	}
	rotation := clk.nextTimer(t) // fetched
	ca.setFail(status.Error(codes.Unavailable, "ca down"))
	clk.Advance(rotation)
	clk.nextTimer(t)                  // the first retry is scheduled
	clk.Advance(time.Hour - rotation) // the old certificate has expired, the retry is due
	clk.nextTimer(t)                  // the retry failed too
	_, err := m.Get(t.Context(), idA)
	if !errors.Is(err, ErrNotReady) || !strings.Contains(err.Error(), "ca down") {
		t.Errorf("Get = %v, want ErrNotReady with the last failure", err)
	}
}

func TestCloseStopsRotation(t *testing.T) {
	m, ca, clk := newTestManager(t, Options{})
	mustGet(t, m, idA)
	clk.nextTimer(t)
	m.Close()
	m.Close()
	clk.Advance(time.Hour)
	if n := ca.count(idA); n != 1 {
		t.Errorf("CA saw %d requests after Close, want 1", n)
	}
	if _, err := m.Get(t.Context(), idA); !errors.Is(err, ErrClosed) {
		t.Errorf("Get after Close = %v, want ErrClosed", err)
	}
	if err := m.Prefetch(idB); !errors.Is(err, ErrClosed) {
		t.Errorf("Prefetch after Close = %v, want ErrClosed", err)
	}
}

func TestGetRefusesIdentitiesOutsideTheTrustDomain(t *testing.T) {
	m, ca, _ := newTestManager(t, Options{})
	if _, err := m.Get(t.Context(), foreignID); err == nil {
		t.Error("Get for a foreign identity succeeded")
	}
	if n := ca.count(foreignID); n != 0 {
		t.Errorf("CA saw %d requests for a foreign identity", n)
	}
}

func TestIssuedCertificatesAreChecked(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	tests := []struct {
		name string
		sign func(csr *x509.CertificateRequest) ([]string, error)
		want string
	}{
		{"a certificate for another identity is refused", func(csr *x509.CertificateRequest) ([]string, error) {
			leaf, err := ca.sign(csr.PublicKey, idB.URL(), time.Hour)
			return []string{leaf, ca.rootPEM}, err
		}, "is for " + idB.String()},
		{"a certificate for another key is refused", func(*x509.CertificateRequest) ([]string, error) {
			leaf, err := ca.sign(&newKey(t).PublicKey, idA.URL(), time.Hour)
			return []string{leaf, ca.rootPEM}, err
		}, "does not carry our key"},
		{"a certificate from an unknown root is refused", func(csr *x509.CertificateRequest) ([]string, error) {
			leaf, err := ca.sign(csr.PublicKey, idA.URL(), time.Hour)
			return []string{leaf}, err
		}, "verifying issued certificate"},
		{"an empty chain is refused", func(*x509.CertificateRequest) ([]string, error) {
			return []string{"not PEM"}, nil
		}, "no certificates"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			m := NewManager(caFunc(func(_ context.Context, csrPEM []byte, _ time.Duration, _ string) ([]string, error) {
				return tt.sign(parseCSR(t, csrPEM))
			}), Options{WaitTimeout: testWait, Log: quiet})
			defer m.Close()
			if _, err := m.Get(t.Context(), idA); err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Errorf("Get = %v, want an error about %q", err, tt.want)
			}
		})
	}
}

func TestRootsFromOptionsAreTrusted(t *testing.T) {
	ca := newFakeCA(t, realClock{})
	// A CA that leaves the root out of its chain, known from Options.Roots.
	m := NewManager(caFunc(func(_ context.Context, csrPEM []byte, ttl time.Duration, _ string) ([]string, error) {
		leaf, err := ca.sign(parseCSR(t, csrPEM).PublicKey, idA.URL(), ttl)
		return []string{leaf}, err
	}), Options{Roots: []*x509.Certificate{ca.root}, WaitTimeout: testWait, Log: quiet})
	defer m.Close()
	c := mustGet(t, m, idA)
	if len(c.Roots) != 0 || len(c.TLS.Certificate) != 1 {
		t.Errorf("got %d roots and %d presented certificates, want 0 and 1", len(c.Roots), len(c.TLS.Certificate))
	}
}

func entryOf(m *Manager, id spiffeid.ID) *entry {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.entries[id]
}
