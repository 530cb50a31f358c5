//go:build e2e

package localcluster

import (
	"context"
	"fmt"
	"sort"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/watch"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// BenchmarkPodCreateToReady measures, per pod, the time from the create call
// to the Ready condition seen by a watch, one pod at a time on an idle cluster:
// scheduling, CNI ADD, volumes (service-account token), process start and
// the status write.
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
			case ev, ok := <-w.ResultChan():
				if !ok {
					b.Fatalf("watch on pod %s closed", name)
				}
				if p, ok := ev.Object.(*corev1.Pod); ok && ev.Type != watch.Deleted && kubetest.PodReady(p) {
					break wait
				}
				if ev.Type == watch.Error {
					b.Logf("watch error: %v", apierrors.FromObject(ev.Object))
				}
			case <-deadline:
				b.Fatalf("pod %s not Ready in 30s", name)
			}
		}
		lat = append(lat, time.Since(start))
		w.Stop()
		// Idle machine: the next pod starts once this one is gone.
		b.StopTimer()
		env.Client.CoreV1().Pods(ns).Delete(ctx, name, metav1.DeleteOptions{})
		env.WaitFor(b, 30*time.Second, "pod "+name+" deleted", func(ctx context.Context) (bool, error) {
			_, err := env.Client.CoreV1().Pods(ns).Get(ctx, name, metav1.GetOptions{})
			return apierrors.IsNotFound(err), nil
		})
		b.StartTimer()
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	if len(lat) > 0 {
		b.ReportMetric(float64(lat[len(lat)/2].Milliseconds()), "p50-ms")
		b.ReportMetric(float64(lat[len(lat)*99/100].Milliseconds()), "p99-ms")
	}
}
