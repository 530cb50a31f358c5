package hbone

import (
	"io"
	"net"
	"sync"
)

// bufSize bounds the memory one direction of one stream holds while copying.
const bufSize = 32 << 10

var bufPool = sync.Pool{New: func() any { b := make([]byte, bufSize); return &b }}

// copyBuffered copies src to dst through a pooled buffer. When flush is
// not nil it is called once src has nothing more to give right away (a
// read returned less than the buffer): flushing after every read would
// cost a write per chunk during bulk transfers. It deliberately does not
// use io.Copy: *net.TCPConn's WriterTo would allocate its own buffer, and
// HTTP/2 response writes must be flushed to reach the peer.
func copyBuffered(dst io.Writer, src io.Reader, flush func()) (int64, error) {
	bp := bufPool.Get().(*[]byte)
	defer bufPool.Put(bp)
	buf := *bp
	var total int64
	for {
		n, rerr := src.Read(buf)
		if n > 0 {
			w, werr := dst.Write(buf[:n])
			total += int64(w)
			if werr != nil {
				return total, werr
			}
			if w != n {
				return total, io.ErrShortWrite
			}
			if flush != nil && n < len(buf) {
				flush()
			}
		}
		if rerr == io.EOF {
			return total, nil
		}
		if rerr != nil {
			return total, rerr
		}
	}
}

// closeWrite half-closes c when it supports it, and closes it otherwise.
func closeWrite(c net.Conn) error {
	if cw, ok := c.(interface{ CloseWrite() error }); ok {
		return cw.CloseWrite()
	}
	return c.Close()
}
