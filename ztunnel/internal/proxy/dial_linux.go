package proxy

import (
	"fmt"
	"net"
	"syscall"

	"golang.org/x/sys/unix"
)

// markControl marks a socket before it connects, so the node's and the
// pods' redirection rules let ztunnel's own traffic through.
func markControl(_, _ string, rc syscall.RawConn) error {
	var serr error
	err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, SocketMark)
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return fmt.Errorf("setting SO_MARK %#x: %w", SocketMark, err)
	}
	return nil
}

// markedDialer returns a dialer of marked sockets.
func markedDialer() *net.Dialer {
	return &net.Dialer{Control: markControl}
}
