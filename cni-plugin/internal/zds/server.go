package zds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// Defaults for Server's timeouts.
const (
	DefaultHelloTimeout = 5 * time.Second
	DefaultAckTimeout   = 10 * time.Second
)

var (
	// ErrNoZtunnel is returned by AddWorkload when no ztunnel is connected;
	// the pod cannot be served yet, so a CNI ADD must fail closed.
	ErrNoZtunnel = errors.New("no ztunnel connected")
	// ErrClosed is returned once the server has been closed.
	ErrClosed = errors.New("zds server closed")
	// ErrDisconnected is the fate of requests sent or queued on a ztunnel
	// connection that went away before acking them; retrying reaches the
	// next (or a reconnected) ztunnel.
	ErrDisconnected = errors.New("ztunnel disconnected")
)

// AckError is ztunnel's refusal of a request: it acknowledged it with a
// non-empty error.
type AckError struct {
	Op      string // "add", "del", "keep" or "snapshot"
	UID     string
	Message string
}

func (e *AckError) Error() string {
	if e.UID == "" {
		return fmt.Sprintf("ztunnel rejected %s: %s", e.Op, e.Message)
	}
	return fmt.Sprintf("ztunnel rejected %s of %s: %s", e.Op, e.UID, e.Message)
}

// Server is the node agent's ZDS server. It holds the set of workloads
// handed to ztunnel, each with an open netns descriptor, so that every
// ztunnel that connects (a restart, a rolling update) gets the full picture.
type Server struct {
	// HelloTimeout bounds the wait for a new peer's hello; AckTimeout bounds
	// the wait for the ack of each message. A peer that misses either is
	// disconnected. Set before Run; zero means the default.
	HelloTimeout time.Duration
	AckTimeout   time.Duration

	log  *slog.Logger
	path string
	ln   *net.UnixListener
	// sockIno is the inode of the socket file we bound, so Close removes
	// the path only while it is still ours.
	sockIno uint64

	nextID atomic.Uint64

	// mu guards workloads, conns, accepted and closed. Lock order:
	// Server.mu before conn.mu.
	mu        sync.Mutex
	workloads map[string]*workload
	conns     []*conn                    // past the hello, oldest first; the last one is the newest
	accepted  map[*net.UnixConn]struct{} // every open connection, hello or not
	closed    bool

	closeOnce sync.Once
	wg        sync.WaitGroup // connection goroutines
}

// workload is one pod handed to ztunnel.
type workload struct {
	info  *zdsapi.WorkloadInfo
	netns *os.File // owned by the server; closed on delete or Close
}

// NewServer listens on socketPath (a SOCK_SEQPACKET unix socket, mode 0600),
// replacing a stale socket file left there by a previous agent. Call Run to
// accept connections.
func NewServer(socketPath string, log *slog.Logger) (s *Server, err error) {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	if err := os.MkdirAll(filepath.Dir(socketPath), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if err := removeStaleSocket(socketPath); err != nil {
		return nil, err
	}
	// Bind under a temporary name, restrict it, then move it into place, so
	// the socket is never reachable with looser permissions.
	tmp := filepath.Join(filepath.Dir(socketPath), "."+filepath.Base(socketPath)+"."+strconv.Itoa(os.Getpid()))
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: tmp, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", socketPath, err)
	}
	ln.SetUnlinkOnClose(false)
	defer func() {
		if err != nil {
			ln.Close()
			os.Remove(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o600); err != nil {
		return nil, fmt.Errorf("restricting socket permissions: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Stat(tmp, &st); err != nil {
		return nil, fmt.Errorf("inspecting socket: %w", err)
	}
	if err := os.Rename(tmp, socketPath); err != nil {
		return nil, fmt.Errorf("moving socket into place: %w", err)
	}
	return &Server{
		log:       log,
		path:      socketPath,
		ln:        ln,
		sockIno:   st.Ino,
		workloads: make(map[string]*workload),
		accepted:  make(map[*net.UnixConn]struct{}),
	}, nil
}

// removeStaleSocket removes a socket file at path; anything else there is
// left alone and reported.
func removeStaleSocket(path string) error {
	fi, err := os.Lstat(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return nil
	case err != nil:
		return fmt.Errorf("inspecting %s: %w", path, err)
	case fi.Mode().Type() != fs.ModeSocket:
		return fmt.Errorf("%s exists and is not a socket (%v)", path, fi.Mode().Type())
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("removing stale socket: %w", err)
	}
	return nil
}

// Path is the socket path the server listens on.
func (s *Server) Path() string { return s.path }

// Run accepts ztunnel connections until ctx is done or the server is
// closed; both are a clean exit. Run closes the server when it returns.
func (s *Server) Run(ctx context.Context) error {
	defer s.Close()
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	var backoff time.Duration
	for {
		uc, err := s.ln.AcceptUnix()
		if err != nil {
			if s.isClosed() {
				return nil
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) || errors.Is(err, syscall.ENOBUFS) || errors.Is(err, syscall.ENOMEM) {
				backoff = min(max(2*backoff, 5*time.Millisecond), time.Second)
				s.log.Warn("accepting ztunnel connection", "error", err, "retry_in", backoff)
				select {
				case <-time.After(backoff):
					continue
				case <-ctx.Done():
					return nil
				}
			}
			return fmt.Errorf("accepting ztunnel connection: %w", err)
		}
		backoff = 0
		s.mu.Lock()
		if s.closed {
			s.mu.Unlock()
			uc.Close()
			return nil
		}
		s.accepted[uc] = struct{}{}
		s.wg.Add(1)
		s.mu.Unlock()
		go func() {
			defer s.wg.Done()
			s.serve(uc)
		}()
	}
}

// Close stops listening, disconnects every ztunnel and releases the netns
// descriptors the server holds. Safe to call more than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		accepted := s.accepted
		s.accepted = nil
		for uid, w := range s.workloads {
			w.netns.Close()
			delete(s.workloads, uid)
		}
		s.mu.Unlock()

		s.ln.Close()
		var st unix.Stat_t
		if unix.Stat(s.path, &st) == nil && st.Ino == s.sockIno {
			os.Remove(s.path)
		}
		for uc := range accepted {
			uc.Close()
		}
	})
	s.wg.Wait()
	return nil
}

func (s *Server) isClosed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.closed
}

// Connected is the number of ztunnel connections that completed the hello.
func (s *Server) Connected() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.conns)
}

// Workloads lists the UIDs of the workloads the server holds, sorted.
func (s *Server) Workloads() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	uids := make([]string, 0, len(s.workloads))
	for uid := range s.workloads {
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	return uids
}

// AddWorkload hands a pod to the newest ztunnel connection and waits, bounded
// by ctx, for its ack; it returns the ack's error as an *AckError. The server
// keeps its own duplicate of netns (the caller still owns and closes its
// file) and records the workload even when the ack fails or no ztunnel is
// connected (ErrNoZtunnel), so a ztunnel that connects later receives it in
// its snapshot; a caller that gives up on the pod calls DelWorkload. Adding
// a UID again replaces its info and netns.
func (s *Server) AddWorkload(ctx context.Context, uid string, info *zdsapi.WorkloadInfo, netns *os.File) error {
	if uid == "" {
		return errors.New("adding workload: empty uid")
	}
	if netns == nil {
		return fmt.Errorf("adding workload %s: no netns", uid)
	}
	own, err := dupFile(netns)
	if err != nil {
		return fmt.Errorf("duplicating netns descriptor of %s: %w", uid, err)
	}
	info = proto.CloneOf(info)
	if info == nil {
		info = &zdsapi.WorkloadInfo{}
	}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		own.Close()
		return ErrClosed
	}
	if old := s.workloads[uid]; old != nil {
		old.netns.Close()
	}
	s.workloads[uid] = &workload{info: info, netns: own}
	if len(s.conns) == 0 {
		s.mu.Unlock()
		return ErrNoZtunnel
	}
	c := s.conns[len(s.conns)-1]
	req, err := newAddRequest("add", uid, info, own)
	if err == nil {
		err = c.enqueue(req)
	}
	s.mu.Unlock()
	if err != nil {
		return fmt.Errorf("adding workload %s: %w", uid, err)
	}
	return req.wait(ctx)
}

// DelWorkload tells every connected ztunnel to stop serving a pod, waits
// (bounded by ctx) for their acks, and drops the pod from the server's set,
// closing its netns descriptor. With no ztunnel connected it only forgets
// the pod: the next ztunnel's snapshot will not contain it.
func (s *Server) DelWorkload(ctx context.Context, uid string) error {
	if uid == "" {
		return errors.New("deleting workload: empty uid")
	}
	msg := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}

	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return ErrClosed
	}
	if w := s.workloads[uid]; w != nil {
		w.netns.Close()
		delete(s.workloads, uid)
	}
	var reqs []*request
	var errs []error
	for _, c := range s.conns {
		req, err := newRequest("del", uid, msg, nil)
		if err == nil {
			err = c.enqueue(req)
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("deleting workload %s on connection %d: %w", uid, c.id, err))
			continue
		}
		reqs = append(reqs, req)
	}
	s.mu.Unlock()

	for _, req := range reqs {
		if err := req.wait(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// serve runs one ztunnel connection: hello, snapshot, then the queue of
// requests, until the peer goes away or breaks the protocol.
func (s *Server) serve(uc *net.UnixConn) {
	c := &conn{
		s:          s,
		uc:         uc,
		id:         s.nextID.Add(1),
		wake:       make(chan struct{}, 1),
		acks:       make(chan string, 1),
		readerDone: make(chan struct{}),
	}
	c.log = s.log.With("zds_conn", c.id)
	defer func() {
		uc.Close()
		s.mu.Lock()
		delete(s.accepted, uc)
		s.mu.Unlock()
	}()

	if err := c.readHello(s.helloTimeout()); err != nil {
		c.log.Warn("rejecting ztunnel connection", "error", err)
		return
	}
	if !s.register(c) {
		return
	}
	c.log.Info("ztunnel connected", "connections", s.Connected())

	go c.readLoop()
	err := c.writeLoop(s.ackTimeout())
	uc.Close()
	<-c.readerDone
	s.unregister(c, err)
}

func (s *Server) helloTimeout() time.Duration {
	if s.HelloTimeout > 0 {
		return s.HelloTimeout
	}
	return DefaultHelloTimeout
}

func (s *Server) ackTimeout() time.Duration {
	if s.AckTimeout > 0 {
		return s.AckTimeout
	}
	return DefaultAckTimeout
}

// register queues the snapshot on c and makes it the newest connection, in
// one critical section so no add or delete slips between the two.
func (s *Server) register(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	uids := make([]string, 0, len(s.workloads))
	for uid := range s.workloads {
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	for _, uid := range uids {
		w := s.workloads[uid]
		req, err := newAddRequest("snapshot", uid, w.info, w.netns)
		if err != nil {
			// The netns cannot be handed over again (say, out of descriptors):
			// ask ztunnel to keep what it has rather than drop the pod.
			c.log.Warn("sending keep instead of add in snapshot", "uid", uid, "error", err)
			keep := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: uid}}}
			if req, err = newRequest("keep", uid, keep, nil); err != nil {
				c.log.Error("encoding keep", "uid", uid, "error", err)
				continue
			}
		}
		c.queue = append(c.queue, req)
	}
	sent, _ := newRequest("snapshot", "", &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}, nil)
	c.queue = append(c.queue, sent)
	c.signal()
	s.conns = append(s.conns, c)
	return true
}

func (s *Server) unregister(c *conn, cause error) {
	s.mu.Lock()
	s.conns = slices.DeleteFunc(s.conns, func(x *conn) bool { return x == c })
	closed := s.closed
	n := len(s.conns)
	s.mu.Unlock()
	failed := c.shutdown(cause)
	switch {
	case closed:
		c.log.Info("ztunnel connection closed: server shutting down")
	case errors.Is(cause, ErrDisconnected):
		c.log.Info("ztunnel disconnected", "connections", n, "dropped_requests", failed)
	default:
		c.log.Warn("ztunnel connection dropped", "error", cause, "connections", n, "dropped_requests", failed)
	}
}

// request is one message queued on one connection, and its outcome.
type request struct {
	op, uid string
	b       []byte
	fd      *os.File // attached as SCM_RIGHTS; owned by the request, closed when done
	result  chan error
}

func newRequest(op, uid string, msg *zdsapi.WorkloadRequest, fd *os.File) (*request, error) {
	b, err := proto.Marshal(msg)
	if err != nil {
		if fd != nil {
			fd.Close()
		}
		return nil, fmt.Errorf("encoding %s: %w", op, err)
	}
	return &request{op: op, uid: uid, b: b, fd: fd, result: make(chan error, 1)}, nil
}

// newAddRequest encodes an AddWorkload carrying its own duplicate of netns.
func newAddRequest(op, uid string, info *zdsapi.WorkloadInfo, netns *os.File) (*request, error) {
	fd, err := dupFile(netns)
	if err != nil {
		return nil, fmt.Errorf("duplicating netns descriptor: %w", err)
	}
	msg := &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: uid, WorkloadInfo: info}}}
	return newRequest(op, uid, msg, fd)
}

// finish records the outcome; a request finishes exactly once.
func (r *request) finish(err error) {
	if r.fd != nil {
		r.fd.Close()
		r.fd = nil
	}
	r.result <- err
}

func (r *request) wait(ctx context.Context) error {
	select {
	case err := <-r.result:
		return err
	case <-ctx.Done():
		return fmt.Errorf("waiting for ztunnel to ack %s of %s: %w", r.op, r.uid, ctx.Err())
	}
}

// conn is one ztunnel connection. Its write loop sends one request at a
// time and waits for the ack; its read loop turns datagrams into acks.
type conn struct {
	s   *Server
	uc  *net.UnixConn
	id  uint64
	log *slog.Logger

	wake chan struct{} // signalled when the queue grows
	// acks carries the error text of each ack to the write loop; at most
	// one is outstanding because one request is in flight at a time.
	acks       chan string
	readerDone chan struct{} // closed when readLoop returns; readErr is set then
	readErr    error

	// mu guards queue, inflight and dead.
	mu       sync.Mutex
	queue    []*request
	inflight bool  // a request was sent and its ack not yet read
	dead     error // set once the connection failed; no more requests are taken
}

func (c *conn) signal() {
	select {
	case c.wake <- struct{}{}:
	default:
	}
}

func (c *conn) enqueue(r *request) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.dead != nil {
		r.finish(ErrDisconnected)
		return ErrDisconnected
	}
	c.queue = append(c.queue, r)
	c.signal()
	return nil
}

// shutdown fails every queued request and refuses new ones; it returns the
// number of requests failed.
func (c *conn) shutdown(cause error) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	if cause == nil {
		cause = ErrDisconnected
	}
	if c.dead == nil {
		c.dead = cause
	}
	n := len(c.queue)
	for _, r := range c.queue {
		r.finish(fmt.Errorf("%s of %s not delivered: %w", r.op, r.uid, ErrDisconnected))
	}
	c.queue = nil
	return n
}

func (c *conn) readHello(timeout time.Duration) error {
	if err := c.uc.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	b, err := c.readDatagram()
	if err != nil {
		return fmt.Errorf("reading hello: %w", err)
	}
	if err := c.uc.SetReadDeadline(time.Time{}); err != nil {
		return err
	}
	_, err = decodeHello(b)
	return err
}

// readDatagram reads one message, closing any descriptors attached to it.
func (c *conn) readDatagram() ([]byte, error) {
	buf := make([]byte, maxMessageSize+1)
	oob := make([]byte, oobSize)
	n, oobn, flags, _, err := c.uc.ReadMsgUnix(buf, oob)
	if oobn > 0 {
		if k := closeRights(oob[:oobn]); k > 0 {
			c.log.Warn("closed descriptors sent by ztunnel", "count", k)
		}
	}
	if err != nil {
		return nil, err
	}
	if flags&unix.MSG_TRUNC != 0 || n > maxMessageSize {
		return nil, protocolErrorf("message longer than %d bytes", maxMessageSize)
	}
	if n == 0 {
		// recvmsg on a SEQPACKET socket returns 0 once the peer is gone.
		return nil, ErrDisconnected
	}
	return buf[:n], nil
}

func (c *conn) readLoop() {
	defer close(c.readerDone)
	for {
		b, err := c.readDatagram()
		if err != nil {
			c.readErr = err
			return
		}
		ack, err := decodeAck(b)
		if err == nil {
			c.mu.Lock()
			if c.inflight {
				c.inflight = false
			} else {
				err = protocolErrorf("ack without a request")
			}
			c.mu.Unlock()
		}
		if err != nil {
			c.readErr = err
			c.uc.Close()
			return
		}
		c.acks <- ack
	}
}

// writeLoop sends queued requests one at a time. An ack with an error fails
// only its request; anything else wrong ends the connection.
func (c *conn) writeLoop(ackTimeout time.Duration) error {
	timer := time.NewTimer(ackTimeout)
	defer timer.Stop()
	for {
		r, err := c.next()
		if err != nil {
			return err
		}
		err = c.roundTrip(r, timer, ackTimeout)
		var ackErr *AckError
		if err != nil && !errors.As(err, &ackErr) {
			err = connError(err)
			r.finish(fmt.Errorf("%s of %s: %w", r.op, r.uid, err))
			return err
		}
		if err != nil {
			c.log.Warn("ztunnel rejected request", "op", r.op, "uid", r.uid, "error", ackErr.Message)
		} else {
			c.log.Debug("ztunnel acked", "op", r.op, "uid", r.uid)
		}
		r.finish(err)
	}
}

// next waits for a queued request, or for the reader to end.
func (c *conn) next() (*request, error) {
	for {
		c.mu.Lock()
		if len(c.queue) > 0 {
			r := c.queue[0]
			c.queue[0] = nil
			c.queue = c.queue[1:]
			c.mu.Unlock()
			return r, nil
		}
		c.mu.Unlock()
		select {
		case <-c.wake:
		case <-c.readerDone:
			return nil, c.readerError()
		}
	}
}

func (c *conn) readerError() error {
	if c.readErr == nil {
		return ErrDisconnected
	}
	return connError(c.readErr)
}

// connError names a transport failure: a peer that went away is
// ErrDisconnected, and socket errors lose the net.OpError wrapping, whose
// local address is the socket's temporary bind name.
func connError(err error) error {
	switch {
	case errors.Is(err, ErrDisconnected), errors.Is(err, ErrProtocol):
		return err
	case errors.Is(err, io.EOF), errors.Is(err, net.ErrClosed),
		errors.Is(err, syscall.EPIPE), errors.Is(err, syscall.ECONNRESET):
		return ErrDisconnected
	}
	if oe, ok := errors.AsType[*net.OpError](err); ok {
		return fmt.Errorf("%s: %w", oe.Op, oe.Err)
	}
	return err
}

func (c *conn) roundTrip(r *request, timer *time.Timer, ackTimeout time.Duration) error {
	c.mu.Lock()
	c.inflight = true
	c.mu.Unlock()

	if err := c.uc.SetWriteDeadline(time.Now().Add(ackTimeout)); err != nil {
		return err
	}
	if err := c.send(r); err != nil {
		return fmt.Errorf("sending %s: %w", r.op, err)
	}
	timer.Reset(ackTimeout)
	select {
	case msg := <-c.acks:
		if msg != "" {
			return &AckError{Op: r.op, UID: r.uid, Message: msg}
		}
		return nil
	case <-timer.C:
		return fmt.Errorf("no ack for %s of %s within %v", r.op, r.uid, ackTimeout)
	case <-c.readerDone:
		return c.readerError()
	}
}

func (c *conn) send(r *request) error {
	if r.fd == nil {
		_, _, err := c.uc.WriteMsgUnix(r.b, nil, nil)
		return err
	}
	rc, err := r.fd.SyscallConn()
	if err != nil {
		return err
	}
	var werr error
	if err := rc.Control(func(fd uintptr) {
		_, _, werr = c.uc.WriteMsgUnix(r.b, unix.UnixRights(int(fd)), nil)
	}); err != nil {
		return err
	}
	return werr
}
