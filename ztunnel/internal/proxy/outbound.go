package proxy

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/ambient-mesh/ambient/pkg/hbone"
	"github.com/ambient-mesh/ambient/pkg/sockio"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// Outbound carries c, a connection pod's application opened to origDst
// and redirected to the pod's outbound listener, to where the mesh says it
// goes. It closes c when done.
func (p *Proxy) Outbound(pod *Pod, c net.Conn, origDst netip.AddrPort) {
	c = sockio.Wrap(c)
	st, end := p.carry(pod, c, func(s *podConnStats) *atomic.Int64 { return &s.outbound })
	if st == nil {
		return
	}
	defer end()

	client := addrOf(c.RemoteAddr())
	srcID, err := p.podID(pod)
	if err != nil {
		p.cfg.Log.Warn("outbound connection from a pod without identity", "pod", pod.Namespace+"/"+pod.Name, "err", err)
		resetOnClose(c)
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), p.cfg.ConnectTimeout)
	src := p.awaitPodWorkload(ctx, pod, client.Addr())
	r, rerr := resolve(p.cfg.State, src, origDst)

	dstAddr := r.authority
	if !dstAddr.IsValid() {
		dstAddr = r.dial
	}
	if !dstAddr.IsValid() {
		dstAddr = origDst
	}
	rec := p.cfg.Metrics.Open(telemetry.ConnInfo{
		Reporter: telemetry.ReporterSource,
		Src:      telemetry.Peer{Addr: client, Workload: src, Identity: srcID.String()},
		Dst:      telemetry.Peer{Addr: dstAddr, Workload: r.dst, Identity: r.identity},
		Service:  r.service,
		MTLS:     r.kind == routeHBONE,
	})
	if rerr != nil {
		cancel()
		resetOnClose(c)
		rec.Close(fmt.Errorf("%w: %w", telemetry.ErrConnect, rerr))
		return
	}

	up, err := p.connect(ctx, pod, srcID, r, client)
	cancel()
	if err != nil {
		resetOnClose(c)
		var se *hbone.StatusError
		if errors.As(err, &se) && se.Code == http.StatusUnauthorized {
			err = fmt.Errorf("%w: %w", telemetry.ErrDenied, err)
		} else {
			err = fmt.Errorf("%w: %w", telemetry.ErrConnect, err)
		}
		rec.Close(err)
		return
	}
	defer up.Close()
	rec.Close(pipe(c, up, rec.AddReceived, rec.AddSent))
}

// connect opens the upstream of r for a connection from client in pod.
func (p *Proxy) connect(ctx context.Context, pod *Pod, srcID spiffeid.ID, r route, client netip.AddrPort) (net.Conn, error) {
	switch r.kind {
	case routeHBONE:
		dstID, err := spiffeid.FromString(r.identity)
		if err != nil {
			return nil, fmt.Errorf("identity of %s: %w", r.dial, err)
		}
		key := hbone.Key{Src: srcID, Dst: dstID, Addr: r.dial}
		up, err := p.pool.Connect(ctx, key, p.cfg.Certs.ClientTLS(srcID, []spiffeid.ID{dstID}),
			r.authority.String(), hbone.Headers{ForwardedFor: client})
		if err != nil {
			return nil, fmt.Errorf("hbone to %s via %s: %w", r.authority, r.dial, err)
		}
		return up, nil
	case routeDirect, routePassthrough:
		// From the pod's own namespace, so the destination sees the pod's
		// address as it would without the mesh.
		up, err := wrapped(pod.Dial(ctx, "tcp", r.dial.String()))
		if err != nil {
			return nil, fmt.Errorf("%s to %s: %w", r.kind, r.dial, err)
		}
		return up, nil
	}
	return nil, fmt.Errorf("unknown route kind %d", r.kind)
}
