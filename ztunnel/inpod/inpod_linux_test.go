package inpod

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
)

// podListeners returns the listeners the manager serves for uid.
func (m *Manager) podListeners(tb testing.TB, uid string) []*listener {
	tb.Helper()
	m.mu.Lock()
	defer m.mu.Unlock()
	p := m.pods[uid]
	if p == nil {
		tb.Fatalf("workload %s not served", uid)
	}
	return p.listeners
}

func (m *Manager) pod(uid string) *pod {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.pods[uid]
}

func TestManagerServesAddedWorkloadsAndStopsOnDel(t *testing.T) {
	n := newTestNetns(t)
	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())
	ac := agent.accept(t)
	if m.Ready() {
		t.Fatal("ready before the snapshot")
	}
	ac.mustAck("snapshot", snapshotReq())
	waitFor(t, "ready", m.Ready)
	ac.mustAck("add", addReq("uid-a", "ns-a", "pod-a"), n.fd())

	ls := m.podListeners(t, "uid-a")
	for _, l := range ls {
		if got := sockopt(t, l.ln, unix.SOL_SOCKET, unix.SO_MARK); got != bpfredirect.Mark {
			t.Errorf("%d: SO_MARK %#x, want %#x", l.port, got, bpfredirect.Mark)
		}
		if got := sockopt(t, l.ln, unix.SOL_SOCKET, unix.SO_REUSEPORT); got != 1 {
			t.Errorf("%d: SO_REUSEPORT %d", l.port, got)
		}
		if got := sockopt(t, l.ln, unix.SOL_SOCKET, unix.SO_PROTOCOL); got != unix.IPPROTO_TCP {
			t.Errorf("%d: protocol %d, want TCP (not MPTCP)", l.port, got)
		}
		wantTransparent := 0
		if l.port == bpfredirect.PortOutbound {
			wantTransparent = 1
		}
		if got := sockopt(t, l.ln, unix.SOL_IP, unix.IP_TRANSPARENT); got != wantTransparent {
			t.Errorf("%d: IP_TRANSPARENT %d, want %d", l.port, got, wantTransparent)
		}
	}

	tests := []struct {
		name     string
		dst      netip.AddrPort
		listener string
	}{
		{"outbound over IPv4 lands on 15001 with the local address as destination", netip.AddrPortFrom(podIP4, 15001), "outbound"},
		{"outbound over IPv6 lands on 15001 with the local address as destination", netip.AddrPortFrom(podIP6, 15001), "outbound"},
		{"inbound plaintext over IPv4 lands on 15006", netip.AddrPortFrom(podIP4, 15006), "inbound"},
		{"inbound plaintext over IPv6 lands on 15006", netip.AddrPortFrom(podIP6, 15006), "inbound"},
		{"HBONE over IPv4 lands on 15008", netip.AddrPortFrom(podIP4, 15008), "hbone"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c, err := n.dial(tc.dst)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			exchange(t, c)
			e := rec.next(t)
			if e.listener != tc.listener {
				t.Errorf("landed on %s, want %s", e.listener, tc.listener)
			}
			w := e.w
			if w.UID != "uid-a" || w.Namespace != "ns-a" || w.Name != "pod-a" || w.ServiceAccount != "sa-pod-a" || w.NetNS == nil {
				t.Errorf("workload %+v", w)
			}
			wantOrig := tc.dst
			if tc.listener == "hbone" {
				wantOrig = netip.AddrPort{}
			}
			if e.orig != wantOrig {
				t.Errorf("original destination %v, want %v", e.orig, wantOrig)
			}
			if e.remote.Addr() != tc.dst.Addr() {
				t.Errorf("peer %v, want the pod's own address %v", e.remote, tc.dst.Addr())
			}
		})
	}

	ws := m.Workloads()
	if len(ws) != 1 || ws[0].UID != "uid-a" || ws[0].Workload != "ns-a/pod-a" || ws[0].Redirection != RedirectionNAT || len(ws[0].Listeners) != 3 {
		t.Fatalf("Workloads() = %+v", ws)
	}
	for i, want := range []uint64{2, 2, 1} {
		if got := ws[0].Listeners[i].Accepted; got != want {
			t.Errorf("listener %d accepted %d, want %d", ws[0].Listeners[i].Port, got, want)
		}
	}

	// A connection that outlives the pod's listeners.
	held, err := n.dial(netip.AddrPortFrom(podIP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	br := bufio.NewReader(held)
	held.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	w := rec.next(t).w
	app := n.listen(t, netip.AddrPortFrom(podIP4, 8080))
	p := m.pod("uid-a")

	ac.mustAck("del", delReq("uid-a"))
	if ws := m.Workloads(); len(ws) != 0 {
		t.Errorf("Workloads() after del = %+v", ws)
	}
	for _, port := range []uint16{15001, 15006, 15008} {
		if c, err := n.dial(netip.AddrPortFrom(podIP4, port)); !errors.Is(err, syscall.ECONNREFUSED) {
			if c != nil {
				c.Close()
			}
			t.Errorf("dial %d after del: %v, want connection refused", port, err)
		}
	}
	echo(t, held, br)

	// The connection still holds the netns, so the handler can reach the
	// app.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := m.Dial(ctx, w, "tcp", netip.AddrPortFrom(podIP4, 8080).String())
	if err != nil {
		t.Fatalf("dial the app after del with a connection open: %v", err)
	}
	c.Close()
	if a, err := app.Accept(); err == nil {
		a.Close()
	}

	held.Close()
	waitFor(t, "the last connection to end", func() bool { return p.active.Load() == 0 })
	waitFor(t, "the netns to be released", func() bool {
		p.refMu.Lock()
		defer p.refMu.Unlock()
		return p.refs < 0
	})
	if _, err := m.Dial(ctx, w, "tcp", netip.AddrPortFrom(podIP4, 8080).String()); !errors.Is(err, ErrWorkloadGone) {
		t.Errorf("dial from a deleted workload without connections: %v, want ErrWorkloadGone", err)
	}
	ac.mustAck("del of an unknown workload", delReq("uid-a"))
}

func TestDialReachesListenersInsideThePod(t *testing.T) {
	n := newTestNetns(t)
	n.route(t, "10.200.9.0/24", false)
	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())
	ac := agent.accept(t)
	ac.mustAck("add", addReq("uid-d", "ns-d", "pod-d"), n.fd())
	app4 := n.listen(t, netip.AddrPortFrom(podIP4, 8080))
	app6 := n.listen(t, netip.AddrPortFrom(podIP6, 8080))
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	// The handler's view of the workload: what a proxy would dial from.
	c, err := n.dial(netip.AddrPortFrom(podIP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	exchange(t, c)
	c.Close()
	w := rec.next(t).w

	for _, tc := range []struct {
		name    string
		network string
		app     *net.TCPListener
		dst     netip.AddrPort
	}{
		{"the app on the pod's IPv4 address", "tcp", app4, netip.AddrPortFrom(podIP4, 8080)},
		{"the app on the pod's IPv6 address", "tcp6", app6, netip.AddrPortFrom(podIP6, 8080)},
	} {
		t.Run("dial reaches "+tc.name+" with a marked socket", func(t *testing.T) {
			c, err := m.Dial(ctx, w, tc.network, tc.dst.String())
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			tc.app.SetDeadline(time.Now().Add(5 * time.Second))
			a, err := tc.app.Accept()
			if err != nil {
				t.Fatal(err)
			}
			defer a.Close()
			if got := unmappedAddr(a.RemoteAddr()); got != unmappedAddr(c.LocalAddr()) || got.Addr() != tc.dst.Addr() {
				t.Errorf("app sees %v, dialer is %v; want the pod's own address", got, c.LocalAddr())
			}
			if got := sockopt(t, c.(*net.TCPConn), unix.SOL_SOCKET, unix.SO_MARK); got != bpfredirect.Mark {
				t.Errorf("SO_MARK %#x", got)
			}
			if _, err := a.Write([]byte("x")); err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 1)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			if _, err := c.Read(buf); err != nil {
				t.Fatal(err)
			}
		})
	}

	t.Run("dial reaches ztunnel's own HBONE listener in the pod", func(t *testing.T) {
		c, err := m.Dial(ctx, w, "tcp", netip.AddrPortFrom(podIP6, 15008).String())
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		if line := exchange(t, c); !strings.HasPrefix(line, "hbone uid-d") {
			t.Errorf("line %q", line)
		}
		if e := rec.next(t); e.w.UID != "uid-d" {
			t.Errorf("handler saw %+v", e.w)
		}
	})

	errTests := []struct {
		name    string
		network string
		addr    string
		want    error // nil: any error
		timeout time.Duration
	}{
		{"a closed port is refused", "tcp", netip.AddrPortFrom(podIP4, 9).String(), syscall.ECONNREFUSED, 0},
		{"a peer that never answers times out with the context", "tcp", "10.200.9.9:80", context.DeadlineExceeded, 200 * time.Millisecond},
		{"an address with no route fails at once", "tcp", "192.0.2.1:80", syscall.ENETUNREACH, 0},
		{"a hostname is refused", "tcp", "app.example:80", nil, 0},
		{"an IPv6 address over tcp4 is refused", "tcp4", netip.AddrPortFrom(podIP6, 8080).String(), nil, 0},
		{"udp is refused", "udp", netip.AddrPortFrom(podIP4, 8080).String(), nil, 0},
	}
	for _, tc := range errTests {
		t.Run(tc.name, func(t *testing.T) {
			ctx := ctx
			if tc.timeout > 0 {
				var cancel context.CancelFunc
				ctx, cancel = context.WithTimeout(ctx, tc.timeout)
				defer cancel()
			}
			c, err := m.Dial(ctx, w, tc.network, tc.addr)
			if err == nil {
				c.Close()
				t.Fatal("dial succeeded")
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("error %v, want %v", err, tc.want)
			}
		})
	}
}

func TestManagerReconnectsAndTheSnapshotReconciles(t *testing.T) {
	n1, n2, n3 := newTestNetns(t), newTestNetns(t), newTestNetns(t)
	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())

	ac := agent.accept(t)
	ac.mustAck("add a", addReq("uid-a", "ns", "a"), n1.fd())
	ac.mustAck("add b", addReq("uid-b", "ns", "b"), n2.fd())
	ac.mustAck("snapshot", snapshotReq())
	waitFor(t, "ready", m.Ready)
	a := m.pod("uid-a")

	// The agent restarts: pods stay served, readiness waits for the next
	// snapshot.
	ac.uc.Close()
	waitFor(t, "not ready", func() bool { return !m.Ready() })
	if len(m.Workloads()) != 2 {
		t.Fatalf("pods dropped on disconnect: %+v", m.Workloads())
	}
	ac = agent.accept(t)
	ac.mustAck("re-add a in the same netns", addReq("uid-a", "ns", "a"), n1.fd())
	if m.pod("uid-a") != a {
		t.Error("re-adding in the same netns replaced the listeners")
	}
	ac.mustAck("snapshot", snapshotReq())
	waitFor(t, "ready", m.Ready)
	if ws := m.Workloads(); len(ws) != 1 || ws[0].UID != "uid-a" {
		t.Fatalf("after the snapshot: %+v", ws)
	}
	if c, err := n2.dial(netip.AddrPortFrom(podIP4, 15001)); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("pod left out of the snapshot still served: %v", err)
	}
	if c, err := n1.dial(netip.AddrPortFrom(podIP4, 15001)); err != nil {
		t.Errorf("kept pod not served: %v", err)
	} else {
		exchange(t, c)
		c.Close()
		rec.next(t)
	}

	// A recreated sandbox: the same uid in another netns moves.
	ac.mustAck("add a in a new netns", addReq("uid-a", "ns", "a"), n3.fd())
	if c, err := n1.dial(netip.AddrPortFrom(podIP4, 15001)); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("old netns still served: %v", err)
	}
	if c, err := n3.dial(netip.AddrPortFrom(podIP4, 15006)); err != nil {
		t.Errorf("new netns not served: %v", err)
	} else {
		exchange(t, c)
		c.Close()
		if e := rec.next(t); e.w.UID != "uid-a" || e.listener != "inbound" {
			t.Errorf("event %+v", e)
		}
	}

	// Another restart where the agent cannot reopen the netns: keep.
	ac.uc.Close()
	ac = agent.accept(t)
	ac.mustAck("keep a", keepReq("uid-a"))
	ac.mustAck("snapshot", snapshotReq())
	waitFor(t, "ready", m.Ready)
	if ws := m.Workloads(); len(ws) != 1 {
		t.Errorf("kept pod dropped: %+v", ws)
	}
	if st := m.ZDS(); st.Connects != 3 || !st.Connected || !st.SnapshotReceived {
		t.Errorf("ZDS() = %+v", st)
	}
}

func TestAddFailsClosedWhenAPortIsTaken(t *testing.T) {
	n := newTestNetns(t)
	agent := newFakeAgent(t, "")
	m := startManager(t, agent.path, newRecorder().handlers())
	ac := agent.accept(t)
	// Someone else holds 15006 without SO_REUSEPORT.
	taken := n.listen(t, netip.MustParseAddrPort("[::]:15006"))
	e := ac.request(addReq("uid-x", "ns", "x"), n.fd())
	if !strings.Contains(e, "15006") {
		t.Fatalf("ack %q, want an error naming 15006", e)
	}
	if len(m.Workloads()) != 0 {
		t.Errorf("a failed add is served: %+v", m.Workloads())
	}
	// Nothing is left bound: 15001 can be taken without SO_REUSEPORT.
	n.listen(t, netip.MustParseAddrPort("[::]:15001")).Close()
	taken.Close()
	ac.mustAck("add once the port is free", addReq("uid-x", "ns", "x"), n.fd())
}

func TestDrainHandsPortsToANewZtunnelAndWaitsForConnections(t *testing.T) {
	n := newTestNetns(t)
	agent1, agent2 := newFakeAgent(t, ""), newFakeAgent(t, "")
	rec1, rec2 := newRecorder(), newRecorder()
	m1 := startManager(t, agent1.path, rec1.handlers())
	startManager(t, agent2.path, rec2.handlers())
	ac1, ac2 := agent1.accept(t), agent2.accept(t)
	ac1.mustAck("snapshot", snapshotReq())
	ac1.mustAck("add to the old ztunnel", addReq("uid-a", "ns", "a"), n.fd())
	waitFor(t, "ready", m1.Ready)

	held, err := n.dial(netip.AddrPortFrom(podIP4, 15008))
	if err != nil {
		t.Fatal(err)
	}
	defer held.Close()
	br := bufio.NewReader(held)
	held.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := br.ReadString('\n'); err != nil {
		t.Fatal(err)
	}
	rec1.next(t)

	// SO_REUSEPORT: the new ztunnel binds the same ports in the same pod.
	ac2.mustAck("add to the new ztunnel", addReq("uid-a", "ns", "a"), n.fd())
	// Connections queued on the old listeners move to the new ones when
	// the old close, instead of being reset.
	var migrate []byte
	if err := inNetns(n.f, func() (err error) {
		migrate, err = os.ReadFile("/proc/sys/net/ipv4/tcp_migrate_req")
		return err
	}); err == nil && strings.TrimSpace(string(migrate)) != "1" {
		t.Errorf("net.ipv4.tcp_migrate_req in the pod = %q, want 1", migrate)
	}

	ctx, cancel := context.WithTimeout(context.Background(), 100*time.Millisecond)
	defer cancel()
	if err := m1.Drain(ctx); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("drain with a connection open: %v, want the context's deadline", err)
	}
	if m1.Ready() {
		t.Error("ready while draining")
	}
	if e := ac1.request(addReq("uid-b", "ns", "b"), n.fd()); !strings.Contains(e, ErrDraining.Error()) {
		t.Errorf("add while draining acked %q", e)
	}
	for range 3 {
		c, err := n.dial(netip.AddrPortFrom(podIP4, 15001))
		if err != nil {
			t.Fatalf("dial after the old ztunnel stopped accepting: %v", err)
		}
		exchange(t, c)
		c.Close()
		rec2.next(t)
	}
	echo(t, held, br)
	held.Close()
	ctx, cancel = context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := m1.Drain(ctx); err != nil {
		t.Fatalf("drain once the connection ended: %v", err)
	}
	select {
	case e := <-rec1.events:
		t.Errorf("the draining ztunnel accepted %+v", e)
	default:
	}
}

func TestManagerWithTheEBPFEngine(t *testing.T) {
	n := newTestNetns(t)
	if err := bpfredirect.Supported(); err != nil {
		t.Skipf("eBPF engine unsupported here: %v", err)
	}
	uid := fmt.Sprintf("test-inpod-%d", os.Getpid())
	if err := bpfredirect.Attach(fmt.Sprintf("/proc/self/fd/%d", n.fd()), uid, []netip.Addr{podIP4, podIP6}); err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Cleanup(func() {
		if err := bpfredirect.Detach(uid); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	// The part of the engine's routing an outbound connection needs: a
	// remote range delivered to the pod's own stack over lo.
	n.route(t, "10.200.9.0/24", true)
	n.route(t, "fd00:209::/64", true)

	agent := newFakeAgent(t, "")
	rec := newRecorder()
	m := startManager(t, agent.path, rec.handlers())
	ac := agent.accept(t)
	ac.mustAck("add", addReq(uid, "ns", "app"), n.fd())
	if ws := m.Workloads(); len(ws) != 1 || ws[0].Redirection != RedirectionEBPF {
		t.Fatalf("Workloads() = %+v", ws)
	}
	for _, dst := range []netip.AddrPort{netip.MustParseAddrPort("10.200.9.9:80"), netip.MustParseAddrPort("[fd00:209::9]:443")} {
		t.Run("outbound to "+dst.String()+" lands on 15001 with its original destination", func(t *testing.T) {
			c, err := n.dial(dst)
			if err != nil {
				t.Fatalf("dial: %v", err)
			}
			defer c.Close()
			exchange(t, c)
			if e := rec.next(t); e.listener != "outbound" || e.orig != dst || e.w.UID != uid {
				t.Errorf("event %+v, want outbound to %v", e, dst)
			}
		})
	}
	ac.mustAck("del", delReq(uid))
	if st, err := bpfredirect.Status(uid); err != nil || st.Sockets.Outbound != 0 || st.Sockets.Inbound != 0 {
		t.Errorf("socket map after del: %+v, %v", st.Sockets, err)
	}
}

func TestManagerReportsProtocolErrorsAndCarriesOn(t *testing.T) {
	agent := newFakeAgent(t, "")
	m := startManager(t, agent.path, Handlers{})
	ac := agent.accept(t)
	devNull, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer devNull.Close()
	null := int(devNull.Fd())
	marshal := func(req *zdsapi.WorkloadRequest) []byte {
		b, err := proto.Marshal(req)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}

	tests := []struct {
		name string
		msg  []byte
		fds  []int
		want string // substring of the ack's error; empty: success
	}{
		{"garbage is a protocol violation", []byte{0xff, 0xff, 0xff, 0xff}, nil, ErrProtocol.Error()},
		{"a request with only an unknown field is a protocol violation", []byte{0x98, 0x06, 0x01}, nil, "no known payload"},
		{"an add without a netns is a protocol violation", marshal(addReq("u", "ns", "n")), nil, "carries 0 descriptors"},
		{"an add with two descriptors is a protocol violation", marshal(addReq("u", "ns", "n")), []int{null, null}, "carries 2 descriptors"},
		{"a del with a descriptor is a protocol violation", marshal(delReq("u")), []int{null}, "carries 1 descriptors"},
		{"an add without uid is a protocol violation", marshal(addReq("", "ns", "n")), []int{null}, "add without uid"},
		{"an add whose descriptor is not a netns fails", marshal(addReq("u", "ns", "n")), []int{null}, "not a namespace"},
		{"a keep of an unknown workload fails", marshal(keepReq("u")), nil, "unknown workload"},
		{"a del of an unknown workload succeeds", marshal(delReq("u")), nil, ""},
		{"the first snapshot succeeds", marshal(snapshotReq()), nil, ""},
		{"a second snapshot is a protocol violation", marshal(snapshotReq()), nil, "second snapshot_sent"},
		{"a keep after the snapshot is a protocol violation", marshal(keepReq("u")), nil, "after snapshot_sent"},
		{"an oversized message is a protocol violation", make([]byte, maxMessageSize+10), nil, "longer than"},
	}
	fdsBefore := openFDs(t)
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ac.sendRaw(tc.msg, tc.fds...)
			got := ac.ack()
			if tc.want == "" && got != "" || !strings.Contains(got, tc.want) {
				t.Errorf("ack %q, want %q", got, tc.want)
			}
		})
	}
	if after := openFDs(t); after != fdsBefore {
		t.Errorf("%d descriptors open after the rejected requests, %d before: received ones leak", after, fdsBefore)
	}
	if st := m.ZDS(); st.ProtocolErrors != 9 || !m.Ready() {
		t.Errorf("ZDS() = %+v, ready %v", st, m.Ready())
	}
}

func TestManagerWaitsForTheAgent(t *testing.T) {
	path := t.TempDir() + "/ztunnel.sock"
	m := startManager(t, path, Handlers{})
	time.Sleep(50 * time.Millisecond) // a few failed attempts
	agent := newFakeAgent(t, path)
	ac := agent.accept(t)
	ac.mustAck("snapshot", snapshotReq())
	waitFor(t, "ready", m.Ready)
}

func TestCloseEndsRun(t *testing.T) {
	agent := newFakeAgent(t, "")
	m := New(Config{ZDSSocket: agent.path, Log: testLogger(t)})
	done := make(chan error, 1)
	go func() { done <- m.Run(context.Background()) }()
	agent.accept(t)
	m.Close()
	m.Close()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("run: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("Run did not return after Close")
	}
}

func openFDs(tb testing.TB) int {
	tb.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		tb.Fatal(err)
	}
	return len(es)
}
