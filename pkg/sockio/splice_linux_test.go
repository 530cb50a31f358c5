package sockio

import (
	"bytes"
	"errors"
	"io"
	"net"
	"os"
	"sync/atomic"
	"testing"
	"time"
)

func openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// Splice moves everything, in order, counts it as it goes, ends at the
// source's end and leaves no pipe open.
func TestSpliceMovesAllAndCounts(t *testing.T) {
	fds := openFDs(t)
	srcW, src := pair(t)         // written at srcW, read by Splice from src
	dst, dstR := pair(t)         // written by Splice to dst, read at dstR
	dstR.SetReadBuffer(16 << 10) // a slow, small reader: the pump waits
	payload := randomBytes(8 << 20)
	go func() {
		for b := payload; len(b) > 0; {
			k := min(len(b), 1+len(b)%100000)
			srcW.Write(b[:k])
			b = b[k:]
		}
		srcW.CloseWrite()
	}()
	got := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(dstR)
		got <- b
	}()
	var counted atomic.Int64
	n, err := Splice(dst, src, func(k int) { counted.Add(int64(k)) })
	if err != nil || n != int64(len(payload)) || counted.Load() != n {
		t.Fatalf("Splice: %d bytes (counted %d), %v; want %d", n, counted.Load(), err, len(payload))
	}
	dst.CloseWrite()
	if b := <-got; !bytes.Equal(b, payload) {
		t.Fatalf("the destination read %d bytes, want the %d sent, identical", len(b), len(payload))
	}
	srcW.Close()
	src.Close()
	dst.Close()
	dstR.Close()
	if now := openFDs(t); now > fds {
		t.Fatalf("%d descriptors open after, %d before: the pipe leaked", now, fds)
	}
}

// A quiet connection's bytes are counted when they pass, not when a chunk
// fills up.
func TestSpliceCountsAsBytesPass(t *testing.T) {
	srcW, src := pair(t)
	dst, dstR := pair(t)
	counted := make(chan int, 10)
	done := make(chan error, 1)
	go func() {
		_, err := Splice(dst, src, func(k int) { counted <- k })
		done <- err
	}()
	srcW.Write([]byte("hello"))
	select {
	case k := <-counted:
		if k != 5 {
			t.Fatalf("counted %d bytes, want 5", k)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("5 bytes passed and were not counted")
	}
	buf := make([]byte, 5)
	if _, err := io.ReadFull(dstR, buf); err != nil || string(buf) != "hello" {
		t.Fatalf("read %q, %v", buf, err)
	}
	// Closing the source's socket ends the splice with net.ErrClosed.
	src.Close()
	select {
	case err := <-done:
		if !errors.Is(err, net.ErrClosed) {
			t.Fatalf("Splice after its source closed: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Splice did not end when its source closed")
	}
}

// A destination reset by its peer ends the splice with the error.
func TestSpliceReportsTheDestinationsError(t *testing.T) {
	srcW, src := pair(t)
	dst, dstR := pair(t)
	dstR.SetLinger(0)
	dstR.Close()
	time.Sleep(20 * time.Millisecond)
	go func() {
		for i := 0; i < 100; i++ {
			if _, err := srcW.Write(make([]byte, 64<<10)); err != nil {
				return
			}
		}
	}()
	done := make(chan error, 1)
	go func() {
		_, err := Splice(dst, src, nil)
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Splice into a reset connection succeeded")
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Splice into a reset connection did not end")
	}
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>9)
	}
	return b
}
