package hbone

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// newXNetEnv is newTestEnv with x/net's HTTP/2 server in front of the
// Server's request handling (ServeHTTP), as any standard HTTP/2 server
// with CONNECT support would be: the Pool's client must interoperate
// with it, not only with our own server. It returns the http.Server for
// Shutdown.
func newXNetEnv(t testing.TB, o envOptions) (*testEnv, *http.Server) {
	t.Helper()
	e := &testEnv{ca: newTestCA(t)}
	e.echoAddr = startEcho(t)
	if o.handler == nil {
		o.handler = dialHandler
	}
	o.server.Logger = slog.New(slog.DiscardHandler)
	e.srv = NewServer(e.ca.serverTLS(t, serverID), o.handler, o.server)
	hs := &http.Server{
		Handler:   e.srv,
		TLSConfig: e.ca.serverTLS(t, serverID),
		ErrorLog:  slog.NewLogLogger(slog.DiscardHandler, slog.LevelError),
	}
	if err := http2.ConfigureServer(hs, &http2.Server{}); err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.srvAddr = ln.Addr().(*net.TCPAddr).AddrPort()
	go hs.ServeTLS(ln, "", "")
	t.Cleanup(func() { hs.Close(); e.srv.Close() })

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
	return e, hs
}

func TestPoolInteroperatesWithXNetServer(t *testing.T) {
	t.Run("bytes flow both ways with a client half-close", func(t *testing.T) {
		e, _ := newXNetEnv(t, envOptions{})
		c := e.connect(t, e.echoAddr.String(), Headers{})
		defer c.Close()
		payload := bytes.Repeat([]byte("0123456789abcdef"), 256<<10) // 4 MiB: beyond every window
		go func() {
			c.Write(payload)
			c.(interface{ CloseWrite() error }).CloseWrite()
		}()
		got, err := io.ReadAll(c)
		if err != nil || !bytes.Equal(got, payload) {
			t.Fatalf("echo returned %d bytes, %v; want %d identical", len(got), err, len(payload))
		}
	})

	t.Run("the upstream answers after the client's half-close", func(t *testing.T) {
		up := startUpstream(t, func(c net.Conn) {
			req, _ := io.ReadAll(c)
			c.Write(append([]byte("got:"), req...))
		})
		e, _ := newXNetEnv(t, envOptions{})
		c := e.connect(t, up.String(), Headers{})
		defer c.Close()
		c.Write([]byte("ping"))
		c.(interface{ CloseWrite() error }).CloseWrite()
		got, err := io.ReadAll(c)
		if err != nil || string(got) != "got:ping" {
			t.Fatalf("read %q, %v; want got:ping", got, err)
		}
	})

	t.Run("statuses become StatusErrors", func(t *testing.T) {
		e, _ := newXNetEnv(t, envOptions{handler: func(ctx context.Context, req *Request) (net.Conn, int) {
			if req.Addr.Port() == 1 {
				return nil, http.StatusUnauthorized
			}
			return dialHandler(ctx, req)
		}})
		for authority, want := range map[string]int{
			"10.0.0.1:1":                  401,
			closedPort(t).String():        503,
			"example.com:80":              400,
			netip.IPv6Loopback().String(): 400,
		} {
			_, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, authority, Headers{})
			var se *StatusError
			if !errors.As(err, &se) || se.Code != want {
				t.Errorf("Connect(%q) error = %v, want StatusError %d", authority, err, want)
			}
		}
		if n := e.dials.Load(); n != 1 {
			t.Errorf("%d dials, want every answer on one connection", n)
		}
	})

	t.Run("the request carries the peer and headers", func(t *testing.T) {
		got := make(chan *Request, 1)
		e, _ := newXNetEnv(t, envOptions{handler: func(ctx context.Context, req *Request) (net.Conn, int) {
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
		if req.Peer != clientID || req.Addr != e.echoAddr || req.ForwardedFor != hdr.ForwardedFor ||
			req.Baggage != hdr.Baggage || req.Traceparent != hdr.Traceparent {
			t.Fatalf("request %+v does not carry what was sent", req)
		}
		echoOnce(t, c, "hello")
	})

	t.Run("concurrent streams share connections up to the cap", func(t *testing.T) {
		e, _ := newXNetEnv(t, envOptions{pool: PoolOptions{MaxStreamsPerConn: 8}})
		var wg sync.WaitGroup
		for i := range 20 {
			wg.Go(func() {
				c := e.connect(t, e.echoAddr.String(), Headers{})
				defer c.Close()
				msg := bytes.Repeat([]byte{byte(i)}, 100<<10)
				go c.Write(msg)
				got := make([]byte, len(msg))
				if _, err := io.ReadFull(c, got); err != nil || !bytes.Equal(got, msg) {
					t.Errorf("stream %d: echo %v", i, err)
				}
			})
		}
		wg.Wait()
		if n := e.dials.Load(); n < 3 {
			t.Errorf("%d dials for 20 concurrent streams with cap 8, want at least 3", n)
		}
	})

	t.Run("pings are answered and an idle connection stays", func(t *testing.T) {
		e, _ := newXNetEnv(t, envOptions{pool: PoolOptions{PingInterval: 20 * time.Millisecond, PingTimeout: 100 * time.Millisecond}})
		c := e.connect(t, e.echoAddr.String(), Headers{})
		defer c.Close()
		time.Sleep(200 * time.Millisecond)
		echoOnce(t, c, "still here")
		if e.closes.Load() != 0 {
			t.Fatal("connection closed despite answered pings")
		}
	})

	t.Run("a graceful shutdown lets open streams finish and moves new ones", func(t *testing.T) {
		e, hs := newXNetEnv(t, envOptions{})
		c := e.connect(t, e.echoAddr.String(), Headers{})
		done := make(chan error, 1)
		go func() { done <- hs.Shutdown(context.Background()) }()
		// x/net's server sends GOAWAY once it starts shutting down; the
		// pool then dials anew (and finds the listener closed).
		eventually(t, "a new dial after GOAWAY", func() bool {
			conn, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, e.echoAddr.String(), Headers{})
			if err == nil {
				conn.Close()
			}
			return e.dials.Load() > 1
		})
		echoOnce(t, c, "still here") // the open stream keeps working
		c.Close()
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("Shutdown: %v", err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("Shutdown did not return after the last stream ended")
		}
	})
}
