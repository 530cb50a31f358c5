package redirect

import (
	"fmt"
	"net/netip"
	"os"
	"testing"
)

// BenchmarkInstall measures installing and removing each engine's
// redirection in a pod namespace: the part of a CNI ADD that is the agent's
// own kernel work.
func BenchmarkInstall(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	engines := []Engine{&NFTables{}, &EBPF{}}
	for _, e := range engines {
		b.Run(e.Name(), func(b *testing.B) {
			if e.Name() == EngineEBPF {
				if err := ebpfSupported(); err != nil {
					b.Skipf("eBPF engine not supported here: %v", err)
				}
			}
			tn := benchNet(b)
			pod := Pod{UID: fmt.Sprintf("bench-install-%s", e.Name()), Namespace: "bench", Name: "pod", IPs: []netip.Addr{netip.MustParseAddr("10.77.0.2")}}
			for b.Loop() {
				if err := e.Install(tn.pod, pod); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				if err := e.Remove(tn.pod, pod); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
