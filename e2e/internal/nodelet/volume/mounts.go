package volume

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/podenv"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// createdMountpoints, under the node root, lists the mount targets nodelet
// created on the host, one absolute path a line, for `cluster down` to rmdir.
const createdMountpoints = "created-mountpoints"

// Mounts returns the bind mounts for ctr's volumeMounts, parents before the
// mounts nested in them. Setup must have run. Because containers see the host
// filesystem, each target must exist on the host before nsexec mounts on it:
// missing targets are created (a directory, or an empty file for a file
// source) and recorded in NodeRoot/created-mountpoints. A target nested in an
// earlier mount's target is created inside that mount's source instead, which
// is where the container will look for it.
func (m *Manager) Mounts(pod *corev1.Pod, ctr *corev1.Container) ([]nsexec.Mount, error) {
	vols := make(map[string]*corev1.Volume, len(pod.Spec.Volumes))
	for i := range pod.Spec.Volumes {
		vols[pod.Spec.Volumes[i].Name] = &pod.Spec.Volumes[i]
	}
	type planned struct {
		mount nsexec.Mount
		dir   bool
	}
	var env []string
	plan := make([]planned, 0, len(ctr.VolumeMounts))
	for _, vm := range ctr.VolumeMounts {
		v, ok := vols[vm.Name]
		if !ok {
			return nil, fmt.Errorf("volumeMount %s: no volume %q in pod", vm.MountPath, vm.Name)
		}
		if !filepath.IsAbs(vm.MountPath) {
			return nil, fmt.Errorf("volumeMount %q: mountPath %q is not absolute", vm.Name, vm.MountPath)
		}
		sub := vm.SubPath
		if vm.SubPathExpr != "" {
			if env == nil {
				env = subPathEnv(pod, ctr)
			}
			sub = podenv.Expand([]string{vm.SubPathExpr}, env)[0]
		}
		src, err := m.source(pod, v, sub)
		if err != nil {
			return nil, fmt.Errorf("volumeMount %q at %s: %w", vm.Name, vm.MountPath, err)
		}
		info, err := os.Stat(src)
		if err != nil {
			return nil, fmt.Errorf("volumeMount %q at %s: %w", vm.Name, vm.MountPath, err)
		}
		plan = append(plan, planned{
			mount: nsexec.Mount{Source: src, Target: filepath.Clean(vm.MountPath), ReadOnly: vm.ReadOnly || isWritten(v)},
			dir:   info.IsDir(),
		})
	}
	sort.SliceStable(plan, func(i, j int) bool { return depth(plan[i].mount.Target) < depth(plan[j].mount.Target) })

	var created []string
	mounts := make([]nsexec.Mount, 0, len(plan))
	for i, p := range plan {
		hostTarget := p.mount.Target
		for j := i - 1; j >= 0; j-- {
			parent := plan[j].mount
			if rel, ok := under(parent.Target, p.mount.Target); ok && plan[j].dir {
				hostTarget = filepath.Join(parent.Source, rel)
				break
			}
		}
		made, err := ensureTarget(hostTarget, p.dir)
		for _, c := range made {
			if !within(m.PodsDir, c) {
				created = append(created, c)
			}
		}
		if err != nil {
			m.record(created)
			return nil, fmt.Errorf("mount target %s: %w", p.mount.Target, err)
		}
		mounts = append(mounts, p.mount)
	}
	if err := m.record(created); err != nil {
		return nil, err
	}
	return mounts, nil
}

// source returns the host path a mount of v (at subPath sub) binds.
func (m *Manager) source(pod *corev1.Pod, v *corev1.Volume, sub string) (string, error) {
	if sub != "" {
		if err := validateSubPath(sub); err != nil {
			return "", err
		}
	}
	switch {
	case v.HostPath != nil, v.EmptyDir != nil:
		var base string
		if v.HostPath != nil {
			// Like containerd, a missing hostPath of unchecked type is
			// created as a directory; typed ones were checked by Setup.
			base = HostPath(m.NodeRoot, v.HostPath.Path)
			if _, err := os.Stat(base); errors.Is(err, fs.ErrNotExist) {
				if err := os.MkdirAll(base, 0o755); err != nil {
					return "", fmt.Errorf("creating hostPath: %w", err)
				}
			}
		} else {
			base = m.Dir(pod.UID, v.Name)
			if _, err := os.Stat(base); err != nil {
				return "", fmt.Errorf("volume not set up: %w", err)
			}
		}
		if sub == "" {
			return base, nil
		}
		// Like the kubelet, a missing subPath of a writable volume is created.
		src := filepath.Join(base, sub)
		if _, err := os.Stat(src); errors.Is(err, fs.ErrNotExist) {
			if err := os.MkdirAll(src, 0o755); err != nil {
				return "", fmt.Errorf("creating subPath: %w", err)
			}
		}
		return src, nil
	case isWritten(v):
		base := m.Dir(pod.UID, v.Name)
		if _, err := os.Stat(filepath.Join(base, dataDirName)); err != nil {
			return "", fmt.Errorf("volume not set up: %w", err)
		}
		if sub == "" {
			return base, nil
		}
		// A subPath of a written volume binds the current version of the
		// file, as the kubelet does: later updates do not reach it.
		src, err := filepath.EvalSymlinks(filepath.Join(base, sub))
		if err != nil {
			return "", fmt.Errorf("resolving subPath: %w", err)
		}
		if !within(base, src) {
			return "", fmt.Errorf("subPath %q leaves the volume", sub)
		}
		return src, nil
	}
	return "", fmt.Errorf("%w %s", ErrUnsupported, volumeType(v))
}

func validateSubPath(sub string) error {
	if filepath.IsAbs(sub) {
		return fmt.Errorf("subPath %q is absolute", sub)
	}
	for _, el := range strings.Split(filepath.ToSlash(sub), "/") {
		if el == ".." {
			return fmt.Errorf("subPath %q contains '..'", sub)
		}
	}
	return nil
}

// subPathEnv is the environment subPathExpr expands against: the
// container's literal and downward API variables. ConfigMap and Secret
// variables are left out; Mounts makes no API calls.
func subPathEnv(pod *corev1.Pod, ctr *corev1.Container) []string {
	var p podenv.Params
	for _, ip := range pod.Status.PodIPs {
		p.PodIPs = append(p.PodIPs, ip.IP)
	}
	env := []string{}
	for _, ev := range ctr.Env {
		switch {
		case ev.Value != "":
			env = append(env, ev.Name+"="+podenv.Expand([]string{ev.Value}, env)[0])
		case ev.ValueFrom != nil && ev.ValueFrom.FieldRef != nil:
			if v, err := podenv.FieldRef(pod, ev.ValueFrom.FieldRef, p); err == nil {
				env = append(env, ev.Name+"="+v)
			}
		}
	}
	return env
}

func depth(p string) int { return strings.Count(filepath.Clean(p), "/") }

// under reports whether child is strictly below parent, and the relative path.
func under(parent, child string) (string, bool) {
	rel, err := filepath.Rel(parent, child)
	if err != nil || rel == "." || rel == ".." || strings.HasPrefix(rel, "../") {
		return "", false
	}
	return rel, true
}

// within reports whether p is dir or below it.
func within(dir, p string) bool {
	if dir == "" {
		return false
	}
	_, ok := under(filepath.Clean(dir), filepath.Clean(p))
	return ok || filepath.Clean(dir) == filepath.Clean(p)
}

// ensureTarget makes path exist as a directory (dir) or a file, returning
// each path it created, parents first. A path another process creates at
// the same moment counts as existing.
func ensureTarget(path string, dir bool) (created []string, err error) {
	if info, err := os.Stat(path); err == nil {
		if info.IsDir() != dir {
			return nil, fmt.Errorf("exists as %s but the volume is %s", kind(info.IsDir()), kind(dir))
		}
		return nil, nil
	}
	parts := strings.Split(strings.TrimPrefix(filepath.Clean(path), "/"), "/")
	cur := "/"
	for i, part := range parts {
		cur = filepath.Join(cur, part)
		if _, err := os.Stat(cur); err == nil {
			continue
		} else if !errors.Is(err, fs.ErrNotExist) {
			return created, err
		}
		last := i == len(parts)-1
		if last && !dir {
			f, err := os.OpenFile(cur, os.O_CREATE|os.O_EXCL|os.O_RDONLY, 0o644)
			if errors.Is(err, fs.ErrExist) {
				continue
			}
			if err != nil {
				return created, fmt.Errorf("creating file: %w", err)
			}
			f.Close()
		} else if err := os.Mkdir(cur, 0o755); errors.Is(err, fs.ErrExist) {
			continue
		} else if err != nil {
			return created, fmt.Errorf("creating directory: %w", err)
		}
		created = append(created, cur)
	}
	info, err := os.Stat(path)
	if err != nil {
		return created, err
	}
	if info.IsDir() != dir {
		return created, fmt.Errorf("exists as %s but the volume is %s", kind(info.IsDir()), kind(dir))
	}
	return created, nil
}

func kind(dir bool) string {
	if dir {
		return "a directory"
	}
	return "a file"
}

// record appends paths not yet listed to NodeRoot/created-mountpoints. The
// mutex orders callers in this process and flock those in other processes
// (one nodelet per node root, but `cluster down` may read while we write).
func (m *Manager) record(paths []string) error {
	if len(paths) == 0 {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := os.MkdirAll(m.NodeRoot, 0o755); err != nil {
		return fmt.Errorf("creating node root: %w", err)
	}
	f, err := os.OpenFile(filepath.Join(m.NodeRoot, createdMountpoints), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		return fmt.Errorf("opening %s: %w", createdMountpoints, err)
	}
	defer f.Close()
	if err := unix.Flock(int(f.Fd()), unix.LOCK_EX); err != nil {
		return fmt.Errorf("locking %s: %w", createdMountpoints, err)
	}
	defer unix.Flock(int(f.Fd()), unix.LOCK_UN)
	listed := map[string]bool{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		listed[sc.Text()] = true
	}
	if err := sc.Err(); err != nil {
		return fmt.Errorf("reading %s: %w", createdMountpoints, err)
	}
	var b strings.Builder
	for _, p := range paths {
		if !listed[p] {
			listed[p] = true
			b.WriteString(p + "\n")
		}
	}
	if b.Len() == 0 {
		return nil
	}
	if _, err := io.WriteString(f, b.String()); err != nil {
		return fmt.Errorf("appending to %s: %w", createdMountpoints, err)
	}
	return nil
}
