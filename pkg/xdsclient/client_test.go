package xdsclient

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"maps"
	"math/big"
	"net"
	"slices"
	"strings"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/ambient-mesh/ambient/api/xds"
)

const (
	typeA = "type.googleapis.com/test.A"
	typeB = "type.googleapis.com/test.B"
	// waitLimit only guards against a hung test; no test measures time.
	waitLimit = 20 * time.Second
)

// fakeADS is a scripted control plane: each stream is handed to the test,
// which drives it and ends it by sending on end. It is go-control-plane's
// generated server, as istiod-lite's is, so every test here also checks that
// the client's api/xds messages are what such a server expects.
type fakeADS struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	streams chan *fakeStream
}

type fakeStream struct {
	grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]
	t   *testing.T
	md  metadata.MD
	end chan error
}

func (f *fakeADS) DeltaAggregatedResources(s grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	md, _ := metadata.FromIncomingContext(s.Context())
	fs := &fakeStream{BidiStreamingServer: s, md: md, end: make(chan error, 1)}
	select {
	case f.streams <- fs:
	case <-s.Context().Done():
		return s.Context().Err()
	}
	select {
	case err := <-fs.end:
		return err
	case <-s.Context().Done():
		return s.Context().Err()
	}
}

// startFake serves a fakeADS over TLS on loopback and returns its address and
// a client TLS config that trusts it.
func startFake(t *testing.T) (*fakeADS, string, *tls.Config) {
	t.Helper()
	serverTLS, clientTLS := testTLS(t)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(serverTLS)))
	f := &fakeADS{streams: make(chan *fakeStream, 4)}
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, f)
	go g.Serve(lis)
	t.Cleanup(g.Stop)
	return f, lis.Addr().String(), clientTLS
}

func (f *fakeADS) next(t *testing.T) *fakeStream {
	t.Helper()
	select {
	case s := <-f.streams:
		s.t = t
		return s
	case <-time.After(waitLimit):
		t.Fatal("client did not open a stream")
		return nil
	}
}

func (s *fakeStream) recv() *discoveryv3.DeltaDiscoveryRequest {
	s.t.Helper()
	req, err := s.Recv()
	if err != nil {
		s.t.Fatalf("recv: %v", err)
	}
	return req
}

// subscriptions reads the client's first request of each type.
func (s *fakeStream) subscriptions(n int) map[string]*discoveryv3.DeltaDiscoveryRequest {
	s.t.Helper()
	reqs := make(map[string]*discoveryv3.DeltaDiscoveryRequest)
	for range n {
		req := s.recv()
		reqs[req.GetTypeUrl()] = req
	}
	return reqs
}

func (s *fakeStream) send(typeURL, nonce string, removals []string, resources ...*discoveryv3.Resource) {
	s.t.Helper()
	err := s.Send(&discoveryv3.DeltaDiscoveryResponse{TypeUrl: typeURL, Nonce: nonce, Resources: resources, RemovedResources: removals})
	if err != nil {
		s.t.Fatalf("send: %v", err)
	}
}

func resource(t *testing.T, name, version string) *discoveryv3.Resource {
	t.Helper()
	a, err := anypb.New(wrapperspb.String(name + "@" + version))
	if err != nil {
		t.Fatal(err)
	}
	return &discoveryv3.Resource{Name: name, Version: version, Resource: a}
}

// run starts c and stops it when the test ends, checking that Run returns nil.
func run(t *testing.T, c *Client) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run returned %v after cancel, want nil", err)
			}
		case <-time.After(waitLimit):
			t.Error("Run did not return after cancel")
		}
	})
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func TestClientSubscribesACKsAndSyncs(t *testing.T) {
	f, addr, clientTLS := startFake(t)
	c := New(Config{
		Address:  addr,
		TLS:      clientTLS,
		Token:    func() (string, error) { return "secret", nil },
		Node:     &xds.Node{Id: "ztunnel~node-1"},
		TypeURLs: []string{typeA, typeB},
	})
	run(t, c)
	s := f.next(t)
	if got := s.md.Get("authorization"); !slices.Equal(got, []string{"Bearer secret"}) {
		t.Errorf("authorization = %q", got)
	}
	subs := s.subscriptions(2)
	for _, typeURL := range []string{typeA, typeB} {
		req := subs[typeURL]
		if !slices.Equal(req.GetResourceNamesSubscribe(), []string{"*"}) || len(req.GetInitialResourceVersions()) != 0 {
			t.Errorf("first %s request = %v, want a wildcard subscription without versions", typeURL, req)
		}
	}
	if subs[typeA].GetNode().GetId() != "ztunnel~node-1" {
		t.Errorf("first request carries node %v", subs[typeA].GetNode())
	}

	s.send(typeA, "n1", nil, resource(t, "r1", "v1"))
	if ack := s.recv(); ack.GetResponseNonce() != "n1" || ack.GetErrorDetail() != nil || ack.GetTypeUrl() != typeA {
		t.Fatalf("ack = %v", ack)
	}
	if isClosed(c.Synced()) {
		t.Fatal("synced before every type had a response")
	}
	s.send(typeB, "n2", nil)
	if ack := s.recv(); ack.GetResponseNonce() != "n2" || ack.GetErrorDetail() != nil {
		t.Fatalf("ack = %v", ack)
	}
	select {
	case <-c.Synced():
	case <-time.After(waitLimit):
		t.Fatal("not synced after a response for every type")
	}
	got := c.Resources(typeA)
	if len(got) != 1 || got["r1"].GetVersion() != "v1" {
		t.Fatalf("resources = %v", got)
	}
	delete(got, "r1")
	if len(c.Resources(typeA)) != 1 {
		t.Error("Resources returned the cache itself, not a copy")
	}
}

func TestClientNACKsWhatOnUpdateRejects(t *testing.T) {
	f, addr, clientTLS := startFake(t)
	var seen []string
	c := New(Config{
		Address:  addr,
		TLS:      clientTLS,
		TypeURLs: []string{typeA},
		OnUpdate: func(typeURL string, upserts []*xds.Resource, removals []string) error {
			for _, r := range upserts {
				seen = append(seen, r.GetName())
				if r.GetName() == "bad" {
					return errors.New("bad is not a valid resource")
				}
			}
			return nil
		},
	})
	run(t, c)
	s := f.next(t)
	s.subscriptions(1)

	s.send(typeA, "n1", nil, resource(t, "good", "v1"), resource(t, "bad", "v1"))
	nack := s.recv()
	if nack.GetResponseNonce() != "n1" || !strings.Contains(nack.GetErrorDetail().GetMessage(), "bad is not a valid resource") {
		t.Fatalf("nack = %v", nack)
	}
	if got := c.Resources(typeA); len(got) != 0 {
		t.Fatalf("cache = %v after a rejected response, want empty", slices.Collect(maps.Keys(got)))
	}
	if isClosed(c.Synced()) {
		t.Fatal("synced by a rejected response")
	}

	s.send(typeA, "n2", nil, &discoveryv3.Resource{Name: "bodyless", Version: "v1"})
	if nack := s.recv(); nack.GetErrorDetail() == nil {
		t.Fatal("a resource without a body was accepted")
	}
	s.send(typeA, "n3", nil, resource(t, "good", "v1"))
	if ack := s.recv(); ack.GetErrorDetail() != nil {
		t.Fatalf("ack = %v", ack)
	}
	if got := c.Resources(typeA); len(got) != 1 || got["good"] == nil {
		t.Fatalf("cache = %v, want good", slices.Collect(maps.Keys(got)))
	}
	if !slices.Equal(seen, []string{"good", "bad", "good"}) {
		t.Errorf("OnUpdate saw %v", seen)
	}
}

func TestClientReconnectsWithItsCachedVersions(t *testing.T) {
	f, addr, clientTLS := startFake(t)
	c := New(Config{Address: addr, TLS: clientTLS, TypeURLs: []string{typeA, typeB}})
	run(t, c)

	s := f.next(t)
	s.subscriptions(2)
	s.send(typeA, "1", nil, resource(t, "r1", "v1"), resource(t, "r2", "v2"))
	s.recv()
	s.send(typeB, "2", nil, resource(t, "p", "v9"))
	s.recv()
	s.end <- status.Error(codes.Unavailable, "restarting")

	s = f.next(t)
	subs := s.subscriptions(2)
	if got := subs[typeA].GetInitialResourceVersions(); !maps.Equal(got, map[string]string{"r1": "v1", "r2": "v2"}) {
		t.Errorf("%s initial versions = %v", typeA, got)
	}
	if got := subs[typeB].GetInitialResourceVersions(); !maps.Equal(got, map[string]string{"p": "v9"}) {
		t.Errorf("%s initial versions = %v", typeB, got)
	}
	s.send(typeA, "1", []string{"r2"})
	s.recv()
	if got := c.Resources(typeA); len(got) != 1 || got["r1"] == nil {
		t.Errorf("cache = %v, want r1 only", slices.Collect(maps.Keys(got)))
	}
}

func TestClientRefusesATokenWithoutTLS(t *testing.T) {
	c := New(Config{Address: "127.0.0.1:1", Token: func() (string, error) { return "t", nil }, TypeURLs: []string{typeA}})
	if err := c.Run(context.Background()); err == nil {
		t.Fatal("Run sent a bearer token in plaintext")
	}
}

func TestClientWithoutTypesIsSynced(t *testing.T) {
	if !isClosed(New(Config{Address: "127.0.0.1:1"}).Synced()) {
		t.Fatal("a client of no types is not synced")
	}
}

func TestBackoffGrowsWithJitterUpToTheCap(t *testing.T) {
	for n := range 40 {
		ceiling := maxBackoff
		if n < 20 {
			ceiling = min(minBackoff<<n, maxBackoff)
		}
		for range 100 {
			if d := backoff(n); d < ceiling/2 || d >= ceiling {
				t.Fatalf("backoff(%d) = %v, want in [%v, %v)", n, d, ceiling/2, ceiling)
			}
		}
	}
}

// testTLS returns a server and a client TLS config backed by a throwaway CA;
// the server certificate is for 127.0.0.1.
func testTLS(t *testing.T) (server, client *tls.Config) {
	t.Helper()
	now := time.Now()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test root"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
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
	leaf, err := x509.CreateCertificate(rand.Reader, &x509.Certificate{
		SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: "istiod"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
		KeyUsage:    x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	}, ca, &key.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &tls.Config{Certificates: []tls.Certificate{{Certificate: [][]byte{leaf}, PrivateKey: key}}, MinVersion: tls.VersionTLS13},
		&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13}
}
