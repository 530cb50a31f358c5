package cluster

import (
	"crypto/tls"
	"crypto/x509"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
)

func TestNodesGetDistinctUnderlayAddressesAndPodRanges(t *testing.T) {
	cfg := Config{Dir: "/state", Nodes: 3}
	want := []struct {
		name, netns, ip, podCIDR string
	}{
		{"node1", "ambk-node1", "172.30.0.11", "10.244.1.0/24"},
		{"node2", "ambk-node2", "172.30.0.12", "10.244.2.0/24"},
		{"node3", "ambk-node3", "172.30.0.13", "10.244.3.0/24"},
	}
	got := cfg.nodes()
	if len(got) != len(want) {
		t.Fatalf("got %d nodes, want %d", len(got), len(want))
	}
	for i, w := range want {
		n := got[i]
		if n.Name != w.name || n.NetNS != w.netns || n.IP.String() != w.ip || n.PodCIDR.String() != w.podCIDR {
			t.Errorf("node %d = %s %s %s %s, want %v", i, n.Name, n.NetNS, n.IP, n.PodCIDR, w)
		}
		if !clusterCIDR.Contains(n.PodCIDR.Addr()) || !underlay.Contains(n.IP) {
			t.Errorf("node %s addresses outside the cluster ranges", n.Name)
		}
		if n.Root != filepath.Join("/state", "nodes", w.name) {
			t.Errorf("node %s root = %s", n.Name, n.Root)
		}
	}
}

func TestTheKubernetesServiceIsTheFirstServiceAddress(t *testing.T) {
	if got := KubernetesServiceIP(); got != netip.MustParseAddr("10.96.0.1") {
		t.Errorf("kubernetes Service IP = %s, want 10.96.0.1", got)
	}
	if got := APIServerAddr(); got != netip.MustParseAddr("172.30.0.1") {
		t.Errorf("apiserver address = %s, want 172.30.0.1", got)
	}
}

func TestIssuedCertificatesChainToTheClusterCA(t *testing.T) {
	dir := t.TempDir()
	cfg := Config{Dir: dir, Nodes: 1}
	if err := os.MkdirAll(cfg.path("pki"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := cfg.writePKI(cfg.nodes()); err != nil {
		t.Fatal(err)
	}
	caPEM, err := os.ReadFile(cfg.path("pki", "ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	tests := []struct {
		name, file string
		usage      x509.ExtKeyUsage
		dnsName    string
		cn         string
		org        string
	}{
		{"the apiserver serves kubernetes.default.svc", "kube-apiserver", x509.ExtKeyUsageServerAuth, "kubernetes.default.svc", "kube-apiserver", ""},
		{"a node authenticates as system:node", "node-node1", x509.ExtKeyUsageClientAuth, "", "system:node:node1", "system:nodes"},
		{"the admin is in system:masters", "admin", x509.ExtKeyUsageClientAuth, "", "kubernetes-admin", "system:masters"},
		{"the kubelet API serves the node IP", "kubelet-node1", x509.ExtKeyUsageServerAuth, "172.30.0.11", "node1", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			pair, err := tls.LoadX509KeyPair(cfg.path("pki", tt.file+".crt"), cfg.path("pki", tt.file+".key"))
			if err != nil {
				t.Fatal(err)
			}
			leaf, err := x509.ParseCertificate(pair.Certificate[0])
			if err != nil {
				t.Fatal(err)
			}
			if _, err := leaf.Verify(x509.VerifyOptions{Roots: roots, DNSName: tt.dnsName, KeyUsages: []x509.ExtKeyUsage{tt.usage}}); err != nil {
				t.Errorf("verify: %v", err)
			}
			if leaf.Subject.CommonName != tt.cn {
				t.Errorf("CN = %q, want %q", leaf.Subject.CommonName, tt.cn)
			}
			if tt.org != "" && (len(leaf.Subject.Organization) != 1 || leaf.Subject.Organization[0] != tt.org) {
				t.Errorf("O = %v, want %q", leaf.Subject.Organization, tt.org)
			}
		})
	}
	if fi, err := os.Stat(cfg.path("pki", "ca.key")); err != nil || fi.Mode().Perm() != 0o600 {
		t.Errorf("ca.key mode = %v (err %v), want 0600", fi.Mode(), err)
	}
	if _, err := os.Stat(cfg.KubeconfigPath()); err != nil {
		t.Errorf("admin kubeconfig not written: %v", err)
	}
}

func TestMountinfoEscapesAreUndone(t *testing.T) {
	for in, want := range map[string]string{
		`/a/b`:            "/a/b",
		`/with\040space`:  "/with space",
		`/tab\011and\134`: "/tab\tand\\",
	} {
		if got := unescapeMountPath(in); got != want {
			t.Errorf("unescapeMountPath(%q) = %q, want %q", in, got, want)
		}
	}
}
