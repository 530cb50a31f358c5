package nodelet

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

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/crilog"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// processSpec is everything needed to start one container process.
type processSpec struct {
	NS      nsexec.Spec
	Env     []string
	Dir     string
	LogPath string
	// Record is written to the pid record so a later nodelet can tell what
	// it finds.
	Record string
}

// process is one running container process. done is closed after the exit
// fields are set.
type process struct {
	pid       int
	startedAt time.Time
	done      chan struct{}

	// Set before done is closed; read only after.
	exitCode   int32
	signal     syscall.Signal
	finishedAt time.Time
	waitErr    error
}

// pidRecords keeps one file per running container process under dir, named
// by pid and holding the process start time, so that a nodelet that crashed
// can kill what it left behind without hitting a reused pid.
type pidRecords struct{ dir string }

func (r pidRecords) add(pid int, what string) error {
	start, err := procStartTime(pid)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(r.dir, 0o755); err != nil {
		return fmt.Errorf("creating pid record dir: %w", err)
	}
	return os.WriteFile(filepath.Join(r.dir, strconv.Itoa(pid)), []byte(start+" "+what+"\n"), 0o644)
}

func (r pidRecords) remove(pid int) {
	os.Remove(filepath.Join(r.dir, strconv.Itoa(pid)))
}

// killLeftovers SIGKILLs the process group of every recorded process that is
// still the one recorded, and forgets all records. It returns how many it
// killed.
func (r pidRecords) killLeftovers() (int, error) {
	entries, err := os.ReadDir(r.dir)
	if errors.Is(err, os.ErrNotExist) {
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("reading pid records: %w", err)
	}
	killed := 0
	for _, e := range entries {
		path := filepath.Join(r.dir, e.Name())
		pid, err := strconv.Atoi(e.Name())
		raw, _ := os.ReadFile(path)
		os.Remove(path)
		if err != nil || pid <= 1 {
			continue
		}
		recorded, _, _ := strings.Cut(strings.TrimSpace(string(raw)), " ")
		if now, err := procStartTime(pid); err != nil || now != recorded {
			continue
		}
		// Container processes lead their own process group.
		syscall.Kill(-pid, syscall.SIGKILL)
		syscall.Kill(pid, syscall.SIGKILL)
		killed++
	}
	return killed, nil
}

// procStartTime returns field 22 of /proc/<pid>/stat, the process start time
// in clock ticks since boot.
func procStartTime(pid int) (string, error) {
	raw, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return "", fmt.Errorf("reading process %d stat: %w", pid, err)
	}
	// The command name (field 2) is in parentheses and may contain spaces.
	i := bytes.LastIndexByte(raw, ')')
	if i < 0 {
		return "", fmt.Errorf("parsing process %d stat", pid)
	}
	fields := strings.Fields(string(raw[i+1:]))
	// fields[0] is field 3 (state); field 22 is fields[19].
	if len(fields) < 20 {
		return "", fmt.Errorf("parsing process %d stat", pid)
	}
	return fields[19], nil
}

// startProcess starts a container process: through nsexec into the pod's
// namespaces, in its own process group, killed if nodelet dies, with stdout
// and stderr written as CRI log records to one file.
func startProcess(spec processSpec, records pidRecords) (*process, error) {
	if err := os.MkdirAll(filepath.Dir(spec.LogPath), 0o755); err != nil {
		return nil, fmt.Errorf("creating log dir: %w", err)
	}
	logf, err := os.OpenFile(spec.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o640)
	if err != nil {
		return nil, fmt.Errorf("opening container log: %w", err)
	}
	cmd, err := nsexec.Command(spec.NS)
	if err != nil {
		logf.Close()
		return nil, err
	}
	nsexec.SetEnv(cmd, spec.Env)
	cmd.Dir = spec.Dir
	stdout := crilog.NewWriter(logf, crilog.Stdout)
	stderr := crilog.NewWriter(logf, crilog.Stderr)
	cmd.Stdout, cmd.Stderr = stdout, stderr
	// Children that keep the pipes open must not keep Wait from returning.
	cmd.WaitDelay = time.Second
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	closeLogs := func() {
		stdout.Close()
		stderr.Close()
		logf.Close()
	}
	if err := cmd.Start(); err != nil {
		closeLogs()
		return nil, fmt.Errorf("starting %s: %w", spec.NS.Argv[0], err)
	}
	p := &process{pid: cmd.Process.Pid, startedAt: time.Now(), done: make(chan struct{})}
	if err := records.add(p.pid, spec.Record); err != nil {
		// Not fatal: only crash recovery needs the record.
		fmt.Fprintf(os.Stderr, "nodelet: recording pid %d: %v\n", p.pid, err)
	}
	go func() {
		err := cmd.Wait()
		// As when a container's init dies: nothing else of it survives.
		syscall.Kill(-p.pid, syscall.SIGKILL)
		closeLogs()
		records.remove(p.pid)
		p.finishedAt = time.Now()
		p.exitCode, p.signal = exitStatus(cmd.ProcessState, err)
		var exitErr *exec.ExitError
		if err != nil && !errors.As(err, &exitErr) && !errors.Is(err, exec.ErrWaitDelay) {
			p.waitErr = err
		}
		close(p.done)
	}()
	return p, nil
}

// exitStatus turns a wait result into a container exit code; death by a
// signal is 128+signal, as runtimes report it.
func exitStatus(ps *os.ProcessState, err error) (int32, syscall.Signal) {
	if ps == nil {
		return 128, 0
	}
	if ws, ok := ps.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
		return 128 + int32(ws.Signal()), ws.Signal()
	}
	return int32(ps.ExitCode()), 0
}

// signalGroup sends sig to the process group the container leads, and to
// the process itself in case it left the group.
func (p *process) signalGroup(sig syscall.Signal) {
	syscall.Kill(-p.pid, sig)
	syscall.Kill(p.pid, sig)
}

// stop asks the process to exit (SIGTERM), waits up to grace, then kills
// the whole group. It returns when the process is gone or after a further
// few seconds.
func (p *process) stop(grace time.Duration) {
	select {
	case <-p.done:
		return
	default:
	}
	if grace > 0 {
		p.signalGroup(syscall.SIGTERM)
		t := time.NewTimer(grace)
		select {
		case <-p.done:
			t.Stop()
			// The group may still hold children of the main process.
			syscall.Kill(-p.pid, syscall.SIGKILL)
			return
		case <-t.C:
		}
	}
	p.signalGroup(syscall.SIGKILL)
	select {
	case <-p.done:
	case <-time.After(5 * time.Second):
	}
}

// exited reports whether the process has exited.
func (p *process) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}
