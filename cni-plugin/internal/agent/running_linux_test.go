package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"syscall"
	"testing"

	"github.com/containernetworking/plugins/pkg/ns"
	"github.com/vishvananda/netlink"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
)

// podProcess is a process standing in for a running pod: it lives in a
// throwaway network namespace whose loopback carries the pod's IP (the only
// address the test adds, and only inside that namespace).
type podProcess struct {
	pid   int
	inode uint64
}

func (p podProcess) netnsPath() string { return fmt.Sprintf("/proc/%d/ns/net", p.pid) }

func startPodProcess(t testing.TB, ip string) podProcess {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to create network namespaces")
	}
	cmd := exec.Command("sleep", "600")
	cmd.SysProcAttr = &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNET, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting pod process: %v", err)
	}
	t.Cleanup(func() {
		cmd.Process.Kill()
		cmd.Wait()
	})
	p := podProcess{pid: cmd.Process.Pid}
	err := redirect.Do(p.netnsPath(), func(ns.NetNS) error {
		lo, err := netlink.LinkByName("lo")
		if err != nil {
			return err
		}
		if err := netlink.LinkSetUp(lo); err != nil {
			return err
		}
		a := netip.MustParseAddr(ip)
		return netlink.AddrAdd(lo, &netlink.Addr{IPNet: &net.IPNet{IP: a.AsSlice(), Mask: net.CIDRMask(a.BitLen(), a.BitLen())}})
	})
	if err != nil {
		t.Fatalf("configuring pod netns: %v", err)
	}
	f, err := os.Open(p.netnsPath())
	if err != nil {
		t.Fatal(err)
	}
	p.inode = inodeOf(f)
	f.Close()
	return p
}

func TestNamespaceLabelEnrollsRunningPodsAndRemovingItUnenrolls(t *testing.T) {
	for i, name := range []string{redirect.EngineNFTables, redirect.EngineEBPF} {
		t.Run(name, func(t *testing.T) {
			ip := fmt.Sprintf("10.254.77.%d", 20+i)
			proc := startPodProcess(t, ip)
			engine, err := redirect.Choose(name)
			if err != nil {
				t.Skipf("engine unavailable here: %v", err)
			}
			testLabelEnrollsRunningPod(t, engine, proc, ip)
		})
	}
}

func testLabelEnrollsRunningPod(t *testing.T, engine redirect.Engine, proc podProcess, ip string) {
	installed := func() bool {
		r, err := engine.Describe(proc.netnsPath(), redirect.Pod{UID: "uid-web", Namespace: "mesh", Name: "web"})
		if err != nil {
			t.Fatalf("describing: %v", err)
		}
		return redirectionInstalled(r)
	}

	env := newTestEnv(t, namespace("mesh", nil))
	env.createPod("mesh", "web", ip, nil)
	a, _ := env.start(engine, nil)
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	if a.enrolled("uid-web") != nil || installed() {
		t.Fatal("pod enrolled before its namespace was labeled")
	}

	env.setNamespaceLabels("mesh", ambientLabels)
	waitFor(t, "pod enrolled and annotated", func() bool {
		return a.enrolled("uid-web") != nil && env.annotation("mesh", "web") == RedirectionEnabled
	})
	if got := a.enrolled("uid-web").inode; got != proc.inode {
		t.Errorf("enrolled netns %d, want the pod process's %d", got, proc.inode)
	}
	if !installed() {
		t.Errorf("%s redirection not installed in the pod's netns", engine.Name())
	}
	if !z.serves("uid-web") || !env.probes.has(ip) {
		t.Error("ztunnel not serving the pod, or its IP not a probe target")
	}

	// The debug endpoint reports it, with the engine's view.
	rec := httptest.NewRecorder()
	a.debugHandler().ServeHTTP(rec, httptest.NewRequest("GET", PathDebugEnrolled, nil))
	var rep struct {
		Engine string
		Pods   []struct {
			UID         string
			NetnsInode  uint64
			Redirection map[string]any
		}
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &rep); err != nil {
		t.Fatalf("decoding %s: %v\n%s", PathDebugEnrolled, err, rec.Body)
	}
	if rep.Engine != engine.Name() || len(rep.Pods) != 1 || rep.Pods[0].UID != "uid-web" || rep.Pods[0].NetnsInode != proc.inode || rep.Pods[0].Redirection["engine"] != engine.Name() {
		t.Errorf("%s = %s", PathDebugEnrolled, rec.Body)
	}

	env.setNamespaceLabels("mesh", nil)
	waitFor(t, "pod unenrolled and annotation removed", func() bool {
		return a.enrolled("uid-web") == nil && env.annotation("mesh", "web") == ""
	})
	if installed() {
		t.Errorf("%s redirection left in the pod's netns", engine.Name())
	}
	waitFor(t, "ztunnel told", func() bool { return !z.serves("uid-web") })
	if env.probes.has(ip) {
		t.Error("probe target left")
	}
}

func TestPodLabelsOptInAndOut(t *testing.T) {
	proc := startPodProcess(t, "10.254.77.6")
	env := newTestEnv(t, namespace("plain", nil))
	env.createPod("plain", "web", "10.254.77.6", nil)
	a, _ := env.start(nil, nil)
	connectZtunnel(t, env.cfg.ZDSSocket)

	setLabel := func(v string) {
		t.Helper()
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%q}}}`, DataplaneModeLabel, v)
		if _, err := env.client.CoreV1().Pods("plain").Patch(context.Background(), "web", "application/merge-patch+json", []byte(patch), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	setLabel(DataplaneModeAmbient)
	waitFor(t, "pod enrolled", func() bool { return env.engine.installedIn("uid-web") == proc.inode })
	setLabel(DataplaneModeNone)
	waitFor(t, "pod unenrolled", func() bool {
		return env.engine.installedIn("uid-web") == 0 && a.enrolled("uid-web") == nil && env.annotation("plain", "web") == ""
	})
}

func TestAgentRestartKeepsEnrolledPodsEnrolled(t *testing.T) {
	web := startPodProcess(t, "10.254.77.7")
	stale := startPodProcess(t, "10.254.77.8")
	env := newTestEnv(t, namespace("mesh", ambientLabels), namespace("plain", nil))
	env.createPod("mesh", "web", "10.254.77.7", nil)

	first, stopFirst := env.start(nil, nil)
	connectZtunnel(t, env.cfg.ZDSSocket)
	waitFor(t, "pod enrolled", func() bool {
		return first.enrolled("uid-web") != nil && env.annotation("mesh", "web") == RedirectionEnabled
	})
	stopFirst()
	if env.engine.installedIn("uid-web") != web.inode || env.annotation("mesh", "web") != RedirectionEnabled {
		t.Fatal("stopping the agent removed the pod's redirection or annotation")
	}

	// While no agent runs: a pod enrolled earlier stops being ambient (its
	// namespace label went; here it never had one).
	stalePod := env.createPod("plain", "stale", "10.254.77.8", nil)
	stalePod.Annotations = map[string]string{RedirectionAnnotation: RedirectionEnabled}
	if _, err := env.client.CoreV1().Pods("plain").Update(context.Background(), stalePod, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	f, _ := os.Open(stale.netnsPath())
	env.engine.Install(fmt.Sprintf("/proc/self/fd/%d", f.Fd()), redirect.Pod{UID: "uid-stale"})
	f.Close()

	// The new agent is ready only once it has re-enrolled the pod, even
	// before ztunnel reconnects.
	second, _ := env.start(nil, nil)
	p := second.enrolled("uid-web")
	if p == nil || p.inode != web.inode {
		t.Fatalf("restarted agent has %+v enrolled, want the pod in netns %d", p, web.inode)
	}
	if env.engine.installedIn("uid-web") != web.inode || !env.probes.has("10.254.77.7") {
		t.Error("redirection or probe target of the pod lost across the restart")
	}
	if env.engine.installedIn("uid-stale") != 0 || env.annotation("plain", "stale") != "" {
		t.Error("the pod that stopped being ambient while no agent ran is still redirected or annotated")
	}
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	if !z.serves("uid-web") {
		t.Error("the reconnecting ztunnel's snapshot lacks the pod")
	}
}

func TestPodDeletedDuringRunningEnrollmentLeavesNothing(t *testing.T) {
	keep := startPodProcess(t, "10.254.77.9")
	startPodProcess(t, "10.254.77.10")
	env := newTestEnv(t, namespace("mesh", ambientLabels))
	env.createPod("mesh", "keep", "10.254.77.9", nil)
	a, _ := env.start(nil, nil)
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	waitFor(t, "other pod enrolled", func() bool { return env.annotation("mesh", "keep") == RedirectionEnabled })

	deleted := make(chan struct{})
	env.engine.mu.Lock()
	env.engine.beforeInstall = func(p redirect.Pod) {
		if p.Name == "web" {
			if err := env.client.CoreV1().Pods("mesh").Delete(context.Background(), "web", metav1.DeleteOptions{}); err == nil {
				close(deleted)
			}
		}
	}
	env.engine.mu.Unlock()
	env.createPod("mesh", "web", "10.254.77.10", nil)
	<-deleted
	waitFor(t, "nothing left of the deleted pod", func() bool {
		return env.engine.installedIn("uid-web") == 0 && a.enrolled("uid-web") == nil &&
			!z.serves("uid-web") && !env.probes.has("10.254.77.10") && len(a.zds.Workloads()) == 1
	})
	if env.engine.installedIn("uid-keep") != keep.inode || !z.serves("uid-keep") || a.enrolled("uid-keep") == nil {
		t.Error("the other pod was touched")
	}
}

func TestFinderSkipsItsOwnNetnsAndReportsMisses(t *testing.T) {
	proc := startPodProcess(t, "10.254.77.11")
	s := newProcScanner("/proc", "")
	f, err := s.Find([]netip.Addr{netip.MustParseAddr("10.254.77.11")})
	if err != nil {
		t.Fatalf("Find: %v", err)
	}
	if got := inodeOf(f); got != proc.inode {
		t.Errorf("found netns %d, want %d", got, proc.inode)
	}
	f.Close()
	if _, err := s.Find([]netip.Addr{netip.MustParseAddr("10.254.77.250")}); !errors.Is(err, errNetnsNotFound) {
		t.Errorf("Find of an unused IP = %v, want errNetnsNotFound", err)
	}
}

// BenchmarkLabelNamespaceWithRunningPods measures labeling a namespace
// whose 100 running pods (each a process in its own netns) must all be
// enrolled, with the real nftables engine; the budget is 1 s.
func BenchmarkLabelNamespaceWithRunningPods(b *testing.B) {
	const pods = 100
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		ns := fmt.Sprintf("bench%d", i)
		env := newTestEnv(b, namespace(ns, nil))
		for j := range pods {
			ip := fmt.Sprintf("10.254.%d.%d", 100+j/200, 1+j%200)
			startPodProcess(b, ip)
			env.createPod(ns, fmt.Sprintf("p%d", j), ip, nil)
		}
		a, stop := env.start(&redirect.NFTables{}, nil)
		z := connectZtunnel(b, env.cfg.ZDSSocket)
		b.StartTimer()
		env.setNamespaceLabels(ns, ambientLabels)
		waitFor(b, "all pods enrolled", func() bool { return a.enrolledCount() == pods && z.count() == pods })
		b.StopTimer()
		stop()
		b.StartTimer()
	}
}
