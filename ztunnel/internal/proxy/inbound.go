package proxy

import (
	"context"
	"crypto/tls"
	"fmt"
	"log/slog"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/pkg/sockio"
	"github.com/ambient-mesh/ambient/ztunnel/inpod"
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
	hc := &heldConn{Conn: sockio.Wrap(c), closed: make(chan struct{})}
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
// with the peer's authenticated identity and the client address hboneSource
// vouches for (401 when denied); the upstream is the application, dialed
// inside the pod from that client address (503 when it cannot be reached).
func (p *Proxy) hboneHandler(pod *Pod) hbone.Handler {
	return func(ctx context.Context, req *hbone.Request) (net.Conn, int) {
		st := p.podStats(pod.UID)
		st.total.Add(1)
		dst := p.awaitPodWorkload(ctx, pod, req.Addr.Addr())

		src, srcWorkload := p.hboneSource(ctx, pod, dst, req)
		rec := p.cfg.Metrics.Open(telemetry.ConnInfo{
			Reporter: telemetry.ReporterDestination,
			Src:      telemetry.Peer{Addr: src, Workload: srcWorkload, Identity: req.Peer.String()},
			Dst:      telemetry.Peer{Addr: req.Addr, Workload: dst},
			MTLS:     true,
		})

		status, err := p.authorizeHBONE(ctx, pod, dst, req, src)
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
		up, err := p.dialApp(dctx, pod, dst, src.Addr(), req.Addr)
		cancel()
		if err != nil {
			rec.Close(fmt.Errorf("%w: dialing %s: %w", telemetry.ErrConnect, req.Addr, err))
			return nil, http.StatusServiceUnavailable
		}
		st.hbone.Add(1)
		return &meteredConn{Conn: up, rec: rec, done: func() { st.hbone.Add(-1) }}, http.StatusOK
	}
}

// hboneSource is the client of a CONNECT request to pod (whose workload dst
// may be nil) and, when the state knows it, the client's workload. The
// tunnel is opened from the client's node, so the TCP peer is that node and
// the client's own address travels in forwarded; but any authenticated peer
// can write any address there. So forwarded counts only when the state has a
// workload at that address and either its identity is the peer
// certificate's, or the peer is a pod of dst's waypoint (its own or one of
// its services'; see waypointPeer), which forwards the address of the client
// it served: our own waypoint runs our code in our trust domain, so, as
// Istio does, we trust it. Then a policy on source IPs (ipBlocks,
// notIpBlocks), the access log and the metrics see the client, and the app is
// connected from its address. Through a waypoint the workload returned is the
// waypoint's, the authenticated peer, whose identity policy principals still
// see. Otherwise (no header, an address the state does not know, another
// identity's address from a peer that is not dst's waypoint) the TCP peer is
// the client, logged at debug. An address the state does not know yet is
// waited for up to StateWait, as a client pod that has just started may be.
func (p *Proxy) hboneSource(ctx context.Context, pod *Pod, dst *state.Workload, req *hbone.Request) (netip.AddrPort, *state.Workload) {
	peer := netip.AddrPortFrom(req.PeerAddr.Addr().Unmap(), req.PeerAddr.Port())
	identity := req.Peer.String()
	fwd := netip.AddrPortFrom(req.ForwardedFor.Addr().Unmap(), req.ForwardedFor.Port())
	var why string
	if !req.ForwardedFor.IsValid() {
		why = "no forwarded address"
	} else if w := p.awaitWorkload(ctx, func() *state.Workload { return p.cfg.State.WorkloadByIP(network(dst), fwd.Addr()) }); w == nil {
		why = "no workload has the forwarded address"
	} else if w.Identity != identity {
		wp, whyNot := waypointPeer(p.cfg.State, dst, identity)
		if wp != nil {
			return fwd, wp
		}
		why = "the forwarded address is a workload of another identity (" + w.Identity + ") and " + whyNot
	} else {
		return fwd, w
	}
	if p.cfg.Log.Enabled(ctx, slog.LevelDebug) {
		p.cfg.Log.LogAttrs(ctx, slog.LevelDebug, "hbone client address is the tcp peer",
			slog.String("pod", pod.Namespace+"/"+pod.Name), slog.String("peer", identity),
			slog.String("peer_addr", peer.String()), slog.String("forwarded", req.Forwarded), slog.String("reason", why))
	}
	// The peer's address names a workload only if that workload is the
	// peer's identity too.
	if w := p.cfg.State.WorkloadByIP(network(dst), peer.Addr()); w != nil && w.Identity == identity {
		return peer, w
	}
	return peer, nil
}

// waypointPeer returns the pod of a waypoint bound to dst, dst's own or that
// of a service dst belongs to, whose identity is identity (the peer's); or
// nil, and why not.
func waypointPeer(st *state.Store, dst *state.Workload, identity string) (*state.Workload, string) {
	if dst == nil {
		return nil, "the destination's workload, so its waypoint, is unknown"
	}
	bound := false
	var unknown []string
	match := func(wp state.Waypoint, ok bool, err error) *state.Workload {
		switch {
		case err != nil:
			unknown = append(unknown, err.Error())
			return nil
		case !ok:
			return nil
		case wp.Workload == nil && wp.Service == nil:
			unknown = append(unknown, "waypoint "+wp.Address.String()+" is not a known workload or service")
			return nil
		}
		bound = true
		return waypointPod(st, wp, identity)
	}
	if w := match(st.WorkloadWaypoint(dst)); w != nil {
		return w, ""
	}
	for _, key := range slices.Sorted(maps.Keys(dst.Info.GetServices())) {
		if svc := st.Service(key); svc != nil {
			if w := match(st.ServiceWaypoint(svc)); w != nil {
				return w, ""
			}
		}
	}
	switch {
	case len(unknown) > 0:
		return nil, "the peer is not a pod of a known waypoint of the destination (" + strings.Join(unknown, "; ") + ")"
	case !bound:
		return nil, "the destination has no waypoint"
	}
	return nil, "the peer is not a pod of the destination's waypoint"
}

// waypointPod returns the pod of the resolved waypoint wp whose identity is
// identity, or nil. A waypoint service's pods are all the workloads it
// selects: one that is not ready (draining, say) still forwards for the
// clients it serves.
func waypointPod(st *state.Store, wp state.Waypoint, identity string) *state.Workload {
	if wp.Workload != nil {
		if wp.Workload.Identity == identity {
			return wp.Workload
		}
		return nil
	}
	for _, w := range st.ServiceWorkloads(wp.Service) {
		if w.Identity == identity {
			return w
		}
	}
	return nil
}

// dialApp connects to the app at app (inside pod) as client, the
// connection's validated client address, so that the app sees the client's
// address as its peer, as with Istio's ambient mesh. Where that cannot be
// done it connects from the pod's own address, logged at debug: the client
// is the pod itself (a hairpin, where the client address is already the
// pod's), its address is unusable as a source (another address family than
// the app's, unspecified, loopback; see inpod.CheckSource), or the pod has
// no DialFrom.
func (p *Proxy) dialApp(ctx context.Context, pod *Pod, dst *state.Workload, client netip.Addr, app netip.AddrPort) (net.Conn, error) {
	var why string
	switch err := inpod.CheckSource(client, app.Addr()); {
	case pod.DialFrom == nil:
		why = "the pod has no transparent dialer"
	case client == app.Addr() || dst != nil && slices.Contains(dst.Addresses, client):
		why = "the client is the pod itself"
	case err != nil:
		why = err.Error()
	default:
		return wrapped(pod.DialFrom(ctx, client, "tcp", app.String()))
	}
	if p.cfg.Log.Enabled(ctx, slog.LevelDebug) {
		p.cfg.Log.LogAttrs(ctx, slog.LevelDebug, "connecting to the app from the pod's own address",
			slog.String("pod", pod.Namespace+"/"+pod.Name), slog.String("client", client.String()),
			slog.String("app", app.Addr().String()), slog.String("reason", why))
	}
	return wrapped(pod.Dial(ctx, "tcp", app.String()))
}

// wrapped is a dial's result with its socket read and written through
// sockio.
func wrapped(c net.Conn, err error) (net.Conn, error) {
	if err != nil {
		return nil, err
	}
	return sockio.Wrap(c), nil
}

// authorizeHBONE decides a CONNECT request to dst (nil when the state does
// not know the pod) from src. It returns 0 and no error to proceed.
func (p *Proxy) authorizeHBONE(ctx context.Context, pod *Pod, dst *state.Workload, req *hbone.Request, src netip.AddrPort) (int, error) {
	if dst == nil {
		return http.StatusServiceUnavailable, fmt.Errorf("%w: workload of pod %s/%s unknown", telemetry.ErrConnect, pod.Namespace, pod.Name)
	}
	if !slices.Contains(dst.Addresses, req.Addr.Addr()) {
		return http.StatusBadRequest, fmt.Errorf("authority %s is not an address of %s", req.Authority, dst.UID())
	}
	dec := p.authorize(ctx, dst, policy.Conn{
		SrcIdentity: req.Peer.String(),
		SrcIP:       src.Addr(),
		DstIP:       req.Addr.Addr(),
		DstPort:     req.Addr.Port(),
	}, src, req.Addr)
	if !dec.Allow {
		return http.StatusUnauthorized, fmt.Errorf("%w: %s", telemetry.ErrDenied, decidedBy(dec))
	}
	return 0, nil
}

// Inbound carries c, a plaintext connection to origDst redirected to pod's
// inbound listener, to the application once L4 policy allows it for a peer
// without identity. It closes c when done.
func (p *Proxy) Inbound(pod *Pod, c net.Conn, origDst netip.AddrPort) {
	c = sockio.Wrap(c)
	st, end := p.carry(pod, c, func(s *podConnStats) *atomic.Int64 { return &s.inbound })
	if st == nil {
		return
	}
	defer end()

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
	dec := p.authorize(ctx, dst, policy.Conn{
		SrcIP:     client.Addr(),
		DstIP:     origDst.Addr(),
		DstPort:   origDst.Port(),
		Plaintext: true,
	}, client, origDst)
	if !dec.Allow {
		st.denied.Add(1)
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: %s", telemetry.ErrDenied, decidedBy(dec)))
		return
	}
	up, err := p.dialApp(ctx, pod, dst, client.Addr(), origDst)
	if err != nil {
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: dialing %s: %w", telemetry.ErrConnect, origDst, err))
		return
	}
	defer up.Close()
	rec.Close(pipe(c, up, rec.AddReceived, rec.AddSent))
}

// authorize is L4 authorization of conn, from src to dstAddr on workload
// dst: the decision of the enforced policies, which the caller acts on. When
// dry-run policies apply too, the decision they would give is logged and
// never acted on; with none (the common case) this costs nothing more.
func (p *Proxy) authorize(ctx context.Context, dst *state.Workload, conn policy.Conn, src, dstAddr netip.AddrPort) policy.Decision {
	enforced, dryRun := p.cfg.State.Policies(dst)
	dec := policy.Evaluate(enforced, conn)
	if len(dryRun) > 0 {
		p.logDryRun(ctx, dst, enforced, dryRun, conn, dec, src, dstAddr)
	}
	return dec
}

// logDryRun logs, at info, what conn's authorization would be if the dryRun
// policies were enforced (Istio's shadow result), next to the enforced
// decision dec.
func (p *Proxy) logDryRun(ctx context.Context, dst *state.Workload, enforced, dryRun []*security.Authorization,
	conn policy.Conn, dec policy.Decision, src, dstAddr netip.AddrPort) {
	if !p.cfg.Log.Enabled(ctx, slog.LevelInfo) {
		return
	}
	would := policy.EvaluateDryRun(enforced, dryRun, conn)
	identity := conn.SrcIdentity
	if conn.Plaintext || identity == "" {
		identity = unauthenticated
	}
	p.cfg.Log.LogAttrs(ctx, slog.LevelInfo, "dry-run authorization",
		slog.Bool("dry_run", true),
		slog.String("decision", dryRunVerdict(would)),
		slog.String("policy", would.Policy),
		slog.String("reason", dryRunReason(would)),
		slog.Any("policies", dryRunPolicyNames(dryRun)),
		slog.String("enforced", dryRunVerdict(dec)),
		slog.Group("src", slog.String("addr", src.String()), slog.String("identity", identity)),
		slog.Group("dst", slog.String("addr", dstAddr.String()), slog.String("workload", dst.UID())),
	)
}

// dryRunPolicyNames lists policies by name in a log line, formatted only
// when the line is written.
type dryRunPolicyNames []*security.Authorization

func (ps dryRunPolicyNames) LogValue() slog.Value {
	names := make([]string, len(ps))
	for i, p := range ps {
		names[i] = policy.Name(p)
	}
	return slog.AnyValue(names)
}

// dryRunVerdict is a decision as the dry-run log shows it.
func dryRunVerdict(d policy.Decision) string {
	if d.Allow {
		return "allow"
	}
	return "deny"
}

// dryRunReason says why d was reached, for the dry-run log.
func dryRunReason(d policy.Decision) string {
	switch {
	case d.Policy != "" && d.Allow:
		return "allow policy matched"
	case d.Policy != "":
		return "deny policy matched"
	case d.Allow:
		return "no deny policy matched and no allow policy applies"
	}
	return "no allow policy matched"
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

// ReadPooled reads from the application like Read, into a buffer from
// pool that it holds only while there is data (see sockio.ReadPooled).
func (c *meteredConn) ReadPooled(pool sockio.Pool, off int) (*[]byte, int, error) {
	bp, n, err := sockio.ReadPooled(c.Conn, pool, off)
	c.rec.AddSent(n)
	return bp, n, err
}

// TryWrite writes what the application's socket takes of b without
// waiting (see sockio.Conn.TryWrite); nothing when it cannot tell.
func (c *meteredConn) TryWrite(b []byte) (int, error) {
	tw, ok := c.Conn.(sockio.TryWriter)
	if !ok {
		return 0, nil
	}
	n, err := tw.TryWrite(b)
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
