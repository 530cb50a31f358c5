package sockio

import (
	"io"
	"net"
	"os"
	"sync"
	"syscall"
	"unsafe"
)

// Conn is a *net.TCPConn whose Read and Write bypass the runtime's
// system-call accounting. Its other methods (deadlines, CloseWrite,
// addresses, socket options) are the TCPConn's.
type Conn struct {
	*net.TCPConn
	rc syscall.RawConn

	// The calls RawConn makes are bound once (readFn, writeFn) and keep
	// their arguments and results here: closures made per call would be
	// allocated on every read and write.
	rmu          sync.Mutex // held by Read and ReadPooled, guards the r fields
	rbuf         []byte
	rn           int
	rerrno       syscall.Errno
	readFn       func(fd uintptr) bool
	rpool        Pool    // ReadPooled's
	rpbuf        *[]byte // ReadPooled's buffer, nil while waiting
	roff         int
	readPooledFn func(fd uintptr) bool

	wmu     sync.Mutex // held by Write and TryWrite, guards the w fields
	wbuf    []byte
	wn      int
	werrno  syscall.Errno
	wwait   bool
	writeFn func(fd uintptr) bool
}

// Wrap returns c as a *Conn when it is a non-blocking *net.TCPConn (every
// TCPConn the net package makes), and c itself otherwise.
func Wrap(c net.Conn) net.Conn {
	tc, ok := c.(*net.TCPConn)
	if !ok {
		return c
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return c
	}
	nonblocking := false
	if err := rc.Control(func(fd uintptr) {
		flags, _, errno := syscall.RawSyscall(syscall.SYS_FCNTL, fd, syscall.F_GETFL, 0)
		nonblocking = errno == 0 && flags&syscall.O_NONBLOCK != 0
	}); err != nil || !nonblocking {
		// A raw call on a blocking socket would stall the scheduler.
		return c
	}
	w := &Conn{TCPConn: tc, rc: rc}
	w.readFn, w.writeFn, w.readPooledFn = w.read, w.write, w.readPooled
	return w
}

// TCP returns the wrapped connection (for splicing between two sockets).
func (c *Conn) TCP() *net.TCPConn { return c.TCPConn }

// Read reads like net.Conn.Read: at most len(p) bytes, io.EOF once the
// peer has closed its side.
func (c *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rbuf, c.rn, c.rerrno = p, 0, 0
	err := c.rc.Read(c.readFn)
	n, errno := c.rn, c.rerrno
	c.rbuf = nil
	switch {
	case err != nil:
		return 0, c.opError("read", err)
	case errno != 0:
		return 0, c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		return 0, io.EOF
	}
	return n, nil
}

// read is RawConn.Read's callback: false waits in the poller and calls
// again.
func (c *Conn) read(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&c.rbuf[0])), uintptr(len(c.rbuf)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		c.rn, c.rerrno = int(r), e
		return true
	}
}

// ReadPooled reads like Read, into (*buf)[off:] of a buffer it takes from
// pool only once the socket has data: while it waits for data it holds no
// buffer. It returns the buffer with n bytes read after off, which the
// caller gives back to pool, or a nil buffer with n 0 and the error
// (io.EOF at the peer's end).
func (c *Conn) ReadPooled(pool Pool, off int) (buf *[]byte, n int, err error) {
	c.rmu.Lock()
	defer c.rmu.Unlock()
	c.rpool, c.roff, c.rn, c.rerrno = pool, off, 0, 0
	rerr := c.rc.Read(c.readPooledFn)
	buf, n, errno := c.rpbuf, c.rn, c.rerrno
	c.rpool, c.rpbuf = nil, nil
	switch {
	case rerr != nil:
		err = c.opError("read", rerr)
	case errno != 0:
		err = c.opError("read", os.NewSyscallError("read", errno))
	case n == 0:
		err = io.EOF
	}
	if err != nil {
		if buf != nil {
			pool.Put(buf)
		}
		return nil, 0, err
	}
	return buf, n, nil
}

// readPooled is ReadPooled's callback: it gives the buffer back before
// returning false, to wait in the poller.
func (c *Conn) readPooled(fd uintptr) bool {
	if c.rpbuf == nil {
		c.rpbuf = c.rpool.Get()
	}
	p := (*c.rpbuf)[c.roff:]
	for {
		r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&p[0])), uintptr(len(p)))
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			c.rpool.Put(c.rpbuf)
			c.rpbuf = nil
			return false
		}
		c.rn, c.rerrno = int(r), e
		return true
	}
}

// Write writes all of p unless an error stops it, like net.Conn.Write.
func (c *Conn) Write(p []byte) (int, error) { return c.writeAll(p, true) }

// TryWrite writes what the socket takes of p now, without waiting for
// room: fewer than len(p) bytes, none included, when its send buffer is
// full.
func (c *Conn) TryWrite(p []byte) (int, error) { return c.writeAll(p, false) }

func (c *Conn) writeAll(p []byte, wait bool) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.wbuf, c.wn, c.werrno, c.wwait = p, 0, 0, wait
	err := c.rc.Write(c.writeFn)
	n, errno := c.wn, c.werrno
	c.wbuf = nil
	switch {
	case err != nil:
		return n, c.opError("write", err)
	case errno != 0:
		return n, c.opError("write", os.NewSyscallError("write", errno))
	}
	return n, nil
}

// write is RawConn.Write's callback: false waits in the poller and calls
// again, with what was written kept in wn.
func (c *Conn) write(fd uintptr) bool {
	for c.wn < len(c.wbuf) {
		r, _, e := syscall.RawSyscall(syscall.SYS_WRITE, fd, uintptr(unsafe.Pointer(&c.wbuf[c.wn])), uintptr(len(c.wbuf)-c.wn))
		switch e {
		case 0:
			c.wn += int(r)
		case syscall.EINTR:
		case syscall.EAGAIN:
			// The send buffer is full: wait for room in the poller, or
			// leave the rest to the caller.
			return !c.wwait
		default:
			c.werrno = e
			return true
		}
	}
	return true
}

// opError describes err as net does for op on this connection. The
// errors of the poller (closed, deadline) come wrapped for a "raw-read" or
// "raw-write"; they are unwrapped so callers see what net.Conn would give.
func (c *Conn) opError(op string, err error) error {
	if oe, ok := err.(*net.OpError); ok {
		err = oe.Err
	}
	return &net.OpError{Op: op, Net: "tcp", Source: c.LocalAddr(), Addr: c.RemoteAddr(), Err: err}
}
