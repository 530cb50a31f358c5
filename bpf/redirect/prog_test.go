package redirect

import (
	"net"
	"net/netip"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"

	"github.com/ambient-mesh/ambient/bpf/redirect/sockmap"
)

// skLookupCtx is struct bpf_sk_lookup as BPF_PROG_TEST_RUN takes it.
type skLookupCtx struct {
	Cookie         uint64 // out: the selected socket's cookie, 0 if none
	Family         uint32
	Protocol       uint32
	RemoteIP4      [4]byte
	RemoteIP6      [16]byte
	RemotePort     [2]byte // network byte order
	_              uint16
	LocalIP4       [4]byte
	LocalIP6       [16]byte
	LocalPort      uint32 // host byte order
	IngressIfindex uint32 // must stay 0 in a test run
	_              uint32
}

func lookupCtx(proto int, src, dst netip.AddrPort) skLookupCtx {
	c := skLookupCtx{Protocol: uint32(proto), LocalPort: uint32(dst.Port())}
	c.RemotePort = [2]byte{byte(src.Port() >> 8), byte(src.Port())}
	if dst.Addr().Is4() {
		c.Family = syscall.AF_INET
		c.RemoteIP4 = src.Addr().As4()
		c.LocalIP4 = dst.Addr().As4()
	} else {
		c.Family = syscall.AF_INET6
		c.RemoteIP6 = src.Addr().As16()
		c.LocalIP6 = dst.Addr().As16()
	}
	return c
}

// progs are two instances of the program over the same maps. The kernel
// refuses a non-zero ingress_ifindex in a test run, so "arrived on lo" is
// simulated by the instance whose loopback_ifindex is 0, and "arrived on
// another interface" by the one that keeps 1.
type progs struct {
	onLo, onEth *ebpf.Program
	sockets     *ebpf.Map
	podAddrs    *ebpf.Map
}

func loadTestProgs(tb testing.TB, podIPs ...netip.Addr) *progs {
	tb.Helper()
	var eth redirectObjects
	if err := load(&eth, nil); err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { eth.Close() })
	spec, err := loadRedirect()
	if err != nil {
		tb.Fatal(err)
	}
	if err := spec.Variables[redirectVarLoopbackIfindex].Set(uint32(0)); err != nil {
		tb.Fatal(err)
	}
	var lo redirectObjects
	err = spec.LoadAndAssign(&lo, &ebpf.CollectionOptions{MapReplacements: map[string]*ebpf.Map{
		redirectMapSockets: eth.Sockets, redirectMapPodAddrs: eth.PodAddrs,
	}})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { lo.Close() })
	keys, err := addrKeys(podIPs)
	if err != nil {
		tb.Fatal(err)
	}
	if err := syncAddrs(eth.PodAddrs, keys); err != nil {
		tb.Fatal(err)
	}
	return &progs{onLo: lo.AmbientRedirect, onEth: eth.AmbientRedirect, sockets: eth.Sockets, podAddrs: eth.PodAddrs}
}

func (p *progs) run(tb testing.TB, onLo bool, c skLookupCtx) (verdict uint32, selected uint64) {
	tb.Helper()
	prog := p.onEth
	if onLo {
		prog = p.onLo
	}
	var out skLookupCtx
	ret, err := prog.Run(&ebpf.RunOptions{Context: c, ContextOut: &out})
	if err != nil {
		tb.Fatalf("test run: %v", err)
	}
	return ret, out.Cookie
}

func (p *progs) put(tb testing.TB, slot uint32, c syscall.Conn) {
	tb.Helper()
	if err := sockmap.Put(p.sockets.FD(), slot, c); err != nil {
		tb.Fatalf("slot %d: %v", slot, err)
	}
}

const (
	skDrop = 0
	skPass = 1
)

func TestProgram(t *testing.T) {
	requireRoot(t)
	// The sockets only need to exist (BPF_PROG_TEST_RUN delivers nothing), but
	// they live in a throwaway netns so wildcard binds touch nothing real.
	ns := newNS(t, "amb-prog-")
	outbound := listenIn(t, ns, "tcp", ":0", tcpOnly()).(*net.TCPListener) // dual-stack
	inbound := listenIn(t, ns, "tcp", ":0", tcpOnly()).(*net.TCPListener)  // dual-stack
	only4 := listenIn(t, ns, "tcp4", ":0", tcpOnly()).(*net.TCPListener)   // IPv4 only
	var dns *net.UDPConn
	if err := ns.Do(func() (err error) { dns, err = net.ListenUDP("udp", &net.UDPAddr{}); return err }); err != nil {
		t.Fatal(err)
	}
	defer dns.Close()

	pod4 := netip.MustParseAddr("10.200.0.2")
	pod6 := netip.MustParseAddr("fd00:200::2")
	p := loadTestProgs(t, pod4, pod6)
	p.put(t, SlotOutbound, outbound)
	p.put(t, SlotInbound, inbound)
	cOut, cIn, cDNS := cookie(t, outbound), cookie(t, inbound), cookie(t, dns)

	ap := netip.MustParseAddrPort
	tcp, udp := syscall.IPPROTO_TCP, syscall.IPPROTO_UDP
	cases := []struct {
		name     string
		onLo     bool
		proto    int
		src, dst netip.AddrPort
		verdict  uint32
		want     uint64 // cookie; 0 = untouched
	}{
		{"outbound v4 to a non-local address -> 15001", true, tcp, ap("10.200.0.2:40000"), ap("10.96.0.10:80"), skPass, cOut},
		{"outbound v6 to a non-local address -> 15001", true, tcp, ap("[fd00:200::2]:40000"), ap("[fd00:96::10]:443"), skPass, cOut},
		{"outbound to the HBONE port is captured too", true, tcp, ap("10.200.0.2:40000"), ap("10.200.0.9:15008"), skPass, cOut},
		{"to the pod's own v4 address untouched", true, tcp, ap("10.200.0.2:40000"), ap("10.200.0.2:8080"), skPass, 0},
		{"to the pod's own v6 address untouched", true, tcp, ap("[fd00:200::2]:40000"), ap("[fd00:200::2]:8080"), skPass, 0},
		{"to 127.0.0.1 untouched", true, tcp, ap("127.0.0.1:40000"), ap("127.0.0.1:8080"), skPass, 0},
		{"to 127.1.2.3 untouched", true, tcp, ap("127.0.0.1:40000"), ap("127.1.2.3:8080"), skPass, 0},
		{"to ::1 untouched", true, tcp, ap("[::1]:40000"), ap("[::1]:8080"), skPass, 0},
		{"to IPv6 link-local untouched", true, tcp, ap("[fe80::1]:40000"), ap("[fe80::2]:8080"), skPass, 0},
		{"inbound v4 -> 15006", false, tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:8080"), skPass, cIn},
		{"inbound v6 -> 15006", false, tcp, ap("[fd00:200::1]:40000"), ap("[fd00:200::2]:8080"), skPass, cIn},
		{"the pod to its own v4 address (reported on eth0) untouched", false, tcp, ap("10.200.0.2:40000"), ap("10.200.0.2:8080"), skPass, 0},
		{"the pod to its own v6 address (reported on eth0) untouched", false, tcp, ap("[fd00:200::2]:40000"), ap("[fd00:200::2]:8080"), skPass, 0},
		{"inbound to 15008 untouched", false, tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:15008"), skPass, 0},
		{"inbound to 15001 untouched", false, tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:15001"), skPass, 0},
		{"inbound to 15006 untouched", false, tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:15006"), skPass, 0},
		{"inbound to 15053 untouched", false, tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:15053"), skPass, 0},
		{"inbound from the probe source untouched", false, tcp, ap("169.254.7.127:40000"), ap("10.200.0.2:8080"), skPass, 0},
		{"UDP/53 with an empty DNS slot untouched", true, udp, ap("10.200.0.2:40000"), ap("10.96.0.10:53"), skPass, 0},
		{"UDP to another port untouched", true, udp, ap("10.200.0.2:40000"), ap("10.96.0.10:123"), skPass, 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			v, got := p.run(t, tc.onLo, lookupCtx(tc.proto, tc.src, tc.dst))
			if v != tc.verdict || got != tc.want {
				t.Fatalf("verdict %d socket %d, want verdict %d socket %d", v, got, tc.verdict, tc.want)
			}
		})
	}

	t.Run("DNS slot filled", func(t *testing.T) {
		p.put(t, SlotDNS, dns)
		for _, tc := range []struct {
			onLo bool
			dst  string
			want uint64
		}{
			{true, "10.96.0.10:53", cDNS}, // the pod's query -> 15053
			{true, "127.0.0.53:53", 0},    // a resolver inside the pod
			{false, "10.200.0.2:53", 0},   // the pod serving DNS itself
		} {
			v, got := p.run(t, tc.onLo, lookupCtx(udp, ap("10.200.0.2:40000"), ap(tc.dst)))
			if v != skPass || got != tc.want {
				t.Errorf("%s (lo %v): verdict %d socket %d, want pass socket %d", tc.dst, tc.onLo, v, got, tc.want)
			}
		}
	})

	t.Run("IPv4-only socket cannot take IPv6: dropped, not passed", func(t *testing.T) {
		p.put(t, SlotOutbound, only4)
		defer p.put(t, SlotOutbound, outbound)
		v, got := p.run(t, true, lookupCtx(tcp, ap("[fd00:200::2]:40000"), ap("[fd00:96::10]:443")))
		if v != skDrop || got != 0 {
			t.Fatalf("verdict %d socket %d, want drop", v, got)
		}
		v, got = p.run(t, true, lookupCtx(tcp, ap("10.200.0.2:40000"), ap("10.96.0.10:80")))
		if v != skPass || got != cookie(t, only4) {
			t.Fatalf("IPv4: verdict %d socket %d, want the IPv4 socket", v, got)
		}
	})

	t.Run("empty slots fail closed", func(t *testing.T) {
		for _, slot := range []uint32{SlotOutbound, SlotInbound} {
			if err := p.sockets.Delete(slot); err != nil {
				t.Fatal(err)
			}
		}
		if v, got := p.run(t, true, lookupCtx(tcp, ap("10.200.0.2:40000"), ap("10.96.0.10:80"))); v != skDrop || got != 0 {
			t.Errorf("outbound: verdict %d socket %d, want drop", v, got)
		}
		if v, got := p.run(t, false, lookupCtx(tcp, ap("10.200.0.1:40000"), ap("10.200.0.2:8080"))); v != skDrop || got != 0 {
			t.Errorf("inbound: verdict %d socket %d, want drop", v, got)
		}
		// What is not redirected does not care.
		if v, got := p.run(t, true, lookupCtx(tcp, ap("127.0.0.1:40000"), ap("127.0.0.1:8080"))); v != skPass || got != 0 {
			t.Errorf("loopback: verdict %d socket %d, want pass", v, got)
		}
	})

	t.Run("MPTCP listener refused with a hint", func(t *testing.T) {
		l := listenIn(t, ns, "tcp", ":0", net.ListenConfig{}).(*net.TCPListener) // Go's default: MPTCP
		if err := sockmap.Put(p.sockets.FD(), SlotInbound, l); err == nil || !strings.Contains(err.Error(), "MPTCP") {
			t.Fatalf("got %v, want an MPTCP error", err)
		}
	})

	t.Run("closed socket leaves its slot", func(t *testing.T) {
		l := listenIn(t, ns, "tcp", ":0", tcpOnly()).(*net.TCPListener)
		p.put(t, SlotInbound, l)
		l.Close()
		var c uint64
		if err := p.sockets.Lookup(uint32(SlotInbound), &c); err == nil {
			t.Fatalf("slot still holds socket %d after close", c)
		}
	})
}

// BenchmarkProgram is the program's own cost per lookup (BPF_PROG_TEST_RUN
// with Repeat = b.N, one syscall): a redirected outbound lookup (pod_addrs
// miss, SOCKMAP hit, assign) and an untouched loopback one.
func BenchmarkProgram(b *testing.B) {
	requireRoot(b)
	ns := newNS(b, "amb-progbench-")
	l := listenIn(b, ns, "tcp", ":0", tcpOnly()).(*net.TCPListener)
	p := loadTestProgs(b, netip.MustParseAddr("10.200.0.2"))
	p.put(b, SlotOutbound, l)
	ap := netip.MustParseAddrPort
	for _, bc := range []struct {
		name string
		ctx  skLookupCtx
	}{
		{"redirected", lookupCtx(syscall.IPPROTO_TCP, ap("10.200.0.2:40000"), ap("10.96.0.10:80"))},
		{"loopback-untouched", lookupCtx(syscall.IPPROTO_TCP, ap("127.0.0.1:40000"), ap("127.0.0.1:8080"))},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var out skLookupCtx
			b.ResetTimer()
			if _, err := p.onLo.Run(&ebpf.RunOptions{Context: bc.ctx, ContextOut: &out, Repeat: uint32(b.N)}); err != nil {
				b.Fatal(err)
			}
		})
	}
}
