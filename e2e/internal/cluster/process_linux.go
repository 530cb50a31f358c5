package cluster

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// markerEnv is set on every process the launcher starts, with the cluster dir
// as value, so Down finds them again without trusting pid files.
const markerEnv = "AMBIENT_LOCALCLUSTER_OWNER"

// roleEnv names the part a process plays (etcd, kube-apiserver, nodelet-node1, ...).
const roleEnv = "AMBIENT_CLUSTER_ROLE"

// proc is a control plane or node process to start detached.
type proc struct {
	role  string
	argv  []string
	netns string // named netns to run in; empty = root namespace
	env   []string
}

// start launches p in its own session with output to logs/<role>.log, so it
// outlives the launcher. It returns the pid.
func (c *Config) start(p proc) (int, error) {
	logPath := c.path("logs", p.role+".log")
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return 0, err
	}
	defer logf.Close()
	env := append(os.Environ(), p.env...)
	// kube-proxy runs nft, nodelet nsenter: make sure sbin is searched.
	env = append(env, "PATH="+os.Getenv("PATH")+":/usr/local/sbin:/usr/sbin:/sbin",
		markerEnv+"="+c.Dir, roleEnv+"="+p.role)
	var cmd *exec.Cmd
	if p.netns != "" {
		cmd, err = nsexec.Command(nsexec.Spec{NetNS: filepath.Join(netnsDir, p.netns), Argv: p.argv})
		if err != nil {
			return 0, err
		}
		nsexec.SetEnv(cmd, env)
	} else {
		cmd = exec.Command(p.argv[0], p.argv[1:]...)
		cmd.Env = env
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Dir = c.Dir
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		return 0, fmt.Errorf("starting %s: %w", p.role, err)
	}
	pid := cmd.Process.Pid
	// Reap it if it dies while we are still running; afterwards init does.
	go cmd.Wait()
	c.logf("started %s (pid %d), log %s", p.role, pid, logPath)
	return pid, nil
}

// clusterProcesses returns pid -> role of every live process started for the
// cluster in dir.
func clusterProcesses(dir string) map[int]string {
	out := map[int]string{}
	entries, _ := os.ReadDir("/proc")
	want := []byte(markerEnv + "=" + dir + "\x00")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		env, err := os.ReadFile(filepath.Join("/proc", e.Name(), "environ"))
		if err != nil || !bytes.Contains(env, want) {
			continue
		}
		role := "unknown"
		for _, kv := range bytes.Split(env, []byte{0}) {
			if v, ok := strings.CutPrefix(string(kv), roleEnv+"="); ok {
				role = v
			}
		}
		out[pid] = role
	}
	return out
}

// processesInNetNS returns the pids of processes whose network namespace is one
// of the given nsfs inodes.
func processesInNetNS(inodes map[uint64]bool) []int {
	var pids []int
	entries, _ := os.ReadDir("/proc")
	for _, e := range entries {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		var st syscall.Stat_t
		if syscall.Stat(filepath.Join("/proc", e.Name(), "ns", "net"), &st) != nil {
			continue
		}
		if inodes[st.Ino] {
			pids = append(pids, pid)
		}
	}
	return pids
}

// stopAll signals pids with SIGTERM and, after grace, SIGKILL; it returns once
// all are gone or the kill had no effect for a few seconds more.
func stopAll(pids []int, grace time.Duration) error {
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGTERM)
	}
	if waitGone(pids, grace) {
		return nil
	}
	for _, pid := range pids {
		syscall.Kill(pid, syscall.SIGKILL)
	}
	if waitGone(pids, 5*time.Second) {
		return nil
	}
	var alive []string
	for _, pid := range pids {
		if syscall.Kill(pid, 0) == nil {
			alive = append(alive, strconv.Itoa(pid))
		}
	}
	return fmt.Errorf("processes still alive after SIGKILL: %s", strings.Join(alive, ","))
}

func waitGone(pids []int, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for {
		gone := true
		for _, pid := range pids {
			if err := syscall.Kill(pid, 0); !errors.Is(err, syscall.ESRCH) {
				// A zombie still answers kill(0); treat it as gone.
				if !isZombie(pid) {
					gone = false
				}
			}
		}
		if gone {
			return true
		}
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func isZombie(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return true
	}
	// Field 3 follows the parenthesised command name.
	i := bytes.LastIndexByte(b, ')')
	return i > 0 && len(b) > i+2 && b[i+2] == 'Z'
}
