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

var copyBufs = sync.Pool{New: func() any { b := make([]byte, copyBufSize); return &b }}

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

// copyHalf copies src to dst, then half-closes dst.
func copyHalf(dst, src net.Conn, count func(int)) error {
	if _, isTCP := tcpConn(src); !isTCP {
		if wt, ok := src.(io.WriterTo); ok {
			// An HBONE stream writes what it receives itself, most of it
			// from its connection's reader goroutine when dst is a socket
			// that takes bytes without waiting.
			_, err := wt.WriteTo(countingWriter(dst, count))
			if err != nil {
				if errors.Is(err, net.ErrClosed) {
					return nil // the other direction aborted; it reports why
				}
				return err
			}
			return closeWrite(dst)
		}
	}
	// Between two sockets *net.TCPConn.ReadFrom splices a LimitedReader
	// over a TCP connection and needs no buffer. Otherwise its ReadFrom
	// would allocate a buffer of its own for every chunk: hide it, and copy
	// through a pooled one.
	w := io.Writer(dst)
	r := io.Reader(src)
	var buf []byte
	if d, s, ok := splices(dst, src); ok {
		w, r = d, s
	} else {
		w = struct{ io.Writer }{dst}
		bp := copyBufs.Get().(*[]byte)
		defer copyBufs.Put(bp)
		buf = *bp
	}
	for {
		n, err := io.CopyBuffer(w, &io.LimitedReader{R: r, N: copyChunk}, buf)
		if count != nil && n > 0 {
			count(int(n))
		}
		if err != nil {
			if errors.Is(err, net.ErrClosed) {
				return nil // the other direction aborted; it reports why
			}
			return err
		}
		if n < copyChunk {
			return closeWrite(dst)
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
