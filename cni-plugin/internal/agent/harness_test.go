//go:build linux

package agent

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
	"github.com/ambient-mesh/ambient/cni-plugin/internal/redirect"
)

// testTimeout bounds every wait; none should come near it.
const testTimeout = 15 * time.Second

const testNode = "node-a"

// standInEngine stands in for a redirection engine: it records, by pod UID,
// the inode of the netns redirection was installed in. It is shared across
// agents in a test the way the kernel's state outlives an agent.
type standInEngine struct {
	mu sync.Mutex
	// installed maps pod UID to netns inode; guarded by mu.
	installed map[string]uint64
	// beforeInstall, when set, runs at the start of Install.
	beforeInstall func(pod redirect.Pod)
	installs      int // guarded by mu
}

func newStandInEngine() *standInEngine { return &standInEngine{installed: map[string]uint64{}} }

func (*standInEngine) Name() string { return "stand-in" }

func (e *standInEngine) Install(netnsPath string, pod redirect.Pod) error {
	e.mu.Lock()
	hook := e.beforeInstall
	e.mu.Unlock()
	if hook != nil {
		hook(pod)
	}
	f, err := os.Open(netnsPath)
	if err != nil {
		return fmt.Errorf("%w: %s", redirect.ErrNetnsGone, netnsPath)
	}
	defer f.Close()
	e.mu.Lock()
	defer e.mu.Unlock()
	e.installed[pod.UID] = inodeOf(f)
	e.installs++
	return nil
}

func (e *standInEngine) Remove(_ string, pod redirect.Pod) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.installed, pod.UID)
	return nil
}

type standInReport struct{ Inode uint64 }

func (r standInReport) Installed() bool { return r.Inode != 0 }

func (e *standInEngine) Describe(_ string, pod redirect.Pod) (any, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	return standInReport{Inode: e.installed[pod.UID]}, nil
}

func (e *standInEngine) installCount() int {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.installs
}

// installedIn is the inode redirection for uid is installed in; 0 when none.
func (e *standInEngine) installedIn(uid string) uint64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.installed[uid]
}

func (e *standInEngine) uids() []string {
	e.mu.Lock()
	defer e.mu.Unlock()
	var uids []string
	for uid := range e.installed {
		uids = append(uids, uid)
	}
	slices.Sort(uids)
	return uids
}

// standInProbes records the probe SNAT set instead of writing nftables in
// the test machine's own netns.
type standInProbes struct {
	mu      sync.Mutex
	targets map[netip.Addr]bool // guarded by mu
}

func newStandInProbes() *standInProbes { return &standInProbes{targets: map[netip.Addr]bool{}} }

func (*standInProbes) Install([]netip.Prefix) error { return nil }
func (p *standInProbes) AddTarget(ip netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.targets[ip] = true
	return nil
}
func (p *standInProbes) RemoveTarget(ip netip.Addr) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.targets, ip)
	return nil
}
func (p *standInProbes) Describe() (any, error) { return nil, nil }
func (p *standInProbes) has(ip string) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.targets[netip.MustParseAddr(ip)]
}
func (p *standInProbes) count() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return len(p.targets)
}

// fakeZtunnel is ztunnel's side of ZDS: it says hello and acknowledges
// everything, recording what it was asked.
type fakeZtunnel struct {
	uc   *net.UnixConn
	done chan struct{}

	mu sync.Mutex
	// serving is the set of pods it was told to serve; guarded by mu.
	serving  map[string]bool
	snapshot bool // snapshot_sent received; guarded by mu
	// refuse makes it ack adds of these UIDs with an error; guarded by mu.
	refuse map[string]bool
}

func connectZtunnel(t testing.TB, socket string) *fakeZtunnel {
	t.Helper()
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: socket, Net: "unixpacket"})
	if err != nil {
		t.Fatalf("dialing zds: %v", err)
	}
	z := &fakeZtunnel{uc: uc, done: make(chan struct{}), serving: map[string]bool{}, refuse: map[string]bool{}}
	hello, _ := proto.Marshal(&zdsapi.ZdsHello{Version: zdsapi.Version_V1})
	if _, err := uc.Write(hello); err != nil {
		t.Fatalf("zds hello: %v", err)
	}
	go z.serve()
	t.Cleanup(z.close)
	waitFor(t, "snapshot", func() bool {
		z.mu.Lock()
		defer z.mu.Unlock()
		return z.snapshot
	})
	return z
}

func (z *fakeZtunnel) serve() {
	defer close(z.done)
	buf := make([]byte, 64<<10)
	oob := make([]byte, unix.CmsgSpace(4*4))
	for {
		n, oobn, _, _, err := z.uc.ReadMsgUnix(buf, oob)
		if err != nil || n == 0 {
			return
		}
		if msgs, err := unix.ParseSocketControlMessage(oob[:oobn]); err == nil {
			for i := range msgs {
				fds, _ := unix.ParseUnixRights(&msgs[i])
				for _, fd := range fds {
					unix.Close(fd)
				}
			}
		}
		var req zdsapi.WorkloadRequest
		if err := proto.Unmarshal(buf[:n], &req); err != nil {
			return
		}
		ackErr := ""
		z.mu.Lock()
		switch {
		case req.GetAdd() != nil:
			uid := req.GetAdd().GetUid()
			if z.refuse[uid] {
				ackErr = "refused by test"
			} else {
				z.serving[uid] = true
			}
		case req.GetDel() != nil:
			delete(z.serving, req.GetDel().GetUid())
		case req.GetSnapshotSent() != nil:
			z.snapshot = true
		}
		z.mu.Unlock()
		ack, _ := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: ackErr}}})
		if _, err := z.uc.Write(ack); err != nil {
			return
		}
	}
}

func (z *fakeZtunnel) close() {
	z.uc.Close()
	<-z.done
}

func (z *fakeZtunnel) count() int {
	z.mu.Lock()
	defer z.mu.Unlock()
	return len(z.serving)
}

func (z *fakeZtunnel) serves(uid string) bool {
	z.mu.Lock()
	defer z.mu.Unlock()
	return z.serving[uid]
}

// testEnv is what an agent in a test runs against; several agents (a
// restart) can share one.
type testEnv struct {
	t      testing.TB
	client *fake.Clientset
	engine *standInEngine
	probes *standInProbes
	dir    string
	cfg    Config
}

func newTestEnv(t testing.TB, objs ...*corev1.Namespace) *testEnv {
	t.Helper()
	// Short: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"net.d", "bin"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	conflist := `{"cniVersion":"1.0.0","name":"k8s","plugins":[{"type":"bridge","bridge":"cni0","ipam":{"type":"host-local","subnet":"10.244.0.0/24"}}]}`
	if err := os.WriteFile(filepath.Join(dir, "net.d", "10-bridge.conflist"), []byte(conflist), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ambient-cni"), []byte("#!/bin/true\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset()
	if _, bench := t.(*testing.B); bench {
		// NewClientset's field-managed tracker spends milliseconds per
		// patch building a REST mapper: it would dominate the benchmark.
		client = fake.NewSimpleClientset() //nolint:staticcheck // see above
	}
	for _, ns := range objs {
		if _, err := client.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	return &testEnv{
		t:      t,
		client: client,
		engine: newStandInEngine(),
		probes: newStandInProbes(),
		dir:    dir,
		cfg: Config{
			NodeName:    testNode,
			CNIConfDir:  filepath.Join(dir, "net.d"),
			CNIBinDir:   filepath.Join(dir, "bin"),
			CNIBinary:   filepath.Join(dir, "ambient-cni"),
			AgentSocket: filepath.Join(dir, "cni.sock"),
			ZDSSocket:   filepath.Join(dir, "ztunnel.sock"),
			ProcDir:     "/proc",
			Log:         testLogger(t),
		},
	}
}

// start runs an agent until the test ends or stop is called, and waits for
// it to be ready.
func (env *testEnv) start(engine redirect.Engine, finder netnsFinder) (a *Agent, stop func()) {
	t := env.t
	t.Helper()
	if engine == nil {
		engine = env.engine
	}
	if finder == nil {
		finder = newProcScanner("/proc", "")
	}
	a, err := newAgent(env.client, env.cfg, engine, env.probes, finder)
	if err != nil {
		t.Fatalf("newAgent: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Run: %v", err)
				}
			case <-time.After(testTimeout):
				t.Errorf("Run did not return after cancel")
			}
		})
	}
	t.Cleanup(stop)
	waitFor(t, "agent ready", a.Ready)
	return a, stop
}

func namespace(name string, labels map[string]string) *corev1.Namespace {
	return &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
}

var ambientLabels = map[string]string{DataplaneModeLabel: DataplaneModeAmbient}

// createPod creates a running pod of testNode with ip in its status.
func (env *testEnv) createPod(ns, name, ip string, labels map[string]string) *corev1.Pod {
	env.t.Helper()
	p := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns, UID: types.UID("uid-" + name), Labels: labels},
		Spec:       corev1.PodSpec{NodeName: testNode, ServiceAccountName: "sa-" + name},
		Status:     corev1.PodStatus{Phase: corev1.PodRunning},
	}
	if ip != "" {
		p.Status.PodIP = ip
		p.Status.PodIPs = []corev1.PodIP{{IP: ip}}
	}
	p, err := env.client.CoreV1().Pods(ns).Create(context.Background(), p, metav1.CreateOptions{})
	if err != nil {
		env.t.Fatalf("creating pod: %v", err)
	}
	return p
}

func (env *testEnv) setNamespaceLabels(name string, labels map[string]string) {
	env.t.Helper()
	ctx := context.Background()
	ns, err := env.client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		env.t.Fatal(err)
	}
	ns.Labels = labels
	if _, err := env.client.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}); err != nil {
		env.t.Fatal(err)
	}
}

// annotation is the pod's redirection annotation in the API ("" when absent
// or the pod is gone).
func (env *testEnv) annotation(ns, name string) string {
	p, err := env.client.CoreV1().Pods(ns).Get(context.Background(), name, metav1.GetOptions{})
	if err != nil {
		return ""
	}
	return p.Annotations[RedirectionAnnotation]
}

func testLogger(t testing.TB) *slog.Logger {
	if _, bench := t.(*testing.B); bench {
		return slog.New(slog.DiscardHandler)
	}
	return slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimSuffix(string(b), "\n"))
	return len(b), nil
}

func waitFor(t testing.TB, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(testTimeout)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), testTimeout)
	t.Cleanup(cancel)
	return ctx
}
