package identity

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	caapi "github.com/ambient-mesh/ambient/api/ca"
)

const testToken = "ztunnel-token"

var (
	ztunnelID = spiffeid.RequireFromString("spiffe://cluster.local/ns/istio-system/sa/ztunnel")
	idA       = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/alice")
	idB       = spiffeid.RequireFromString("spiffe://cluster.local/ns/b/sa/bob")
	idC       = spiffeid.RequireFromString("spiffe://cluster.local/ns/c/sa/carol")
	foreignID = spiffeid.RequireFromString("spiffe://evil.example/ns/a/sa/alice")
)

// caRequest is what the fake CA saw of one CreateCertificate call.
type caRequest struct {
	identity     string // the identity asked for: impersonated, or the caller's own
	impersonated bool
	csr          *x509.CertificateRequest
	validity     int64
}

// fakeCA is IstioCertificateService over real gRPC and TLS on 127.0.0.1,
// signing with a throwaway root. It behaves like istiod-lite's CA where
// ztunnel can see it: it checks the bearer token, grants the impersonated
// identity (any, here), and requires the CSR to ask for exactly that.
type fakeCA struct {
	caapi.UnimplementedIstioCertificateServiceServer

	root    *x509.Certificate
	rootKey *ecdsa.PrivateKey
	rootPEM string
	clock   Clock
	addr    string
	// serverRoots verify the fake CA's serving certificate.
	serverRoots *x509.CertPool
	// requests receives every authenticated request as it arrives.
	requests chan caRequest

	mu   sync.Mutex
	seen map[string]int // guarded by mu; requests per identity
	fail error          // guarded by mu; returned instead of a certificate when set
	gate chan struct{}  // guarded by mu; when set, requests wait until it is closed
}

func newFakeCA(t *testing.T, clock Clock) *fakeCA {
	t.Helper()
	rootKey := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"fake mesh root"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(10 * 365 * 24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &rootKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	f := &fakeCA{
		root: root, rootKey: rootKey, clock: clock,
		rootPEM:  string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})),
		requests: make(chan caRequest, 1000),
		seen:     map[string]int{},
	}
	f.serverRoots = x509.NewCertPool()
	f.serverRoots.AddCert(root)

	// The serving certificate is a plain DNS certificate, as istiod's is.
	servingKey := newKey(t)
	servingDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:     []string{CAServerName},
	}, root, &servingKey.PublicKey, rootKey)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{servingDER}, PrivateKey: servingKey}},
		MinVersion:   tls.VersionTLS12,
	})))
	caapi.RegisterIstioCertificateServiceServer(srv, f)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = ln.Addr().String()
	go srv.Serve(ln)
	t.Cleanup(srv.Stop)
	return f
}

// client returns a CAClient of f sending token.
func (f *fakeCA) client(t *testing.T, token string) *CAClient {
	t.Helper()
	c, err := NewCAClient(f.addr, f.serverRoots, CAServerName, func() (string, error) { return token, nil })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (f *fakeCA) CreateCertificate(ctx context.Context, req *caapi.IstioCertificateRequest) (*caapi.IstioCertificateResponse, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if got := md.Get("authorization"); len(got) != 1 || got[0] != "Bearer "+testToken {
		return nil, status.Errorf(codes.Unauthenticated, "bad token %q", got)
	}
	r := caRequest{identity: ztunnelID.String(), validity: req.GetValidityDuration()}
	if v, ok := req.GetMetadata().GetFields()[caapi.ImpersonatedIdentityKey]; ok {
		sv, isString := v.GetKind().(*structpb.Value_StringValue)
		if !isString {
			return nil, status.Error(codes.InvalidArgument, "ImpersonatedIdentity must be a string")
		}
		r.identity, r.impersonated = sv.StringValue, true
	}
	block, _ := pem.Decode([]byte(req.GetCsr()))
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, status.Error(codes.InvalidArgument, "malformed CSR")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err == nil {
		err = csr.CheckSignature()
	}
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "malformed CSR: %v", err)
	}
	r.csr = csr
	if len(csr.URIs) != 1 || csr.URIs[0].String() != r.identity || len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) > 0 {
		return nil, status.Errorf(codes.InvalidArgument, "CSR SAN mismatch: want only %s", r.identity)
	}

	f.mu.Lock()
	f.seen[r.identity]++
	gate, fail := f.gate, f.fail
	f.mu.Unlock()
	f.requests <- r
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, status.FromContextError(ctx.Err()).Err()
		}
	}
	if fail != nil {
		return nil, fail
	}
	leaf, err := f.sign(csr.PublicKey, csr.URIs[0], time.Duration(req.GetValidityDuration())*time.Second)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "signing: %v", err)
	}
	return &caapi.IstioCertificateResponse{CertChain: []string{leaf, f.rootPEM}}, nil
}

// sign issues a workload certificate for uri, valid from the clock's now.
func (f *fakeCA) sign(pub any, uri *url.URL, ttl time.Duration) (string, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 64))
	if err != nil {
		return "", err
	}
	now := f.clock.Now()
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber:          serial,
		NotBefore:             now,
		NotAfter:              now.Add(ttl),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		BasicConstraintsValid: true,
		URIs:                  []*url.URL{uri},
	}, f.root, pub, f.rootKey)
	if err != nil {
		return "", err
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), nil
}

// count is how many requests asked for id.
func (f *fakeCA) count(id spiffeid.ID) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.seen[id.String()]
}

// setFail makes every following request fail with err (nil: succeed again).
func (f *fakeCA) setFail(err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail = err
}

// hold makes requests wait until the returned release is called.
func (f *fakeCA) hold() (release func()) {
	gate := make(chan struct{})
	f.mu.Lock()
	f.gate = gate
	f.mu.Unlock()
	return sync.OnceFunc(func() {
		f.mu.Lock()
		f.gate = nil
		f.mu.Unlock()
		close(gate)
	})
}

// nextRequest waits for the next request to reach the CA.
func (f *fakeCA) nextRequest(t *testing.T) caRequest {
	t.Helper()
	select {
	case r := <-f.requests:
		return r
	case <-time.After(10 * time.Second):
		t.Fatal("no request reached the CA")
		return caRequest{}
	}
}

// fakeClock moves only when told to, and reports every timer set on it.
type fakeClock struct {
	// scheduled receives the delay of every After call.
	scheduled chan time.Duration

	mu     sync.Mutex
	now    time.Time   // guarded by mu
	timers []fakeTimer // guarded by mu
}

type fakeTimer struct {
	at time.Time
	ch chan time.Time
}

func newFakeClock() *fakeClock {
	// Certificates carry whole seconds, so start on one: then a
	// certificate's NotBefore is exactly the clock's now.
	return &fakeClock{now: time.Now().Truncate(time.Second), scheduled: make(chan time.Duration, 1000)}
}

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.now
}

func (c *fakeClock) After(d time.Duration) <-chan time.Time {
	ch := make(chan time.Time, 1)
	c.mu.Lock()
	c.timers = append(c.timers, fakeTimer{at: c.now.Add(d), ch: ch})
	c.mu.Unlock()
	c.scheduled <- d
	return ch
}

// Advance moves the clock and fires the timers that are due.
func (c *fakeClock) Advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.now = c.now.Add(d)
	kept := c.timers[:0]
	for _, tm := range c.timers {
		if tm.at.After(c.now) {
			kept = append(kept, tm)
			continue
		}
		tm.ch <- c.now
	}
	c.timers = kept
}

// nextTimer waits for the next timer to be set and returns its delay.
func (c *fakeClock) nextTimer(t *testing.T) time.Duration {
	t.Helper()
	select {
	case d := <-c.scheduled:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("no timer was set")
		return 0
	}
}

// caFunc is a CA that misbehaves as a test needs.
type caFunc func(ctx context.Context, csrPEM []byte, ttl time.Duration, impersonate string) ([]string, error)

func (f caFunc) CreateCertificate(ctx context.Context, csrPEM []byte, ttl time.Duration, impersonate string) ([]string, error) {
	return f(ctx, csrPEM, ttl, impersonate)
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func parseCSR(t *testing.T, csrPEM []byte) *x509.CertificateRequest {
	t.Helper()
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		t.Fatal("CSR is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}

var errTest = errors.New("test failure")
