package proxy

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/ztunnel/internal/identity"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// testCA signs every CSR with a throwaway root, granting the SPIFFE ID the
// CSR asks for: the CA's own checks are istiod-lite's business.
type testCA struct {
	root *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  string
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"proxy test root"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageCertSign,
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{root: root, key: key, pem: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))}
}

func (ca *testCA) CreateCertificate(_ context.Context, csrPEM []byte, ttl time.Duration, impersonate string) ([]string, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil {
		return nil, errors.New("no csr")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, err
	}
	u, err := url.Parse(impersonate)
	if err != nil {
		return nil, err
	}
	der, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()),
		NotBefore:    time.Now().Add(-time.Minute),
		NotAfter:     time.Now().Add(ttl),
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{u},
	}, ca.root, csr.PublicKey, ca.key)
	if err != nil {
		return nil, err
	}
	return []string{string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})), ca.pem}, nil
}

// env is a proxy over an in-memory state, real certificates, and metrics
// in a private registry.
type env struct {
	t     *testing.T
	store *state.Store
	certs *identity.Manager
	reg   *prometheus.Registry
	proxy *Proxy
}

func newEnv(t *testing.T, dial func(ctx context.Context, network, addr string) (net.Conn, error)) *env {
	t.Helper()
	ca := newTestCA(t)
	certs := identity.NewManager(ca, identity.Options{Roots: []*x509.Certificate{ca.root}})
	t.Cleanup(certs.Close)
	reg := prometheus.NewRegistry()
	m, err := telemetry.New(reg, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, store: state.New(), certs: certs, reg: reg}
	e.proxy = New(Config{State: e.store, Certs: certs, Metrics: m, Dial: dial, StateWait: time.Millisecond})
	t.Cleanup(func() { e.proxy.Close() })
	return e
}

func (e *env) apply(typeURL string, ups ...state.Update) {
	e.t.Helper()
	if err := e.store.Apply(typeURL, ups, nil); err != nil {
		e.t.Fatalf("Apply: %v", err)
	}
}

// counter sums the samples of metric whose labels include want.
func (e *env) counter(metric string, want map[string]string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != metric {
			continue
		}
	next:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue next
				}
			}
			sum += m.GetCounter().GetValue()
		}
	}
	return sum
}

type wopt func(*workloadapi.Workload)

func inService(key string, port, target uint32) wopt {
	return func(w *workloadapi.Workload) {
		if w.Services == nil {
			w.Services = map[string]*workloadapi.PortList{}
		}
		w.Services[key] = &workloadapi.PortList{Ports: []*workloadapi.Port{{ServicePort: port, TargetPort: target}}}
	}
}

func plaintext(w *workloadapi.Workload) { w.TunnelProtocol = workloadapi.TunnelProtocol_NONE }

func waypointHost(key string) wopt {
	return func(w *workloadapi.Workload) { w.Waypoint = gatewayHost(key) }
}

func gatewayHost(key string) *workloadapi.GatewayAddress {
	ns, host, _ := strings.Cut(key, "/")
	return &workloadapi.GatewayAddress{
		Destination:   &workloadapi.GatewayAddress_Hostname{Hostname: &workloadapi.NamespacedHostname{Namespace: ns, Hostname: host}},
		HboneMtlsPort: 15008,
	}
}

// podUID is the workload uid istiod-lite gives pod ns/name.
func podUID(ns, name string) string { return DefaultClusterID + "//Pod/" + ns + "/" + name }

func workload(ns, name, sa, addr string, opts ...wopt) state.Update {
	w := &workloadapi.Workload{
		Uid: podUID(ns, name), Name: name, WorkloadName: name, Namespace: ns, ServiceAccount: sa,
		Addresses:      [][]byte{netip.MustParseAddr(addr).AsSlice()},
		TunnelProtocol: workloadapi.TunnelProtocol_HBONE,
	}
	for _, o := range opts {
		o(w)
	}
	return state.Update{Name: w.Uid, Resource: &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: w}}}
}

func service(ns, host, vip string, port, target uint32, opts ...func(*workloadapi.Service)) state.Update {
	s := &workloadapi.Service{
		Name: strings.Split(host, ".")[0], Namespace: ns, Hostname: host,
		Addresses: []*workloadapi.NetworkAddress{{Address: netip.MustParseAddr(vip).AsSlice()}},
		Ports:     []*workloadapi.Port{{ServicePort: port, TargetPort: target}},
	}
	for _, o := range opts {
		o(s)
	}
	return state.Update{Name: ns + "/" + host, Resource: &workloadapi.Address{Type: &workloadapi.Address_Service{Service: s}}}
}

func policyUpdate(p *security.Authorization) state.Update {
	return state.Update{Name: p.GetNamespace() + "/" + p.GetName(), Resource: p}
}

// principalPolicy is a namespace-wide policy of action for principal.
func principalPolicy(ns, name string, action security.Action, principal string) state.Update {
	return policyUpdate(&security.Authorization{
		Name: name, Namespace: ns, Scope: security.Scope_NAMESPACE, Action: action,
		Rules: []*security.Rule{{Clauses: []*security.Clause{{Matches: []*security.Match{{
			Principals: []*security.StringMatch{{MatchType: &security.StringMatch_Exact{Exact: principal}}},
		}}}}}},
	})
}

// echoServer listens on addr and echoes every connection until EOF, then
// half-closes it.
func echoServer(t testing.TB, addr string) netip.AddrPort {
	return serve(t, addr, func(c net.Conn) {
		io.Copy(c, c)
		c.(*net.TCPConn).CloseWrite()
	})
}

// serve accepts connections on a fresh loopback listener at addr and hands
// each to handle, as the in-pod manager does.
func serve(t testing.TB, addr string, handle func(c net.Conn)) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				handle(c)
			}()
		}
	}()
	return addrOf(ln.Addr())
}

// wantConnect checks what a CONNECT gave: a refusal with wantStatus, or for
// http.StatusOK a tunnel that carries an exchange with the echo app (and is
// then closed).
func wantConnect(t *testing.T, c net.Conn, err error, wantStatus int) {
	t.Helper()
	if wantStatus != http.StatusOK {
		var se *hbone.StatusError
		if !errors.As(err, &se) || se.Code != wantStatus {
			t.Fatalf("Connect error = %v, want status %d", err, wantStatus)
		}
		return
	}
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	got, err := roundTrip(c, "hello")
	c.Close()
	if err != nil || got != "hello" {
		t.Fatalf("echo = %q, %v; want hello", got, err)
	}
}

// roundTrip sends msg on c, half-closes, and reads the answer until EOF.
func roundTrip(c net.Conn, msg string) (string, error) {
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	if err := closeWrite(c); err != nil {
		return "", err
	}
	b, err := io.ReadAll(c)
	return string(b), err
}

func dialer() func(ctx context.Context, network, addr string) (net.Conn, error) {
	return (&net.Dialer{}).DialContext
}
