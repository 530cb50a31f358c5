package inpod

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
)

// Foreign client addresses: owned by nothing in the test namespaces.
var (
	client4 = netip.MustParseAddr("10.200.9.7")
	client6 = netip.MustParseAddr("fd00:209::7")
)

// podRouting gives the namespace the eBPF engine's policy routing
// (cni-plugin/internal/redirect): ztunnel's marked traffic looks up the
// main table, all other TCP table 133, whose only routes deliver to the
// namespace's own stack over lo. That is what brings a transparent dial's
// SYN (marked, bound to lo) to the app and the app's replies to a foreign
// client back to the dialing socket.
func (n *testNetns) podRouting(tb testing.TB) {
	tb.Helper()
	const table = 133
	lo, err := n.h.LinkByName("lo")
	if err != nil {
		tb.Fatal(err)
	}
	for _, dst := range []string{"0.0.0.0/0", "::/0"} {
		_, ipn, _ := net.ParseCIDR(dst)
		r := &netlink.Route{LinkIndex: lo.Attrs().Index, Dst: ipn, Table: table, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST}
		if err := n.h.RouteAdd(r); err != nil {
			tb.Fatalf("route local %s table %d: %v", dst, table, err)
		}
	}
	for _, family := range []int{unix.AF_INET, unix.AF_INET6} {
		mark := netlink.NewRule()
		mark.Family, mark.Priority, mark.Table = family, 100, unix.RT_TABLE_MAIN
		mark.Mark, mark.Mask = bpfredirect.Mark, new(uint32(0xfff))
		capture := netlink.NewRule()
		capture.Family, capture.Priority, capture.Table, capture.IPProto = family, 101, table, unix.IPPROTO_TCP
		for _, r := range []*netlink.Rule{mark, capture} {
			if err := n.h.RuleAdd(r); err != nil {
				tb.Fatalf("rule %v: %v", r, err)
			}
		}
	}
}

// servedWorkload adds a pod for n to m and returns the Workload its
// handlers see: what a proxy dials from.
func servedWorkload(tb testing.TB, n *testNetns, ac *agentConn, rec *recorder, uid string) *Workload {
	tb.Helper()
	ac.mustAck("add", addReq(uid, "ns", "pod"), n.fd())
	c, err := n.dial(netip.AddrPortFrom(podIP4, bpfredirect.PortHBONE))
	if err != nil {
		tb.Fatal(err)
	}
	exchange(tb, c)
	c.Close()
	return rec.next(tb).w
}

// accepted returns the connection l accepts next.
func accepted(tb testing.TB, l *net.TCPListener) net.Conn {
	tb.Helper()
	l.SetDeadline(time.Now().Add(5 * time.Second))
	a, err := l.Accept()
	if err != nil {
		tb.Fatalf("the app accepted nothing: %v", err)
	}
	tb.Cleanup(func() { a.Close() })
	return a
}

// talk checks that bytes flow both ways between the dialer c and the app's
// accepted a.
func talk(tb testing.TB, c, a net.Conn) {
	tb.Helper()
	for _, dir := range []struct {
		from, to net.Conn
		what     string
	}{{c, a, "to the app"}, {a, c, "back from the app"}} {
		dir.from.SetDeadline(time.Now().Add(5 * time.Second))
		dir.to.SetDeadline(time.Now().Add(5 * time.Second))
		if _, err := fmt.Fprintln(dir.from, "ping"); err != nil {
			tb.Fatalf("writing %s: %v", dir.what, err)
		}
		if got, err := bufio.NewReader(dir.to).ReadString('\n'); err != nil || got != "ping\n" {
			tb.Fatalf("reading %s: %q, %v", dir.what, got, err)
		}
	}
}

func boundDevice(tb testing.TB, sc syscall.Conn) string {
	tb.Helper()
	rc, err := sc.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var dev string
	var gerr error
	if err := rc.Control(func(fd uintptr) { dev, gerr = unix.GetsockoptString(int(fd), unix.SOL_SOCKET, unix.SO_BINDTODEVICE) }); err != nil || gerr != nil {
		tb.Fatalf("getsockopt SO_BINDTODEVICE: %v %v", err, gerr)
	}
	return dev
}

func TestDialFromConnectsToTheAppAsTheClient(t *testing.T) {
	n := newTestNetns(t)
	n.podRouting(t)
	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())
	w := servedWorkload(t, n, agent.accept(t), rec, "uid-src")
	apps := map[bool]*net.TCPListener{
		true:  n.listen(t, netip.AddrPortFrom(podIP4, 8080)),
		false: n.listen(t, netip.AddrPortFrom(podIP6, 8080)),
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	type dialFunc func(ctx context.Context, src netip.Addr, network, addr string) (net.Conn, error)
	dialFrom := func(ctx context.Context, src netip.Addr, network, addr string) (net.Conn, error) {
		return m.DialFrom(ctx, w, src, network, addr)
	}

	for _, tc := range []struct {
		name string
		dial dialFunc
		src  netip.Addr
		dst  netip.AddrPort
	}{
		{"DialFrom reaches the app on IPv4 from the client's address", dialFrom, client4, netip.AddrPortFrom(podIP4, 8080)},
		{"DialFrom reaches the app on IPv6 from the client's address", dialFrom, client6, netip.AddrPortFrom(podIP6, 8080)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c, err := tc.dial(ctx, tc.src, "tcp", tc.dst.String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			a := accepted(t, apps[tc.dst.Addr().Is4()])
			if got := unmappedAddr(a.RemoteAddr()); got.Addr() != tc.src || got != unmappedAddr(c.LocalAddr()) {
				t.Errorf("the app's peer is %v, the dialer is %v; want the client address %v", got, c.LocalAddr(), tc.src)
			}
			tc := c.(*net.TCPConn)
			if got := sockopt(t, tc, unix.SOL_SOCKET, unix.SO_MARK); got != bpfredirect.Mark {
				t.Errorf("SO_MARK %#x, want %#x", got, bpfredirect.Mark)
			}
			level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
			if unmappedAddr(c.LocalAddr()).Addr().Is6() {
				level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
			}
			if got := sockopt(t, tc, level, opt); got != 1 {
				t.Errorf("transparent option %d, want 1", got)
			}
			if got := boundDevice(t, tc); got != "lo" {
				t.Errorf("bound to device %q, want lo", got)
			}
			talk(t, c, a)
		})
	}

	t.Run("connections from one client get a port each", func(t *testing.T) {
		seen := map[netip.AddrPort]bool{}
		for range 20 {
			c, err := m.DialFrom(ctx, w, client4, "tcp", netip.AddrPortFrom(podIP4, 8080).String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			a := accepted(t, apps[true])
			peer := unmappedAddr(a.RemoteAddr())
			if seen[peer] || peer.Addr() != client4 {
				t.Fatalf("the app's peer %v: repeated or not the client", peer)
			}
			seen[peer] = true
		}
	})

	t.Run("Dial without a source keeps the pod's own address", func(t *testing.T) {
		c, err := m.Dial(ctx, w, "tcp", netip.AddrPortFrom(podIP4, 8080).String())
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		a := accepted(t, apps[true])
		if got := unmappedAddr(a.RemoteAddr()).Addr(); got != podIP4 {
			t.Errorf("the app's peer is %v, want the pod's own %v", got, podIP4)
		}
		if got := boundDevice(t, c.(*net.TCPConn)); got != "" {
			t.Errorf("a plain dial is bound to %q", got)
		}
	})

	for _, tc := range []struct {
		name string
		dial dialFunc
		src  string
		dst  netip.AddrPort
	}{
		{"DialFrom without an address", dialFrom, "", netip.AddrPortFrom(podIP4, 8080)},
		{"DialFrom an IPv4 client to an IPv6 app", dialFrom, client4.String(), netip.AddrPortFrom(podIP6, 8080)},
		{"DialFrom the loopback address", dialFrom, "127.0.0.1", netip.AddrPortFrom(podIP4, 8080)},
		{"DialFrom the unspecified address", dialFrom, "::", netip.AddrPortFrom(podIP6, 8080)},
	} {
		t.Run(tc.name+" is refused before any socket is made", func(t *testing.T) {
			var src netip.Addr
			if tc.src != "" {
				src = netip.MustParseAddr(tc.src)
			}
			c, err := tc.dial(ctx, src, "tcp", tc.dst.String())
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if !errors.Is(err, ErrUnusableSource) {
				t.Errorf("error %v, want ErrUnusableSource", err)
			}
		})
	}
}

// TestDialFromIsLeftToTheAppByTheEBPFEngine: the eBPF engine's sk_lookup
// program hands connections that arrive on the pod's interface from a
// foreign address to ztunnel's inbound listener. A transparent dial's SYN
// has exactly that source, so only its arrival on lo (SO_BINDTODEVICE)
// keeps it from being captured by ztunnel itself.
func TestDialFromIsLeftToTheAppByTheEBPFEngine(t *testing.T) {
	n := newTestNetns(t)
	if err := bpfredirect.Supported(); err != nil {
		t.Skipf("eBPF engine unsupported here: %v", err)
	}
	uid := fmt.Sprintf("test-inpod-src-%d", os.Getpid())
	if err := bpfredirect.Attach(fmt.Sprintf("/proc/self/fd/%d", n.fd()), uid, []netip.Addr{podIP4, podIP6}); err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Cleanup(func() {
		if err := bpfredirect.Detach(uid); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	n.podRouting(t)
	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())
	w := servedWorkload(t, n, agent.accept(t), rec, uid)
	if ws := m.Workloads(); len(ws) != 1 || ws[0].Redirection != RedirectionEBPF {
		t.Fatalf("Workloads() = %+v, want the pod redirected by eBPF", ws)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	for _, src := range []netip.Addr{client4, client6} {
		t.Run("from "+src.String(), func(t *testing.T) {
			dst := netip.AddrPortFrom(podIP4, 8080)
			if src.Is6() {
				dst = netip.AddrPortFrom(podIP6, 8080)
			}
			app := n.listen(t, dst)
			c, err := m.DialFrom(ctx, w, src, "tcp", dst.String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			a := accepted(t, app)
			if got := unmappedAddr(a.RemoteAddr()).Addr(); got != src {
				t.Errorf("the app's peer is %v, want %v", got, src)
			}
			talk(t, c, a)
			select {
			case e := <-rec.events:
				t.Errorf("ztunnel's own listener captured the dial: %+v", e)
			default:
			}
		})
	}
}
