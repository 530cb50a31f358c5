package redirect

import (
	"errors"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/google/nftables"
	"github.com/vishvananda/netlink"
)

func TestChoose(t *testing.T) {
	tests := []struct {
		preference string
		want       string // engine name; "" for an error
	}{
		{"nftables", EngineNFTables},
		{"iptables", ""},
		{"EBPF", ""},
	}
	for _, tt := range tests {
		e, err := Choose(tt.preference)
		switch {
		case tt.want == "" && err == nil:
			t.Errorf("Choose(%q) = %s, want an error", tt.preference, e.Name())
		case tt.want != "" && (err != nil || e.Name() != tt.want):
			t.Errorf("Choose(%q) = %v, %v; want %s", tt.preference, e, err, tt.want)
		}
	}
	auto, err := Choose("auto")
	if err != nil {
		t.Fatalf("Choose(auto): %v", err)
	}
	if want := map[bool]string{true: EngineEBPF, false: EngineNFTables}[ebpfSupported() == nil]; auto.Name() != want {
		t.Errorf("Choose(auto) = %s, want %s (ebpf supported: %v)", auto.Name(), want, ebpfSupported())
	}
	if _, err := Choose("ebpf"); (err == nil) != (ebpfSupported() == nil) || (err != nil && !errors.Is(err, ErrUnsupported)) {
		t.Errorf("Choose(ebpf) = %v with support %v", err, ebpfSupported())
	}
}

// fakeLoader stands in for bpf/redirect where the test is about the adapter.
type fakeLoader struct {
	attachErr error
	attached  map[string]bool
}

func (f *fakeLoader) Attach(_, uid string, _ []netip.Addr) error {
	if f.attachErr != nil {
		return f.attachErr
	}
	f.attached[uid] = true
	return nil
}
func (f *fakeLoader) Detach(uid string) error { delete(f.attached, uid); return nil }
func (f *fakeLoader) Status(uid string) (any, error) {
	return map[string]bool{"attached": f.attached[uid]}, nil
}

func routingIn(t *testing.T, netnsPath string) (rules, routes []string) {
	t.Helper()
	err := Do(netnsPath, func(ns.NetNS) error {
		h, err := netlink.NewHandle()
		if err != nil {
			return err
		}
		defer h.Close()
		rs, rts, err := listRouting(h)
		for _, r := range rs {
			rules = append(rules, formatRule(r))
		}
		for _, r := range rts {
			routes = append(routes, formatRoute(h, r))
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	return rules, routes
}

func TestEBPFAdapterInKernel(t *testing.T) {
	requireRoot(t)
	pod := Pod{UID: "uid-1", Namespace: "test", Name: "pod", IPs: []netip.Addr{pod4, pod6}}

	t.Run("a failed attach leaves no routing behind", func(t *testing.T) {
		tn := newTestNet(t)
		eng := &EBPF{loader: &fakeLoader{attachErr: errors.New("no sk_lookup here"), attached: map[string]bool{}}}
		err := eng.Install(tn.pod, pod)
		if err == nil || !strings.Contains(err.Error(), "no sk_lookup here") {
			t.Fatalf("install = %v, want the attach error", err)
		}
		if rules, routes := routingIn(t, tn.pod); len(rules)+len(routes) > 0 {
			t.Errorf("left behind: rules %q, routes %q", rules, routes)
		}
	})

	t.Run("turning DNS capture off drops its rules, remove detaches even with the netns gone", func(t *testing.T) {
		tn := newTestNet(t)
		loader := &fakeLoader{attached: map[string]bool{}}
		if err := (&EBPF{CaptureDNS: true, loader: loader}).Install(tn.pod, pod); err != nil {
			t.Fatal(err)
		}
		rules, _ := routingIn(t, tn.pod)
		if !slices.ContainsFunc(rules, func(r string) bool { return strings.Contains(r, "dport 53") }) {
			t.Fatalf("no DNS rule with CaptureDNS: %q", rules)
		}
		eng := &EBPF{loader: loader}
		if err := eng.Install(tn.pod, pod); err != nil {
			t.Fatal(err)
		}
		rules, routes := routingIn(t, tn.pod)
		want := ebpfRouting(false, 1, pod.IPs)
		if len(rules) != len(want.rules) || len(routes) != len(want.routes) {
			t.Errorf("after turning DNS off: rules %q, routes %q; want %d rules, %d routes", rules, routes, len(want.rules), len(want.routes))
		}
		if err := eng.Remove("/nonexistent/netns", pod); err != nil {
			t.Errorf("remove with a gone netns: %v", err)
		}
		if loader.attached[pod.UID] {
			t.Errorf("remove with a gone netns did not detach the program")
		}
	})
}

func TestNFTablesReplacesStaleTableInKernel(t *testing.T) {
	requireRoot(t)
	tn := newTestNet(t)
	// A stale table: same name, other content.
	err := doNFT(tn.pod, func(c *nftables.Conn) error {
		tb := c.AddTable(podTable())
		c.AddChain(&nftables.Chain{Name: "stale", Table: tb})
		return c.Flush()
	})
	if err != nil {
		t.Fatal(err)
	}
	eng := &NFTables{}
	pod := Pod{Namespace: "test", Name: "pod"}
	if err := eng.Install(tn.pod, pod); err != nil {
		t.Fatal(err)
	}
	got, err := eng.Describe(tn.pod, pod)
	if err != nil {
		t.Fatal(err)
	}
	// What the kernel holds reads back exactly as what the golden test renders.
	if want := podRuleset(false).lines(); !slices.Equal(got.(NFTablesReport).Ruleset, want) {
		t.Errorf("installed ruleset:\n%s\nwant:\n%s", strings.Join(got.(NFTablesReport).Ruleset, "\n"), strings.Join(want, "\n"))
	}
}

// TestFailsClosedInKernel: with redirection installed and no ztunnel listening,
// nothing gets through in plaintext either way.
func TestFailsClosedInKernel(t *testing.T) {
	requireRoot(t)
	for _, ec := range engineCases() {
		t.Run(ec.name, func(t *testing.T) {
			skipUnlessSupported(t, ec)
			tn := newTestNet(t)
			pod := Pod{UID: randomUID(t), Namespace: "test", Name: "pod", IPs: []netip.Addr{pod4, pod6}}
			eng := ec.new()
			t.Cleanup(func() { _ = eng.Remove(tn.pod, pod) })
			app := listen(t, tn.pod, appPort, 0, false)
			server := listen(t, tn.peer, 80, 0, false)
			if err := eng.Install(tn.pod, pod); err != nil {
				t.Fatal(err)
			}
			check := func(from string, to netip.AddrPort, dest *net.TCPListener) {
				t.Helper()
				if c, err := dial(from, to, 0); err == nil {
					c.Close()
					t.Errorf("connection to %s succeeded without ztunnel", to)
				}
				_ = dest.SetDeadline(time.Now().Add(300 * time.Millisecond))
				if c, err := dest.Accept(); err == nil {
					c.Close()
					t.Errorf("connection to %s reached its destination without ztunnel", to)
				}
			}
			check(tn.pod, netip.AddrPortFrom(peer4, 80), server)
			check(tn.pod, netip.AddrPortFrom(peer6, 80), server)
			check(tn.peer, netip.AddrPortFrom(pod4, appPort), app)
			check(tn.peer, netip.AddrPortFrom(pod6, appPort), app)
		})
	}
}
