package kubeletapi

import (
	"bufio"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strings"

	gwebsocket "github.com/gorilla/websocket"
	clientportforward "k8s.io/client-go/tools/portforward"
	"k8s.io/cri-streaming/pkg/streaming/portforward"
	"k8s.io/streaming/pkg/httpstream"
	"k8s.io/streaming/pkg/httpstream/spdy"
	"k8s.io/streaming/pkg/httpstream/wsstream"
)

// portForwardProtocols are the SPDY port-forward protocols served (the
// kubelet's). Websocket clients get either the v4 channel protocol
// (cri-streaming) or SPDY tunneled over a websocket (servePortForwardTunnel).
var portForwardProtocols = portforward.SupportedProtocols

// servePortForward answers /portForward/{namespace}/{pod}[/{uid}].
func (s *Server) servePortForward(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		http.Error(w, "method not allowed\n", http.StatusMethodNotAllowed)
		return
	}
	ns, pod := r.PathValue("namespace"), r.PathValue("pod")
	tunnel := wsstream.IsWebSocketRequestWithTunnelingProtocol(r)
	opts := &portforward.V4Options{}
	if !tunnel {
		var err error
		if opts, err = portforward.NewV4Options(r); err != nil {
			httpError(w, err, http.StatusBadRequest)
			return
		}
	}
	netns, err := s.cfg.Runtime.PodNetNS(ns, pod)
	if err != nil {
		httpError(w, fmt.Errorf("pod %s/%s: %w", ns, pod, err), http.StatusInternalServerError)
		return
	}
	fw := netnsForwarder{netns: netns}
	if tunnel {
		servePortForwardTunnel(w, r, fw, ns+"/"+pod)
		return
	}
	portforward.ServePortForward(w, r, fw, ns+"/"+pod, r.PathValue("uid"), opts,
		streamIdleTimeout, streamCreationTimeout, portForwardProtocols)
}

// servePortForwardTunnel serves SPDY port-forwarding carried in websocket
// binary messages (subprotocol "SPDY/3.1+portforward.k8s.io"), what kubectl
// speaks when the apiserver passes websockets through to the node. The
// websocket is accepted here and handed to the plain SPDY handler as if it
// were a hijacked HTTP connection that asked for a SPDY upgrade.
func servePortForwardTunnel(w http.ResponseWriter, r *http.Request, fw netnsForwarder, podName string) {
	var subprotocols []string
	for _, p := range portForwardProtocols {
		subprotocols = append(subprotocols, portforward.WebsocketsSPDYTunnelingPrefix+p)
	}
	up := gwebsocket.Upgrader{
		Subprotocols: subprotocols,
		// The apiserver is the client; it has already checked the origin.
		CheckOrigin: func(*http.Request) bool { return true },
	}
	ws, err := up.Upgrade(w, r, nil)
	if err != nil {
		slog.Error("upgrading port-forward websocket", "err", err)
		return
	}
	protocol := strings.TrimPrefix(ws.Subprotocol(), portforward.WebsocketsSPDYTunnelingPrefix)
	conn := clientportforward.NewTunnelingConnection("server", ws)
	defer conn.Close()

	spdyReq := r.Clone(r.Context())
	spdyReq.Header = http.Header{}
	spdyReq.Header.Set(httpstream.HeaderConnection, httpstream.HeaderUpgrade)
	spdyReq.Header.Set(httpstream.HeaderUpgrade, spdy.HeaderSpdy31)
	spdyReq.Header.Set(httpstream.HeaderProtocolVersion, protocol)
	portforward.ServePortForward(&tunnelResponse{conn: conn, header: http.Header{}}, spdyReq, fw, podName, "", &portforward.V4Options{},
		streamIdleTimeout, streamCreationTimeout, portForwardProtocols)
}

// tunnelResponse is the ResponseWriter the SPDY upgrade sees inside a
// websocket tunnel: the 101 it writes goes nowhere (the websocket handshake
// already answered) and Hijack yields the tunnel.
type tunnelResponse struct {
	conn   net.Conn
	header http.Header
	status int
}

func (t *tunnelResponse) Header() http.Header { return t.header }

func (t *tunnelResponse) WriteHeader(code int) { t.status = code }

// Write only happens when the upgrade fails before hijacking.
func (t *tunnelResponse) Write(b []byte) (int, error) {
	slog.Error("port-forward tunnel upgrade", "status", t.status, "body", strings.TrimSpace(string(b)))
	return 0, errTunnelWrite
}

var errTunnelWrite = errors.New("port-forward tunnel carries no HTTP body")

func (t *tunnelResponse) Hijack() (net.Conn, *bufio.ReadWriter, error) {
	return t.conn, bufio.NewReadWriter(bufio.NewReader(t.conn), bufio.NewWriter(t.conn)), nil
}
