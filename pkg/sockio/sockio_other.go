//go:build !linux

package sockio

import "net"

// Conn is only made on Linux; elsewhere Wrap returns its argument.
type Conn struct{ *net.TCPConn }

// Wrap returns c: the raw calls are written for Linux.
func Wrap(c net.Conn) net.Conn { return c }

// TCP returns the wrapped connection.
func (c *Conn) TCP() *net.TCPConn { return c.TCPConn }

// TryWrite writes nothing: Conn is not made here.
func (c *Conn) TryWrite(p []byte) (int, error) { return 0, nil }

// ReadPooled reads into a buffer from pool, taken before the read.
func (c *Conn) ReadPooled(pool Pool, off int) (*[]byte, int, error) {
	return ReadPooled(c.TCPConn, pool, off)
}
