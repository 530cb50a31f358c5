package standin

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"runtime"
	"strconv"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
)

// soOriginalDst is SO_ORIGINAL_DST (level SOL_IP, linux/netfilter_ipv4.h)
// and IP6T_SO_ORIGINAL_DST (level SOL_IPV6, linux/netfilter_ipv6/ip6_tables.h):
// both are 80.
const soOriginalDst = 80

// nsID identifies a network namespace by its nsfs inode.
type nsID struct {
	Dev, Ino uint64
}

// netnsOf checks that fd is a network namespace and returns its identity.
func netnsOf(fd int) (nsID, error) {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return nsID{}, fmt.Errorf("statfs netns descriptor: %w", err)
	}
	if sfs.Type != unix.NSFS_MAGIC {
		return nsID{}, errors.New("descriptor is not a namespace")
	}
	nstype, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if err != nil {
		return nsID{}, fmt.Errorf("namespace type: %w", err)
	}
	if nstype != unix.CLONE_NEWNET {
		return nsID{}, errors.New("descriptor is not a network namespace")
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nsID{}, fmt.Errorf("stat netns descriptor: %w", err)
	}
	return nsID{Dev: st.Dev, Ino: st.Ino}, nil
}

// inNetns runs fn on a locked OS thread switched into the network namespace
// nsFD, on a goroutine of its own, and switches back. Sockets fn creates
// belong to that namespace and are usable from any goroutine afterwards. If
// switching back fails the thread stays locked, so the runtime retires it
// with the goroutine instead of reusing it in the wrong namespace.
func inNetns(nsFD int, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening own netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Setns(nsFD, unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("entering netns: %w", err)
			return
		}
		ferr := fn()
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("restoring netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// listenerSpecs are ztunnel's listeners in each pod; all on the wildcard
// address (dual-stack where the namespace has IPv6).
var listenerSpecs = []struct {
	port        int
	transparent bool
}{
	// Transparent: an outbound connection is accepted with the non-local
	// original destination as its local address, and the kernel sends an
	// IPv4 SYN-ACK from such an address only for transparent sockets.
	{bpfredirect.PortOutbound, true},
	{bpfredirect.PortInbound, false},
	{bpfredirect.PortHBONE, false},
}

// openListeners opens ztunnel's listeners inside the network namespace nsFD,
// in the order of listenerSpecs. On error none is left open.
func openListeners(nsFD int) (lns []*net.TCPListener, err error) {
	defer func() {
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			lns = nil
		}
	}()
	err = inNetns(nsFD, func() error {
		for _, sp := range listenerSpecs {
			lc := net.ListenConfig{Control: socketOptions(sp.transparent)}
			// An MPTCP socket can neither sit in the eBPF engine's SOCKMAP
			// nor be picked by its sk_lookup program.
			lc.SetMultipathTCP(false)
			l, err := lc.Listen(context.Background(), "tcp", ":"+strconv.Itoa(sp.port))
			if err != nil {
				return err // net.OpError says "listen tcp :<port>: ..."
			}
			lns = append(lns, l.(*net.TCPListener))
		}
		return nil
	})
	return lns, err
}

// socketOptions marks a socket as ztunnel's, so the redirection leaves its
// traffic alone, and makes it transparent when asked.
func socketOptions(transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, bpfredirect.Mark); serr != nil {
				serr = fmt.Errorf("setting SO_MARK: %w", serr)
				return
			}
			if !transparent {
				return
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1); serr != nil {
				serr = fmt.Errorf("setting IP_TRANSPARENT: %w", serr)
				return
			}
			// Go names a dual-stack socket "tcp6".
			if network != "tcp4" {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1); serr != nil {
					serr = fmt.Errorf("setting IPV6_TRANSPARENT: %w", serr)
				}
			}
		})
		return errors.Join(err, serr)
	}
}

// registerSockets puts the outbound and inbound listeners into the pod's
// pinned SOCKMAP. It reports false, and no error, when the eBPF engine has
// no pins for the pod (the nftables engine is in use).
func registerSockets(uid string, outbound, inbound *net.TCPListener) (bool, error) {
	err := bpfredirect.RegisterSockets(uid, outbound, inbound, nil)
	switch {
	case errors.Is(err, bpfredirect.ErrNotAttached):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("registering sockets with the eBPF engine: %w", err)
	}
	return true, nil
}

// originalDst is where the client meant to connect. With nftables the NAT
// redirect rewrote the destination and conntrack remembers it
// (SO_ORIGINAL_DST); without NAT (the eBPF engine, or a direct connection) the
// accepted socket's local address is the original destination. fromNAT says
// which it was.
func originalDst(c *net.TCPConn, tryNAT bool) (dst netip.AddrPort, fromNAT bool) {
	local := unmappedAddr(c.LocalAddr())
	if !tryNAT {
		return local, false
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return local, false
	}
	// An IPv4 client of a dual-stack listener is tracked by IPv4 conntrack.
	level := unix.SOL_IPV6
	if unmappedAddr(c.RemoteAddr()).Addr().Is4() {
		level = unix.SOL_IP
	}
	var got netip.AddrPort
	var gerr error
	if err := rc.Control(func(fd uintptr) { got, gerr = getOriginalDst(int(fd), level) }); err != nil || gerr != nil {
		return local, false
	}
	return got, true
}

// getOriginalDst reads SO_ORIGINAL_DST; x/sys/unix has no getter for a
// socket address option.
func getOriginalDst(fd, level int) (netip.AddrPort, error) {
	var buf [unix.SizeofSockaddrInet6]byte
	size := uint32(len(buf))
	_, _, errno := unix.Syscall6(unix.SYS_GETSOCKOPT, uintptr(fd), uintptr(level), soOriginalDst,
		uintptr(unsafe.Pointer(&buf[0])), uintptr(unsafe.Pointer(&size)), 0)
	if errno != 0 {
		return netip.AddrPort{}, errno
	}
	port := binary.BigEndian.Uint16(buf[2:4])
	switch binary.NativeEndian.Uint16(buf[0:2]) {
	case unix.AF_INET:
		return netip.AddrPortFrom(netip.AddrFrom4([4]byte(buf[4:8])), port), nil
	case unix.AF_INET6:
		return netip.AddrPortFrom(netip.AddrFrom16([16]byte(buf[8:24])).Unmap(), port), nil
	}
	return netip.AddrPort{}, errors.New("unknown address family")
}
