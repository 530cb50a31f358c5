//go:build e2e

package ztunnel

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// TestOnlyTLSCrossesTheUnderlay captures the underlay (the nodes' links on
// the shared bridge: a bridge's own interface does not see frames it forwards
// between ports) while an enrolled pod sends a request with a marker to a pod
// on the other node: the capture holds HBONE (port 15008) and neither the
// app's port nor the marker.
func TestOnlyTLSCrossesTheUnderlay(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	pcap := filepath.Join(t.TempDir(), "underlay.pcap")
	ctx, cancel := context.WithCancel(context.Background())
	// -Z root: Debian's tcpdump otherwise drops to its own user, which cannot
	// write into the test's directory.
	dump := exec.CommandContext(ctx, "tcpdump", "-Z", "root", "--immediate-mode", "-i", "ambk-node2", "-U", "-w", pcap, "tcp")
	// Stop it with SIGINT so it writes out what it captured.
	dump.Cancel = func() error { return dump.Process.Signal(os.Interrupt) }
	var stderr syncBuffer
	dump.Stderr = &stderr
	if err := dump.Start(); err != nil {
		cancel()
		t.Fatalf("starting tcpdump: %v", err)
	}
	// tcpdump says "listening on" once the capture is open.
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), "listening on") && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	marker := fmt.Sprintf("plaintext-marker-%d", time.Now().UnixNano())
	target := fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)
	out, err := get(t, env, f.ns, "client", target+"/"+marker)
	time.Sleep(500 * time.Millisecond) // let the last packets reach the capture
	cancel()
	dump.Wait()
	if err != nil || !strings.Contains(out, marker) {
		t.Fatalf("request with the marker: %q, %v", out, err)
	}
	raw, err := os.ReadFile(pcap)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(raw, []byte(marker)) {
		t.Error("the marker crossed the underlay in plaintext")
	}
	count := func(filter string) int {
		out, err := exec.Command("tcpdump", "-nr", pcap, filter).Output()
		if err != nil {
			t.Fatalf("reading the capture: %v", err)
		}
		return len(strings.Split(strings.TrimSpace(string(out)), "\n")) - map[bool]int{true: 1, false: 0}[strings.TrimSpace(string(out)) == ""]
	}
	if n := count(fmt.Sprintf("tcp port 15008 and host %s", f.far.Status.PodIP)); n == 0 {
		all, _ := exec.Command("tcpdump", "-nr", pcap).Output()
		t.Errorf("no HBONE packets to the destination pod %s in the capture (tcpdump: %s):\n%.2000s", f.far.Status.PodIP, stderr.String(), all)
	}
	if n := count(fmt.Sprintf("tcp port %d", kubetest.EchoHTTPPort)); n != 0 {
		t.Errorf("%d packets to the app's port crossed the underlay", n)
	}
}

func TestAnAllowPolicyAdmitsOnlyTheNamedServiceAccount(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	ctx := context.Background()
	if _, err := env.Client.CoreV1().ServiceAccounts(f.ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "allowed"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	trusted := onNode(kubetest.SleeperPod(f.ns, "trusted"), "node1")
	trusted.Spec.ServiceAccountName = "allowed"
	env.CreatePod(t, trusted)
	env.WaitPodReady(t, f.ns, "trusted", 30*time.Second)

	policy := fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: only-allowed, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/%[1]s/sa/allowed"]}}]
`, f.ns)
	cmd := env.KubectlCmd(ctx, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(policy)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	target := fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)
	env.WaitFor(t, 10*time.Second, "the default service account to be refused", func(context.Context) (bool, error) {
		_, err := get(t, env, f.ns, "client", target)
		return err != nil, nil
	})
	if out, err := get(t, env, f.ns, "trusted", target); err != nil || !strings.Contains(out, `"pod":"far"`) {
		t.Errorf("the allowed service account got %q, %v", out, err)
	}
}

// syncBuffer is a bytes.Buffer safe to read while a process writes to it.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}
