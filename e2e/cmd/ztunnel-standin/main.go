// Command ztunnel-standin stands in for ztunnel where a test needs to see
// what the redirection delivers (the CNI agent's end-to-end suite): it takes
// pods from the node agent over ZDS with ztunnel's own in-pod listener code
// (ztunnel/inpod) and answers every connection with one line saying where it
// landed,
//
//	standin workload=<ns>/<name> listener=<15001|15006|15008> original=<ip:port> peer=<ip:port>
//
// then closes it. It is not ztunnel: no mTLS, no policy, no forwarding.
//
// Flags: --zds-socket (the node agent's socket), --admin-addr (HTTP:
// /workloads and /zds as JSON, /healthz/ready once connected to the agent and
// its snapshot received), --log-level. It needs what ztunnel needs: a
// privileged host-network pod with hostPaths /var/run/ztunnel and /sys/fs/bpf.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/signal"
	"syscall"
	"time"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/ztunnel/inpod"
)

func main() {
	zdsSocket := flag.String("zds-socket", zdsapi.SocketPath, "the node agent's ZDS socket")
	adminAddr := flag.String("admin-addr", "127.0.0.1:15000", "admin HTTP address: /workloads, /zds, /healthz/ready")
	logLevel := flag.String("log-level", "info", "debug, info, warn or error")
	flag.Parse()
	var level slog.Level
	if err := level.UnmarshalText([]byte(*logLevel)); err != nil {
		fmt.Fprintf(os.Stderr, "ztunnel-standin: --log-level: %v\n", err)
		os.Exit(2)
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: level}))
	log.Info("ztunnel stand-in (not ztunnel: no mTLS, no policy)", "zds_socket", *zdsSocket, "admin", *adminAddr)

	answer := func(listener int) func(w *inpod.Workload, c net.Conn, orig netip.AddrPort) {
		return func(w *inpod.Workload, c net.Conn, orig netip.AddrPort) {
			line := fmt.Sprintf("standin workload=%s/%s listener=%d original=%s peer=%s\n", w.Namespace, w.Name, listener, orig, c.RemoteAddr())
			log.Info("connection", "workload", w.Namespace+"/"+w.Name, "listener", listener, "original", orig.String(), "peer", c.RemoteAddr().String())
			c.SetWriteDeadline(time.Now().Add(5 * time.Second))
			c.Write([]byte(line))
			// Close gracefully so the line survives bytes the client sent
			// first (an HTTP request, say).
			if tc, ok := c.(interface{ CloseWrite() error }); ok {
				tc.CloseWrite()
				c.SetReadDeadline(time.Now().Add(2 * time.Second))
				buf := make([]byte, 4096)
				for {
					if _, err := c.Read(buf); err != nil {
						break
					}
				}
			}
		}
	}
	hbone := answer(15008)
	m := inpod.New(inpod.Config{
		ZDSSocket: *zdsSocket,
		Log:       log,
		Handlers: inpod.Handlers{
			Outbound: answer(15001),
			Inbound:  answer(15006),
			HBONE: func(w *inpod.Workload, c net.Conn) {
				local, _ := netip.ParseAddrPort(c.LocalAddr().String())
				hbone(w, c, local)
			},
		},
	})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()

	mux := http.NewServeMux()
	writeJSON := func(w http.ResponseWriter, v any) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(v)
	}
	mux.HandleFunc("/workloads", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, m.Workloads()) })
	mux.HandleFunc("/zds", func(w http.ResponseWriter, _ *http.Request) { writeJSON(w, m.ZDS()) })
	mux.HandleFunc("/healthz/ready", func(w http.ResponseWriter, _ *http.Request) {
		if !m.Ready() {
			http.Error(w, "not connected to the node agent, or no snapshot yet", http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintln(w, "ready")
	})
	srv := &http.Server{Addr: *adminAddr, Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	go func() {
		if err := srv.ListenAndServe(); err != nil && !errors.Is(err, http.ErrServerClosed) {
			log.Error("admin server", "err", err)
			stop()
		}
	}()
	err := m.Run(ctx)
	srv.Close()
	m.Close()
	if err != nil && !errors.Is(err, context.Canceled) {
		log.Error("stand-in", "err", err)
		os.Exit(1)
	}
}
