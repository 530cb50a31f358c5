package echo

import (
	"context"
	"net"
	"sync"
)

// connSet tracks open connections, so shutdown can wait for them to finish and
// Close can drop the ones that did not.
type connSet struct {
	mu sync.Mutex
	// conns holds the open connections; guarded by mu.
	conns map[net.Conn]struct{}
	// closed is set by closeAll; connections added after it are refused.
	// Guarded by mu.
	closed bool
	// open counts the entries of conns.
	open sync.WaitGroup
}

// add records c, or reports false once closeAll has run.
func (s *connSet) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	if s.conns == nil {
		s.conns = map[net.Conn]struct{}{}
	}
	s.conns[c] = struct{}{}
	s.open.Add(1)
	return true
}

// remove forgets c; removing it twice is harmless.
func (s *connSet) remove(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.conns[c]; ok {
		delete(s.conns, c)
		s.open.Done()
	}
}

// wait returns once every connection is removed or ctx is done.
func (s *connSet) wait(ctx context.Context) {
	done := make(chan struct{})
	go func() { s.open.Wait(); close(done) }()
	select {
	case <-done:
	case <-ctx.Done():
	}
}

// closeAll closes every open connection and refuses new ones.
func (s *connSet) closeAll() {
	s.mu.Lock()
	s.closed = true
	conns := make([]net.Conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.Unlock()
	for _, c := range conns {
		_ = c.Close()
	}
}

// listener wraps ln so every connection it accepts is tracked until closed.
func (s *connSet) listener(ln net.Listener) net.Listener {
	return &trackingListener{Listener: ln, set: s}
}

type trackingListener struct {
	net.Listener
	set *connSet
}

func (l *trackingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		tc := &trackedConn{Conn: c, set: l.set}
		if l.set.add(tc) {
			return tc, nil
		}
		_ = c.Close()
	}
}

// trackedConn leaves its set when closed.
type trackedConn struct {
	net.Conn
	set *connSet
}

func (c *trackedConn) Close() error {
	c.set.remove(c)
	return c.Conn.Close()
}

// CloseWrite shuts the sending half when the wrapped connection can.
func (c *trackedConn) CloseWrite() error {
	if cw, ok := c.Conn.(closeWriter); ok {
		return cw.CloseWrite()
	}
	return c.Conn.Close()
}
