package proxy

import (
	"errors"
	"io"
	"net"
	"sync"

	"github.com/ambient-mesh/ambient/pkg/sockio"
)

// copyChunk is how many bytes one direction copies between two updates of
// its byte counter. Between *net.TCPConn ends the kernel splices each chunk
// without copying it to user space.
const copyChunk = 1 << 20

// copyBufSize bounds the user-space buffer of one direction when the ends
// cannot splice (an HBONE stream). 32 KiB is the HBONE frame size
// (hbone's maxReadFrame), so each read leaves as one frame.
const copyBufSize = 32 << 10

var copyBufs = &sockio.SyncPool{Pool: sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}}

// pipe copies a to b and b to a until both directions end. The end of one
// direction is passed on as a half-close of the other side; an error in one
// direction aborts both. toB and toA count bytes as they flow (nil to skip).
// It closes neither connection; the first error is returned.
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
		abort(a, b)
	}
	return errors.Join(err, <-errs)
}

// copyHalf copies src to dst, then half-closes dst. An error that only
// says the other direction closed both ends (net.ErrClosed) is not
// reported: that direction reports why.
func copyHalf(dst, src net.Conn, count func(int)) error {
	err := copyOneWay(dst, src, count)
	if err == nil {
		return closeWrite(dst)
	}
	if errors.Is(err, net.ErrClosed) {
		return nil
	}
	return err
}

func copyOneWay(dst, src net.Conn, count func(int)) error {
	if d, s, ok := splices(dst, src); ok {
		// Between two sockets *net.TCPConn.ReadFrom splices a
		// LimitedReader over a TCP connection: the kernel moves the bytes.
		for {
			n, err := io.Copy(d, &io.LimitedReader{R: s, N: copyChunk})
			if count != nil && n > 0 {
				count(int(n))
			}
			if err != nil || n < copyChunk {
				return err
			}
		}
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
	if tw, ok := w.(tryWriter); ok {
		return &countingTryWriter{tw: tw, countingWriterOnly: countingWriterOnly{w: w, count: count}}
	}
	return &countingWriterOnly{w: w, count: count}
}

type tryWriter interface {
	TryWrite(p []byte) (int, error)
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
	tw tryWriter
}

func (c *countingTryWriter) TryWrite(p []byte) (int, error) {
	n, err := c.tw.TryWrite(p)
	c.count(n)
	return n, err
}

// splices returns the sockets under dst and src when the kernel can move
// bytes from one to the other.
func splices(dst, src net.Conn) (d, s *net.TCPConn, ok bool) {
	d, dok := tcpConn(dst)
	s, sok := tcpConn(src)
	return d, s, dok && sok
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
