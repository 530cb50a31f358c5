package redirect

import (
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/asm"
	"github.com/cilium/ebpf/link"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// Addresses live only inside the namespaces the test creates.
var (
	podIP4  = netip.MustParseAddr("10.200.0.2")
	peerIP4 = netip.MustParseAddr("10.200.0.1")
	podIP6  = netip.MustParseAddr("fd00:200::2")
	peerIP6 = netip.MustParseAddr("fd00:200::1")
)

const tableCapture = 133

// testPod is a pod netns wired by a veth to a peer netns (the "network").
type testPod struct {
	uid       string
	pod, peer *testNS
	podLink   *netlink.Handle
	podAddrs  []netip.Addr
}

// newTestPod builds both namespaces and, in the pod's, the routing half of
// the engine as the contract describes it (the real installer lives in
// cni-plugin/internal/redirect); it does not attach the program.
func newTestPod(tb testing.TB) *testPod {
	tb.Helper()
	requireRoot(tb)
	tp := &testPod{uid: randName("test-"), pod: newNS(tb, "amb-pod-"), peer: newNS(tb, "amb-peer-")}
	tp.podAddrs = []netip.Addr{podIP4, podIP6}
	tb.Cleanup(func() {
		if err := Detach(tp.uid); err != nil {
			tb.Errorf("cleanup detach: %v", err)
		}
	})

	ph, err := netlink.NewHandleAt(tp.pod.handle)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(ph.Close)
	tp.podLink = ph
	qh, err := netlink.NewHandleAt(tp.peer.handle)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(qh.Close)

	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
	}
	veth := &netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0p", PeerNamespace: netlink.NsFd(tp.peer.handle)}
	must(ph.LinkAdd(veth))
	up := func(h *netlink.Handle, name string, addrs ...string) netlink.Link {
		l, err := h.LinkByName(name)
		must(err)
		for _, a := range addrs {
			ad, err := netlink.ParseAddr(a)
			must(err)
			ad.Flags = unix.IFA_F_NODAD // usable at once, no DAD wait
			must(h.AddrAdd(l, ad))
		}
		must(h.LinkSetUp(l))
		return l
	}
	lo := up(ph, "lo")
	eth := up(ph, "eth0", "10.200.0.2/24", "fd00:200::2/64")
	up(qh, "lo")
	// The peer also owns the probe source, standing in for the node.
	up(qh, "eth0p", "10.200.0.1/24", "fd00:200::1/64", "169.254.7.127/32")

	// With table 133 every remote address looks local to the reverse-path
	// check, which would drop what comes in (even ARP) as a martian source.
	must(tp.pod.Do(func() error {
		for _, kv := range [][2]string{
			{"net/ipv4/conf/eth0/accept_local", "1"},
			{"net/ipv4/conf/eth0/rp_filter", "0"},
			{"net/ipv4/conf/all/rp_filter", "0"},
		} {
			if err := os.WriteFile("/proc/sys/"+kv[0], []byte(kv[1]), 0o644); err != nil {
				return err
			}
		}
		return nil
	}))
	must(ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: peerIP4.AsSlice()}))
	must(ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Gw: peerIP6.AsSlice()}))
	must(ph.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Dst: prefix("169.254.7.127/32"), Scope: netlink.SCOPE_LINK}))

	for _, fam := range []int{netlink.FAMILY_V4, netlink.FAMILY_V6} {
		if fam == netlink.FAMILY_V4 {
			r := netlink.NewRule()
			r.Priority, r.Family, r.Table = 99, fam, unix.RT_TABLE_MAIN
			r.Dst = prefix("169.254.7.127/32")
			must(ph.RuleAdd(r))
		}
		r := netlink.NewRule()
		r.Priority, r.Family, r.Table = 100, fam, unix.RT_TABLE_MAIN
		r.Mark, r.Mask = Mark, ptr(uint32(0xfff))
		must(ph.RuleAdd(r))
		r = netlink.NewRule()
		r.Priority, r.Family, r.Table = 101, fam, tableCapture
		must(ph.RuleAdd(r))

		// The local default route carries the pod's address as source, so
		// that a connection the pod opens leaves from its own address rather
		// than from the destination itself.
		dst, src := prefix("0.0.0.0/0"), podIP4
		if fam == netlink.FAMILY_V6 {
			dst, src = prefix("::/0"), podIP6
		}
		must(ph.RouteAdd(&netlink.Route{
			Table: tableCapture, Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST,
			Dst: dst, Src: src.AsSlice(), LinkIndex: lo.Attrs().Index,
		}))
	}
	return tp
}

func prefix(s string) *net.IPNet {
	_, n, err := net.ParseCIDR(s)
	if err != nil {
		panic(err)
	}
	return n
}

func ptr[T any](v T) *T { return &v }

func (tp *testPod) attach(tb testing.TB) {
	tb.Helper()
	if err := Attach(tp.pod.path(), tp.uid, tp.podAddrs); err != nil {
		tb.Fatalf("attach: %v", err)
	}
}

// ztunnel is the stand-in: marked listeners on 15001 and 15006 inside the pod.
type ztunnel struct {
	outbound, inbound *net.TCPListener
}

func (tp *testPod) startZtunnel(tb testing.TB, register bool) *ztunnel {
	tb.Helper()
	lc := tcpOnly()
	// IP_TRANSPARENT: the accepted outbound socket's local address is the
	// original (non-local) destination, and the kernel sends its SYN-ACK from
	// that address only for transparent sockets.
	lc.Control = sockopts(true, true)
	z := &ztunnel{
		outbound: listenIn(tb, tp.pod, "tcp", ":15001", lc).(*net.TCPListener),
		inbound:  listenIn(tb, tp.pod, "tcp", ":15006", lc).(*net.TCPListener),
	}
	if register {
		if err := RegisterSockets(tp.uid, z.outbound, z.inbound, nil); err != nil {
			tb.Fatalf("register sockets: %v", err)
		}
	}
	return z
}

func (z *ztunnel) close() { z.outbound.Close(); z.inbound.Close() }

// dial connects from inside n; mark sets ztunnel's SO_MARK; src binds.
func dial(n *testNS, dst netip.AddrPort, mark bool, src netip.Addr) (net.Conn, error) {
	d := net.Dialer{Timeout: time.Second}
	d.SetMultipathTCP(false)
	d.Control = sockopts(mark, false)
	if src.IsValid() {
		d.LocalAddr = &net.TCPAddr{IP: src.AsSlice()}
	}
	var c net.Conn
	err := n.Do(func() (err error) {
		c, err = d.Dial("tcp", dst.String())
		return err
	})
	return c, err
}

// accept waits briefly for one connection; nil if none came.
func accept(tb testing.TB, l net.Listener, wait time.Duration) net.Conn {
	tb.Helper()
	l.(*net.TCPListener).SetDeadline(time.Now().Add(wait))
	c, err := l.Accept()
	if err != nil {
		var ne net.Error
		if errors.As(err, &ne) && ne.Timeout() {
			return nil
		}
		tb.Fatalf("accept: %v", err)
	}
	tb.Cleanup(func() { c.Close() })
	return c
}

// roundTrip checks that bytes pass both ways between two ends of a connection.
func roundTrip(tb testing.TB, a, b net.Conn) {
	tb.Helper()
	for _, p := range [][2]net.Conn{{a, b}, {b, a}} {
		if _, err := p[0].Write([]byte("ping")); err != nil {
			tb.Fatal(err)
		}
		buf := make([]byte, 4)
		p[1].SetReadDeadline(time.Now().Add(2 * time.Second))
		if _, err := io.ReadFull(p[1], buf); err != nil || string(buf) != "ping" {
			tb.Fatalf("read %q: %v", buf, err)
		}
	}
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

func TestAttachedRedirection(t *testing.T) {
	tp := newTestPod(t)
	tp.attach(t)
	z := tp.startZtunnel(t, true)
	app := listenIn(t, tp.pod, "tcp", ":8080", tcpOnly())
	// ztunnel's HBONE listener is marked too: its replies must not be
	// captured by table 133.
	hboneLC := tcpOnly()
	hboneLC.Control = sockopts(true, false)
	hbone := listenIn(t, tp.pod, "tcp", ":15008", hboneLC)
	peerLn := listenIn(t, tp.peer, "tcp", ":9090", tcpOnly())

	st, err := Status(tp.uid)
	if err != nil {
		t.Fatal(err)
	}
	if st.Sockets.Outbound != cookie(t, z.outbound) || st.Sockets.Inbound != cookie(t, z.inbound) || st.Sockets.DNS != 0 {
		t.Fatalf("status sockets %+v", st.Sockets)
	}

	for _, dst := range []netip.AddrPort{
		netip.AddrPortFrom(peerIP4, 80), netip.AddrPortFrom(peerIP6, 80),
		netip.AddrPortFrom(peerIP4, 9090), // a listener there must not see it
	} {
		t.Run("outbound to "+dst.String()+" lands on 15001", func(t *testing.T) {
			c, err := dial(tp.pod, dst, false, netip.Addr{})
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			s := accept(t, z.outbound, 2*time.Second)
			if s == nil {
				t.Fatal("nothing on 15001")
			}
			if got := addrPort(s.LocalAddr()); got != dst {
				t.Errorf("original destination %v, want %v", got, dst)
			}
			if got := addrPort(s.RemoteAddr()); got != addrPort(c.LocalAddr()) {
				t.Errorf("ztunnel sees peer %v, client is %v", got, c.LocalAddr())
			}
			if got := addrPort(c.LocalAddr()).Addr(); got != podIP4 && got != podIP6 {
				t.Errorf("client source %v is not a pod address", got)
			}
			roundTrip(t, c, s)
			if p := accept(t, peerLn, 50*time.Millisecond); p != nil {
				t.Errorf("the peer got %v", p.RemoteAddr())
			}
		})
	}

	for _, dst := range []netip.AddrPort{netip.AddrPortFrom(podIP4, 8080), netip.AddrPortFrom(podIP6, 8080), netip.AddrPortFrom(podIP4, 9999)} {
		t.Run("inbound to "+dst.String()+" lands on 15006", func(t *testing.T) {
			c, err := dial(tp.peer, dst, false, netip.Addr{})
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			s := accept(t, z.inbound, 2*time.Second)
			if s == nil {
				t.Fatal("nothing on 15006")
			}
			if got := addrPort(s.LocalAddr()); got != dst {
				t.Errorf("original destination %v, want %v", got, dst)
			}
			roundTrip(t, c, s)
			if a := accept(t, app, 50*time.Millisecond); a != nil {
				t.Errorf("the app got %v directly", a.RemoteAddr())
			}
		})
	}

	t.Run("inbound to 15008 is not redirected", func(t *testing.T) {
		c, err := dial(tp.peer, netip.AddrPortFrom(podIP4, PortHBONE), false, netip.Addr{})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		if accept(t, hbone, 2*time.Second) == nil {
			t.Fatal("nothing on 15008")
		}
		if s := accept(t, z.inbound, 50*time.Millisecond); s != nil {
			t.Fatal("15006 got it")
		}
	})

	t.Run("probe from 169.254.7.127 reaches the app", func(t *testing.T) {
		c, err := dial(tp.peer, netip.AddrPortFrom(podIP4, 8080), false, ProbeSource)
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		a := accept(t, app, 2*time.Second)
		if a == nil {
			t.Fatal("nothing reached the app")
		}
		roundTrip(t, c, a)
	})

	t.Run("ztunnel's marked connection out passes untouched", func(t *testing.T) {
		c, err := dial(tp.pod, netip.AddrPortFrom(peerIP4, 9090), true, netip.Addr{})
		if err != nil {
			t.Fatalf("dial: %v", err)
		}
		defer c.Close()
		p := accept(t, peerLn, 2*time.Second)
		if p == nil {
			t.Fatal("the peer got nothing")
		}
		if got := addrPort(p.RemoteAddr()).Addr(); got != podIP4 {
			t.Errorf("peer sees %v, want %v", got, podIP4)
		}
		roundTrip(t, c, p)
	})

	t.Run("ztunnel to the app on the pod address, and loopback, untouched", func(t *testing.T) {
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(podIP4, 8080), netip.MustParseAddrPort("127.0.0.1:8080")} {
			c, err := dial(tp.pod, dst, dst.Addr() == podIP4, netip.Addr{})
			if err != nil {
				t.Fatalf("dial %v: %v", dst, err)
			}
			if accept(t, app, 2*time.Second) == nil {
				t.Fatalf("%v: nothing reached the app", dst)
			}
			c.Close()
		}
	})

	t.Run("empty slots: nothing gets out, nothing gets in", func(t *testing.T) {
		z.close() // a closed socket leaves the map
		st, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if st.Sockets != (SocketSlots{}) {
			t.Fatalf("slots %+v after ztunnel closed", st.Sockets)
		}
		// The peer listens on 9090: a leak would be accepted there. The
		// lookup is dropped; for IPv6 the kernel answers with a reset, for
		// IPv4 it cannot (the reset's source would be the non-local
		// destination), so the SYN is just dropped and the dial times out.
		for _, dst := range []netip.AddrPort{netip.AddrPortFrom(peerIP4, 9090), netip.AddrPortFrom(peerIP6, 9090)} {
			var ne net.Error
			if c, err := dial(tp.pod, dst, false, netip.Addr{}); err == nil {
				c.Close()
				t.Errorf("outbound to %v connected without ztunnel", dst)
			} else if !errors.Is(err, syscall.ECONNREFUSED) && !(errors.As(err, &ne) && ne.Timeout()) {
				t.Errorf("outbound to %v: %v, want refused or timeout", dst, err)
			} else {
				t.Logf("outbound to %v without ztunnel: %v", dst, err)
			}
		}
		if p := accept(t, peerLn, 100*time.Millisecond); p != nil {
			t.Errorf("plaintext reached the peer from %v", p.RemoteAddr())
		}
		// The pod's reset is unmarked, so table 133 keeps it in the pod too:
		// the peer times out.
		if c, err := dial(tp.peer, netip.AddrPortFrom(podIP4, 8080), false, netip.Addr{}); err == nil {
			c.Close()
			t.Error("inbound connected without ztunnel")
		} else {
			t.Logf("inbound without ztunnel: %v", err)
		}
		if a := accept(t, app, 100*time.Millisecond); a != nil {
			t.Errorf("the app got %v without ztunnel", a.RemoteAddr())
		}
	})
}

// skLookupPrograms lists the sk_lookup programs attached to the netns.
func skLookupPrograms(tb testing.TB, n *testNS) []link.AttachedProgram {
	tb.Helper()
	f, err := os.Open(n.path())
	if err != nil {
		tb.Fatal(err)
	}
	defer f.Close()
	r, err := link.QueryPrograms(link.QueryOptions{Target: int(f.Fd()), Attach: ebpf.AttachSkLookup})
	if err != nil {
		tb.Fatal(err)
	}
	return r.Programs
}

func TestAttachIdempotentAndDetach(t *testing.T) {
	tp := newTestPod(t)
	tp.attach(t)
	first, err := Status(tp.uid)
	if err != nil {
		t.Fatal(err)
	}
	var ino unix.Stat_t
	if err := unix.Stat(tp.pod.path(), &ino); err != nil {
		t.Fatal(err)
	}
	if first.NetnsInode != ino.Ino || first.ProgramID == 0 || first.ProgramTag == "" {
		t.Fatalf("status %+v, netns inode %d", first, ino.Ino)
	}
	z := tp.startZtunnel(t, true)

	t.Run("attach twice = once", func(t *testing.T) {
		tp.attach(t)
		if progs := skLookupPrograms(t, tp.pod); len(progs) != 1 {
			t.Fatalf("%d programs attached", len(progs))
		}
		again, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if again.ProgramID != first.ProgramID || again.LinkID != first.LinkID || again.Sockets.Outbound != cookie(t, z.outbound) {
			t.Fatalf("re-attach changed things: %+v then %+v", first, again)
		}
		if again.Sockets.Inbound != cookie(t, z.inbound) {
			t.Fatal("re-attach lost ztunnel's sockets")
		}
	})

	t.Run("addresses updated", func(t *testing.T) {
		if err := Attach(tp.pod.path(), tp.uid, []netip.Addr{podIP4}); err != nil {
			t.Fatal(err)
		}
		st, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if len(st.Addresses) != 1 || st.Addresses[0] != podIP4 {
			t.Fatalf("addresses %v", st.Addresses)
		}
		tp.attach(t)
		if st, _ = Status(tp.uid); len(st.Addresses) != 2 {
			t.Fatalf("addresses %v", st.Addresses)
		}
	})

	t.Run("an outdated program is swapped in the same link", func(t *testing.T) {
		old := passProgram(t)
		l, err := link.LoadPinnedLink(pinDir(tp.uid)+"/link", nil)
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		if err := l.Update(old); err != nil {
			t.Fatal(err)
		}
		tp.attach(t)
		st, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if st.ProgramTag != first.ProgramTag || st.LinkID != first.LinkID {
			t.Fatalf("after upgrade %+v, want tag %s in link %d", st, first.ProgramTag, first.LinkID)
		}
		if st.Sockets.Outbound != cookie(t, z.outbound) {
			t.Fatal("upgrade lost ztunnel's sockets")
		}
		// And it redirects.
		c, err := dial(tp.pod, netip.AddrPortFrom(peerIP4, 80), false, netip.Addr{})
		if err != nil {
			t.Fatal(err)
		}
		c.Close()
		if accept(t, z.outbound, 2*time.Second) == nil {
			t.Fatal("nothing on 15001 after upgrade")
		}
	})

	t.Run("another netns under the same uid replaces the pins", func(t *testing.T) {
		other := newNS(t, "amb-pod2-")
		if err := Attach(other.path(), tp.uid, tp.podAddrs); err != nil {
			t.Fatal(err)
		}
		if n := len(skLookupPrograms(t, tp.pod)); n != 0 {
			t.Fatalf("%d programs left in the old netns", n)
		}
		if n := len(skLookupPrograms(t, other)); n != 1 {
			t.Fatalf("%d programs in the new netns", n)
		}
		tp.attach(t) // back
		if n := len(skLookupPrograms(t, other)); n != 0 {
			t.Fatalf("%d programs left in the other netns", n)
		}
	})

	t.Run("detach leaves nothing", func(t *testing.T) {
		st, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if err := Detach(tp.uid); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(pinDir(tp.uid)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("pin dir: %v", err)
		}
		if n := len(skLookupPrograms(t, tp.pod)); n != 0 {
			t.Errorf("%d programs still attached", n)
		}
		if l, err := link.NewFromID(link.ID(st.LinkID)); err == nil {
			l.Close()
			t.Errorf("link %d still exists", st.LinkID)
		}
		if _, err := Status(tp.uid); !errors.Is(err, ErrNotAttached) {
			t.Errorf("status after detach: %v", err)
		}
		if err := RegisterSockets(tp.uid, z.outbound, nil, nil); !errors.Is(err, ErrNotAttached) {
			t.Errorf("register after detach: %v", err)
		}
		if err := Detach(tp.uid); err != nil {
			t.Errorf("second detach: %v", err)
		}
		// Without the program, outbound goes to the local route and finds no
		// listener: refused, and ztunnel's listener is not involved.
		c, err := dial(tp.pod, netip.AddrPortFrom(peerIP4, 80), false, netip.Addr{})
		if err == nil {
			c.Close()
		}
		if s := accept(t, z.outbound, 50*time.Millisecond); s != nil {
			t.Error("15001 still gets connections")
		}
	})
}

func TestAttachBadInput(t *testing.T) {
	tp := newTestPod(t)
	notNS, err := os.CreateTemp(t.TempDir(), "netns")
	if err != nil {
		t.Fatal(err)
	}
	notNS.Close()
	for _, tc := range []struct {
		name, path, uid string
		ips             []netip.Addr
	}{
		{"empty uid", tp.pod.path(), "", tp.podAddrs},
		{"uid with a slash", tp.pod.path(), "../x", tp.podAddrs},
		{"no addresses", tp.pod.path(), tp.uid, nil},
		{"invalid address", tp.pod.path(), tp.uid, []netip.Addr{{}}},
		{"missing netns", "/var/run/netns/does-not-exist", tp.uid, tp.podAddrs},
		{"not a netns", notNS.Name(), tp.uid, tp.podAddrs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := Attach(tc.path, tc.uid, tc.ips); err == nil {
				t.Fatal("no error")
			}
			if _, err := os.Stat(pinDir(tp.uid)); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("pins left: %v", err)
			}
			if n := len(skLookupPrograms(t, tp.pod)); n != 0 {
				t.Fatalf("%d programs attached", n)
			}
		})
	}
	if err := Detach("never-attached"); err != nil {
		t.Errorf("detach of nothing: %v", err)
	}
}

// passProgram is a different sk_lookup program, standing in for an older
// version of ours.
func passProgram(tb testing.TB) *ebpf.Program {
	tb.Helper()
	p, err := ebpf.NewProgram(&ebpf.ProgramSpec{
		Type: ebpf.SkLookup, AttachType: ebpf.AttachSkLookup, License: "GPL",
		Instructions: asm.Instructions{asm.Mov.Imm(asm.R0, skPass), asm.Return()},
	})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { p.Close() })
	return p
}

func TestSupported(t *testing.T) {
	requireRoot(t)
	if err := Supported(); err != nil {
		t.Fatalf("this kernel (5.17+ expected) should run the program: %v", err)
	}
}

func TestAttachReplacesPartialPins(t *testing.T) {
	tp := newTestPod(t)
	// A crash between pins: a sockets map but no link.
	if err := ensureBPFFS(); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(pinDir(tp.uid), 0o700); err != nil {
		t.Fatal(err)
	}
	m, err := ebpf.NewMap(&ebpf.MapSpec{Type: ebpf.Hash, KeySize: 4, ValueSize: 4, MaxEntries: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if err := m.Pin(SocketMapPath(tp.uid)); err != nil {
		t.Fatal(err)
	}
	if _, err := Status(tp.uid); err == nil || errors.Is(err, ErrNotAttached) {
		t.Fatalf("status of partial pins: %v", err)
	}
	tp.attach(t)
	if _, err := Status(tp.uid); err != nil {
		t.Fatal(err)
	}
	if n := len(skLookupPrograms(t, tp.pod)); n != 1 {
		t.Fatalf("%d programs", n)
	}
	z := tp.startZtunnel(t, true)
	c, err := dial(tp.pod, netip.AddrPortFrom(peerIP4, 80), false, netip.Addr{})
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if accept(t, z.outbound, 2*time.Second) == nil {
		t.Fatal("nothing on 15001")
	}
}

func TestAttachGoneNetns(t *testing.T) {
	tp := newTestPod(t)
	other := newNS(t, "amb-gone-")
	if err := Attach(other.path(), tp.uid, tp.podAddrs); err != nil {
		t.Fatal(err)
	}
	// The sandbox goes away: the kernel detaches the link, the pins stay.
	other.handle.Close()
	if err := netns.DeleteNamed(other.name); err != nil {
		t.Fatal(err)
	}
	other.name = "" // already deleted
	deadline := time.Now().Add(5 * time.Second)
	for {
		st, err := Status(tp.uid)
		if err != nil {
			t.Fatal(err)
		}
		if st.NetnsInode == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("link still reports netns %d", st.NetnsInode)
		}
		time.Sleep(20 * time.Millisecond)
	}
	tp.attach(t)
	if n := len(skLookupPrograms(t, tp.pod)); n != 1 {
		t.Fatalf("%d programs", n)
	}
	if err := Detach(tp.uid); err != nil {
		t.Fatal(err)
	}
}
