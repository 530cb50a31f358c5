//go:build e2e

package ztunnel

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// loadResult is the part of load-client's JSON summary the tests read.
type loadResult struct {
	AchievedRate float64          `json:"achieved_rate"`
	ElapsedNs    int64            `json:"elapsed_ns"`
	Succeeded    int64            `json:"succeeded"`
	Failed       int64            `json:"failed"`
	Errors       map[string]int64 `json:"errors"`
	LatencyNs    map[string]int64 `json:"latency_ns"`
	Dials        int64            `json:"dials"`
}

// load runs load-client in the pod with args and returns its summary. A
// run whose requests failed is a result, not an error.
func load(env *kubetest.Env, ns, pod string, args ...string) (loadResult, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	bin := filepath.Join(env.Config.BinDir, "load-client")
	out, err := env.RunKubectl(ctx, append([]string{"exec", "-n", ns, pod, "--", bin, "--output", "json"}, args...)...)
	var r loadResult
	i := strings.Index(out, "{")
	if i < 0 {
		return r, fmt.Errorf("load-client %v: %v\n%s", args, err, out)
	}
	if derr := json.Unmarshal([]byte(out[i:]), &r); derr != nil {
		return r, fmt.Errorf("load-client %v: %v; decoding %q: %v", args, err, out, derr)
	}
	return r, nil
}

func runLoad(b *testing.B, env *kubetest.Env, ns, pod string, args ...string) loadResult {
	b.Helper()
	r, err := load(env, ns, pod, args...)
	if err != nil {
		b.Fatal(err)
	}
	return r
}

// BenchmarkMeshVersusNoMesh runs the same loads side by side in one run, from
// a client on node1 to an echo server on node2, in four namespaces: plain
// (no mesh), ambient (ztunnel on both nodes), plain with a haproxy mTLS
// tunnel pair in between, and plain with one haproxy relaying plain TCP on
// node2 (the external references, see haproxy_test.go): HTTP with 1 KiB
// replies at 1,000 rps over 16 connections for 10 s (latency percentiles),
// and 1 MiB TCP echoes over one connection (throughput). It reports the CPU
// and resident memory of the destination ztunnel during the HTTP load, and
// the CPU of the tunnel (both ztunnels, both haproxy processes of the pair,
// or the relay: one hop without encryption, to set against one ztunnel).
func BenchmarkMeshVersusNoMesh(b *testing.B) {
	env := kubetest.Get(b)
	type side struct {
		name, ns  string
		target    string
		tcpTarget string
	}
	sides := []*side{{name: "nomesh"}, {name: "mesh"}, {name: "haproxy"}, {name: "relay"}}
	for _, s := range sides {
		labels := map[string]string(nil)
		if s.name == "mesh" {
			labels = map[string]string{dataplaneLabel: "ambient"}
		}
		s.ns = env.Namespace(b, labels)
		env.CreatePod(b, echoPod(s.ns, "far", "node2"))
		env.CreatePod(b, onNode(kubetest.SleeperPod(s.ns, "client"), "node1"))
		far := env.WaitPodReady(b, s.ns, "far", 30*time.Second)
		env.WaitPodReady(b, s.ns, "client", 30*time.Second)
		ip := far.Status.PodIP
		switch s.name {
		case "haproxy":
			ip = setupHaproxyPair(b, env, s.ns, ip)
		case "relay":
			ip = setupHaproxyRelay(b, env, s.ns, ip)
		}
		s.target = fmt.Sprintf("http://%s:%d/?size=1024", ip, kubetest.EchoHTTPPort)
		s.tcpTarget = fmt.Sprintf("%s:9000", ip)
	}
	node1, node2 := "172.30.0.11", "172.30.0.12"
	// Each round runs every side once, in turn; the figures reported are
	// the medians over rounds, so one noisy round on this shared machine
	// does not decide them. Run with -benchtime Nx for N rounds.
	type round struct{ p50, p99, echo, cpu, ztCPU, ztRSS float64 }
	rounds := map[string][]round{}
	for b.Loop() {
		for _, s := range sides {
			var cpu0 [2]float64
			switch s.name {
			case "mesh":
				cpu0 = [2]float64{series(b, node1, "process_cpu_seconds_total"), series(b, node2, "process_cpu_seconds_total")}
			case "haproxy", "relay":
				cpu0[0] = haproxyCPUSeconds(b, haproxyProcesses[s.name]...)
			}
			http := runLoad(b, env, s.ns, "client", "--mode", "http", "--target", s.target, "--rate", "1000", "--duration", "10s", "--connections", "16")
			secs := float64(http.ElapsedNs) / 1e9
			r := round{p50: float64(http.LatencyNs["p50"]) / 1e6, p99: float64(http.LatencyNs["p99"]) / 1e6}
			switch s.name {
			case "mesh":
				dst := series(b, node2, "process_cpu_seconds_total") - cpu0[1]
				src := series(b, node1, "process_cpu_seconds_total") - cpu0[0]
				r.ztCPU = dst / secs
				r.ztRSS = series(b, node2, "process_resident_memory_bytes") / (1 << 20)
				r.cpu = (src + dst) / secs
			case "haproxy", "relay":
				r.cpu = (haproxyCPUSeconds(b, haproxyProcesses[s.name]...) - cpu0[0]) / secs
			}
			tcp := runLoad(b, env, s.ns, "client", "--mode", "tcp", "--target", s.tcpTarget, "--size", "1048576", "--requests", "200", "--rate", "1000", "--connections", "1")
			r.echo = float64(tcp.Succeeded) * 2 * 1048576 / (float64(tcp.ElapsedNs) / 1e9) / 1e6
			if http.Failed+tcp.Failed > 0 {
				b.Errorf("%s: %d HTTP and %d TCP requests failed", s.name, http.Failed, tcp.Failed)
			}
			b.Logf("%-8s p50 %.3f ms, p99 %.3f ms, echo %.0f MB/s, tunnel %.3f vCPU", s.name, r.p50, r.p99, r.echo, r.cpu)
			rounds[s.name] = append(rounds[s.name], r)
		}
	}
	for _, s := range sides {
		rs := rounds[s.name]
		med := func(f func(round) float64) float64 {
			v := make([]float64, len(rs))
			for i, r := range rs {
				v[i] = f(r)
			}
			slices.Sort(v)
			return v[len(v)/2]
		}
		b.ReportMetric(med(func(r round) float64 { return r.p50 }), s.name+"-p50-ms")
		b.ReportMetric(med(func(r round) float64 { return r.p99 }), s.name+"-p99-ms")
		b.ReportMetric(med(func(r round) float64 { return r.echo }), s.name+"-echo-MB/s")
		if s.name != "nomesh" {
			b.ReportMetric(med(func(r round) float64 { return r.cpu }), s.name+"-tunnel-vCPU")
		}
		if s.name != "nomesh" {
			// Added latency: this side minus no mesh in the same round.
			added := func(q func(round) float64) float64 {
				v := make([]float64, len(rs))
				for i, r := range rs {
					v[i] = q(r) - q(rounds["nomesh"][i])
				}
				slices.Sort(v)
				return v[len(v)/2]
			}
			b.ReportMetric(added(func(r round) float64 { return r.p50 }), s.name+"-added-p50-ms")
			b.ReportMetric(added(func(r round) float64 { return r.p99 }), s.name+"-added-p99-ms")
		}
		if s.name == "mesh" {
			b.ReportMetric(med(func(r round) float64 { return r.ztCPU }), "ztunnel-vCPU")
			b.ReportMetric(med(func(r round) float64 { return r.ztRSS }), "ztunnel-RSS-MiB")
		}
	}
}

// haproxyProcesses names the haproxy pods of each benchmark side.
var haproxyProcesses = map[string][]string{
	"haproxy": {"haproxy-client", "haproxy-server"},
	"relay":   {"haproxy-relay"},
}

// haproxyCPUSeconds sums the user and system CPU time of the haproxy
// processes of the named pods (haproxyPod), read from /proc (the pods'
// processes run on this machine).
func haproxyCPUSeconds(tb testing.TB, names ...string) float64 {
	tb.Helper()
	dirs, err := os.ReadDir("/proc")
	if err != nil {
		tb.Fatal(err)
	}
	var ticks float64
	for _, d := range dirs {
		cmdline, err := os.ReadFile(filepath.Join("/proc", d.Name(), "cmdline"))
		if err != nil || !slices.ContainsFunc(names, func(name string) bool {
			return strings.Contains(string(cmdline), haproxyConfigDir+name+".cfg\x00")
		}) {
			continue
		}
		stat, err := os.ReadFile(filepath.Join("/proc", d.Name(), "stat"))
		if err != nil {
			continue
		}
		// Fields after the parenthesised command: utime and stime are the
		// 12th and 13th (fields 14 and 15 of proc(5)).
		f := strings.Fields(string(stat[strings.LastIndexByte(string(stat), ')')+1:]))
		if len(f) < 13 {
			continue
		}
		var ut, st float64
		fmt.Sscan(f[11], &ut)
		fmt.Sscan(f[12], &st)
		ticks += ut + st
	}
	// USER_HZ is 100 on Linux.
	return ticks / 100
}
