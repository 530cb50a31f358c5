package inpod

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
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

// testLogger sends the manager's log to the test's.
func testLogger(tb testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(testWriter{tb}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ tb testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.tb.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}

// fakeAgent is the node agent's side of ZDS, as small as a test needs: it
// accepts the manager, checks its hello, sends requests and reads acks.
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

// agentConn is one accepted manager connection.
type agentConn struct {
	tb testing.TB
	uc *net.UnixConn
}

// accept waits for the manager and reads its hello.
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
		c.tb.Fatalf("read from manager: %v", err)
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

// mustAck fails unless the ack is a success.
func (c *agentConn) mustAck(what string, req *zdsapi.WorkloadRequest, fds ...int) {
	c.tb.Helper()
	if e := c.request(req, fds...); e != "" {
		c.tb.Fatalf("%s: ack error %q", what, e)
	}
}

func addReq(uid, namespace, name string) *zdsapi.WorkloadRequest {
	return &zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{
		Uid:          uid,
		WorkloadInfo: &zdsapi.WorkloadInfo{Namespace: namespace, Name: name, ServiceAccount: "sa-" + name},
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

// event is one connection a handler received.
type event struct {
	listener string // "outbound", "inbound", "hbone"
	w        *Workload
	orig     netip.AddrPort // invalid for HBONE
	remote   netip.AddrPort
}

// recorder's handlers report every connection, answer it with one line and
// then echo until the client closes, so a test decides how long a
// connection lives.
type recorder struct {
	events chan event
}

func newRecorder() *recorder { return &recorder{events: make(chan event, 64)} }

func (r *recorder) handlers() Handlers {
	serve := func(kind string, w *Workload, c net.Conn, orig netip.AddrPort) {
		r.events <- event{listener: kind, w: w, orig: orig, remote: unmappedAddr(c.RemoteAddr())}
		fmt.Fprintf(c, "%s %s %s\n", kind, w.UID, orig)
		io.Copy(c, c)
	}
	return Handlers{
		Outbound: func(w *Workload, c net.Conn, orig netip.AddrPort) { serve("outbound", w, c, orig) },
		Inbound:  func(w *Workload, c net.Conn, orig netip.AddrPort) { serve("inbound", w, c, orig) },
		HBONE:    func(w *Workload, c net.Conn) { serve("hbone", w, c, netip.AddrPort{}) },
	}
}

func (r *recorder) next(tb testing.TB) event {
	tb.Helper()
	select {
	case e := <-r.events:
		return e
	case <-time.After(10 * time.Second):
		tb.Fatal("no connection reached a handler")
		return event{}
	}
}

// startManager runs a manager against the socket until the test ends, then
// closes and drains it.
func startManager(tb testing.TB, socket string, h Handlers) *Manager {
	tb.Helper()
	m := New(Config{
		ZDSSocket:    socket,
		Handlers:     h,
		Log:          testLogger(tb),
		ReconnectMin: 10 * time.Millisecond,
		ReconnectMax: 50 * time.Millisecond,
	})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()
	tb.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			tb.Errorf("run: %v", err)
		}
		m.Close()
		dctx, dcancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer dcancel()
		if err := m.Drain(dctx); err != nil {
			tb.Errorf("drain: %v", err)
		}
	})
	return m
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

// Addresses used only inside the namespaces the tests create.
var (
	podIP4 = netip.MustParseAddr("10.200.8.2")
	podIP6 = netip.MustParseAddr("fd00:208::2")
)

// testNetns is a throwaway network namespace standing in for a pod's, with
// lo up and an interface holding podIP4 and podIP6. It is reachable only
// through its descriptor and goes away when the test closes it and the last
// socket in it is closed.
type testNetns struct {
	f *os.File
	h *netlink.Handle
}

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
	nh, err := netlink.NewHandleAt(h)
	if err != nil {
		tb.Fatal(err)
	}
	n.h = nh
	tb.Cleanup(nh.Close)

	must := func(err error) {
		tb.Helper()
		if err != nil {
			tb.Fatal(err)
		}
	}
	lo, err := nh.LinkByName("lo")
	must(err)
	must(nh.LinkSetUp(lo))
	// A veth with both ends inside (the kernel may have no dummy driver).
	must(nh.LinkAdd(&netlink.Veth{LinkAttrs: netlink.LinkAttrs{Name: "eth0"}, PeerName: "eth0p"}))
	peer, err := nh.LinkByName("eth0p")
	must(err)
	must(nh.LinkSetUp(peer))
	eth, err := nh.LinkByName("eth0")
	must(err)
	for _, a := range []string{podIP4.String() + "/32", podIP6.String() + "/128"} {
		addr, err := netlink.ParseAddr(a)
		must(err)
		addr.Flags = unix.IFA_F_NODAD
		must(nh.AddrAdd(eth, addr))
	}
	must(nh.LinkSetUp(eth))
	// The kernel adds the addresses' local routes once the veth's carrier
	// is up, which can lag on a loaded machine; a dial before that finds
	// no route (IPv6 then fails only after neighbour discovery gives up).
	deadline := time.Now().Add(10 * time.Second)
	for _, ip := range []netip.Addr{podIP4, podIP6} {
		for {
			rs, err := nh.RouteGet(ip.AsSlice())
			if err == nil && len(rs) > 0 && rs[0].Type == unix.RTN_LOCAL {
				break
			}
			if time.Now().After(deadline) {
				tb.Fatalf("no local route to %v in the test netns: %v %v", ip, rs, err)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	return n
}

func (n *testNetns) fd() int { return int(n.f.Fd()) }

// route adds a route to dst in the namespace's main table: over lo as a
// local route (what the eBPF engine's table 133 does), or on eth0 as an
// on-link range whose neighbours never answer.
func (n *testNetns) route(tb testing.TB, dst string, local bool) {
	tb.Helper()
	pfx := netip.MustParsePrefix(dst)
	r := &netlink.Route{
		Scope: netlink.SCOPE_LINK,
		Dst:   &net.IPNet{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen())},
	}
	dev := "eth0"
	if local {
		dev = "lo"
		r.Type, r.Scope, r.Table = unix.RTN_LOCAL, netlink.SCOPE_HOST, unix.RT_TABLE_MAIN
		r.Src = podIP6.AsSlice()
		if pfx.Addr().Is4() {
			r.Src = podIP4.AsSlice()
		}
	}
	l, err := n.h.LinkByName(dev)
	if err != nil {
		tb.Fatal(err)
	}
	r.LinkIndex = l.Attrs().Index
	if err := n.h.RouteAdd(r); err != nil {
		tb.Fatalf("route %s: %v", dst, err)
	}
}

// dial connects from inside the namespace, as the pod's app would.
func (n *testNetns) dial(addr netip.AddrPort) (net.Conn, error) {
	d := net.Dialer{Timeout: 2 * time.Second}
	d.SetMultipathTCP(false)
	var c net.Conn
	err := inNetns(n.f, func() (err error) {
		c, err = d.Dial("tcp", addr.String())
		return err
	})
	return c, err
}

// listen opens a plain listener inside the namespace, as the pod's app
// would.
func (n *testNetns) listen(tb testing.TB, addr netip.AddrPort) *net.TCPListener {
	tb.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	var l net.Listener
	if err := inNetns(n.f, func() (err error) {
		l, err = lc.Listen(context.Background(), "tcp", addr.String())
		return err
	}); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// exchange reads the handler's line on c, then checks that the connection
// still echoes.
func exchange(tb testing.TB, c net.Conn) string {
	tb.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	br := bufio.NewReader(c)
	line, err := br.ReadString('\n')
	if err != nil {
		tb.Fatalf("reading handler's line: %v", err)
	}
	echo(tb, c, br)
	return strings.TrimSpace(line)
}

func echo(tb testing.TB, c net.Conn, br *bufio.Reader) {
	tb.Helper()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, "ping\n"); err != nil {
		tb.Fatalf("writing: %v", err)
	}
	got, err := br.ReadString('\n')
	if err != nil || got != "ping\n" {
		tb.Fatalf("echo: %q, %v", got, err)
	}
}

// sockopt reads an integer socket option of a listener or connection.
func sockopt(tb testing.TB, sc syscall.Conn, level, opt int) int {
	tb.Helper()
	rc, err := sc.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var v int
	var gerr error
	if err := rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptInt(int(fd), level, opt) }); err != nil || gerr != nil {
		tb.Fatalf("getsockopt %d/%d: %v %v", level, opt, err, gerr)
	}
	return v
}
