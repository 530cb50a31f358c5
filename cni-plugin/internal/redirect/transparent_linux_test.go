package redirect

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"golang.org/x/sys/unix"
)

// dialTransparent connects from inside netnsPath to to as ztunnel connects an
// inbound connection to the app (ztunnel/inpod DialFrom): a socket marked
// ZtunnelMark, IP_TRANSPARENT (IPV6_TRANSPARENT), bound to lo and to the
// client's address src, which the netns does not own.
func dialTransparent(netnsPath string, src netip.Addr, to netip.AddrPort, timeout time.Duration) (net.Conn, error) {
	network := "tcp4"
	if to.Addr().Is6() {
		network = "tcp6"
	}
	d := net.Dialer{
		Timeout:   timeout,
		LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0)),
		Control: func(network, _ string, c syscall.RawConn) error {
			var serr error
			err := c.Control(func(fd uintptr) {
				level, opt := unix.SOL_IP, unix.IP_TRANSPARENT
				if network == "tcp6" {
					level, opt = unix.SOL_IPV6, unix.IPV6_TRANSPARENT
				}
				serr = errors.Join(
					unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, int(ZtunnelMark)),
					unix.SetsockoptInt(int(fd), level, opt, 1),
					unix.BindToDevice(int(fd), loopbackName))
			})
			return errors.Join(err, serr)
		},
	}
	var c net.Conn
	err := Do(netnsPath, func(ns.NetNS) (err error) {
		c, err = d.Dial(network, to.String())
		return err
	})
	return c, err
}

// exchange checks that a line goes each way between a and b.
func exchange(t *testing.T, a, b net.Conn) {
	t.Helper()
	for _, dir := range []struct {
		from, to net.Conn
		what     string
	}{{a, b, "to the app"}, {b, a, "back from the app"}} {
		_ = dir.to.SetDeadline(time.Now().Add(2 * time.Second))
		if _, err := fmt.Fprintln(dir.from, "ping"); err != nil {
			t.Fatalf("writing %s: %v", dir.what, err)
		}
		if got, err := bufio.NewReader(dir.to).ReadString('\n'); err != nil || got != "ping\n" {
			t.Fatalf("reading %s: %q, %v", dir.what, got, err)
		}
	}
}

// nothingAccepted fails if any of ls has a connection waiting.
func nothingAccepted(t *testing.T, ls map[string]*net.TCPListener) {
	t.Helper()
	for name, l := range ls {
		_ = l.SetDeadline(time.Now().Add(100 * time.Millisecond))
		if c, err := l.Accept(); err == nil {
			t.Errorf("ztunnel's %s listener captured a connection from %v to %v", name, c.RemoteAddr(), c.LocalAddr())
			c.Close()
		}
	}
}

// TestTransparentSourceInKernel: ztunnel connects to the app from the
// client's address, and each engine brings that connection to the app (not
// into ztunnel's own listeners) and the app's replies to the client's
// address back to ztunnel's socket instead of out of the pod. The app sees
// the client's address as its peer. The eBPF engine does this with the
// routing it has anyway (rule 101 and table 133); the nftables engine with
// its connmark and policy routing.
func TestTransparentSourceInKernel(t *testing.T) {
	requireRoot(t)
	for _, ec := range engineCases() {
		t.Run(ec.name, func(t *testing.T) {
			skipUnlessSupported(t, ec)
			tn, pod, eng, outbound, inbound, app := installedPod(t, ec)
			capture := map[string]*net.TCPListener{"outbound": outbound, "inbound": inbound}

			for _, tc := range []struct {
				name   string
				client netip.Addr
				pod    netip.Addr
			}{
				// The peer would answer a SYN-ACK that leaked out of the pod
				// with a reset.
				{"ipv4 client on the pod's network", peer4, pod4},
				{"ipv6 client on the pod's network", peer6, pod6},
				// Routed out of the pod by its default route.
				{"ipv4 client elsewhere", netip.MustParseAddr("10.99.0.5"), pod4},
				{"ipv6 client elsewhere", netip.MustParseAddr("fd99::5"), pod6},
			} {
				t.Run(tc.name+" is seen by the app", func(t *testing.T) {
					to := netip.AddrPortFrom(tc.pod, appPort)
					c, err := dialTransparent(tn.pod, tc.client, to, 2*time.Second)
					if err != nil {
						t.Fatalf("dialing %s from %s: %v", to, tc.client, err)
					}
					defer c.Close()
					_ = app.SetDeadline(time.Now().Add(2 * time.Second))
					a, err := app.Accept()
					if err != nil {
						t.Fatalf("the app accepted nothing: %v", err)
					}
					defer a.Close()
					if got := addrPort(a.RemoteAddr()); got.Addr() != tc.client || got != addrPort(c.LocalAddr()) {
						t.Errorf("the app's peer is %v, the dialer %v; want the client %v", got, c.LocalAddr(), tc.client)
					}
					exchange(t, c, a)
					nothingAccepted(t, capture)
				})
			}

			if err := eng.Remove(tn.pod, pod); err != nil {
				t.Fatalf("remove: %v", err)
			}
			// Without the engine nothing routes the lo-bound socket to the pod's
			// address or the replies back to it: what made it work was the engine.
			if c, err := dialTransparent(tn.pod, peer4, netip.AddrPortFrom(pod4, appPort), 500*time.Millisecond); err == nil {
				c.Close()
				t.Errorf("a transparent connection to the app succeeded without redirection")
			}
		})
	}
}
