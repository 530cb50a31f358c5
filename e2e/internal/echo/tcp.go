package echo

import (
	"errors"
	"io"
	"net"
	"time"
)

// serveTCP echoes every connection accepted on ln until ln is closed.
func (s *Server) serveTCP(ln net.Listener) error {
	ln = s.tcpConns.listener(ln)
	for {
		c, err := ln.Accept()
		if errors.Is(err, net.ErrClosed) {
			return nil
		}
		if err != nil {
			return err
		}
		go s.echoTCP(c)
	}
}

// closeWriter is a connection whose sending half can be shut alone.
type closeWriter interface {
	CloseWrite() error
}

// echoTCP copies bytes back until the peer closes its sending half, then
// closes ours, so a client that half-closes still reads every byte back.
func (s *Server) echoTCP(c net.Conn) {
	defer c.Close()
	start := time.Now()
	n, err := io.Copy(c, c)
	if err == nil {
		if cw, ok := c.(closeWriter); ok {
			err = cw.CloseWrite()
		}
	}
	s.log.Info("tcp connection", "peer", c.RemoteAddr().String(), "local", c.LocalAddr().String(),
		"bytes", n, "duration", time.Since(start), "error", err)
}
