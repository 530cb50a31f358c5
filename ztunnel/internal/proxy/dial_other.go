//go:build !linux

package proxy

import "net"

// markedDialer returns a plain dialer: socket marks exist only on Linux.
func markedDialer() *net.Dialer { return &net.Dialer{} }
