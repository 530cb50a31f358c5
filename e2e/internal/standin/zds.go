package standin

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// maxMessageSize bounds one datagram from the agent. An AddWorkload is a uid
// and three short names; anything longer is a misbehaving peer.
const maxMessageSize = 64 << 10

// maxFDs is how many descriptors one datagram may carry and still be read
// whole: an AddWorkload carries one; extra ones are received and closed
// rather than truncated away (MSG_CTRUNC would leak nothing, but could hide
// the one that matters).
const maxFDs = 8

// writeTimeout bounds sending the hello and each ack.
const writeTimeout = 5 * time.Second

// ErrProtocol marks a datagram from the agent that breaks ZDS: not a
// WorkloadRequest, no known payload, a missing or extra descriptor, or a
// message that does not fit. The stand-in answers it with an error ack and
// keeps the connection.
var ErrProtocol = errors.New("zds protocol violation")

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// ZDSStatus is the connection state /zds shows.
type ZDSStatus struct {
	Socket            string `json:"socket"`
	Connected         bool   `json:"connected"`
	SnapshotReceived  bool   `json:"snapshotReceived"`
	Connects          uint64 `json:"connects"`
	AcksOK            uint64 `json:"acksOK"`
	AcksError         uint64 `json:"acksError"`
	ProtocolErrors    uint64 `json:"protocolErrors"`
	LastProtocolError string `json:"lastProtocolError,omitempty"`
}

// ZDS reports the state of the connection to the agent.
func (s *StandIn) ZDS() ZDSStatus {
	s.mu.Lock()
	last := s.lastProtocolError
	s.mu.Unlock()
	return ZDSStatus{
		Socket:            s.cfg.ZDSSocket,
		Connected:         s.connected.Load(),
		SnapshotReceived:  s.ready.Load(),
		Connects:          s.connects.Load(),
		AcksOK:            s.acksOK.Load(),
		AcksError:         s.acksErr.Load(),
		ProtocolErrors:    s.protocolErrors.Load(),
		LastProtocolError: last,
	}
}

// runZDS connects to the agent and serves it until ctx is done, reconnecting
// with back-off whenever the connection fails or ends. The workloads served
// stay up in between, as ztunnel's do; the next snapshot reconciles them.
func (s *StandIn) runZDS(ctx context.Context) {
	backoff := s.cfg.ReconnectMin
	var connID uint64
	for ctx.Err() == nil {
		connID++
		helloSent, err := s.session(ctx, connID)
		s.connected.Store(false)
		s.ready.Store(false)
		if ctx.Err() != nil {
			return
		}
		if helloSent {
			backoff = s.cfg.ReconnectMin
			s.log.Warn("agent connection ended", "socket", s.cfg.ZDSSocket, "error", err, "retry_in", backoff)
		} else {
			s.log.Warn("connecting to agent", "socket", s.cfg.ZDSSocket, "error", err, "retry_in", backoff)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, s.cfg.ReconnectMax)
	}
}

// session runs one connection: hello, then a request and its ack at a time,
// until the agent goes away or ctx is done. helloSent tells the caller
// whether the agent was reached at all.
func (s *StandIn) session(ctx context.Context, connID uint64) (helloSent bool, err error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", s.cfg.ZDSSocket)
	if err != nil {
		return false, fmt.Errorf("dialing %s: %w", s.cfg.ZDSSocket, err)
	}
	uc := c.(*net.UnixConn)
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		uc.Close()
		return false, ErrClosed
	}
	s.conn = uc
	s.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer func() {
		stop()
		s.mu.Lock()
		s.conn = nil
		s.mu.Unlock()
		uc.Close()
	}()

	hello, err := proto.Marshal(&zdsapi.ZdsHello{Version: zdsapi.Version_V1})
	if err != nil {
		return false, fmt.Errorf("encoding hello: %w", err)
	}
	if err := s.write(uc, hello); err != nil {
		return false, fmt.Errorf("sending hello: %w", err)
	}
	s.connected.Store(true)
	s.connects.Add(1)
	s.log.Info("connected to agent", "socket", s.cfg.ZDSSocket, "connection", connID)

	snapshot := false
	for {
		m, err := readMessage(uc)
		if err != nil {
			return true, err
		}
		ackErr := s.handle(connID, &snapshot, m)
		closeFDs(m.fds)
		if err := s.ack(uc, ackErr); err != nil {
			return true, fmt.Errorf("sending ack: %w", err)
		}
	}
}

// message is one datagram read from the agent.
type message struct {
	req *zdsapi.WorkloadRequest // nil when it could not be decoded
	err error                   // why it could not be, wrapping ErrProtocol
	fds []int                   // descriptors attached; closed after handling
}

// readMessage reads one datagram. An error means the connection is unusable;
// a datagram that breaks the protocol is returned with m.err set.
func readMessage(uc *net.UnixConn) (message, error) {
	buf := make([]byte, maxMessageSize+1)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
	m := message{fds: parseRights(oob[:oobn])}
	if err != nil {
		closeFDs(m.fds)
		return message{}, fmt.Errorf("reading from agent: %w", err)
	}
	if n == 0 && oobn == 0 {
		// recvmsg on a SOCK_SEQPACKET socket returns 0 once the peer is gone.
		return message{}, fmt.Errorf("reading from agent: %w", io.EOF)
	}
	m.req, m.err = decodeRequest(buf[:n], flags)
	return m, nil
}

// decodeRequest parses a datagram from the agent.
func decodeRequest(b []byte, flags int) (*zdsapi.WorkloadRequest, error) {
	if flags&unix.MSG_TRUNC != 0 || len(b) > maxMessageSize {
		return nil, protocolErrorf("message longer than %d bytes", maxMessageSize)
	}
	if flags&unix.MSG_CTRUNC != 0 {
		return nil, protocolErrorf("more than %d descriptors attached", maxFDs)
	}
	var req zdsapi.WorkloadRequest
	if err := proto.Unmarshal(b, &req); err != nil {
		return nil, protocolErrorf("decoding request: %v", err)
	}
	if req.GetPayload() == nil {
		return nil, protocolErrorf("request carries no known payload")
	}
	return &req, nil
}

// handle acts on one message and returns what to ack: nil for success.
// snapshot is the connection's "SnapshotSent received" flag.
func (s *StandIn) handle(connID uint64, snapshot *bool, m message) error {
	if m.err != nil {
		return s.protocolError(m.err)
	}
	req := m.req
	wantFDs := 0
	if req.GetAdd() != nil {
		wantFDs = 1
	}
	if len(m.fds) != wantFDs {
		return s.protocolError(protocolErrorf("%s carries %d descriptors, want %d", requestKind(req), len(m.fds), wantFDs))
	}

	switch p := req.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		uid := p.Add.GetUid()
		if uid == "" {
			return s.protocolError(protocolErrorf("add without uid"))
		}
		if err := s.addWorkload(connID, uid, p.Add.GetWorkloadInfo(), m.fds[0]); err != nil {
			s.log.Warn("adding workload", "uid", uid, "error", err)
			return err
		}
	case *zdsapi.WorkloadRequest_Del:
		uid := p.Del.GetUid()
		if uid == "" {
			return s.protocolError(protocolErrorf("del without uid"))
		}
		s.delWorkload(uid)
	case *zdsapi.WorkloadRequest_Keep:
		if *snapshot {
			return s.protocolError(protocolErrorf("keep of %s after snapshot_sent", p.Keep.GetUid()))
		}
		if err := s.keepWorkload(connID, p.Keep.GetUid()); err != nil {
			s.log.Warn("keeping workload", "uid", p.Keep.GetUid(), "error", err)
			return err
		}
	case *zdsapi.WorkloadRequest_SnapshotSent:
		if *snapshot {
			return s.protocolError(protocolErrorf("second snapshot_sent"))
		}
		*snapshot = true
		s.snapshotDone(connID)
		s.ready.Store(true)
	}
	return nil
}

func requestKind(req *zdsapi.WorkloadRequest) string {
	switch req.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		return "add"
	case *zdsapi.WorkloadRequest_Del:
		return "del"
	case *zdsapi.WorkloadRequest_Keep:
		return "keep"
	case *zdsapi.WorkloadRequest_SnapshotSent:
		return "snapshot_sent"
	}
	return "unknown request"
}

// protocolError records and logs a protocol violation and returns it, to be
// acked.
func (s *StandIn) protocolError(err error) error {
	s.protocolErrors.Add(1)
	s.mu.Lock()
	s.lastProtocolError = err.Error()
	s.mu.Unlock()
	s.log.Warn("agent broke the protocol", "error", err)
	return err
}

// ack answers the current request; a nil err is a success.
func (s *StandIn) ack(uc *net.UnixConn, err error) error {
	text := ""
	if err != nil {
		text = err.Error()
		s.acksErr.Add(1)
	} else {
		s.acksOK.Add(1)
	}
	b, merr := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: text}}})
	if merr != nil {
		return fmt.Errorf("encoding ack: %w", merr)
	}
	return s.write(uc, b)
}

func (s *StandIn) write(uc *net.UnixConn, b []byte) error {
	if err := uc.SetWriteDeadline(time.Now().Add(writeTimeout)); err != nil {
		return err
	}
	_, err := uc.Write(b)
	return err
}

// parseRights returns the descriptors attached to a datagram.
func parseRights(oob []byte) []int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil
	}
	var fds []int
	for i := range msgs {
		got, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds
}

func closeFDs(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}
