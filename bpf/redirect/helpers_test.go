package redirect

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// requireRoot skips tests that need CAP_BPF/CAP_NET_ADMIN/CAP_SYS_ADMIN.
func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
}

func randName(prefix string) string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return prefix + hex.EncodeToString(b)
}

// testNS is a throwaway named network namespace (/var/run/netns/<name>).
type testNS struct {
	name   string
	handle netns.NsHandle
}

func (n *testNS) path() string { return "/var/run/netns/" + n.name }

// newNS creates a named netns and removes it when the test ends. Creating one
// switches the calling thread, so it happens on a locked thread that is
// switched back (or, if that fails, left locked so the runtime retires it).
func newNS(tb testing.TB, prefix string) *testNS {
	tb.Helper()
	n := &testNS{name: randName(prefix)}
	err := func() error {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			return err
		}
		defer orig.Close()
		h, nerr := netns.NewNamed(n.name)
		if serr := netns.Set(orig); serr != nil {
			return fmt.Errorf("restore netns: %w", serr) // thread stays locked and dies
		}
		runtime.UnlockOSThread()
		n.handle = h
		return nerr
	}()
	if err != nil {
		tb.Fatalf("create netns: %v", err)
	}
	tb.Cleanup(func() {
		n.handle.Close()
		if n.name == "" {
			return // deleted by the test
		}
		if err := netns.DeleteNamed(n.name); err != nil {
			tb.Errorf("delete netns %s: %v", n.name, err)
		}
	})
	return n
}

// Do runs fn on a locked OS thread inside the namespace: sockets fn creates
// belong to it and stay usable from any goroutine afterwards.
func (n *testNS) Do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer orig.Close()
	if err := netns.Set(n.handle); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := netns.Set(orig); err != nil {
		// Leave the thread locked: the runtime drops it with the goroutine.
		return errors.Join(ferr, fmt.Errorf("restore netns: %w", err))
	}
	runtime.UnlockOSThread()
	return ferr
}

// markControl sets ztunnel's mark (and what else opts asks) on a socket before
// bind/connect, as the stand-in ztunnel does.
func sockopts(mark, transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if mark {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, Mark)
			}
			if serr == nil && transparent {
				serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				if serr == nil && network != "tcp4" && network != "udp4" {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				}
			}
		})
		return errors.Join(err, serr)
	}
}

// cookie is the kernel's socket cookie, what a SOCKMAP read and a
// BPF_PROG_TEST_RUN of sk_lookup report.
func cookie(tb testing.TB, c syscall.Conn) uint64 {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var v uint64
	var gerr error
	if err := rc.Control(func(fd uintptr) {
		v, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil {
		tb.Fatal(err)
	}
	if gerr != nil {
		tb.Fatal(gerr)
	}
	return v
}

func listenIn(tb testing.TB, n *testNS, network, addr string, lc net.ListenConfig) net.Listener {
	tb.Helper()
	var l net.Listener
	err := n.Do(func() (err error) {
		l, err = lc.Listen(tb.Context(), network, addr)
		return err
	})
	if err != nil {
		tb.Fatalf("listen %s %s: %v", network, addr, err)
	}
	tb.Cleanup(func() { l.Close() })
	return l
}

// tcpOnly is a ListenConfig without Go's default MPTCP, as ztunnel must use.
func tcpOnly() net.ListenConfig {
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	return lc
}

// upLoopback sets lo up in the current netns.
func upLoopback() error {
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return err
	}
	return netlink.LinkSetUp(lo)
}
