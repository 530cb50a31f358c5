package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// Key identifies a pooled connection: streams for the same source identity,
// destination identity and destination address share connections.
type Key struct {
	Src, Dst spiffeid.ID
	Addr     netip.AddrPort
}

// PoolOptions tune a Pool. The zero value is usable.
type PoolOptions struct {
	// MaxStreamsPerConn caps concurrent streams on one connection; beyond
	// it the Pool opens another connection for the same Key. Default 100.
	MaxStreamsPerConn int
	// IdleTimeout closes a connection that has had no stream for this
	// long. Default 5 minutes.
	IdleTimeout time.Duration
	// HandshakeTimeout bounds dialing plus the TLS handshake when the
	// caller's context has no earlier deadline. Default 10s.
	HandshakeTimeout time.Duration
	// Dial opens the TCP connection (ztunnel supplies marked sockets).
	// Default: a net.Dialer.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// PingInterval: a connection that has received nothing for this long
	// is sent an HTTP/2 PING, and closed (its streams fail, the next
	// Connect dials anew) when no answer comes within PingTimeout. A peer
	// node that vanished without a reset is found this way instead of
	// holding streams forever. Defaults 30s and 10s.
	PingInterval, PingTimeout time.Duration
}

// Pool originates HBONE streams over pooled HTTP/2 connections.
type Pool struct {
	opts PoolOptions
	t    *http2.Transport

	mu     sync.Mutex
	conns  map[Key][]*poolConn // guarded by mu
	closed bool                // guarded by mu
}

// poolConn is one HTTP/2 connection of the pool, possibly still dialing.
type poolConn struct {
	key   Key
	ready chan struct{} // closed once cc or err is set

	// Set before ready is closed, read-only after.
	cc  *http2.ClientConn
	tc  *tls.Conn
	err error

	// Guarded by Pool.mu.
	streams int         // reserved or open streams
	full    int         // when > 0, the peer refused a stream at this count
	dead    bool        // removed from the pool
	idle    *time.Timer // armed while streams == 0
}

// NewPool returns an empty Pool.
func NewPool(opts PoolOptions) *Pool {
	if opts.MaxStreamsPerConn <= 0 {
		opts.MaxStreamsPerConn = 100
	}
	if opts.IdleTimeout <= 0 {
		opts.IdleTimeout = 5 * time.Minute
	}
	if opts.PingInterval <= 0 {
		opts.PingInterval = 30 * time.Second
	}
	if opts.PingTimeout <= 0 {
		opts.PingTimeout = 10 * time.Second
	}
	if opts.HandshakeTimeout <= 0 {
		opts.HandshakeTimeout = 10 * time.Second
	}
	if opts.Dial == nil {
		var d net.Dialer
		opts.Dial = d.DialContext
	}
	return &Pool{
		opts:  opts,
		t:     newTransport(opts.PingInterval, opts.PingTimeout),
		conns: make(map[Key][]*poolConn),
	}
}

// Receive windows of the Pool's connections, as the Server's defaults:
// x/net's own (4 MiB per stream, 1 GiB per connection) would let a peer
// park that much in memory behind an application that does not read.
const (
	clientStreamWindow = 1 << 20
	clientConnWindow   = 16 << 20
)

// newTransport returns the HTTP/2 transport that frames a Pool's
// connections; pooling and idle expiry are the Pool's.
func newTransport(pingInterval, pingTimeout time.Duration) *http2.Transport {
	// The receive windows are only settable through net/http's HTTP2Config.
	t1 := &http.Transport{HTTP2: &http.HTTP2Config{
		MaxReceiveBufferPerStream:     clientStreamWindow,
		MaxReceiveBufferPerConnection: clientConnWindow,
	}}
	t, err := http2.ConfigureTransports(t1)
	if err != nil {
		panic(fmt.Sprintf("hbone: configuring http2 transport: %v", err)) // only fails when t1 already has h2
	}
	t.DisableCompression = true
	t.StrictMaxConcurrentStreams = true
	// Responses arrive in frames of up to maxReadFrame: one upstream read
	// of a Server each, rather than x/net's default 16 KiB.
	t.MaxReadFrameSize = maxReadFrame
	t.ReadIdleTimeout = pingInterval
	t.PingTimeout = pingTimeout
	return t
}

// ErrPoolClosed is returned by Connect after Close.
var ErrPoolClosed = errors.New("hbone: pool closed")

// maxConnectAttempts bounds retries when a pooled connection turns out to
// be going away between reservation and use.
const maxConnectAttempts = 3

// Connect opens a CONNECT stream to authority ("ip:port") over a pooled
// connection to key.Addr, dialing one with clientTLS if needed. clientTLS
// must present key.Src's certificate and verify the server's chain (for
// SPIFFE certificates: InsecureSkipVerify with VerifyPeerCertificate, as
// go-spiffe's tlsconfig builds); Connect additionally checks that the
// server's certificate carries key.Dst (ErrPeerIdentity otherwise).
// A non-200 answer is a *StatusError. ctx bounds only the setup.
func (p *Pool) Connect(ctx context.Context, key Key, clientTLS *tls.Config, authority string, hdr Headers) (net.Conn, error) {
	var lastErr error
	for range maxConnectAttempts {
		pc, dialer, err := p.reserve(key)
		if err != nil {
			return nil, err
		}
		if dialer {
			p.dial(ctx, pc, clientTLS)
		} else {
			select {
			case <-pc.ready:
			case <-ctx.Done():
				p.release(pc)
				return nil, fmt.Errorf("waiting for hbone connection to %s: %w", key.Addr, ctx.Err())
			}
		}
		if pc.err != nil {
			p.release(pc)
			if dialer {
				return nil, pc.err
			}
			lastErr = pc.err // another caller's dial failed (maybe its ctx); try our own
			continue
		}
		if !pc.cc.ReserveNewRequest() {
			p.markUnusable(pc)
			p.release(pc)
			lastErr = fmt.Errorf("hbone connection to %s cannot take new streams", key.Addr)
			continue
		}
		c, retry, err := p.openStream(ctx, pc, authority, hdr)
		if err == nil {
			return c, nil
		}
		p.release(pc)
		if !retry {
			return nil, err
		}
		lastErr = err
	}
	return nil, lastErr
}

// reserve takes a stream slot on a usable connection for key, or creates a
// new (not yet dialed) connection with the slot taken; dialer is true then.
func (p *Pool) reserve(key Key) (pc *poolConn, dialer bool, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, false, ErrPoolClosed
	}
	var gone []*poolConn
	defer func() {
		for _, c := range gone {
			p.removeLocked(c)
		}
	}()
	for _, c := range p.conns[key] {
		if c.dead || c.streams >= p.opts.MaxStreamsPerConn || (c.full > 0 && c.streams >= c.full) {
			continue
		}
		if isReady(c) && (c.err != nil || !c.cc.CanTakeNewRequest()) {
			if c.streams == 0 {
				gone = append(gone, c) // failed, closed or going away, and unused
			}
			continue
		}
		c.streams++
		c.full = 0
		if c.idle != nil {
			c.idle.Stop()
			c.idle = nil
		}
		return c, false, nil
	}
	pc = &poolConn{key: key, ready: make(chan struct{}), streams: 1}
	p.conns[key] = append(p.conns[key], pc)
	return pc, true, nil
}

func isReady(c *poolConn) bool {
	select {
	case <-c.ready:
		return true
	default:
		return false
	}
}

// dial connects pc, verifies the server's identity and starts HTTP/2.
func (p *Pool) dial(ctx context.Context, pc *poolConn, clientTLS *tls.Config) {
	defer close(pc.ready)
	ctx, cancel := context.WithTimeout(ctx, p.opts.HandshakeTimeout)
	defer cancel()
	addr := pc.key.Addr.String()
	raw, err := p.opts.Dial(ctx, "tcp", addr)
	if err != nil {
		pc.err = fmt.Errorf("dialing hbone %s: %w", addr, err)
		return
	}
	conf := clientTLS.Clone()
	conf.MinVersion = tls.VersionTLS13
	conf.NextProtos = []string{alpnH2}
	// Full-size records from the first byte: dynamic record sizing helps
	// browsers render early over slow links, and costs a tunnel records
	// (and system calls) for nothing.
	conf.DynamicRecordSizingDisabled = true
	bt := newBatchedTLS(raw, conf, tls.Client)
	tc := bt.Conn
	if err := tc.HandshakeContext(ctx); err != nil {
		raw.Close()
		pc.err = fmt.Errorf("tls handshake with hbone %s: %w", addr, err)
		return
	}
	if err := checkServer(tc.ConnectionState(), pc.key.Dst); err != nil {
		tc.Close()
		pc.err = fmt.Errorf("hbone %s: %w", addr, err)
		return
	}
	cc, err := p.t.NewClientConn(bt)
	if err != nil {
		tc.Close()
		pc.err = fmt.Errorf("starting http2 with hbone %s: %w", addr, err)
		return
	}
	pc.tc, pc.cc = tc, cc
}

// checkServer verifies the negotiated protocol and the server's identity.
func checkServer(st tls.ConnectionState, want spiffeid.ID) error {
	if st.NegotiatedProtocol != alpnH2 {
		return fmt.Errorf("server negotiated alpn %q, want %q", st.NegotiatedProtocol, alpnH2)
	}
	if len(st.PeerCertificates) == 0 {
		return fmt.Errorf("%w: server sent no certificate", ErrPeerIdentity)
	}
	got, err := x509svid.IDFromCert(st.PeerCertificates[0])
	if err != nil {
		return fmt.Errorf("%w: %w", ErrPeerIdentity, err)
	}
	if got != want {
		return fmt.Errorf("%w: got %s, want %s", ErrPeerIdentity, got, want)
	}
	return nil
}

// openStream sends the CONNECT on pc, whose reservation it consumes.
// retry reports whether another connection may succeed.
func (p *Pool) openStream(ctx context.Context, pc *poolConn, authority string, hdr Headers) (c net.Conn, retry bool, err error) {
	h := make(http.Header, 4)
	if hdr.ForwardedFor.IsValid() {
		h.Set(headerForwarded, formatForwarded(hdr.ForwardedFor))
	}
	if hdr.Baggage != "" {
		h.Set(headerBaggage, hdr.Baggage)
	}
	if hdr.Traceparent != "" {
		h.Set(headerTraceparent, hdr.Traceparent)
	}
	h["User-Agent"] = nil // no Go default user agent on the wire

	// The stream outlives ctx, which bounds only the setup: the request's
	// own context ends when the stream is closed.
	sctx, cancel := context.WithCancel(context.Background())
	stop := context.AfterFunc(ctx, cancel)
	pw := newBodyPipe()
	req := (&http.Request{
		Method:        http.MethodConnect,
		URL:           &url.URL{Host: authority},
		Host:          authority,
		Header:        h,
		Body:          pw,
		ContentLength: -1,
		Proto:         "HTTP/2.0",
		ProtoMajor:    2,
	}).WithContext(sctx)
	resp, err := pc.cc.RoundTrip(req)
	if !stop() {
		// ctx ended during setup; the request may have been aborted by it.
		if err == nil {
			resp.Body.Close()
			err = ctx.Err()
		}
	}
	if err != nil {
		cancel()
		pw.CloseWithError(err)
		if ctx.Err() != nil {
			return nil, false, fmt.Errorf("hbone connect %s via %s: %w", authority, pc.key.Addr, ctx.Err())
		}
		var ga http2.GoAwayError
		retry = errors.As(err, &ga) || !pc.cc.CanTakeNewRequest()
		if retry {
			p.markUnusable(pc)
		}
		return nil, retry, fmt.Errorf("hbone connect %s via %s: %w", authority, pc.key.Addr, err)
	}
	if resp.StatusCode != http.StatusOK {
		resp.Body.Close()
		cancel()
		pw.CloseWithError(nil)
		return nil, false, fmt.Errorf("hbone connect %s via %s: %w", authority, pc.key.Addr, &StatusError{Code: resp.StatusCode})
	}
	return &streamConn{
		pool:   p,
		pc:     pc,
		pw:     pw,
		body:   resp.Body,
		cancel: cancel,
		local:  pc.tc.LocalAddr(),
		remote: pc.tc.RemoteAddr(),
	}, false, nil
}

// release gives back pc's stream slot; an unused connection is closed
// after IdleTimeout, a failed one right away.
func (p *Pool) release(pc *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	pc.streams--
	if pc.streams > 0 {
		return
	}
	if isReady(pc) && (pc.err != nil || pc.dead) {
		p.removeLocked(pc)
		return
	}
	if pc.dead || !isReady(pc) {
		return
	}
	pc.idle = time.AfterFunc(p.opts.IdleTimeout, func() { p.expire(pc) })
}

// expire closes pc if it is still unused.
func (p *Pool) expire(pc *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pc.streams > 0 || pc.dead {
		return
	}
	p.removeLocked(pc)
}

// markUnusable takes pc out of rotation (GOAWAY, closed, refused a
// stream at its current count); its open streams continue.
func (p *Pool) markUnusable(pc *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if pc.cc != nil && !pc.cc.State().Closed && !pc.cc.State().Closing {
		pc.full = pc.streams // peer's stream limit, not a dead connection
		return
	}
	p.removeLocked(pc)
}

// removeLocked drops pc from the pool and closes it once unused.
func (p *Pool) removeLocked(pc *poolConn) {
	if !pc.dead {
		pc.dead = true
		conns := p.conns[pc.key]
		for i, c := range conns {
			if c == pc {
				conns = append(conns[:i], conns[i+1:]...)
				break
			}
		}
		if len(conns) == 0 {
			delete(p.conns, pc.key)
		} else {
			p.conns[pc.key] = conns
		}
	}
	if pc.idle != nil {
		pc.idle.Stop()
		pc.idle = nil
	}
	if pc.streams == 0 && pc.cc != nil {
		go pc.cc.Close()
	}
}

// Close closes every connection of the pool, aborting their streams. It
// is safe to call twice.
func (p *Pool) Close() error {
	p.mu.Lock()
	p.closed = true
	var all []*poolConn
	for _, conns := range p.conns {
		all = append(all, conns...)
	}
	for _, pc := range all {
		p.removeLocked(pc)
	}
	p.mu.Unlock()
	for _, pc := range all {
		<-pc.ready // a dial in progress fails or finishes; close it either way
		if pc.cc != nil {
			pc.cc.Close()
		}
	}
	return nil
}

// numConns reports the pool's connections for key (for tests).
func (p *Pool) numConns(key Key) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns[key])
}

// streamConn is one CONNECT stream as a net.Conn: writes are the request
// body, reads the response body.
type streamConn struct {
	pool   *Pool
	pc     *poolConn
	pw     *bodyPipe // the request body: what the stream sends
	body   io.ReadCloser
	cancel context.CancelFunc

	local, remote net.Addr

	closeOnce sync.Once
	abortErr  atomic.Pointer[error] // why the stream was aborted locally
	dlMu      sync.Mutex            // guards rTimer, wTimer
	rTimer    *time.Timer           // read deadline
	wTimer    *time.Timer           // write deadline
}

func (c *streamConn) Read(b []byte) (int, error) {
	n, err := c.body.Read(b)
	if err != nil && err != io.EOF {
		err = c.localErr(err)
	}
	return n, err
}

func (c *streamConn) Write(b []byte) (int, error) {
	n, err := c.pw.Write(b)
	if err != nil {
		err = c.localErr(err)
		if errors.Is(err, io.ErrClosedPipe) {
			err = net.ErrClosed // written after CloseWrite
		}
	}
	return n, err
}

// localErr prefers the reason the stream was aborted locally (Close,
// deadline) over the transport's description of its consequence.
func (c *streamConn) localErr(err error) error {
	if ae := c.abortErr.Load(); ae != nil {
		return *ae
	}
	return err
}

// CloseWrite ends the request body (END_STREAM): the server half-closes
// its upstream. Reads continue until the server ends the response.
func (c *streamConn) CloseWrite() error {
	c.pw.CloseWithError(nil)
	return nil
}

// Close resets the stream if it is still open and releases its slot in
// the pool. It is safe to call twice.
func (c *streamConn) Close() error {
	c.closeOnce.Do(func() {
		c.abort(net.ErrClosed)
		c.dlMu.Lock()
		stopTimer(c.rTimer)
		stopTimer(c.wTimer)
		c.dlMu.Unlock()
		c.pool.release(c.pc)
	})
	return nil
}

func (c *streamConn) abort(err error) {
	c.abortErr.CompareAndSwap(nil, &err)
	c.pw.CloseWithError(err)
	c.body.Close()
	c.cancel()
}

func (c *streamConn) LocalAddr() net.Addr  { return c.local }
func (c *streamConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline sets both deadlines; see SetReadDeadline.
func (c *streamConn) SetDeadline(t time.Time) error {
	c.SetReadDeadline(t)
	return c.SetWriteDeadline(t)
}

// SetReadDeadline arms a deadline that aborts the stream when it passes:
// an HTTP/2 body read cannot be interrupted and resumed, so unlike a TCP
// socket the stream is unusable afterwards (reads and writes fail with
// os.ErrDeadlineExceeded). A zero t disarms it.
func (c *streamConn) SetReadDeadline(t time.Time) error {
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	c.rTimer = c.armLocked(c.rTimer, t)
	return nil
}

// SetWriteDeadline behaves like SetReadDeadline.
func (c *streamConn) SetWriteDeadline(t time.Time) error {
	c.dlMu.Lock()
	defer c.dlMu.Unlock()
	c.wTimer = c.armLocked(c.wTimer, t)
	return nil
}

func (c *streamConn) armLocked(old *time.Timer, t time.Time) *time.Timer {
	stopTimer(old)
	if t.IsZero() {
		return nil
	}
	return time.AfterFunc(time.Until(t), func() { c.abort(os.ErrDeadlineExceeded) })
}

func stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}
