package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"net/netip"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

func TestBytesFlowBothWaysWithClientHalfClose(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()

	payload := bytes.Repeat([]byte("0123456789abcdef"), 64<<10) // 1 MiB
	go func() {
		c.Write(payload)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatalf("reading echo: %v", err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo returned %d bytes, want %d identical", len(got), len(payload))
	}
}

func TestUpstreamResponseAfterClientHalfClose(t *testing.T) {
	// The upstream only answers once it sees EOF: proves CloseWrite reaches it.
	up := startUpstream(t, func(c net.Conn) {
		req, _ := io.ReadAll(c)
		c.Write(append([]byte("got:"), req...))
	})
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, up.String(), Headers{})
	defer c.Close()
	c.Write([]byte("ping"))
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "got:ping" {
		t.Fatalf("read %q, %v; want %q", got, err, "got:ping")
	}
}

func TestUpstreamCloseEndsStreamWithoutClientHalfClose(t *testing.T) {
	up := startUpstream(t, func(c net.Conn) { c.Write([]byte("banner")) })
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, up.String(), Headers{})
	defer c.Close()
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "banner" {
		t.Fatalf("read %q, %v; want banner then EOF", got, err)
	}
}

func TestHandlerStatusBecomesStatusError(t *testing.T) {
	for _, tc := range []struct {
		name    string
		handler Handler
		want    int
	}{
		{"a denied peer gets 401", func(context.Context, *Request) (net.Conn, int) { return nil, 401 }, 401},
		{"an unreachable upstream gets 503", dialHandler, 503},
		{"a handler that returns 200 without a connection gets 503", func(context.Context, *Request) (net.Conn, int) { return nil, 200 }, 503},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newTestEnv(t, envOptions{handler: tc.handler})
			closed := closedPort(t)
			_, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, closed.String(), Headers{})
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.want {
				t.Fatalf("Connect error = %v, want StatusError %d", err, tc.want)
			}
			// The connection stays pooled for the next stream.
			if n := e.pool.numConns(e.key()); n != 1 {
				t.Fatalf("pool holds %d connections, want 1", n)
			}
		})
	}
}

func TestWrongServerIdentityIsRefused(t *testing.T) {
	e := newTestEnv(t, envOptions{serverID: otherID})
	_, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, e.echoAddr.String(), Headers{})
	if !errors.Is(err, ErrPeerIdentity) {
		t.Fatalf("Connect error = %v, want ErrPeerIdentity", err)
	}
	if n := e.pool.numConns(e.key()); n != 0 {
		t.Fatalf("pool kept %d connections after refusing the server", n)
	}
	eventually(t, "refused connection closed", func() bool { return e.closes.Load() == 1 })
}

func TestServerRefusesClientWithoutCertificate(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	conf := e.clientTLS.Clone()
	conf.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return &tls.Certificate{}, nil }
	_, err := e.pool.Connect(context.Background(), e.key(), conf, e.echoAddr.String(), Headers{})
	if err == nil {
		t.Fatal("Connect without a client certificate succeeded")
	}
}

func TestSequentialConnectsShareOneConnection(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	for range 10 {
		c := e.connect(t, e.echoAddr.String(), Headers{})
		echoOnce(t, c, "hello")
		c.Close()
	}
	if n := e.dials.Load(); n != 1 {
		t.Fatalf("%d dials for 10 sequential streams, want 1", n)
	}
}

func TestConcurrentStreamsBeyondTheCapOpenAnotherConnection(t *testing.T) {
	const maxStreams = 4
	e := newTestEnv(t, envOptions{pool: PoolOptions{MaxStreamsPerConn: maxStreams}})
	var conns []net.Conn
	var mu sync.Mutex
	var wg sync.WaitGroup
	for range maxStreams + 1 {
		wg.Go(func() {
			c := e.connect(t, e.echoAddr.String(), Headers{})
			mu.Lock()
			conns = append(conns, c)
			mu.Unlock()
		})
	}
	wg.Wait()
	for _, c := range conns {
		echoOnce(t, c, "x")
	}
	if n := e.dials.Load(); n != 2 {
		t.Fatalf("%d dials for %d concurrent streams with cap %d, want 2", n, maxStreams+1, maxStreams)
	}
	for _, c := range conns {
		c.Close()
	}
	// Freed slots are reused rather than dialing again.
	for range maxStreams {
		c := e.connect(t, e.echoAddr.String(), Headers{})
		defer c.Close()
	}
	if n := e.dials.Load(); n != 2 {
		t.Fatalf("%d dials after reusing freed slots, want 2", n)
	}
}

func TestIdleConnectionsExpire(t *testing.T) {
	e := newTestEnv(t, envOptions{pool: PoolOptions{IdleTimeout: 50 * time.Millisecond}})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	echoOnce(t, c, "a")
	time.Sleep(100 * time.Millisecond) // an open stream keeps the connection
	if e.closes.Load() != 0 {
		t.Fatal("connection with an open stream was closed")
	}
	c.Close()
	eventually(t, "idle connection closed", func() bool { return e.closes.Load() == 1 })
	if n := e.pool.numConns(e.key()); n != 0 {
		t.Fatalf("pool holds %d connections after expiry", n)
	}
	c = e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()
	echoOnce(t, c, "b")
	if n := e.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want a fresh one after expiry (2)", n)
	}
}

func TestBadRequestsAreAnswered4xx(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	for _, tc := range []struct {
		name, authority string
		want            int
	}{
		{"a host name is refused", "example.com:80", 400},
		{"an address without a port is refused", "127.0.0.1", 400},
		{"port zero is refused", "127.0.0.1:0", 400},
		{"an IPv6 zone is refused", "[fe80::1%eth0]:80", 400},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, tc.authority, Headers{})
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.want {
				t.Fatalf("Connect(%q) error = %v, want StatusError %d", tc.authority, err, tc.want)
			}
		})
	}

	t.Run("a GET is refused with 405", func(t *testing.T) {
		cc := rawClientConn(t, e)
		req, _ := http.NewRequest(http.MethodGet, "https://"+e.echoAddr.String()+"/", nil)
		resp, err := cc.RoundTrip(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != 405 {
			t.Fatalf("GET answered %d, want 405", resp.StatusCode)
		}
	})
}

func TestRequestCarriesPeerAndHeaders(t *testing.T) {
	got := make(chan *Request, 1)
	e := newTestEnv(t, envOptions{handler: func(ctx context.Context, req *Request) (net.Conn, int) {
		got <- req
		return dialHandler(ctx, req)
	}})
	hdr := Headers{
		ForwardedFor: netip.MustParseAddrPort("[fd00::7]:4711"),
		Baggage:      "k8s.namespace.name=default",
		Traceparent:  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	}
	c := e.connect(t, e.echoAddr.String(), hdr)
	defer c.Close()
	req := <-got
	if req.Peer != clientID {
		t.Errorf("Peer = %v, want %v", req.Peer, clientID)
	}
	if !req.PeerAddr.Addr().IsLoopback() {
		t.Errorf("PeerAddr = %v, want loopback", req.PeerAddr)
	}
	if req.Addr != e.echoAddr || req.Authority != e.echoAddr.String() {
		t.Errorf("Addr, Authority = %v, %q; want %v", req.Addr, req.Authority, e.echoAddr)
	}
	if req.Forwarded != `for="[fd00::7]:4711"` || req.ForwardedFor != hdr.ForwardedFor {
		t.Errorf("Forwarded = %q (%v), want for=\"[fd00::7]:4711\"", req.Forwarded, req.ForwardedFor)
	}
	if req.Baggage != hdr.Baggage || req.Traceparent != hdr.Traceparent {
		t.Errorf("Baggage, Traceparent = %q, %q; want %q, %q", req.Baggage, req.Traceparent, hdr.Baggage, hdr.Traceparent)
	}
}

func TestSlowStreamDoesNotStallOthers(t *testing.T) {
	// The first stream's upstream never reads and the client never reads
	// its responses; the second stream on the same connection still flows.
	block := make(chan struct{})
	stuck := startUpstream(t, func(c net.Conn) {
		c.Write(bytes.Repeat([]byte("x"), 8<<20)) // more than every window
		<-block
	})
	defer close(block)
	e := newTestEnv(t, envOptions{})
	slow := e.connect(t, stuck.String(), Headers{})
	defer slow.Close()
	go slow.Write(make([]byte, 8<<20)) // blocks on flow control
	time.Sleep(50 * time.Millisecond)

	fast := e.connect(t, e.echoAddr.String(), Headers{})
	defer fast.Close()
	payload := bytes.Repeat([]byte("y"), 4<<20)
	go func() {
		fast.Write(payload)
		fast.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(fast)
	if err != nil || len(got) != len(payload) {
		t.Fatalf("fast stream read %d bytes, %v; want %d", len(got), err, len(payload))
	}
	if n := e.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want both streams on one connection", n)
	}
}

func TestServerCloseEndsActiveStreams(t *testing.T) {
	upClosed := make(chan struct{})
	up := startUpstream(t, func(c net.Conn) {
		io.Copy(io.Discard, c)
		close(upClosed)
	})
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, up.String(), Headers{})
	defer c.Close()
	c.Write([]byte("hi"))
	if err := e.srv.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := io.ReadAll(c); err == nil {
		// A clean EOF is also acceptable only if the upstream saw the end.
		t.Log("stream ended with EOF")
	}
	select {
	case <-upClosed:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream not closed after Server.Close")
	}
	e.srv.Close() // twice is fine
}

func TestShutdownDrainsOpenStreams(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	// Two callers shut the server down at once (ztunnel's drain and its
	// pod bookkeeping can): both return when the last stream ends.
	done := make(chan error, 2)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	time.Sleep(20 * time.Millisecond)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	time.Sleep(30 * time.Millisecond)
	echoOnce(t, c, "still here") // the open stream keeps working
	c.Close()
	for range 2 {
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Shutdown did not return after the last stream ended")
		}
	}
}

func TestDeadlineAbortsStream(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 1))
	if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read after deadline = %v, want os.ErrDeadlineExceeded", err)
	}
}

func TestServeRefusesWeakClientAuth(t *testing.T) {
	ca := newTestCA(t)
	conf := ca.serverTLS(t, serverID)
	conf.ClientAuth = tls.RequestClientCert
	s := NewServer(conf, dialHandler, ServerOptions{})
	defer s.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	if err := s.Serve(ln); !errors.Is(err, errWeakClientAuth) {
		t.Fatalf("Serve = %v, want errWeakClientAuth", err)
	}
}

// startUpstream runs a TCP server calling serve for each connection, then
// closing it.
func startUpstream(t testing.TB, serve func(net.Conn)) netip.AddrPort {
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
				serve(c)
			}()
		}
	}()
	return ln.Addr().(*net.TCPAddr).AddrPort()
}

func closedPort(t testing.TB) netip.AddrPort {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ap := ln.Addr().(*net.TCPAddr).AddrPort()
	ln.Close()
	return ap
}

func echoOnce(t testing.TB, c net.Conn, msg string) {
	t.Helper()
	if _, err := c.Write([]byte(msg)); err != nil {
		t.Fatalf("write: %v", err)
	}
	buf := make([]byte, len(msg))
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != msg {
		t.Fatalf("echo read %q, %v; want %q", buf, err, msg)
	}
}

// rawClientConn is an HTTP/2 client connection to the test server outside
// the Pool, for requests the Pool never sends.
func rawClientConn(t testing.TB, e *testEnv) *http2.ClientConn {
	t.Helper()
	conf := e.clientTLS.Clone()
	conf.NextProtos = []string{"h2"}
	tc, err := tls.Dial("tcp", e.srvAddr.String(), conf)
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// frozenConn stands for a peer that vanished without a reset: once frozen,
// nothing more arrives and what is written goes nowhere.
type frozenConn struct {
	net.Conn
	frozen atomic.Bool
	closed chan struct{}
	once   sync.Once
}

func (c *frozenConn) Read(b []byte) (int, error) {
	if c.frozen.Load() {
		<-c.closed
		return 0, net.ErrClosed
	}
	n, err := c.Conn.Read(b)
	if c.frozen.Load() {
		<-c.closed
		return 0, net.ErrClosed
	}
	return n, err
}

func (c *frozenConn) Write(b []byte) (int, error) {
	if c.frozen.Load() {
		return len(b), nil
	}
	return c.Conn.Write(b)
}

func (c *frozenConn) Close() error {
	c.once.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

func TestPingFindsAPeerThatVanished(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	var conns []*frozenConn
	var mu sync.Mutex
	pool := NewPool(PoolOptions{
		PingInterval: 100 * time.Millisecond,
		PingTimeout:  100 * time.Millisecond,
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			var d net.Dialer
			c, err := d.DialContext(ctx, network, addr)
			if err != nil {
				return nil, err
			}
			fc := &frozenConn{Conn: c, closed: make(chan struct{})}
			mu.Lock()
			conns = append(conns, fc)
			mu.Unlock()
			return fc, nil
		},
	})
	defer pool.Close()
	connect := func() (net.Conn, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return pool.Connect(ctx, e.key(), e.clientTLS, e.echoAddr.String(), Headers{})
	}
	c, err := connect()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "before")
	// An idle connection answers the pings and stays.
	time.Sleep(400 * time.Millisecond)
	echoOnce(t, c, "idle but alive")

	mu.Lock()
	conns[0].frozen.Store(true)
	mu.Unlock()
	// The stream on the silent connection fails instead of hanging.
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("read on a stream of a vanished peer: %v, want the connection's failure before the deadline", err)
	}
	// The next stream gets a new connection.
	c2, err := connect()
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	echoOnce(t, c2, "after")
	mu.Lock()
	defer mu.Unlock()
	if len(conns) != 2 {
		t.Errorf("%d connections dialed, want 2", len(conns))
	}
}
