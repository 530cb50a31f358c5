package sockmap

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/cilium/ebpf"
	"golang.org/x/sys/unix"
)

// The tests pin their maps in a bpffs of their own, mounted on a temporary
// directory, so they neither need nor touch /sys/fs/bpf. The engine's real
// pins, program and redirection are tested through Register in bpf/redirect
// (TestAttachedRedirection) and ztunnel/inpod (TestManagerWithTheEBPFEngine).

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (CAP_BPF, CAP_NET_ADMIN, CAP_SYS_ADMIN)")
	}
}

// newBPFFS mounts a fresh bpffs instance and unmounts it when the test ends
// (its pins, and the maps only they held, go with it).
func newBPFFS(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if err := unix.Mount("bpffs", dir, "bpf", 0, "mode=0700"); err != nil {
		t.Fatalf("mount bpffs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount bpffs: %v", err)
		}
	})
	return dir
}

// pinMap creates a map as spec says (with the library the engine loads its
// program with, so the two implementations check each other) and pins it.
func pinMap(t *testing.T, path string, spec *ebpf.MapSpec) *ebpf.Map {
	t.Helper()
	m, err := ebpf.NewMap(spec)
	if err != nil {
		t.Fatalf("create map: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := m.Pin(path); err != nil {
		t.Fatalf("pin map: %v", err)
	}
	return m
}

// socketsSpec is the sockets map of redirect.c.
func socketsSpec() *ebpf.MapSpec {
	return &ebpf.MapSpec{Type: ebpf.SockMap, KeySize: keySize, ValueSize: valueSize, MaxEntries: 3}
}

func tcpListener(t *testing.T) *net.TCPListener {
	t.Helper()
	var lc net.ListenConfig
	lc.SetMultipathTCP(false)
	l, err := lc.Listen(context.Background(), "tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l.(*net.TCPListener)
}

// cookie is the kernel's id of c's socket, which a SOCKMAP lookup returns.
func cookie(t *testing.T, c syscall.Conn) uint64 {
	t.Helper()
	rc, err := c.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var ck uint64
	var serr error
	if err := rc.Control(func(fd uintptr) {
		ck, serr = unix.GetsockoptUint64(int(fd), unix.SOL_SOCKET, unix.SO_COOKIE)
	}); err != nil || serr != nil {
		t.Fatalf("SO_COOKIE: %v %v", err, serr)
	}
	return ck
}

// slots reads the map's three slots: a socket's cookie, 0 when empty.
func slots(t *testing.T, m *ebpf.Map) [3]uint64 {
	t.Helper()
	var out [3]uint64
	for slot := range out {
		if err := m.Lookup(uint32(slot), &out[slot]); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			t.Fatalf("lookup slot %d: %v", slot, err)
		}
	}
	return out
}

func TestRegisterPutsSocketsInTheirSlots(t *testing.T) {
	requireRoot(t)
	path := filepath.Join(newBPFFS(t), pinSockets)
	m := pinMap(t, path, socketsSpec())
	outbound, inbound := tcpListener(t), tcpListener(t)
	dns, err := net.ListenUDP("udp", &net.UDPAddr{IP: net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	defer dns.Close()

	t.Run("the outbound and inbound listeners go to slots 0 and 1, a nil dns leaves slot 2 empty", func(t *testing.T) {
		if err := register(path, "pod", outbound, inbound, nil); err != nil {
			t.Fatal(err)
		}
		if got, want := slots(t, m), [3]uint64{cookie(t, outbound), cookie(t, inbound), 0}; got != want {
			t.Fatalf("slots %v, want %v", got, want)
		}
	})
	t.Run("nil sockets leave their slots and a UDP socket goes to the dns slot", func(t *testing.T) {
		if err := register(path, "pod", nil, nil, dns); err != nil {
			t.Fatal(err)
		}
		if got, want := slots(t, m), [3]uint64{cookie(t, outbound), cookie(t, inbound), cookie(t, dns)}; got != want {
			t.Fatalf("slots %v, want %v", got, want)
		}
	})
	t.Run("registering again replaces a slot's socket", func(t *testing.T) {
		next := tcpListener(t)
		if err := register(path, "pod", next, nil, nil); err != nil {
			t.Fatal(err)
		}
		if got := slots(t, m)[SlotOutbound]; got != cookie(t, next) {
			t.Fatalf("outbound slot holds %d, want the new listener's %d", got, cookie(t, next))
		}
	})
	t.Run("a closed socket leaves the map", func(t *testing.T) {
		inbound.Close()
		if got := slots(t, m)[SlotInbound]; got != 0 {
			t.Fatalf("inbound slot still holds %d", got)
		}
	})
}

func TestRegisterRefusesWhatCannotWork(t *testing.T) {
	requireRoot(t)
	bpffs := newBPFFS(t)
	sockets := filepath.Join(bpffs, pinSockets)
	pinMap(t, sockets, socketsSpec())
	l := tcpListener(t)

	t.Run("no pin is ErrNotAttached", func(t *testing.T) {
		err := register(filepath.Join(bpffs, "gone", pinSockets), "gone", l, nil, nil)
		if !errors.Is(err, ErrNotAttached) {
			t.Fatalf("got %v, want ErrNotAttached", err)
		}
	})
	t.Run("a pin that is not a SOCKMAP is refused and left alone", func(t *testing.T) {
		path := filepath.Join(bpffs, "hash")
		h := pinMap(t, path, &ebpf.MapSpec{Type: ebpf.Hash, KeySize: 16, ValueSize: 1, MaxEntries: 4})
		err := register(path, "pod", l, nil, nil)
		if err == nil || errors.Is(err, ErrNotAttached) || !strings.Contains(err.Error(), "want a SOCKMAP") {
			t.Fatalf("got %v, want a refusal", err)
		}
		var k [16]byte
		var v uint8
		if it := h.Iterate(); it.Next(&k, &v) {
			t.Fatalf("the hash map was written: %x", k)
		}
	})
	t.Run("a SOCKMAP of other value size is refused", func(t *testing.T) {
		path := filepath.Join(bpffs, "sockmap4")
		pinMap(t, path, &ebpf.MapSpec{Type: ebpf.SockMap, KeySize: 4, ValueSize: 4, MaxEntries: 3})
		if err := register(path, "pod", l, nil, nil); err == nil || !strings.Contains(err.Error(), "want a SOCKMAP") {
			t.Fatalf("got %v, want a refusal", err)
		}
	})
	t.Run("an MPTCP listener is refused with a hint", func(t *testing.T) {
		ml, err := (&net.ListenConfig{}).Listen(context.Background(), "tcp", "127.0.0.1:0") // Go's default: MPTCP
		if err != nil {
			t.Fatal(err)
		}
		defer ml.Close()
		rc, _ := ml.(*net.TCPListener).SyscallConn()
		var proto int
		rc.Control(func(fd uintptr) { proto, _ = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PROTOCOL) })
		if proto != unix.IPPROTO_MPTCP {
			t.Skip("this kernel gave Go a plain TCP listener")
		}
		if err := register(sockets, "pod", ml.(*net.TCPListener), nil, nil); err == nil || !strings.Contains(err.Error(), "MPTCP") {
			t.Fatalf("got %v, want an MPTCP error", err)
		}
	})
	t.Run("a socket the kernel cannot hold is refused with its errno", func(t *testing.T) {
		// A TCP socket neither listening nor established.
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "tcp")
		defer f.Close()
		var errno syscall.Errno
		if err := register(sockets, "pod", f, nil, nil); !errors.As(err, &errno) {
			t.Fatalf("got %v, want the kernel's errno", err)
		}
	})
}

func TestRegisterChecksThePodUID(t *testing.T) {
	for _, uid := range []string{"", ".", "..", "a/b", "../etc", "a\x00b"} {
		if err := Register(uid, nil, nil, nil); err == nil || errors.Is(err, ErrNotAttached) {
			t.Errorf("Register(%q) = %v, want an invalid uid error", uid, err)
		}
	}
}

func TestRegisterForAPodWithoutPinsIsErrNotAttached(t *testing.T) {
	requireRoot(t)
	// Whether or not bpffs is mounted at BPFFSRoot, nothing is pinned for
	// this uid.
	if err := Register("test-sockmap-never-attached", nil, nil, nil); !errors.Is(err, ErrNotAttached) {
		t.Fatalf("got %v, want ErrNotAttached", err)
	}
}

func TestPathIsUnderThePodsPinDirectory(t *testing.T) {
	if got, want := Path("uid-1"), "/sys/fs/bpf/ambient/uid-1/sockets"; got != want {
		t.Errorf("Path = %q, want %q", got, want)
	}
}
