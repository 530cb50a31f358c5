package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"syscall"

	"github.com/cilium/ebpf"

	"github.com/ambient-mesh/ambient/bpf/redirect/sockmap"
)

// Report describes a pod's attachment (the agent's debug endpoint shows it).
type Report struct {
	PodUID     string `json:"podUID"`
	PinDir     string `json:"pinDir"`
	LinkID     uint32 `json:"linkID"`
	ProgramID  uint32 `json:"programID"`
	ProgramTag string `json:"programTag"`
	// NetnsInode is the inode of the attached network namespace; 0 when that
	// namespace is gone (the link is then detached by the kernel).
	NetnsInode uint64       `json:"netnsInode"`
	Addresses  []netip.Addr `json:"addresses"`
	// Sockets holds the socket cookie in each slot, 0 when the slot is empty.
	Sockets SocketSlots `json:"sockets"`
}

// SocketSlots are the cookies of the sockets in the sockets map.
type SocketSlots struct {
	Outbound uint64 `json:"outbound"`
	Inbound  uint64 `json:"inbound"`
	DNS      uint64 `json:"dns"`
}

// Status reports what is attached for the pod; errors.Is(err, ErrNotAttached)
// when nothing is.
func Status(podUID string) (Report, error) {
	if err := checkUID(podUID); err != nil {
		return Report{}, err
	}
	p, err := openPins(podUID)
	if err != nil {
		return Report{}, err
	}
	defer p.close()

	r := Report{
		PodUID:     podUID,
		PinDir:     pinDir(podUID),
		LinkID:     uint32(p.info.ID),
		ProgramID:  uint32(p.info.Program),
		NetnsInode: p.netnsIno,
	}
	if prog, err := ebpf.NewProgramFromID(p.info.Program); err == nil {
		if pi, err := prog.Info(); err == nil {
			r.ProgramTag = pi.Tag
		}
		prog.Close()
	}

	var k redirectPodAddr
	var v uint8
	it := p.podAddrs.Iterate()
	for it.Next(&k, &v) {
		r.Addresses = append(r.Addresses, netip.AddrFrom16(k.Addr).Unmap())
	}
	if err := it.Err(); err != nil {
		return Report{}, fmt.Errorf("redirect: read pod addresses: %w", err)
	}

	for slot, dst := range []*uint64{&r.Sockets.Outbound, &r.Sockets.Inbound, &r.Sockets.DNS} {
		// A SOCKMAP read from user space yields the socket's cookie.
		err := p.sockets.Lookup(uint32(slot), dst)
		if err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return Report{}, fmt.Errorf("redirect: read socket slot %d: %w", slot, err)
		}
	}
	return r, nil
}

// RegisterSockets stores the listening sockets of the side that owns them
// (ztunnel, or a test stand-in) in the pod's sockets map: outbound (TCP,
// 15001), inbound (TCP, 15006) and dns (UDP, 15053). A nil conn leaves its
// slot as it is. The sockets must have been opened inside the pod's netns; a
// socket leaves the map by itself when it is closed. It is [sockmap.Register],
// which ztunnel calls directly so as not to link this package's eBPF library.
func RegisterSockets(podUID string, outbound, inbound, dns syscall.Conn) error {
	return sockmap.Register(podUID, outbound, inbound, dns)
}
