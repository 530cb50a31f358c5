package proxy

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/ambient-mesh/ambient/pkg/sockio"
)

// copyBufSize bounds the user-space buffer of one direction when the ends
// cannot splice (an HBONE stream's app side). 32 KiB is the HBONE frame size
// (hbone's maxReadFrame), so each read leaves as one frame.
const copyBufSize = 32 << 10

var copyBufs = &sockio.SyncPool{Pool: sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}}

// pipe copies a to b and b to a until both directions end. The end of one
// direction is passed on as a half-close of the other side; an error in one
// direction aborts both. toB and toA count bytes as they flow (nil to skip).
// It closes neither connection (an abort closes both); the errors of the
// directions are returned, but for net.ErrClosed: a direction stopped by
// an abort, or by the proxy closing its client connection, only says so.
func pipe(a, b net.Conn, toB, toA func(int)) error {
	errs := make(chan error, 1)
	go func() {
		err := copyHalf(b, a, toB)
		if err != nil {
			abort(a, b)
		}
		errs <- err
	}()
	err := copyHalf(a, b, toA)
	if err != nil {
		// Also when only this side was closed (net.ErrClosed): the other
		// direction may be waiting on a peer that will not end by itself.
		abort(a, b)
	}
	return errors.Join(unlessClosed(err), unlessClosed(<-errs))
}

func unlessClosed(err error) error {
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

// copyHalf copies src to dst, then half-closes dst.
func copyHalf(dst, src net.Conn, count func(int)) error {
	if err := copyOneWay(dst, src, count); err != nil {
		return err
	}
	return closeWrite(dst)
}

func copyOneWay(dst, src net.Conn, count func(int)) error {
	d, dok := dst.(*sockio.Conn)
	s, sok := src.(*sockio.Conn)
	if dok && sok {
		// Between two sockets the kernel moves the bytes, and each piece
		// is counted as it passes.
		_, err := sockio.Splice(d, s, count)
		return err
	}
	if wt, ok := src.(io.WriterTo); ok && !isSocket(src) {
		// An HBONE stream writes what it receives itself, most of it from
		// its connection's reader goroutine when dst is a socket that
		// takes bytes without waiting.
		_, err := wt.WriteTo(countingWriter(dst, count))
		return err
	}
	// Through a pooled buffer, which a socket src lends only while it has
	// data: a connection waiting for its client holds none.
	for {
		bp, n, rerr := sockio.ReadPooled(src, copyBufs, 0)
		if n > 0 {
			w, werr := dst.Write((*bp)[:n])
			copyBufs.Put(bp)
			if count != nil && w > 0 {
				count(w)
			}
			if werr != nil {
				return werr
			}
		}
		if rerr == io.EOF {
			return nil
		}
		if rerr != nil {
			return rerr
		}
	}
}

// countingWriter is w, counting what is written to it with count (nil:
// w itself). It keeps w's TryWrite, if w has one.
func countingWriter(w io.Writer, count func(int)) io.Writer {
	if count == nil {
		return w
	}
	if tw, ok := w.(sockio.TryWriter); ok {
		return &countingTryWriter{tw: tw, countingWriterOnly: countingWriterOnly{w: w, count: count}}
	}
	return &countingWriterOnly{w: w, count: count}
}

type countingWriterOnly struct {
	w     io.Writer
	count func(int)
}

func (c *countingWriterOnly) Write(p []byte) (int, error) {
	n, err := c.w.Write(p)
	c.count(n)
	return n, err
}

type countingTryWriter struct {
	countingWriterOnly
	tw sockio.TryWriter
}

func (c *countingTryWriter) TryWrite(p []byte) (int, error) {
	n, err := c.tw.TryWrite(p)
	c.count(n)
	return n, err
}

// isSocket reports whether c is a TCP socket (whose WriteTo would copy
// through a buffer of its own).
func isSocket(c net.Conn) bool {
	_, ok := tcpConn(c)
	return ok
}

// tcpConn returns the TCP socket c is, or wraps for faster reads and writes.
func tcpConn(c net.Conn) (*net.TCPConn, bool) {
	switch c := c.(type) {
	case *net.TCPConn:
		return c, true
	case *sockio.Conn:
		return c.TCP(), true
	}
	return nil, false
}

// closeWrite half-closes c when it can, and closes it otherwise.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		if err := cw.CloseWrite(); err != nil && !errors.Is(err, net.ErrClosed) {
			return err
		}
		return nil
	}
	return c.Close()
}

// abort closes both ends so the other direction stops too.
func abort(a, b net.Conn) {
	a.Close()
	b.Close()
}
