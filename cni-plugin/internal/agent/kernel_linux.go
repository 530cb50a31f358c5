package agent

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"time"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
)

// kernelProbeSNAT is package redirect's node-side probe SNAT.
type kernelProbeSNAT struct{}

func (kernelProbeSNAT) Install(podCIDRs []netip.Prefix) error {
	return redirect.InstallProbeSNAT(podCIDRs)
}
func (kernelProbeSNAT) AddTarget(ip netip.Addr) error    { return redirect.AddProbeTarget(ip) }
func (kernelProbeSNAT) RemoveTarget(ip netip.Addr) error { return redirect.RemoveProbeTarget(ip) }
func (kernelProbeSNAT) Describe() (any, error)           { return redirect.DescribeProbeSNAT() }

// redirectionInstalled reads an Engine.Describe report: is redirection in
// place?
func redirectionInstalled(report any) bool {
	switch r := report.(type) {
	case redirect.NFTablesReport:
		return r.Installed
	case *redirect.NFTablesReport:
		return r != nil && r.Installed
	case redirect.EBPFReport:
		return len(r.Rules) > 0 && r.Program != nil
	case *redirect.EBPFReport:
		return r != nil && len(r.Rules) > 0 && r.Program != nil
	case interface{ Installed() bool }:
		return r.Installed()
	}
	return report != nil
}

// indexMaxAge is how long a scan's address index is trusted before a miss
// forces a new scan. Every hit is verified against the namespace itself, so
// a stale entry costs a rescan, never a wrong namespace.
const indexMaxAge = 2 * time.Second

// procScanner finds a running pod's network namespace by its IP: it lists
// the distinct network namespaces of the host's processes (procDir/<pid>/ns/net)
// and of the runtime's named namespaces (netnsDir), enters each, and indexes
// the addresses on its interfaces. A namespace path under procDir is only
// valid while its process lives, so Find returns the namespace opened, never
// a path.
type procScanner struct {
	procDir, netnsDir string

	mu sync.Mutex
	// index maps an address to the namespace holding it, from the last
	// scan at scannedAt; guarded by mu.
	index     map[netip.Addr]netnsRef
	scannedAt time.Time
}

type netnsRef struct {
	path string
	ino  uint64
}

func newProcScanner(procDir, netnsDir string) *procScanner {
	return &procScanner{procDir: procDir, netnsDir: netnsDir}
}

// Find implements netnsFinder.
func (s *procScanner) Find(ips []netip.Addr) (*os.File, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if time.Since(s.scannedAt) < indexMaxAge {
		if f := s.openIndexedLocked(ips); f != nil {
			return f, nil
		}
	}
	if err := s.scanLocked(); err != nil {
		return nil, err
	}
	if f := s.openIndexedLocked(ips); f != nil {
		return f, nil
	}
	return nil, fmt.Errorf("%w: %v", errNetnsNotFound, ips)
}

// openIndexedLocked opens the indexed namespace of one of ips, after checking
// it is still the one indexed and still holds the address.
func (s *procScanner) openIndexedLocked(ips []netip.Addr) *os.File {
	for _, ip := range ips {
		ref, ok := s.index[ip.Unmap()]
		if !ok {
			continue
		}
		f, err := os.Open(ref.path)
		if err != nil {
			continue // the process is gone
		}
		if inodeOf(f) != ref.ino {
			f.Close()
			continue
		}
		addrs, err := addrsIn(fmt.Sprintf("/proc/self/fd/%d", f.Fd()))
		if err == nil && addrs[ip.Unmap()] {
			return f
		}
		f.Close()
	}
	return nil
}

// scanLocked rebuilds the index.
func (s *procScanner) scanLocked() error {
	var own unix.Stat_t
	if err := unix.Stat("/proc/self/ns/net", &own); err != nil {
		return fmt.Errorf("inspecting own netns: %w", err)
	}
	seen := map[uint64]bool{own.Ino: true}
	var refs []netnsRef
	add := func(path string) {
		var st unix.Stat_t
		if unix.Stat(path, &st) != nil || seen[st.Ino] {
			return
		}
		seen[st.Ino] = true
		refs = append(refs, netnsRef{path: path, ino: st.Ino})
	}
	entries, err := os.ReadDir(s.procDir)
	if err != nil {
		return fmt.Errorf("listing processes: %w", err)
	}
	for _, e := range entries {
		if _, err := strconv.Atoi(e.Name()); err == nil {
			add(filepath.Join(s.procDir, e.Name(), "ns", "net"))
		}
	}
	if s.netnsDir != "" {
		entries, err := os.ReadDir(s.netnsDir)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("listing named netns: %w", err)
		}
		for _, e := range entries {
			add(filepath.Join(s.netnsDir, e.Name()))
		}
	}

	index := map[netip.Addr]netnsRef{}
	for _, ref := range refs {
		addrs, err := addrsIn(ref.path)
		if err != nil {
			continue // the process exited, or not a netns we may enter
		}
		for a := range addrs {
			if _, dup := index[a]; !dup {
				index[a] = ref
			}
		}
	}
	s.index, s.scannedAt = index, time.Now()
	return nil
}

// addrsIn lists the unicast addresses on the interfaces of the netns at path
// (loopback and link-local left out).
func addrsIn(path string) (map[netip.Addr]bool, error) {
	addrs := map[netip.Addr]bool{}
	err := redirect.Do(path, func(ns.NetNS) error {
		h, err := netlink.NewHandle(unix.NETLINK_ROUTE)
		if err != nil {
			return fmt.Errorf("opening netlink: %w", err)
		}
		defer h.Close()
		list, err := h.AddrList(nil, netlink.FAMILY_ALL)
		if err != nil {
			return fmt.Errorf("listing addresses: %w", err)
		}
		for _, a := range list {
			ip, ok := netip.AddrFromSlice(a.IP)
			if !ok {
				continue
			}
			ip = ip.Unmap()
			if ip.IsLoopback() || ip.IsLinkLocalUnicast() {
				continue
			}
			addrs[ip] = true
		}
		return nil
	})
	return addrs, err
}
