//go:build e2e

package cni

import (
	"context"
	"fmt"
	"sort"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// createReady creates a sleeper pod on node1 and returns the time from the
// create call to its Ready condition seen by a watch.
func createReady(b *testing.B, env *kubetest.Env, ns, name string) time.Duration {
	ctx := context.Background()
	w, err := env.Client.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String()})
	if err != nil {
		b.Fatal(err)
	}
	defer w.Stop()
	pod := kubetest.SleeperPod(ns, name)
	pod.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": "node1"}
	start := time.Now()
	env.CreatePod(b, pod)
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				b.Fatalf("watch on %s closed", name)
			}
			if p, ok := ev.Object.(*corev1.Pod); ok && ev.Type != watch.Deleted && kubetest.PodReady(p) {
				return time.Since(start)
			}
		case <-timeout:
			b.Fatalf("pod %s/%s not Ready in 30s", ns, name)
		}
	}
}

func deleteAndWait(b *testing.B, env *kubetest.Env, ns, name string) {
	ctx := context.Background()
	env.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
	env.WaitFor(b, 30*time.Second, "pod "+name+" gone", func(ctx context.Context) (bool, error) {
		_, err := env.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
		return err != nil, nil
	})
}

func percentile(d []time.Duration, p int) float64 {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return float64(s[(len(s)*p)/100].Microseconds()) / 1000
}

// BenchmarkAmbientPodOverhead creates pods one at a time on one node,
// alternating a plain and an ambient namespace, and reports create-to-Ready
// for both: the difference is what enrollment (CNI ADD through the agent,
// redirection, ZDS hand-off to ztunnel, the annotation) adds.
func BenchmarkAmbientPodOverhead(b *testing.B) {
	env := kubetest.Get(b)
	plain := env.Namespace(b, nil)
	mesh := env.Namespace(b, map[string]string{dataplaneLabel: "ambient"})
	var plainLat, meshLat []time.Duration
	i := 0
	for b.Loop() {
		name := fmt.Sprintf("p-%d", i)
		i++
		plainLat = append(plainLat, createReady(b, env, plain, name))
		meshLat = append(meshLat, createReady(b, env, mesh, name))
		b.StopTimer()
		deleteAndWait(b, env, plain, name)
		deleteAndWait(b, env, mesh, name)
		b.StartTimer()
	}
	b.ReportMetric(percentile(plainLat, 50), "plain-p50-ms")
	b.ReportMetric(percentile(plainLat, 99), "plain-p99-ms")
	b.ReportMetric(percentile(meshLat, 50), "ambient-p50-ms")
	b.ReportMetric(percentile(meshLat, 99), "ambient-p99-ms")
}

// BenchmarkEnrollRunningNamespace labels a namespace holding 100 running pods
// (50 per node) and reports the time until every pod carries the redirection
// annotation, which the agent writes once redirection is in place and ztunnel
// has the pod.
func BenchmarkEnrollRunningNamespace(b *testing.B) {
	const pods = 100
	env := kubetest.Get(b)
	ctx := context.Background()
	ns := env.Namespace(b, nil)
	var wg sync.WaitGroup
	for i := 0; i < pods; i++ {
		pod := kubetest.SleeperPod(ns, fmt.Sprintf("run-%03d", i))
		pod.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": fmt.Sprintf("node%d", i%2+1)}
		env.CreatePod(b, pod)
	}
	for i := 0; i < pods; i++ {
		wg.Add(1)
		go func(name string) {
			defer wg.Done()
			env.WaitPodReady(b, ns, name, 120*time.Second)
		}(fmt.Sprintf("run-%03d", i))
	}
	wg.Wait()
	label := func(v string) {
		patch := fmt.Sprintf(`{"metadata":{"labels":{%q:%s}}}`, dataplaneLabel, v)
		if _, err := env.RunKubectl(ctx, "patch", "namespace", ns, "--type=merge", "-p", patch); err != nil {
			b.Fatal(err)
		}
	}
	annotated := func(want bool) func(ctx context.Context) (bool, error) {
		return func(ctx context.Context) (bool, error) {
			list, err := env.Client.CoreV1().Pods(ns).List(ctx, metav1.ListOptions{})
			if err != nil {
				return false, nil
			}
			n := 0
			for _, p := range list.Items {
				if (p.Annotations[redirectionAnnotation] == "enabled") == want {
					n++
				}
			}
			return n == pods, nil
		}
	}
	var took []time.Duration
	for b.Loop() {
		start := time.Now()
		label(`"ambient"`)
		env.WaitFor(b, 60*time.Second, "all pods enrolled", annotated(true))
		took = append(took, time.Since(start))
		b.StopTimer()
		label("null")
		env.WaitFor(b, 60*time.Second, "all pods unenrolled", annotated(false))
		b.StartTimer()
	}
	b.ReportMetric(percentile(took, 50), "enroll-100-ms")
}
