package redirect

import (
	"errors"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"

	"github.com/cilium/ebpf"
	"github.com/cilium/ebpf/link"
	"github.com/cilium/ebpf/rlimit"
	"golang.org/x/sys/unix"

	"github.com/ambient-mesh/ambient/bpf/redirect/sockmap"
)

// Constants shared with redirect.c and cni-plugin/internal/redirect. They are
// defined in sockmap, the part of the engine that ztunnel links.
const (
	// Mark is ztunnel's SO_MARK; the routing rules let marked traffic out.
	Mark = sockmap.Mark
	// PortOutbound, PortInbound, PortHBONE and PortDNS are ztunnel's ports.
	PortOutbound = sockmap.PortOutbound
	PortInbound  = sockmap.PortInbound
	PortHBONE    = sockmap.PortHBONE
	PortDNS      = sockmap.PortDNS
)

// ProbeSource is the address kubelet probes are SNATed to on the node; the
// program leaves connections from it alone.
var ProbeSource = netip.AddrFrom4([4]byte{169, 254, 7, 127})

// Slots of the sockets map (see ../../cni-plugin/README.md).
const (
	SlotOutbound = sockmap.SlotOutbound // TCP listener on 15001
	SlotInbound  = sockmap.SlotInbound  // TCP listener on 15006
	SlotDNS      = sockmap.SlotDNS      // UDP socket on 15053
)

// BPFFSRoot is where bpffs is expected (and mounted when missing); PinRoot is
// this package's directory in it.
const (
	BPFFSRoot = sockmap.BPFFSRoot
	PinRoot   = sockmap.PinRoot
)

// Pins in a pod's directory besides the sockets map ([SocketMapPath]).
const (
	pinLink     = "link"
	pinPodAddrs = "pod_addrs"
)

// ErrNotAttached is returned (wrapped) by Status and RegisterSockets for a pod
// that has no pins.
var ErrNotAttached = sockmap.ErrNotAttached

// bpffsMu serialises mounting bpffs; podLocks serialises changes to one
// pod's pins, so that enrolling many pods at once (a namespace labeled with
// its pods running) proceeds in parallel. Attach spends most of its time
// waiting in the kernel, not on the CPU.
var (
	bpffsMu  sync.Mutex
	podLocks sync.Map // pod uid -> *sync.Mutex
)

func lockPod(podUID string) func() {
	m, _ := podLocks.LoadOrStore(podUID, new(sync.Mutex))
	mu := m.(*sync.Mutex)
	mu.Lock()
	return mu.Unlock
}

// SocketMapPath is the bpffs path of the pod's SOCKMAP, into which ztunnel
// inserts its listening sockets.
func SocketMapPath(podUID string) string { return sockmap.Path(podUID) }

func pinDir(podUID string) string { return filepath.Join(PinRoot, podUID) }

func checkUID(podUID string) error { return sockmap.CheckPodUID(podUID) }

// Supported reports whether this kernel and these privileges can run the
// engine, by loading the program (which needs sk_lookup with ingress_ifindex,
// 5.17+) and creating its maps. Nothing is attached.
func Supported() error {
	var objs redirectObjects
	if err := load(&objs, nil); err != nil {
		return err
	}
	return objs.Close()
}

var memlockOnce = sync.OnceValue(rlimit.RemoveMemlock)

// load loads the embedded objects; replacements reuse existing (pinned) maps.
func load(objs *redirectObjects, replacements map[string]*ebpf.Map) error {
	if err := memlockOnce(); err != nil {
		return fmt.Errorf("redirect: memlock rlimit: %w", err)
	}
	spec, err := redirectSpec()
	if err != nil {
		return err
	}
	opts := &ebpf.CollectionOptions{MapReplacements: replacements}
	if err := spec.LoadAndAssign(objs, opts); err != nil {
		return fmt.Errorf("redirect: load sk_lookup program: %w", err)
	}
	return nil
}

// Attach attaches the program to the network namespace at netnsPath (a
// /proc/<pid>/ns/net or a bind mount such as /var/run/netns/<name>), pins it
// and its maps under PinRoot/<podUID>/ and sets the pod's addresses.
//
// Idempotent: for a pod already attached to the same netns it only brings the
// addresses (and the program, after an upgrade, swapped atomically in the same
// link) up to date; the sockets ztunnel registered stay. Pins left for another
// netns (a recreated sandbox) or a gone one are replaced. On error nothing new
// is left behind.
func Attach(netnsPath, podUID string, podIPs []netip.Addr) error {
	if err := checkUID(podUID); err != nil {
		return err
	}
	keys, err := addrKeys(podIPs)
	if err != nil {
		return err
	}
	ns, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("redirect: open netns: %w", err)
	}
	defer ns.Close()
	var st unix.Stat_t
	if err := unix.Fstat(int(ns.Fd()), &st); err != nil {
		return fmt.Errorf("redirect: stat netns: %w", err)
	}
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(int(ns.Fd()), &sfs); err != nil || sfs.Type != unix.NSFS_MAGIC {
		return fmt.Errorf("redirect: %s is not a network namespace", netnsPath)
	}

	defer lockPod(podUID)()
	bpffsMu.Lock()
	err = ensureBPFFS()
	bpffsMu.Unlock()
	if err != nil {
		return err
	}

	cur, err := openPins(podUID)
	switch {
	case err == nil:
		defer cur.close()
		if cur.netnsIno == st.Ino {
			return cur.update(keys)
		}
		// Another (or a gone) netns under the same uid: start again.
		cur.close()
		if err := removePins(podUID); err != nil {
			return err
		}
	case errors.Is(err, ErrNotAttached):
	default:
		// Partial or unreadable pins (a crash mid-attach): start again.
		if err := removePins(podUID); err != nil {
			return err
		}
	}
	return attachNew(int(ns.Fd()), podUID, keys)
}

func attachNew(nsFD int, podUID string, keys []redirectPodAddr) (err error) {
	sockets, err := newSocketMap()
	if err != nil {
		return err
	}
	defer sockets.Close()
	var objs redirectObjects
	if err := load(&objs, map[string]*ebpf.Map{redirectMapSockets: sockets}); err != nil {
		return err
	}
	defer objs.Close()
	if err := syncAddrs(objs.PodAddrs, keys); err != nil {
		return err
	}
	l, err := link.AttachNetNs(nsFD, objs.AmbientRedirect)
	if err != nil {
		return fmt.Errorf("redirect: attach to netns: %w", err)
	}
	// Until pinned, closing the link detaches the program.
	defer l.Close()

	dir := pinDir(podUID)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("redirect: %w", err)
	}
	defer func() {
		if err != nil {
			_ = removePins(podUID)
		}
	}()
	if err := objs.Sockets.Pin(SocketMapPath(podUID)); err != nil {
		return fmt.Errorf("redirect: pin sockets map: %w", err)
	}
	if err := objs.PodAddrs.Pin(filepath.Join(dir, pinPodAddrs)); err != nil {
		return fmt.Errorf("redirect: pin pod_addrs map: %w", err)
	}
	// The link last: its pin is what marks a complete attachment.
	if err := l.Pin(filepath.Join(dir, pinLink)); err != nil {
		return fmt.Errorf("redirect: pin link: %w", err)
	}
	return nil
}

// parsedSpec parses the embedded object once per process; every Attach
// used to parse it twice.
var parsedSpec = sync.OnceValues(loadRedirect)

// redirectSpec returns a copy of the parsed collection spec, so that no
// load can change what the next one starts from.
func redirectSpec() (*ebpf.CollectionSpec, error) {
	spec, err := parsedSpec()
	if err != nil {
		return nil, err
	}
	return spec.Copy(), nil
}

// newSocketMap creates the pod's SOCKMAP from the spec.
func newSocketMap() (*ebpf.Map, error) {
	spec, err := redirectSpec()
	if err != nil {
		return nil, err
	}
	// Without BTF for key and value: this kernel refuses BTF on a SOCKMAP
	// (ENOTSUPP), but only after 20–35 ms (strace), and the library then
	// retries without it. Asking without BTF at once costs well under 1 ms.
	ms := spec.Maps[redirectMapSockets].Copy()
	ms.Key, ms.Value = nil, nil
	m, err := ebpf.NewMap(ms)
	if err != nil {
		return nil, fmt.Errorf("redirect: create sockets map: %w", err)
	}
	return m, nil
}

// Detach detaches the pod's program and removes its pins. Nothing pinned is
// not an error.
func Detach(podUID string) error {
	if err := checkUID(podUID); err != nil {
		return err
	}
	defer lockPod(podUID)()
	return removePins(podUID)
}

// removePins detaches the pinned link (explicitly, so that any other holder of
// a link fd cannot keep the program attached) and deletes the pod's directory.
func removePins(podUID string) error {
	dir := pinDir(podUID)
	var errs []error
	if l, err := link.LoadPinnedLink(filepath.Join(dir, pinLink), nil); err == nil {
		if err := l.Detach(); err != nil && !errors.Is(err, ebpf.ErrNotSupported) {
			errs = append(errs, fmt.Errorf("redirect: detach link: %w", err))
		}
		l.Close()
	} else if !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("redirect: open pinned link: %w", err))
	}
	// Unlinking a pin drops the kernel object once nothing else holds it.
	if err := os.RemoveAll(dir); err != nil {
		errs = append(errs, fmt.Errorf("redirect: remove pins: %w", err))
	}
	return errors.Join(errs...)
}

// pins is an open, complete attachment.
type pins struct {
	podUID   string
	link     link.Link
	info     *link.Info
	netnsIno uint64
	sockets  *ebpf.Map
	podAddrs *ebpf.Map
}

func (p *pins) close() {
	if p.link != nil {
		p.link.Close()
	}
	if p.sockets != nil {
		p.sockets.Close()
	}
	if p.podAddrs != nil {
		p.podAddrs.Close()
	}
	*p = pins{podUID: p.podUID}
}

// openPins opens the pod's pins; ErrNotAttached when there are none.
func openPins(podUID string) (_ *pins, err error) {
	dir := pinDir(podUID)
	if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("%w: pod %s", ErrNotAttached, podUID)
	}
	p := &pins{podUID: podUID}
	defer func() {
		if err != nil {
			p.close()
		}
	}()
	if p.link, err = link.LoadPinnedLink(filepath.Join(dir, pinLink), nil); err != nil {
		return nil, fmt.Errorf("redirect: open pinned link: %w", err)
	}
	if p.info, err = p.link.Info(); err != nil {
		return nil, fmt.Errorf("redirect: link info: %w", err)
	}
	ni := p.info.NetNs()
	if ni == nil {
		return nil, fmt.Errorf("redirect: pinned link %d is not a netns link", p.info.ID)
	}
	p.netnsIno = uint64(ni.NetnsInode) // 0 once the netns is gone
	if p.sockets, err = ebpf.LoadPinnedMap(SocketMapPath(podUID), nil); err != nil {
		return nil, fmt.Errorf("redirect: open pinned sockets map: %w", err)
	}
	if p.podAddrs, err = ebpf.LoadPinnedMap(filepath.Join(dir, pinPodAddrs), nil); err != nil {
		return nil, fmt.Errorf("redirect: open pinned pod_addrs map: %w", err)
	}
	return p, nil
}

// update sets the addresses and, if the attached program is not the embedded
// one (an upgrade), swaps the embedded one in within the same link, keeping the
// maps and so ztunnel's sockets.
func (p *pins) update(keys []redirectPodAddr) error {
	if err := syncAddrs(p.podAddrs, keys); err != nil {
		return err
	}
	attached, err := ebpf.NewProgramFromID(p.info.Program)
	if err != nil {
		return fmt.Errorf("redirect: open attached program: %w", err)
	}
	defer attached.Close()
	// The kernel's tag covers the instructions as loaded, which is not what
	// the ELF holds; so load ours over the same maps and compare like with
	// like.
	var objs redirectObjects
	err = load(&objs, map[string]*ebpf.Map{
		redirectMapSockets:  p.sockets,
		redirectMapPodAddrs: p.podAddrs,
	})
	if err != nil {
		return err
	}
	defer objs.Close()
	same, err := sameTag(attached, objs.AmbientRedirect)
	if err != nil || same {
		return err
	}
	if err := p.link.Update(objs.AmbientRedirect); err != nil {
		return fmt.Errorf("redirect: replace program: %w", err)
	}
	return nil
}

func sameTag(a, b *ebpf.Program) (bool, error) {
	ai, err := a.Info()
	if err != nil {
		return false, fmt.Errorf("redirect: program info: %w", err)
	}
	bi, err := b.Info()
	if err != nil {
		return false, fmt.Errorf("redirect: program info: %w", err)
	}
	return ai.Tag == bi.Tag, nil
}

// addrKeys turns addresses into pod_addrs keys (IPv4 as IPv4-mapped IPv6).
func addrKeys(ips []netip.Addr) ([]redirectPodAddr, error) {
	if len(ips) == 0 {
		return nil, errors.New("redirect: no pod addresses")
	}
	keys := make([]redirectPodAddr, 0, len(ips))
	for _, ip := range ips {
		if !ip.IsValid() || ip.Zone() != "" || ip.IsUnspecified() {
			return nil, fmt.Errorf("redirect: invalid pod address %q", ip)
		}
		keys = append(keys, redirectPodAddr{Addr: ip.Unmap().As16()})
	}
	return keys, nil
}

// syncAddrs makes the map hold exactly keys.
func syncAddrs(m *ebpf.Map, keys []redirectPodAddr) error {
	want := make(map[[16]byte]bool, len(keys))
	for _, k := range keys {
		want[k.Addr] = true
		if err := m.Put(k, uint8(1)); err != nil {
			return fmt.Errorf("redirect: set pod address: %w", err)
		}
	}
	var stale []redirectPodAddr
	var k redirectPodAddr
	var v uint8
	it := m.Iterate()
	for it.Next(&k, &v) {
		if !want[k.Addr] {
			stale = append(stale, k)
		}
	}
	if err := it.Err(); err != nil {
		return fmt.Errorf("redirect: read pod addresses: %w", err)
	}
	for _, k := range stale {
		if err := m.Delete(k); err != nil && !errors.Is(err, ebpf.ErrKeyNotExist) {
			return fmt.Errorf("redirect: remove pod address: %w", err)
		}
	}
	return nil
}

// ensureBPFFS mounts bpffs at BPFFSRoot unless one is mounted there already.
func ensureBPFFS() error {
	var st unix.Statfs_t
	if err := unix.Statfs(BPFFSRoot, &st); err == nil && st.Type == unix.BPF_FS_MAGIC {
		return nil
	}
	if err := os.MkdirAll(BPFFSRoot, 0o755); err != nil {
		return fmt.Errorf("redirect: %w", err)
	}
	if err := unix.Mount("bpffs", BPFFSRoot, "bpf", 0, "mode=0700"); err != nil {
		return fmt.Errorf("redirect: mount bpffs at %s: %w", BPFFSRoot, err)
	}
	return nil
}
