package nsexec

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

func TestMain(m *testing.M) {
	Init()
	os.Exit(m.Run())
}

// newNetNS creates a named network namespace holding only a down loopback and
// removes it at cleanup.
func newNetNS(t *testing.T) string {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	origin, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer origin.Close()
	name := fmt.Sprintf("nsexec-test-%d", os.Getpid())
	h, err := netns.NewNamed(name)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	if err := netns.Set(origin); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { netns.DeleteNamed(name) })
	return filepath.Join("/var/run/netns", name)
}

func run(t *testing.T, spec Spec) string {
	t.Helper()
	cmd, err := Command(spec)
	if err != nil {
		t.Fatal(err)
	}
	SetEnv(cmd, []string{"PATH=/usr/bin:/bin"})
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		t.Fatalf("%v: %v\n%s", spec.Argv, err, out.String())
	}
	return out.String()
}

func TestChildSeesOnlyTheJoinedNetworkNamespace(t *testing.T) {
	path := newNetNS(t)
	out := run(t, Spec{NetNS: path, Argv: []string{"cat", "/proc/net/dev"}})
	var links []string
	for _, l := range strings.Split(out, "\n")[2:] {
		if name, _, ok := strings.Cut(strings.TrimSpace(l), ":"); ok {
			links = append(links, name)
		}
	}
	if len(links) != 1 || links[0] != "lo" {
		t.Errorf("links in the joined netns = %v, want only lo", links)
	}
}

func TestBindMountsAreVisibleToTheChildOnly(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for mount namespaces")
	}
	src, target := t.TempDir(), t.TempDir()
	if err := os.WriteFile(filepath.Join(src, "token"), []byte("secret-ish"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := run(t, Spec{
		PrivateMounts: true,
		Mounts:        []Mount{{Source: src, Target: target, ReadOnly: true}},
		Argv:          []string{"sh", "-c", "cat " + target + "/token; echo; touch " + target + "/x 2>/dev/null && echo writable || echo read-only"},
	})
	if out != "secret-ish\nread-only\n" {
		t.Errorf("child saw %q, want the source's file on a read-only mount", out)
	}
	if _, err := os.Stat(filepath.Join(target, "token")); !os.IsNotExist(err) {
		t.Errorf("the mount leaked to the parent's namespace: stat err %v", err)
	}
}

func TestCapabilitiesLimitTheBoundingSet(t *testing.T) {
	out := run(t, Spec{Capabilities: []string{"NET_BIND_SERVICE"}, Argv: []string{"grep", "CapBnd", "/proc/self/status"}})
	// CAP_NET_BIND_SERVICE is bit 10.
	if !strings.HasSuffix(strings.TrimSpace(out), "0000000000000400") {
		t.Errorf("bounding set line %q, want only CAP_NET_BIND_SERVICE", out)
	}
}

func TestAnEmptyArgvIsRefused(t *testing.T) {
	if _, err := Command(Spec{}); err != ErrNoArgv {
		t.Errorf("Command(empty) error = %v, want ErrNoArgv", err)
	}
}

func TestDroppingEveryCapabilityKeepsNone(t *testing.T) {
	out := run(t, Spec{Capabilities: []string{}, Argv: []string{"grep", "CapBnd", "/proc/self/status"}})
	if !strings.HasSuffix(strings.TrimSpace(out), "0000000000000000") {
		t.Errorf("bounding set line %q, want empty", out)
	}
}

func TestTheChildGetsItsOwnHostname(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for UTS namespaces")
	}
	before, _ := os.Hostname()
	out := run(t, Spec{Hostname: "pod-a", Argv: []string{"cat", "/proc/sys/kernel/hostname"}})
	if strings.TrimSpace(out) != "pod-a" {
		t.Errorf("child hostname = %q, want pod-a", out)
	}
	if after, _ := os.Hostname(); after != before {
		t.Errorf("the parent's hostname changed from %q to %q", before, after)
	}
}

func TestEnteringAContainerKeepsItsBoundingSet(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for nsenter")
	}
	cmd, err := Command(Spec{Capabilities: []string{"NET_RAW", "KILL"}, Argv: []string{"sleep", "30"}})
	if err != nil {
		t.Fatal(err)
	}
	SetEnv(cmd, []string{"PATH=/usr/bin:/bin"})
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	// Wait until the shim has exec'd into sleep with the reduced set.
	var argv []string
	for i := 0; i < 200; i++ {
		if comm, _ := os.ReadFile(fmt.Sprintf("/proc/%d/comm", cmd.Process.Pid)); strings.TrimSpace(string(comm)) == "sleep" {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	argv, err = EnterArgv(cmd.Process.Pid, false, []string{"grep", "CapBnd", "/proc/self/status"})
	if err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%v: %v\n%s", argv, err, out)
	}
	// CAP_KILL is bit 5, CAP_NET_RAW bit 13.
	if !strings.HasSuffix(strings.TrimSpace(string(out)), "0000000000002020") {
		t.Errorf("exec'd command bounding set %q, want only KILL and NET_RAW", out)
	}
}

func TestBoundingSetNames(t *testing.T) {
	full := uint64(1)<<(unix.CAP_LAST_CAP+1) - 1
	if _, limited := boundingSetNames(full, full); limited {
		t.Error("the caller's own set is reported as limited")
	}
	if got, _ := boundingSetNames(1<<unix.CAP_NET_ADMIN|1<<unix.CAP_CHOWN, full); got != "-all,+chown,+net_admin" {
		t.Errorf("names = %q", got)
	}
}
