//go:build e2e

package ztunnel

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/cluster"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// kubectlPluginDir returns a directory holding only the kubectl-ztunnel
// plugin: a link to the one `make build` put in the bin dir, else one built
// now.
func kubectlPluginDir(t *testing.T, env *kubetest.Env) string {
	t.Helper()
	dir := t.TempDir()
	bin := filepath.Join(dir, "kubectl-ztunnel")
	if built := filepath.Join(env.Config.BinDir, "kubectl-ztunnel"); fileExists(built) {
		if err := os.Symlink(built, bin); err != nil {
			t.Fatal(err)
		}
		return dir
	}
	cmd := exec.Command("go", "build", "-o", bin, "./ztunnel/cmd/kubectl-ztunnel")
	cmd.Dir = cluster.RepoRoot()
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("building kubectl-ztunnel: %v\n%s", err, out)
	}
	return dir
}

func fileExists(path string) bool {
	_, err := os.Stat(path)
	return err == nil
}

// pluginRun is one `kubectl ztunnel` run.
type pluginRun struct {
	stdout, stderr string
	code           int
}

// kubectlZtunnel runs `kubectl ztunnel args...` as a user does: kubectl
// finds the plugin on PATH and hands it the environment. kubectl refuses
// flags before a plugin's name, so the kubeconfig goes in KUBECONFIG
// (env.RunKubectl puts --kubeconfig first).
func kubectlZtunnel(t *testing.T, env *kubetest.Env, pluginDir string, args ...string) pluginRun {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, env.Kubectl, append([]string{"ztunnel"}, args...)...)
	cmd.Env = append(os.Environ(),
		"PATH="+pluginDir+string(os.PathListSeparator)+os.Getenv("PATH"),
		"KUBECONFIG="+env.Config.KubeconfigPath())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := pluginRun{stdout: stdout.String(), stderr: stderr.String()}
	var exit *exec.ExitError
	switch {
	case errors.As(err, &exit):
		r.code = exit.ExitCode()
	case err != nil:
		t.Fatalf("kubectl ztunnel %s: %v", strings.Join(args, " "), err)
	}
	return r
}

// tableRows splits a table's data rows into cells (no cell holds a space;
// headers may, so the header line is dropped).
func tableRows(out string) [][]string {
	var rows [][]string
	for i, line := range strings.Split(strings.TrimSpace(out), "\n") {
		if i > 0 {
			rows = append(rows, strings.Fields(line))
		}
	}
	return rows
}

// TestKubectlZtunnelShowsTheTunnels runs the kubectl plugin against the
// mesh's ztunnels: what xDS taught them, the pods they serve, the
// certificates they hold after traffic, their health, and a clear error
// for a node without ztunnel.
func TestKubectlZtunnelShowsTheTunnels(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	dir := kubectlPluginDir(t, env)
	nearNode, farNode := f.near.Spec.NodeName, f.far.Spec.NodeName
	// Traffic from client to far, so both ztunnels hold the namespace's
	// certificate.
	if out, err := get(t, env, f.ns, "client", fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)); err != nil {
		t.Fatalf("client -> far: %q, %v", out, err)
	}
	identity := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/default", f.ns)
	nodes, err := env.Client.CoreV1().Nodes().List(context.Background(), metav1.ListOptions{})
	if err != nil {
		t.Fatal(err)
	}

	t.Run("workloads lists the fixture's pods with their IPs on every ztunnel", func(t *testing.T) {
		want := map[string][2]string{ // name -> IP, node
			"client": {f.client.Status.PodIP, f.client.Spec.NodeName},
			"near":   {f.near.Status.PodIP, nearNode},
			"far":    {f.far.Status.PodIP, farNode},
		}
		var last pluginRun
		env.WaitFor(t, 20*time.Second, "every ztunnel to list the fixture's pods", func(context.Context) (bool, error) {
			last = kubectlZtunnel(t, env, dir, "workloads", "-n", f.ns)
			if last.code != 0 {
				return false, nil
			}
			// NODE NAMESPACE NAME ADDRESSES WORKLOAD-NODE IDENTITY PROTOCOL WAYPOINT STATUS
			seen := map[string]int{}
			for _, r := range tableRows(last.stdout) {
				if len(r) != 9 {
					continue
				}
				w, ok := want[r[2]]
				if ok && r[1] == f.ns && r[3] == w[0] && r[4] == w[1] && r[5] == identity && r[6] == "HBONE" {
					seen[r[2]]++
				}
			}
			for name := range want {
				if seen[name] != len(nodes.Items) {
					return false, nil
				}
			}
			return true, nil
		})
		if t.Failed() {
			t.Logf("last output (exit %d):\n%s%s", last.code, last.stdout, last.stderr)
		}
	})

	t.Run("workloads -o json on one node is the section as served", func(t *testing.T) {
		r := kubectlZtunnel(t, env, dir, "workloads", "-o", "json", "-n", f.ns, "--node", farNode)
		// Fields of ztunnel's state.WorkloadDump.
		type workload struct {
			Name      string   `json:"name"`
			Addresses []string `json:"addresses"`
		}
		var ws []workload
		if err := json.Unmarshal([]byte(r.stdout), &ws); err != nil || r.code != 0 {
			t.Fatalf("exit %d, %v:\n%s%s", r.code, err, r.stdout, r.stderr)
		}
		i := slices.IndexFunc(ws, func(w workload) bool { return w.Name == "far" })
		if i < 0 || !slices.Contains(ws[i].Addresses, f.far.Status.PodIP) {
			t.Errorf("far with %s not in:\n%s", f.far.Status.PodIP, r.stdout)
		}
	})

	t.Run("pods on far's node shows far enrolled, and not the pods of the other node", func(t *testing.T) {
		r := kubectlZtunnel(t, env, dir, "pods", "--node", farNode, "-n", f.ns)
		if r.code != 0 {
			t.Fatalf("exit %d:\n%s%s", r.code, r.stdout, r.stderr)
		}
		// NODE WORKLOAD REDIRECTION LISTENERS ACTIVE-CONNECTIONS
		var workloads []string
		for _, row := range tableRows(r.stdout) {
			if len(row) == 5 && row[0] == farNode {
				workloads = append(workloads, row[1])
				if row[1] == f.ns+"/far" && (row[3] != "15001,15006,15008" || (row[2] != "ebpf" && row[2] != "nftables")) {
					t.Errorf("far's row %q: want listeners 15001,15006,15008 and a redirection engine", row)
				}
			}
		}
		if !slices.Contains(workloads, f.ns+"/far") || slices.Contains(workloads, f.ns+"/client") {
			t.Errorf("workloads served on %s: %q, want %s/far and not %s/client:\n%s", farNode, workloads, f.ns, f.ns, r.stdout)
		}
	})

	t.Run("certificates show the namespace's identity on both nodes after traffic", func(t *testing.T) {
		for _, node := range []string{f.client.Spec.NodeName, farNode} {
			r := kubectlZtunnel(t, env, dir, "certificates", "--node", node, "-n", f.ns)
			// NODE IDENTITY SERIAL NOT-AFTER ROTATE-AT STATE
			found := slices.ContainsFunc(tableRows(r.stdout), func(row []string) bool {
				return len(row) == 6 && row[1] == identity && row[5] == "VALID"
			})
			if r.code != 0 || !found {
				t.Errorf("%s: exit %d, want a VALID %s:\n%s%s", node, r.code, identity, r.stdout, r.stderr)
			}
		}
	})

	t.Run("status shows one ready line per node", func(t *testing.T) {
		var last pluginRun
		// Another test may have just restarted ztunnel.
		env.WaitFor(t, 90*time.Second, "one ready, synced, connected ztunnel per node", func(context.Context) (bool, error) {
			last = kubectlZtunnel(t, env, dir, "status")
			if last.code != 0 {
				return false, nil
			}
			// NODE POD READY XDS-SYNCED ZDS-CONNECTED WORKLOADS SERVICES POLICIES CERTIFICATES PODS
			rows := tableRows(last.stdout)
			if len(rows) != len(nodes.Items) {
				return false, nil
			}
			for _, n := range nodes.Items {
				i := slices.IndexFunc(rows, func(r []string) bool { return len(r) == 10 && r[0] == n.Name })
				if i < 0 || rows[i][2] != "true" || rows[i][3] != "true" || rows[i][4] != "true" || rows[i][5] == "0" {
					return false, nil
				}
			}
			return true, nil
		})
		if t.Failed() {
			t.Logf("last output (exit %d):\n%s%s", last.code, last.stdout, last.stderr)
		}
	})

	t.Run("log-level reads and sets through the port-forward", func(t *testing.T) {
		// Set to what deploy/ztunnel starts with, so other tests see no change.
		r := kubectlZtunnel(t, env, dir, "log-level", "info")
		rows := tableRows(r.stdout)
		if r.code != 0 || len(rows) != len(nodes.Items) {
			t.Fatalf("exit %d, want a line per node:\n%s%s", r.code, r.stdout, r.stderr)
		}
		for _, row := range rows {
			if len(row) != 2 || row[1] != "INFO" {
				t.Errorf("row %q, want NODE INFO", row)
			}
		}
	})

	t.Run("a node without ztunnel is a clear error with exit status 1", func(t *testing.T) {
		r := kubectlZtunnel(t, env, dir, "pods", "--node", "no-such-node")
		want := `no ztunnel pod on node "no-such-node"`
		if r.code != 1 || !strings.Contains(r.stderr, want) || r.stdout != "" {
			t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", r.code, r.stdout, r.stderr, want)
		}
	})

	t.Run("an unknown command is a usage error with exit status 2", func(t *testing.T) {
		r := kubectlZtunnel(t, env, dir, "tunnels")
		if r.code != 2 || !strings.Contains(r.stderr, `unknown command "tunnels"`) {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
}
