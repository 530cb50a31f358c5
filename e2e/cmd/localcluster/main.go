// Command localcluster brings the local Kubernetes cluster of the e2e suite up
// and down: `localcluster up` prints the KUBECONFIG to use, `localcluster down`
// removes every process, namespace, link and mount it made.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"

	"github.com/ambient-mesh/ambient/e2e/internal/cluster"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func main() {
	nsexec.Init()
	log.SetFlags(log.Ltime | log.Lmicroseconds)
	cfg := cluster.DefaultConfig()
	fs := flag.NewFlagSet("localcluster", flag.ExitOnError)
	fs.StringVar(&cfg.Dir, "dir", cfg.Dir, "state dir: certificates, kubeconfig, logs, node roots (env AMBIENT_CLUSTER_DIR)")
	fs.IntVar(&cfg.Nodes, "nodes", cfg.Nodes, "number of nodes")
	fs.StringVar(&cfg.KubeBin, "kube-bin", cfg.KubeBin, "dir with kube-apiserver, kube-controller-manager, kube-scheduler, kube-proxy (env KUBE_BIN)")
	fs.StringVar(&cfg.CNIBin, "cni-bin", cfg.CNIBin, "dir with the standard CNI plugins (env CNI_BIN)")
	fs.StringVar(&cfg.BinDir, "bin-dir", cfg.BinDir, "dir with nodelet and the test workloads (env AMBIENT_BIN)")
	fs.StringVar(&cfg.ImageTable, "image-table", cfg.ImageTable, "image -> binary table for nodelet")
	fs.StringVar(&cfg.Etcd, "etcd", cfg.Etcd, "etcd binary")
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "usage: localcluster [flags] up|down\n")
		fs.PrintDefaults()
	}
	if len(os.Args) < 2 {
		fs.Usage()
		os.Exit(2)
	}
	verb := os.Args[1]
	fs.Parse(os.Args[2:])
	cfg.Log = log.Printf

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	var err error
	switch verb {
	case "up":
		err = cluster.Up(ctx, cfg)
		if err == nil {
			fmt.Printf("export KUBECONFIG=%s\n", cfg.KubeconfigPath())
		}
	case "down":
		err = cluster.Down(cfg)
	default:
		fs.Usage()
		os.Exit(2)
	}
	if errors.Is(err, cluster.ErrAlreadyUp) {
		log.Printf("a cluster is already up in %s; `localcluster down` removes it", cfg.Dir)
		fmt.Printf("export KUBECONFIG=%s\n", cfg.KubeconfigPath())
		return
	}
	if err != nil {
		log.Fatalf("%s: %v", verb, err)
	}
}
