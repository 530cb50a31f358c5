package standin

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// Defaults for Config.
const (
	DefaultAdminAddr    = "127.0.0.1:15000"
	DefaultReconnectMin = 100 * time.Millisecond
	DefaultReconnectMax = 5 * time.Second
)

// ErrClosed is returned once the stand-in has been closed.
var ErrClosed = errors.New("ztunnel stand-in closed")

// Config configures a StandIn. Zero values take the defaults.
type Config struct {
	// ZDSSocket is the node agent's ZDS socket (zds.SocketPath).
	ZDSSocket string
	// AdminAddr is where /workloads, /zds and /healthz/ready are served, in
	// the stand-in's own (the node's) network namespace.
	AdminAddr string
	// ReconnectMin and ReconnectMax bound the back-off between attempts to
	// reach the agent; it doubles from the first up to the second, and
	// starts again after a connection got as far as the hello.
	ReconnectMin, ReconnectMax time.Duration
	Logger                     *slog.Logger
}

func (c *Config) setDefaults() {
	if c.ZDSSocket == "" {
		c.ZDSSocket = zdsapi.SocketPath
	}
	if c.AdminAddr == "" {
		c.AdminAddr = DefaultAdminAddr
	}
	if c.ReconnectMin <= 0 {
		c.ReconnectMin = DefaultReconnectMin
	}
	if c.ReconnectMax < c.ReconnectMin {
		c.ReconnectMax = max(DefaultReconnectMax, c.ReconnectMin)
	}
	if c.Logger == nil {
		c.Logger = slog.New(slog.DiscardHandler)
	}
}

// StandIn is the ztunnel stand-in: a ZDS client, the listeners of every
// workload it serves, and the admin endpoint.
//
// Only the ZDS goroutine (Run) adds, replaces and removes workloads, so a
// workload's listeners are opened and closed outside mu without racing
// another writer; mu only makes the map and the seen marks safe to read from
// the admin handlers and Close.
type StandIn struct {
	cfg     Config
	log     *slog.Logger
	adminLn net.Listener
	admin   *http.Server

	// connected: a ZDS connection has sent its hello; ready: and its
	// snapshot has been received.
	connected atomic.Bool
	ready     atomic.Bool

	// Counters shown on /zds.
	connects, acksOK, acksErr, protocolErrors atomic.Uint64

	// mu guards workloads, every workload's seenConn, conn, closed and
	// lastProtocolError.
	mu                sync.Mutex
	workloads         map[string]*workload
	conn              *net.UnixConn // the current ZDS connection, nil between connections
	closed            bool
	lastProtocolError string

	done      chan struct{} // closed by Close
	closeOnce sync.Once
	wg        sync.WaitGroup // accept loops and reply handlers
}

// New checks cfg and binds the admin address; Run does the rest.
func New(cfg Config) (*StandIn, error) {
	cfg.setDefaults()
	ln, err := net.Listen("tcp", cfg.AdminAddr)
	if err != nil {
		return nil, fmt.Errorf("listening for admin on %s: %w", cfg.AdminAddr, err)
	}
	s := &StandIn{
		cfg:       cfg,
		log:       cfg.Logger,
		adminLn:   ln,
		workloads: make(map[string]*workload),
		done:      make(chan struct{}),
	}
	s.admin = &http.Server{Handler: s.adminHandler(), ReadHeaderTimeout: 5 * time.Second}
	return s, nil
}

// AdminAddr is the address the admin endpoint listens on.
func (s *StandIn) AdminAddr() net.Addr { return s.adminLn.Addr() }

// Ready reports whether the stand-in is connected to the agent and has
// received the agent's snapshot on that connection.
func (s *StandIn) Ready() bool { return s.ready.Load() }

// Run serves the admin endpoint and stays connected to the node agent,
// reconnecting when it goes away, until ctx is done or Close is called;
// both are a clean exit. Run closes the stand-in when it returns.
func (s *StandIn) Run(ctx context.Context) error {
	defer s.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-s.done:
			cancel()
		case <-ctx.Done():
		}
	}()

	adminErr := make(chan error, 1)
	go func() {
		err := s.admin.Serve(s.adminLn)
		if errors.Is(err, http.ErrServerClosed) {
			err = nil
		} else {
			err = fmt.Errorf("serving admin: %w", err)
		}
		adminErr <- err
		cancel()
	}()

	s.runZDS(ctx)
	s.admin.Close()
	return <-adminErr
}

// Close disconnects from the agent, closes every workload's listeners and
// the admin endpoint, and waits for replies in flight. Safe to call more
// than once.
func (s *StandIn) Close() error {
	s.closeOnce.Do(func() {
		close(s.done)
		s.mu.Lock()
		s.closed = true
		ws := s.workloads
		s.workloads = map[string]*workload{}
		if s.conn != nil {
			s.conn.Close()
		}
		s.mu.Unlock()
		s.ready.Store(false)
		for _, w := range ws {
			w.close()
		}
		s.admin.Close()
	})
	s.wg.Wait()
	return nil
}

// addWorkload serves a pod whose network namespace is nsFD (owned by the
// caller). A pod already served in the same namespace keeps its listeners; in
// another namespace (a recreated sandbox) it gets new ones. Called only from
// the ZDS goroutine.
func (s *StandIn) addWorkload(connID uint64, uid string, info *zdsapi.WorkloadInfo, nsFD int) error {
	ns, err := netnsOf(nsFD)
	if err != nil {
		return fmt.Errorf("netns of %s: %w", uid, err)
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	cur := s.workloads[uid]
	if cur != nil && cur.netns == ns {
		cur.seenConn = connID
		s.mu.Unlock()
		// The agent may have re-attached with fresh pins, or switched
		// engines; putting the same sockets in again is harmless.
		if err := cur.register(); err != nil {
			return err
		}
		s.log.Info("workload kept", "uid", uid, "workload", cur.key(), "redirection", cur.redirection(), "reason", "added again in the same netns")
		return nil
	}
	s.mu.Unlock()

	w := newWorkload(uid, info, ns)
	lns, err := openListeners(nsFD)
	if err != nil {
		return fmt.Errorf("listeners of %s: %w", uid, err)
	}
	for _, l := range lns {
		w.listeners = append(w.listeners, &listener{port: l.Addr().(*net.TCPAddr).Port, ln: l})
	}
	if err := w.register(); err != nil {
		w.close()
		return err
	}
	w.seenConn = connID

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		w.close()
		return ErrClosed
	}
	old := s.workloads[uid]
	s.workloads[uid] = w
	// Counted under mu so Close, which takes mu first, waits for them.
	s.wg.Add(len(w.listeners))
	s.mu.Unlock()

	if old != nil {
		old.close()
	}
	for _, l := range w.listeners {
		go s.serve(w, l)
	}
	ports := make([]string, 0, len(w.listeners))
	for _, l := range w.listeners {
		ports = append(ports, l.ln.Addr().String())
	}
	s.log.Info("workload added", "uid", uid, "workload", w.key(), "redirection", w.redirection(),
		"netns_inode", ns.Ino, "listeners", strings.Join(ports, ","), "replaced", old != nil)
	return nil
}

// delWorkload stops serving a pod; an unknown pod is not an error.
func (s *StandIn) delWorkload(uid string) {
	s.mu.Lock()
	w := s.workloads[uid]
	delete(s.workloads, uid)
	s.mu.Unlock()
	if w == nil {
		s.log.Info("workload deleted", "uid", uid, "known", false)
		return
	}
	w.close()
	s.log.Info("workload deleted", "uid", uid, "workload", w.key())
}

// keepWorkload marks a pod the agent could not hand over again as still
// wanted.
func (s *StandIn) keepWorkload(connID uint64, uid string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.workloads[uid]
	if w == nil {
		return fmt.Errorf("keep of unknown workload %s", uid)
	}
	w.seenConn = connID
	return nil
}

// snapshotDone drops the pods the current connection's snapshot left out.
func (s *StandIn) snapshotDone(connID uint64) {
	s.mu.Lock()
	var stale []*workload
	for uid, w := range s.workloads {
		if w.seenConn != connID {
			stale = append(stale, w)
			delete(s.workloads, uid)
		}
	}
	n := len(s.workloads)
	s.mu.Unlock()
	for _, w := range stale {
		w.close()
		s.log.Info("workload deleted", "uid", w.uid, "workload", w.key(), "reason", "not in snapshot")
	}
	s.log.Info("snapshot received", "workloads", n, "dropped", len(stale))
}

// Workloads reports the workloads served, sorted by uid.
func (s *StandIn) Workloads() []WorkloadStatus {
	s.mu.Lock()
	ws := slices.Collect(maps.Values(s.workloads))
	s.mu.Unlock()
	slices.SortFunc(ws, func(a, b *workload) int { return strings.Compare(a.uid, b.uid) })
	out := make([]WorkloadStatus, 0, len(ws))
	for _, w := range ws {
		out = append(out, w.status())
	}
	return out
}
