package proxy

import (
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/pprof"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/ambient-mesh/ambient/ztunnel/inpod"
	"github.com/ambient-mesh/ambient/ztunnel/internal/identity"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
)

// configDump is what /config_dump shows.
type configDump struct {
	state.Dump
	Certificates []certDump             `json:"certificates"`
	Pods         []inpod.WorkloadStatus `json:"pods"`
	Connections  []ConnStats            `json:"connections"`
	ZDS          inpod.ZDSStatus        `json:"zds"`
	XDSSynced    bool                   `json:"xdsSynced"`
}

type certDump struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	RotateAt  time.Time `json:"rotateAt"`
}

// adminHandler serves /config_dump, /logging and /debug/pprof/.
func adminHandler(o Options, store *state.Store, certs *identity.Manager, px *Proxy, im *inpod.Manager, synced func() bool) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		d := configDump{
			Dump:         store.Snapshot(),
			Pods:         im.Workloads(),
			Connections:  px.Stats(),
			ZDS:          im.ZDS(),
			XDSSynced:    synced(),
			Certificates: []certDump{},
		}
		for _, c := range certs.Certificates() {
			cd := certDump{Identity: c.ID.String(), NotBefore: c.NotBefore, NotAfter: c.NotAfter, RotateAt: c.RotateAt()}
			if c.TLS != nil && c.TLS.Leaf != nil {
				cd.Serial = c.TLS.Leaf.SerialNumber.Text(16)
			}
			d.Certificates = append(d.Certificates, cd)
		}
		writeJSON(w, d)
	})
	mux.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
		if lv := r.URL.Query().Get("level"); lv != "" {
			if r.Method != http.MethodPost && r.Method != http.MethodPut {
				http.Error(w, "change the level with POST /logging?level=debug|info|warn|error", http.StatusMethodNotAllowed)
				return
			}
			var l slog.Level
			if err := l.UnmarshalText([]byte(lv)); err != nil {
				http.Error(w, fmt.Sprintf("level %q: %v", lv, err), http.StatusBadRequest)
				return
			}
			o.LogLevel.Set(l)
			o.Log.Info("log level changed", "level", l.String())
		}
		writeJSON(w, map[string]string{"level": o.LogLevel.Level().String()})
	})
	mux.HandleFunc("/debug/pprof/", pprof.Index)
	mux.HandleFunc("/debug/pprof/cmdline", pprof.Cmdline)
	mux.HandleFunc("/debug/pprof/profile", pprof.Profile)
	mux.HandleFunc("/debug/pprof/symbol", pprof.Symbol)
	mux.HandleFunc("/debug/pprof/trace", pprof.Trace)
	return mux
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	enc.Encode(v)
}

// server is an HTTP server and its listener.
type server struct {
	srv *http.Server
	ln  net.Listener
}

// reusePort binds with SO_REUSEPORT: ztunnel runs in the node's network
// namespace, and during a rolling restart the new ztunnel serves admin,
// metrics and readiness on the same ports while the old one drains.
var reusePort = net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
	var serr error
	if err := c.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setting SO_REUSEPORT: %w", serr)
	}
	return nil
}}

// listenServers binds the admin, metrics and readiness servers, so a port
// in use (by anything but another ztunnel) fails the start rather than a
// later request.
func listenServers(o Options, reg *prometheus.Registry, ready func() bool, admin http.Handler) (out []server, err error) {
	defer func() {
		if err != nil {
			for _, s := range out {
				s.ln.Close()
			}
		}
	}()
	metrics := http.NewServeMux()
	metrics.Handle("GET /metrics", promhttp.HandlerFor(reg, promhttp.HandlerOpts{}))
	readiness := http.NewServeMux()
	readiness.HandleFunc("GET /healthz/ready", func(w http.ResponseWriter, r *http.Request) {
		if !ready() {
			http.Error(w, "not ready", http.StatusServiceUnavailable)
			return
		}
		w.Write([]byte("ready\n"))
	})
	for _, s := range []struct {
		addr string
		h    http.Handler
	}{{o.AdminAddr, admin}, {o.MetricsAddr, metrics}, {o.ReadyAddr, readiness}} {
		if s.addr == "" {
			continue
		}
		ln, err := reusePort.Listen(context.Background(), "tcp", s.addr)
		if err != nil {
			return out, fmt.Errorf("listening on %s: %w", s.addr, err)
		}
		out = append(out, server{srv: &http.Server{Handler: s.h, ReadHeaderTimeout: 10 * time.Second}, ln: ln})
	}
	return out, nil
}
