package standin

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"sync/atomic"
	"time"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// Redirection engines as the stand-in sees them.
const (
	// RedirectionEBPF: the pod's pinned SOCKMAP existed and holds our
	// listeners; the original destination is the accepted socket's local
	// address.
	RedirectionEBPF = "ebpf"
	// RedirectionNAT: no pins for the pod, so the nftables engine is assumed;
	// the original destination comes from SO_ORIGINAL_DST when conntrack
	// has one.
	RedirectionNAT = "nftables"
)

// replyTimeout bounds writing the reply line and waiting for the client to
// close its side.
const replyTimeout = 5 * time.Second

// workload is one pod the agent handed over. Its fields are set before it is
// published in StandIn.workloads and not changed afterwards, except seenConn
// (guarded by StandIn.mu) and the atomics.
type workload struct {
	uid       string
	namespace string
	name      string
	sa        string
	netns     nsID
	added     time.Time
	listeners []*listener // in listenerSpecs order: 15001, 15006, 15008

	// ebpf is set while the pod's pinned SOCKMAP holds our listeners. An add
	// of the same pod in the same netns registers again and may flip it (the
	// agent restarted with the other engine).
	ebpf atomic.Bool

	// seenConn is the number of the ZDS connection that last added or kept
	// the workload; SnapshotSent drops those the current connection has not.
	// Guarded by StandIn.mu.
	seenConn uint64
}

func newWorkload(uid string, info *zdsapi.WorkloadInfo, ns nsID) *workload {
	return &workload{
		uid:       uid,
		namespace: info.GetNamespace(),
		name:      info.GetName(),
		sa:        info.GetServiceAccount(),
		netns:     ns,
		added:     time.Now(),
	}
}

func (w *workload) key() string { return w.namespace + "/" + w.name }

func (w *workload) redirection() string {
	if w.ebpf.Load() {
		return RedirectionEBPF
	}
	return RedirectionNAT
}

// register puts the outbound and inbound listeners into the eBPF engine's
// map for the pod when it has one.
func (w *workload) register() error {
	ok, err := registerSockets(w.uid, w.listeners[0].ln, w.listeners[1].ln)
	if err != nil {
		return err
	}
	w.ebpf.Store(ok)
	return nil
}

// close closes the workload's listeners; their accept loops end by
// themselves. Connections already accepted finish their reply.
func (w *workload) close() {
	for _, l := range w.listeners {
		l.ln.Close()
	}
}

// listener is one of ztunnel's listeners inside a pod.
type listener struct {
	port  int
	ln    *net.TCPListener
	conns atomic.Uint64 // connections accepted
}

// serve accepts connections until the listener is closed. It runs counted in
// s.wg, so the handlers it starts may be counted there too.
func (s *StandIn) serve(w *workload, l *listener) {
	defer s.wg.Done()
	var delay time.Duration
	for {
		c, err := l.ln.AcceptTCP()
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return
			}
			// Out of descriptors or memory: back off rather than spin.
			delay = min(max(2*delay, 5*time.Millisecond), time.Second)
			s.log.Warn("accepting connection", "uid", w.uid, "workload", w.key(), "listener", l.port, "error", err, "retry_in", delay)
			time.Sleep(delay)
			continue
		}
		delay = 0
		l.conns.Add(1)
		s.wg.Add(1)
		go func() {
			defer s.wg.Done()
			s.reply(w, l, c)
		}()
	}
}

// reply answers one connection with the line that tells the test where it
// landed, then closes it gracefully: the client may have sent bytes we never
// read, and closing with them unread would reset the connection and could
// discard the reply before the client reads it.
func (s *StandIn) reply(w *workload, l *listener, c *net.TCPConn) {
	defer c.Close()
	orig, fromNAT := originalDst(c, !w.ebpf.Load())
	peer := unmappedAddr(c.RemoteAddr())
	line := ReplyLine(w.key(), l.port, orig, peer)

	source := "local address"
	if fromNAT {
		source = "SO_ORIGINAL_DST"
	}
	s.log.Info("connection", "uid", w.uid, "workload", w.key(), "listener", l.port,
		"original", orig.String(), "original_from", source, "peer", peer.String())

	c.SetDeadline(time.Now().Add(replyTimeout))
	if _, err := io.WriteString(c, line); err != nil {
		s.log.Debug("writing reply", "uid", w.uid, "listener", l.port, "peer", peer.String(), "error", err)
		return
	}
	if err := c.CloseWrite(); err != nil {
		return
	}
	_, _ = io.Copy(io.Discard, io.LimitReader(c, 1<<20))
}

// ReplyLine is what the stand-in answers on every connection, newline
// included.
func ReplyLine(workload string, listener int, original, peer netip.AddrPort) string {
	return fmt.Sprintf("standin workload=%s listener=%d original=%s peer=%s\n", workload, listener, original, peer)
}

func unmappedAddr(a net.Addr) netip.AddrPort {
	ta, ok := a.(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}
	}
	ap := ta.AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// WorkloadStatus is one workload as /workloads shows it.
type WorkloadStatus struct {
	UID            string           `json:"uid"`
	Workload       string           `json:"workload"` // namespace/name
	Namespace      string           `json:"namespace"`
	Name           string           `json:"name"`
	ServiceAccount string           `json:"serviceAccount,omitempty"`
	Redirection    string           `json:"redirection"` // "ebpf" or "nftables"
	NetnsInode     uint64           `json:"netnsInode"`
	Added          time.Time        `json:"added"`
	Listeners      []ListenerStatus `json:"listeners"`
}

// ListenerStatus is one listener of a workload.
type ListenerStatus struct {
	Port        int    `json:"port"`
	Address     string `json:"address"`
	Connections uint64 `json:"connections"`
}

func (w *workload) status() WorkloadStatus {
	st := WorkloadStatus{
		UID:            w.uid,
		Workload:       w.key(),
		Namespace:      w.namespace,
		Name:           w.name,
		ServiceAccount: w.sa,
		Redirection:    w.redirection(),
		NetnsInode:     w.netns.Ino,
		Added:          w.added,
	}
	for _, l := range w.listeners {
		st.Listeners = append(st.Listeners, ListenerStatus{
			Port:        l.port,
			Address:     l.ln.Addr().String(),
			Connections: l.conns.Load(),
		})
	}
	return st
}
