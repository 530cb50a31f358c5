package hbone

import (
	"context"
	"io"
	"net"
	"testing"
)

// BenchmarkStreamOpenEcho measures opening a stream on a pooled connection,
// echoing 1 KiB through it and closing it.
func BenchmarkStreamOpenEcho(b *testing.B) {
	e := newTestEnv(b, envOptions{})
	msg := make([]byte, 1<<10)
	buf := make([]byte, len(msg))
	ctx := context.Background()
	warm := e.connect(b, e.echoAddr.String(), Headers{}) // dial outside the loop
	warm.Close()
	b.SetBytes(int64(len(msg)))
	b.ReportAllocs()
	for b.Loop() {
		c, err := e.pool.Connect(ctx, e.key(), e.clientTLS, e.echoAddr.String(), Headers{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := c.Write(msg); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
		c.Close()
	}
}

// BenchmarkThroughputUpload measures one stream's client -> upstream bulk
// throughput (MB/s).
func BenchmarkThroughputUpload(b *testing.B) {
	got := make(chan int64, 1)
	sink := startUpstream(b, func(c net.Conn) {
		n, _ := io.Copy(io.Discard, c)
		got <- n
	})
	e := newTestEnv(b, envOptions{})
	c := e.connect(b, sink.String(), Headers{})
	defer c.Close()
	chunk := make([]byte, 32<<10)
	b.SetBytes(int64(len(chunk)))
	var sent int64
	for b.Loop() {
		n, err := c.Write(chunk)
		if err != nil {
			b.Fatal(err)
		}
		sent += int64(n)
	}
	c.(interface{ CloseWrite() error }).CloseWrite()
	if n := <-got; n != sent {
		b.Fatalf("upstream received %d bytes, sent %d", n, sent)
	}
}

// BenchmarkThroughputDownload measures one stream's upstream -> client bulk
// throughput (MB/s).
func BenchmarkThroughputDownload(b *testing.B) {
	chunk := make([]byte, 32<<10)
	source := startUpstream(b, func(c net.Conn) {
		for {
			if _, err := c.Write(chunk); err != nil {
				return
			}
		}
	})
	e := newTestEnv(b, envOptions{})
	c := e.connect(b, source.String(), Headers{})
	defer c.Close()
	buf := make([]byte, len(chunk))
	b.SetBytes(int64(len(chunk)))
	for b.Loop() {
		if _, err := io.ReadFull(c, buf); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkParallelStreams measures many concurrent echo streams sharing
// pooled connections.
func BenchmarkParallelStreams(b *testing.B) {
	e := newTestEnv(b, envOptions{})
	b.SetBytes(1 << 10)
	b.RunParallel(func(pb *testing.PB) {
		msg := make([]byte, 1<<10)
		buf := make([]byte, len(msg))
		for pb.Next() {
			c, err := e.pool.Connect(context.Background(), e.key(), e.clientTLS, e.echoAddr.String(), Headers{})
			if err != nil {
				b.Fatal(err)
			}
			c.Write(msg)
			if _, err := io.ReadFull(c, buf); err != nil {
				b.Fatal(err)
			}
			c.Close()
		}
	})
}
