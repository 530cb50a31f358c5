package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"sync"
	"syscall"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Handler decides what a CONNECT stream is connected to. It returns the
// upstream connection and 200 to proceed, or a nil connection and the
// status to answer: 401 when policy denies the peer, 503 when the upstream
// cannot be reached. ctx ends when the stream does.
type Handler func(ctx context.Context, req *Request) (upstream net.Conn, status int)

// ServerOptions tune a Server. The zero value is usable.
type ServerOptions struct {
	// HandshakeTimeout bounds the TLS handshake; default 10s.
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams per connection; default 1000.
	MaxConcurrentStreams uint32
	// StreamWindow is the per-stream receive window; default 1 MiB.
	// ConnWindow is the per-connection receive window; default 16 MiB. It
	// is kept well above StreamWindow so that streams whose upstream does
	// not read do not stall the connection's other streams.
	StreamWindow, ConnWindow int32
	// IdleTimeout closes connections without streams; default none (clients
	// own the pool's lifetime).
	IdleTimeout time.Duration
	// Logger receives per-connection failures at debug level; default
	// slog.Default().
	Logger *slog.Logger
}

// Server serves HBONE CONNECT streams on accepted TLS connections.
type Server struct {
	tlsConf *tls.Config
	handler Handler
	opts    ServerOptions
	log     *slog.Logger

	ctx    context.Context // parent of every stream's context
	cancel context.CancelFunc
	wg     sync.WaitGroup // connection goroutines

	mu        sync.Mutex
	listeners map[net.Listener]struct{} // guarded by mu
	conns     map[net.Conn]*serverConn  // guarded by mu; raw accepted conns, their serverConn once HTTP/2 runs
	closed    bool                      // guarded by mu
	shutdown  bool                      // guarded by mu; Shutdown called: connections are sent GOAWAY
	drained   chan struct{}             // guarded by mu; made by the first Shutdown, closed once conns is empty
}

// connInfo is what a connection knows about its peer.
type connInfo struct {
	peer     spiffeid.ID
	peerAddr netip.AddrPort
}

// NewServer returns a Server that terminates TLS with tlsConf and hands
// streams to h. tlsConf must require and verify client certificates
// (RequireAndVerifyClientCert, or RequireAnyClientCert with a
// VerifyPeerCertificate/VerifyConnection callback, as go-spiffe's tlsconfig
// builds); Serve refuses anything weaker. TLS 1.3 and ALPN "h2" are forced.
func NewServer(tlsConf *tls.Config, h Handler, opts ServerOptions) *Server {
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.MaxConcurrentStreams == 0 {
		opts.MaxConcurrentStreams = 1000
	}
	if opts.StreamWindow <= 0 {
		opts.StreamWindow = 1 << 20
	}
	if opts.ConnWindow <= 0 {
		opts.ConnWindow = 16 << 20
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	// A window must fit the protocol's 31 bits (RFC 9113 §6.9.1) and
	// should not be below its initial size.
	opts.StreamWindow = max(opts.StreamWindow, initialWindow)
	opts.ConnWindow = max(opts.ConnWindow, initialWindow)
	s := &Server{
		tlsConf:   hboneServerTLS(tlsConf),
		handler:   h,
		opts:      opts,
		log:       opts.Logger,
		listeners: make(map[net.Listener]struct{}),
		conns:     make(map[net.Conn]*serverConn),
	}
	s.ctx, s.cancel = context.WithCancel(context.Background())
	return s
}

// hboneServerTLS clones c and forces TLS 1.3 and ALPN h2, also on configs
// returned by GetConfigForClient.
func hboneServerTLS(c *tls.Config) *tls.Config {
	c = c.Clone()
	forceHBONE(c)
	if get := c.GetConfigForClient; get != nil {
		c.GetConfigForClient = func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			cc, err := get(hello)
			if err != nil || cc == nil {
				return cc, err
			}
			cc = cc.Clone()
			forceHBONE(cc)
			if err := checkClientAuth(cc); err != nil {
				return nil, err
			}
			return cc, nil
		}
	}
	return c
}

// forceHBONE sets what HBONE requires of a server's TLS.
func forceHBONE(c *tls.Config) {
	c.MinVersion = tls.VersionTLS13
	c.NextProtos = []string{alpnH2}
	// Full-size records from the first byte; see Pool.dial.
	c.DynamicRecordSizingDisabled = true
}

var errWeakClientAuth = errors.New("hbone: server tls config must require and verify client certificates")

func checkClientAuth(c *tls.Config) error {
	switch {
	case c.ClientAuth == tls.RequireAndVerifyClientCert:
		return nil
	case c.ClientAuth == tls.RequireAnyClientCert && (c.VerifyPeerCertificate != nil || c.VerifyConnection != nil):
		return nil
	}
	return errWeakClientAuth
}

// Serve accepts connections on ln until ln fails or the Server is closed.
// It returns nil after Close or Shutdown.
func (s *Server) Serve(ln net.Listener) error {
	if s.tlsConf.GetConfigForClient == nil {
		if err := checkClientAuth(s.tlsConf); err != nil {
			return err
		}
	}
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		ln.Close()
		return nil
	}
	s.listeners[ln] = struct{}{}
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		delete(s.listeners, ln)
		s.mu.Unlock()
		ln.Close()
	}()

	var backoff time.Duration
	for {
		c, err := ln.Accept()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() || isTemporaryAccept(err) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("hbone: accept", "err", err, "retry_in", backoff)
				time.Sleep(backoff)
				continue
			}
			return fmt.Errorf("accepting hbone connection: %w", err)
		}
		backoff = 0
		if !s.track(c) {
			c.Close()
			return nil
		}
		s.wg.Add(1)
		go s.serveConn(c)
	}
}

// track registers c as active; false if the server is closed.
func (s *Server) track(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = nil
	return true
}

func (s *Server) untrack(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.conns, c)
	if len(s.conns) == 0 && s.drained != nil {
		closeOnce(s.drained)
	}
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

func (s *Server) serveConn(c net.Conn) {
	defer s.wg.Done()
	defer s.untrack(c)
	defer c.Close()

	bt := newBatchedTLS(sockio.Wrap(c), s.tlsConf, tls.Server)
	tc := bt.Conn
	deadline := time.Now().Add(s.opts.HandshakeTimeout)
	hctx, cancel := context.WithDeadline(s.ctx, deadline)
	err := tc.HandshakeContext(hctx)
	cancel()
	if err != nil {
		s.log.Debug("hbone: tls handshake", "peer", c.RemoteAddr(), "err", err)
		return
	}
	st := tc.ConnectionState()
	if st.NegotiatedProtocol != alpnH2 {
		s.log.Debug("hbone: peer did not negotiate h2", "peer", c.RemoteAddr(), "alpn", st.NegotiatedProtocol)
		return
	}
	if len(st.PeerCertificates) == 0 {
		s.log.Debug("hbone: peer sent no certificate", "peer", c.RemoteAddr())
		return
	}
	id, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		s.log.Debug("hbone: peer certificate has no spiffe id", "peer", c.RemoteAddr(), "err", err)
		return
	}
	ci := connInfo{peer: id}
	if ta, ok := c.RemoteAddr().(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		ci.peerAddr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	sc := newServerConn(s, c, bt, ci)
	if err := sc.writeSettings(); err != nil {
		s.log.Debug("hbone: writing settings", "peer", c.RemoteAddr(), "err", err)
		return
	}
	s.mu.Lock()
	if _, ok := s.conns[c]; !ok { // closed meanwhile
		s.mu.Unlock()
		return
	}
	s.conns[c] = sc
	shutdown := s.shutdown
	s.mu.Unlock()
	if shutdown {
		go sc.goAway(http2.ErrCodeNo)
	}
	// The client's preface is due within the handshake's time.
	sc.serve(deadline)
}

// ServeHTTP serves one CONNECT stream as an http.Handler, so that the
// Server's request handling can be mounted on another HTTP/2 server; a
// Server's own connections do not use it. The peer is the SPIFFE ID of
// r's verified client certificate, if any.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	req, code := validateRequest(r.Method, r.Host, r.Header)
	if code != 0 {
		w.WriteHeader(code)
		return
	}
	if r.TLS != nil && len(r.TLS.PeerCertificates) > 0 {
		req.Peer, _ = x509svid.IDFromCert(r.TLS.PeerCertificates[0])
	}
	if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
		req.PeerAddr = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	s.serveRequest(w, r, req)
}

func (s *Server) serveRequest(w http.ResponseWriter, r *http.Request, req *Request) {
	up, status := s.handler(r.Context(), req)
	if status != http.StatusOK || up == nil {
		if up != nil {
			up.Close()
		}
		if status == http.StatusOK || status < 100 || status > 999 {
			status = http.StatusServiceUnavailable
		}
		w.WriteHeader(status)
		return
	}
	defer up.Close()
	flusher, _ := w.(http.Flusher)
	flush := func() {
		if flusher != nil {
			flusher.Flush()
		}
	}
	w.WriteHeader(http.StatusOK)
	flush()

	// client -> upstream: the end of the request body is the client's
	// half-close and becomes CloseWrite on the upstream.
	upErr := make(chan error, 1)
	go func() {
		_, err := copyBuffered(up, r.Body, nil)
		if err == nil {
			err = closeWrite(up)
		}
		if err != nil {
			up.Close() // unblocks the other direction
		}
		upErr <- err
	}()

	// upstream -> client: returning ends the response stream. x/net's
	// server cannot end the response while still reading the request body:
	// if the client has not finished sending, it resets the stream's
	// receiving side with NO_ERROR (RFC 9113 §8.1), so bytes the client
	// sends after the upstream closed its write side are dropped.
	_, err := copyBuffered(w, up, flush)
	if err != nil {
		select {
		case cerr := <-upErr:
			if cerr != nil {
				return // the other direction failed first: stream or conn is gone
			}
		default:
		}
		// Upstream reset or response write failed: reset the stream
		// rather than end it cleanly, so the client sees a failure.
		up.Close()
		panic(http.ErrAbortHandler)
	}
}

// Close stops accepting, closes every connection (and so every stream and
// its upstream) and waits for their goroutines. It is safe to call twice.
func (s *Server) Close() error {
	s.mu.Lock()
	s.closed = true
	var errs []error
	for ln := range s.listeners {
		if err := ln.Close(); err != nil && !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err)
		}
	}
	for c := range s.conns {
		c.Close()
	}
	s.mu.Unlock()
	s.cancel()
	s.wg.Wait()
	return errors.Join(errs...)
}

// Shutdown stops accepting, sends GOAWAY on every connection so clients
// open new streams elsewhere, waits for open streams to end until ctx is
// done, then closes what is left.
func (s *Server) Shutdown(ctx context.Context) error {
	s.mu.Lock()
	s.closed = true
	s.shutdown = true
	for ln := range s.listeners {
		ln.Close()
	}
	for _, sc := range s.conns {
		if sc != nil {
			go sc.goAway(http2.ErrCodeNo)
		}
	}
	// Every Shutdown, also concurrent ones, waits on the same channel.
	if s.drained == nil {
		s.drained = make(chan struct{})
	}
	if len(s.conns) == 0 {
		closeOnce(s.drained)
	}
	drained := s.drained
	s.mu.Unlock()

	var err error
	select {
	case <-drained:
	case <-ctx.Done():
		err = ctx.Err()
	}
	return errors.Join(err, s.Close())
}

// closeOnce closes c unless it is closed already; the caller serializes
// calls (s.mu).
func closeOnce(c chan struct{}) {
	select {
	case <-c:
	default:
		close(c)
	}
}

// isTemporaryAccept reports accept errors worth retrying: out of file
// descriptors, or a connection aborted before it was accepted.
func isTemporaryAccept(err error) bool {
	return errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) ||
		errors.Is(err, syscall.ECONNABORTED) || errors.Is(err, syscall.ENOBUFS)
}
