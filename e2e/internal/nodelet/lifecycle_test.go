package nodelet

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/images"
	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

func TestMain(m *testing.M) {
	// Container processes are this test binary re-executed.
	nsexec.Init()
	os.Exit(m.Run())
}

const testImages = `
images:
  - image: test/sh
    entrypoint: [sh, -c]
`

// startNodelet runs a nodelet for node "n1" against a fake API (the pod
// lifecycle logic is what is under test here; the API server is a boundary).
func startNodelet(t *testing.T) (*fake.Clientset, *Nodelet) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: containers run in private mount namespaces")
	}
	table, err := images.Parse([]byte(testImages))
	if err != nil {
		t.Fatal(err)
	}
	client := fake.NewClientset()
	root := t.TempDir()
	n, err := New(Config{
		NodeName: "n1", NodeIP: "127.0.0.1", PodCIDRs: []string{"10.244.1.0/24"},
		Root: root, Images: table, CrashBackoff: 200 * time.Millisecond, Client: client,
		Logf: t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("Run: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Error("nodelet did not stop within 30s")
		}
	})
	return client, n
}

func testPod(name string, policy corev1.RestartPolicy, script string) *corev1.Pod {
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: "default", UID: types.UID("uid-" + name)},
		Spec: corev1.PodSpec{
			NodeName: "n1", HostNetwork: true, RestartPolicy: policy,
			TerminationGracePeriodSeconds: &grace,
			Containers:                    []corev1.Container{{Name: "main", Image: "test/sh:latest", Args: []string{script}}},
		},
	}
}

// waitPod polls the pod until cond holds.
func waitPod(t *testing.T, client *fake.Clientset, name string, what string, cond func(*corev1.Pod) bool) *corev1.Pod {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	var last *corev1.Pod
	for time.Now().Before(deadline) {
		p, err := client.CoreV1().Pods("default").Get(context.Background(), name, metav1.GetOptions{})
		if err == nil {
			last = p
			if cond(p) {
				return p
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	if last != nil {
		t.Fatalf("pod %s: %s: timed out; status %+v", name, what, last.Status)
	}
	t.Fatalf("pod %s: %s: timed out", name, what)
	return nil
}

// waitEvent waits for an event with reason about the pod.
func waitEvent(t *testing.T, client *fake.Clientset, pod, reason string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for time.Now().Before(deadline) {
		evs, _ := client.CoreV1().Events("default").List(context.Background(), metav1.ListOptions{})
		for _, e := range evs.Items {
			if e.InvolvedObject.Name == pod && e.Reason == reason {
				if e.Source.Component != Component || e.Source.Host != "n1" {
					t.Errorf("event source = %+v", e.Source)
				}
				return
			}
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("no %s event for pod %s", reason, pod)
}

func ready(p *corev1.Pod) bool {
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			return c.Status == corev1.ConditionTrue
		}
	}
	return false
}

func TestPodLifecycle(t *testing.T) {
	client, n := startNodelet(t)
	ctx := context.Background()
	create := func(p *corev1.Pod) {
		if _, err := client.CoreV1().Pods("default").Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	t.Run("a running pod is ready and logs to its CRI log", func(t *testing.T) {
		create(testPod("web", corev1.RestartPolicyAlways, "echo hello from $HOSTNAME; exec sleep 1000"))
		p := waitPod(t, client, "web", "ready", ready)
		if p.Status.Phase != corev1.PodRunning || p.Status.PodIP != "127.0.0.1" || p.Status.StartTime == nil {
			t.Errorf("status = %+v", p.Status)
		}
		cs := p.Status.ContainerStatuses[0]
		if !strings.HasPrefix(cs.ContainerID, "nodelet://") || cs.ImageID == "" || cs.State.Running == nil {
			t.Errorf("container status = %+v", cs)
		}
		path, err := n.ContainerLogPath("default", "web", "main", false)
		if err != nil {
			t.Fatal(err)
		}
		var raw []byte
		for i := 0; i < 100 && !strings.Contains(string(raw), "hello from n1"); i++ {
			raw, _ = os.ReadFile(path)
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(string(raw), " stdout F hello from n1") {
			t.Errorf("log %s = %q", path, raw)
		}
		if pid, err := n.ContainerPID("default", "web", "main"); err != nil || pid <= 0 {
			t.Errorf("ContainerPID = %d, %v", pid, err)
		}
	})

	t.Run("a crashing container is restarted with back-off", func(t *testing.T) {
		create(testPod("crash", corev1.RestartPolicyAlways, "echo run; exit 3"))
		p := waitPod(t, client, "crash", "crash-looping", func(p *corev1.Pod) bool {
			cs := p.Status.ContainerStatuses
			return len(cs) == 1 && cs[0].RestartCount >= 2 && cs[0].State.Waiting != nil &&
				cs[0].State.Waiting.Reason == reasonCrashLoopBackOff
		})
		cs := p.Status.ContainerStatuses[0]
		if cs.LastTerminationState.Terminated == nil || cs.LastTerminationState.Terminated.ExitCode != 3 {
			t.Errorf("last state = %+v", cs.LastTerminationState)
		}
		if _, err := n.ContainerLogPath("default", "crash", "main", true); err != nil {
			t.Errorf("previous log: %v", err)
		}
		waitEvent(t, client, "crash", "BackOff")
	})

	t.Run("an image not in the table waits with ErrImagePull", func(t *testing.T) {
		p := testPod("noimage", corev1.RestartPolicyAlways, "true")
		p.Spec.Containers[0].Image = "nginx"
		create(p)
		waitPod(t, client, "noimage", "ErrImagePull", func(p *corev1.Pod) bool {
			cs := p.Status.ContainerStatuses
			return len(cs) == 1 && cs[0].State.Waiting != nil && cs[0].State.Waiting.Reason == reasonErrImagePull
		})
		waitEvent(t, client, "noimage", "Failed")
	})

	t.Run("init containers run in order before a Never pod succeeds", func(t *testing.T) {
		p := testPod("job", corev1.RestartPolicyNever, "test -f /tmp/nodelet-test-$MARK || exit 9")
		mark := fmt.Sprint(time.Now().UnixNano())
		p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "MARK", Value: mark}}
		p.Spec.InitContainers = []corev1.Container{
			{Name: "first", Image: "test/sh", Args: []string{"touch /tmp/nodelet-test-" + mark}},
		}
		t.Cleanup(func() { os.Remove("/tmp/nodelet-test-" + mark) })
		create(p)
		got := waitPod(t, client, "job", "succeeded", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodSucceeded })
		if got.Status.InitContainerStatuses[0].State.Terminated == nil {
			t.Errorf("init status = %+v", got.Status.InitContainerStatuses)
		}
	})

	t.Run("a failing container fails a Never pod", func(t *testing.T) {
		create(testPod("fail", corev1.RestartPolicyNever, "exit 4"))
		waitPod(t, client, "fail", "failed", func(p *corev1.Pod) bool { return p.Status.Phase == corev1.PodFailed })
	})

	t.Run("a pod whose ConfigMap is missing waits and starts once it exists", func(t *testing.T) {
		mnt := filepath.Join(os.TempDir(), fmt.Sprintf("nodelet-test-cfg-%d", time.Now().UnixNano()))
		t.Cleanup(func() { os.Remove(mnt) })
		p := testPod("cfg", corev1.RestartPolicyAlways, "cat "+mnt+"/greeting; echo; exec sleep 1000")
		p.Spec.Volumes = []corev1.Volume{{Name: "cfg", VolumeSource: corev1.VolumeSource{
			ConfigMap: &corev1.ConfigMapVolumeSource{LocalObjectReference: corev1.LocalObjectReference{Name: "greeting"}}}}}
		p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "cfg", MountPath: mnt}}
		create(p)
		waitPod(t, client, "cfg", "ContainerCreating", func(p *corev1.Pod) bool {
			cs := p.Status.ContainerStatuses
			return len(cs) == 1 && cs[0].State.Waiting != nil && cs[0].State.Waiting.Reason == reasonContainerCreating
		})
		waitEvent(t, client, "cfg", "FailedMount")
		if _, err := client.CoreV1().ConfigMaps("default").Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{Name: "greeting", Namespace: "default"},
			Data:       map[string]string{"greeting": "hi from a configmap"},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		waitPod(t, client, "cfg", "ready", ready)
		path, _ := n.ContainerLogPath("default", "cfg", "main", false)
		var raw []byte
		for i := 0; i < 100 && !strings.Contains(string(raw), "hi from a configmap"); i++ {
			raw, _ = os.ReadFile(path)
			time.Sleep(20 * time.Millisecond)
		}
		if !strings.Contains(string(raw), "hi from a configmap") {
			t.Errorf("log = %q", raw)
		}
		if err := client.CoreV1().Pods("default").Delete(ctx, "cfg", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("readiness follows its probe and a failed liveness probe restarts the container", func(t *testing.T) {
		flag := filepath.Join(os.TempDir(), fmt.Sprintf("nodelet-test-ready-%d", time.Now().UnixNano()))
		t.Cleanup(func() { os.Remove(flag) })
		p := testPod("probed", corev1.RestartPolicyAlways, "exec sleep 1000")
		p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{PeriodSeconds: 1, FailureThreshold: 1,
			ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "-f", flag}}}}
		p.Spec.Containers[0].LivenessProbe = &corev1.Probe{PeriodSeconds: 1, FailureThreshold: 2, InitialDelaySeconds: 1,
			ProbeHandler: corev1.ProbeHandler{Exec: &corev1.ExecAction{Command: []string{"test", "!", "-f", flag + ".dead"}}}}
		create(p)
		waitPod(t, client, "probed", "running but unready", func(p *corev1.Pod) bool {
			return p.Status.Phase == corev1.PodRunning && !ready(p)
		})
		if err := os.WriteFile(flag, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		waitPod(t, client, "probed", "ready", ready)
		if err := os.WriteFile(flag+".dead", nil, 0o644); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { os.Remove(flag + ".dead") })
		waitEvent(t, client, "probed", "Killing")
		os.Remove(flag + ".dead")
		waitPod(t, client, "probed", "restarted", func(p *corev1.Pod) bool {
			cs := p.Status.ContainerStatuses
			return len(cs) == 1 && cs[0].RestartCount >= 1 && cs[0].LastTerminationState.Terminated != nil
		})
		if err := client.CoreV1().Pods("default").Delete(ctx, "probed", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})

	t.Run("a deleted pod is stopped and removed", func(t *testing.T) {
		p := waitPod(t, client, "web", "ready", ready)
		pid, err := n.ContainerPID("default", "web", "main")
		if err != nil {
			t.Fatal(err)
		}
		now := metav1.Now()
		grace := int64(1)
		p.DeletionTimestamp = &now
		p.DeletionGracePeriodSeconds = &grace
		if _, err := client.CoreV1().Pods("default").Update(ctx, p, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			if _, err := client.CoreV1().Pods("default").Get(ctx, "web", metav1.GetOptions{}); err != nil {
				break
			}
			time.Sleep(50 * time.Millisecond)
		}
		if _, err := client.CoreV1().Pods("default").Get(ctx, "web", metav1.GetOptions{}); err == nil {
			t.Fatal("pod still exists")
		}
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err == nil {
			if st, _ := procStartTime(pid); st != "" {
				raw, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
				if !strings.Contains(string(raw), " Z ") {
					t.Errorf("container process %d still runs", pid)
				}
			}
		}
		logs := filepath.Join(n.logsDir, "default_web_uid-web")
		for i := 0; i < 100; i++ {
			if _, err := os.Stat(logs); err != nil {
				return
			}
			time.Sleep(50 * time.Millisecond)
		}
		t.Errorf("logs dir %s kept after the pod is gone", logs)
	})
}
