package redirect

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
)

// Benchmarks of what redirection costs a pod's outbound TCP: the same flow,
// pod netns to the peer's echo server on :80, with no redirection ("none") and
// through each engine plus a stand-in ztunnel that proxies 15001 to the
// original destination in user space. The difference is ztunnel's outbound
// path in the kernel plus one user-space hop, without HBONE.

// benchVariants are compared side by side in one run.
var benchVariants = []string{"none", EngineNFTables, EngineEBPF}

// benchMsgSize is what the client writes and reads back per operation.
const benchMsgSize = 64

// BenchmarkRedirectedConnection: per op, a new connection, one 64-byte
// ping-pong, close. Measures per-connection setup (capture, accept, the
// stand-in's marked dial) on top of the exchange.
func BenchmarkRedirectedConnection(b *testing.B) {
	for _, variant := range benchVariants {
		b.Run(variant, func(b *testing.B) {
			podNS := benchPath(b, variant)
			// The client loop runs on one thread locked in the pod netns, so
			// each op pays for the connection, not for switching namespaces.
			err := Do(podNS, func(ns.NetNS) error {
				d := benchDialer(0)
				for b.Loop() {
					c, err := d.Dial("tcp", benchDst)
					if err != nil {
						return err
					}
					err = pingPong(c)
					c.Close()
					if err != nil {
						return err
					}
				}
				return nil
			})
			if err != nil {
				b.Fatal(err)
			}
		})
	}
}

// BenchmarkRedirectedConnectionReuse: one connection, one 64-byte ping-pong
// per op. Measures the steady-state cost of the redirected path.
func BenchmarkRedirectedConnectionReuse(b *testing.B) {
	for _, variant := range benchVariants {
		b.Run(variant, func(b *testing.B) {
			podNS := benchPath(b, variant)
			var c net.Conn
			err := Do(podNS, func(ns.NetNS) (err error) {
				c, err = benchDialer(0).Dial("tcp", benchDst)
				return err
			})
			if err != nil {
				b.Fatal(err)
			}
			b.Cleanup(func() { c.Close() })
			for b.Loop() {
				if err := pingPong(c); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// benchDst is the peer's echo server, the client's destination in every variant.
var benchDst = netip.AddrPortFrom(peer4, 80).String()

// pingPong writes benchMsgSize bytes to c and reads as many back.
func pingPong(c net.Conn) error {
	var msg [benchMsgSize]byte
	if err := c.SetDeadline(time.Now().Add(5 * time.Second)); err != nil {
		return err
	}
	if _, err := c.Write(msg[:]); err != nil {
		return fmt.Errorf("writing: %w", err)
	}
	if _, err := io.ReadFull(c, msg[:]); err != nil {
		return fmt.Errorf("reading the echo: %w", err)
	}
	return nil
}

// benchPath sets up the pod and peer netns for variant: an echo server on the
// peer's :80 and, for an engine, the installed redirection and a stand-in
// ztunnel in the pod netns. It returns the pod netns path. Everything is
// undone when b ends, failed or not.
func benchPath(b *testing.B, variant string) string {
	if os.Geteuid() != 0 {
		b.Skip("kernel benchmark: needs root (CAP_NET_ADMIN, CAP_SYS_ADMIN, CAP_BPF)")
	}
	if variant == EngineEBPF {
		if err := ebpfSupported(); err != nil {
			b.Skipf("eBPF engine not supported here (bpf/redirect: %v)", err)
		}
	}
	tn := benchNet(b)
	serve(b, benchListen(b, tn.peer, 80, 0, false), "", func(c net.Conn) error {
		go func() { _ = copyPlain(c, c); c.Close() }() // echo
		return nil
	})
	if variant == "none" {
		return tn.pod
	}

	var ec engineCase
	for _, c := range engineCases() {
		if c.name == variant {
			ec = c
		}
	}
	var uid [8]byte
	_, _ = rand.Read(uid[:])
	pod := Pod{UID: "redirect-bench-" + hex.EncodeToString(uid[:]), Namespace: "test", Name: "pod", IPs: []netip.Addr{pod4}}
	eng := ec.new()
	b.Cleanup(func() {
		if err := eng.Remove(tn.pod, pod); err != nil {
			b.Errorf("removing %s redirection: %v", variant, err)
		}
	})
	if err := eng.Install(tn.pod, pod); err != nil {
		b.Fatalf("installing %s redirection: %v", variant, err)
	}

	outbound := benchListen(b, tn.pod, OutboundPort, ZtunnelMark, ec.transparent)
	inbound := benchListen(b, tn.pod, InboundPlaintextPort, ZtunnelMark, false)
	if err := ec.register(pod, outbound, inbound); err != nil {
		b.Fatalf("registering stand-in sockets: %v", err)
	}
	d := benchDialer(ZtunnelMark)
	serve(b, outbound, tn.pod, func(down net.Conn) error {
		dst, err := ec.origDst(down)
		if err != nil {
			down.Close()
			return fmt.Errorf("original destination: %w", err)
		}
		up, err := d.Dial("tcp", dst.String())
		if err != nil {
			down.Close()
			return err
		}
		go proxy(down, up)
		return nil
	})
	return tn.pod
}

// serve accepts on l until b ends and calls handle for each connection on the
// accept loop's goroutine; then it closes l and waits for the loop. With a
// netnsPath, that goroutine runs on a thread locked in the netns, so handle
// opens its sockets there, as ztunnel does in a pod's netns.
func serve(b *testing.B, l *net.TCPListener, netnsPath string, handle func(net.Conn) error) {
	loop := func(ns.NetNS) error {
		for {
			c, err := l.Accept()
			if err != nil {
				return nil // l closed
			}
			if err := handle(c); err != nil {
				b.Logf("%s: %v", l.Addr(), err)
			}
		}
	}
	done := make(chan error, 1)
	go func() {
		if netnsPath == "" {
			done <- loop(nil)
		} else {
			done <- Do(netnsPath, loop)
		}
	}()
	b.Cleanup(func() {
		l.Close()
		if err := <-done; err != nil {
			b.Errorf("serving %s: %v", l.Addr(), err)
		}
	})
}

// proxy copies bytes both ways, as ztunnel does, and closes both connections
// once the upstream is done.
func proxy(down, up net.Conn) {
	defer down.Close()
	defer up.Close()
	go func() {
		_ = copyPlain(up, down)
		_ = up.(*net.TCPConn).CloseWrite()
	}()
	_ = copyPlain(down, up)
}

// copyPlain copies through a user-space buffer: the wrappers hide
// ReadFrom/WriteTo so that Go does not splice in the kernel.
func copyPlain(dst io.Writer, src io.Reader) error {
	_, err := io.CopyBuffer(struct{ io.Writer }{dst}, struct{ io.Reader }{src}, make([]byte, 16<<10))
	return err
}

func benchDialer(mark uint32) *net.Dialer {
	d := &net.Dialer{Timeout: 2 * time.Second, Control: markControl(mark)}
	d.SetMultipathTCP(false) // the eBPF engine's SOCKMAP takes plain TCP only
	return d
}

// benchListen is listen for benchmarks.
func benchListen(b *testing.B, netnsPath string, port uint16, mark uint32, transparent bool) *net.TCPListener {
	var l net.Listener
	err := Do(netnsPath, func(ns.NetNS) (err error) {
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
		lc.SetMultipathTCP(false)
		l, err = lc.Listen(b.Context(), "tcp", fmt.Sprintf(":%d", port))
		return err
	})
	if err != nil {
		b.Fatalf("listening on %d: %v", port, err)
	}
	b.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// benchNet is newTestNet for benchmarks, IPv4 only: a pod netns (eth0
// 10.77.0.2/24, default via 10.77.0.1, strict rp_filter) and a peer netns
// (veth0 10.77.0.1/24).
func benchNet(b *testing.B) testNet {
	tn := testNet{pod: benchNetns(b), peer: benchNetns(b)}
	peerNS, err := ns.GetNS(tn.peer)
	if err != nil {
		b.Fatal(err)
	}
	defer peerNS.Close()
	configure := func(ifname string, addr, gw netip.Addr) error {
		for _, name := range []string{"lo", ifname} {
			l, err := netlink.LinkByName(name)
			if err != nil {
				return err
			}
			if err := netlink.LinkSetUp(l); err != nil {
				return err
			}
			if name == "lo" {
				continue
			}
			ipn := &net.IPNet{IP: addr.AsSlice(), Mask: net.CIDRMask(24, 32)}
			if err := netlink.AddrAdd(l, &netlink.Addr{IPNet: ipn}); err != nil {
				return fmt.Errorf("adding %s: %w", addr, err)
			}
			if gw.IsValid() {
				return netlink.RouteAdd(&netlink.Route{LinkIndex: l.Attrs().Index, Gw: gw.AsSlice()})
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
		for _, dev := range []string{"all", "eth0"} {
			if err := os.WriteFile("/proc/sys/net/ipv4/conf/"+dev+"/rp_filter", []byte("1"), 0o644); err != nil {
				return err
			}
		}
		return configure("eth0", pod4, peer4)
	})
	if err != nil {
		b.Fatalf("setting up pod netns: %v", err)
	}
	if err := Do(tn.peer, func(ns.NetNS) error { return configure("veth0", peer4, netip.Addr{}) }); err != nil {
		b.Fatalf("setting up peer netns: %v", err)
	}
	return tn
}

// benchNetns is newNetns for benchmarks.
func benchNetns(b *testing.B) string {
	n, err := ns.TempNetNS()
	if err != nil {
		b.Fatalf("creating netns: %v", err)
	}
	b.Cleanup(func() { n.Close() })
	return fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), n.Fd())
}
