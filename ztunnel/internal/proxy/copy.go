package proxy

import (
	"errors"
	"io"
	"net"
	"sync"
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
	// Between two sockets *net.TCPConn.ReadFrom splices a LimitedReader
	// over a TCP connection and needs no buffer. Otherwise its ReadFrom
	// would allocate a buffer of its own for every chunk: hide it, and copy
	// through a pooled one.
	w := io.Writer(dst)
	var buf []byte
	if !splices(dst, src) {
		w = struct{ io.Writer }{dst}
		bp := copyBufs.Get().(*[]byte)
		defer copyBufs.Put(bp)
		buf = *bp
	}
	for {
		n, err := io.CopyBuffer(w, &io.LimitedReader{R: src, N: copyChunk}, buf)
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

// splices reports whether the kernel can move bytes from src to dst.
func splices(dst, src net.Conn) bool {
	_, d := dst.(*net.TCPConn)
	_, s := src.(*net.TCPConn)
	return d && s
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
