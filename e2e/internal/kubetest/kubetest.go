// Package kubetest is the harness of the end-to-end suites: Main brings the
// local cluster up once per test package (or reuses one that is up), and Env
// gives tests a client, kubectl and helpers that wait on real objects.
package kubetest

import (
	"bytes"
	"context"
	"fmt"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/wait"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/ambient-mesh/ambient/e2e/internal/cluster"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// reuseEnv, when set to 1, makes Main use a cluster that is already up and
// leave it up afterwards (for iterating on a suite with `make cluster`).
const reuseEnv = "AMBIENT_E2E_REUSE"

// Env is what a test needs to talk to the cluster.
type Env struct {
	Config  cluster.Config
	Client  kubernetes.Interface
	Kubectl string
}

var env *Env

// Main brings the cluster up, runs the package's tests and tears it down. It
// must be called from TestMain. There is one cluster per machine, so suites
// run one package at a time (`go test -p 1`).
func Main(m *testing.M) { MainWith(m, nil) }

// MainWith is Main with a setup step (installing the mesh, say) run once the
// cluster is up and before the tests.
func MainWith(m *testing.M, setup func(*Env) error) {
	nsexec.Init() // the launcher re-executes this binary to enter node namespaces
	os.Exit(run(m, setup))
}

func run(m *testing.M, setup func(*Env) error) (code int) {
	cfg := cluster.DefaultConfig()
	cfg.Log = log.Printf
	reuse := os.Getenv(reuseEnv) == "1"
	if !reuse {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		err := cluster.Up(ctx, cfg)
		cancel()
		if err != nil {
			log.Printf("bringing the cluster up: %v", err)
			return 1
		}
		defer func() {
			if err := cluster.Down(cfg); err != nil {
				log.Printf("tearing the cluster down: %v", err)
				code = 1
			}
			// Down must leave no trace; a suite that leaks fails.
			if left := cluster.Leftovers(cfg); len(left) > 0 {
				log.Printf("left after teardown: %s", strings.Join(left, "; "))
				code = 1
			}
		}()
	}
	rc, err := clientcmd.BuildConfigFromFlags("", cfg.KubeconfigPath())
	if err != nil {
		log.Printf("reading kubeconfig: %v", err)
		return 1
	}
	rc.QPS, rc.Burst = 100, 200
	client, err := kubernetes.NewForConfig(rc)
	if err != nil {
		log.Printf("building client: %v", err)
		return 1
	}
	env = &Env{Config: cfg, Client: client, Kubectl: filepath.Join(cfg.KubeBin, "kubectl")}
	if setup != nil {
		if err := setup(env); err != nil {
			log.Printf("setting up the suite: %v", err)
			return 1
		}
	}
	return m.Run()
}

// InstallMesh applies deploy/ as a user would and waits for istiod-lite, the
// CNI agent and ztunnel to be rolled out.
func (e *Env) InstallMesh(ctx context.Context) error {
	if out, err := e.RunKubectl(ctx, "apply", "--server-side", "-k", filepath.Join(cluster.RepoRoot(), "deploy")); err != nil {
		return fmt.Errorf("applying deploy/: %w\n%s", err, out)
	}
	for _, w := range []string{"deployment/istiod", "daemonset/cni-agent", "daemonset/ztunnel"} {
		if out, err := e.RunKubectl(ctx, "-n", "istio-system", "rollout", "status", w, "--timeout=120s"); err != nil {
			return fmt.Errorf("waiting for %s: %w\n%s", w, err, out)
		}
	}
	return nil
}

// Get returns the environment Main set up.
func Get(t testing.TB) *Env {
	t.Helper()
	if env == nil {
		t.Fatal("kubetest.Main was not called from TestMain")
	}
	return env
}

// Namespace creates a namespace for the test and deletes it at cleanup.
func (e *Env) Namespace(t testing.TB, labels map[string]string) string {
	t.Helper()
	name := fmt.Sprintf("t-%s-%d", strings.ToLower(sanitize(t.Name())), time.Now().UnixNano()%100000)
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}
	if _, err := e.Client.CoreV1().Namespaces().Create(context.Background(), ns, metav1.CreateOptions{}); err != nil {
		t.Fatalf("creating namespace %s: %v", name, err)
	}
	// Pods need the namespace's default ServiceAccount, made asynchronously.
	e.WaitFor(t, 30*time.Second, "default ServiceAccount in "+name, func(ctx context.Context) (bool, error) {
		_, err := e.Client.CoreV1().ServiceAccounts(name).Get(ctx, "default", metav1.GetOptions{})
		return err == nil, nil
	})
	t.Cleanup(func() {
		if t.Failed() {
			e.dumpNamespace(t, name)
		}
		e.Client.CoreV1().Namespaces().Delete(context.Background(), name, metav1.DeleteOptions{})
	})
	return name
}

func sanitize(s string) string {
	var b strings.Builder
	for _, r := range strings.ToLower(s) {
		if (r >= 'a' && r <= 'z') || (r >= '0' && r <= '9') {
			b.WriteRune(r)
		} else {
			b.WriteByte('-')
		}
	}
	out := strings.Trim(b.String(), "-")
	if len(out) > 40 {
		out = out[:40]
	}
	return out
}

// WaitFor polls cond until it holds or timeout passes.
func (e *Env) WaitFor(t testing.TB, timeout time.Duration, what string, cond func(ctx context.Context) (bool, error)) {
	t.Helper()
	err := wait.PollUntilContextTimeout(context.Background(), 100*time.Millisecond, timeout, true, cond)
	if err != nil {
		t.Fatalf("waiting for %s: %v", what, err)
	}
}

// Kubectl runs kubectl against the cluster and returns stdout; stderr is in the error.
func (e *Env) RunKubectl(ctx context.Context, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, e.Kubectl, append([]string{"--kubeconfig", e.Config.KubeconfigPath()}, args...)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String(), fmt.Errorf("kubectl %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String(), nil
}

// KubectlCmd returns an unstarted kubectl command, for long-running ones like port-forward.
func (e *Env) KubectlCmd(ctx context.Context, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, e.Kubectl, append([]string{"--kubeconfig", e.Config.KubeconfigPath()}, args...)...)
}

func (e *Env) dumpNamespace(t testing.TB, ns string) {
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	out, err := e.RunKubectl(ctx, "get", "pods,events", "-n", ns, "-o", "wide")
	t.Logf("state of %s:\n%s%v", ns, out, err)
}
