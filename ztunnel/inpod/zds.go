package inpod

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
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
// rather than truncated away.
const maxFDs = 8

// writeTimeout bounds sending the hello and each ack.
const writeTimeout = 5 * time.Second

// ErrProtocol marks a datagram from the agent that breaks ZDS: not a
// WorkloadRequest, no known payload, a missing or extra descriptor, or a
// message that does not fit. It is acked with an error and the connection
// stays.
var ErrProtocol = errors.New("zds protocol violation")

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// runZDS connects to the agent and serves it until ctx is done, reconnecting
// with back-off whenever the connection fails or ends.
func (m *Manager) runZDS(ctx context.Context) {
	backoff := m.cfg.ReconnectMin
	var connID uint64
	for ctx.Err() == nil {
		connID++
		helloSent, err := m.session(ctx, connID)
		m.connected.Store(false)
		m.snapshot.Store(false)
		if ctx.Err() != nil {
			return
		}
		if helloSent {
			backoff = m.cfg.ReconnectMin
			m.log.Warn("agent connection ended", "socket", m.cfg.ZDSSocket, "error", err, "retry_in", backoff)
		} else {
			m.log.Warn("connecting to agent", "socket", m.cfg.ZDSSocket, "error", err, "retry_in", backoff)
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(backoff):
		}
		backoff = min(2*backoff, m.cfg.ReconnectMax)
	}
}

// session runs one connection: hello, then one request and its ack at a
// time, until the agent goes away or ctx is done. helloSent tells the caller
// whether the agent was reached at all.
func (m *Manager) session(ctx context.Context, connID uint64) (helloSent bool, err error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unixpacket", m.cfg.ZDSSocket)
	if err != nil {
		return false, fmt.Errorf("dialing %s: %w", m.cfg.ZDSSocket, err)
	}
	uc := c.(*net.UnixConn)
	m.mu.Lock()
	select {
	case <-m.done:
		m.mu.Unlock()
		uc.Close()
		return false, ErrClosed
	default:
	}
	m.conn = uc
	m.mu.Unlock()
	stop := context.AfterFunc(ctx, func() { uc.Close() })
	defer func() {
		stop()
		m.mu.Lock()
		m.conn = nil
		m.mu.Unlock()
		uc.Close()
	}()

	hello, err := proto.Marshal(&zdsapi.ZdsHello{Version: zdsapi.Version_V1})
	if err != nil {
		return false, fmt.Errorf("encoding hello: %w", err)
	}
	if err := write(uc, hello); err != nil {
		return false, fmt.Errorf("sending hello: %w", err)
	}
	m.connected.Store(true)
	m.connects.Add(1)
	m.log.Info("connected to agent", "socket", m.cfg.ZDSSocket, "connection", connID)

	snapshot := false
	for {
		msg, err := readMessage(uc)
		if err != nil {
			return true, err
		}
		ackErr := m.handle(connID, &snapshot, &msg)
		closeFDs(msg.fds)
		if err := m.ack(uc, ackErr); err != nil {
			return true, fmt.Errorf("sending ack: %w", err)
		}
	}
}

// message is one datagram read from the agent.
type message struct {
	req *zdsapi.WorkloadRequest // nil when it could not be decoded
	err error                   // why it could not be, wrapping ErrProtocol
	fds []int                   // descriptors attached and not yet taken; closed after handling
}

// readMessage reads one datagram. An error means the connection is unusable;
// a datagram that breaks the protocol comes back with msg.err set.
func readMessage(uc *net.UnixConn) (message, error) {
	buf := make([]byte, maxMessageSize+1)
	oob := make([]byte, unix.CmsgSpace(maxFDs*4))
	// Go receives with MSG_CMSG_CLOEXEC, so the descriptors never leak
	// into a child process.
	n, oobn, flags, _, err := uc.ReadMsgUnix(buf, oob)
	msg := message{fds: parseRights(oob[:oobn])}
	if err != nil {
		closeFDs(msg.fds)
		return message{}, fmt.Errorf("reading from agent: %w", err)
	}
	if n == 0 && oobn == 0 {
		// recvmsg on a SOCK_SEQPACKET socket returns 0 once the peer is gone.
		return message{}, fmt.Errorf("reading from agent: %w", io.EOF)
	}
	msg.req, msg.err = decodeRequest(buf[:n], flags)
	return msg, nil
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

// handle acts on one message and returns what to ack: nil for success. It
// takes the netns descriptor of an add out of msg.fds. snapshot is the
// connection's "SnapshotSent received" flag.
func (m *Manager) handle(connID uint64, snapshot *bool, msg *message) error {
	if msg.err != nil {
		return m.protocolError(msg.err)
	}
	req := msg.req
	wantFDs := 0
	if req.GetAdd() != nil {
		wantFDs = 1
	}
	if len(msg.fds) != wantFDs {
		return m.protocolError(protocolErrorf("%s carries %d descriptors, want %d", requestKind(req), len(msg.fds), wantFDs))
	}

	switch p := req.GetPayload().(type) {
	case *zdsapi.WorkloadRequest_Add:
		uid := p.Add.GetUid()
		if uid == "" {
			return m.protocolError(protocolErrorf("add without uid"))
		}
		ns := os.NewFile(uintptr(msg.fds[0]), "netns:"+uid)
		msg.fds = nil
		if err := m.addWorkload(connID, uid, p.Add.GetWorkloadInfo(), ns); err != nil {
			m.log.Warn("adding workload", "uid", uid, "error", err)
			return err
		}
	case *zdsapi.WorkloadRequest_Del:
		uid := p.Del.GetUid()
		if uid == "" {
			return m.protocolError(protocolErrorf("del without uid"))
		}
		m.delWorkload(uid)
	case *zdsapi.WorkloadRequest_Keep:
		if *snapshot {
			return m.protocolError(protocolErrorf("keep of %s after snapshot_sent", p.Keep.GetUid()))
		}
		if err := m.keepWorkload(connID, p.Keep.GetUid()); err != nil {
			m.log.Warn("keeping workload", "uid", p.Keep.GetUid(), "error", err)
			return err
		}
	case *zdsapi.WorkloadRequest_SnapshotSent:
		if *snapshot {
			return m.protocolError(protocolErrorf("second snapshot_sent"))
		}
		*snapshot = true
		m.snapshotDone(connID)
		m.snapshot.Store(true)
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
func (m *Manager) protocolError(err error) error {
	m.protocolErrors.Add(1)
	m.mu.Lock()
	m.lastProtocolError = err.Error()
	m.mu.Unlock()
	m.log.Warn("agent broke the protocol", "error", err)
	return err
}

// ack answers the current request; a nil err is a success.
func (m *Manager) ack(uc *net.UnixConn, err error) error {
	text := ""
	if err != nil {
		text = err.Error()
		m.acksErr.Add(1)
	} else {
		m.acksOK.Add(1)
	}
	b, merr := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: text}}})
	if merr != nil {
		return fmt.Errorf("encoding ack: %w", merr)
	}
	return write(uc, b)
}

func write(uc *net.UnixConn, b []byte) error {
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
