// Command ztunnel-standin stands in for ztunnel in the CNI agent's end-to-end
// tests: it takes pods from the node agent over ZDS and answers every
// connection redirected to it with one line saying where it landed. It is not
// ztunnel (no mTLS, no policy, no forwarding). See
// internal/standin/README.md for its flags, ports and privileges.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/e2e/internal/standin"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var cfg standin.Config
	var level slog.Level
	fs := flag.NewFlagSet("ztunnel-standin", flag.ContinueOnError)
	fs.StringVar(&cfg.ZDSSocket, "zds-socket", zdsapi.SocketPath, "the node agent's ZDS socket")
	fs.StringVar(&cfg.AdminAddr, "admin-addr", standin.DefaultAdminAddr, "address of /workloads, /zds and /healthz/ready")
	fs.DurationVar(&cfg.ReconnectMin, "reconnect-min", standin.DefaultReconnectMin, "first back-off before reconnecting to the agent")
	fs.DurationVar(&cfg.ReconnectMax, "reconnect-max", standin.DefaultReconnectMax, "longest back-off before reconnecting to the agent")
	fs.TextVar(&level, "log-level", slog.LevelInfo, "debug, info, warn or error")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "ztunnel-standin: unexpected arguments %q\n", fs.Args())
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: level}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	s, err := standin.New(cfg)
	if err != nil {
		cfg.Logger.Error("starting", "error", err)
		return 1
	}
	defer s.Close()
	cfg.Logger.Info("ztunnel stand-in (not ztunnel: no mTLS, no policy)", "zds_socket", cfg.ZDSSocket, "admin", s.AdminAddr().String())
	if err := s.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		cfg.Logger.Error("serving", "error", err)
		return 1
	}
	return 0
}
