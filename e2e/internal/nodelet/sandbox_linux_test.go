package nodelet

import (
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/record"
)

// cniBinDir is where the standard plugins are built (e2e/hack/build-kube.sh);
// AMBIENT_CNI_BIN overrides it.
func cniBinDir(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: creates network namespaces")
	}
	dir := os.Getenv("AMBIENT_CNI_BIN")
	if dir == "" {
		dir = "/var/cache/ambient-mesh/cni-plugins-v1.9.1"
	}
	for _, p := range []string{"bridge", "host-local"} {
		if _, err := os.Stat(filepath.Join(dir, p)); err != nil {
			t.Skipf("CNI plugin %s not found in %s (build them with e2e/hack/build-kube.sh or set AMBIENT_CNI_BIN)", p, dir)
		}
	}
	return dir
}

// testNode is a throwaway node: a netns standing for the node, a node root
// and a CNI config of the standard bridge + host-local chain.
type testNode struct {
	root   string
	nodeNS ns.NetNS
	n      *Nodelet
}

func newTestNode(t *testing.T, conflist string) *testNode {
	t.Helper()
	bin := cniBinDir(t)
	root := t.TempDir()
	confDir := filepath.Join(root, "etc/cni/net.d")
	if err := os.MkdirAll(confDir, 0o755); err != nil {
		t.Fatal(err)
	}
	conflist = strings.ReplaceAll(conflist, "@IPAM@", filepath.Join(root, "ipam"))
	if err := os.WriteFile(filepath.Join(confDir, "10-test.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	// A file sorting after ours must not be picked.
	if err := os.WriteFile(filepath.Join(confDir, "99-other.conflist"), []byte(`{"name":"other","cniVersion":"1.0.0","plugins":[{"type":"nosuch"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	nodePath := filepath.Join(root, "node.netns")
	if err := createNetNS(nodePath); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { removeNetNS(nodePath) })
	nodeNS, err := ns.GetNS(nodePath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { nodeNS.Close() })
	n, err := New(Config{NodeName: "n1", NodeIP: "10.250.0.2", Root: root, CNIBinDir: bin,
		Client: fake.NewClientset(), Logf: t.Logf})
	if err != nil {
		t.Fatal(err)
	}
	n.recorder = record.NewFakeRecorder(100)
	return &testNode{root: root, nodeNS: nodeNS, n: n}
}

const bridgeChain = `{
  "cniVersion": "1.0.0", "name": "testnet",
  "plugins": [{
    "type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false,
    "ipam": {"type": "host-local", "dataDir": "@IPAM@", "ranges": [[{"subnet": "10.244.7.0/24"}]]}
  }]
}`

func sandboxPod(name string) *corev1.Pod {
	return &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("11111111-2222-3333-4444-" + name)}}
}

func TestSandboxWithRealCNIChain(t *testing.T) {
	node := newTestNode(t, bridgeChain)
	pod := sandboxPod("000000000001")
	w := newPodWorker(node.n, pod)
	ctx := context.Background()

	var setupErr error
	node.nodeNS.Do(func(ns.NetNS) error {
		setupErr = w.setupSandbox(ctx, pod)
		return nil
	})
	if setupErr != nil {
		t.Fatalf("setupSandbox: %v", setupErr)
	}
	nsPath := node.n.netnsPath(pod.UID)
	t.Cleanup(func() {
		node.nodeNS.Do(func(ns.NetNS) error { w.teardownSandbox(ctx); return nil })
	})
	if len(w.podIPs) != 1 || !strings.HasPrefix(w.podIPs[0], "10.244.7.") {
		t.Fatalf("pod IPs = %v, want one in 10.244.7.0/24", w.podIPs)
	}
	if got, err := node.n.PodNetNS("default", pod.Name); err == nil || got != "" {
		// The worker is not registered with the nodelet in this test.
		t.Logf("PodNetNS = %q, %v", got, err)
	}

	// Inside the pod: lo up, eth0 with the pod IP.
	podNS, err := ns.GetNS(nsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer podNS.Close()
	var ln net.Listener
	err = podNS.Do(func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if lo.Attrs().Flags&net.FlagUp == 0 {
			return fmt.Errorf("lo is down")
		}
		if _, err := netlink.LinkByName(podIfName); err != nil {
			return fmt.Errorf("no %s: %w", podIfName, err)
		}
		ln, err = net.Listen("tcp", net.JoinHostPort(w.podIPs[0], "8080"))
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() {
		c, err := ln.Accept()
		if err == nil {
			io.WriteString(c, "pong")
			c.Close()
		}
	}()

	// From the node's namespace the pod answers through the bridge.
	err = node.nodeNS.Do(func(ns.NetNS) error {
		c, err := net.DialTimeout("tcp", net.JoinHostPort(w.podIPs[0], "8080"), 5*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(5 * time.Second))
		b, err := io.ReadAll(c)
		if string(b) != "pong" {
			return fmt.Errorf("read %q, %v", b, err)
		}
		return nil
	})
	if err != nil {
		t.Fatalf("node to pod: %v", err)
	}

	// Teardown: CNI DEL releases the address and the netns is gone.
	node.nodeNS.Do(func(ns.NetNS) error { w.teardownSandbox(ctx); return nil })
	if _, err := os.Stat(nsPath); !os.IsNotExist(err) {
		t.Errorf("netns %s still there: %v", nsPath, err)
	}
	if _, err := os.Stat(filepath.Join(node.root, "ipam", "testnet", w.podIPs[0])); !os.IsNotExist(err) {
		t.Errorf("host-local still holds %s: %v", w.podIPs[0], err)
	}
	if name := node.n.network.cachedNetwork(string(pod.UID)); name != "" {
		t.Errorf("libcni cache still holds the pod (network %s)", name)
	}
}

func TestSandboxFailureLeavesNothing(t *testing.T) {
	chain := `{
  "cniVersion": "1.0.0", "name": "broken",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true,
     "ipam": {"type": "host-local", "dataDir": "@IPAM@", "ranges": [[{"subnet": "10.244.8.0/24"}]]}},
    {"type": "no-such-plugin"}
  ]
}`
	node := newTestNode(t, chain)
	pod := sandboxPod("000000000002")
	w := newPodWorker(node.n, pod)
	var err error
	node.nodeNS.Do(func(ns.NetNS) error {
		err = w.setupSandbox(context.Background(), pod)
		return nil
	})
	if err == nil {
		node.nodeNS.Do(func(ns.NetNS) error { w.teardownSandbox(context.Background()); return nil })
		t.Fatal("setupSandbox succeeded with a missing plugin")
	}
	t.Logf("setupSandbox: %v", err)
	if _, statErr := os.Stat(node.n.netnsPath(pod.UID)); !os.IsNotExist(statErr) {
		t.Errorf("netns left behind: %v", statErr)
	}
	entries, _ := os.ReadDir(filepath.Join(node.root, "ipam", "broken"))
	for _, e := range entries {
		if net.ParseIP(e.Name()) != nil {
			t.Errorf("host-local still holds %s", e.Name())
		}
	}
	if w.hasSandbox() {
		t.Error("worker thinks it has a sandbox")
	}
}

func TestLeftoverNetnsIsCleanedOnStart(t *testing.T) {
	node := newTestNode(t, bridgeChain)
	pod := sandboxPod("000000000003")
	w := newPodWorker(node.n, pod)
	var err error
	node.nodeNS.Do(func(ns.NetNS) error { err = w.setupSandbox(context.Background(), pod); return nil })
	if err != nil {
		t.Fatal(err)
	}
	ip := w.podIPs[0]
	// A new nodelet on the same root finds the namespace and undoes it.
	node.nodeNS.Do(func(ns.NetNS) error { node.n.cleanLeftovers(context.Background()); return nil })
	if _, err := os.Stat(node.n.netnsPath(pod.UID)); !os.IsNotExist(err) {
		t.Errorf("leftover netns still there: %v", err)
	}
	if _, err := os.Stat(filepath.Join(node.root, "ipam", "testnet", ip)); !os.IsNotExist(err) {
		t.Errorf("host-local still holds %s: %v", ip, err)
	}
}
