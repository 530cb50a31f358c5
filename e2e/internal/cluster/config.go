// Package cluster brings a real Kubernetes control plane and N simulated nodes up
// on one machine, and tears them down without a trace. etcd and the Kubernetes
// components are real binaries; each node is a network namespace on a shared
// underlay bridge running kube-proxy and nodelet (our stand-in kubelet).
package cluster

import (
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
)

// KubernetesVersion is the pinned version of the control plane binaries.
const KubernetesVersion = "v1.36.3"

// Names and addresses of the local cluster. Everything lives on links and in
// namespaces the launcher creates; nothing routes to the machine's real network.
const (
	// namePrefix starts every link and network namespace the launcher makes, so
	// Down can find leftovers of an interrupted Up.
	namePrefix = "ambk"
	// bridgeName is the underlay bridge in the root namespace joining the nodes.
	bridgeName = namePrefix + "0"
	// apiserverPort is kube-apiserver's secure port on the underlay address.
	apiserverPort = 6443
	// kubeletPort is where each nodelet serves the kubelet API.
	kubeletPort = 10250
	// etcdClientPort and etcdPeerPort are on loopback only.
	etcdClientPort = 2379
	etcdPeerPort   = 2380
	// clusterDomain is the DNS suffix of Services.
	clusterDomain = "cluster.local"
)

var (
	// underlay is the node network; .1 is the root namespace (control plane),
	// node i gets .10+i.
	underlay = netip.MustParsePrefix("172.30.0.0/24")
	// clusterCIDR holds every node's /24 pod CIDR: node i gets 10.244.i.0/24.
	clusterCIDR = netip.MustParsePrefix("10.244.0.0/16")
	// serviceCIDR is the ClusterIP range; its first address is the kubernetes Service.
	serviceCIDR = netip.MustParsePrefix("10.96.0.0/16")
)

// Config says where the cluster's files and binaries are.
type Config struct {
	// Dir holds all state: certificates, kubeconfigs, logs, etcd data, node roots.
	Dir string
	// Nodes is the number of worker nodes (default 2).
	Nodes int
	// KubeBin holds kube-apiserver, kube-controller-manager, kube-scheduler,
	// kube-proxy and kubectl.
	KubeBin string
	// CNIBin holds the standard CNI plugins (bridge, host-local, loopback, portmap).
	CNIBin string
	// BinDir holds this project's binaries (nodelet and the test workloads).
	BinDir string
	// ImageTable is the image -> binary table nodelet uses.
	ImageTable string
	// Etcd is the etcd binary (Debian's etcd-server).
	Etcd string
	// Log, when set, receives a line per step of Up and Down.
	Log func(format string, args ...any)

	apiserverPID int // set by Up, to notice an early exit
}

func (c *Config) logf(format string, args ...any) {
	if c.Log != nil {
		c.Log(format, args...)
	}
}

// Node is one simulated node.
type Node struct {
	Index   int
	Name    string
	NetNS   string       // name under /var/run/netns
	IP      netip.Addr   // underlay address
	PodCIDR netip.Prefix // this node's pod range
	Root    string       // node root dir (hostPath prefix, CNI dirs, pod dirs)
	hostEnd string       // veth end in the root namespace
}

func (c *Config) nodes() []Node {
	nodes := make([]Node, c.Nodes)
	for i := range nodes {
		idx := i + 1
		name := fmt.Sprintf("node%d", idx)
		nodes[i] = Node{
			Index:   idx,
			Name:    name,
			NetNS:   fmt.Sprintf("%s-%s", namePrefix, name),
			IP:      addrAt(underlay, 10+idx),
			PodCIDR: netip.PrefixFrom(addrAt(clusterCIDR, idx*256), 24),
			Root:    filepath.Join(c.Dir, "nodes", name),
			hostEnd: fmt.Sprintf("%s-%s", namePrefix, name),
		}
	}
	return nodes
}

// addrAt returns the n-th address of p (n small enough to stay inside it).
func addrAt(p netip.Prefix, n int) netip.Addr {
	b := p.Masked().Addr().As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// APIServerAddr is the control plane's address on the underlay.
func APIServerAddr() netip.Addr { return addrAt(underlay, 1) }

// KubernetesServiceIP is the ClusterIP of the default/kubernetes Service.
func KubernetesServiceIP() netip.Addr { return addrAt(serviceCIDR, 1) }

func (c *Config) path(elem ...string) string {
	return filepath.Join(append([]string{c.Dir}, elem...)...)
}

// KubeconfigPath is the admin kubeconfig written by Up.
func (c *Config) KubeconfigPath() string { return c.path("kubeconfig") }

// DefaultConfig reads the environment the Makefile sets and falls back to the
// paths the build scripts use.
func DefaultConfig() Config {
	return Config{
		Dir:        envOr("AMBIENT_CLUSTER_DIR", "/var/lib/ambient-mesh/cluster"),
		Nodes:      2,
		KubeBin:    envOr("KUBE_BIN", filepath.Join(cacheDir(), "kube-"+KubernetesVersion)),
		CNIBin:     envOr("CNI_BIN", filepath.Join(cacheDir(), "cni-plugins-v1.9.1")),
		BinDir:     envOr("AMBIENT_BIN", filepath.Join(repoRoot(), "_output/bin")),
		ImageTable: envOr("AMBIENT_IMAGE_TABLE", filepath.Join(repoRoot(), "e2e/cluster/images.yaml")),
		Etcd:       envOr("ETCD", "/usr/bin/etcd"),
	}
}

// repoRoot is the checkout's top directory (the one holding go.work) above the
// working directory, or the working directory when there is none.
func repoRoot() string {
	dir, err := os.Getwd()
	if err != nil {
		return "."
	}
	for d := dir; ; d = filepath.Dir(d) {
		if _, err := os.Stat(filepath.Join(d, "go.work")); err == nil {
			return d
		}
		if filepath.Dir(d) == d {
			return dir
		}
	}
}

// RepoRoot is the checkout's top directory, for tests that apply deploy/.
func RepoRoot() string { return repoRoot() }

func cacheDir() string { return envOr("AMBIENT_CACHE", "/var/cache/ambient-mesh") }

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}
