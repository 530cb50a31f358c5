package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netnsDir is where iproute2 and this launcher keep named network namespaces.
const netnsDir = "/var/run/netns"

// setupUnderlay creates the bridge joining the nodes, with the control plane's
// address on it. Traffic to it never leaves the machine: the bridge has no
// uplink and the nodes have no default route.
func setupUnderlay() error {
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := netlink.LinkAdd(br); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("adding bridge %s: %w", bridgeName, err)
	}
	link, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return fmt.Errorf("finding bridge %s: %w", bridgeName, err)
	}
	addr := &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(APIServerAddr(), underlay.Bits()))}
	if err := netlink.AddrReplace(link, addr); err != nil {
		return fmt.Errorf("addressing bridge %s: %w", bridgeName, err)
	}
	if err := netlink.LinkSetUp(link); err != nil {
		return fmt.Errorf("bringing up bridge %s: %w", bridgeName, err)
	}
	// The root namespace holds the control plane and the tests; nothing here
	// runs kube-proxy, so a ClusterIP sent from here would follow the
	// machine's default route out. Make the Service range unreachable.
	if err := netlink.RouteReplace(serviceRangeGuard()); err != nil {
		return fmt.Errorf("guarding %s in the root netns: %w", serviceCIDR, err)
	}
	return nil
}

func serviceRangeGuard() *netlink.Route {
	return &netlink.Route{Dst: prefixNet(serviceCIDR), Type: unix.RTN_UNREACHABLE}
}

// routePodCIDR routes a node's pod range from the root namespace through the
// node, as a control-plane node's routes do, so the apiserver and tests on this
// side reach pod IPs (and nothing for that range follows the default route).
func routePodCIDR(n Node) error {
	br, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return err
	}
	r := &netlink.Route{LinkIndex: br.Attrs().Index, Dst: prefixNet(n.PodCIDR), Gw: net.IP(n.IP.AsSlice())}
	if err := netlink.RouteReplace(r); err != nil {
		return fmt.Errorf("routing %s via %s from the root netns: %w", n.PodCIDR, n.Name, err)
	}
	return nil
}

// setupNodeNetwork creates the node's network namespace, plugs it into the
// underlay with a veth pair and routes the other nodes' pod ranges to them.
func setupNodeNetwork(n Node, all []Node) (err error) {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	origin, err := netns.Get()
	if err != nil {
		return fmt.Errorf("getting current netns: %w", err)
	}
	defer origin.Close()
	// NewNamed switches this thread into the new namespace.
	handle, err := netns.NewNamed(n.NetNS)
	if err != nil {
		return fmt.Errorf("creating netns %s: %w", n.NetNS, err)
	}
	defer handle.Close()
	if err := netns.Set(origin); err != nil {
		return fmt.Errorf("returning to the root netns: %w", err)
	}

	veth := &netlink.Veth{
		LinkAttrs: netlink.LinkAttrs{Name: n.hostEnd, MTU: 1500},
		PeerName:  "eth0",
		// Create the peer directly inside the node's namespace.
		PeerNamespace: netlink.NsFd(int(handle)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return fmt.Errorf("adding veth for %s: %w", n.Name, err)
	}
	br, err := netlink.LinkByName(bridgeName)
	if err != nil {
		return err
	}
	hostEnd, err := netlink.LinkByName(n.hostEnd)
	if err != nil {
		return err
	}
	if err := netlink.LinkSetMaster(hostEnd, br); err != nil {
		return fmt.Errorf("attaching %s to %s: %w", n.hostEnd, bridgeName, err)
	}
	if err := netlink.LinkSetUp(hostEnd); err != nil {
		return err
	}

	nh, err := netlink.NewHandleAt(handle)
	if err != nil {
		return fmt.Errorf("netlink handle in %s: %w", n.NetNS, err)
	}
	defer nh.Close()
	lo, err := nh.LinkByName("lo")
	if err != nil {
		return err
	}
	if err := nh.LinkSetUp(lo); err != nil {
		return err
	}
	eth0, err := nh.LinkByName("eth0")
	if err != nil {
		return err
	}
	if err := nh.AddrAdd(eth0, &netlink.Addr{IPNet: prefixNet(netip.PrefixFrom(n.IP, underlay.Bits()))}); err != nil {
		return fmt.Errorf("addressing %s eth0: %w", n.Name, err)
	}
	if err := nh.LinkSetUp(eth0); err != nil {
		return err
	}
	for _, other := range all {
		if other.Name == n.Name {
			continue
		}
		route := &netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: prefixNet(other.PodCIDR), Gw: net.IP(other.IP.AsSlice())}
		if err := nh.RouteAdd(route); err != nil {
			return fmt.Errorf("routing %s via %s: %w", other.PodCIDR, other.Name, err)
		}
	}
	// ClusterIPs need a route so connect() gets as far as kube-proxy's DNAT;
	// a packet that no Service rule rewrites stays on the underlay and dies.
	if err := nh.RouteAdd(&netlink.Route{LinkIndex: eth0.Attrs().Index, Dst: prefixNet(serviceCIDR), Scope: netlink.SCOPE_LINK}); err != nil {
		return fmt.Errorf("routing %s: %w", serviceCIDR, err)
	}
	return inNetNS(n.NetNS, func() error {
		for _, kv := range [][2]string{
			{"net/ipv4/ip_forward", "1"},
			{"net/ipv4/conf/all/rp_filter", "0"},
		} {
			if err := os.WriteFile(filepath.Join("/proc/sys", kv[0]), []byte(kv[1]), 0o644); err != nil {
				return fmt.Errorf("sysctl %s in %s: %w", kv[0], n.NetNS, err)
			}
		}
		return nil
	})
}

// inNetNS runs fn on a locked thread inside the named network namespace.
func inNetNS(name string, fn func() error) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	origin, err := netns.Get()
	if err != nil {
		return err
	}
	defer origin.Close()
	target, err := netns.GetFromName(name)
	if err != nil {
		return fmt.Errorf("opening netns %s: %w", name, err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		return fmt.Errorf("entering netns %s: %w", name, err)
	}
	defer netns.Set(origin)
	return fn()
}

// teardownNetwork removes every namespace and link named with our prefix,
// whether or not this process made them.
func teardownNetwork() error {
	var errs []error
	if err := netlink.RouteDel(serviceRangeGuard()); err != nil && !errors.Is(err, syscall.ESRCH) {
		errs = append(errs, fmt.Errorf("removing the %s guard route: %w", serviceCIDR, err))
	}
	// Links first: deleting a host veth end deletes its peer at once, while a
	// deleted namespace releases its links only when the kernel gets to it.
	links, err := netlink.LinkList()
	if err != nil {
		errs = append(errs, err)
	}
	for _, l := range links {
		if strings.HasPrefix(l.Attrs().Name, namePrefix) {
			if err := netlink.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
				errs = append(errs, fmt.Errorf("deleting link %s: %w", l.Attrs().Name, err))
			}
		}
	}
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if !strings.HasPrefix(e.Name(), namePrefix+"-") {
			continue
		}
		if err := netns.DeleteNamed(e.Name()); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, fmt.Errorf("deleting netns %s: %w", e.Name(), err))
		}
	}
	return errors.Join(errs...)
}

func prefixNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: net.IP(p.Addr().AsSlice()), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}
