package redirect

import "fmt"

// Choose returns the engine for preference: "ebpf", "nftables", or "auto" (eBPF
// when the kernel supports it, nftables otherwise). An explicit "ebpf" on a
// kernel without support is an error wrapping ErrUnsupported, not a silent fallback.
func Choose(preference string) (Engine, error) {
	switch preference {
	case EngineAuto, "":
		if ebpfSupported() == nil {
			return &EBPF{}, nil
		}
		return &NFTables{}, nil
	case EngineEBPF:
		if err := ebpfSupported(); err != nil {
			return nil, fmt.Errorf("choosing ebpf engine: %w", err)
		}
		return &EBPF{}, nil
	case EngineNFTables:
		return &NFTables{}, nil
	default:
		return nil, fmt.Errorf("unknown redirection engine %q (want %q, %q or %q)", preference, EngineAuto, EngineEBPF, EngineNFTables)
	}
}
