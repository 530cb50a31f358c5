package volume

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// hostShared are the host paths every node shares: kernel interfaces that
// cannot be faked per node.
var hostShared = []string{"/proc", "/sys", "/dev", "/lib/modules"}

// HostPath maps a hostPath volume's path to the real path on this machine:
// /proc, /sys, /dev and /lib/modules (and what is below them) are the real
// ones, every other path lives under nodeRoot so nodes sharing one machine do
// not share, say, /etc/cni/net.d.
func HostPath(nodeRoot, path string) string {
	clean := filepath.Clean("/" + path)
	for _, p := range hostShared {
		if clean == p || strings.HasPrefix(clean, p+"/") {
			return clean
		}
	}
	return filepath.Join(nodeRoot, clean)
}

// checkHostPath applies a hostPath volume's type: it creates a missing
// DirectoryOrCreate or FileOrCreate path and checks the others.
func checkHostPath(path string, t *corev1.HostPathType) error {
	typ := corev1.HostPathUnset
	if t != nil {
		typ = *t
	}
	info, err := os.Stat(path)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("checking hostPath %s: %w", path, err)
	}
	exists := err == nil
	switch typ {
	case corev1.HostPathUnset:
		return nil
	case corev1.HostPathDirectoryOrCreate:
		if !exists {
			if err := os.MkdirAll(path, 0o755); err != nil {
				return fmt.Errorf("creating hostPath %s: %w", path, err)
			}
			return nil
		}
		return want(path, info, info.IsDir(), "a directory")
	case corev1.HostPathFileOrCreate:
		if !exists {
			if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
				return fmt.Errorf("creating parent of hostPath %s: %w", path, err)
			}
			f, err := os.OpenFile(path, os.O_CREATE|os.O_RDONLY, 0o644)
			if err != nil {
				return fmt.Errorf("creating hostPath %s: %w", path, err)
			}
			return f.Close()
		}
		return want(path, info, info.Mode().IsRegular(), "a file")
	}
	if !exists {
		return fmt.Errorf("hostPath %s (type %s) does not exist", path, typ)
	}
	switch typ {
	case corev1.HostPathDirectory:
		return want(path, info, info.IsDir(), "a directory")
	case corev1.HostPathFile:
		return want(path, info, info.Mode().IsRegular(), "a file")
	case corev1.HostPathSocket:
		return want(path, info, info.Mode()&fs.ModeSocket != 0, "a socket")
	case corev1.HostPathCharDev:
		return want(path, info, info.Mode()&fs.ModeCharDevice != 0, "a character device")
	case corev1.HostPathBlockDev:
		return want(path, info, info.Mode()&fs.ModeDevice != 0 && info.Mode()&fs.ModeCharDevice == 0, "a block device")
	}
	return fmt.Errorf("unknown hostPath type %q", typ)
}

func want(path string, info fs.FileInfo, ok bool, what string) error {
	if ok {
		return nil
	}
	return fmt.Errorf("hostPath %s is not %s (mode %s)", path, what, info.Mode())
}

// NodeRunMounts returns bind mounts that give a host process the node's view
// of /var/run: each directory hostPath volumes made under NodeRoot/var/run
// (the CNI agent's socket dir, say) mounted at its /var/run path. nodelet runs
// the node's CNI plugins with them, so a path a DaemonSet pod wrote into the
// CNI config means the same to the plugin as on a real node. The pod netns
// dir is left out: plugins get CNI_NETNS explicitly.
func (m *Manager) NodeRunMounts() ([]nsexec.Mount, error) {
	entries, err := os.ReadDir(filepath.Join(m.NodeRoot, "var", "run"))
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("reading the node's /var/run: %w", err)
	}
	var mounts []nsexec.Mount
	for _, e := range entries {
		if !e.IsDir() || e.Name() == "netns" {
			continue
		}
		target := filepath.Join("/var/run", e.Name())
		created, err := ensureTarget(target, true)
		if rerr := m.record(created); rerr != nil {
			return nil, rerr
		}
		if err != nil {
			return nil, fmt.Errorf("preparing %s: %w", target, err)
		}
		mounts = append(mounts, nsexec.Mount{Source: filepath.Join(m.NodeRoot, "var", "run", e.Name()), Target: target})
	}
	return mounts, nil
}
