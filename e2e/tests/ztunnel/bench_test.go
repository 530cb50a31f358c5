//go:build e2e

package ztunnel

import (
	"context"
	"encoding/json"
	"fmt"
	"path/filepath"
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
// a client on node1 to an echo server on node2, once in a plain namespace and
// once in an ambient one: HTTP with 1 KiB replies at 1,000 rps over 16
// connections for 10 s (latency percentiles), and 1 MiB TCP echoes over one
// connection (throughput). It reports the destination ztunnel's CPU and
// resident memory during the HTTP load.
func BenchmarkMeshVersusNoMesh(b *testing.B) {
	env := kubetest.Get(b)
	type side struct {
		name, ns  string
		http, tcp loadResult
		target    string
		tcpTarget string
	}
	sides := []*side{{name: "nomesh"}, {name: "mesh"}}
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
		s.target = fmt.Sprintf("http://%s:%d/?size=1024", far.Status.PodIP, kubetest.EchoHTTPPort)
		s.tcpTarget = fmt.Sprintf("%s:9000", far.Status.PodIP)
	}
	node2 := "172.30.0.12"
	for b.Loop() {
		for _, s := range sides {
			cpu0 := series(b, node2, "process_cpu_seconds_total")
			s.http = runLoad(b, env, s.ns, "client", "--mode", "http", "--target", s.target, "--rate", "1000", "--duration", "10s", "--connections", "16")
			if s.name == "mesh" {
				cpu := series(b, node2, "process_cpu_seconds_total") - cpu0
				b.ReportMetric(cpu/(float64(s.http.ElapsedNs)/1e9), "ztunnel-vCPU")
				b.ReportMetric(series(b, node2, "process_resident_memory_bytes")/(1<<20), "ztunnel-RSS-MiB")
			}
			s.tcp = runLoad(b, env, s.ns, "client", "--mode", "tcp", "--target", s.tcpTarget, "--size", "1048576", "--requests", "200", "--rate", "1000", "--connections", "1")
		}
	}
	for _, s := range sides {
		b.ReportMetric(float64(s.http.LatencyNs["p50"])/1e6, s.name+"-p50-ms")
		b.ReportMetric(float64(s.http.LatencyNs["p99"])/1e6, s.name+"-p99-ms")
		mbps := float64(s.tcp.Succeeded) * 2 * 1048576 / (float64(s.tcp.ElapsedNs) / 1e9) / 1e6
		b.ReportMetric(mbps, s.name+"-echo-MB/s")
		if s.http.Failed+s.tcp.Failed > 0 {
			b.Errorf("%s: %d HTTP and %d TCP requests failed", s.name, s.http.Failed, s.tcp.Failed)
		}
	}
}
