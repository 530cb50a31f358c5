package cluster

import (
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/vishvananda/netlink"
)

// TestNodeNetworksAreBuiltAndRemovedWithoutATrace builds the underlay and two
// node namespaces for real, checks their routes, and tears them down.
func TestNodeNetworksAreBuiltAndRemovedWithoutATrace(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces and links")
	}
	if leftovers, _ := filepath.Glob(filepath.Join(netnsDir, namePrefix+"-*")); len(leftovers) > 0 {
		t.Skipf("a local cluster is up (%v); not touching its network", leftovers)
	}
	t.Cleanup(func() { teardownNetwork() })
	cfg := Config{Dir: t.TempDir(), Nodes: 2}
	nodes := cfg.nodes()
	if err := setupUnderlay(); err != nil {
		t.Fatal(err)
	}
	for _, n := range nodes {
		if err := setupNodeNetwork(n, nodes); err != nil {
			t.Fatal(err)
		}
		if err := routePodCIDR(n); err != nil {
			t.Fatal(err)
		}
	}
	// From the root namespace: pod ranges go to their node, Service
	// addresses nowhere.
	for dst, wantGw := range map[string]string{"10.244.2.7": "172.30.0.12", "10.96.0.1": ""} {
		routes, err := netlink.RouteGet(net.ParseIP(dst))
		if wantGw == "" {
			if err == nil {
				t.Errorf("root netns routes %s via %v, want unreachable", dst, routes)
			}
			continue
		}
		if err != nil || len(routes) == 0 || routes[0].Gw.String() != wantGw {
			t.Errorf("root netns route to %s = %v (%v), want via %s", dst, routes, err, wantGw)
		}
	}
	err := inNetNS(nodes[0].NetNS, func() error {
		routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
		if err != nil {
			return err
		}
		var dsts []string
		for _, r := range routes {
			if r.Dst == nil {
				t.Errorf("node1 has a default route via %v: traffic could leave the machine", r.Gw)
				continue
			}
			dsts = append(dsts, r.Dst.String())
		}
		joined := strings.Join(dsts, " ")
		for _, want := range []string{"172.30.0.0/24", "10.244.2.0/24", "10.96.0.0/16"} {
			if !strings.Contains(joined, want) {
				t.Errorf("node1 routes %v lack %s", dsts, want)
			}
		}
		fwd, err := os.ReadFile("/proc/sys/net/ipv4/ip_forward")
		if err != nil || strings.TrimSpace(string(fwd)) != "1" {
			t.Errorf("ip_forward in node1 = %q (%v), want 1", fwd, err)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := teardownNetwork(); err != nil {
		t.Fatal(err)
	}
	if routes, _ := netlink.RouteGet(net.ParseIP("10.96.0.1")); len(routes) > 0 && routes[0].LinkIndex != 0 {
		if l, _ := netlink.LinkByIndex(routes[0].LinkIndex); l != nil && strings.HasPrefix(l.Attrs().Name, namePrefix) {
			t.Errorf("a route through %s is left", l.Attrs().Name)
		}
	}
	if _, err := netlink.RouteGet(net.ParseIP("10.96.0.1")); err != nil {
		t.Errorf("the Service range guard is left: %v", err)
	}
	if left, _ := filepath.Glob(filepath.Join(netnsDir, namePrefix+"-*")); len(left) > 0 {
		t.Errorf("namespaces left: %v", left)
	}
	links, _ := netlink.LinkList()
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, namePrefix) {
			t.Errorf("link left: %s", l.Attrs().Name)
		}
	}
}
