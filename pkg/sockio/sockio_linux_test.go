package sockio

import (
	"bytes"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// pair returns both ends of a loopback TCP connection, wrapped.
func pair(t *testing.T) (client, server *Conn) {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	accepted := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			close(accepted)
			return
		}
		accepted <- c
	}()
	c, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	s, ok := <-accepted
	if !ok {
		t.Fatal("accept failed")
	}
	t.Cleanup(func() { c.Close(); s.Close() })
	cw, ok1 := Wrap(c).(*Conn)
	sw, ok2 := Wrap(s).(*Conn)
	if !ok1 || !ok2 {
		t.Fatal("Wrap left a TCP connection unwrapped")
	}
	return cw, sw
}

func TestCopiesBothWaysWithHalfClose(t *testing.T) {
	c, s := pair(t)
	want := make([]byte, 4<<20) // more than both socket buffers hold
	rand.Read(want)
	go func() {
		c.Write(want)
		c.CloseWrite()
	}()
	got, err := io.ReadAll(s) // ends with io.EOF, which ReadAll hides
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("read %d bytes, not the %d written", len(got), len(want))
	}
	// The other direction still works after the half-close.
	if _, err := s.Write([]byte("back")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "back" {
		t.Fatalf("read %q, %v", buf, err)
	}
	if n, err := c.Read(nil); n != 0 || err != nil {
		t.Fatalf("empty read: %d, %v", n, err)
	}
}

func TestReadDeadline(t *testing.T) {
	c, _ := pair(t)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	_, err := c.Read(make([]byte, 10))
	var ne net.Error
	if !errors.Is(err, os.ErrDeadlineExceeded) || !errors.As(err, &ne) || !ne.Timeout() {
		t.Fatalf("read past the deadline: %v, want a timeout", err)
	}
	var oe *net.OpError
	if !errors.As(err, &oe) || oe.Op != "read" {
		t.Fatalf("error %#v, want a read OpError", err)
	}
}

func TestCloseEndsABlockedRead(t *testing.T) {
	c, _ := pair(t)
	errs := make(chan error, 1)
	go func() {
		_, err := c.Read(make([]byte, 10))
		errs <- err
	}()
	time.Sleep(20 * time.Millisecond) // let Read wait in the poller
	c.Close()
	select {
	case err := <-errs:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("read on a closed connection: %v, want net.ErrClosed", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Close did not end the blocked Read")
	}
}

func TestResetIsReported(t *testing.T) {
	c, s := pair(t)
	s.SetLinger(0)
	s.Close()
	time.Sleep(20 * time.Millisecond) // let the reset arrive
	_, err := c.Read(make([]byte, 10))
	if !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("read after a reset: %v, want ECONNRESET", err)
	}
}

func TestTryWriteDoesNotWait(t *testing.T) {
	c, s := pair(t)
	c.SetWriteBuffer(4096)
	s.SetReadBuffer(4096)
	chunk := make([]byte, 64<<10)
	total := 0
	for i := 0; ; i++ {
		if i == 1000 {
			t.Fatal("the socket never filled up")
		}
		n, err := c.TryWrite(chunk)
		if err != nil {
			t.Fatal(err)
		}
		total += n
		if n < len(chunk) {
			break // full: TryWrite returned instead of waiting
		}
	}
	// What it took arrives, in full.
	go func() {
		time.Sleep(10 * time.Millisecond)
		c.CloseWrite()
	}()
	got, err := io.ReadAll(s)
	if err != nil || len(got) != total {
		t.Fatalf("read %d bytes (%v), TryWrite took %d", len(got), err, total)
	}
	// On a closed connection it fails rather than pretending.
	c.Close()
	if _, err := c.TryWrite(chunk); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("TryWrite on a closed connection: %v", err)
	}
}

func TestWrapLeavesOtherConnections(t *testing.T) {
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	if Wrap(a) != a {
		t.Fatal("Wrap changed a connection that is not TCP")
	}
	c, _ := pair(t)
	if Wrap(c) != net.Conn(c) {
		t.Fatal("Wrap wrapped a Conn again")
	}
	if c.TCP() == nil {
		t.Fatal("TCP() is nil")
	}
}

func TestReadAndWriteDoNotAllocate(t *testing.T) {
	c, s := pair(t)
	buf := make([]byte, 64)
	allocs := testing.AllocsPerRun(100, func() {
		if _, err := c.Write(buf); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(s, buf); err != nil {
			t.Fatal(err)
		}
	})
	if allocs > 0 {
		t.Fatalf("%.1f allocations per write and read, want none", allocs)
	}
}

// syncPool is a Pool of 1 KiB buffers that counts what is lent out.
type syncPool struct {
	p   sync.Pool
	out atomic.Int32
}

func (p *syncPool) Get() *[]byte {
	p.out.Add(1)
	if b, ok := p.p.Get().(*[]byte); ok {
		return b
	}
	b := make([]byte, 1024)
	return &b
}

func (p *syncPool) Put(b *[]byte) {
	p.out.Add(-1)
	p.p.Put(b)
}

func TestReadPooledHoldsNoBufferWhileWaiting(t *testing.T) {
	c, s := pair(t)
	pool := &syncPool{}
	type result struct {
		buf *[]byte
		n   int
		err error
	}
	results := make(chan result, 1)
	go func() {
		buf, n, err := c.ReadPooled(pool, 8)
		results <- result{buf, n, err}
	}()
	time.Sleep(30 * time.Millisecond) // ReadPooled found nothing and waits
	if out := pool.out.Load(); out != 0 {
		t.Fatalf("%d buffers lent while waiting for data, want none", out)
	}
	s.Write([]byte("hello"))
	r := <-results
	if r.err != nil || r.n != 5 || string((*r.buf)[8:8+r.n]) != "hello" {
		t.Fatalf("ReadPooled: %d bytes %v", r.n, r.err)
	}
	if out := pool.out.Load(); out != 1 {
		t.Fatalf("%d buffers lent with the data, want 1", out)
	}
	pool.Put(r.buf)

	// The peer's end: io.EOF, nothing lent.
	s.CloseWrite()
	buf, n, err := c.ReadPooled(pool, 0)
	if buf != nil || n != 0 || err != io.EOF {
		t.Fatalf("ReadPooled at the end: %v %d %v", buf, n, err)
	}
	if out := pool.out.Load(); out != 0 {
		t.Fatalf("%d buffers lent after the end", out)
	}
	// Deadlines work as for Read.
	c2, _ := pair(t)
	c2.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, _, err := c2.ReadPooled(pool, 0); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("ReadPooled past the deadline: %v", err)
	}
	if out := pool.out.Load(); out != 0 {
		t.Fatalf("%d buffers lent after a timeout", out)
	}
}

func TestReadPooledFallsBackToRead(t *testing.T) {
	pool := &syncPool{}
	buf, n, err := ReadPooled(bytes.NewReader([]byte("abc")), pool, 2)
	if err != nil || n != 3 || string((*buf)[2:5]) != "abc" {
		t.Fatalf("ReadPooled over a plain reader: %d %v", n, err)
	}
	pool.Put(buf)
	if _, _, err := ReadPooled(bytes.NewReader(nil), pool, 0); err != io.EOF {
		t.Fatalf("at the end: %v", err)
	}
	if out := pool.out.Load(); out != 0 {
		t.Fatalf("%d buffers still lent", out)
	}
}
