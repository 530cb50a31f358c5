package zds

import (
	"context"
	"errors"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// testTimeout bounds every wait in these tests; none should come near it.
const testTimeout = 10 * time.Second

func startServer(t *testing.T, configure ...func(*Server)) *Server {
	t.Helper()
	path := filepath.Join(t.TempDir(), "ztunnel.sock")
	s, err := NewServer(path, slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})))
	if err != nil {
		t.Fatalf("NewServer: %v", err)
	}
	for _, f := range configure {
		f(s)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
	return s
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

// fakeZtunnel is the client side of ZDS as ztunnel speaks it.
type fakeZtunnel struct {
	t  *testing.T
	uc *net.UnixConn
}

func dial(t *testing.T, s *Server) *fakeZtunnel {
	t.Helper()
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: s.Path(), Net: "unixpacket"})
	if err != nil {
		t.Fatalf("dialing zds: %v", err)
	}
	t.Cleanup(func() { uc.Close() })
	return &fakeZtunnel{t: t, uc: uc}
}

// connect dials, says hello, and consumes the snapshot, which must hold
// exactly wantUIDs (in order); it returns once the server counts it.
func connect(t *testing.T, s *Server, wantConnected int, wantUIDs ...string) *fakeZtunnel {
	t.Helper()
	z := dial(t, s)
	z.hello(zdsapi.Version_V1)
	z.expectSnapshot(wantUIDs...)
	waitFor(t, "connection count", func() bool { return s.Connected() == wantConnected })
	return z
}

func (z *fakeZtunnel) sendRaw(b []byte) {
	z.t.Helper()
	if _, err := z.uc.Write(b); err != nil {
		z.t.Fatalf("fake ztunnel write: %v", err)
	}
}

func (z *fakeZtunnel) send(m proto.Message) {
	z.t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		z.t.Fatal(err)
	}
	z.sendRaw(b)
}

func (z *fakeZtunnel) hello(v zdsapi.Version) { z.send(&zdsapi.ZdsHello{Version: v}) }

func (z *fakeZtunnel) ack(errText string) {
	z.send(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: errText}}})
}

// recv reads one request and the descriptor attached to it, if any.
func (z *fakeZtunnel) recv() (*zdsapi.WorkloadRequest, *os.File) {
	z.t.Helper()
	z.uc.SetReadDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	n, oobn, flags, _, err := z.uc.ReadMsgUnix(buf, oob)
	if err != nil {
		z.t.Fatalf("fake ztunnel read: %v", err)
	}
	if n == 0 {
		z.t.Fatal("fake ztunnel read: server closed the connection")
	}
	if flags&(unix.MSG_TRUNC|unix.MSG_CTRUNC) != 0 {
		z.t.Fatalf("fake ztunnel read: truncated (flags %#x)", flags)
	}
	var fds []int
	if oobn > 0 {
		msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
		if err != nil {
			z.t.Fatalf("parsing control messages: %v", err)
		}
		for i := range msgs {
			got, err := unix.ParseUnixRights(&msgs[i])
			if err != nil {
				z.t.Fatalf("parsing SCM_RIGHTS: %v", err)
			}
			fds = append(fds, got...)
		}
	}
	var req zdsapi.WorkloadRequest
	if err := proto.Unmarshal(buf[:n], &req); err != nil {
		z.t.Fatalf("decoding request: %v", err)
	}
	if len(fds) > 1 {
		z.t.Fatalf("got %d descriptors, want at most 1", len(fds))
	}
	if len(fds) == 1 {
		f := os.NewFile(uintptr(fds[0]), "received-netns")
		z.t.Cleanup(func() { f.Close() })
		return &req, f
	}
	return &req, nil
}

// expectAdd reads an AddWorkload for uid, checks its descriptor is the
// netns wantNetns refers to, and acks it with errText.
func (z *fakeZtunnel) expectAdd(uid string, wantNetns *os.File, errText string) *zdsapi.AddWorkload {
	z.t.Helper()
	req, f := z.recv()
	add := req.GetAdd()
	if add == nil {
		z.t.Fatalf("got %v, want add of %s", req, uid)
	}
	if add.GetUid() != uid {
		z.t.Fatalf("got add of %q, want %q", add.GetUid(), uid)
	}
	if f == nil {
		z.t.Fatalf("add of %s carries no descriptor", uid)
	}
	if wantNetns != nil {
		assertSameNetns(z.t, f, wantNetns)
	}
	z.ack(errText)
	return add
}

func (z *fakeZtunnel) expectDel(uid, errText string) {
	z.t.Helper()
	req, f := z.recv()
	if req.GetDel().GetUid() != uid || f != nil {
		z.t.Fatalf("got %v (fd %v), want del of %s without descriptor", req, f, uid)
	}
	z.ack(errText)
}

func (z *fakeZtunnel) expectSnapshot(uids ...string) {
	z.t.Helper()
	for _, uid := range uids {
		z.expectAdd(uid, nil, "")
	}
	req, f := z.recv()
	if req.GetSnapshotSent() == nil || f != nil {
		z.t.Fatalf("got %v, want snapshot_sent", req)
	}
	z.ack("")
}

// expectClosed asserts the server hung up on this connection.
func (z *fakeZtunnel) expectClosed() {
	z.t.Helper()
	z.uc.SetReadDeadline(time.Now().Add(testTimeout))
	buf := make([]byte, 64<<10)
	for {
		n, err := z.uc.Read(buf)
		if err != nil || n == 0 {
			var ne net.Error
			if errors.As(err, &ne) && ne.Timeout() {
				z.t.Fatal("server did not close the connection")
			}
			return
		}
	}
}

func assertSameNetns(t *testing.T, got, want *os.File) {
	t.Helper()
	var g, w unix.Stat_t
	if err := unix.Fstat(int(got.Fd()), &g); err != nil {
		t.Fatalf("fstat received fd: %v", err)
	}
	if err := unix.Fstat(int(want.Fd()), &w); err != nil {
		t.Fatalf("fstat netns: %v", err)
	}
	if g.Dev != w.Dev || g.Ino != w.Ino {
		t.Fatalf("received fd is %d:%d, want the netns %d:%d", g.Dev, g.Ino, w.Dev, w.Ino)
	}
	// A network namespace descriptor answers NS_GET_NSTYPE with CLONE_NEWNET.
	typ, err := unix.IoctlRetInt(int(got.Fd()), unix.NS_GET_NSTYPE)
	if err == nil && typ != unix.CLONE_NEWNET {
		t.Fatalf("received fd has namespace type %#x, want CLONE_NEWNET", typ)
	}
}

// ownNetns opens the test process's network namespace.
func ownNetns(t *testing.T) *os.File {
	t.Helper()
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatalf("opening own netns: %v", err)
	}
	t.Cleanup(func() { f.Close() })
	return f
}

// newNetns creates a throwaway network namespace and returns a descriptor
// for it; it skips the test without the privilege to do so.
func newNetns(t *testing.T) *os.File {
	t.Helper()
	type result struct {
		f   *os.File
		err error
	}
	ch := make(chan result, 1)
	go func() {
		// The thread ends up in the new namespace; never unlock it, so the
		// runtime retires it with the goroutine.
		runtime.LockOSThread()
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			ch <- result{err: err}
			return
		}
		f, err := os.Open("/proc/thread-self/ns/net")
		ch <- result{f, err}
	}()
	r := <-ch
	if errors.Is(r.err, unix.EPERM) {
		t.Skip("creating a network namespace needs CAP_SYS_ADMIN")
	}
	if r.err != nil {
		t.Fatalf("creating netns: %v", r.err)
	}
	t.Cleanup(func() { r.f.Close() })
	return r.f
}

func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}

// addAsync starts AddWorkload and returns where its result will land.
func addAsync(t *testing.T, s *Server, uid string, netns *os.File) <-chan error {
	ch := make(chan error, 1)
	go func() {
		ch <- s.AddWorkload(ctxT(t), uid, &zdsapi.WorkloadInfo{Name: "pod-" + uid, Namespace: "ns", ServiceAccount: "sa"}, netns)
	}()
	return ch
}

func TestSocketFileIsPrivateAndReplacesAStaleOne(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "sub", "ztunnel.sock")
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	// A socket file left behind by a previous agent.
	stale, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		t.Fatal(err)
	}
	stale.SetUnlinkOnClose(false)
	stale.Close()

	s, err := NewServer(path, nil)
	if err != nil {
		t.Fatalf("NewServer over a stale socket: %v", err)
	}
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if fi.Mode().Type() != fs.ModeSocket || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket mode = %v, want a socket with 0600", fi.Mode())
	}
	entries, _ := os.ReadDir(filepath.Dir(path))
	if len(entries) != 1 {
		t.Fatalf("socket directory holds %d entries, want only the socket", len(entries))
	}
	s.Close()
	s.Close()
	if _, err := os.Stat(path); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("socket file after Close: %v, want it removed", err)
	}
}

func TestNewServerRefusesToReplaceSomethingThatIsNotASocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ztunnel.sock")
	if err := os.WriteFile(path, []byte("keep me"), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := NewServer(path, nil); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Fatalf("NewServer over a regular file: %v, want a not-a-socket error", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "keep me" {
		t.Fatal("the regular file was touched")
	}
}

func TestAddWithoutZtunnelFailsButIsKeptForTheSnapshot(t *testing.T) {
	s := startServer(t)
	netns := newNetns(t)
	own := ownNetns(t)

	if err := s.AddWorkload(ctxT(t), "uid-b", &zdsapi.WorkloadInfo{Name: "b"}, own); !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("AddWorkload with nobody connected: %v, want ErrNoZtunnel", err)
	}
	if err := s.AddWorkload(ctxT(t), "uid-a", &zdsapi.WorkloadInfo{Name: "a", Namespace: "ns", ServiceAccount: "sa"}, netns); !errors.Is(err, ErrNoZtunnel) {
		t.Fatalf("AddWorkload with nobody connected: %v, want ErrNoZtunnel", err)
	}
	// The caller's file is its own: closing it must not affect the server.
	netns.Close()

	z := dial(t, s)
	z.hello(zdsapi.Version_V1)
	add := z.expectAdd("uid-a", nil, "")
	if got := add.GetWorkloadInfo(); got.GetName() != "a" || got.GetNamespace() != "ns" || got.GetServiceAccount() != "sa" {
		t.Fatalf("snapshot workload info = %v", got)
	}
	z.expectAdd("uid-b", own, "")
	z.expectSnapshot()
	waitFor(t, "connection count", func() bool { return s.Connected() == 1 })
}

func TestSnapshotCarriesTheNetnsDescriptor(t *testing.T) {
	s := startServer(t)
	netns := newNetns(t)
	_ = s.AddWorkload(ctxT(t), "uid-1", nil, netns)

	z := dial(t, s)
	z.hello(zdsapi.Version_V1)
	z.expectAdd("uid-1", netns, "")
	z.expectSnapshot()
}

func TestAddWaitsForTheAckAndReturnsItsError(t *testing.T) {
	s := startServer(t)
	z := connect(t, s, 1)
	own := ownNetns(t)

	res := addAsync(t, s, "uid-1", own)
	req, f := z.recv()
	if req.GetAdd().GetUid() != "uid-1" || f == nil {
		t.Fatalf("got %v, want add of uid-1 with a descriptor", req)
	}
	assertSameNetns(t, f, own)
	select {
	case err := <-res:
		t.Fatalf("AddWorkload returned %v before ztunnel acked", err)
	default:
	}
	z.ack("cannot open listeners")
	var ackErr *AckError
	if err := <-res; !errors.As(err, &ackErr) || ackErr.Message != "cannot open listeners" || ackErr.UID != "uid-1" {
		t.Fatalf("AddWorkload after an error ack: %v, want an AckError", err)
	}

	res = addAsync(t, s, "uid-2", own)
	z.expectAdd("uid-2", own, "")
	if err := <-res; err != nil {
		t.Fatalf("AddWorkload after a clean ack: %v", err)
	}
}

func TestAddGivesUpWhenTheContextEnds(t *testing.T) {
	s := startServer(t)
	z := connect(t, s, 1)

	ctx, cancel := context.WithCancel(context.Background())
	res := make(chan error, 1)
	go func() { res <- s.AddWorkload(ctx, "uid-1", nil, ownNetns(t)) }()
	z.recv()
	cancel()
	if err := <-res; !errors.Is(err, context.Canceled) {
		t.Fatalf("AddWorkload with a cancelled context: %v", err)
	}
	// The late ack is still matched to its request; the connection lives on.
	z.ack("")
	res2 := addAsync(t, s, "uid-2", ownNetns(t))
	z.expectAdd("uid-2", nil, "")
	if err := <-res2; err != nil {
		t.Fatal(err)
	}
}

func TestAddsGoToTheNewestConnectionAndDeletesToAll(t *testing.T) {
	s := startServer(t)
	own := ownNetns(t)
	old := connect(t, s, 1)
	res := addAsync(t, s, "uid-early", own)
	old.expectAdd("uid-early", own, "")
	if err := <-res; err != nil {
		t.Fatal(err)
	}

	// A new ztunnel (rolling restart) gets the snapshot and takes over adds.
	newer := connect(t, s, 2, "uid-early")
	res = addAsync(t, s, "uid-late", own)
	newer.expectAdd("uid-late", own, "")
	if err := <-res; err != nil {
		t.Fatal(err)
	}

	// Deletes reach both; the old connection's next message is the delete,
	// so it never saw uid-late's add.
	del := make(chan error, 1)
	go func() { del <- s.DelWorkload(ctxT(t), "uid-late") }()
	old.expectDel("uid-late", "")
	newer.expectDel("uid-late", "")
	if err := <-del; err != nil {
		t.Fatalf("DelWorkload: %v", err)
	}

	go func() { del <- s.DelWorkload(ctxT(t), "uid-early") }()
	old.expectDel("uid-early", "not serving it")
	newer.expectDel("uid-early", "")
	var ackErr *AckError
	if err := <-del; !errors.As(err, &ackErr) || ackErr.Op != "del" {
		t.Fatalf("DelWorkload with one refusal: %v, want an AckError", err)
	}
	if got := s.Workloads(); len(got) != 0 {
		t.Fatalf("workloads after deleting all: %v", got)
	}
}

func TestReconnectingZtunnelGetsTheCurrentSnapshot(t *testing.T) {
	s := startServer(t)
	own := ownNetns(t)
	netns := newNetns(t)
	z := connect(t, s, 1)
	for _, uid := range []string{"uid-a", "uid-b", "uid-c"} {
		f := own
		if uid == "uid-b" {
			f = netns
		}
		res := addAsync(t, s, uid, f)
		z.expectAdd(uid, f, "")
		if err := <-res; err != nil {
			t.Fatal(err)
		}
	}
	del := make(chan error, 1)
	go func() { del <- s.DelWorkload(ctxT(t), "uid-a") }()
	z.expectDel("uid-a", "")
	if err := <-del; err != nil {
		t.Fatal(err)
	}

	z.uc.Close()
	waitFor(t, "disconnect", func() bool { return s.Connected() == 0 })

	z2 := dial(t, s)
	z2.hello(zdsapi.Version_V1)
	z2.expectAdd("uid-b", netns, "")
	z2.expectAdd("uid-c", own, "")
	z2.expectSnapshot()
	waitFor(t, "reconnect", func() bool { return s.Connected() == 1 })
}

func TestDelWithoutZtunnelForgetsTheWorkload(t *testing.T) {
	s := startServer(t)
	_ = s.AddWorkload(ctxT(t), "uid-a", nil, ownNetns(t))
	if err := s.DelWorkload(ctxT(t), "uid-a"); err != nil {
		t.Fatalf("DelWorkload with nobody connected: %v", err)
	}
	connect(t, s, 1)
}

func TestMisbehavingPeersAreDisconnectedAlone(t *testing.T) {
	oversized := make([]byte, maxMessageSize+100)
	for i := range oversized {
		oversized[i] = 0x0a
	}
	helloAgain, _ := proto.Marshal(&zdsapi.ZdsHello{Version: zdsapi.Version_V1})
	tests := []struct {
		name string
		// misbehave drives the bad peer; it may start an AddWorkload on s.
		misbehave func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error
		// addFails says whether an AddWorkload started by misbehave fails.
		wantAddErr string
	}{
		{name: "a peer sending garbage instead of a hello", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.sendRaw([]byte("\xff\xff\xff\xff garbage"))
			return nil
		}},
		{name: "a peer speaking an unknown version", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.hello(zdsapi.Version_NOT_USED)
			return nil
		}},
		{name: "a peer sending an oversized hello", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.sendRaw(oversized)
			return nil
		}},
		{name: "a peer that never says hello", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			return nil
		}},
		{name: "a peer acking with garbage", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.hello(zdsapi.Version_V1)
			z.recv()
			z.sendRaw([]byte{0x0a, 0xff, 0x01})
			return nil
		}},
		{name: "a peer answering with a message that is not an ack", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.hello(zdsapi.Version_V1)
			z.recv()
			z.sendRaw(helloAgain)
			return nil
		}},
		{name: "a peer acking what was never sent", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.hello(zdsapi.Version_V1)
			z.expectSnapshot()
			z.ack("")
			return nil
		}},
		{name: "a peer that never acks an add", wantAddErr: "no ack", misbehave: func(t *testing.T, s *Server, z *fakeZtunnel) <-chan error {
			z.hello(zdsapi.Version_V1)
			z.expectSnapshot()
			waitFor(t, "bad peer to be newest", func() bool { return s.Connected() == 2 })
			res := addAsync(t, s, "uid-bad", ownNetns(t))
			z.recv()
			return res
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := startServer(t, func(s *Server) {
				s.HelloTimeout = 200 * time.Millisecond
				s.AckTimeout = 200 * time.Millisecond
			})
			good := connect(t, s, 1)

			bad := dial(t, s)
			res := tt.misbehave(t, s, bad)
			bad.expectClosed()
			if res != nil {
				err := <-res
				if err == nil || !strings.Contains(err.Error(), tt.wantAddErr) {
					t.Fatalf("AddWorkload to the bad peer: %v, want an error containing %q", err, tt.wantAddErr)
				}
			}
			waitFor(t, "bad peer to be dropped", func() bool { return s.Connected() == 1 })

			// The good ztunnel is untouched and receives the next add.
			res = addAsync(t, s, "uid-good", ownNetns(t))
			good.expectAdd("uid-good", nil, "")
			if err := <-res; err != nil {
				t.Fatalf("AddWorkload to the good peer: %v", err)
			}
		})
	}
}

func TestDescriptorsSentByThePeerAreClosed(t *testing.T) {
	s := startServer(t)
	z := dial(t, s)
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	b, _ := proto.Marshal(&zdsapi.ZdsHello{Version: zdsapi.Version_V1})
	if _, _, err := z.uc.WriteMsgUnix(b, unix.UnixRights(int(w.Fd())), nil); err != nil {
		t.Fatal(err)
	}
	w.Close()
	z.expectSnapshot()
	// With the server's copy of the write end closed, the pipe reads EOF.
	r.SetReadDeadline(time.Now().Add(testTimeout))
	if _, err := r.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("reading the pipe: %v, want EOF once the server closed its copy", err)
	}
}

func TestCloseFailsPendingAddsAndDisconnects(t *testing.T) {
	path := filepath.Join(t.TempDir(), "ztunnel.sock")
	s, err := NewServer(path, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	z := connect(t, s, 1)
	res := addAsync(t, s, "uid-1", ownNetns(t))
	z.recv()
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run after cancel: %v, want a clean exit", err)
	}
	if err := <-res; err == nil {
		t.Fatal("AddWorkload pending at Close succeeded")
	}
	z.expectClosed()
	if err := s.AddWorkload(ctxT(t), "uid-2", nil, ownNetns(t)); !errors.Is(err, ErrClosed) {
		t.Fatalf("AddWorkload after Close: %v, want ErrClosed", err)
	}
	s.Close()
}

func TestReAddReplacesTheWorkload(t *testing.T) {
	s := startServer(t)
	own := ownNetns(t)
	netns := newNetns(t)
	_ = s.AddWorkload(ctxT(t), "uid-1", &zdsapi.WorkloadInfo{Name: "old"}, own)
	_ = s.AddWorkload(ctxT(t), "uid-1", &zdsapi.WorkloadInfo{Name: "new"}, netns)
	z := dial(t, s)
	z.hello(zdsapi.Version_V1)
	if add := z.expectAdd("uid-1", netns, ""); add.GetWorkloadInfo().GetName() != "new" {
		t.Fatalf("snapshot has %v, want the replacement", add.GetWorkloadInfo())
	}
	z.expectSnapshot()
}

// autoAck acknowledges everything it receives until the connection ends,
// counting adds by UID.
func autoAck(uc *net.UnixConn, adds map[string]int, done chan<- struct{}) {
	defer close(done)
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	ack, _ := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{}}})
	for {
		n, oobn, _, _, err := uc.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return
		}
		closeRights(oob[:oobn])
		var req zdsapi.WorkloadRequest
		if proto.Unmarshal(buf[:n], &req) == nil && req.GetAdd() != nil {
			adds[req.GetAdd().GetUid()]++
		}
		if _, err := uc.Write(ack); err != nil {
			return
		}
	}
}

func TestConcurrentAddsAndDeletesAcrossAZtunnelRestart(t *testing.T) {
	s := startServer(t)
	own := ownNetns(t)
	dialAuto := func() (*net.UnixConn, map[string]int, chan struct{}) {
		z := dial(t, s)
		z.hello(zdsapi.Version_V1)
		adds, done := map[string]int{}, make(chan struct{})
		go autoAck(z.uc, adds, done)
		return z.uc, adds, done
	}
	first, firstAdds, firstDone := dialAuto()
	waitFor(t, "first ztunnel", func() bool { return s.Connected() == 1 })

	const n = 40
	errs := make(chan error, 2*n)
	start := make(chan struct{})
	for i := range n {
		uid := "uid-" + strings.Repeat("x", i%3) + string(rune('a'+i%26)) + "-" + string(rune('0'+i/26))
		go func() {
			<-start
			errs <- s.AddWorkload(ctxT(t), uid, &zdsapi.WorkloadInfo{Name: uid}, own)
			if i%2 == 0 {
				errs <- s.DelWorkload(ctxT(t), uid)
			} else {
				errs <- nil
			}
		}()
	}
	close(start)
	// A new ztunnel arrives mid-stream and the old one leaves.
	second, secondAdds, secondDone := dialAuto()
	waitFor(t, "second ztunnel", func() bool { return s.Connected() == 2 })
	first.Close()
	<-firstDone
	for range 2 * n {
		if err := <-errs; err != nil && !errors.Is(err, ErrDisconnected) {
			t.Errorf("unexpected error: %v", err)
		}
	}
	if got := len(s.Workloads()); got != n/2 {
		t.Fatalf("server holds %d workloads, want %d", got, n/2)
	}

	// A third ztunnel's snapshot is exactly what is left.
	second.Close()
	<-secondDone
	for _, uid := range s.Workloads() {
		if firstAdds[uid]+secondAdds[uid] == 0 {
			t.Errorf("%s was held but never handed to a ztunnel", uid)
		}
	}
	waitFor(t, "ztunnels gone", func() bool { return s.Connected() == 0 })
	connect(t, s, 1, s.Workloads()...)
}
