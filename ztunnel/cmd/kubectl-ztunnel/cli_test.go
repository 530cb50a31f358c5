package main

import (
	"bytes"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

var update = flag.Bool("update", false, "rewrite testdata/*.golden from the output")

// fakeAdmin is a ztunnel admin server: /config_dump serves dump, /logging
// behaves as ztunnel's (ztunnel/internal/proxy/admin.go).
type fakeAdmin struct {
	*httptest.Server
	dump []byte

	mu    sync.Mutex
	level slog.Level // guarded by mu
	posts []string   // guarded by mu; levels set
}

func newFakeAdmin(t *testing.T, dump []byte) *fakeAdmin {
	t.Helper()
	a := &fakeAdmin{dump: dump}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /config_dump", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.Write(a.dump)
	})
	mux.HandleFunc("/logging", func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		defer a.mu.Unlock()
		if lv := r.URL.Query().Get("level"); lv != "" {
			if r.Method != http.MethodPost && r.Method != http.MethodPut {
				http.Error(w, "change the level with POST /logging?level=debug|info|warn|error", http.StatusMethodNotAllowed)
				return
			}
			if err := a.level.UnmarshalText([]byte(lv)); err != nil {
				http.Error(w, fmt.Sprintf("level %q: %v", lv, err), http.StatusBadRequest)
				return
			}
			a.posts = append(a.posts, lv)
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, "{\n  \"level\": %q\n}\n", a.level.String())
	})
	a.Server = httptest.NewServer(mux)
	t.Cleanup(a.Close)
	return a
}

// testCLI runs the plugin with its clock at testNow and, for commands that
// go to Kubernetes, the ztunnel pods given.
func testCLI(pods []corev1.Pod, admins map[string]*fakeAdmin) *cli {
	c := newCLI(nil, nil)
	c.now = func() time.Time { return testNow }
	c.find = func(ctx context.Context, o *options) ([]ztunnel, error) {
		return ztunnelsOf(pods, o.node, func(p *corev1.Pod) openFunc {
			u, _ := url.Parse(admins[p.Name].URL)
			return adminURLZtunnel(u).open
		})
	}
	return c
}

type result struct {
	stdout, stderr string
	code           int
}

func (c *cli) runArgs(t *testing.T, args ...string) result {
	t.Helper()
	var stdout, stderr bytes.Buffer
	c.stdout, c.stderr = &stdout, &stderr
	code := c.run(context.Background(), args)
	return result{stdout.String(), stderr.String(), code}
}

// golden compares got with testdata/name.golden (rewritten with -update).
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name+".golden")
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if got != string(want) {
		t.Errorf("output differs from %s (run with -update to accept):\n--- got\n%s--- want\n%s", path, got, want)
	}
}

func ztunnelPod(name, node string, phase corev1.PodPhase, ready bool, created time.Time) corev1.Pod {
	cond := corev1.ConditionFalse
	if ready {
		cond = corev1.ConditionTrue
	}
	return corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: "istio-system", Name: name, Labels: map[string]string{"app": "ztunnel"},
			CreationTimestamp: metav1.NewTime(created)},
		Spec: corev1.PodSpec{NodeName: node, HostNetwork: true},
		Status: corev1.PodStatus{Phase: phase,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: cond}}},
	}
}

// cluster is three nodes: node1 and node2 run ztunnel, node3's ztunnel pod
// is still pending.
func cluster(t *testing.T) *cli {
	t.Helper()
	pods := []corev1.Pod{
		ztunnelPod("ztunnel-b7k2p", "node2", corev1.PodRunning, false, testNow.Add(-time.Hour)),
		ztunnelPod("ztunnel-x4m9q", "node1", corev1.PodRunning, true, testNow.Add(-time.Hour)),
		ztunnelPod("ztunnel-p0dq1", "node3", corev1.PodPending, false, testNow.Add(-time.Minute)),
	}
	return testCLI(pods, map[string]*fakeAdmin{
		"ztunnel-x4m9q": newFakeAdmin(t, marshal(t, node1Dump(t))),
		"ztunnel-b7k2p": newFakeAdmin(t, marshal(t, node2Dump(t))),
	})
}

func TestTablesOfOneAdminServer(t *testing.T) {
	admin := newFakeAdmin(t, marshal(t, node1Dump(t)))
	for _, args := range [][]string{
		{"workloads"}, {"services"}, {"policies"}, {"certificates"}, {"pods"}, {"connections"}, {"status"}, {"log-level"},
		{"workloads", "-n", "plain"},
		{"certificates", "-n", "demo"},
	} {
		name := strings.Join(args, " ")
		t.Run(name, func(t *testing.T) {
			r := testCLI(nil, nil).runArgs(t, append(args, "--admin-url", admin.URL)...)
			if r.code != exitOK || r.stderr != "" {
				t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
			}
			golden(t, "admin-"+strings.ReplaceAll(name, " ", "_"), r.stdout)
		})
	}
}

func TestTablesAcrossNodesNameEachNodeAndThePodThatDidNotAnswer(t *testing.T) {
	for _, args := range [][]string{
		{"workloads", "-n", "demo"}, {"pods"}, {"connections"}, {"certificates"}, {"status"}, {"log-level"},
	} {
		name := strings.Join(args, " ")
		t.Run(name, func(t *testing.T) {
			r := cluster(t).runArgs(t, args...)
			if r.code != exitError {
				t.Errorf("exit %d, want %d: node3's ztunnel is not running", r.code, exitError)
			}
			if want := "error: ztunnel pod istio-system/ztunnel-p0dq1 on node node3: pod is Pending, not Running\n"; r.stderr != want {
				t.Errorf("stderr %q, want %q", r.stderr, want)
			}
			golden(t, "nodes-"+strings.ReplaceAll(name, " ", "_"), r.stdout)
		})
	}
}

func TestNodeSelectsOneZtunnel(t *testing.T) {
	t.Run("the ztunnel on that node answers alone", func(t *testing.T) {
		r := cluster(t).runArgs(t, "pods", "--node", "node2")
		if r.code != exitOK || r.stderr != "" {
			t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
		}
		want := "NODE    WORKLOAD   REDIRECTION   LISTENERS           ACTIVE CONNECTIONS\n" +
			"node2   demo/far   ebpf          15001,15006,15008   2\n"
		if r.stdout != want {
			t.Errorf("stdout:\n%s\nwant:\n%s", r.stdout, want)
		}
	})
	t.Run("a node without ztunnel is an error naming the nodes that have one", func(t *testing.T) {
		r := cluster(t).runArgs(t, "pods", "--node", "node9")
		want := `error: no ztunnel pod on node "node9" (ztunnel pods are on node1, node2, node3)` + "\n"
		if r.code != exitError || r.stdout != "" || r.stderr != want {
			t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", r.code, r.stdout, r.stderr, want)
		}
	})
	t.Run("a node whose ztunnel is not running is an error naming the pod", func(t *testing.T) {
		r := cluster(t).runArgs(t, "status", "--node", "node3")
		if r.code != exitError || !strings.Contains(r.stderr, "ztunnel pod istio-system/ztunnel-p0dq1 on node node3: pod is Pending, not Running") {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
}

// sectionOf decodes a section of a served dump, to compare with -o json.
func sectionOf(t *testing.T, dump []byte, section string) any {
	t.Helper()
	var sections map[string]any
	if err := json.Unmarshal(dump, &sections); err != nil {
		t.Fatal(err)
	}
	return sections[section]
}

func decode(t *testing.T, s string) any {
	t.Helper()
	var v any
	if err := json.Unmarshal([]byte(s), &v); err != nil {
		t.Fatalf("output is not JSON: %v\n%s", err, s)
	}
	return v
}

func TestJSONIsTheSectionAsServed(t *testing.T) {
	dump := marshal(t, node1Dump(t))
	admin := newFakeAdmin(t, dump)
	for _, section := range []string{"workloads", "services", "policies", "certificates", "pods", "connections"} {
		t.Run(section+" from one admin server is the section itself", func(t *testing.T) {
			r := testCLI(nil, nil).runArgs(t, section, "-o", "json", "--admin-url", admin.URL)
			if r.code != exitOK || r.stderr != "" {
				t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
			}
			if got, want := decode(t, r.stdout), sectionOf(t, dump, section); !reflect.DeepEqual(got, want) {
				t.Errorf("got %v\nwant %v", got, want)
			}
		})
	}
	t.Run("across nodes, the sections are keyed by node", func(t *testing.T) {
		r := cluster(t).runArgs(t, "pods", "-o", "json")
		got, ok := decode(t, r.stdout).(map[string]any)
		if !ok || len(got) != 2 {
			t.Fatalf("got %s, want an object with node1 and node2", r.stdout)
		}
		if want := sectionOf(t, marshal(t, node2Dump(t)), "pods"); !reflect.DeepEqual(got["node2"], want) {
			t.Errorf("node2: got %v\nwant %v", got["node2"], want)
		}
		if r.code != exitError || !strings.Contains(r.stderr, "ztunnel-p0dq1") {
			t.Errorf("exit %d, stderr %q: want node3's pod reported", r.code, r.stderr)
		}
	})
	t.Run("-n keeps the elements of that namespace", func(t *testing.T) {
		r := testCLI(nil, nil).runArgs(t, "workloads", "-o", "json", "-n", "plain", "--admin-url", admin.URL)
		got, _ := decode(t, r.stdout).([]any)
		if len(got) != 1 || got[0].(map[string]any)["name"] != "outsider" {
			t.Errorf("got %s, want the one workload of namespace plain", r.stdout)
		}
	})
	t.Run("status is one object per ztunnel", func(t *testing.T) {
		r := cluster(t).runArgs(t, "status", "-o", "json")
		var rows []statusRow
		if err := json.Unmarshal([]byte(r.stdout), &rows); err != nil || len(rows) != 3 {
			t.Fatalf("%v: %s", err, r.stdout)
		}
		if rows[0].Node != "node1" || !*rows[0].Ready || *rows[0].Workloads != 5 || *rows[2].Ready || rows[2].Error == "" {
			t.Errorf("got %s", r.stdout)
		}
	})
}

func TestLogLevel(t *testing.T) {
	t.Run("a level given is set on every ztunnel, then shown", func(t *testing.T) {
		a1, a2 := newFakeAdmin(t, nil), newFakeAdmin(t, nil)
		c := testCLI([]corev1.Pod{
			ztunnelPod("ztunnel-1", "node1", corev1.PodRunning, true, testNow),
			ztunnelPod("ztunnel-2", "node2", corev1.PodRunning, true, testNow),
		}, map[string]*fakeAdmin{"ztunnel-1": a1, "ztunnel-2": a2})
		r := c.runArgs(t, "log-level", "debug")
		if r.code != exitOK || r.stderr != "" {
			t.Fatalf("exit %d, stderr %q", r.code, r.stderr)
		}
		if want := "NODE    LEVEL\nnode1   DEBUG\nnode2   DEBUG\n"; r.stdout != want {
			t.Errorf("stdout %q, want %q", r.stdout, want)
		}
		for _, a := range []*fakeAdmin{a1, a2} {
			if !reflect.DeepEqual(a.posts, []string{"debug"}) {
				t.Errorf("levels posted: %q, want [debug]", a.posts)
			}
		}
	})
	t.Run("without a level nothing is set", func(t *testing.T) {
		a := newFakeAdmin(t, nil)
		r := testCLI(nil, nil).runArgs(t, "log-level", "--admin-url", a.URL, "-o", "json")
		if r.code != exitOK || decode(t, r.stdout).(map[string]any)["level"] != "INFO" || len(a.posts) != 0 {
			t.Errorf("exit %d, stdout %q, posted %q", r.code, r.stdout, a.posts)
		}
	})
	t.Run("a level the ztunnel refuses is its error", func(t *testing.T) {
		// Valid for the plugin (slog's syntax), refused by this server.
		a := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			http.Error(w, `level "debug-8": out of range`, http.StatusBadRequest)
		}))
		t.Cleanup(a.Close)
		r := testCLI(nil, nil).runArgs(t, "log-level", "debug-8", "--admin-url", a.URL)
		want := "error: ztunnel admin server " + a.URL + `: setting the log level to debug-8: POST /logging: 400 Bad Request: level "debug-8": out of range` + "\n"
		if r.code != exitError || r.stderr != want {
			t.Errorf("exit %d, stderr %q, want %q", r.code, r.stderr, want)
		}
	})
}

func TestErrorsNameTheZtunnelAndWhatFailed(t *testing.T) {
	closed := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		addr := ln.Addr().String()
		ln.Close()
		return "http://" + addr
	}()
	serve := func(status int, body string) string {
		srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(status)
			fmt.Fprint(w, body)
		}))
		t.Cleanup(srv.Close)
		return srv.URL
	}
	notFound := httptest.NewServer(http.NewServeMux())
	t.Cleanup(notFound.Close)
	tests := []struct {
		name, url, want string
	}{
		{"an admin server without /config_dump", notFound.URL, ": GET /config_dump: 404 Not Found: 404 page not found"},
		{"a server error", serve(http.StatusInternalServerError, "boom\nmore"), ": GET /config_dump: 500 Internal Server Error: boom"},
		{"an answer that is not JSON", serve(http.StatusOK, "<html>hello</html>"), ": decoding /config_dump: invalid character '<'"},
		{"a section of the wrong shape", serve(http.StatusOK, `{"workloads": {"a": 1}}`), ": decoding /config_dump: json: cannot unmarshal object"},
		{"nothing listening", closed, ": GET /config_dump: dial tcp " + strings.TrimPrefix(closed, "http://") + ": connect: connection refused"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testCLI(nil, nil).runArgs(t, "workloads", "--admin-url", tt.url)
			prefix := "error: ztunnel admin server " + tt.url
			if r.code != exitError || !strings.HasPrefix(r.stderr, prefix+tt.want) || r.stdout != "" {
				t.Errorf("exit %d, stdout %q, stderr %q; want exit 1 and %q", r.code, r.stdout, r.stderr, prefix+tt.want+"...")
			}
		})
	}
	t.Run("a dump without the section asked for", func(t *testing.T) {
		r := testCLI(nil, nil).runArgs(t, "certificates", "-o", "json", "--admin-url", serve(http.StatusOK, `{"workloads": []}`))
		if r.code != exitError || !strings.Contains(r.stderr, `/config_dump has no "certificates" section`) {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("no ztunnel pods at all", func(t *testing.T) {
		r := testCLI(nil, nil).runArgs(t, "status")
		if r.code != exitError || r.stderr != "error: no ztunnel pod found: is ztunnel installed?\n" {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
	t.Run("an admin server that does not answer in time", func(t *testing.T) {
		hang := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() }))
		t.Cleanup(hang.Close)
		r := testCLI(nil, nil).runArgs(t, "status", "--admin-url", hang.URL, "--timeout", "100ms")
		if r.code != exitError || !strings.Contains(r.stderr, "GET /config_dump: context deadline exceeded (no answer within --timeout=100ms)") {
			t.Errorf("exit %d, stderr %q", r.code, r.stderr)
		}
	})
}

func TestUsageErrorsExitWithStatus2(t *testing.T) {
	tests := []struct {
		name string
		args []string
		want string
	}{
		{"no command", nil, "error: no command"},
		{"an unknown command", []string{"tunnels"}, `error: unknown command "tunnels"`},
		{"an unknown flag", []string{"workloads", "--nodes", "x"}, "error: unknown flag: --nodes"},
		{"an argument too many", []string{"workloads", "extra"}, `error: workloads takes at most 0 argument(s), got ["extra"]`},
		{"an unknown output format", []string{"pods", "-o", "yaml"}, `error: --output "yaml": want table or json`},
		{"--admin-url with --node", []string{"pods", "--admin-url", "http://127.0.0.1:15000", "--node", "n"}, "error: --admin-url and --node exclude each other"},
		{"an --admin-url that is not a URL", []string{"pods", "--admin-url", "127.0.0.1:15000"}, `error: --admin-url "127.0.0.1:15000": want http://HOST:PORT`},
		{"an unknown log level", []string{"log-level", "loud"}, `error: log level "loud": want debug, info, warn or error`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := testCLI(nil, nil).runArgs(t, tt.args...)
			if r.code != exitUsage || !strings.HasPrefix(r.stderr, tt.want+"\n") || !strings.Contains(r.stderr, "Usage:\n  kubectl ztunnel COMMAND") {
				t.Errorf("exit %d, stderr %q; want exit 2, %q and the usage", r.code, r.stderr, tt.want)
			}
		})
	}
	t.Run("--help prints the usage with the flags and succeeds", func(t *testing.T) {
		r := testCLI(nil, nil).runArgs(t, "--help")
		if r.code != exitOK || !strings.Contains(r.stdout, "--admin-url") || !strings.Contains(r.stdout, "--kubeconfig") || r.stderr != "" {
			t.Errorf("exit %d, stdout %q, stderr %q", r.code, r.stdout, r.stderr)
		}
	})
}
