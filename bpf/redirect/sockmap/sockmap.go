package sockmap

import (
	"errors"
	"fmt"
	"path/filepath"
	"strings"
)

// Constants shared with redirect.c, bpf/redirect and
// cni-plugin/internal/redirect.
const (
	// Mark is ztunnel's SO_MARK; the routing rules let marked traffic out.
	Mark = 0x539
	// PortOutbound, PortInbound, PortHBONE and PortDNS are ztunnel's ports.
	PortOutbound = 15001
	PortInbound  = 15006
	PortHBONE    = 15008
	PortDNS      = 15053
)

// Slots of the sockets map (see ../../../cni-plugin/README.md).
const (
	SlotOutbound = 0 // TCP listener on 15001
	SlotInbound  = 1 // TCP listener on 15006
	SlotDNS      = 2 // UDP socket on 15053
)

// BPFFSRoot is where bpffs is expected (and mounted when missing); PinRoot is
// the engine's directory in it, with one directory per pod uid.
const (
	BPFFSRoot = "/sys/fs/bpf"
	PinRoot   = BPFFSRoot + "/ambient"
)

// pinSockets is the name of the SOCKMAP's pin in a pod's directory.
const pinSockets = "sockets"

// ErrNotAttached is returned (wrapped) for a pod that has no pins: the eBPF
// engine does not redirect it.
var ErrNotAttached = errors.New("redirect: not attached")

// Path is the bpffs path of the pod's SOCKMAP, into which ztunnel inserts its
// listening sockets.
func Path(podUID string) string {
	return filepath.Join(PinRoot, podUID, pinSockets)
}

// CheckPodUID refuses a pod uid that cannot name a directory under PinRoot.
func CheckPodUID(podUID string) error {
	if podUID == "" || podUID == "." || podUID == ".." || strings.ContainsAny(podUID, "/\x00") {
		return fmt.Errorf("redirect: invalid pod uid %q", podUID)
	}
	return nil
}
