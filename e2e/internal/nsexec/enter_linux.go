package nsexec

import (
	"bufio"
	"fmt"
	"os"
	"sort"
	"strconv"
	"strings"
)

// EnterArgv returns the command line that runs argv inside the running
// container whose main process is pid: util-linux nsenter joins its mount,
// network and UTS namespaces (and, with workdir, its working directory), and
// setpriv gives the command the container's capability bounding set, so
// `kubectl exec` into an unprivileged container is no more privileged than
// the container itself. (Joining an existing mount namespace cannot be done
// from a multi-threaded Go process, hence the util-linux helpers.)
func EnterArgv(pid int, workdir bool, argv []string) ([]string, error) {
	out := []string{"nsenter", "--target", strconv.Itoa(pid), "--mount", "--net", "--uts"}
	if workdir {
		out = append(out, "--wd")
	}
	out = append(out, "--")
	bnd, err := boundingSet(pid)
	if err != nil {
		return nil, err
	}
	own, err := boundingSet(os.Getpid())
	if err != nil {
		return nil, err
	}
	if names, limited := boundingSetNames(bnd, own); limited {
		out = append(out, "setpriv", "--bounding-set", names, "--")
	}
	return append(out, argv...), nil
}

// boundingSet reads the CapBnd mask of pid.
func boundingSet(pid int) (uint64, error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, fmt.Errorf("reading capabilities of pid %d: %w", pid, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "CapBnd:"); ok {
			return strconv.ParseUint(strings.TrimSpace(v), 16, 64)
		}
	}
	return 0, fmt.Errorf("no CapBnd line for pid %d", pid)
}

// boundingSetNames renders mask in setpriv's syntax ("-all,+net_raw,...") and
// says whether it lacks any capability of own, the caller's set.
func boundingSetNames(mask, own uint64) (string, bool) {
	if mask&own == own {
		return "", false
	}
	var keep []string
	for name, c := range capabilityByName {
		if mask&(1<<c) != 0 {
			keep = append(keep, "+"+strings.ToLower(name))
		}
	}
	sort.Strings(keep)
	return strings.Join(append([]string{"-all"}, keep...), ","), true
}
