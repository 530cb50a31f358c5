package agent

import (
	"context"
	"errors"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniapi"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
)

// ownNetnsInode is the inode of the test process's netns, which the CNI
// tests use as the pod's (the stand-in engine only opens it).
func ownNetnsInode(t *testing.T) uint64 {
	f, err := os.Open("/proc/self/ns/net")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	return inodeOf(f)
}

func addRequest(ns, name, ip string) *cniapi.PodRequest {
	return &cniapi.PodRequest{
		ContainerID:  "sandbox-" + name,
		Netns:        "/proc/self/ns/net",
		IfName:       "eth0",
		PodName:      name,
		PodNamespace: ns,
		PodUID:       "uid-" + name,
		IPs:          []netip.Addr{netip.MustParseAddr(ip)},
	}
}

func TestCNIAddEnrollsAmbientPodsAndSkipsTheOthers(t *testing.T) {
	env := newTestEnv(t, namespace("mesh", ambientLabels), namespace("plain", nil))
	a, _ := env.start(nil, nil)
	z := connectZtunnel(t, env.cfg.ZDSSocket)

	// The API has no IP yet when the runtime runs ADD: the request's is used.
	env.createPod("mesh", "web", "", nil)
	env.createPod("plain", "db", "", nil)
	env.createPod("mesh", "batch", "", map[string]string{DataplaneModeLabel: DataplaneModeNone})

	resp, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10"))
	if err != nil || resp.Outcome != cniapi.Enrolled {
		t.Fatalf("ADD of ambient pod = %+v, %v; want enrolled", resp, err)
	}
	if got, want := env.engine.installedIn("uid-web"), ownNetnsInode(t); got != want {
		t.Errorf("redirection installed in netns %d, want %d", got, want)
	}
	if !z.serves("uid-web") {
		t.Error("ztunnel was not handed the pod")
	}
	if !env.probes.has("10.244.0.10") {
		t.Error("pod IP from the request is not a probe SNAT target")
	}
	if got := env.annotation("mesh", "web"); got != RedirectionEnabled {
		t.Errorf("annotation = %q, want %q", got, RedirectionEnabled)
	}

	// ADD again (the runtime retried): still enrolled, nothing new.
	if resp, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10")); err != nil || resp.Outcome != cniapi.Enrolled {
		t.Fatalf("repeated ADD = %+v, %v; want enrolled", resp, err)
	}
	if env.engine.installCount() != 1 {
		t.Errorf("engine installs = %d, want 1", env.engine.installCount())
	}

	for _, name := range []string{"db", "batch"} {
		ns := "plain"
		if name == "batch" {
			ns = "mesh"
		}
		resp, err := a.Add(ctxT(t), addRequest(ns, name, "10.244.0.11"))
		if err != nil || resp.Outcome != cniapi.Skipped {
			t.Errorf("ADD of %s = %+v, %v; want skipped", name, resp, err)
		}
		if env.engine.installedIn("uid-"+name) != 0 || z.serves("uid-"+name) {
			t.Errorf("%s was enrolled", name)
		}
	}

	if resp, err := a.Check(ctxT(t), addRequest("mesh", "web", "10.244.0.10")); err != nil || resp.Outcome != cniapi.Enrolled {
		t.Errorf("CHECK = %+v, %v; want enrolled", resp, err)
	}

	resp, err = a.Del(ctxT(t), addRequest("mesh", "web", "10.244.0.10"))
	if err != nil || resp.Outcome != cniapi.Removed {
		t.Fatalf("DEL = %+v, %v; want removed", resp, err)
	}
	if env.engine.installedIn("uid-web") != 0 || z.serves("uid-web") || env.probes.has("10.244.0.10") {
		t.Error("DEL left redirection, ztunnel state or a probe target behind")
	}
	if _, err := a.Check(ctxT(t), addRequest("mesh", "web", "10.244.0.10")); err == nil {
		t.Error("CHECK after DEL passed")
	}
	// DEL again, and of a pod whose netns is gone: still fine.
	gone := addRequest("mesh", "web", "10.244.0.10")
	gone.Netns = "/proc/self/fd/-1"
	if resp, err := a.Del(ctxT(t), gone); err != nil || resp.Outcome != cniapi.Removed {
		t.Errorf("second DEL = %+v, %v; want removed", resp, err)
	}
}

func TestCNIAddFailsClosedWithoutZtunnel(t *testing.T) {
	env := newTestEnv(t, namespace("mesh", ambientLabels))
	a, _ := env.start(nil, nil)
	env.createPod("mesh", "web", "", nil)

	_, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10"))
	if !errors.Is(err, cniapi.ErrUnavailable) {
		t.Fatalf("ADD without ztunnel = %v, want an error wrapping ErrUnavailable (the runtime retries)", err)
	}
	if uids := env.engine.uids(); len(uids) != 0 {
		t.Errorf("redirection left installed for %v", uids)
	}
	if n := env.probes.count(); n != 0 {
		t.Errorf("%d probe targets left", n)
	}
	if w := a.zds.Workloads(); len(w) != 0 {
		t.Errorf("zds still holds %v: the next ztunnel would be handed a pod whose ADD failed", w)
	}
	if got := env.annotation("mesh", "web"); got != "" {
		t.Errorf("annotation = %q on a pod that is not enrolled", got)
	}

	// ztunnel arrives; the runtime's retry succeeds.
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	if resp, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10")); err != nil || resp.Outcome != cniapi.Enrolled {
		t.Fatalf("retried ADD = %+v, %v; want enrolled", resp, err)
	}
	if !z.serves("uid-web") {
		t.Error("ztunnel was not handed the pod")
	}
}

func TestCNIAddRefusedByZtunnelLeavesNothing(t *testing.T) {
	env := newTestEnv(t, namespace("mesh", ambientLabels))
	a, _ := env.start(nil, nil)
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	z.mu.Lock()
	z.refuse["uid-web"] = true
	z.mu.Unlock()
	env.createPod("mesh", "web", "", nil)

	_, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10"))
	if err == nil {
		t.Fatal("ADD refused by ztunnel succeeded")
	}
	if len(env.engine.uids()) != 0 || env.probes.count() != 0 || len(a.zds.Workloads()) != 0 {
		t.Errorf("left behind: redirection %v, %d probe targets, zds %v", env.engine.uids(), env.probes.count(), a.zds.Workloads())
	}
}

func TestPodDeletedDuringCNIAddLeavesNothingAndOthersUntouched(t *testing.T) {
	env := newTestEnv(t, namespace("mesh", ambientLabels))
	a, _ := env.start(nil, nil)
	z := connectZtunnel(t, env.cfg.ZDSSocket)
	env.createPod("mesh", "keep", "", nil)
	env.createPod("mesh", "web", "", nil)
	if _, err := a.Add(ctxT(t), addRequest("mesh", "keep", "10.244.0.9")); err != nil {
		t.Fatalf("ADD of the other pod: %v", err)
	}

	env.engine.mu.Lock()
	env.engine.beforeInstall = func(p redirect.Pod) {
		if p.Name == "web" {
			_ = env.client.CoreV1().Pods("mesh").Delete(context.Background(), "web", metav1.DeleteOptions{})
		}
	}
	env.engine.mu.Unlock()
	if _, err := a.Add(ctxT(t), addRequest("mesh", "web", "10.244.0.10")); err == nil {
		t.Fatal("ADD of a pod deleted meanwhile succeeded")
	}
	waitFor(t, "web gone from the agent", func() bool { return a.enrolled("uid-web") == nil })
	if env.engine.installedIn("uid-web") != 0 || z.serves("uid-web") || env.probes.has("10.244.0.10") || a.enrolled("uid-web") != nil {
		t.Error("the deleted pod left redirection, ztunnel state, a probe target or agent state behind")
	}
	if env.engine.installedIn("uid-keep") == 0 || !z.serves("uid-keep") || !env.probes.has("10.244.0.9") || a.enrolled("uid-keep") == nil {
		t.Error("the other pod was touched")
	}
}

func TestPluginStaysChainedAcrossRestartsAndGoesOnlyOnUninstall(t *testing.T) {
	env := newTestEnv(t)
	conflist := filepath.Join(env.cfg.CNIConfDir, "10-bridge.conflist")
	chained := func() bool {
		b, err := os.ReadFile(conflist)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), `"ambient-cni"`)
	}
	binary := filepath.Join(env.cfg.CNIBinDir, "ambient-cni")

	_, stop := env.start(nil, nil)
	if !chained() {
		t.Fatal("plugin not chained once the agent is ready")
	}
	if _, err := os.Stat(binary); err != nil {
		t.Fatalf("plugin binary not installed: %v", err)
	}
	stop()
	if !chained() {
		t.Fatal("a plain stop unchained the plugin: new pods would start outside the mesh while the agent restarts")
	}

	env.cfg.UninstallOnExit = true
	_, stop = env.start(nil, nil)
	stop()
	if chained() {
		t.Error("plugin still chained after a stop with UninstallOnExit")
	}
	if _, err := os.Stat(binary); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("plugin binary still installed: %v", err)
	}
}
