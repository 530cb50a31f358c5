package standin

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	bpfredirect "github.com/ambient-mesh/ambient/bpf/redirect"
)

func TestStandInServesAddedWorkloadsAndStopsOnDel(t *testing.T) {
	pod := newTestNetns(t)
	agent := newFakeAgent(t, "")
	s := startStandIn(t, agent.path)

	if code, _ := s.getAdmin(t, "/healthz/ready"); code != http.StatusServiceUnavailable {
		t.Errorf("ready before the snapshot: %d", code)
	}
	c := agent.accept(t)
	mustAck(t, "snapshot", c.request(snapshotReq()))
	waitFor(t, "readiness", func() bool {
		code, _ := s.getAdmin(t, "/healthz/ready")
		return code == http.StatusOK
	})

	mustAck(t, "add", c.request(addReq("uid-1", "demo", "app-0"), pod.fd()))
	ws := s.adminWorkloads(t)
	if len(ws) != 1 || ws[0].UID != "uid-1" || ws[0].Workload != "demo/app-0" || ws[0].Redirection != RedirectionNAT || len(ws[0].Listeners) != 3 {
		t.Fatalf("/workloads = %+v", ws)
	}

	for _, tc := range []struct {
		addr string
		port int
	}{
		{"127.0.0.1:15001", 15001},
		{"127.0.0.1:15006", 15006},
		{"127.0.0.1:15008", 15008},
		{"[::1]:15006", 15006},
		{net.JoinHostPort(podIP4, "15008"), 15008},
		{net.JoinHostPort(podIP6, "15001"), 15001},
	} {
		t.Run("a connection to "+tc.addr+" is answered by listener "+strconv.Itoa(tc.port), func(t *testing.T) {
			line, err := pod.dial(tc.addr)
			if err != nil {
				t.Fatalf("dial: %v (%q)", err, line)
			}
			// Not redirected: the original destination is the address dialled.
			want := fmt.Sprintf("standin workload=demo/app-0 listener=%d original=%s peer=", tc.port, netip.MustParseAddrPort(tc.addr))
			if !strings.HasPrefix(line, want) || !strings.HasSuffix(line, "\n") {
				t.Fatalf("reply %q, want prefix %q", line, want)
			}
			if _, err := netip.ParseAddrPort(field(line, "peer")); err != nil {
				t.Errorf("peer in %q: %v", line, err)
			}
		})
	}

	counts := map[int]uint64{}
	for _, l := range s.adminWorkloads(t)[0].Listeners {
		counts[l.Port] = l.Connections
	}
	if want := map[int]uint64{15001: 2, 15006: 2, 15008: 2}; fmt.Sprint(counts) != fmt.Sprint(want) {
		t.Errorf("connections per listener %v, want %v", counts, want)
	}

	// The listeners are marked, transparent where ztunnel's must be, and not
	// MPTCP.
	for _, l := range s.workloadListeners(t, "uid-1") {
		mark, transparent, proto := sockopts(t, l.ln)
		if mark != bpfredirect.Mark || proto != unix.IPPROTO_TCP || transparent != (l.port == bpfredirect.PortOutbound) {
			t.Errorf("listener %d: mark %#x, transparent %v, protocol %d", l.port, mark, transparent, proto)
		}
	}

	mustAck(t, "del", c.request(delReq("uid-1")))
	if ws := s.adminWorkloads(t); len(ws) != 0 {
		t.Errorf("/workloads after del = %+v", ws)
	}
	for _, addr := range []string{"127.0.0.1:15001", "127.0.0.1:15006", "127.0.0.1:15008"} {
		if _, err := pod.dial(addr); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Errorf("dial %s after del: %v, want connection refused", addr, err)
		}
	}
	// Deleting again, or an unknown pod, is fine.
	mustAck(t, "second del", c.request(delReq("uid-1")))
}

func TestStandInReconnectsAndTheSnapshotReconciles(t *testing.T) {
	podA, podB, podC := newTestNetns(t), newTestNetns(t), newTestNetns(t)
	agent := newFakeAgent(t, "")
	s := startStandIn(t, agent.path)

	c := agent.accept(t)
	mustAck(t, "add a", c.request(addReq("uid-a", "demo", "a"), podA.fd()))
	mustAck(t, "add b", c.request(addReq("uid-b", "demo", "b"), podB.fd()))
	mustAck(t, "add c", c.request(addReq("uid-c", "demo", "c"), podC.fd()))
	mustAck(t, "snapshot", c.request(snapshotReq()))
	if _, err := podA.dial("127.0.0.1:15006"); err != nil {
		t.Fatal(err)
	}
	listenerA := s.workloadListeners(t, "uid-a")[0].ln

	// The agent restarts: its socket goes away and comes back.
	c.uc.Close()
	agent.ln.Close()
	waitFor(t, "not ready after the agent left", func() bool { return !s.Ready() })
	agent = newFakeAgent(t, agent.path)
	c = agent.accept(t)
	if s.Ready() {
		t.Error("ready before the new snapshot")
	}
	// Its snapshot has a again (same netns), b kept, and c no longer.
	mustAck(t, "re-add a", c.request(addReq("uid-a", "demo", "a"), podA.fd()))
	mustAck(t, "keep b", c.request(keepReq("uid-b")))
	mustAck(t, "snapshot", c.request(snapshotReq()))
	waitFor(t, "ready", s.Ready)

	ws := s.adminWorkloads(t)
	if len(ws) != 2 || ws[0].UID != "uid-a" || ws[1].UID != "uid-b" {
		t.Fatalf("/workloads = %+v", ws)
	}
	if s.workloadListeners(t, "uid-a")[0].ln != listenerA {
		t.Error("re-adding a workload in the same netns replaced its listeners")
	}
	if ws[0].Listeners[1].Connections != 1 {
		t.Errorf("connections on a's 15006 = %d, want the 1 from before the restart", ws[0].Listeners[1].Connections)
	}
	for _, p := range []*testNetns{podA, podB} {
		if _, err := p.dial("127.0.0.1:15001"); err != nil {
			t.Errorf("kept workload: %v", err)
		}
	}
	if _, err := podC.dial("127.0.0.1:15001"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("workload left out of the snapshot still answers: %v", err)
	}

	// The same uid in another netns (a recreated sandbox) gets new listeners.
	mustAck(t, "a in a new netns", c.request(addReq("uid-a", "demo", "a"), podC.fd()))
	if _, err := podC.dial("127.0.0.1:15001"); err != nil {
		t.Errorf("a in its new netns: %v", err)
	}
	if _, err := podA.dial("127.0.0.1:15001"); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("a's old netns still answers: %v", err)
	}
}

func TestStandInWithTheEBPFEngine(t *testing.T) {
	pod := newTestNetns(t)
	if err := bpfredirect.Supported(); err != nil {
		t.Skipf("eBPF engine unsupported here: %v", err)
	}
	uid := fmt.Sprintf("test-standin-%d", os.Getpid())
	// Attach opens the path; our own descriptor will do.
	nsPath := fmt.Sprintf("/proc/self/fd/%d", pod.fd())
	if err := bpfredirect.Attach(nsPath, uid, []netip.Addr{netip.MustParseAddr(podIP4), netip.MustParseAddr(podIP6)}); err != nil {
		t.Fatalf("attach: %v", err)
	}
	t.Cleanup(func() {
		if err := bpfredirect.Detach(uid); err != nil {
			t.Errorf("detach: %v", err)
		}
	})
	// The part of the engine's routing a connection from the pod needs: a
	// remote range that is delivered to the pod's own stack over lo, as
	// table 133 does, with the pod's address as source.
	lo, err := pod.h.LinkByName("lo")
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range []struct{ dst, src string }{{"10.200.9.0/24", podIP4}, {"fd00:209::/64", podIP6}} {
		pfx := netip.MustParsePrefix(r.dst)
		pod.must(t, pod.h.RouteAdd(&netlink.Route{
			Type: unix.RTN_LOCAL, Scope: netlink.SCOPE_HOST, Table: unix.RT_TABLE_MAIN, LinkIndex: lo.Attrs().Index,
			Dst: &net.IPNet{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen())},
			Src: netip.MustParseAddr(r.src).AsSlice(),
		}))
	}

	agent := newFakeAgent(t, "")
	s := startStandIn(t, agent.path)
	c := agent.accept(t)
	mustAck(t, "snapshot", c.request(snapshotReq()))
	mustAck(t, "add", c.request(addReq(uid, "demo", "app-0"), pod.fd()))

	if ws := s.adminWorkloads(t); len(ws) != 1 || ws[0].Redirection != RedirectionEBPF {
		t.Fatalf("/workloads = %+v", ws)
	}
	st, err := bpfredirect.Status(uid)
	if err != nil {
		t.Fatal(err)
	}
	ls := s.workloadListeners(t, uid)
	if st.Sockets.Outbound != cookie(t, ls[0].ln) || st.Sockets.Inbound != cookie(t, ls[1].ln) {
		t.Errorf("socket map %+v does not hold the stand-in's listeners", st.Sockets)
	}

	for _, tc := range []struct{ dst, src string }{{"10.200.9.9:80", podIP4}, {"[fd00:209::9]:443", podIP6}} {
		t.Run("outbound to "+tc.dst+" lands on 15001 with its original destination", func(t *testing.T) {
			line, err := pod.dial(tc.dst)
			if err != nil {
				t.Fatalf("dial: %v (%q)", err, line)
			}
			want := fmt.Sprintf("standin workload=demo/app-0 listener=15001 original=%s peer=", netip.MustParseAddrPort(tc.dst))
			if !strings.HasPrefix(line, want) {
				t.Fatalf("reply %q, want prefix %q", line, want)
			}
			if peer := netip.MustParseAddrPort(field(line, "peer")); peer.Addr().String() != tc.src {
				t.Errorf("peer %v, want the pod address %s", peer, tc.src)
			}
		})
	}

	// Deleting closes the listeners, which leave the map: fail closed.
	mustAck(t, "del", c.request(delReq(uid)))
	if st, err := bpfredirect.Status(uid); err != nil || st.Sockets.Outbound != 0 || st.Sockets.Inbound != 0 {
		t.Errorf("socket map after del: %+v, %v", st.Sockets, err)
	}
}

func TestStandInWithNATRedirection(t *testing.T) {
	pod := newTestNetns(t)
	nft, err := exec.LookPath("nft")
	if err != nil {
		t.Skip("no nft binary to write the NAT rules with")
	}
	// The nftables engine's outbound rule, reduced to one remote range per
	// family, plus routes that let connections to it leave.
	eth := pod.eth0(t)
	for _, dst := range []string{"10.200.9.0/24", "fd00:209::/64"} {
		pfx := netip.MustParsePrefix(dst)
		pod.must(t, pod.h.RouteAdd(&netlink.Route{LinkIndex: eth.Attrs().Index, Scope: netlink.SCOPE_LINK,
			Dst: &net.IPNet{IP: pfx.Addr().AsSlice(), Mask: net.CIDRMask(pfx.Bits(), pfx.Addr().BitLen())}}))
	}
	rules := `table inet standin_test {
	chain output {
		type nat hook output priority -100;
		ip daddr 10.200.9.0/24 tcp dport 80 redirect to :15001
		ip6 daddr fd00:209::/64 tcp dport 443 redirect to :15001
	}
}
`
	var out []byte
	if err := inNetns(pod.fd(), func() (err error) {
		cmd := exec.Command(nft, "-f", "-")
		cmd.Stdin = strings.NewReader(rules)
		out, err = cmd.CombinedOutput()
		return err
	}); err != nil {
		t.Skipf("nft in the test netns: %v: %s", err, out)
	}

	agent := newFakeAgent(t, "")
	startStandIn(t, agent.path)
	c := agent.accept(t)
	mustAck(t, "snapshot", c.request(snapshotReq()))
	mustAck(t, "add", c.request(addReq("uid-nat", "demo", "app-0"), pod.fd()))

	for _, tc := range []struct{ dst, src string }{{"10.200.9.9:80", podIP4}, {"[fd00:209::9]:443", podIP6}} {
		t.Run("redirected "+tc.dst+" is read back with SO_ORIGINAL_DST", func(t *testing.T) {
			line, err := pod.dial(tc.dst)
			if err != nil {
				t.Fatalf("dial: %v (%q)", err, line)
			}
			want := fmt.Sprintf("standin workload=demo/app-0 listener=15001 original=%s peer=", netip.MustParseAddrPort(tc.dst))
			if !strings.HasPrefix(line, want) {
				t.Fatalf("reply %q, want prefix %q", line, want)
			}
			if peer := netip.MustParseAddrPort(field(line, "peer")); peer.Addr().String() != tc.src {
				t.Errorf("peer %v, want the pod address %s", peer, tc.src)
			}
		})
	}
}

// workloadListeners returns a served workload's listeners, in port order.
func (s *StandIn) workloadListeners(tb testing.TB, uid string) []*listener {
	tb.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	w := s.workloads[uid]
	if w == nil {
		tb.Fatalf("workload %s not served", uid)
	}
	return w.listeners
}

func sockopts(tb testing.TB, c syscall.Conn) (mark int, transparent bool, proto int) {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var errs []error
	rc.Control(func(fd uintptr) {
		var t int
		var err error
		mark, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK)
		errs = append(errs, err)
		t, err = unix.GetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT)
		errs = append(errs, err)
		transparent = t == 1
		proto, err = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL)
		errs = append(errs, err)
	})
	if err := errors.Join(errs...); err != nil {
		tb.Fatal(err)
	}
	return mark, transparent, proto
}

func cookie(tb testing.TB, c syscall.Conn) uint64 {
	tb.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		tb.Fatal(err)
	}
	var v uint64
	var gerr error
	rc.Control(func(fd uintptr) { v, gerr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE) })
	if gerr != nil {
		tb.Fatal(gerr)
	}
	return v
}
