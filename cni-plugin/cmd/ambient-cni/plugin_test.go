package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/containernetworking/cni/pkg/skel"
	"github.com/containernetworking/cni/pkg/types"

	"github.com/ambient-mesh/ambient/cni-plugin/internal/cniapi"
)

// TestMain lets the test binary double as the plugin, so tests can run it
// the way a container runtime does (environment, stdin, stdout, exit code).
func TestMain(m *testing.M) {
	if os.Getenv("AMBIENT_CNI_TEST_RUN_PLUGIN") == "1" {
		main()
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// fakeAgent stands in for cni-agent behind the real cniapi handler.
type fakeAgent struct {
	mu       sync.Mutex
	requests map[string][]cniapi.PodRequest
	outcome  cniapi.Outcome
	err      error
}

func (a *fakeAgent) handle(path string, r *cniapi.PodRequest) (*cniapi.Response, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.requests == nil {
		a.requests = map[string][]cniapi.PodRequest{}
	}
	if r != nil {
		a.requests[path] = append(a.requests[path], *r)
	}
	if a.err != nil {
		return nil, a.err
	}
	return &cniapi.Response{Outcome: a.outcome}, nil
}

func (a *fakeAgent) got(path string) []cniapi.PodRequest {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.requests[path]
}

func (a *fakeAgent) Add(_ context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	return a.handle(cniapi.PathAdd, r)
}

func (a *fakeAgent) Del(_ context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	return a.handle(cniapi.PathDel, r)
}

func (a *fakeAgent) Check(_ context.Context, r *cniapi.PodRequest) (*cniapi.Response, error) {
	return a.handle(cniapi.PathCheck, r)
}

func (a *fakeAgent) Status(context.Context) (*cniapi.Response, error) {
	return a.handle(cniapi.PathStatus, nil)
}

// startAgent serves a over a unix socket and returns the socket path.
func startAgent(t *testing.T, a *fakeAgent) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "cni.sock")
	ln, err := cniapi.Listen(path)
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: cniapi.NewHandler(a, nil)}
	go srv.Serve(ln)
	t.Cleanup(func() { srv.Close() })
	return path
}

const prevResult100 = `{
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "mac": "0a:58:0a:f4:01:05", "sandbox": "/var/run/netns/cni-1"}],
    "ips": [
      {"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0},
      {"address": "fd00:10:244:1::5/64", "interface": 0}
    ],
    "routes": [{"dst": "0.0.0.0/0"}],
    "dns": {"nameservers": ["10.96.0.10"]},
    "x-unknown": {"kept": true}
  }`

const prevResult040 = `{"cniVersion":"0.4.0","interfaces":[{"name":"eth0","sandbox":"/var/run/netns/cni-1"}],"ips":[{"version":"4","address":"10.244.1.5/24","gateway":"10.244.1.1","interface":0}],"dns":{}}`

// netConf is a chained plugin config as libcni hands it over.
func netConf(version, socket, prev string, extra ...string) []byte {
	s := `{"cniVersion": "` + version + `", "name": "ambk", "type": "ambient-cni", "agentSocket": "` + socket + `"`
	for _, e := range extra {
		s += ", " + e
	}
	if prev != "" {
		s += `, "prevResult": ` + prev
	}
	return []byte(s + "}")
}

const podArgs = "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0;K8S_POD_INFRA_CONTAINER_ID=sandbox-1;K8S_POD_UID=0b5c6c5e-uid"

func cmdArgs(stdin []byte, cniArgs string) *skel.CmdArgs {
	return &skel.CmdArgs{ContainerID: "c1", Netns: "/var/run/netns/cni-1", IfName: "eth0", Args: cniArgs, StdinData: stdin}
}

func run(fn func(*plugin, *skel.CmdArgs) error, args *skel.CmdArgs) (stdout string, err error) {
	var out, errOut bytes.Buffer
	err = fn(&plugin{stdout: &out, stderr: &errOut}, args)
	return out.String(), err
}

func cniCode(t *testing.T, err error) uint {
	t.Helper()
	var e *types.Error
	if !errors.As(err, &e) {
		t.Fatalf("error %v is not a CNI error", err)
	}
	return e.Code
}

func TestAddForwardsThePodAndPassesPrevResultThrough(t *testing.T) {
	for _, outcome := range []cniapi.Outcome{cniapi.Enrolled, cniapi.Skipped} {
		t.Run(string(outcome), func(t *testing.T) {
			a := &fakeAgent{outcome: outcome}
			sock := startAgent(t, a)
			out, err := run((*plugin).add, cmdArgs(netConf("1.0.0", sock, prevResult100), podArgs))
			if err != nil {
				t.Fatalf("ADD: %v", err)
			}
			if out != prevResult100+"\n" {
				t.Fatalf("ADD printed\n%s\nwant prevResult unchanged:\n%s", out, prevResult100)
			}
			want := cniapi.PodRequest{
				ContainerID: "c1", Netns: "/var/run/netns/cni-1", IfName: "eth0",
				PodName: "web-0", PodNamespace: "shop", PodUID: "0b5c6c5e-uid", SandboxID: "sandbox-1",
				IPs: []netip.Addr{netip.MustParseAddr("10.244.1.5"), netip.MustParseAddr("fd00:10:244:1::5")},
			}
			if got := a.got(cniapi.PathAdd); len(got) != 1 || !reflect.DeepEqual(got[0], want) {
				t.Fatalf("agent got %+v, want %+v", got, want)
			}
		})
	}
}

func TestAddFailsClosed(t *testing.T) {
	tests := []struct {
		name     string
		agent    *fakeAgent // nil: no agent listening
		wantCode uint
		wantMsg  string
	}{
		{"when the agent is not running", nil, types.ErrTryAgainLater, "node agent unreachable"},
		{"when no ztunnel is connected", &fakeAgent{err: errors.Join(cniapi.ErrUnavailable, errors.New("no ztunnel connected"))}, types.ErrTryAgainLater, "no ztunnel connected"},
		{"when redirection cannot be installed", &fakeAgent{err: errors.New("installing redirection: netns gone")}, types.ErrInternal, "installing redirection: netns gone"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "absent.sock")
			if tt.agent != nil {
				sock = startAgent(t, tt.agent)
			}
			out, err := run((*plugin).add, cmdArgs(netConf("1.0.0", sock, prevResult100), podArgs))
			if err == nil {
				t.Fatal("ADD succeeded")
			}
			if code := cniCode(t, err); code != tt.wantCode {
				t.Fatalf("ADD error code %d, want %d (%v)", code, tt.wantCode, err)
			}
			if !strings.Contains(err.Error(), tt.wantMsg) || !strings.Contains(err.Error(), "shop/web-0") {
				t.Fatalf("ADD error %q does not say %q for shop/web-0", err, tt.wantMsg)
			}
			if out != "" {
				t.Fatalf("failed ADD printed a result: %s", out)
			}
		})
	}
}

func TestAddPassesNonKubernetesContainersWithoutTheAgent(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "absent.sock")
	out, err := run((*plugin).add, cmdArgs(netConf("1.0.0", sock, prevResult100), "IgnoreUnknown=1"))
	if err != nil || out != prevResult100+"\n" {
		t.Fatalf("ADD: %q, %v", out, err)
	}
}

func TestBadInputIsAClearError(t *testing.T) {
	sock := startAgent(t, &fakeAgent{outcome: cniapi.Enrolled})
	tests := []struct {
		name     string
		stdin    []byte
		cniArgs  string
		wantCode uint
		wantMsg  string
	}{
		{"a config that is not JSON", []byte(`{"cniVersion": "1.0.0", "name": `), podArgs, types.ErrDecodingFailure, "parsing network config"},
		{"a config without prevResult", netConf("1.0.0", sock, ""), podArgs, types.ErrInvalidNetworkConfig, "chained plugin"},
		{"a prevResult that is not a result", netConf("1.0.0", sock, `{"ips": "10.0.0.1"}`), podArgs, types.ErrDecodingFailure, "parsing prevResult"},
		{"an unknown log level", netConf("1.0.0", sock, prevResult100, `"log_level": "loud"`), podArgs, types.ErrInvalidNetworkConfig, "log_level"},
		{"an agentSocket that is not a string", netConf("1.0.0", sock, prevResult100, `"agentSocket": 7`), podArgs, types.ErrDecodingFailure, "parsing network config"},
		{"CNI_ARGS that are not pairs", netConf("1.0.0", sock, prevResult100), "K8S_POD_NAME", types.ErrInvalidEnvironmentVariables, "CNI_ARGS"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			for cmd, fn := range map[string]func(*plugin, *skel.CmdArgs) error{"ADD": (*plugin).add, "CHECK": (*plugin).check} {
				_, err := run(fn, cmdArgs(tt.stdin, tt.cniArgs))
				if err == nil {
					t.Fatalf("%s succeeded", cmd)
				}
				if code := cniCode(t, err); code != tt.wantCode || !strings.Contains(err.Error(), tt.wantMsg) {
					t.Fatalf("%s: %v (code %d), want code %d mentioning %q", cmd, err, code, tt.wantCode, tt.wantMsg)
				}
			}
		})
	}
}

func TestDelAlwaysSucceeds(t *testing.T) {
	a := &fakeAgent{outcome: cniapi.Removed}
	sock := startAgent(t, a)
	absent := filepath.Join(t.TempDir(), "absent.sock")
	tests := []struct {
		name  string
		stdin []byte
		args  *skel.CmdArgs
	}{
		{"with the agent", netConf("1.0.0", sock, prevResult100), nil},
		{"without prevResult", netConf("1.0.0", sock, ""), nil},
		{"when the agent is gone", netConf("1.0.0", absent, prevResult100), nil},
		{"when the agent fails", netConf("1.0.0", startAgent(t, &fakeAgent{err: errors.New("boom")}), ""), nil},
		{"with a malformed config", []byte(`{"cniVersion":`), nil},
		{"with malformed CNI_ARGS", netConf("1.0.0", sock, ""), &skel.CmdArgs{ContainerID: "c2", Args: "garbage"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			args := tt.args
			if args == nil {
				args = cmdArgs(tt.stdin, podArgs)
				args.Netns = "" // the netns is often gone by DEL
			}
			args.StdinData = tt.stdin
			if out, err := run((*plugin).del, args); err != nil || out != "" {
				t.Fatalf("DEL: %q, %v", out, err)
			}
		})
	}
	if got := a.got(cniapi.PathDel); len(got) != 2 || got[0].PodName != "web-0" || got[0].PodUID != "0b5c6c5e-uid" {
		t.Fatalf("agent got DELs %+v, want two for web-0", got)
	}
}

func TestCheckAsksTheAgent(t *testing.T) {
	tests := []struct {
		name    string
		agent   *fakeAgent
		wantErr string
	}{
		{"redirection in place passes", &fakeAgent{outcome: cniapi.Enrolled}, ""},
		{"a non-ambient pod passes", &fakeAgent{outcome: cniapi.Skipped}, ""},
		{"missing redirection fails", &fakeAgent{err: errors.New("redirection not installed in /var/run/netns/cni-1")}, "redirection not installed"},
		{"an absent agent fails", nil, "node agent unreachable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "absent.sock")
			if tt.agent != nil {
				sock = startAgent(t, tt.agent)
			}
			_, err := run((*plugin).check, cmdArgs(netConf("1.0.0", sock, prevResult100), podArgs))
			if tt.wantErr == "" && err != nil {
				t.Fatalf("CHECK: %v", err)
			}
			if tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
				t.Fatalf("CHECK: %v, want an error mentioning %q", err, tt.wantErr)
			}
			if tt.agent != nil && len(tt.agent.got(cniapi.PathCheck)) != 1 {
				t.Fatal("agent was not asked")
			}
		})
	}
}

func TestStatusReportsTheAgent(t *testing.T) {
	sock := startAgent(t, &fakeAgent{outcome: cniapi.Ready})
	if _, err := run((*plugin).status, cmdArgs(netConf("1.1.0", sock, ""), "")); err != nil {
		t.Fatalf("STATUS with a ready agent: %v", err)
	}
	sock = startAgent(t, &fakeAgent{err: errors.New("ztunnel not connected")})
	if _, err := run((*plugin).status, cmdArgs(netConf("1.1.0", sock, ""), "")); err == nil || cniCode(t, err) != types.ErrPluginNotAvailable || !strings.Contains(err.Error(), "ztunnel not connected") {
		t.Fatalf("STATUS with an unready agent: %v", err)
	}
	absent := filepath.Join(t.TempDir(), "absent.sock")
	if _, err := run((*plugin).status, cmdArgs(netConf("1.1.0", absent, ""), "")); err == nil || cniCode(t, err) != types.ErrPluginNotAvailable {
		t.Fatalf("STATUS without an agent: %v", err)
	}
}

// execPlugin runs the plugin as a runtime would.
func execPlugin(t *testing.T, command string, stdin []byte) (stdout []byte, exitErr error) {
	t.Helper()
	cmd := exec.Command(os.Args[0])
	cmd.Env = append(os.Environ(),
		"AMBIENT_CNI_TEST_RUN_PLUGIN=1",
		"CNI_COMMAND="+command,
		"CNI_CONTAINERID=c1",
		"CNI_NETNS=/var/run/netns/does-not-exist",
		"CNI_IFNAME=eth0",
		"CNI_PATH=/opt/cni/bin",
		"CNI_ARGS="+podArgs,
	)
	cmd.Stdin = bytes.NewReader(stdin)
	var out bytes.Buffer
	cmd.Stdout = &out
	cmd.Stderr = testLog{t}
	err := cmd.Run()
	return out.Bytes(), err
}

type testLog struct{ t *testing.T }

func (l testLog) Write(b []byte) (int, error) {
	l.t.Log(strings.TrimSpace(string(b)))
	return len(b), nil
}

func TestThePluginBinarySpeaksCNI(t *testing.T) {
	a := &fakeAgent{outcome: cniapi.Enrolled}
	sock := startAgent(t, a)
	for _, tc := range []struct{ version, prev string }{{"1.0.0", prevResult100}, {"0.4.0", prevResult040}, {"1.1.0", prevResult100}} {
		t.Run("ADD at "+tc.version, func(t *testing.T) {
			out, err := execPlugin(t, "ADD", netConf(tc.version, sock, tc.prev))
			if err != nil {
				t.Fatalf("ADD: %v; stdout %s", err, out)
			}
			var got, want any
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("ADD printed %q: %v", out, err)
			}
			json.Unmarshal([]byte(tc.prev), &want)
			if !reflect.DeepEqual(got, want) {
				t.Fatalf("ADD printed %s, want prevResult %s", out, tc.prev)
			}
		})
	}
	t.Run("VERSION", func(t *testing.T) {
		out, err := execPlugin(t, "VERSION", []byte(`{"cniVersion":"1.0.0"}`))
		if err != nil || !strings.Contains(string(out), `"1.0.0"`) || !strings.Contains(string(out), `"0.3.1"`) {
			t.Fatalf("VERSION: %s, %v", out, err)
		}
	})
	t.Run("ADD failing prints a CNI error", func(t *testing.T) {
		out, err := execPlugin(t, "ADD", netConf("1.0.0", filepath.Join(t.TempDir(), "absent.sock"), prevResult100))
		if err == nil {
			t.Fatal("ADD without agent exited 0")
		}
		var e types.Error
		if jerr := json.Unmarshal(out, &e); jerr != nil || e.Code != types.ErrTryAgainLater || !strings.Contains(e.Msg, "node agent unreachable") {
			t.Fatalf("ADD printed %s, want a try-again-later error", out)
		}
	})
	t.Run("DEL without the agent exits 0", func(t *testing.T) {
		if out, err := execPlugin(t, "DEL", netConf("1.0.0", filepath.Join(t.TempDir(), "absent.sock"), "")); err != nil {
			t.Fatalf("DEL: %v; %s", err, out)
		}
	})
	t.Run("CHECK and STATUS", func(t *testing.T) {
		if out, err := execPlugin(t, "CHECK", netConf("1.0.0", sock, prevResult100)); err != nil {
			t.Fatalf("CHECK: %v; %s", err, out)
		}
		if out, err := execPlugin(t, "STATUS", netConf("1.1.0", sock, "")); err != nil {
			t.Fatalf("STATUS: %v; %s", err, out)
		}
	})
}
