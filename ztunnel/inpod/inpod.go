package inpod

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// Defaults for Config.
const (
	DefaultReconnectMin = 100 * time.Millisecond
	DefaultReconnectMax = 5 * time.Second
)

var (
	// ErrClosed is returned for work asked of a closed Manager.
	ErrClosed = errors.New("inpod manager closed")
	// ErrDraining acks adds that arrive after Drain: the pod would get
	// listeners that are about to go, so the agent must hand it to the
	// ztunnel that replaces this one (or fail the pod closed).
	ErrDraining = errors.New("ztunnel draining")
	// ErrWorkloadGone is returned by Dial for a workload that is no longer
	// served and has no connection left holding its netns open.
	ErrWorkloadGone = errors.New("workload no longer served")
)

// Workload is an enrolled pod as the handlers see it. Its exported fields
// never change once a handler has seen it.
type Workload struct {
	UID, Name, Namespace, ServiceAccount string
	// NetNS is the pod's network namespace. For a workload the Manager
	// serves, it stays open while the pod is served and while any of its
	// connections or dials is in flight; do not close it.
	NetNS *os.File

	// p is the Manager's record of the pod; nil for a Workload built by a
	// caller, whose NetNS is then the caller's to keep open.
	p *pod
}

// Handlers receive the connections accepted inside pods. Each runs on a
// goroutine of its own, and the connection is closed when it returns. A nil
// handler closes its connections at once.
type Handlers struct {
	// Outbound gets connections captured on 15001: the pod's app dialling
	// origDst.
	Outbound func(w *Workload, c net.Conn, origDst netip.AddrPort)
	// Inbound gets plaintext captured on 15006: a client outside the mesh
	// dialling the pod at origDst.
	Inbound func(w *Workload, c net.Conn, origDst netip.AddrPort)
	// HBONE gets connections on 15008; TLS is the handler's job.
	HBONE func(w *Workload, c net.Conn)
}

// Config configures a Manager.
type Config struct {
	// ZDSSocket is the node agent's socket; empty means zds.SocketPath.
	ZDSSocket string
	Handlers  Handlers
	// Log receives the manager's log; nil discards it.
	Log *slog.Logger
	// ReconnectMin and ReconnectMax bound the back-off between attempts to
	// reach the agent: it doubles from the first up to the second and starts
	// again once a connection got as far as the hello. Zero means the
	// defaults.
	ReconnectMin, ReconnectMax time.Duration
}

// Manager serves the pods the node agent hands over.
//
// Only the ZDS goroutine (Run) adds, replaces and removes pods, so it opens
// and closes listeners outside mu without racing another writer; Drain and
// Close take every pod out of the map under mu and close them outside it.
type Manager struct {
	cfg Config
	log *slog.Logger

	// connected: a ZDS connection got past its hello; snapshot: and its
	// SnapshotSent arrived; draining: Drain was called.
	connected, snapshot, draining atomic.Bool

	// Counters for ZDS().
	connects, acksOK, acksErr, protocolErrors atomic.Uint64

	// mu guards pods, every pod's seenConn, conn, stopped and
	// lastProtocolError.
	mu                sync.Mutex
	pods              map[string]*pod
	conn              *net.UnixConn // current ZDS connection; nil between connections
	stopped           bool          // Drain or Close: no new pods, no new accept loops
	lastProtocolError string

	// wg counts accept loops and the handlers they start. Accept loops are
	// added under mu while !stopped, and an accept loop adds its handlers
	// while holding its own count, so Drain's Wait never races an Add from
	// zero.
	wg sync.WaitGroup

	done      chan struct{} // closed by Close; ends Run
	closeOnce sync.Once
}

// New returns a Manager; Run connects it to the agent.
func New(cfg Config) *Manager {
	if cfg.ZDSSocket == "" {
		cfg.ZDSSocket = zdsapi.SocketPath
	}
	if cfg.ReconnectMin <= 0 {
		cfg.ReconnectMin = DefaultReconnectMin
	}
	if cfg.ReconnectMax < cfg.ReconnectMin {
		cfg.ReconnectMax = max(DefaultReconnectMax, cfg.ReconnectMin)
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	return &Manager{
		cfg:  cfg,
		log:  cfg.Log,
		pods: make(map[string]*pod),
		done: make(chan struct{}),
	}
}

// Ready reports whether the manager is connected to the agent, has received
// the agent's snapshot on that connection and is not draining.
func (m *Manager) Ready() bool {
	return m.snapshot.Load() && !m.draining.Load()
}

// Run stays connected to the node agent, reconnecting with back-off when the
// connection fails or ends, until ctx is done or Close is called; both are a
// clean exit (nil). The pods served stay up across reconnections (the next
// snapshot reconciles them) and after Run returns, until Drain or Close.
// Call Run once.
func (m *Manager) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-m.done:
			cancel()
		case <-ctx.Done():
		}
	}()
	m.runZDS(ctx)
	return nil
}

// Drain stops accepting: it closes every pod's listeners (so a ztunnel that
// replaces this one takes new connections on the same ports) and refuses
// further adds, then waits until the handlers of the connections already
// accepted have returned, or ctx is done (its error is returned then). The
// connection to the agent stays, so deletes still arrive.
func (m *Manager) Drain(ctx context.Context) error {
	m.draining.Store(true)
	m.stopAccepting()
	idle := make(chan struct{})
	go func() {
		m.wg.Wait()
		close(idle)
	}()
	select {
	case <-idle:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Close stops accepting like Drain, disconnects from the agent and ends
// Run, without waiting for connections. Safe to call more than once.
func (m *Manager) Close() error {
	m.closeOnce.Do(func() {
		close(m.done)
		m.stopAccepting()
		m.mu.Lock()
		if m.conn != nil {
			m.conn.Close()
		}
		m.mu.Unlock()
	})
	return nil
}

// stopAccepting takes every pod out of service and refuses new ones.
func (m *Manager) stopAccepting() {
	m.mu.Lock()
	m.stopped = true
	ps := m.pods
	m.pods = make(map[string]*pod)
	m.mu.Unlock()
	for _, p := range ps {
		p.retire()
	}
	if len(ps) > 0 {
		m.log.Info("stopped accepting", "workloads", len(ps))
	}
}

// Dial connects to addr ("ip:port"; network "tcp", "tcp4" or "tcp6") from
// inside w's network namespace, with a socket marked 0x539 so that the pod's
// redirection lets it out: the way to reach the pod's app on its own IP, or
// a peer as the pod. The connect itself runs outside the namespace, so a
// slow peer ties up no locked OS thread.
func (m *Manager) Dial(ctx context.Context, w *Workload, network, addr string) (net.Conn, error) {
	return m.dial(ctx, w, netip.Addr{}, network, addr)
}

// DialFrom is Dial from the foreign address src (a port chosen by the
// kernel): the way ztunnel connects an inbound connection to the pod's app
// as the client that opened it, so that the app sees the client's address
// as its peer, as with Istio's ambient mesh. The socket keeps mark 0x539
// and is IP_TRANSPARENT (IPV6_TRANSPARENT), which lets it bind an address
// the pod does not own, and bound to lo: the connection arrives on lo, as
// the pod's own connections to its address do, so the eBPF engine's
// sk_lookup program leaves it to the app instead of capturing it as
// inbound plaintext (it tells the network from the pod by the interface a
// connection arrives on). The pod's redirection routes the marked, lo-bound
// connection into the pod's own stack and the app's replies to src back to
// this socket (cni-plugin/internal/redirect: both engines do). src must
// pass CheckSource against addr's address; ErrUnusableSource otherwise.
func (m *Manager) DialFrom(ctx context.Context, w *Workload, src netip.Addr, network, addr string) (net.Conn, error) {
	if !src.IsValid() {
		return nil, &net.OpError{Op: "dial", Net: network, Err: fmt.Errorf("%w: no address", ErrUnusableSource)}
	}
	return m.dial(ctx, w, src, network, addr)
}

// dial is Dial from src, or from an address the kernel picks when src is
// invalid.
func (m *Manager) dial(ctx context.Context, w *Workload, src netip.Addr, network, addr string) (net.Conn, error) {
	if w == nil || w.NetNS == nil {
		return nil, errors.New("dialing from a workload without a netns")
	}
	if w.p != nil {
		if !w.p.acquire() {
			return nil, ErrWorkloadGone
		}
		defer w.p.release()
	}
	return dialInNetns(ctx, w.NetNS, network, addr, src)
}

// WorkloadStatus is one served pod, for /config_dump.
type WorkloadStatus struct {
	UID               string           `json:"uid"`
	Workload          string           `json:"workload"` // namespace/name
	Namespace         string           `json:"namespace"`
	Name              string           `json:"name"`
	ServiceAccount    string           `json:"serviceAccount,omitempty"`
	Redirection       string           `json:"redirection"` // RedirectionEBPF or RedirectionNAT
	NetnsInode        uint64           `json:"netnsInode"`
	Added             time.Time        `json:"added"`
	ActiveConnections int64            `json:"activeConnections"`
	Listeners         []ListenerStatus `json:"listeners"`
}

// ListenerStatus is one listener of a served pod.
type ListenerStatus struct {
	Port     int    `json:"port"`
	Address  string `json:"address"`
	Accepted uint64 `json:"accepted"`
	Active   int64  `json:"active"`
}

// Workloads reports the pods served, sorted by uid.
func (m *Manager) Workloads() []WorkloadStatus {
	m.mu.Lock()
	ps := slices.Collect(maps.Values(m.pods))
	m.mu.Unlock()
	slices.SortFunc(ps, func(a, b *pod) int { return strings.Compare(a.w.UID, b.w.UID) })
	out := make([]WorkloadStatus, 0, len(ps))
	for _, p := range ps {
		out = append(out, p.status())
	}
	return out
}

// ZDSStatus is the state of the connection to the agent.
type ZDSStatus struct {
	Socket            string `json:"socket"`
	Connected         bool   `json:"connected"`
	SnapshotReceived  bool   `json:"snapshotReceived"`
	Draining          bool   `json:"draining"`
	Connects          uint64 `json:"connects"`
	AcksOK            uint64 `json:"acksOK"`
	AcksError         uint64 `json:"acksError"`
	ProtocolErrors    uint64 `json:"protocolErrors"`
	LastProtocolError string `json:"lastProtocolError,omitempty"`
}

// ZDS reports the state of the connection to the agent.
func (m *Manager) ZDS() ZDSStatus {
	m.mu.Lock()
	last := m.lastProtocolError
	m.mu.Unlock()
	return ZDSStatus{
		Socket:            m.cfg.ZDSSocket,
		Connected:         m.connected.Load(),
		SnapshotReceived:  m.snapshot.Load(),
		Draining:          m.draining.Load(),
		Connects:          m.connects.Load(),
		AcksOK:            m.acksOK.Load(),
		AcksError:         m.acksErr.Load(),
		ProtocolErrors:    m.protocolErrors.Load(),
		LastProtocolError: last,
	}
}
