package redirect

import (
	"crypto/rand"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
	"unsafe"

	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Kernel tests: the real engines in throwaway network namespaces. A "pod" netns
// and a "peer" netns are joined by a veth; all traffic stays between them.
// The peer also plays the node for probe SNAT.

var (
	pod4  = netip.MustParseAddr("10.77.0.2")
	peer4 = netip.MustParseAddr("10.77.0.1")
	pod6  = netip.MustParseAddr("fd77::2")
	peer6 = netip.MustParseAddr("fd77::1")
	cidr4 = netip.MustParsePrefix("10.77.0.0/24")
)

const appPort = 8080 // the pod's application; the peer's server listens on 80

type testNet struct {
	pod, peer string // netns paths
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel test: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)")
	}
}

// newNetns creates an anonymous netns that lives until the test ends, and
// returns a path to it.
func newNetns(t *testing.T) string {
	t.Helper()
	n, err := ns.TempNetNS()
	if err != nil {
		t.Fatalf("creating netns: %v", err)
	}
	t.Cleanup(func() { n.Close() })
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), n.Fd())
}

func newTestNet(t *testing.T) *testNet {
	t.Helper()
	requireRoot(t)
	tn := &testNet{pod: newNetns(t), peer: newNetns(t)}
	peerNS, err := ns.GetNS(tn.peer)
	if err != nil {
		t.Fatal(err)
	}
	defer peerNS.Close()

	setup := func(ifname string, addrs []netip.Prefix, gws []netip.Addr) error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		for _, name := range []string{"lo", ifname} {
			l, err := h.LinkByName(name)
			if err != nil {
				return err
			}
			if err := h.LinkSetUp(l); err != nil {
				return err
			}
			if name == "lo" {
				continue
			}
			for _, a := range addrs {
				ipn := &net.IPNet{IP: a.Addr().AsSlice(), Mask: net.CIDRMask(a.Bits(), a.Addr().BitLen())}
				if err := h.AddrAdd(l, &netlink.Addr{IPNet: ipn, Flags: unix.IFA_F_NODAD}); err != nil {
					return fmt.Errorf("adding %s: %w", a, err)
				}
			}
			for _, gw := range gws {
				if err := h.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()}); err != nil {
					return fmt.Errorf("adding default route via %s: %w", gw, err)
				}
			}
		}
		return nil
	}
	err = Do(tn.pod, func(ns.NetNS) error {
		veth := &netlink.Veth{
			LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "veth0",
			PeerNamespace: netlink.NsFd(int(peerNS.Fd())),
		}
		if err := netlink.LinkAdd(veth); err != nil {
			return fmt.Errorf("adding veth: %w", err)
		}
		// Strict reverse-path filtering, as some CNIs leave pods: the engines
		// must cope with it.
		for _, dev := range []string{"all", "eth0"} {
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+dev+"/rp_filter", []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return setup("eth0",
			[]netip.Prefix{netip.PrefixFrom(pod4, 24), netip.PrefixFrom(pod6, 64)},
			[]netip.Addr{peer4, peer6})
	})
	if err != nil {
		t.Fatalf("setting up pod netns: %v", err)
	}
	err = Do(tn.peer, func(ns.NetNS) error {
		return setup("veth0", []netip.Prefix{netip.PrefixFrom(peer4, 24), netip.PrefixFrom(peer6, 64)}, nil)
	})
	if err != nil {
		t.Fatalf("setting up peer netns: %v", err)
	}
	return tn
}

func markControl(mark uint32) func(string, string, syscall.RawConn) error {
	return func(_, _ string, c syscall.RawConn) error {
		if mark == 0 {
			return nil
		}
		var serr error
		err := c.Control(func(fd uintptr) {
			serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(mark))
		})
		return errors.Join(err, serr)
	}
}

// listen opens a dual-stack TCP listener on port inside netnsPath.
// transparent sets IPV6_TRANSPARENT, which the eBPF engine's outbound listener
// needs: its accepted sockets' local address is the (non-local) original
// destination, and the kernel only sends SYN-ACKs from such an address for
// transparent sockets.
func listen(t *testing.T, netnsPath string, port uint16, mark uint32, transparent bool) *net.TCPListener {
	t.Helper()
	var l net.Listener
	err := Do(netnsPath, func(ns.NetNS) error {
		var err error
		lc := net.ListenConfig{Control: func(network, address string, c syscall.RawConn) error {
			if err := markControl(mark)(network, address, c); err != nil || !transparent {
				return err
			}
			var serr error
			err := c.Control(func(fd uintptr) {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
			})
			return errors.Join(err, serr)
		}}
		// Go listens with MPTCP by default where the kernel has it; a SOCKMAP
		// (the eBPF engine's socket map) takes plain TCP sockets only.
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(t.Context(), "tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		t.Fatalf("listening on %d: %v", port, err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// dial connects from inside netnsPath.
func dial(netnsPath string, to netip.AddrPort, mark uint32) (net.Conn, error) {
	var c net.Conn
	err := Do(netnsPath, func(ns.NetNS) error {
		var err error
		d := net.Dialer{Timeout: 2 * time.Second, Control: markControl(mark)}
		c, err = d.Dial("tcp", to.String())
		return err
	})
	return c, err
}

// mustLand dials to from netnsPath and returns the connection l accepted for it.
func mustLand(t *testing.T, netnsPath string, to netip.AddrPort, mark uint32, l *net.TCPListener) (client, accepted net.Conn) {
	t.Helper()
	c, err := dial(netnsPath, to, mark)
	if err != nil {
		t.Fatalf("dialing %s: %v", to, err)
	}
	t.Cleanup(func() { c.Close() })
	_ = l.SetDeadline(time.Now().Add(2 * time.Second))
	a, err := l.Accept()
	if err != nil {
		t.Fatalf("connection to %s did not land on %s: %v", to, l.Addr(), err)
	}
	t.Cleanup(func() { a.Close() })
	if got, want := addrPort(a.RemoteAddr()).Port(), addrPort(c.LocalAddr()).Port(); got != want {
		t.Fatalf("listener %s accepted a connection from port %d, want the one from %d", l.Addr(), got, want)
	}
	return c, a
}

func addrPort(a net.Addr) netip.AddrPort {
	ap := a.(*net.TCPAddr).AddrPort()
	return netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
}

// originalDst reads SO_ORIGINAL_DST (IPv4) or IP6T_SO_ORIGINAL_DST (IPv6), as
// ztunnel does behind the nftables engine.
func originalDst(c net.Conn) (netip.AddrPort, error) {
	rc, err := c.(*net.TCPConn).SyscallConn()
	if err != nil {
		return netip.AddrPort{}, err
	}
	const soOriginalDst = 80 // SO_ORIGINAL_DST == IP6T_SO_ORIGINAL_DST
	v4 := addrPort(c.LocalAddr()).Addr().Is4()
	var buf [unix.SizeofSockaddrInet6]byte
	size := uint32(len(buf))
	var errno syscall.Errno
	cerr := rc.Control(func(fd uintptr) {
		level := uintptr(unix.SOL_IPV6)
		if v4 {
			level = unix.SOL_IP
		}
		_, _, errno = unix.Syscall6(unix.SYS_GETSOCKOPT, fd, level, soOriginalDst,
			uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	})
	if cerr != nil {
		return netip.AddrPort{}, cerr
	}
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	if v4 {
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	}
	return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])), port), nil
}

func randomUID(t *testing.T) string {
	var b [8]byte
	_, _ = rand.Read(b[:])
	return "redirect-test-" + hex.EncodeToString(b[:])
}

// engineCase is one engine under test and how ztunnel works with it.
type engineCase struct {
	name string
	new  func() Engine
	// transparent: the outbound stand-in needs IP(V6)_TRANSPARENT.
	transparent bool
	// origDst is how the stand-in learns the original destination.
	origDst func(net.Conn) (netip.AddrPort, error)
	// register hands the stand-in's listeners to the engine, if it needs that.
	register func(pod Pod, outbound, inbound *net.TCPListener) error
	// stable strips what Describe may report differently for the same installation.
	stable func(any) any
	// clean reports anything the engine left in the netns or elsewhere.
	clean func(netnsPath string, pod Pod) error
}

func engineCases() []engineCase {
	ebpfCase := engineCase{
		name:        EngineEBPF,
		new:         func() Engine { return &EBPF{} },
		transparent: true,
		origDst:     func(c net.Conn) (netip.AddrPort, error) { return addrPort(c.LocalAddr()), nil },
		// bpf/redirect may swap in a freshly loaded program on a repeated Attach
		// (new program ID, same link, same maps); that is its business.
		stable: func(r any) any { rep := r.(EBPFReport); rep.Program = nil; return rep },
		register: func(pod Pod, out, in *net.TCPListener) error {
			return bpfredirect.RegisterSockets(pod.UID, out, in, nil)
		},
		clean: func(netnsPath string, pod Pod) error {
			if _, err := bpfredirect.Status(pod.UID); !errors.Is(err, bpfredirect.ErrNotAttached) {
				return fmt.Errorf("bpf status after remove: %v, want not attached", err)
			}
			return routingClean(netnsPath)
		},
	}
	nftCase := engineCase{
		name:     EngineNFTables,
		new:      func() Engine { return &NFTables{} },
		origDst:  originalDst,
		stable:   func(r any) any { return r },
		register: func(Pod, *net.TCPListener, *net.TCPListener) error { return nil },
		clean: func(netnsPath string, pod Pod) error {
			err := doNFT(netnsPath, func(c *nftables.Conn) error {
				tables, err := c.ListTables()
				if err != nil {
					return err
				}
				for _, tb := range tables {
					return fmt.Errorf("left behind: table %s %s", familyName(tb.Family), tb.Name)
				}
				return nil
			})
			if err != nil {
				return err
			}
			return routingClean(netnsPath)
		},
	}
	return []engineCase{ebpfCase, nftCase}
}

// routingClean reports any rule or route of the engines left in the netns.
func routingClean(netnsPath string) error {
	return Do(netnsPath, func(ns.NetNS) error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		rules, routes, err := listRouting(h)
		if err != nil {
			return err
		}
		if len(rules)+len(routes) > 0 {
			return fmt.Errorf("left behind: rules %v, routes %v", rules, routes)
		}
		return nil
	})
}

func skipUnlessSupported(t *testing.T, ec engineCase) {
	t.Helper()
	if ec.name == EngineEBPF {
		if err := ebpfSupported(); err != nil {
			t.Skipf("eBPF engine not supported here (bpf/redirect: %v)", err)
		}
	}
}

func TestEngineRedirectsInKernel(t *testing.T) {
	requireRoot(t)
	for _, ec := range engineCases() {
		t.Run(ec.name, func(t *testing.T) {
			skipUnlessSupported(t, ec)
			tn := newTestNet(t)
			pod := Pod{UID: randomUID(t), Namespace: "test", Name: "pod", IPs: []netip.Addr{pod4, pod6}}
			eng := ec.new()
			t.Cleanup(func() { _ = eng.Remove(tn.pod, pod) })

			// ztunnel stand-in inside the pod netns; the app; the peer's server.
			outbound := listen(t, tn.pod, OutboundPort, ZtunnelMark, ec.transparent)
			inbound := listen(t, tn.pod, InboundPlaintextPort, ZtunnelMark, false)
			hbone := listen(t, tn.pod, HBONEPort, ZtunnelMark, false)
			app := listen(t, tn.pod, appPort, 0, false)
			server := listen(t, tn.peer, 80, 0, false)

			if err := eng.Install(tn.pod, pod); err != nil {
				t.Fatalf("install: %v", err)
			}
			first, err := eng.Describe(tn.pod, pod)
			if err != nil {
				t.Fatalf("describe: %v", err)
			}
			if err := eng.Install(tn.pod, pod); err != nil {
				t.Fatalf("second install: %v", err)
			}
			second, err := eng.Describe(tn.pod, pod)
			if err != nil {
				t.Fatalf("describe: %v", err)
			}
			if fmt.Sprintf("%+v", ec.stable(first)) != fmt.Sprintf("%+v", ec.stable(second)) {
				t.Fatalf("installing twice differs from once:\nonce:  %+v\ntwice: %+v", first, second)
			}
			t.Logf("installed: %+v", second)
			if err := ec.register(pod, outbound, inbound); err != nil {
				t.Fatalf("registering stand-in sockets: %v", err)
			}

			for _, fam := range []struct {
				name      string
				pod, peer netip.Addr
			}{{"ipv4", pod4, peer4}, {"ipv6", pod6, peer6}} {
				t.Run(fam.name, func(t *testing.T) {
					t.Run("outbound connection lands on 15001 with its original destination", func(t *testing.T) {
						dst := netip.AddrPortFrom(fam.peer, 80)
						_, a := mustLand(t, tn.pod, dst, 0, outbound)
						if got, err := ec.origDst(a); err != nil || got != dst {
							t.Errorf("original destination = %v, %v; want %v", got, err, dst)
						}
					})
					t.Run("ztunnel's marked connection passes untouched", func(t *testing.T) {
						_, a := mustLand(t, tn.pod, netip.AddrPortFrom(fam.peer, 80), ZtunnelMark, server)
						if got := addrPort(a.RemoteAddr()).Addr(); got != fam.pod {
							t.Errorf("server saw source %v, want %v", got, fam.pod)
						}
					})
					t.Run("inbound connection lands on 15006 with its original destination", func(t *testing.T) {
						dst := netip.AddrPortFrom(fam.pod, appPort)
						_, a := mustLand(t, tn.peer, dst, 0, inbound)
						if got, err := ec.origDst(a); err != nil || got != dst {
							t.Errorf("original destination = %v, %v; want %v", got, err, dst)
						}
						if got := addrPort(a.RemoteAddr()).Addr(); got != fam.peer {
							t.Errorf("stand-in saw source %v, want %v", got, fam.peer)
						}
					})
					t.Run("inbound HBONE reaches 15008 directly", func(t *testing.T) {
						mustLand(t, tn.peer, netip.AddrPortFrom(fam.pod, HBONEPort), 0, hbone)
					})
					t.Run("loopback stays loopback", func(t *testing.T) {
						lo := netip.MustParseAddr("127.0.0.1")
						if fam.pod.Is6() {
							lo = netip.IPv6Loopback()
						}
						mustLand(t, tn.pod, netip.AddrPortFrom(lo, appPort), 0, app)
					})
					t.Run("the pod's own address stays local", func(t *testing.T) {
						mustLand(t, tn.pod, netip.AddrPortFrom(fam.pod, appPort), 0, app)
					})
				})
			}

			if err := eng.Remove(tn.pod, pod); err != nil {
				t.Fatalf("remove: %v", err)
			}
			if err := eng.Remove(tn.pod, pod); err != nil {
				t.Fatalf("second remove: %v", err)
			}
			if err := ec.clean(tn.pod, pod); err != nil {
				t.Fatalf("netns not clean after remove: %v", err)
			}
			// Without redirection, traffic flows directly both ways.
			mustLand(t, tn.pod, netip.AddrPortFrom(peer4, 80), 0, server)
			mustLand(t, tn.peer, netip.AddrPortFrom(pod4, appPort), 0, app)

			gone := filepath.Join(t.TempDir(), "gone")
			if err := eng.Remove(gone, pod); err != nil {
				t.Errorf("remove with a gone netns: %v, want nil", err)
			}
			if err := eng.Install(gone, pod); !errors.Is(err, ErrNetnsGone) {
				t.Errorf("install with a gone netns: %v, want ErrNetnsGone", err)
			}
		})
	}
}

// TestProbeSNATInKernel: the peer plays the node. A connection it opens to an
// enrolled pod arrives with source 169.254.7.127 and reaches the app directly;
// once the pod is no longer in @enrolled it is captured like any inbound
// plaintext.
func TestProbeSNATInKernel(t *testing.T) {
	requireRoot(t)
	for _, ec := range engineCases() {
		t.Run(ec.name, func(t *testing.T) {
			skipUnlessSupported(t, ec)
			tn, _, _, _, inbound, app := installedPod(t, ec)

			onNode := func(fn func() error) {
				t.Helper()
				if err := Do(tn.peer, func(ns.NetNS) error { return fn() }); err != nil {
					t.Fatal(err)
				}
			}
			onNode(func() error { return InstallProbeSNAT([]netip.Prefix{cidr4}) })
			onNode(func() error { return AddProbeTarget(pod4) })
			onNode(func() error { return AddProbeTarget(pod4) })
			// Re-installing keeps the enrolled set.
			onNode(func() error { return InstallProbeSNAT([]netip.Prefix{cidr4}) })
			var report ProbeSNATReport
			onNode(func() (err error) { report, err = DescribeProbeSNAT(); return err })
			t.Logf("probe snat: %+v", report)

			_, a := mustLand(t, tn.peer, netip.AddrPortFrom(pod4, appPort), 0, app)
			if got := addrPort(a.RemoteAddr()).Addr(); got != ProbeSource {
				t.Errorf("app saw probe from %v, want %v", got, ProbeSource)
			}

			onNode(func() error { return RemoveProbeTarget(pod4) })
			onNode(func() error { return RemoveProbeTarget(pod4) })
			_, a = mustLand(t, tn.peer, netip.AddrPortFrom(pod4, appPort), 0, inbound)
			if got := addrPort(a.RemoteAddr()).Addr(); got != peer4 {
				t.Errorf("stand-in saw source %v, want %v (not SNATed: pod not enrolled)", got, peer4)
			}

			onNode(RemoveProbeSNAT)
			onNode(RemoveProbeSNAT)
			onNode(func() (err error) { report, err = DescribeProbeSNAT(); return err })
			if report.Installed {
				t.Errorf("probe snat table still there after remove: %v", report.Ruleset)
			}
			if err := Do(tn.peer, func(ns.NetNS) error { return AddProbeTarget(pod4) }); err == nil {
				t.Errorf("AddProbeTarget without the table succeeded, want an error")
			}
		})
	}
}

// installedPod makes a test net with ec's engine installed for a pod, the
// ztunnel stand-in's outbound and inbound listeners registered with it, and
// an app listening on appPort; the engine is removed at cleanup.
func installedPod(t *testing.T, ec engineCase) (tn *testNet, pod Pod, eng Engine, outbound, inbound, app *net.TCPListener) {
	t.Helper()
	tn = newTestNet(t)
	pod = Pod{UID: randomUID(t), Namespace: "test", Name: "pod", IPs: []netip.Addr{pod4, pod6}}
	eng = ec.new()
	t.Cleanup(func() { _ = eng.Remove(tn.pod, pod) })
	outbound = listen(t, tn.pod, OutboundPort, ZtunnelMark, ec.transparent)
	inbound = listen(t, tn.pod, InboundPlaintextPort, ZtunnelMark, false)
	app = listen(t, tn.pod, appPort, 0, false)
	if err := eng.Install(tn.pod, pod); err != nil {
		t.Fatalf("install: %v", err)
	}
	if err := ec.register(pod, outbound, inbound); err != nil {
		t.Fatalf("registering stand-in sockets: %v", err)
	}
	return tn, pod, eng, outbound, inbound, app
}
