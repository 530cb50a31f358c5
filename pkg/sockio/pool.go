package sockio

import (
	"io"
	"sync"
)

// Pool lends the buffers ReadPooled reads into (a sync.Pool of *[]byte,
// typically). Its buffers must be longer than the offset asked for.
type Pool interface {
	Get() *[]byte
	Put(*[]byte)
}

// SyncPool is a sync.Pool of *[]byte as a Pool.
type SyncPool struct{ sync.Pool }

func (p *SyncPool) Get() *[]byte  { return p.Pool.Get().(*[]byte) }
func (p *SyncPool) Put(b *[]byte) { p.Pool.Put(b) }

// TryWriter writes what it can of p at once, without waiting for room
// (Conn.TryWrite); wrappers of a Conn can offer it too.
type TryWriter interface {
	TryWrite(p []byte) (int, error)
}

// PooledReader is what Conn.ReadPooled offers; wrappers of a Conn can
// offer it too.
type PooledReader interface {
	ReadPooled(pool Pool, off int) (*[]byte, int, error)
}

// ReadPooled reads from r into (*buf)[off:] of a buffer from pool, as
// r's own ReadPooled does when r has one (no buffer held while waiting for
// data); otherwise it takes the buffer first and calls Read. It returns the
// buffer with n > 0 bytes after off, for the caller to give back, or nil
// and the error.
func ReadPooled(r io.Reader, pool Pool, off int) (*[]byte, int, error) {
	if pr, ok := r.(PooledReader); ok {
		return pr.ReadPooled(pool, off)
	}
	buf := pool.Get()
	n, err := r.Read((*buf)[off:])
	if n > 0 {
		return buf, n, nil // an error comes again with the next read
	}
	pool.Put(buf)
	if err == nil {
		err = io.ErrNoProgress
	}
	return nil, 0, err
}
