package xds

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	xdsapi "github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
	"github.com/ambient-mesh/ambient/pkg/xdsclient"
)

const (
	addressType = workloadapi.AddressTypeURL
	authzType   = security.AuthorizationTypeURL
	testToken   = "token-of-ztunnel"
	// waitLimit only guards against a hung test; no test measures time.
	waitLimit = 20 * time.Second
)

var testTypes = []string{addressType, authzType}

// testTLS returns a server and a client TLS config backed by a throwaway CA;
// the server certificate is for 127.0.0.1.
func testTLS(t testing.TB) (server, client *tls.Config) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{CommonName: "xds test root"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, err := x509.ParseCertificate(caDER)
	if err != nil {
		t.Fatal(err)
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2),
		Subject:      pkix.Name{CommonName: "istiod"},
		NotBefore:    now.Add(-time.Hour),
		NotAfter:     now.Add(time.Hour),
		IPAddresses:  []net.IP{net.IPv4(127, 0, 0, 1)},
		DNSNames:     []string{"istiod.istio-system.svc"},
		KeyUsage:     x509.KeyUsageDigitalSignature,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	server = &tls.Config{
		Certificates: []tls.Certificate{{Certificate: [][]byte{leafDER}, PrivateKey: key}},
		MinVersion:   tls.VersionTLS13,
	}
	client = &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
	return server, client
}

// authenticate accepts testToken, like authn.Authenticator accepts a valid
// service-account token.
func authenticate(ctx context.Context) (authn.Identity, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	switch v := md.Get("authorization"); {
	case len(v) == 0:
		return authn.Identity{}, authn.ErrNoToken
	case v[0] != "Bearer "+testToken:
		return authn.Identity{}, fmt.Errorf("%w: audience mismatch", authn.ErrTokenRejected)
	}
	return authn.Identity{
		Username:       "system:serviceaccount:istio-system:ztunnel",
		ServiceAccount: "ztunnel", Namespace: "istio-system",
	}, nil
}

// testServer is a Server behind a real gRPC server with TLS on loopback.
type testServer struct {
	*Server
	addr string
	reg  *prometheus.Registry
	g    *grpc.Server
	tls  *tls.Config
}

// startServer starts a fresh Server on addr ("127.0.0.1:0" for any port).
func startServer(t testing.TB, addr string, serverTLS *tls.Config) *testServer {
	t.Helper()
	reg := prometheus.NewRegistry()
	ts := &testServer{
		Server: NewServer(Options{Authenticate: authenticate, Metrics: reg, Log: slog.New(slog.DiscardHandler)}),
		reg:    reg,
		tls:    serverTLS,
	}
	ts.serve(t, addr)
	t.Cleanup(ts.stop)
	return ts
}

// serve (re)starts the gRPC server in front of ts.Server on addr.
func (ts *testServer) serve(t testing.TB, addr string) {
	t.Helper()
	var lis net.Listener
	var err error
	deadline := time.Now().Add(waitLimit)
	for {
		// Listening on a just-closed port can fail briefly; retry.
		if lis, err = net.Listen("tcp", addr); err == nil || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err != nil {
		t.Fatal(err)
	}
	ts.addr = lis.Addr().String()
	ts.g = grpc.NewServer(grpc.Creds(credentials.NewTLS(ts.tls)))
	ts.Register(ts.g)
	go ts.g.Serve(lis)
}

// disconnect stops the gRPC server (breaking every stream) but keeps the
// xds.Server and its state.
func (ts *testServer) disconnect() { ts.g.Stop() }

func (ts *testServer) stop() {
	ts.Close()
	ts.g.Stop()
}

// metric sums the values of a counter or gauge family over the label type
// (all types when typeURL is "").
func (ts *testServer) metric(t testing.TB, name, typeURL string) float64 {
	t.Helper()
	mfs, err := ts.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var sum float64
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			match := typeURL == ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "type" && l.GetValue() == typeLabel(typeURL) {
					match = true
				}
			}
			if !match {
				continue
			}
			switch {
			case m.GetCounter() != nil:
				sum += m.GetCounter().GetValue()
			case m.GetGauge() != nil:
				sum += m.GetGauge().GetValue()
			case m.GetHistogram() != nil:
				sum += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	return sum
}

// client finds the connected client with node id, if any.
func (ts *testServer) client(nodeID string) (ClientInfo, bool) {
	for _, c := range ts.Clients() {
		if c.NodeID == nodeID {
			return c, true
		}
	}
	return ClientInfo{}, false
}

// eventually polls cond until it holds, failing the test after waitLimit.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(waitLimit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

// update is one response as the xdsclient's OnUpdate saw it.
type update struct {
	typeURL  string
	upserts  map[string]string // name -> version
	removals []string
}

// testClient is an xdsclient.Client recording what it receives.
type testClient struct {
	*xdsclient.Client
	nodeID  string
	updates chan update
	mu      sync.Mutex
	hook    func(update) error // guarded by mu; runs before recording
}

func startClient(t testing.TB, addr string, clientTLS *tls.Config, nodeID string) *testClient {
	t.Helper()
	tc := &testClient{nodeID: nodeID, updates: make(chan update, 10000)}
	md, err := structpb.NewStruct(map[string]any{"NODE_NAME": nodeID})
	if err != nil {
		t.Fatal(err)
	}
	tc.Client = xdsclient.New(xdsclient.Config{
		Address:  addr,
		TLS:      clientTLS,
		Token:    func() (string, error) { return testToken, nil },
		Node:     &xdsapi.Node{Id: nodeID, Metadata: md},
		TypeURLs: testTypes,
		OnUpdate: func(typeURL string, upserts []*xdsapi.Resource, removals []string) error {
			u := update{typeURL: typeURL, upserts: make(map[string]string), removals: removals}
			for _, r := range upserts {
				u.upserts[r.GetName()] = r.GetVersion()
			}
			tc.mu.Lock()
			hook := tc.hook
			tc.mu.Unlock()
			if hook != nil {
				if err := hook(u); err != nil {
					return err
				}
			}
			tc.updates <- u
			return nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tc.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("client %s: Run: %v", nodeID, err)
		}
	})
	return tc
}

func (tc *testClient) setHook(h func(update) error) {
	tc.mu.Lock()
	tc.hook = h
	tc.mu.Unlock()
}

// next returns the next update the client accepted.
func (tc *testClient) next(t testing.TB) update {
	t.Helper()
	select {
	case u := <-tc.updates:
		return u
	case <-time.After(waitLimit):
		t.Fatalf("client %s: no update", tc.nodeID)
		return update{}
	}
}

// nextOf returns the next update of typeURL, skipping others.
func (tc *testClient) nextOf(t testing.TB, typeURL string) update {
	t.Helper()
	for {
		if u := tc.next(t); u.typeURL == typeURL {
			return u
		}
	}
}

func (tc *testClient) waitSynced(t testing.TB) {
	t.Helper()
	select {
	case <-tc.Synced():
	case <-time.After(waitLimit):
		t.Fatalf("client %s: not synced", tc.nodeID)
	}
}

// quiet reports whether no update is waiting to be read.
func (tc *testClient) quiet() bool { return len(tc.updates) == 0 }

// workload returns an Address resource for a pod; gen changes its content.
func workload(name string, gen int) proto.Message {
	return &workloadapi.Address{Type: &workloadapi.Address_Workload{Workload: &workloadapi.Workload{
		Uid:       "Kubernetes//Pod/default/" + name,
		Name:      name,
		Namespace: "default",
		Addresses: [][]byte{{10, 0, byte(gen >> 8), byte(gen)}},
	}}}
}

// workloads returns resources w0..w(n-1), all at generation 0.
func workloads(n int) map[string]proto.Message {
	m := make(map[string]proto.Message, n)
	for i := range n {
		name := fmt.Sprintf("w%d", i)
		m[name] = workload(name, 0)
	}
	return m
}

func policy(name string, action security.Action) proto.Message {
	return &security.Authorization{Name: name, Namespace: "default", Action: action}
}

// version is the version the server gives m.
func version(t testing.TB, m proto.Message) string {
	t.Helper()
	e, err := newEntry("x", m, time.Time{})
	if err != nil {
		t.Fatal(err)
	}
	return e.res.GetVersion()
}

// rawStream is a delta ADS stream driven by hand.
type rawStream struct {
	grpc.BidiStreamingClient[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	t testing.TB
}

// dialConn returns a TLS connection to addr, closed when the test ends.
func dialConn(t testing.TB, addr string, clientTLS *tls.Config) *grpc.ClientConn {
	t.Helper()
	cc, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(clientTLS)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// dialRaw opens a stream with token ("" for none).
func dialRaw(t testing.TB, addr string, clientTLS *tls.Config, token string) *rawStream {
	t.Helper()
	cc := dialConn(t, addr, clientTLS)
	ctx, cancel := context.WithTimeout(context.Background(), waitLimit)
	t.Cleanup(cancel)
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	s, err := discoveryv3.NewAggregatedDiscoveryServiceClient(cc).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return &rawStream{BidiStreamingClient: s, t: t}
}

func (r *rawStream) send(req *discoveryv3.DeltaDiscoveryRequest) {
	r.t.Helper()
	if err := r.Send(req); err != nil {
		r.t.Fatalf("send: %v", err)
	}
}

func (r *rawStream) recv() *discoveryv3.DeltaDiscoveryResponse {
	r.t.Helper()
	resp, err := r.Recv()
	if err != nil {
		r.t.Fatalf("recv: %v", err)
	}
	return resp
}

func (r *rawStream) ack(resp *discoveryv3.DeltaDiscoveryResponse) {
	r.t.Helper()
	r.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()})
}

// names returns a response's resource names and versions.
func names(resp *discoveryv3.DeltaDiscoveryResponse) map[string]string {
	m := make(map[string]string)
	for _, r := range resp.GetResources() {
		m[r.GetName()] = r.GetVersion()
	}
	return m
}
