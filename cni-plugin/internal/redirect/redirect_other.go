//go:build !linux

package redirect

import (
	"fmt"
	"net/netip"
	"runtime"
)

var errNotLinux = fmt.Errorf("%w on %s", ErrUnsupported, runtime.GOOS)

// NFTables is the nftables engine; it only runs on Linux.
type NFTables struct{ CaptureDNS bool }

// EBPF is the eBPF engine; it only runs on Linux.
type EBPF struct{ CaptureDNS bool }

func (*NFTables) Name() string                      { return EngineNFTables }
func (*NFTables) Install(string, Pod) error         { return errNotLinux }
func (*NFTables) Remove(string, Pod) error          { return errNotLinux }
func (*NFTables) Describe(string, Pod) (any, error) { return nil, errNotLinux }
func (*EBPF) Name() string                          { return EngineEBPF }
func (*EBPF) Install(string, Pod) error             { return errNotLinux }
func (*EBPF) Remove(string, Pod) error              { return errNotLinux }
func (*EBPF) Describe(string, Pod) (any, error)     { return nil, errNotLinux }
func ebpfSupported() error                          { return errNotLinux }
func InstallProbeSNAT([]netip.Prefix) error         { return errNotLinux }
func RemoveProbeSNAT() error                        { return errNotLinux }
func AddProbeTarget(netip.Addr) error               { return errNotLinux }
func RemoveProbeTarget(netip.Addr) error            { return errNotLinux }
