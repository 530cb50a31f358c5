package hbone

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
	"log/slog"
	"math/big"
	"net"
	"net/netip"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

var (
	trustDomain = spiffeid.RequireTrustDomainFromString("cluster.local")
	clientID    = spiffeid.RequireFromPath(trustDomain, "/ns/default/sa/client")
	serverID    = spiffeid.RequireFromPath(trustDomain, "/ns/default/sa/server")
	otherID     = spiffeid.RequireFromPath(trustDomain, "/ns/other/sa/someone")
)

// testCA is a throwaway CA issuing SPIFFE certificates.
type testCA struct {
	cert   *x509.Certificate
	key    *ecdsa.PrivateKey
	bundle *x509bundle.Bundle
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(1),
		Subject:               pkix.Name{Organization: []string{"hbone test"}},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{trustDomain.ID().URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{cert: cert, key: key, bundle: x509bundle.FromX509Authorities(trustDomain, []*x509.Certificate{cert})}
}

var serial atomic.Int64

func (ca *testCA) svid(t testing.TB, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(serial.Add(1) + 1),
		NotBefore:    time.Now().Add(-time.Hour),
		NotAfter:     time.Now().Add(time.Hour),
		KeyUsage:     x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:  []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:         []*url.URL{id.URL()},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

func (ca *testCA) serverTLS(t testing.TB, id spiffeid.ID) *tls.Config {
	return tlsconfig.MTLSServerConfig(ca.svid(t, id), ca.bundle, tlsconfig.AuthorizeMemberOf(trustDomain))
}

func (ca *testCA) clientTLS(t testing.TB, id spiffeid.ID) *tls.Config {
	return tlsconfig.MTLSClientConfig(ca.svid(t, id), ca.bundle, tlsconfig.AuthorizeMemberOf(trustDomain))
}

// testEnv is an HBONE server on 127.0.0.1 in front of an echo upstream,
// and a Pool whose dials and connection closes are counted.
type testEnv struct {
	ca        *testCA
	srv       *Server
	srvAddr   netip.AddrPort
	echoAddr  netip.AddrPort
	pool      *Pool
	clientTLS *tls.Config
	dials     atomic.Int32
	closes    atomic.Int32
}

type envOptions struct {
	handler  Handler // default: dial req.Addr
	pool     PoolOptions
	server   ServerOptions
	serverID spiffeid.ID // identity the server presents; default serverID
}

func newTestEnv(t testing.TB, o envOptions) *testEnv {
	t.Helper()
	e := &testEnv{ca: newTestCA(t)}
	e.echoAddr = startEcho(t)
	if o.handler == nil {
		o.handler = dialHandler
	}
	if o.serverID.IsZero() {
		o.serverID = serverID
	}
	if o.server.Logger == nil {
		o.server.Logger = slog.New(slog.DiscardHandler)
	}
	e.srv = NewServer(e.ca.serverTLS(t, o.serverID), o.handler, o.server)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.srvAddr = ln.Addr().(*net.TCPAddr).AddrPort()
	served := make(chan error, 1)
	go func() { served <- e.srv.Serve(ln) }()
	t.Cleanup(func() {
		e.srv.Close()
		if err := <-served; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})

	popts := o.pool
	popts.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		e.dials.Add(1)
		var d net.Dialer
		c, err := d.DialContext(ctx, network, addr)
		if err != nil {
			return nil, err
		}
		return &countingConn{Conn: c, closes: &e.closes}, nil
	}
	e.pool = NewPool(popts)
	t.Cleanup(func() { e.pool.Close() })
	e.clientTLS = e.ca.clientTLS(t, clientID)
	return e
}

func (e *testEnv) key() Key { return Key{Src: clientID, Dst: serverID, Addr: e.srvAddr} }

func (e *testEnv) connect(t testing.TB, authority string, hdr Headers) net.Conn {
	t.Helper()
	c, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, authority, hdr)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	return c
}

// dialHandler connects every stream to its authority.
func dialHandler(ctx context.Context, req *Request) (net.Conn, int) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", req.Addr.String())
	if err != nil {
		return nil, 503
	}
	return c, 200
}

type countingConn struct {
	net.Conn
	closes *atomic.Int32
	once   atomic.Bool
}

func (c *countingConn) Close() error {
	if c.once.CompareAndSwap(false, true) {
		c.closes.Add(1)
	}
	return c.Conn.Close()
}

// startEcho runs a TCP echo server that half-closes after its peer does.
func startEcho(t testing.TB) netip.AddrPort {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
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
				io.Copy(c, c)
				c.(*net.TCPConn).CloseWrite()
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

// eventually polls cond until it holds or a generous timeout passes.
func eventually(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
