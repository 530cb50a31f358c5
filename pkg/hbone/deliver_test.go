package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"io"
	"net"
	"os"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
)

// slowEcho returns a connection to an echo server that pauses now and
// then, with a small send buffer, so that writes into it fill it.
func slowEcho(t *testing.T) net.Conn {
	t.Helper()
	addr := startUpstream(t, func(c net.Conn) {
		buf := make([]byte, 16<<10)
		for i := 0; ; i++ {
			n, err := c.Read(buf)
			if n > 0 {
				if _, werr := c.Write(buf[:n]); werr != nil {
					return
				}
			}
			if err != nil {
				c.(*net.TCPConn).CloseWrite()
				return
			}
			if i%64 == 0 {
				time.Sleep(5 * time.Millisecond)
			}
		}
	})
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		t.Fatal(err)
	}
	c.(*net.TCPConn).SetWriteBuffer(16 << 10)
	return c
}

func randomPayload(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// The server's reader writes a stream's data straight into an upstream
// that takes it without waiting, and leaves the rest to the stream's
// writer when the upstream is full: the bytes arrive whole and in order.
func TestUpstreamSocketTakesDataInOrder(t *testing.T) {
	e := newTestEnv(t, envOptions{handler: func(ctx context.Context, req *Request) (net.Conn, int) {
		return sockio.Wrap(slowEcho(t)), 200
	}})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()
	payload := randomPayload(4 << 20)
	go func() {
		for b := payload; len(b) > 0; {
			k := min(len(b), 1000+len(b)%7000) // frames of assorted sizes
			if _, err := c.Write(b[:k]); err != nil {
				return
			}
			b = b[k:]
		}
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	got, err := io.ReadAll(c)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, payload) {
		t.Fatalf("echo returned %d bytes, want the %d sent, identical", len(got), len(payload))
	}
}

// A client stream copied into a socket (io.Copy uses WriteTo) delivers
// every byte in order, also when the socket fills up.
func TestClientStreamWriteToSocket(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()
	sink := slowEcho(t) // a socket that fills up now and then
	defer sink.Close()
	payload := randomPayload(4 << 20)
	go func() {
		c.Write(payload)
		c.(interface{ CloseWrite() error }).CloseWrite()
	}()
	echoed := make(chan []byte, 1)
	go func() {
		b, _ := io.ReadAll(sink)
		echoed <- b
	}()
	w := sockio.Wrap(sink)
	n, err := io.Copy(w, c)
	if err != nil || n != int64(len(payload)) {
		t.Fatalf("io.Copy: %d bytes, %v; want %d", n, err, len(payload))
	}
	sink.(*net.TCPConn).CloseWrite()
	if got := <-echoed; !bytes.Equal(got, payload) {
		t.Fatalf("the socket got %d bytes, want the %d sent, identical", len(got), len(payload))
	}
}

// WriteTo stops at the read deadline and leaves what arrives afterwards
// to the next read.
func TestClientStreamWriteToReadDeadline(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	c := e.connect(t, e.echoAddr.String(), Headers{})
	defer c.Close()
	c.SetReadDeadline(time.Now().Add(30 * time.Millisecond))
	var out bytes.Buffer
	if _, err := c.(io.WriterTo).WriteTo(&out); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("WriteTo past the deadline: %v", err)
	}
	c.SetReadDeadline(time.Time{})
	echoOnce(t, c, "after the deadline")
}
