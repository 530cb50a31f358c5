package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"sync"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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

	mu     sync.Mutex
	conns  map[Key][]*poolConn // guarded by mu
	closed bool                // guarded by mu
}

// poolConn is one HTTP/2 connection of the pool, possibly still dialing.
type poolConn struct {
	key   Key
	ready chan struct{} // closed once cc or err is set

	// Set before ready is closed, read-only after.
	cc  *clientConn
	err error

	// Guarded by Pool.mu.
	streams int         // reserved or open streams
	full    int         // when > 0, the peer refused a stream at this count
	dead    bool        // removed from the pool
	idle    *time.Timer // armed while streams == 0 (expire checks again)
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
		conns: make(map[Key][]*poolConn),
	}
}

// Receive windows of the Pool's connections, as the Server's defaults:
// x/net's client defaults (4 MiB per stream, 1 GiB per connection) would
// let a peer park that much in memory behind an application that does
// not read.
const (
	clientStreamWindow = 1 << 20
	clientConnWindow   = 16 << 20
)

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
		c, err := pc.cc.openStream(ctx, authority, hdr)
		if err == nil {
			c.pool, c.pc = p, pc
			return c, nil
		}
		var se *StatusError
		switch {
		case errors.As(err, &se):
		case ctx.Err() != nil:
			err = ctx.Err()
		case retryable(err):
			// Counted with this stream's slot: the connection takes no
			// more than it carries now.
			p.markUnusable(pc)
			p.release(pc)
			lastErr = fmt.Errorf("hbone connect %s via %s: %w", authority, key.Addr, err)
			continue
		}
		p.release(pc)
		return nil, fmt.Errorf("hbone connect %s via %s: %w", authority, key.Addr, err)
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
		if isReady(c) {
			ok, limit := false, 0
			if c.err == nil {
				ok, limit = c.cc.available()
			}
			if !ok {
				if c.streams == 0 {
					gone = append(gone, c) // failed, closed or going away, and unused
				}
				continue
			}
			if c.streams >= limit {
				continue // the server's SETTINGS_MAX_CONCURRENT_STREAMS
			}
		}
		c.streams++
		c.full = 0
		if c.idle != nil {
			c.idle.Stop()
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
	raw = sockio.Wrap(raw)
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
	cc, err := newClientConn(raw, bt, p.opts.PingInterval, p.opts.PingTimeout, func() { p.connChanged(pc) })
	if err != nil {
		tc.Close()
		pc.err = fmt.Errorf("starting http2 with hbone %s: %w", addr, err)
		return
	}
	pc.cc = cc
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
	if pc.idle == nil {
		pc.idle = time.AfterFunc(p.opts.IdleTimeout, func() { p.expire(pc) })
	} else {
		pc.idle.Reset(p.opts.IdleTimeout)
	}
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
	if pc.cc != nil && pc.cc.usable() {
		pc.full = pc.streams // peer's stream limit, not a dead connection
		return
	}
	p.removeLocked(pc)
}

// connChanged learns that pc's connection closed or is going away: it
// leaves the pool, its open streams continue.
func (p *Pool) connChanged(pc *poolConn) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if !pc.dead {
		p.removeLocked(pc)
	}
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
	}
	if pc.streams == 0 && pc.cc != nil {
		go pc.cc.shutdown(errConnClosed)
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
	var wg sync.WaitGroup
	for _, pc := range all {
		wg.Go(func() {
			<-pc.ready // a dial in progress fails or finishes; close it either way
			if pc.cc != nil {
				pc.cc.shutdown(fmt.Errorf("%w: %w", errConnClosed, ErrPoolClosed))
			}
		})
	}
	wg.Wait()
	return nil
}

// numConns reports the pool's connections for key (for tests).
func (p *Pool) numConns(key Key) int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.conns[key])
}
