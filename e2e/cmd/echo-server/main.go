// Command echo-server is the e2e test workload: it answers HTTP/1.1, h2c, gRPC
// and raw TCP with what it saw of each call. See internal/echo/README.md for
// its flags and environment.
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

	"github.com/ambient-mesh/ambient/e2e/internal/echo"
)

func main() {
	os.Exit(run(os.Args[1:]))
}

func run(args []string) int {
	var cfg echo.Config
	fs := flag.NewFlagSet("echo-server", flag.ContinueOnError)
	cfg.RegisterFlags(fs)
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if err := echo.ApplyEnv(fs, os.LookupEnv); err != nil {
		fmt.Fprintf(os.Stderr, "echo-server: environment: %v\n", err)
		return 2
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: cfg.LogLevel}))

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	srv, err := echo.New(cfg)
	if err != nil {
		cfg.Logger.Error("starting", "error", err)
		return 1
	}
	defer srv.Close()
	if err := srv.Run(ctx); err != nil && !errors.Is(err, context.Canceled) {
		cfg.Logger.Error("serving", "error", err)
		return 1
	}
	return 0
}
