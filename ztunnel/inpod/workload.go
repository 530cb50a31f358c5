package inpod

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime/debug"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// Redirection engines as the manager sees them.
const (
	// RedirectionEBPF: the pod's pinned SOCKMAP exists and holds our
	// listeners; the original destination is the accepted socket's local
	// address.
	RedirectionEBPF = "ebpf"
	// RedirectionNAT: no pins for the pod, so the nftables engine is
	// assumed; the original destination comes from SO_ORIGINAL_DST when
	// conntrack has one, else the local address.
	RedirectionNAT = "nftables"
)

// acceptBackoffMax bounds the pause after a failed accept (out of
// descriptors or memory), so the loop does not spin.
const acceptBackoffMax = time.Second

// pod is one workload the agent handed over. Its fields are set before it
// is published in Manager.pods and not changed afterwards, except seenConn
// (guarded by Manager.mu), refs (guarded by refMu) and the atomics.
type pod struct {
	w         Workload // w.p points back here
	netns     nsID
	added     time.Time
	listeners []*listener // in listenerSpecs order: 15001, 15006, 15008

	// ebpf is set while the pod's pinned SOCKMAP holds our listeners. An
	// add of the same pod in the same netns registers again and may flip
	// it (the agent restarted with the other engine).
	ebpf atomic.Bool

	// active counts connections whose handler is running.
	active atomic.Int64

	// seenConn is the ZDS connection that last added or kept the pod;
	// SnapshotSent drops those the current connection has not. Guarded by
	// Manager.mu.
	seenConn uint64

	// refMu guards refs. refs is 1 while the pod is served, plus one per
	// running handler and per Dial in flight; w.NetNS is closed when it
	// drops to 0, and then refs stays at -1 so nothing acquires it again.
	refMu sync.Mutex
	refs  int
}

// listenerKind says what a listener captures.
type listenerKind int

const (
	kindOutbound listenerKind = iota // 15001
	kindInbound                      // 15006
	kindHBONE                        // 15008
)

// listener is one of ztunnel's listeners inside a pod.
type listener struct {
	kind     listenerKind
	port     int
	ln       *net.TCPListener
	accepted atomic.Uint64
	active   atomic.Int64
}

func newPod(uid string, info *zdsapi.WorkloadInfo, ns *os.File, id nsID) *pod {
	p := &pod{netns: id, added: time.Now(), refs: 1}
	p.w = Workload{
		UID:            uid,
		Name:           info.GetName(),
		Namespace:      info.GetNamespace(),
		ServiceAccount: info.GetServiceAccount(),
		NetNS:          ns,
		p:              p,
	}
	return p
}

func (p *pod) key() string { return p.w.Namespace + "/" + p.w.Name }

func (p *pod) redirection() string {
	if p.ebpf.Load() {
		return RedirectionEBPF
	}
	return RedirectionNAT
}

// acquire takes a reference that keeps w.NetNS open; false once it is
// closed.
func (p *pod) acquire() bool {
	p.refMu.Lock()
	defer p.refMu.Unlock()
	if p.refs <= 0 {
		return false
	}
	p.refs++
	return true
}

// release drops a reference and closes w.NetNS with the last one.
func (p *pod) release() {
	p.refMu.Lock()
	p.refs--
	last := p.refs == 0
	if last {
		p.refs = -1
	}
	p.refMu.Unlock()
	if last {
		p.w.NetNS.Close()
	}
}

// retire takes the pod out of service: its listeners close (their accept
// loops end by themselves) and it drops the reference it held while
// served. Connections already accepted carry on. Call once.
func (p *pod) retire() {
	for _, l := range p.listeners {
		l.ln.Close()
	}
	p.release()
}

// register puts the outbound and inbound listeners into the eBPF engine's
// map for the pod when it has one.
func (p *pod) register() error {
	ok, err := registerSockets(p.w.UID, p.listeners[0].ln, p.listeners[1].ln)
	if err != nil {
		return err
	}
	p.ebpf.Store(ok)
	return nil
}

func (p *pod) status() WorkloadStatus {
	st := WorkloadStatus{
		UID:               p.w.UID,
		Workload:          p.key(),
		Namespace:         p.w.Namespace,
		Name:              p.w.Name,
		ServiceAccount:    p.w.ServiceAccount,
		Redirection:       p.redirection(),
		NetnsInode:        p.netns.Ino,
		Added:             p.added,
		ActiveConnections: p.active.Load(),
	}
	for _, l := range p.listeners {
		st.Listeners = append(st.Listeners, ListenerStatus{
			Port:     l.port,
			Address:  l.ln.Addr().String(),
			Accepted: l.accepted.Load(),
			Active:   l.active.Load(),
		})
	}
	return st
}

// addWorkload serves a pod whose network namespace is ns, which it takes
// over (closing it when it is not kept). A pod already served in the same
// namespace keeps its listeners; in another namespace (a recreated sandbox)
// it gets new ones and the old ones close. It returns once the listeners are
// up, so the ack that follows tells the agent the pod is served. Called only
// from the ZDS goroutine.
func (m *Manager) addWorkload(connID uint64, uid string, info *zdsapi.WorkloadInfo, ns *os.File) (err error) {
	keepNS := false
	defer func() {
		if !keepNS {
			ns.Close()
		}
	}()
	id, err := netnsOf(ns)
	if err != nil {
		return fmt.Errorf("netns of %s: %w", uid, err)
	}

	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		return m.stoppedErr()
	}
	cur := m.pods[uid]
	if cur != nil && cur.netns == id {
		cur.seenConn = connID
		m.mu.Unlock()
		// The agent may have re-attached with fresh pins or switched
		// engines; putting the same sockets in again is harmless.
		if err := cur.register(); err != nil {
			return err
		}
		m.log.Info("workload kept", "uid", uid, "workload", cur.key(), "redirection", cur.redirection(), "reason", "added again in the same netns")
		return nil
	}
	m.mu.Unlock()

	p := newPod(uid, info, ns, id)
	lns, err := openListeners(ns)
	if err != nil {
		return fmt.Errorf("listeners of %s: %w", uid, err)
	}
	for i, l := range lns {
		p.listeners = append(p.listeners, &listener{kind: listenerSpecs[i].kind, port: l.Addr().(*net.TCPAddr).Port, ln: l})
	}
	// From here the pod owns ns: retire closes the listeners and, through
	// its reference, the netns.
	keepNS = true
	if err := p.register(); err != nil {
		p.retire()
		return err
	}
	p.seenConn = connID

	m.mu.Lock()
	if m.stopped {
		m.mu.Unlock()
		p.retire()
		return m.stoppedErr()
	}
	old := m.pods[uid]
	m.pods[uid] = p
	// Counted under mu so Drain, which sets stopped under mu first, waits
	// for them.
	m.wg.Add(len(p.listeners))
	m.mu.Unlock()

	if old != nil {
		old.retire()
	}
	for _, l := range p.listeners {
		go m.serve(p, l)
	}
	addrs := make([]string, 0, len(p.listeners))
	for _, l := range p.listeners {
		addrs = append(addrs, l.ln.Addr().String())
	}
	m.log.Info("workload added", "uid", uid, "workload", p.key(), "redirection", p.redirection(),
		"netns_inode", id.Ino, "listeners", strings.Join(addrs, ","), "replaced", old != nil)
	return nil
}

func (m *Manager) stoppedErr() error {
	if m.draining.Load() {
		return ErrDraining
	}
	return ErrClosed
}

// delWorkload stops serving a pod; its connections carry on. An unknown pod
// is not an error.
func (m *Manager) delWorkload(uid string) {
	m.mu.Lock()
	p := m.pods[uid]
	delete(m.pods, uid)
	m.mu.Unlock()
	if p == nil {
		m.log.Info("workload deleted", "uid", uid, "known", false)
		return
	}
	p.retire()
	m.log.Info("workload deleted", "uid", uid, "workload", p.key(), "active_connections", p.active.Load())
}

// keepWorkload marks a pod the agent could not hand over again as still
// wanted.
func (m *Manager) keepWorkload(connID uint64, uid string) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pods[uid]
	if p == nil {
		return fmt.Errorf("keep of unknown workload %s", uid)
	}
	p.seenConn = connID
	return nil
}

// snapshotDone drops the pods the current connection's snapshot left out.
func (m *Manager) snapshotDone(connID uint64) {
	m.mu.Lock()
	var stale []*pod
	for uid, p := range m.pods {
		if p.seenConn != connID {
			stale = append(stale, p)
			delete(m.pods, uid)
		}
	}
	n := len(m.pods)
	m.mu.Unlock()
	for _, p := range stale {
		p.retire()
		m.log.Info("workload deleted", "uid", p.w.UID, "workload", p.key(), "reason", "not in snapshot")
	}
	m.log.Info("snapshot received", "workloads", n, "dropped", len(stale))
}

// serve accepts connections until the listener is closed. It runs counted in
// m.wg, so the handlers it starts are counted there too.
func (m *Manager) serve(p *pod, l *listener) {
	defer m.wg.Done()
	var delay time.Duration
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			delay = min(max(2*delay, 5*time.Millisecond), acceptBackoffMax)
			m.log.Warn("accepting connection", "uid", p.w.UID, "workload", p.key(), "listener", l.port, "error", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		if !p.acquire() {
			// Retired and its last connection gone between the accept
			// and here: the netns is closed, so nothing could serve it.
			c.Close()
			continue
		}
		l.accepted.Add(1)
		l.active.Add(1)
		p.active.Add(1)
		m.wg.Add(1)
		go m.handleConn(p, l, c)
	}
}

// handleConn hands one accepted connection to its handler and cleans up
// after it.
func (m *Manager) handleConn(p *pod, l *listener, c *net.TCPConn) {
	defer func() {
		if r := recover(); r != nil {
			m.log.Error("connection handler panicked", "uid", p.w.UID, "workload", p.key(), "listener", l.port,
				"panic", fmt.Sprint(r), "stack", string(debug.Stack()))
		}
		c.Close()
		l.active.Add(-1)
		p.active.Add(-1)
		p.release()
		m.wg.Done()
	}()
	h := m.cfg.Handlers
	switch l.kind {
	case kindOutbound, kindInbound:
		handler := h.Outbound
		if l.kind == kindInbound {
			handler = h.Inbound
		}
		if handler == nil {
			return
		}
		handler(&p.w, c, originalDst(c, !p.ebpf.Load()))
	case kindHBONE:
		if h.HBONE != nil {
			h.HBONE(&p.w, c)
		}
	}
}

// unmappedAddr returns a TCP address with an IPv4-mapped IPv6 address
// turned into plain IPv4 (what a dual-stack listener reports for IPv4
// clients).
func unmappedAddr(a net.Addr) netip.AddrPort {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}
