package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/ztunnel/internal/policy"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// unauthenticated is the source principal of a plaintext connection: the
// label value Istio reports for a peer without identity.
const unauthenticated = "unknown"

// podServer is the HBONE server of one pod: the connections its 15008
// listener accepts are handed to srv through ln.
type podServer struct {
	srv *hbone.Server
	ln  *connListener
}

// HBONE serves c, a connection accepted by pod's HBONE listener, as the
// destination pod's end of HBONE tunnels: the pod's HBONE server takes it,
// and HBONE returns once that server has closed it.
func (p *Proxy) HBONE(pod *Pod, c net.Conn) {
	s, err := p.podServer(pod)
	if err != nil {
		p.cfg.Log.Warn("hbone connection refused", "pod", pod.Namespace+"/"+pod.Name, "peer", c.RemoteAddr(), "err", err)
		resetOnClose(c)
		c.Close()
		return
	}
	hc := &heldConn{Conn: c, closed: make(chan struct{})}
	if !s.ln.push(hc) {
		resetOnClose(c)
		c.Close()
		return
	}
	<-hc.closed
}

// podServer returns pod's HBONE server, starting it on first use.
func (p *Proxy) podServer(pod *Pod) (*podServer, error) {
	id, err := p.podID(pod)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, net.ErrClosed
	}
	if s := p.servers[pod.UID]; s != nil {
		return s, nil
	}
	tlsConf := p.cfg.Certs.ServerTLS(func(*tls.ClientHelloInfo) (spiffeid.ID, error) { return id, nil })
	s := &podServer{
		srv: hbone.NewServer(tlsConf, p.hboneHandler(pod), p.cfg.Server),
		ln:  newConnListener(),
	}
	p.servers[pod.UID] = s
	go func() {
		if err := s.srv.Serve(s.ln); err != nil {
			p.cfg.Log.Warn("hbone server stopped", "pod", pod.Namespace+"/"+pod.Name, "err", err)
		}
	}()
	return s, nil
}

// hboneHandler authorizes and connects the CONNECT streams addressed to
// pod: the authority must be one of the pod's addresses; L4 policy decides
// with the peer's authenticated identity (401 when denied); the upstream is
// the application, dialed inside the pod (503 when it cannot be reached).
func (p *Proxy) hboneHandler(pod *Pod) hbone.Handler {
	return func(ctx context.Context, req *hbone.Request) (net.Conn, int) {
		st := p.podStats(pod.UID)
		st.total.Add(1)
		dst := p.awaitPodWorkload(ctx, pod, req.Addr.Addr())

		// The tunnel is opened from the client's node, so the client's own
		// address travels in forwarded.
		src := req.PeerAddr
		if req.ForwardedFor.IsValid() {
			src = req.ForwardedFor
		}
		rec := p.cfg.Metrics.Open(telemetry.ConnInfo{
			Reporter: telemetry.ReporterDestination,
			Src:      telemetry.Peer{Addr: src, Workload: p.cfg.State.WorkloadByIP(network(dst), src.Addr()), Identity: req.Peer.String()},
			Dst:      telemetry.Peer{Addr: req.Addr, Workload: dst},
			MTLS:     true,
		})

		status, err := p.authorizeHBONE(pod, dst, req, src)
		if err != nil {
			if status == http.StatusUnauthorized {
				st.denied.Add(1)
			}
			rec.Close(err)
			p.cfg.Log.Debug("hbone request refused", "pod", pod.Namespace+"/"+pod.Name,
				"peer", req.Peer, "authority", req.Authority, "status", status, "err", err)
			return nil, status
		}

		dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
		up, err := pod.Dial(dctx, "tcp", req.Addr.String())
		cancel()
		if err != nil {
			rec.Close(fmt.Errorf("%w: dialing %s: %w", telemetry.ErrConnect, req.Addr, err))
			return nil, http.StatusServiceUnavailable
		}
		st.hbone.Add(1)
		return &meteredConn{Conn: up, rec: rec, done: func() { st.hbone.Add(-1) }}, http.StatusOK
	}
}

// authorizeHBONE decides a CONNECT request to dst (nil when the state does
// not know the pod) from src. It returns 0 and no error to proceed.
func (p *Proxy) authorizeHBONE(pod *Pod, dst *state.Workload, req *hbone.Request, src netip.AddrPort) (int, error) {
	if dst == nil {
		return http.StatusServiceUnavailable, fmt.Errorf("%w: workload of pod %s/%s unknown", telemetry.ErrConnect, pod.Namespace, pod.Name)
	}
	if !slices.Contains(dst.Addresses, req.Addr.Addr()) {
		return http.StatusBadRequest, fmt.Errorf("authority %s is not an address of %s", req.Authority, dst.UID())
	}
	dec := policy.Evaluate(p.cfg.State.Policies(dst), policy.Conn{
		SrcIdentity: req.Peer.String(),
		SrcIP:       src.Addr(),
		DstIP:       req.Addr.Addr(),
		DstPort:     req.Addr.Port(),
	})
	if !dec.Allow {
		return http.StatusUnauthorized, fmt.Errorf("%w: %s", telemetry.ErrDenied, decidedBy(dec))
	}
	return 0, nil
}

// Inbound carries c, a plaintext connection to origDst redirected to pod's
// inbound listener, to the application once L4 policy allows it for a peer
// without identity. It closes c when done.
func (p *Proxy) Inbound(pod *Pod, c net.Conn, origDst netip.AddrPort) {
	defer c.Close()
	if !p.track(c) {
		resetOnClose(c)
		return
	}
	defer p.untrack(c)
	st := p.podStats(pod.UID)
	st.inbound.Add(1)
	st.total.Add(1)
	defer st.inbound.Add(-1)

	client := addrOf(c.RemoteAddr())
	origDst = netip.AddrPortFrom(origDst.Addr().Unmap(), origDst.Port())
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	defer cancel()
	dst := p.awaitPodWorkload(ctx, pod, origDst.Addr())
	rec := p.cfg.Metrics.Open(telemetry.ConnInfo{
		Reporter: telemetry.ReporterDestination,
		Src:      telemetry.Peer{Addr: client, Workload: p.cfg.State.WorkloadByIP(network(dst), client.Addr()), Identity: unauthenticated},
		Dst:      telemetry.Peer{Addr: origDst, Workload: dst},
	})
	if dst == nil {
		// Without the pod's workload its policies are unknown: fail closed.
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: workload of pod %s/%s unknown", telemetry.ErrConnect, pod.Namespace, pod.Name))
		return
	}
	dec := policy.Evaluate(p.cfg.State.Policies(dst), policy.Conn{
		SrcIP:     client.Addr(),
		DstIP:     origDst.Addr(),
		DstPort:   origDst.Port(),
		Plaintext: true,
	})
	if !dec.Allow {
		st.denied.Add(1)
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: %s", telemetry.ErrDenied, decidedBy(dec)))
		return
	}
	up, err := pod.Dial(ctx, "tcp", origDst.String())
	if err != nil {
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: dialing %s: %w", telemetry.ErrConnect, origDst, err))
		return
	}
	defer up.Close()
	rec.Close(pipe(c, up, rec.AddReceived, rec.AddSent))
}

// decidedBy names what denied a connection, for the access log.
func decidedBy(d policy.Decision) string {
	if d.Policy == "" {
		return "no allow policy matched"
	}
	return "policy " + d.Policy
}

// network is w's network, "" for nil.
func network(w *state.Workload) string {
	if w == nil {
		return ""
	}
	return w.Info.GetNetwork()
}

// meteredConn is an HBONE stream's upstream: what the HBONE server writes
// to it came from the source, what it reads goes back to the source.
type meteredConn struct {
	net.Conn
	rec  *telemetry.ConnectionRecorder
	done func()
	once sync.Once
}

func (c *meteredConn) Read(b []byte) (int, error) {
	n, err := c.Conn.Read(b)
	c.rec.AddSent(n)
	return n, err
}

func (c *meteredConn) Write(b []byte) (int, error) {
	n, err := c.Conn.Write(b)
	c.rec.AddReceived(n)
	return n, err
}

// CloseWrite passes the source's half-close on to the application.
func (c *meteredConn) CloseWrite() error { return closeWrite(c.Conn) }

func (c *meteredConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() {
		c.rec.Close(nil)
		c.done()
	})
	return err
}

// connListener is a net.Listener of connections accepted elsewhere (by the
// in-pod listener manager, inside the pod's network namespace).
type connListener struct {
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
}

func newConnListener() *connListener {
	return &connListener{conns: make(chan net.Conn), done: make(chan struct{})}
}

// push hands c to Accept; false once the listener is closed.
func (l *connListener) push(c net.Conn) bool {
	select {
	case l.conns <- c:
		return true
	case <-l.done:
		return false
	}
}

func (l *connListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *connListener) Close() error {
	l.once.Do(func() { close(l.done) })
	return nil
}

func (l *connListener) Addr() net.Addr { return &net.TCPAddr{Port: hbone.Port} }

// heldConn is an HBONE connection handed to a pod's server; closed is
// closed with it, so the in-pod handler can wait for the server to finish.
type heldConn struct {
	net.Conn
	closed chan struct{}
	once   sync.Once
}

func (c *heldConn) Close() error {
	err := c.Conn.Close()
	c.once.Do(func() { close(c.closed) })
	return err
}
