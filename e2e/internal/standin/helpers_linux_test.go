package standin

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

func requireRoot(tb testing.TB) {
	tb.Helper()
	if os.Geteuid() != 0 {
		tb.Skip("needs root (CAP_SYS_ADMIN for setns, CAP_NET_ADMIN for SO_MARK and IP_TRANSPARENT)")
	}
}

// testLogger sends the stand-in's log to the test's.
func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.tb.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// fakeAgent is the node agent's side of ZDS, as small as a test needs: it
// accepts the stand-in, checks its hello, sends requests and reads acks.
type fakeAgent struct {
	path string
	ln   *net.UnixListener
}

func newFakeAgent(tb testing.TB, path string) *fakeAgent {
	tb.Helper()
	if path == "" {
		path = filepath.Join(tb.TempDir(), "ztunnel.sock")
	}
	ln, err := net.ListenUnix("unixpacket", &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		tb.Fatalf("listen: %v", err)
	}
	tb.Cleanup(func() { ln.Close() })
	return &fakeAgent{path: path, ln: ln}
}

// agentConn is one accepted stand-in connection.
type agentConn struct {
	tb testing.TB
	uc *net.UnixConn
}

// accept waits for the stand-in and reads its hello.
func (a *fakeAgent) accept(tb testing.TB) *agentConn {
	tb.Helper()
	a.ln.SetDeadline(time.Now().Add(10 * time.Second))
	uc, err := a.ln.AcceptUnix()
	if err != nil {
		tb.Fatalf("accept: %v", err)
	}
	tb.Cleanup(func() { uc.Close() })
	c := &agentConn{tb: tb, uc: uc}
	var h zdsapi.ZdsHello
	if err := proto.Unmarshal(c.read(), &h); err != nil || h.GetVersion() != zdsapi.Version_V1 {
		tb.Fatalf("hello %v: %v", &h, err)
	}
	return c
}

func (c *agentConn) read() []byte {
	c.tb.Helper()
	buf := make([]byte, 4096)
	c.uc.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.uc.Read(buf)
	if err != nil {
		c.tb.Fatalf("read from stand-in: %v", err)
	}
	return buf[:n]
}

// sendRaw sends one datagram, with fds attached as SCM_RIGHTS.
func (c *agentConn) sendRaw(b []byte, fds ...int) {
	c.tb.Helper()
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		c.tb.Fatalf("send: %v", err)
	}
}

// request sends req and returns the ack's error text.
func (c *agentConn) request(req *zdsapi.WorkloadRequest, fds ...int) string {
	c.tb.Helper()
	b, err := proto.Marshal(req)
	if err != nil {
		c.tb.Fatal(err)
	}
	c.sendRaw(b, fds...)
	return c.ack()
}

func (c *agentConn) ack() string {
	c.tb.Helper()
	var r zdsapi.WorkloadResponse
	if err := proto.Unmarshal(c.read(), &r); err != nil || r.GetAck() == nil {
		c.tb.Fatalf("response %v: %v", &r, err)
	}
	return r.GetAck().GetError()
}

func addReq(uid, namespace, name string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{
		Uid:          uid,
		WorkloadInfo: &zdsapi.WorkloadInfo{Namespace: namespace, Name: name, ServiceAccount: "default"},
	}}}
}

func delReq(uid string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: uid}}}
}

func keepReq(uid string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: uid}}}
}

func snapshotReq() *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}}
}

// mustAck fails unless the ack is a success.
func mustAck(tb testing.TB, what, ackErr string) {
	tb.Helper()
	if ackErr != "" {
		tb.Fatalf("%s: ack error %q", what, ackErr)
	}
}

// startStandIn runs a stand-in against the socket until the test ends.
func startStandIn(tb testing.TB, socket string) *StandIn {
	tb.Helper()
	s, err := New(Config{
		ZDSSocket:    socket,
		AdminAddr:    "127.0.0.1:0",
		ReconnectMin: 10 * time.Millisecond,
		ReconnectMax: 50 * time.Millisecond,
		Logger:       testLogger(tb),
	})
	if err != nil {
		tb.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("run: %v", err)
		}
	})
	return s
}

func (s *StandIn) getAdmin(tb testing.TB, path string) (int, []byte) {
	tb.Helper()
	resp, err := http.Get("http://" + s.AdminAddr().String() + path)
	if err != nil {
		tb.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		tb.Fatal(err)
	}
	return resp.StatusCode, b
}

func (s *StandIn) adminWorkloads(tb testing.TB) []WorkloadStatus {
	tb.Helper()
	code, b := s.getAdmin(tb, "/workloads")
	var ws []WorkloadStatus
	if code != http.StatusOK {
		tb.Fatalf("/workloads: %d %s", code, b)
	}
	if err := json.Unmarshal(b, &ws); err != nil {
		tb.Fatalf("/workloads %s: %v", b, err)
	}
	return ws
}

func waitFor(tb testing.TB, what string, cond func() bool) {
	tb.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			tb.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// testNetns is a throwaway network namespace standing in for a pod's, with
// lo up and an interface holding podIP4/podIP6; it is only reachable
// through its descriptor, and goes away when the test closes it and the
// last socket in it is closed.
type testNetns struct {
	f *os.File
	h *netlink.Handle
}

// Addresses used only inside the namespaces the tests create.
var (
	podIP4 = "10.200.8.2"
	podIP6 = "fd00:208::2"
)

func newTestNetns(tb testing.TB) *testNetns {
	tb.Helper()
	requireRoot(tb)
	var h netns.NsHandle
	err := func() error {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			runtime.UnlockOSThread()
			return err
		}
		defer orig.Close()
		h, err = netns.New()
		if serr := netns.Set(orig); serr != nil {
			return errors.Join(err, fmt.Errorf("restoring netns: %w", serr)) // the thread stays locked and dies
		}
		runtime.UnlockOSThread()
		return err
	}()
	if err != nil {
		tb.Fatalf("creating netns: %v", err)
	}
	n := &testNetns{f: os.NewFile(uintptr(h), "netns")}
	tb.Cleanup(func() { n.f.Close() })
	n.h, err = netlink.NewHandleAt(h)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(n.h.Close)

	lo, err := n.h.LinkByName("lo")
	if err != nil {
		tb.Fatal(err)
	}
	n.must(tb, n.h.LinkSetUp(lo))
	// A veth with both ends inside (this kernel may have no dummy driver).
	n.must(tb, n.h.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0p"}))
	peer, err := n.h.LinkByName("eth0p")
	if err != nil {
		tb.Fatal(err)
	}
	n.must(tb, n.h.LinkSetUp(peer))
	eth, err := n.h.LinkByName("eth0")
	if err != nil {
		tb.Fatal(err)
	}
	for _, a := range []string{podIP4 + "/32", podIP6 + "/128"} {
		addr, err := netlink.ParseAddr(a)
		n.must(tb, err)
		addr.Flags = unix.IFA_F_NODAD
		n.must(tb, n.h.AddrAdd(eth, addr))
	}
	n.must(tb, n.h.LinkSetUp(eth))
	return n
}

func (n *testNetns) must(tb testing.TB, err error) {
	tb.Helper()
	if err != nil {
		tb.Fatal(err)
	}
}

func (n *testNetns) fd() int { return int(n.f.Fd()) }

// eth0 is the namespace's interface.
func (n *testNetns) eth0(tb testing.TB) netlink.Link {
	tb.Helper()
	l, err := n.h.LinkByName("eth0")
	if err != nil {
		tb.Fatal(err)
	}
	return l
}

// dial connects from inside the namespace and returns the stand-in's reply
// line, or the error.
func (n *testNetns) dial(addr string) (string, error) {
	d := net.Dialer{Timeout: 2 * time.Second}
	d.SetMultipathTCP(false)
	var c net.Conn
	if err := inNetns(n.fd(), func() (err error) {
		c, err = d.Dial("tcp", addr)
		return err
	}); err != nil {
		return "", err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	// Send a little first: the reply must survive bytes the stand-in never
	// reads.
	if _, err := c.Write([]byte("hello stand-in\n")); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return line, fmt.Errorf("reading reply: %w", err)
	}
	return line, nil
}

// field extracts the value of key=<value> from a reply line.
func field(line, key string) string {
	for f := range strings.FieldsSeq(line) {
		if v, ok := strings.CutPrefix(f, key+"="); ok {
			return v
		}
	}
	return ""
}
