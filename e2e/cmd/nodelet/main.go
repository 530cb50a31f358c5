// Command nodelet is the local cluster's stand-in kubelet: it registers its
// node and runs the pods bound to it as local processes. See
// internal/nodelet/README.md.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambient-mesh/ambient/e2e/internal/kubeletapi"
	"github.com/ambient-mesh/ambient/e2e/internal/nodelet"
	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/images"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func main() {
	nsexec.Init()
	log.SetFlags(log.LstdFlags | log.Lmicroseconds)
	if err := run(); err != nil {
		log.Printf("nodelet: %v", err)
		os.Exit(1)
	}
}

func run() error {
	var (
		nodeName     = flag.String("node-name", "", "name of the Node this nodelet runs")
		nodeIP       = flag.String("node-ip", "", "the node's InternalIP")
		podCIDR      = flag.String("pod-cidr", "", "the node's pod CIDR(s), comma-separated, primary first")
		kubeconfig   = flag.String("kubeconfig", "", "kubeconfig with the node's credentials (system:node:<node>)")
		root         = flag.String("root", "", "the node's root dir")
		cniConfDir   = flag.String("cni-conf-dir", "", "CNI network config dir (default <root>/etc/cni/net.d)")
		cniBinDir    = flag.String("cni-bin-dir", "", "CNI plugin dir (default <root>/opt/cni/bin)")
		imageTable   = flag.String("image-table", "", "YAML table mapping images to local programs")
		binDir       = flag.String("bin-dir", "", "dir searched first for image entrypoints")
		certFile     = flag.String("tls-cert-file", "", "serving certificate of the kubelet API")
		keyFile      = flag.String("tls-private-key-file", "", "key of the serving certificate")
		clientCA     = flag.String("client-ca-file", "", "CA that signs kubelet API client certificates")
		port         = flag.Int("port", 10250, "kubelet API port")
		svcHost      = flag.String("kubernetes-service-host", "10.96.0.1", "KUBERNETES_SERVICE_HOST given to containers")
		svcPort      = flag.String("kubernetes-service-port", "443", "KUBERNETES_SERVICE_PORT given to containers")
		crashBackoff = flag.Duration("crash-backoff", 10*time.Second, "first container restart back-off; doubles per restart up to 5m")
		maxPods      = flag.Int("max-pods", 110, "pods the node offers")
	)
	flag.Parse()
	if *root == "" {
		return errors.New("--root is required")
	}
	absRoot, err := filepath.Abs(*root)
	if err != nil {
		return fmt.Errorf("resolving --root: %w", err)
	}
	table, err := images.Load(*imageTable)
	if err != nil {
		return err
	}
	restCfg, err := clientcmd.BuildConfigFromFlags("", *kubeconfig)
	if err != nil {
		return fmt.Errorf("loading kubeconfig: %w", err)
	}
	restCfg.UserAgent = "nodelet/" + nodelet.KubeletVersion + " (" + *nodeName + ")"
	// The kubelet's defaults (kubeAPIQPS 50, kubeAPIBurst 100); client-go's
	// own 5/10 throttles a node starting a few pods to seconds per pod.
	restCfg.QPS, restCfg.Burst = 50, 100
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return fmt.Errorf("building api client: %w", err)
	}
	var cidrs []string
	for c := range strings.SplitSeq(*podCIDR, ",") {
		if c = strings.TrimSpace(c); c != "" {
			cidrs = append(cidrs, c)
		}
	}
	n, err := nodelet.New(nodelet.Config{
		NodeName: *nodeName, NodeIP: *nodeIP, PodCIDRs: cidrs,
		Root: absRoot, CNIConfDir: *cniConfDir, CNIBinDir: *cniBinDir,
		BinDir: *binDir, Images: table, Port: int32(*port),
		KubernetesServiceHost: *svcHost, KubernetesServicePort: *svcPort,
		CrashBackoff: *crashBackoff, MaxPods: *maxPods, Client: client,
	})
	if err != nil {
		return err
	}
	api, err := kubeletapi.New(kubeletapi.Config{
		Addr:     ":" + strconv.Itoa(*port),
		CertFile: *certFile, KeyFile: *keyFile, ClientCAFile: *clientCA,
		NodeName: *nodeName, Client: client, Runtime: n,
	})
	if err != nil {
		return err
	}
	defer api.Close()

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	apiErr := make(chan error, 1)
	go func() {
		err := api.Run(ctx)
		if err != nil && ctx.Err() == nil {
			// A node whose kubelet API is down is not one to keep running.
			log.Printf("nodelet: kubelet api: %v", err)
			stop()
		}
		apiErr <- err
	}()
	runErr := n.Run(ctx)
	stop()
	if err := <-apiErr; err != nil && !errors.Is(err, context.Canceled) {
		runErr = errors.Join(runErr, fmt.Errorf("kubelet api: %w", err))
	}
	return runErr
}
