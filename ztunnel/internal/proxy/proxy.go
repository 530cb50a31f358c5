package proxy

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/ztunnel/internal/identity"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// SocketMark is the SO_MARK of every socket ztunnel opens, so that the
// redirection rules never capture ztunnel's own traffic.
const SocketMark = 0x539

// DefaultClusterID is the cluster part of pod workload uids
// ("<cluster>//Pod/<namespace>/<name>") unless configured.
const DefaultClusterID = "Kubernetes"

// Defaults for the zero fields of Config.
const (
	// DefaultConnectTimeout bounds opening an upstream connection (TCP,
	// TLS and CONNECT).
	DefaultConnectTimeout = 10 * time.Second
	// DefaultStateWait bounds how long a connection waits for its pod's
	// workload to appear in the state (a pod that has just started).
	DefaultStateWait = 2 * time.Second
)

// Pod is an enrolled pod as the data path sees it: who it is, as the node
// agent described it, and how to open connections from inside its network
// namespace.
type Pod struct {
	UID, Name, Namespace, ServiceAccount string
	// Dial opens a (marked) connection from inside the pod's network
	// namespace.
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// DialFrom is Dial from the foreign address src (transparently, see
	// inpod.Manager.DialFrom): inbound connections reach the app as the
	// client that opened them. Nil means Dial, from the pod's own address.
	DialFrom func(ctx context.Context, src netip.Addr, network, addr string) (net.Conn, error)
}

// Config configures a Proxy.
type Config struct {
	State   *state.Store
	Certs   *identity.Manager
	Metrics *telemetry.Metrics
	// TrustDomain of the pods' identities; zero means cluster.local.
	TrustDomain spiffeid.TrustDomain
	// ClusterID names pod workloads in the state; empty means
	// DefaultClusterID.
	ClusterID string
	// Dial opens HBONE connections from ztunnel's own network namespace;
	// nil means marked sockets (SocketMark).
	Dial func(ctx context.Context, network, addr string) (net.Conn, error)
	// Pool tunes the HBONE client pool; its Dial is replaced by Dial.
	Pool hbone.PoolOptions
	// Server tunes the HBONE servers.
	Server         hbone.ServerOptions
	ConnectTimeout time.Duration
	StateWait      time.Duration
	Log            *slog.Logger
}

// Proxy carries the pods' connections. Its methods are the in-pod
// listeners' handlers; each blocks until its connection ends.
type Proxy struct {
	cfg  Config
	pool *hbone.Pool

	mu      sync.Mutex
	servers map[string]*podServer    // guarded by mu; HBONE server per pod uid
	stats   map[string]*podConnStats // guarded by mu; per pod uid
	conns   map[net.Conn]struct{}    // guarded by mu; client connections being carried
	closed  bool                     // guarded by mu
	wg      sync.WaitGroup           // outbound and plaintext inbound connections
}

// podConnStats counts a pod's connections.
type podConnStats struct {
	outbound, inbound, hbone atomic.Int64 // open now
	total                    atomic.Int64 // ever carried
	denied                   atomic.Int64 // refused by policy
}

// ConnStats is one pod's connection state in /config_dump.
type ConnStats struct {
	UID string `json:"uid"`
	// Outbound, InboundPlaintext and InboundHBONE are open now.
	Outbound         int64 `json:"outbound"`
	InboundPlaintext int64 `json:"inboundPlaintext"`
	InboundHBONE     int64 `json:"inboundHbone"`
	Total            int64 `json:"total"`
	Denied           int64 `json:"denied"`
}

// New returns a Proxy for cfg.
func New(cfg Config) *Proxy {
	if cfg.TrustDomain.IsZero() {
		cfg.TrustDomain = spiffeid.RequireTrustDomainFromString(identity.DefaultTrustDomain)
	}
	if cfg.ClusterID == "" {
		cfg.ClusterID = DefaultClusterID
	}
	if cfg.Dial == nil {
		cfg.Dial = markedDialer().DialContext
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.StateWait <= 0 {
		cfg.StateWait = DefaultStateWait
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Server.Logger == nil {
		cfg.Server.Logger = cfg.Log
	}
	po := cfg.Pool
	po.Dial = cfg.Dial
	return &Proxy{
		cfg:     cfg,
		pool:    hbone.NewPool(po),
		servers: map[string]*podServer{},
		stats:   map[string]*podConnStats{},
		conns:   map[net.Conn]struct{}{},
	}
}

// podID is the SPIFFE ID of pod's service account.
func (p *Proxy) podID(pod *Pod) (spiffeid.ID, error) {
	id, err := spiffeid.FromSegments(p.cfg.TrustDomain, "ns", pod.Namespace, "sa", pod.ServiceAccount)
	if err != nil {
		return spiffeid.ID{}, fmt.Errorf("identity of pod %s/%s: %w", pod.Namespace, pod.Name, err)
	}
	return id, nil
}

// PodIdentity is the SPIFFE ID of pod's service account (for prefetching
// its certificate).
func (p *Proxy) PodIdentity(pod *Pod) (spiffeid.ID, error) { return p.podID(pod) }

// podWorkload finds pod's workload in the state: by its uid, or else by
// addr (an address of the pod) when the workload there has the pod's name.
func (p *Proxy) podWorkload(pod *Pod, addr netip.Addr) *state.Workload {
	if w := p.cfg.State.Workload(p.cfg.ClusterID + "//Pod/" + pod.Namespace + "/" + pod.Name); w != nil {
		return w
	}
	if w := p.cfg.State.WorkloadByIP("", addr.Unmap()); w != nil &&
		w.Info.GetNamespace() == pod.Namespace && w.Info.GetName() == pod.Name {
		return w
	}
	return nil
}

// awaitPodWorkload is podWorkload, waiting up to StateWait for a pod the
// state does not hold yet.
func (p *Proxy) awaitPodWorkload(ctx context.Context, pod *Pod, addr netip.Addr) *state.Workload {
	return p.awaitWorkload(ctx, func() *state.Workload { return p.podWorkload(pod, addr) })
}

// awaitWorkload returns what lookup finds in the state, waiting up to
// StateWait while it finds nothing: a workload that has just started may
// reach ztunnel before its xDS update does.
func (p *Proxy) awaitWorkload(ctx context.Context, lookup func() *state.Workload) *state.Workload {
	if w := lookup(); w != nil {
		return w
	}
	ctx, cancel := context.WithTimeout(ctx, p.cfg.StateWait)
	defer cancel()
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
			if w := lookup(); w != nil {
				return w
			}
		}
	}
}

// track registers a client connection being carried; false once the
// proxy is closed.
func (p *Proxy) track(c net.Conn) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return false
	}
	p.conns[c] = struct{}{}
	p.wg.Add(1)
	return true
}

func (p *Proxy) untrack(c net.Conn) {
	p.mu.Lock()
	delete(p.conns, c)
	p.mu.Unlock()
	p.wg.Done()
}

// carry takes on c, a connection accepted for pod: it tracks c and counts
// it in pod's stats, in total and open in the gauge open picks. It returns
// the stats and end, which undoes that and closes c; when the proxy is
// closed it resets c and returns nil stats.
func (p *Proxy) carry(pod *Pod, c net.Conn, open func(*podConnStats) *atomic.Int64) (st *podConnStats, end func()) {
	if !p.track(c) {
		resetOnClose(c)
		c.Close()
		return nil, nil
	}
	st = p.podStats(pod.UID)
	gauge := open(st)
	gauge.Add(1)
	st.total.Add(1)
	return st, func() {
		gauge.Add(-1)
		p.untrack(c)
		c.Close()
	}
}

// podStats returns uid's counters, creating them.
func (p *Proxy) podStats(uid string) *podConnStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	s := p.stats[uid]
	if s == nil {
		s = &podConnStats{}
		p.stats[uid] = s
	}
	return s
}

// Stats returns the connection state of every pod seen, by uid.
func (p *Proxy) Stats() []ConnStats {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make([]ConnStats, 0, len(p.stats))
	for uid, s := range p.stats {
		out = append(out, ConnStats{
			UID: uid, Outbound: s.outbound.Load(), InboundPlaintext: s.inbound.Load(),
			InboundHBONE: s.hbone.Load(), Total: s.total.Load(), Denied: s.denied.Load(),
		})
	}
	sort.Slice(out, func(i, j int) bool { return out[i].UID < out[j].UID })
	return out
}

// Forget drops what the proxy holds for pods not in keep (their HBONE
// servers and counters): call it when pods leave the node.
func (p *Proxy) Forget(keep map[string]bool) {
	p.mu.Lock()
	var gone []*podServer
	for uid, s := range p.servers {
		if !keep[uid] {
			gone = append(gone, s)
			delete(p.servers, uid)
		}
	}
	for uid := range p.stats {
		if !keep[uid] {
			delete(p.stats, uid)
		}
	}
	p.mu.Unlock()
	for _, s := range gone {
		// Streams still open end by themselves; new ones cannot arrive
		// once the pod's listeners are gone.
		go s.srv.Shutdown(context.Background())
	}
}

// Shutdown stops taking connections and waits for those open to end until
// ctx is done, then closes what is left. HBONE clients are told (GOAWAY) to
// open new streams elsewhere.
func (p *Proxy) Shutdown(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	servers := make([]*podServer, 0, len(p.servers))
	for _, s := range p.servers {
		servers = append(servers, s)
	}
	p.mu.Unlock()

	var wg sync.WaitGroup
	errs := make([]error, len(servers)+1)
	for i, s := range servers {
		wg.Go(func() { errs[i] = s.srv.Shutdown(ctx) })
	}
	done := make(chan struct{})
	go func() { p.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
		errs[len(servers)] = fmt.Errorf("draining connections: %w", ctx.Err())
	}
	wg.Wait()
	return errors.Join(append(errs, p.Close())...)
}

// Close closes every connection and HBONE server at once. It is safe to
// call twice.
func (p *Proxy) Close() error {
	p.mu.Lock()
	p.closed = true
	servers := p.servers
	p.servers = map[string]*podServer{}
	for c := range p.conns {
		c.Close()
	}
	p.mu.Unlock()
	var errs []error
	for _, s := range servers {
		errs = append(errs, s.srv.Close())
	}
	errs = append(errs, p.pool.Close())
	p.wg.Wait()
	return errors.Join(errs...)
}

// addrOf is a connection address as an AddrPort (IPv4 unmapped).
func addrOf(a net.Addr) netip.AddrPort {
	if ta, ok := a.(*net.TCPAddr); ok {
		ap := ta.AddrPort()
		return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	}
	ap, _ := netip.ParseAddrPort(a.String())
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// resetOnClose makes the next Close send a RST, as a refused connection
// should end.
func resetOnClose(c net.Conn) {
	if tc, ok := tcpConn(c); ok {
		tc.SetLinger(0)
	}
}
