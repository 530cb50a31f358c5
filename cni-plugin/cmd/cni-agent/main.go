// Command cni-agent is the ambient mesh's node agent (see package agent):
// it runs as a host-network, privileged DaemonSet pod on every node.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/agent"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniconf"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "cni-agent:", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		cfg        agent.Config
		kubeconfig string
		logLevel   slog.Level
	)
	fs := flag.NewFlagSet("cni-agent", flag.ContinueOnError)
	fs.StringVar(&cfg.NodeName, "node-name", os.Getenv("NODE_NAME"), "this node's name (env NODE_NAME)")
	fs.StringVar(&cfg.SystemNamespace, "system-namespace", envOr("POD_NAMESPACE", agent.DefaultSystemNamespace), "namespace of the mesh's own components, never enrolled (env POD_NAMESPACE)")
	fs.StringVar(&cfg.CNIConfDir, "cni-conf-dir", agent.DefaultCNIConfDir, "the node's CNI configuration directory")
	fs.StringVar(&cfg.CNIBinDir, "cni-bin-dir", agent.DefaultCNIBinDir, "the node's CNI plugin directory")
	fs.StringVar(&cfg.CNIBinary, "cni-binary", defaultBinary(), "the ambient-cni binary to install into --cni-bin-dir")
	fs.StringVar(&cfg.AgentSocket, "agent-socket", agent.DefaultAgentSocket, "unix socket the plugin reaches the agent on")
	fs.StringVar(&cfg.ZDSSocket, "zds-socket", agent.DefaultZDSSocket, "unix socket ztunnel connects to (ZDS)")
	fs.StringVar(&cfg.Engine, "engine", "auto", `redirection engine: "auto" (eBPF when the kernel supports it), "ebpf" or "nftables"`)
	fs.StringVar(&cfg.DebugAddr, "debug-addr", agent.DefaultDebugAddr, "address of /debug/enrolled, /debug/zds and /healthz/ready; empty disables")
	fs.StringVar(&cfg.ProcDir, "proc-dir", agent.DefaultProcDir, "the host's /proc, scanned for running pods' network namespaces")
	fs.StringVar(&cfg.NetnsDir, "netns-dir", agent.DefaultNetnsDir, "the runtime's named network namespaces; empty skips them")
	fs.BoolVar(&cfg.UninstallOnExit, "uninstall-on-exit", false, "remove the plugin from the CNI configuration on exit (only when removing the agent for good)")
	fs.IntVar(&cfg.Workers, "workers", agent.DefaultWorkers, "pods reconciled in parallel")
	fs.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file; empty uses the in-cluster service account")
	fs.TextVar(&logLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn, error")
	if err := fs.Parse(os.Args[1:]); errors.Is(err, flag.ErrHelp) {
		return nil
	} else if err != nil {
		return err
	}
	log := slog.New(slog.NewJSONHandler(os.Stderr, &slog.HandlerOptions{Level: logLevel}))
	cfg.Log = log

	restCfg, err := restConfig(kubeconfig)
	if err != nil {
		return err
	}
	restCfg.QPS, restCfg.Burst = 50, 100
	restCfg.UserAgent = "cni-agent/" + cfg.NodeName
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("creating kubernetes client: %w", err)
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()

	if cfg.NodeName == "" {
		return fmt.Errorf("--node-name (or NODE_NAME) is required")
	}
	node, err := client.CoreV1().Nodes().Get(ctx, cfg.NodeName, metav1.GetOptions{})
	if err != nil {
		return fmt.Errorf("looking up node %s: %w", cfg.NodeName, err)
	}
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		p, err := netip.ParsePrefix(c)
		if err != nil {
			return fmt.Errorf("parsing pod CIDR %q of node %s: %w", c, cfg.NodeName, err)
		}
		cfg.PodCIDRs = append(cfg.PodCIDRs, p)
	}
	if len(cfg.PodCIDRs) == 0 {
		log.Warn("node has no pod CIDRs; probe SNAT applies to every enrolled pod IP", "node", cfg.NodeName)
	}

	a, err := agent.New(client, cfg)
	if err != nil {
		return err
	}
	log.Info("cni-agent starting", "node", cfg.NodeName, "engine", a.Engine(), "podCIDRs", cfg.PodCIDRs)
	err = a.Run(ctx)
	log.Info("cni-agent stopped", "error", err)
	return err
}

func restConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig != "" {
		c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
		if err != nil {
			return nil, fmt.Errorf("loading kubeconfig: %w", err)
		}
		return c, nil
	}
	c, err := rest.InClusterConfig()
	if err != nil {
		return nil, fmt.Errorf("loading in-cluster config: %w", err)
	}
	return c, nil
}

// defaultBinary is the ambient-cni binary shipped next to this one.
func defaultBinary() string {
	exe, err := os.Executable()
	if err != nil {
		return cniconf.PluginType
	}
	return filepath.Join(filepath.Dir(exe), cniconf.PluginType)
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
