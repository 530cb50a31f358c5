package sockio

import (
	"errors"
	"os"
	"syscall"
)

// maxSplice is the most one splice moves, and the pipe's size (as Go's own
// splicing between sockets).
const maxSplice = 1 << 20

// Splice moves what src receives to dst through a pipe, in the kernel,
// until src's end (nil) or an error. count (nil: none) is told each piece
// as it reaches dst: byte counters move while a quiet connection lives,
// which io.Copy's splicing, counting only when a whole chunk is done,
// does not allow. The pipe is made per call and closed before it returns.
func Splice(dst, src *Conn, count func(int)) (int64, error) {
	var fds [2]int
	if err := syscall.Pipe2(fds[:], syscall.O_NONBLOCK|syscall.O_CLOEXEC); err != nil {
		return 0, os.NewSyscallError("pipe2", err)
	}
	defer syscall.Close(fds[0])
	defer syscall.Close(fds[1])
	// A smaller pipe works too, with more system calls.
	syscall.Syscall(syscall.SYS_FCNTL, uintptr(fds[0]), syscall.F_SETPIPE_SZ, maxSplice)

	sp := &splicer{pr: fds[0], pw: fds[1]}
	fill, pump := sp.fill, sp.pump
	var written int64
	for {
		// The pipe is empty here, so EAGAIN from the socket side means
		// the socket has nothing yet.
		sp.n, sp.errno = 0, 0
		if err := src.rc.Read(fill); err != nil {
			return written, src.opError("read", err)
		}
		if sp.errno != 0 {
			return written, src.opError("read", os.NewSyscallError("splice", sp.errno))
		}
		if sp.n == 0 {
			return written, nil // src ended
		}
		for sp.inPipe = sp.n; sp.inPipe > 0; {
			sp.n, sp.errno = 0, 0
			err := dst.rc.Write(pump)
			written += int64(sp.n)
			if count != nil && sp.n > 0 {
				count(sp.n)
			}
			if err != nil {
				return written, dst.opError("write", err)
			}
			if sp.errno != 0 {
				return written, dst.opError("write", os.NewSyscallError("splice", sp.errno))
			}
			if sp.n == 0 {
				// The pipe held inPipe bytes, so this cannot happen; do
				// not spin if it does.
				return written, dst.opError("write", errSpliceStalled)
			}
		}
	}
}

var errSpliceStalled = errors.New("splice from the pipe moved nothing")

// splicer keeps the state of Splice's RawConn callbacks.
type splicer struct {
	pr, pw int // the pipe's read and write ends
	inPipe int // bytes in the pipe
	n      int // what the last callback moved
	errno  syscall.Errno
}

// fill splices from the socket fd into the (empty) pipe.
func (sp *splicer) fill(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall6(syscall.SYS_SPLICE, fd, 0, uintptr(sp.pw), 0, maxSplice, spliceMove|spliceNonblock)
		switch e {
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		sp.n, sp.errno = int(r), e
		return true
	}
}

// pump splices what is in the pipe to the socket fd, as far as it takes
// it; it returns once some moved, or the socket is full.
func (sp *splicer) pump(fd uintptr) bool {
	for {
		r, _, e := syscall.RawSyscall6(syscall.SYS_SPLICE, uintptr(sp.pr), 0, fd, 0, uintptr(sp.inPipe), spliceMove|spliceNonblock)
		switch e {
		case 0:
			sp.n += int(r)
			sp.inPipe -= int(r)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		}
		sp.errno = e
		return true
	}
}

const (
	spliceMove     = 0x1 // SPLICE_F_MOVE
	spliceNonblock = 0x2 // SPLICE_F_NONBLOCK
)
