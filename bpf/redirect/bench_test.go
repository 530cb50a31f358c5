package redirect

import (
	"net"
	"net/netip"
	"runtime"
	"testing"

	"golang.org/x/sys/unix"
)

// BenchmarkConnectAccept measures one TCP connect+accept+close over lo inside
// a pod netns:
//   - no-program: a netns without the program, to 127.0.0.1 (baseline);
//   - loopback-untouched: the program attached, to 127.0.0.1 (it runs and
//     passes);
//   - redirected: the program attached, to a remote address that table 133
//     and the program land on the 15001 listener.
//
// The client resets on close (SO_LINGER 0) so no TIME_WAIT builds up; no
// timing is asserted.
func BenchmarkConnectAccept(b *testing.B) {
	tp := newTestPod(b)
	plain := newNS(b, "amb-bench-")
	if err := plain.Do(func() error { return upLoopback() }); err != nil {
		b.Fatal(err)
	}
	tp.attach(b)
	z := tp.startZtunnel(b, true)
	inPod := listenIn(b, tp.pod, "tcp", "127.0.0.1:0", tcpOnly())
	inPlain := listenIn(b, plain, "tcp", "127.0.0.1:0", tcpOnly())

	// Raw syscalls: the Go runtime's poller would add more noise than the
	// program costs. Over lo the handshake completes inside connect(), so
	// the listener's queue already holds the connection.
	run := func(b *testing.B, n *testNS, l net.Listener, dst netip.AddrPort) {
		rc, err := l.(*net.TCPListener).SyscallConn()
		if err != nil {
			b.Fatal(err)
		}
		var lfd int
		rc.Control(func(fd uintptr) { lfd = int(fd) })
		sa := &unix.SockaddrInet4{Port: int(dst.Port()), Addr: dst.Addr().As4()}
		err = n.Do(func() error {
			b.ResetTimer()
			for b.Loop() {
				c, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
				if err != nil {
					return err
				}
				if err := unix.Connect(c, sa); err != nil {
					unix.Close(c)
					return err
				}
				s, _, err := unix.Accept4(lfd, unix.SOCK_CLOEXEC)
				if err != nil {
					unix.Close(c)
					return err
				}
				unix.SetsockoptLinger(c, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1})
				unix.Close(c)
				unix.Close(s)
			}
			return nil
		})
		runtime.KeepAlive(l)
		if err != nil {
			b.Fatal(err)
		}
	}
	b.Run("no-program", func(b *testing.B) { run(b, plain, inPlain, addrPort(inPlain.Addr())) })
	b.Run("loopback-untouched", func(b *testing.B) { run(b, tp.pod, inPod, addrPort(inPod.Addr())) })
	b.Run("redirected", func(b *testing.B) {
		run(b, tp.pod, z.outbound, netip.AddrPortFrom(peerIP4, 80))
	})
}
