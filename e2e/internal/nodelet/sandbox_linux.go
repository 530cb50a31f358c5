package nodelet

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	cnitypes "github.com/containernetworking/cni/pkg/types"
	types100 "github.com/containernetworking/cni/pkg/types/100"
	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// podIfName is the interface name the CNI chain creates in every pod.
const podIfName = "eth0"

// errNoCNIConfig is returned when the CNI config dir holds no network config
// (the node's CNI is not installed yet).
var errNoCNIConfig = errors.New("no network config found in the CNI config dir")

// network runs the node's CNI chain for pod sandboxes, as containerd's CRI
// plugin does: the first network config in the config dir in lexical order,
// ContainerID = pod UID, IfName eth0 and the K8S_* CNI_ARGS.
type network struct {
	confDir  string
	cni      *libcni.CNIConfig
	cacheDir string
}

func newNetwork(confDir, binDir, cacheDir, helper string, runMounts func() ([]nsexec.Mount, error)) *network {
	var exec invoke.Exec
	if runMounts != nil {
		exec = &pluginExec{DefaultExec: &invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}}, mounts: runMounts, helper: helper}
	}
	return &network{
		confDir:  confDir,
		cacheDir: cacheDir,
		cni:      libcni.NewCNIConfigWithCacheDir([]string{binDir}, cacheDir, exec),
	}
}

// podRef names a pod for the CNI_ARGS.
type podRef struct {
	Namespace, Name, UID string
}

func (p podRef) runtimeConf(netnsPath string) *libcni.RuntimeConf {
	return &libcni.RuntimeConf{
		ContainerID: p.UID,
		NetNS:       netnsPath,
		IfName:      podIfName,
		// Exactly containerd's order.
		Args: [][2]string{
			{"IgnoreUnknown", "1"},
			{"K8S_POD_NAMESPACE", p.Namespace},
			{"K8S_POD_NAME", p.Name},
			{"K8S_POD_INFRA_CONTAINER_ID", p.UID},
			{"K8S_POD_UID", p.UID},
		},
	}
}

// loadConfig reads the first network config in the config dir, in lexical
// order; a single-plugin .conf is wrapped into a list as containerd does.
func (n *network) loadConfig() (*libcni.NetworkConfigList, error) {
	files, err := libcni.ConfFiles(n.confDir, []string{".conf", ".conflist", ".json"})
	if err != nil {
		return nil, fmt.Errorf("listing %s: %w", n.confDir, err)
	}
	sort.Strings(files)
	var errs []error
	for _, f := range files {
		var list *libcni.NetworkConfigList
		if strings.HasSuffix(f, ".conflist") {
			list, err = libcni.NetworkConfFromFile(f)
		} else {
			var conf *libcni.PluginConfig
			conf, err = libcni.ConfFromFile(f)
			if err == nil {
				list, err = libcni.ConfListFromConf(conf)
			}
		}
		if err != nil {
			// containerd skips invalid files and takes the next one.
			errs = append(errs, fmt.Errorf("%s: %w", f, err))
			continue
		}
		if len(list.Plugins) == 0 {
			continue
		}
		return list, nil
	}
	return nil, errors.Join(append([]error{fmt.Errorf("%s: %w", n.confDir, errNoCNIConfig)}, errs...)...)
}

// add attaches the pod's netns to the network and returns its IPs, IPv4 first.
// When ADD fails, DEL is run so no plugin leaves half an attachment behind.
func (n *network) add(ctx context.Context, pod podRef, netnsPath string) (ips []string, err error) {
	list, err := n.loadConfig()
	if err != nil {
		return nil, err
	}
	rt := pod.runtimeConf(netnsPath)
	res, err := n.cni.AddNetworkList(ctx, list, rt)
	if err != nil {
		delErr := n.delList(context.WithoutCancel(ctx), list, rt)
		if delErr != nil {
			delErr = fmt.Errorf("cleaning up after a failed add: %w", delErr)
		}
		return nil, errors.Join(fmt.Errorf("cni add (network %s): %w", list.Name, err), delErr)
	}
	ips, err = resultIPs(res)
	if err != nil {
		n.delList(context.WithoutCancel(ctx), list, rt)
		return nil, fmt.Errorf("cni add (network %s): %w", list.Name, err)
	}
	return ips, nil
}

// del detaches the pod from the network. It uses the current config when
// there is one (as containerd does) and the config cached at ADD otherwise; a
// pod with neither has nothing to undo.
func (n *network) del(ctx context.Context, pod podRef, netnsPath string) error {
	rt := pod.runtimeConf(netnsPath)
	list, err := n.loadConfig()
	if err != nil {
		list, rt, err = n.cachedConfig(pod)
		if err != nil {
			return err
		}
		if list == nil {
			return nil
		}
		rt.NetNS = netnsPath
	}
	if err := n.delList(ctx, list, rt); err != nil {
		return err
	}
	// A DEL with a different network than the ADD leaves the ADD's cache.
	n.removeCache(pod)
	return nil
}

// delList runs DEL through the chain. libcni stops at the first plugin
// whose DEL fails, which would leave the plugins before it (the bridge and
// its IPAM, typically) holding the pod; so when the chain fails, every
// plugin gets its own DEL, in reverse order, whatever the others answer.
func (n *network) delList(ctx context.Context, list *libcni.NetworkConfigList, rt *libcni.RuntimeConf) error {
	err := n.cni.DelNetworkList(ctx, list, rt)
	if err == nil {
		return nil
	}
	errs := []error{fmt.Errorf("cni del (network %s): %w", list.Name, err)}
	for i := len(list.Plugins) - 1; i >= 0; i-- {
		conf, injErr := libcni.InjectConf(list.Plugins[i], map[string]any{"name": list.Name, "cniVersion": list.CNIVersion})
		if injErr != nil {
			errs = append(errs, injErr)
			continue
		}
		if delErr := n.cni.DelNetwork(ctx, conf, rt); delErr != nil {
			errs = append(errs, fmt.Errorf("cni del of plugin %s: %w", list.Plugins[i].Network.Type, delErr))
		}
	}
	return errors.Join(errs...)
}

// cachedConfig finds the network config libcni cached when it added the pod.
func (n *network) cachedConfig(pod podRef) (*libcni.NetworkConfigList, *libcni.RuntimeConf, error) {
	netName := n.cachedNetwork(pod.UID)
	if netName == "" {
		return nil, nil, nil
	}
	raw, rt, err := n.cni.GetNetworkListCachedConfig(&libcni.NetworkConfigList{Name: netName}, pod.runtimeConf(""))
	if err != nil {
		return nil, nil, fmt.Errorf("reading cached cni config: %w", err)
	}
	if raw == nil {
		return nil, nil, nil
	}
	list, err := libcni.NetworkConfFromBytes(raw)
	if err != nil {
		return nil, nil, fmt.Errorf("parsing cached cni config: %w", err)
	}
	return list, rt, nil
}

// cachedNetwork returns the name of the network libcni's cache says the pod
// was added to, or "".
func (n *network) cachedNetwork(uid string) string {
	suffix := "-" + uid + "-" + podIfName
	entries, _ := os.ReadDir(filepath.Join(n.cacheDir, "results"))
	for _, e := range entries {
		if name, ok := strings.CutSuffix(e.Name(), suffix); ok {
			return name
		}
	}
	return ""
}

func (n *network) removeCache(pod podRef) {
	suffix := "-" + pod.UID + "-" + podIfName
	entries, _ := os.ReadDir(filepath.Join(n.cacheDir, "results"))
	for _, e := range entries {
		if strings.HasSuffix(e.Name(), suffix) {
			os.Remove(filepath.Join(n.cacheDir, "results", e.Name()))
		}
	}
}

// resultIPs takes the pod's addresses from a CNI result: those on the pod's
// eth0 when the result says which interface an IP is on, otherwise all.
func resultIPs(res cnitypes.Result) ([]string, error) {
	r, err := types100.NewResultFromResult(res)
	if err != nil {
		return nil, fmt.Errorf("converting cni result: %w", err)
	}
	var onPod, all []string
	for _, ip := range r.IPs {
		s := ip.Address.IP.String()
		all = append(all, s)
		if ip.Interface != nil && *ip.Interface >= 0 && *ip.Interface < len(r.Interfaces) {
			iface := r.Interfaces[*ip.Interface]
			if iface.Sandbox != "" && iface.Name == podIfName {
				onPod = append(onPod, s)
			}
		}
	}
	ips := onPod
	if len(ips) == 0 {
		ips = all
	}
	if len(ips) == 0 {
		raw, _ := json.Marshal(r)
		return nil, fmt.Errorf("result has no IP addresses: %s", raw)
	}
	return sortIPs(ips), nil
}

// createNetNS makes a new network namespace and bind-mounts it at path, as
// `ip netns add` does, then brings its loopback up. The namespace switch
// happens on a dedicated locked thread; if that thread cannot switch back it
// is never unlocked, so the Go runtime retires it.
func createNetNS(path string) (err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return fmt.Errorf("creating netns dir: %w", err)
	}
	f, err := os.OpenFile(path, os.O_RDONLY|os.O_CREATE|os.O_EXCL, 0o444)
	if err != nil {
		return fmt.Errorf("creating netns file: %w", err)
	}
	f.Close()
	defer func() {
		if err != nil {
			removeNetNS(path)
		}
	}()

	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("opening current netns: %w", err)
			return
		}
		defer unix.Close(orig)
		if err := unix.Unshare(unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("unsharing netns: %w", err)
			return
		}
		mountErr := unix.Mount("/proc/thread-self/ns/net", path, "none", unix.MS_BIND, "")
		if err := unix.Setns(orig, unix.CLONE_NEWNET); err != nil {
			// Leave the thread locked: it dies with the goroutine.
			errc <- errors.Join(mountErr, fmt.Errorf("returning to the node netns: %w", err))
			return
		}
		runtime.UnlockOSThread()
		if mountErr != nil {
			mountErr = fmt.Errorf("bind-mounting netns: %w", mountErr)
		}
		errc <- mountErr
	}()
	if err := <-errc; err != nil {
		return err
	}
	return ns.WithNetNSPath(path, func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return fmt.Errorf("finding lo: %w", err)
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return fmt.Errorf("bringing lo up: %w", err)
		}
		return nil
	})
}

// removeNetNS unmounts and removes a namespace created by createNetNS; a path
// that is not there, or not mounted, is fine.
func removeNetNS(path string) error {
	if err := unix.Unmount(path, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting netns %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("removing netns %s: %w", path, err)
	}
	return nil
}

// shareDir makes dir a shared mount point (binding it onto itself first if
// it is not a mount point yet), as iproute2 does for /run/netns. Namespaces
// mounted below it later then propagate into mount namespaces that were
// copied from ours with slave propagation, such as a hostPath volume with
// mountPropagation HostToContainer.
func shareDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("creating %s: %w", dir, err)
	}
	err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("making %s shared: %w", dir, err)
	}
	if err := unix.Mount(dir, dir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("binding %s onto itself: %w", dir, err)
	}
	if err := unix.Mount("", dir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("making %s shared: %w", dir, err)
	}
	return nil
}

// unshareDir undoes shareDir's self bind mount so the node root can be removed.
func unshareDir(dir string) error {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil &&
		!errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("unmounting %s: %w", dir, err)
	}
	return nil
}
