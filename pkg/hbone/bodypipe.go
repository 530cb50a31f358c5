package hbone

import (
	"io"
	"sync"
)

// bodyPipeSize bounds what a stream's writes may have buffered before the
// transport takes them; it is also the most one Read hands over, so one
// DATA frame. It matches maxReadFrame, the frame size our servers accept.
const bodyPipeSize = maxReadFrame

var bodyPipePool = sync.Pool{New: func() any { b := make([]byte, bodyPipeSize); return &b }}

// bodyPipe carries a stream's writes to the HTTP/2 transport, which reads
// them as the request body on its own goroutine. Unlike io.Pipe, a Write
// returns as soon as its bytes are buffered, so the writer does not wait
// for the transport to frame and send every chunk, and bytes written
// meanwhile leave together in the next frame. The buffer is pooled and
// handed back whenever it drains, so an idle stream holds none.
type bodyPipe struct {
	mu   sync.Mutex
	cond sync.Cond // waits for data (reader) or for space (writer); uses mu

	buf        *[]byte // guarded by mu; pending bytes are (*buf)[r:w]; nil when empty
	r, w       int     // guarded by mu
	writeErr   error   // guarded by mu; set by CloseWithError: Read returns it once drained
	readClosed error   // guarded by mu; set by Close (the reader's): Write returns it
}

func newBodyPipe() *bodyPipe {
	p := &bodyPipe{}
	p.cond.L = &p.mu
	return p
}

// Write buffers b, waiting only while the buffer is full.
func (p *bodyPipe) Write(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	n := 0
	for len(b) > 0 {
		switch {
		case p.readClosed != nil:
			return n, p.readClosed
		case p.writeErr != nil:
			return n, io.ErrClosedPipe
		}
		if p.buf == nil {
			p.buf = bodyPipePool.Get().(*[]byte)
		}
		if p.w == len(*p.buf) && p.r > 0 {
			p.w = copy(*p.buf, (*p.buf)[p.r:p.w])
			p.r = 0
		}
		if p.w == len(*p.buf) {
			p.cond.Wait()
			continue
		}
		k := copy((*p.buf)[p.w:], b)
		p.w += k
		b = b[k:]
		n += k
		p.cond.Broadcast()
	}
	return n, nil
}

// Read takes what is buffered, waiting while nothing is. Once the writer
// has closed and the buffer drained, it returns the writer's error
// (io.EOF after Close).
func (p *bodyPipe) Read(b []byte) (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for p.r == p.w {
		if p.writeErr != nil {
			return 0, p.writeErr
		}
		if p.readClosed != nil {
			return 0, p.readClosed
		}
		p.cond.Wait()
	}
	n := copy(b, (*p.buf)[p.r:p.w])
	p.r += n
	if p.r == p.w {
		p.releaseLocked()
	}
	p.cond.Broadcast()
	return n, nil
}

func (p *bodyPipe) releaseLocked() {
	if p.buf != nil {
		bodyPipePool.Put(p.buf)
	}
	p.buf, p.r, p.w = nil, 0, 0
}

// CloseWithError ends the writes: Read returns err (io.EOF when nil) after
// what is buffered; later writes fail with io.ErrClosedPipe. Only the first
// call counts.
func (p *bodyPipe) CloseWithError(err error) {
	if err == nil {
		err = io.EOF
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.writeErr == nil {
		p.writeErr = err
	}
	if err != io.EOF {
		p.releaseLocked() // an aborted stream sends nothing more
	}
	p.cond.Broadcast()
}

// Close is the reader's (the transport's, when the stream ends): pending
// and later writes fail with io.ErrClosedPipe.
func (p *bodyPipe) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.readClosed == nil {
		p.readClosed = io.ErrClosedPipe
	}
	p.releaseLocked()
	p.cond.Broadcast()
	return nil
}
