package main

import (
	"context"
	"errors"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

func terminating(p corev1.Pod) corev1.Pod {
	p.DeletionTimestamp = &metav1.Time{Time: testNow}
	return p
}

func TestSelectZtunnels(t *testing.T) {
	old, fresh := testNow.Add(-24*time.Hour), testNow.Add(-time.Minute)
	tests := []struct {
		name    string
		pods    []corev1.Pod
		node    string
		want    []string // pod names
		wantErr string
	}{
		{
			name: "every node's ztunnel, ordered by node",
			pods: []corev1.Pod{
				ztunnelPod("z-2", "node2", corev1.PodRunning, true, old),
				ztunnelPod("z-1", "node1", corev1.PodRunning, true, old),
			},
			want: []string{"z-1", "z-2"},
		},
		{
			name: "the ztunnel on the node asked for",
			pods: []corev1.Pod{
				ztunnelPod("z-1", "node1", corev1.PodRunning, true, old),
				ztunnelPod("z-2", "node2", corev1.PodRunning, true, old),
			},
			node: "node2",
			want: []string{"z-2"},
		},
		{
			name: "during a rolling update, the new pod rather than the one being deleted",
			pods: []corev1.Pod{
				terminating(ztunnelPod("z-new", "node1", corev1.PodRunning, true, fresh)),
				ztunnelPod("z-newer", "node1", corev1.PodRunning, false, fresh.Add(time.Second)),
				terminating(ztunnelPod("z-old", "node1", corev1.PodRunning, true, old)),
			},
			want: []string{"z-newer"},
		},
		{
			name: "a running pod rather than a newer pending one",
			pods: []corev1.Pod{
				ztunnelPod("z-new", "node1", corev1.PodPending, false, fresh),
				ztunnelPod("z-old", "node1", corev1.PodRunning, true, old),
			},
			node: "node1",
			want: []string{"z-old"},
		},
		{
			name: "the newest of two running pods",
			pods: []corev1.Pod{
				ztunnelPod("z-old", "node1", corev1.PodRunning, true, old),
				ztunnelPod("z-new", "node1", corev1.PodRunning, true, fresh),
			},
			want: []string{"z-new"},
		},
		{
			name: "an unscheduled pod comes first, to be reported",
			pods: []corev1.Pod{
				ztunnelPod("z-1", "node1", corev1.PodRunning, true, old),
				ztunnelPod("z-nowhere", "", corev1.PodPending, false, fresh),
			},
			want: []string{"z-nowhere", "z-1"},
		},
		{
			name: "a node without ztunnel is an error naming the nodes with one",
			pods: []corev1.Pod{
				ztunnelPod("z-2", "node2", corev1.PodRunning, true, old),
				ztunnelPod("z-1", "node1", corev1.PodRunning, true, old),
				ztunnelPod("z-nowhere", "", corev1.PodPending, false, fresh),
			},
			node:    "node3",
			wantErr: `no ztunnel pod on node "node3" (ztunnel pods are on node1, node2)`,
		},
		{
			name:    "a node asked for when no ztunnel pod is on any node",
			pods:    []corev1.Pod{ztunnelPod("z-nowhere", "", corev1.PodPending, false, fresh)},
			node:    "node1",
			wantErr: `no ztunnel pod on node "node1": no ztunnel pod is on any node`,
		},
		{
			name:    "no ztunnel pods at all",
			wantErr: "no ztunnel pod found: is ztunnel installed?",
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := selectZtunnels(tt.pods, tt.node)
			if tt.wantErr != "" {
				if err == nil || err.Error() != tt.wantErr || !errors.Is(err, errNoZtunnel) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, p := range got {
				names = append(names, p.Name)
			}
			if !slices.Equal(names, tt.want) {
				t.Errorf("got %q, want %q", names, tt.want)
			}
		})
	}
}

func TestZtunnelsOfOpenOnlyRunningPods(t *testing.T) {
	opened := map[string]bool{}
	zs, err := ztunnelsOf([]corev1.Pod{
		ztunnelPod("z-1", "node1", corev1.PodRunning, true, testNow),
		ztunnelPod("z-2", "node2", corev1.PodFailed, false, testNow),
		ztunnelPod("z-3", "node3", "", false, testNow),
	}, "", func(p *corev1.Pod) openFunc {
		opened[p.Name] = true
		return func(context.Context) (*adminClient, func(), error) { return nil, nil, nil }
	})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		pod, err string
		ready    bool
	}{
		{"istio-system/z-1", "", true},
		{"istio-system/z-2", "pod is Failed, not Running", false},
		{"istio-system/z-3", "pod is in no phase, not Running", false},
	}
	if len(zs) != len(want) {
		t.Fatalf("got %d ztunnels, want %d", len(zs), len(want))
	}
	for i, w := range want {
		z := zs[i]
		gotErr := ""
		if z.err != nil {
			gotErr = z.err.Error()
		}
		if z.pod != w.pod || gotErr != w.err || *z.ready != w.ready || (z.open != nil) != (w.err == "") {
			t.Errorf("ztunnel %d = {pod %s, err %q, ready %v, open %v}, want %+v", i, z.pod, gotErr, *z.ready, z.open != nil, w)
		}
	}
	if len(opened) != 1 || !opened["z-1"] {
		t.Errorf("opened %v, want only z-1", opened)
	}
	if got := zs[1].String(); got != "ztunnel pod istio-system/z-2 on node node2" {
		t.Errorf("String() = %q", got)
	}
}
