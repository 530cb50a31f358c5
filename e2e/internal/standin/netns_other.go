//go:build !linux

package standin

import (
	"errors"
	"net"
	"net/netip"
)

// errUnsupported: network namespaces, socket marks and the eBPF engine are
// Linux's.
var errUnsupported = errors.New("ztunnel stand-in needs Linux")

type nsID struct {
	Dev, Ino uint64
}

func netnsOf(int) (nsID, error)                     { return nsID{}, errUnsupported }
func openListeners(int) ([]*net.TCPListener, error) { return nil, errUnsupported }

func registerSockets(string, *net.TCPListener, *net.TCPListener) (bool, error) {
	return false, errUnsupported
}

func originalDst(c *net.TCPConn, _ bool) (netip.AddrPort, bool) {
	return unmappedAddr(c.LocalAddr()), false
}
