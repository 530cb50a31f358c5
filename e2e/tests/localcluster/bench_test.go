//go:build e2e

package localcluster

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// BenchmarkPodCreateToReady measures, per pod, the time from the create call
// to the Ready condition seen by a watch, one pod at a time on an idle cluster.
func BenchmarkPodCreateToReady(b *testing.B) {
	env := kubetest.Get(b)
	ns := env.Namespace(b, nil)
	ctx := context.Background()
	var lat []time.Duration
	for i := 0; b.Loop(); i++ {
		name := fmt.Sprintf("bench-%d", i)
		pod := kubetest.SleeperPod(ns, name)
		w, err := env.Client.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{FieldSelector: fields.OneTermEqualSelector("metadata.name", name).String()})
		if err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		env.CreatePod(b, pod)
		deadline := time.After(30 * time.Second)
	wait:
		for {
			select {
			case ev := <-w.ResultChan():
				if p, ok := ev.Object.(*corev1.Pod); ok && ev.Type != watch.Deleted && kubetest.PodReady(p) {
					break wait
				}
			case <-deadline:
				b.Fatalf("pod %s not Ready in 30s", name)
			}
		}
		lat = append(lat, time.Since(start))
		w.Stop()
		b.StopTimer()
		env.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
		b.StartTimer()
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "p50-ms")
		b.ReportMetric(float64(lat[len(lat)*99/100].Milliseconds()), "p99-ms")
	}
}
