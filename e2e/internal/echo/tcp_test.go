package echo

import (
	"bytes"
	"io"
	"net"
	"testing"
	"time"
)

func TestTCPEcho(t *testing.T) {
	s := startServer(t)
	addr := s.TCPAddrs()[0]

	tests := []struct {
		name string
		send []byte
	}{
		{name: "a short message comes back and the half-close is answered with EOF", send: []byte("ping\n")},
		{name: "a payload larger than the socket buffers comes back whole", send: bytes.Repeat([]byte("0123456789"), 800_000)},
		{name: "a connection that sends nothing gets nothing back", send: nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			_ = c.SetDeadline(time.Now().Add(30 * time.Second))
			conn := c.(*net.TCPConn)
			werr := make(chan error, 1)
			go func() {
				_, err := conn.Write(tt.send)
				if err == nil {
					err = conn.CloseWrite()
				}
				werr <- err
			}()
			got, err := io.ReadAll(conn)
			if err != nil {
				t.Fatalf("reading echo: %v", err)
			}
			if err := <-werr; err != nil {
				t.Fatalf("writing: %v", err)
			}
			if !bytes.Equal(got, tt.send) {
				t.Errorf("echoed %d bytes that differ from the %d sent", len(got), len(tt.send))
			}
		})
	}
}
