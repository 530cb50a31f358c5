package inpod

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strconv"
	"syscall"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/ambient-mesh/ambient/bpf/redirect/sockmap"
)

// soOriginalDst is SO_ORIGINAL_DST (level SOL_IP, linux/netfilter_ipv4.h)
// and IP6T_SO_ORIGINAL_DST (level SOL_IPV6, linux/netfilter_ipv6/ip6_tables.h):
// both are 80.
const soOriginalDst = 80

// nsID identifies a network namespace by its nsfs inode.
type nsID struct {
	Dev, Ino uint64
}

// netnsOf checks that f is a network namespace and returns its identity.
func netnsOf(f *os.File) (nsID, error) {
	fd := int(f.Fd())
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

// inNetns runs fn inside the network namespace ns and switches back. It is
// the one place this package changes namespaces: fn runs on a goroutine of
// its own whose OS thread is locked for the duration, so no other goroutine
// ever runs in the pod's namespace. Sockets fn creates belong to that
// namespace and are usable from any goroutine afterwards. If switching back
// fails the thread stays locked, so the runtime retires it with the
// goroutine instead of reusing it in the wrong namespace. The caller keeps
// ns open until inNetns returns.
func inNetns(ns *os.File, fn func() error) error {
	nsFD := int(ns.Fd())
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

// listenerSpecs are ztunnel's listeners in each pod, all on the wildcard
// address (dual-stack).
var listenerSpecs = []struct {
	kind        listenerKind
	port        int
	transparent bool
}{
	// Transparent: an outbound connection is accepted with the non-local
	// original destination as its local address, and the kernel sends an
	// IPv4 SYN-ACK from such an address only for transparent sockets.
	{kindOutbound, sockmap.PortOutbound, true},
	{kindInbound, sockmap.PortInbound, false},
	{kindHBONE, sockmap.PortHBONE, false},
}

// openListeners opens ztunnel's listeners inside the network namespace ns,
// in the order of listenerSpecs. On error none is left open.
func openListeners(ns *os.File) (lns []*net.TCPListener, err error) {
	defer func() {
		if err != nil {
			for _, l := range lns {
				l.Close()
			}
			lns = nil
		}
	}()
	err = inNetns(ns, func() error {
		migrateRequests()
		for _, sp := range listenerSpecs {
			lc := net.ListenConfig{Control: listenerOptions(sp.transparent)}
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

// migrateRequests turns on net.ipv4.tcp_migrate_req in the current network
// namespace (Linux 5.14+): when a listener of a SO_REUSEPORT group closes,
// the connections in its accept queue, and handshakes still under way, move
// to another listener of the group instead of being reset. That is what
// makes the hand-over to a new ztunnel lossless: the old one closes its
// listeners with connections queued that it will never accept. Best effort:
// without the sysctl (older kernels, read-only /proc/sys) the hand-over
// still works, with a window in which a queued connection can be reset.
func migrateRequests() {
	f, err := os.OpenFile("/proc/sys/net/ipv4/tcp_migrate_req", os.O_WRONLY, 0)
	if err != nil {
		return
	}
	f.WriteString("1")
	f.Close()
}

// listenerOptions marks a listening socket as ztunnel's, so the redirection
// leaves its traffic alone; lets a new ztunnel bind the same port while this
// one drains; and makes it transparent when asked.
func listenerOptions(transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, sockmap.Mark); serr != nil {
				serr = fmt.Errorf("setting SO_MARK: %w", serr)
				return
			}
			if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1); serr != nil {
				serr = fmt.Errorf("setting SO_REUSEPORT: %w", serr)
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
	err := sockmap.Register(uid, outbound, inbound, nil)
	switch {
	case errors.Is(err, sockmap.ErrNotAttached):
		return false, nil
	case err != nil:
		return false, fmt.Errorf("registering sockets with the eBPF engine: %w", err)
	}
	return true, nil
}

// originalDst is where the client meant to connect. With nftables the NAT
// redirect rewrote the destination and conntrack remembers it
// (SO_ORIGINAL_DST); without NAT (the eBPF engine, or a direct connection)
// the accepted socket's local address is the original destination.
func originalDst(c *net.TCPConn, tryNAT bool) netip.AddrPort {
	local := unmappedAddr(c.LocalAddr())
	if !tryNAT {
		return local
	}
	rc, err := c.SyscallConn()
	if err != nil {
		return local
	}
	// An IPv4 client of a dual-stack listener is tracked by IPv4 conntrack.
	level := unix.SOL_IPV6
	if unmappedAddr(c.RemoteAddr()).Addr().Is4() {
		level = unix.SOL_IP
	}
	var got netip.AddrPort
	var gerr error
	if err := rc.Control(func(fd uintptr) { got, gerr = getOriginalDst(int(fd), level) }); err != nil || gerr != nil {
		// No conntrack entry: nothing rewrote the destination.
		return local
	}
	return got
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

// keepAlive is what net.Dialer would set on the connections Dial makes.
var keepAlive = net.KeepAliveConfig{Enable: true}

// dialInNetns connects to addr with a marked TCP socket created inside ns,
// from src (transparently, see Manager.DialFrom) when src is valid. Only
// the socket is made in the namespace; the connect runs on the caller's
// goroutine through the runtime poller.
func dialInNetns(ctx context.Context, ns *os.File, network, addr string, src netip.Addr) (net.Conn, error) {
	var laddr net.Addr
	if src.IsValid() {
		src = src.Unmap()
		laddr = net.TCPAddrFromAddrPort(netip.AddrPortFrom(src, 0))
	}
	opErr := func(err error) error { return &net.OpError{Op: "dial", Net: network, Source: laddr, Err: err} }
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return nil, opErr(fmt.Errorf("address must be ip:port: %w", err))
	}
	ip := ap.Addr().Unmap()
	switch {
	case network != "tcp" && network != "tcp4" && network != "tcp6":
		return nil, opErr(net.UnknownNetworkError(network))
	case network == "tcp4" && !ip.Is4(), network == "tcp6" && ip.Is4():
		return nil, opErr(&net.AddrError{Err: "address family mismatch", Addr: addr})
	}
	raddr := net.TCPAddrFromAddrPort(netip.AddrPortFrom(ip, ap.Port()))
	opErr = func(err error) error {
		return &net.OpError{Op: "dial", Net: network, Source: laddr, Addr: raddr, Err: err}
	}
	if src.IsValid() {
		if err := CheckSource(src, ip); err != nil {
			return nil, opErr(err)
		}
	}

	var fd int
	var sa unix.Sockaddr
	err = inNetns(ns, func() error {
		family := unix.AF_INET6
		if ip.Is4() {
			family = unix.AF_INET
			sa = &unix.SockaddrInet4{Port: int(ap.Port()), Addr: ip.As4()}
		} else {
			sa6 := &unix.SockaddrInet6{Port: int(ap.Port()), Addr: ip.As16()}
			if z := ip.Zone(); z != "" {
				// Interface names mean the pod's interfaces.
				ifi, err := net.InterfaceByName(z)
				if err != nil {
					return fmt.Errorf("zone %q: %w", z, err)
				}
				sa6.ZoneId = uint32(ifi.Index)
			}
			sa = sa6
		}
		s, err := unix.Socket(family, unix.SOCK_STREAM|unix.SOCK_NONBLOCK|unix.SOCK_CLOEXEC, unix.IPPROTO_TCP)
		if err != nil {
			return os.NewSyscallError("socket", err)
		}
		if err := unix.SetsockoptInt(s, unix.SOL_SOCKET, unix.SO_MARK, sockmap.Mark); err != nil {
			unix.Close(s)
			return os.NewSyscallError("setsockopt SO_MARK", err)
		}
		if src.IsValid() {
			if err := bindTransparent(s, family, src); err != nil {
				unix.Close(s)
				return err
			}
		}
		fd = s
		return nil
	})
	if err != nil {
		return nil, opErr(err)
	}
	// Non-blocking, so os.NewFile makes it pollable.
	f := os.NewFile(uintptr(fd), "dial "+addr)
	defer f.Close()
	if err := connect(ctx, f, sa); err != nil {
		return nil, opErr(err)
	}
	c, err := net.FileConn(f) // a dup; f is closed on return
	if err != nil {
		return nil, opErr(err)
	}
	tc := c.(*net.TCPConn)
	if err := tc.SetKeepAliveConfig(keepAlive); err != nil {
		tc.Close()
		return nil, opErr(err)
	}
	return tc, nil
}

// loopbackDevice is the loopback interface of every network namespace.
const loopbackDevice = "lo"

// bindTransparent binds the socket fd of family to the foreign address src
// (see Manager.DialFrom): IP_TRANSPARENT (IPV6_TRANSPARENT) allows binding
// an address the namespace does not own; IP_BIND_ADDRESS_NO_PORT leaves the
// port to connect, which may then reuse it towards other destinations, so
// many connections from one client do not use up the ephemeral ports;
// SO_BINDTODEVICE lo makes the connection arrive on lo.
func bindTransparent(fd, family int, src netip.Addr) error {
	level, opt, name := unix.SOL_IP, unix.IP_TRANSPARENT, "IP_TRANSPARENT"
	var sa unix.Sockaddr
	if family == unix.AF_INET6 {
		level, opt, name = unix.SOL_IPV6, unix.IPV6_TRANSPARENT, "IPV6_TRANSPARENT"
		sa = &unix.SockaddrInet6{Addr: src.As16()}
	} else {
		sa = &unix.SockaddrInet4{Addr: src.As4()}
	}
	if err := unix.SetsockoptInt(fd, level, opt, 1); err != nil {
		return os.NewSyscallError("setsockopt "+name, err)
	}
	if err := unix.SetsockoptInt(fd, unix.SOL_IP, unix.IP_BIND_ADDRESS_NO_PORT, 1); err != nil {
		return os.NewSyscallError("setsockopt IP_BIND_ADDRESS_NO_PORT", err)
	}
	if err := unix.BindToDevice(fd, loopbackDevice); err != nil {
		return os.NewSyscallError("setsockopt SO_BINDTODEVICE", err)
	}
	if err := unix.Bind(fd, sa); err != nil {
		return os.NewSyscallError("bind", err)
	}
	return nil
}

// aLongTimeAgo is a deadline in the past: it wakes a pending connect.
var aLongTimeAgo = time.Unix(1, 0)

// connect connects the non-blocking socket f to sa, waiting in the poller
// until it is done, ctx is done or its deadline passes.
func connect(ctx context.Context, f *os.File, sa unix.Sockaddr) error {
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var cerr error
	if err := rc.Control(func(fd uintptr) { cerr = unix.Connect(int(fd), sa) }); err != nil {
		return err
	}
	switch cerr {
	case nil:
		return nil
	case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
	default:
		return os.NewSyscallError("connect", cerr)
	}
	if dl, ok := ctx.Deadline(); ok {
		if err := f.SetWriteDeadline(dl); err != nil {
			return err
		}
	}
	stop := context.AfterFunc(ctx, func() { f.SetWriteDeadline(aLongTimeAgo) })
	defer stop()
	var soErr error
	werr := rc.Write(func(fd uintptr) bool {
		v, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_ERROR)
		if err != nil {
			soErr = os.NewSyscallError("getsockopt", err)
			return true
		}
		switch e := syscall.Errno(v); e {
		case unix.EINPROGRESS, unix.EALREADY, unix.EINTR:
			return false
		case 0, unix.EISCONN:
			// Write is called once before the first wait, and wake-ups
			// can be spurious: only a peer name proves the connect done.
			_, err := unix.Getpeername(int(fd))
			return err == nil
		default:
			soErr = os.NewSyscallError("connect", e)
			return true
		}
	})
	if werr != nil {
		if err := ctx.Err(); err != nil {
			return err
		}
		if errors.Is(werr, os.ErrDeadlineExceeded) {
			return context.DeadlineExceeded
		}
		return werr
	}
	return soErr
}
