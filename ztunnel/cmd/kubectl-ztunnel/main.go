// Command kubectl-ztunnel is a kubectl plugin (`kubectl ztunnel ...`) that
// shows what the ztunnels of a cluster hold: workloads, services and
// policies from xDS, certificates, the pods served in-pod and their
// connections, and each ztunnel's health; it also reads and sets their log
// level.
//
// It reads ztunnel's admin server (127.0.0.1:15000 on each node: /config_dump
// and /logging) through a port-forward to the ztunnel pod, the way istioctl
// does, or directly with --admin-url. It is the one package of the ztunnel
// module allowed to link the Kubernetes client (see ../../deps_test.go): it
// runs on an operator's machine, never in ztunnel.
package main

import (
	"context"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	code := newCLI(os.Stdout, os.Stderr).run(ctx, os.Args[1:])
	stop()
	os.Exit(code)
}
