//go:build !linux

package inpod

import (
	"context"
	"errors"
	"net"
	"net/netip"
	"os"
)

// errNotLinux refuses every add and dial: network namespaces are Linux's.
var errNotLinux = errors.New("in-pod listeners need Linux network namespaces")

type nsID struct {
	Dev, Ino uint64
}

func netnsOf(*os.File) (nsID, error) { return nsID{}, errNotLinux }

func openListeners(*os.File) ([]*net.TCPListener, error) { return nil, errNotLinux }

var listenerSpecs []struct {
	kind        listenerKind
	port        int
	transparent bool
}

func registerSockets(string, *net.TCPListener, *net.TCPListener) (bool, error) {
	return false, errNotLinux
}

func originalDst(c *net.TCPConn, _ bool) netip.AddrPort { return unmappedAddr(c.LocalAddr()) }

func dialInNetns(context.Context, *os.File, string, string, netip.Addr) (net.Conn, error) {
	return nil, errNotLinux
}
