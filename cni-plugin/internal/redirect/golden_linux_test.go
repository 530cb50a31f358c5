package redirect

import (
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the current output")

// TestGolden checks what the installers would write, rendered to text, against
// testdata/*.golden. Run with -update after an intended change and review the diff.
func TestGolden(t *testing.T) {
	podIPs := []netip.Addr{netip.MustParseAddr("10.244.1.7"), netip.MustParseAddr("fd00:10:244:1::7")}
	render := func(rt routing) string {
		var b strings.Builder
		for _, r := range rt.routes {
			b.WriteString(formatRoute(nil, r) + "\n")
		}
		for _, r := range rt.rules {
			b.WriteString(formatRule(r) + "\n")
		}
		return b.String()
	}
	tests := []struct {
		name string
		got  string
	}{
		{"nftables", podRuleset(false).render()},
		{"nftables-dns", podRuleset(true).render()},
		{"probe-snat", probeRuleset(
			[]netip.Prefix{netip.MustParsePrefix("10.244.1.0/24"), netip.MustParsePrefix("10.245.0.0/16"), netip.MustParsePrefix("fd00:10:244:1::/64")},
			[]netip.Addr{netip.MustParseAddr("10.244.1.9"), netip.MustParseAddr("10.244.1.7")},
		).render()},
		{"probe-snat-no-cidr", probeRuleset(nil, nil).render()},
		{"nftables-routing", render(nftRouting(1, podIPs))},
		{"ebpf-routing", render(ebpfRouting(false, 1, podIPs))},
		{"ebpf-routing-dns", render(ebpfRouting(true, 1, podIPs))},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join("testdata", tt.name+".golden")
			if *update {
				if err := os.WriteFile(path, []byte(tt.got), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("reading golden file (run with -update to create it): %v", err)
			}
			if tt.got != string(want) {
				t.Errorf("%s differs from %s (run with -update to accept):\n--- got\n%s--- want\n%s", tt.name, path, tt.got, want)
			}
		})
	}
}
