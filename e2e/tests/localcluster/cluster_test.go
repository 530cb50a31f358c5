//go:build e2e

package localcluster

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// echoReply is the part of echo-server's JSON reply the tests read.
type echoReply struct {
	Pod         string `json:"pod"`
	PodIP       string `json:"pod_ip"`
	PeerAddress string `json:"peer_address"`
}

func TestTwoReplicaDeploymentAcrossNodes(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()

	replicas := int32(2)
	labels := map[string]string{"app": "echo"}
	dep := &appsv1.Deployment{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: appsv1.DeploymentSpec{
			Replicas: &replicas,
			Selector: &metav1.LabelSelector{MatchLabels: labels},
			Template: corev1.PodTemplateSpec{
				ObjectMeta: metav1.ObjectMeta{Labels: labels},
				Spec: corev1.PodSpec{
					Containers: []corev1.Container{kubetest.EchoContainer()},
					// One replica per node.
					Affinity: &corev1.Affinity{PodAntiAffinity: &corev1.PodAntiAffinity{
						RequiredDuringSchedulingIgnoredDuringExecution: []corev1.PodAffinityTerm{{
							LabelSelector: &metav1.LabelSelector{MatchLabels: labels},
							TopologyKey:   "kubernetes.io/hostname",
						}},
					}},
				},
			},
		},
	}
	if _, err := env.Client.AppsV1().Deployments(ns).Create(ctx, dep, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: labels,
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}
	svc, err := env.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	client := env.CreatePod(t, kubetest.SleeperPod(ns, "client"))
	pods := env.WaitDeploymentPods(t, dep, 60*time.Second)
	env.WaitPodReady(t, ns, client.Name, 30*time.Second)

	nodes := map[string]bool{}
	for _, p := range pods {
		nodes[p.Spec.NodeName] = true
	}
	if len(nodes) != 2 {
		t.Fatalf("replicas on nodes %v, want two different nodes", nodes)
	}
	loadClient := filepath.Join(env.Config.BinDir, "load-client")
	try := func(target string) (string, error) {
		ctx, cancel := context.WithTimeout(ctx, 20*time.Second)
		defer cancel()
		return env.RunKubectl(ctx, "exec", "-n", ns, "client", "--", loadClient,
			"--target", "http://"+target+"/", "--requests", "1", "--print-body")
	}
	request := func(t *testing.T, target string) echoReply {
		t.Helper()
		out, err := try(target)
		if err != nil {
			t.Fatalf("request to %s from the client pod: %v", target, err)
		}
		var r echoReply
		if err := json.Unmarshal([]byte(firstJSON(out)), &r); err != nil {
			t.Fatalf("decoding echo reply %q: %v", out, err)
		}
		return r
	}

	t.Run("the client pod reaches each pod IP", func(t *testing.T) {
		clientPod, _ := env.Client.CoreV1().Pods(ns).Get(ctx, "client", metav1.GetOptions{})
		for _, p := range pods {
			r := request(t, fmt.Sprintf("%s:%d", p.Status.PodIP, kubetest.EchoHTTPPort))
			if r.Pod != p.Name {
				t.Errorf("pod IP %s answered as %q, want %q", p.Status.PodIP, r.Pod, p.Name)
			}
			// Pod to pod is routed, not NATed: the server sees the client's own IP.
			if host := strings.Split(r.PeerAddress, ":")[0]; host != clientPod.Status.PodIP {
				t.Errorf("%s saw peer %s, want the client's pod IP %s", p.Name, r.PeerAddress, clientPod.Status.PodIP)
			}
		}
	})
	t.Run("the ClusterIP reaches both replicas", func(t *testing.T) {
		// kube-proxy programs the Service asynchronously, as on any cluster.
		vip := svc.Spec.ClusterIP + ":80"
		env.WaitFor(t, 15*time.Second, "kube-proxy to program "+vip, func(context.Context) (bool, error) {
			_, err := try(vip)
			return err == nil, nil
		})
		seen := map[string]bool{}
		for i := 0; i < 30 && len(seen) < 2; i++ {
			seen[request(t, vip).Pod] = true
		}
		if len(seen) != 2 {
			t.Errorf("30 requests to the ClusterIP reached %v, want both replicas", seen)
		}
	})
	t.Run("kubectl logs shows the container's output", func(t *testing.T) {
		out, err := env.RunKubectl(ctx, "logs", "-n", ns, "client")
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) != "started" {
			t.Errorf("kubectl logs = %q, want %q", out, "started")
		}
		out, err = env.RunKubectl(ctx, "logs", "-n", ns, pods[0].Name, "--timestamps", "--tail", "1")
		if err != nil {
			t.Fatal(err)
		}
		if _, err := time.Parse(time.RFC3339Nano, strings.Fields(out + " x")[0]); err != nil {
			t.Errorf("kubectl logs --timestamps line %q does not start with a timestamp", out)
		}
	})
	t.Run("kubectl exec runs inside the pod with its volumes and exit code", func(t *testing.T) {
		out, err := env.RunKubectl(ctx, "exec", "-n", ns, "client", "--", "cat", "/var/run/secrets/kubernetes.io/serviceaccount/namespace")
		if err != nil {
			t.Fatal(err)
		}
		if out != ns {
			t.Errorf("service account namespace file = %q, want %q", out, ns)
		}
		_, err = env.RunKubectl(ctx, "exec", "-n", ns, "client", "--", "sh", "-c", "exit 3")
		if err == nil || !strings.Contains(err.Error(), "exit status 3") {
			t.Errorf("exec of `exit 3` returned %v, want exit status 3", err)
		}
		cmd := env.KubectlCmd(ctx, "exec", "-i", "-n", ns, "client", "--", "cat")
		cmd.Stdin = strings.NewReader("through stdin")
		got, err := cmd.Output()
		if err != nil || string(got) != "through stdin" {
			t.Errorf("exec -i cat = %q, %v; want stdin echoed", got, err)
		}
	})
	t.Run("kubectl port-forward reaches the pod", func(t *testing.T) {
		target := pods[0]
		ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		defer cancel()
		cmd := env.KubectlCmd(ctx, "port-forward", "-n", ns, "pod/"+target.Name, ":8080")
		stdout, err := cmd.StdoutPipe()
		if err != nil {
			t.Fatal(err)
		}
		cmd.Stderr = os.Stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cancel(); cmd.Wait() }()
		local := waitForwardingPort(t, stdout)
		resp, err := http.Get("http://" + local + "/")
		if err != nil {
			t.Fatalf("GET through port-forward: %v", err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		var r echoReply
		if err := json.Unmarshal(body, &r); err != nil || r.Pod != target.Name {
			t.Errorf("port-forward reply %q (err %v), want one from %s", body, err, target.Name)
		}
	})
}

var forwardingRE = regexp.MustCompile(`Forwarding from (127\.0\.0\.1:\d+) ->`)

func waitForwardingPort(t *testing.T, r io.Reader) string {
	t.Helper()
	lines := make(chan string)
	go func() {
		sc := bufio.NewScanner(r)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
	}()
	timeout := time.After(20 * time.Second)
	for {
		select {
		case l, ok := <-lines:
			if !ok {
				t.Fatal("kubectl port-forward exited before forwarding")
			}
			if m := forwardingRE.FindStringSubmatch(l); m != nil {
				go func() {
					for range lines {
					}
				}()
				return m[1]
			}
		case <-timeout:
			t.Fatal("kubectl port-forward printed no forwarding line in 20s")
		}
	}
}

// firstJSON returns the first line of out that looks like a JSON object.
func firstJSON(out string) string {
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(strings.TrimSpace(l), "{") {
			return l
		}
	}
	return out
}

func TestDeletingAPodRunsCNIDelAndRemovesItsNetns(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()
	pod := env.CreatePod(t, kubetest.SleeperPod(ns, "doomed"))
	pod = env.WaitPodReady(t, ns, pod.Name, 30*time.Second)

	root := filepath.Join(env.Config.Dir, "nodes", pod.Spec.NodeName)
	netnsFile := filepath.Join(root, "var", "run", "netns", string(pod.UID))
	ipamFile := filepath.Join(root, "var", "lib", "cni", "networks", "ambk", pod.Status.PodIP)
	for _, f := range []string{netnsFile, ipamFile} {
		if _, err := os.Stat(f); err != nil {
			t.Fatalf("before deletion: %v", err)
		}
	}
	if err := env.Client.CoreV1().Pods(ns).Delete(ctx, pod.Name, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	env.WaitFor(t, 30*time.Second, "pod object gone", func(ctx context.Context) (bool, error) {
		_, err := env.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return err != nil, nil
	})
	for _, f := range []string{netnsFile, ipamFile} {
		if _, err := os.Stat(f); !os.IsNotExist(err) {
			t.Errorf("after deletion %s still exists (err %v): CNI DEL or netns removal did not run", f, err)
		}
	}
}

func TestCrashingContainerIsRestartedAndCounted(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	pod := kubetest.SleeperPod(ns, "crasher")
	pod.Spec.Containers[0].Command = []string{"sh", "-c", "echo crashing; exit 3"}
	env.CreatePod(t, pod)
	env.WaitFor(t, 60*time.Second, "a restart counted with the exit code", func(ctx context.Context) (bool, error) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, "crasher", metav1.GetOptions{})
		if err != nil || len(p.Status.ContainerStatuses) == 0 {
			return false, nil
		}
		cs := p.Status.ContainerStatuses[0]
		last := cs.LastTerminationState.Terminated
		return cs.RestartCount >= 1 && last != nil && last.ExitCode == 3, nil
	})
	out, err := env.RunKubectl(context.Background(), "logs", "-n", ns, "crasher", "--previous")
	if err != nil || strings.TrimSpace(out) != "crashing" {
		t.Errorf("kubectl logs --previous = %q, %v; want the crashed run's output", out, err)
	}
}
