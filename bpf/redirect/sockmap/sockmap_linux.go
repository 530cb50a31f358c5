package sockmap

import (
	"errors"
	"fmt"
	"runtime"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The sockets map as redirect.c declares it: __u32 slots, __u64 values
// (a socket's fd going in, its cookie coming out).
const (
	keySize   = 4
	valueSize = 8
)

// Register stores the listening sockets of the side that owns them (ztunnel,
// or a test stand-in) in the pod's sockets map: outbound (TCP, 15001),
// inbound (TCP, 15006) and dns (UDP, 15053). A nil conn leaves its slot as it
// is. The sockets must have been opened inside the pod's netns; a socket
// leaves the map by itself when it is closed. errors.Is(err, ErrNotAttached)
// when the engine has no pins for the pod.
func Register(podUID string, outbound, inbound, dns syscall.Conn) error {
	if err := CheckPodUID(podUID); err != nil {
		return err
	}
	return register(Path(podUID), podUID, outbound, inbound, dns)
}

// register is Register for the SOCKMAP pinned at path, conns in slot order.
func register(path, podUID string, conns ...syscall.Conn) error {
	fd, err := openPinned(path)
	if errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("%w: pod %s", ErrNotAttached, podUID)
	}
	if err != nil {
		return fmt.Errorf("redirect: open sockets map: %w", err)
	}
	defer unix.Close(fd)
	for slot, c := range conns {
		if c == nil {
			continue
		}
		if err := Put(fd, uint32(slot), c); err != nil {
			return fmt.Errorf("redirect: register socket in slot %d: %w", slot, err)
		}
	}
	return nil
}

// Put stores c's socket in slot of the SOCKMAP mapFD (of __u32 keys and __u64
// values). The map holds its own reference: c's fd may be closed after.
func Put(mapFD int, slot uint32, c syscall.Conn) error {
	rc, err := c.SyscallConn()
	if err != nil {
		return err
	}
	var uerr error
	err = rc.Control(func(fd uintptr) {
		// Go (1.24+) listens with MPTCP by default, and an MPTCP socket can
		// neither sit in a SOCKMAP nor be picked by sk_lookup.
		if p, _ := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL); p == unix.IPPROTO_MPTCP {
			uerr = errors.New("MPTCP socket; listen with net.ListenConfig.SetMultipathTCP(false)")
			return
		}
		uerr = updateElem(mapFD, slot, uint64(fd))
	})
	return errors.Join(err, uerr)
}

// openPinned opens the map pinned at path (BPF_OBJ_GET, read-write) and
// checks that it is a SOCKMAP of the engine's key and value sizes, so that
// a wrong pin is refused instead of written with the wrong layout.
func openPinned(path string) (int, error) {
	name, err := unix.BytePtrFromString(path)
	if err != nil {
		return -1, err
	}
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(name)
	attr := objGetAttr{pathname: addr(name)}
	fd, err := bpf(unix.BPF_OBJ_GET, unsafe.Pointer(&attr), unsafe.Sizeof(attr))
	if err != nil {
		return -1, fmt.Errorf("BPF_OBJ_GET %s: %w", path, err)
	}
	info := new(mapInfo)
	pin.Pin(info)
	iattr := objInfoAttr{bpfFD: uint32(fd), infoLen: uint32(unsafe.Sizeof(*info)), info: addr(info)}
	if _, err := bpf(unix.BPF_OBJ_GET_INFO_BY_FD, unsafe.Pointer(&iattr), unsafe.Sizeof(iattr)); err != nil {
		unix.Close(fd)
		return -1, fmt.Errorf("BPF_OBJ_GET_INFO_BY_FD %s: %w", path, err)
	}
	if info.mapType != unix.BPF_MAP_TYPE_SOCKMAP || info.keySize != keySize || info.valueSize != valueSize {
		unix.Close(fd)
		return -1, fmt.Errorf("%s is map type %d with %d-byte keys and %d-byte values, want a SOCKMAP (%d) with %d and %d",
			path, info.mapType, info.keySize, info.valueSize, unix.BPF_MAP_TYPE_SOCKMAP, keySize, valueSize)
	}
	return fd, nil
}

// updateElem sets key to value in the map mapFD (BPF_MAP_UPDATE_ELEM,
// BPF_ANY).
func updateElem(mapFD int, key uint32, value uint64) error {
	k, v := &key, &value
	var pin runtime.Pinner
	defer pin.Unpin()
	pin.Pin(k)
	pin.Pin(v)
	attr := mapElemAttr{mapFD: uint32(mapFD), key: addr(k), value: addr(v), flags: unix.BPF_ANY}
	if _, err := bpf(unix.BPF_MAP_UPDATE_ELEM, unsafe.Pointer(&attr), unsafe.Sizeof(attr)); err != nil {
		return fmt.Errorf("BPF_MAP_UPDATE_ELEM: %w", err)
	}
	return nil
}

// bpf is the bpf(2) system call; a returned fd is close-on-exec.
func bpf(cmd int, attr unsafe.Pointer, size uintptr) (int, error) {
	r, _, errno := unix.Syscall(unix.SYS_BPF, uintptr(cmd), uintptr(attr), size)
	if errno != 0 {
		return -1, errno
	}
	return int(r), nil
}

// The parts of union bpf_attr (include/uapi/linux/bpf.h) used here. The
// kernel takes a shorter attr than its own and treats the rest as zero.
// Pointers travel as __aligned_u64; what they point at is pinned for the
// call, so the garbage collector neither moves nor frees it meanwhile.
type (
	// objGetAttr is the BPF_OBJ_GET part.
	objGetAttr struct {
		pathname  uint64
		bpfFD     uint32
		fileFlags uint32
	}
	// mapElemAttr is the BPF_MAP_*_ELEM part.
	mapElemAttr struct {
		mapFD uint32
		_     uint32
		key   uint64
		value uint64
		flags uint64
	}
	// objInfoAttr is the BPF_OBJ_GET_INFO_BY_FD part.
	objInfoAttr struct {
		bpfFD   uint32
		infoLen uint32
		info    uint64
	}
	// mapInfo is the start of struct bpf_map_info; the kernel fills no
	// more than infoLen bytes.
	mapInfo struct {
		mapType    uint32
		id         uint32
		keySize    uint32
		valueSize  uint32
		maxEntries uint32
		mapFlags   uint32
	}
)

// addr is p as a bpf_attr pointer field; p must be pinned.
func addr[T any](p *T) uint64 { return uint64(uintptr(unsafe.Pointer(p))) }
