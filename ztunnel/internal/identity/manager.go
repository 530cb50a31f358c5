package identity

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Defaults for the zero fields of [Options].
const (
	// DefaultTrustDomain is the mesh's trust domain unless configured.
	DefaultTrustDomain = "cluster.local"
	// DefaultCertTTL is the lifetime asked of the CA.
	DefaultCertTTL = 24 * time.Hour
	// DefaultWaitTimeout bounds how long a connection waits for a
	// certificate that is not there yet.
	DefaultWaitTimeout = 5 * time.Second
	// DefaultFetchTimeout bounds one CreateCertificate call.
	DefaultFetchTimeout = 10 * time.Second
	// DefaultBackoffInitial is the first pause after a failed fetch.
	DefaultBackoffInitial = time.Second
	// DefaultBackoffMax caps the pause between failed fetches.
	DefaultBackoffMax = time.Minute
)

var (
	// ErrClosed is returned once the Manager is closed.
	ErrClosed = errors.New("identity manager closed")
	// ErrForgotten is returned to callers waiting for an identity that was
	// forgotten meanwhile.
	ErrForgotten = errors.New("identity forgotten")
	// ErrNotReady is returned when no certificate arrived within the wait.
	ErrNotReady = errors.New("certificate not ready")
)

// Options configure a [Manager]. The zero value is usable.
type Options struct {
	// TrustDomain is the mesh's trust domain; zero means cluster.local.
	TrustDomain spiffeid.TrustDomain
	// Roots are trust anchors of the mesh known up front (the root mounted
	// in ztunnel's pod). The roots ending the CA's chains are trusted too.
	Roots []*x509.Certificate
	// Self is ztunnel's own identity, asked for without impersonation.
	// Zero means every identity is impersonated.
	Self spiffeid.ID
	// CertTTL is the certificate lifetime asked of the CA (the CA may cap it).
	CertTTL time.Duration
	// WaitTimeout bounds how long Get waits for a certificate not yet held.
	WaitTimeout time.Duration
	// FetchTimeout bounds one request to the CA.
	FetchTimeout time.Duration
	// BackoffInitial and BackoffMax bound the exponential pause between
	// failed fetches.
	BackoffInitial, BackoffMax time.Duration
	// Clock drives rotation and retries; nil is the system clock.
	Clock Clock
	// Log receives fetch failures; nil is slog.Default().
	Log *slog.Logger
}

func (o Options) withDefaults() Options {
	if o.TrustDomain.IsZero() {
		o.TrustDomain = spiffeid.RequireTrustDomainFromString(DefaultTrustDomain)
	}
	if o.CertTTL <= 0 {
		o.CertTTL = DefaultCertTTL
	}
	if o.WaitTimeout <= 0 {
		o.WaitTimeout = DefaultWaitTimeout
	}
	if o.FetchTimeout <= 0 {
		o.FetchTimeout = DefaultFetchTimeout
	}
	if o.BackoffInitial <= 0 {
		o.BackoffInitial = DefaultBackoffInitial
	}
	if o.BackoffMax < o.BackoffInitial {
		o.BackoffMax = max(DefaultBackoffMax, o.BackoffInitial)
	}
	if o.Clock == nil {
		o.Clock = realClock{}
	}
	if o.Log == nil {
		o.Log = slog.Default()
	}
	return o
}

// Certificate is one identity's key and certificate chain. It is immutable.
type Certificate struct {
	ID spiffeid.ID
	// TLS is what the workload presents: leaf and intermediates, the private
	// key, and the parsed leaf.
	TLS *tls.Certificate
	// Roots are the trust anchors that ended the CA's chain.
	Roots               []*x509.Certificate
	NotBefore, NotAfter time.Time
}

// RotateAt is when the certificate is renewed: half-way through its life.
func (c *Certificate) RotateAt() time.Time {
	return c.NotBefore.Add(c.NotAfter.Sub(c.NotBefore) / 2)
}

func (c *Certificate) usableAt(t time.Time) bool {
	return c != nil && t.Before(c.NotAfter)
}

// Manager holds a certificate per workload identity on the node.
//
// Lock order: Manager.mu before entry.mu. A fetch publishes its outcome
// holding both, so the trust bundle and the certificates change together.
type Manager struct {
	ca    CA
	opts  Options
	clock Clock
	log   *slog.Logger

	ctx       context.Context // cancelled by Close (cause ErrClosed); parent of every rotation
	cancel    context.CancelCauseFunc
	wg        sync.WaitGroup // rotation goroutines
	closeOnce sync.Once

	mu      sync.Mutex
	entries map[spiffeid.ID]*entry // guarded by mu; nil once closed

	// bundle is the mesh's trust anchors: Options.Roots and the roots of
	// every certificate held. Replaced whole, never modified.
	bundle atomic.Pointer[x509bundle.Bundle]
}

// entry is one identity: its latest certificate and the goroutine that
// fetches and rotates it.
type entry struct {
	id     spiffeid.ID
	ctx    context.Context // cancelled by Forget (cause ErrForgotten) or Close
	cancel context.CancelCauseFunc
	done   chan struct{} // closed when the rotation goroutine has returned

	mu      sync.Mutex
	cert    *Certificate  // guarded by mu; the latest certificate, nil before the first
	err     error         // guarded by mu; the last attempt's error, nil after a success
	attempt chan struct{} // guarded by mu; closed when the attempt under way (or next) ends
}

// NewManager returns a Manager that gets certificates from ca. Close it to
// stop rotation.
func NewManager(ca CA, opts Options) *Manager {
	opts = opts.withDefaults()
	ctx, cancel := context.WithCancelCause(context.Background())
	m := &Manager{
		ca:      ca,
		opts:    opts,
		clock:   opts.Clock,
		log:     opts.Log,
		ctx:     ctx,
		cancel:  cancel,
		entries: map[spiffeid.ID]*entry{},
	}
	m.bundle.Store(x509bundle.FromX509Authorities(opts.TrustDomain, opts.Roots))
	return m
}

// Get returns id's certificate. When none is held yet (or the held one has
// expired) it waits for the fetch under way, starting one if needed, for at
// most Options.WaitTimeout; concurrent callers share that fetch. A failed
// fetch is returned to the callers that waited for it and retried in the
// background.
func (m *Manager) Get(ctx context.Context, id spiffeid.ID) (*Certificate, error) {
	e, err := m.entry(id)
	if err != nil {
		return nil, err
	}
	e.mu.Lock()
	cert, attempt := e.cert, e.attempt
	e.mu.Unlock()
	if cert.usableAt(m.clock.Now()) {
		return cert, nil
	}

	ctx, cancel := context.WithTimeout(ctx, m.opts.WaitTimeout)
	defer cancel()
	select {
	case <-attempt:
		e.mu.Lock()
		cert, err = e.cert, e.err
		e.mu.Unlock()
		if cert.usableAt(m.clock.Now()) {
			return cert, nil
		}
		if err == nil {
			err = errors.New("CA issued an expired certificate")
		}
		return nil, fmt.Errorf("certificate for %s: %w", id, err)
	case <-e.ctx.Done():
		return nil, fmt.Errorf("certificate for %s: %w", id, context.Cause(e.ctx))
	case <-ctx.Done():
		e.mu.Lock()
		last := e.err
		e.mu.Unlock()
		if last != nil {
			return nil, fmt.Errorf("certificate for %s: %w: %w (last attempt: %w)", id, ErrNotReady, ctx.Err(), last)
		}
		return nil, fmt.Errorf("certificate for %s: %w: %w", id, ErrNotReady, ctx.Err())
	}
}

// Prefetch starts fetching id's certificate, if it is not already held or
// under way, so it is ready when the first connection needs it. Call it for
// the identity of every workload on the node.
func (m *Manager) Prefetch(id spiffeid.ID) error {
	_, err := m.entry(id)
	return err
}

// Forget drops id's certificate and stops rotating it. Call it when the last
// workload of that identity leaves the node; a later Get fetches afresh.
func (m *Manager) Forget(id spiffeid.ID) {
	m.mu.Lock()
	defer m.mu.Unlock()
	e, ok := m.entries[id]
	if !ok {
		return
	}
	delete(m.entries, id)
	e.cancel(ErrForgotten)
	m.updateBundleLocked(nil)
}

// Certificates returns the certificates held, ordered by identity.
func (m *Manager) Certificates() []*Certificate {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []*Certificate
	for _, e := range m.entries {
		e.mu.Lock()
		if e.cert != nil {
			out = append(out, e.cert)
		}
		e.mu.Unlock()
	}
	slices.SortFunc(out, func(a, b *Certificate) int {
		return strings.Compare(a.ID.String(), b.ID.String())
	})
	return out
}

// Close stops all rotation and waits for it. It is safe to call twice.
func (m *Manager) Close() {
	m.closeOnce.Do(func() {
		m.mu.Lock()
		m.entries = nil
		m.mu.Unlock()
		m.cancel(ErrClosed)
		m.wg.Wait()
	})
}

// entry returns id's entry, creating it and starting its rotation if needed.
func (m *Manager) entry(id spiffeid.ID) (*entry, error) {
	if id.IsZero() {
		return nil, errors.New("certificate for empty identity")
	}
	if !id.MemberOf(m.opts.TrustDomain) {
		return nil, fmt.Errorf("certificate for %s: not in trust domain %s", id, m.opts.TrustDomain)
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.entries == nil {
		return nil, ErrClosed
	}
	if e, ok := m.entries[id]; ok {
		return e, nil
	}
	ctx, cancel := context.WithCancelCause(m.ctx)
	e := &entry{id: id, ctx: ctx, cancel: cancel, done: make(chan struct{}), attempt: make(chan struct{})}
	m.entries[id] = e
	m.wg.Add(1)
	go m.rotate(e)
	return e, nil
}

// rotate fetches e's certificate, then renews it at half life, retrying
// failures with exponential backoff, until e is forgotten or the Manager
// closed. A failure leaves the previous certificate in use.
func (m *Manager) rotate(e *entry) {
	defer m.wg.Done()
	defer close(e.done)
	backoff := m.opts.BackoffInitial
	for {
		cert, err := m.fetch(e)
		var wait time.Duration
		if err == nil {
			backoff = m.opts.BackoffInitial
			wait = m.rotationDelay(cert)
		} else {
			if e.ctx.Err() != nil {
				return
			}
			// Jitter spreads the retries of many identities (and of many
			// ztunnels) after a CA outage.
			wait = backoff/2 + rand.N(backoff/2+1)
			m.log.Warn("certificate fetch failed", "identity", e.id.String(), "retry_in", wait, "error", err)
			backoff = min(2*backoff, m.opts.BackoffMax)
		}
		select {
		case <-e.ctx.Done():
			return
		case <-m.clock.After(wait):
		}
	}
}

// rotationDelay is how long until cert is renewed: its half life, or half
// of what is left when that has passed (a skewed clock), but never less than
// the initial backoff so a short-lived certificate cannot spin.
func (m *Manager) rotationDelay(cert *Certificate) time.Duration {
	now := m.clock.Now()
	at := cert.RotateAt()
	if !at.After(now) {
		at = now.Add(cert.NotAfter.Sub(now) / 2)
	}
	return max(at.Sub(now), m.opts.BackoffInitial)
}

// fetch makes one attempt and publishes its outcome to e's waiters.
func (m *Manager) fetch(e *entry) (*Certificate, error) {
	ctx, cancel := context.WithTimeout(e.ctx, m.opts.FetchTimeout)
	defer cancel()
	cert, err := m.issue(ctx, e.id)

	// The roots are trusted before anyone can present the certificate, or a
	// peer of ours holding the first certificate under a new root would
	// refuse it.
	m.mu.Lock()
	defer m.mu.Unlock()
	if err == nil && e.ctx.Err() == nil {
		m.updateBundleLocked(cert)
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	if err == nil {
		e.cert = cert
	}
	e.err = err
	close(e.attempt)
	e.attempt = make(chan struct{})
	return cert, err
}

// issue asks the CA for a certificate of id with a fresh key and checks what
// comes back.
func (m *Manager) issue(ctx context.Context, id spiffeid.ID) (*Certificate, error) {
	key, csr, err := newKeyAndCSR(id)
	if err != nil {
		return nil, err
	}
	impersonate := id.String()
	if id == m.opts.Self {
		impersonate = ""
	}
	chain, err := m.ca.CreateCertificate(ctx, csr, m.opts.CertTTL, impersonate)
	if err != nil {
		return nil, err
	}
	return m.parseIssued(id, key, chain)
}

// parseIssued turns the CA's PEM chain (leaf first, root last) into a
// Certificate, refusing one that is not for id, not for key, or does not
// verify.
func (m *Manager) parseIssued(id spiffeid.ID, key *ecdsa.PrivateKey, chainPEM []string) (*Certificate, error) {
	var certs []*x509.Certificate
	for _, s := range chainPEM {
		rest := []byte(s)
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				continue
			}
			c, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("parsing issued chain: %w", err)
			}
			certs = append(certs, c)
		}
	}
	if len(certs) == 0 {
		return nil, errors.New("parsing issued chain: no certificates")
	}
	leaf := certs[0]
	if pub, ok := leaf.PublicKey.(*ecdsa.PublicKey); !ok || !key.PublicKey.Equal(pub) {
		return nil, errors.New("issued certificate does not carry our key")
	}
	got, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("issued certificate: %w", err)
	}
	if got != id {
		return nil, fmt.Errorf("issued certificate is for %s, asked for %s", got, id)
	}

	presented, roots := certs, []*x509.Certificate(nil)
	if last := certs[len(certs)-1]; len(certs) > 1 && selfSigned(last) {
		presented, roots = certs[:len(certs)-1], []*x509.Certificate{last}
	}
	trust := x509bundle.FromX509Authorities(id.TrustDomain(), slices.Concat(m.opts.Roots, roots))
	if _, _, err := x509svid.Verify(presented, trust, x509svid.WithTime(m.clock.Now())); err != nil {
		return nil, fmt.Errorf("verifying issued certificate: %w", err)
	}

	tc := &tls.Certificate{PrivateKey: key, Leaf: leaf}
	for _, c := range presented {
		tc.Certificate = append(tc.Certificate, c.Raw)
	}
	return &Certificate{ID: id, TLS: tc, Roots: roots, NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter}, nil
}

func selfSigned(c *x509.Certificate) bool {
	return bytes.Equal(c.RawSubject, c.RawIssuer) && c.CheckSignatureFrom(c) == nil
}

// updateBundleLocked recomputes the trust anchors from Options.Roots, the
// certificates held, and incoming, a certificate about to be held (or nil).
// Certificates are published with m.mu held, so the bundle always covers
// every certificate that can be presented.
func (m *Manager) updateBundleLocked(incoming *Certificate) {
	b := x509bundle.FromX509Authorities(m.opts.TrustDomain, m.opts.Roots)
	add := func(c *Certificate) {
		if c != nil {
			for _, r := range c.Roots {
				b.AddX509Authority(r)
			}
		}
	}
	for _, e := range m.entries {
		e.mu.Lock()
		c := e.cert
		e.mu.Unlock()
		add(c)
	}
	add(incoming)
	m.bundle.Store(b)
}
