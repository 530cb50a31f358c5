package hbone

import (
	"crypto/tls"
	"net"
	"sync"
)

// maxRecordPayload is the most plaintext one TLS record carries (RFC 8446
// §5.1). crypto/tls writes every record with its own call to the socket.
const maxRecordPayload = 16 << 10

// maxPooledBatch caps the batch buffers kept for reuse; a larger one (a
// single write of more than a few frames) is left to the garbage collector.
const maxPooledBatch = 256 << 10

var batchPool = sync.Pool{New: func() any { b := make([]byte, 0, 64<<10); return &b }}

// recordBatcher is the socket under an HBONE tls.Conn. While a batch is
// open, the records crypto/tls writes are gathered and then leave in one
// socket write: a 64 KiB frame costs one system call instead of four. The
// copy is cheap next to the system calls it saves.
type recordBatcher struct {
	net.Conn

	mu       sync.Mutex
	batching bool    // guarded by mu
	buf      *[]byte // guarded by mu; pooled while batching
}

// Write passes p to the socket, or adds it to the open batch. crypto/tls
// may write outside a batch (alerts, key updates), even while another
// goroutine has one open; such records join that batch, in order.
func (b *recordBatcher) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.batching {
		*b.buf = append(*b.buf, p...)
		return len(p), nil
	}
	return b.Conn.Write(p)
}

// batch runs write, which writes to the tls.Conn above b, and sends what it
// wrote in one socket write.
func (b *recordBatcher) batch(write func() error) error {
	b.mu.Lock()
	b.batching = true
	b.buf = batchPool.Get().(*[]byte)
	b.mu.Unlock()

	err := write()

	b.mu.Lock()
	defer b.mu.Unlock()
	if len(*b.buf) > 0 {
		if _, werr := b.Conn.Write(*b.buf); err == nil {
			err = werr
		}
	}
	if cap(*b.buf) <= maxPooledBatch {
		*b.buf = (*b.buf)[:0]
		batchPool.Put(b.buf)
	}
	b.buf = nil
	b.batching = false
	return err
}

// batchedTLS is a tls.Conn whose writes of more than one record each leave
// in one socket write.
type batchedTLS struct {
	*tls.Conn
	raw *recordBatcher
}

// newBatchedTLS wraps c in a recordBatcher and starts TLS over it with
// start (tls.Client or tls.Server).
func newBatchedTLS(c net.Conn, conf *tls.Config, start func(net.Conn, *tls.Config) *tls.Conn) *batchedTLS {
	raw := &recordBatcher{Conn: c}
	return &batchedTLS{Conn: start(raw, conf), raw: raw}
}

func (c *batchedTLS) Write(p []byte) (n int, err error) {
	if len(p) <= maxRecordPayload {
		return c.Conn.Write(p) // one record, one write already
	}
	err = c.raw.batch(func() error {
		n, err = c.Conn.Write(p)
		return err
	})
	return n, err
}
