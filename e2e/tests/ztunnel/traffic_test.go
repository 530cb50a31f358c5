//go:build e2e

package ztunnel

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

const dataplaneLabel = "istio.io/dataplane-mode"

func onNode(p *corev1.Pod, node string) *corev1.Pod {
	p.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": node}
	return p
}

func echoPod(ns, name, node string) *corev1.Pod {
	return onNode(&corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name, Labels: map[string]string{"app": "echo"}},
		Spec: corev1.PodSpec{
			Containers:                    []corev1.Container{kubetest.EchoContainer()},
			TerminationGracePeriodSeconds: ptr(int64(1)),
		},
	}, node)
}

func ptr[T any](v T) *T { return &v }

// get sends an HTTP GET from the pod to target and returns the body.
func get(t *testing.T, env *kubetest.Env, ns, pod, target string) (string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	return env.RunKubectl(ctx, "exec", "-n", ns, pod, "--", "curl", "-sS", "--max-time", "5", "http://"+target+"/")
}

// metric sums the istio_tcp_connections_opened_total series on node's
// ztunnel whose labels contain every one of want.
func metric(t *testing.T, nodeIP string, want ...string) float64 {
	return series(t, nodeIP, "istio_tcp_connections_opened_total", want...)
}

// series sums the named metric's series on node's ztunnel whose labels
// contain every one of want.
func series(t testing.TB, nodeIP, name string, want ...string) float64 {
	t.Helper()
	resp, err := http.Get("http://" + nodeIP + ":15020/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var sum float64
	for _, line := range strings.Split(string(body), "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		ok := true
		for _, w := range want {
			ok = ok && strings.Contains(line, w)
		}
		if ok {
			var v float64
			fmt.Sscanf(line[strings.LastIndex(line, " ")+1:], "%g", &v)
			sum += v
		}
	}
	return sum
}

type meshFixture struct {
	ns                string
	near, far, client *corev1.Pod
	svc               *corev1.Service
}

func setup(t *testing.T, env *kubetest.Env) meshFixture {
	ns := env.Namespace(t, map[string]string{dataplaneLabel: "ambient"})
	ctx := context.Background()
	svc, err := env.Client.CoreV1().Services(ns).Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "echo"},
			Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				{Name: "tcp", Port: 9000, TargetPort: intstr.FromString("tcp")},
			}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	env.CreatePod(t, echoPod(ns, "near", "node1"))
	env.CreatePod(t, echoPod(ns, "far", "node2"))
	env.CreatePod(t, onNode(kubetest.SleeperPod(ns, "client"), "node1"))
	return meshFixture{
		ns:     ns,
		near:   env.WaitPodReady(t, ns, "near", 30*time.Second),
		far:    env.WaitPodReady(t, ns, "far", 30*time.Second),
		client: env.WaitPodReady(t, ns, "client", 30*time.Second),
		svc:    svc,
	}
}

func TestEnrolledPodsTalkThroughHBONE(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	principal := fmt.Sprintf(`destination_principal="spiffe://cluster.local/ns/%s/sa/default"`, f.ns)
	source := fmt.Sprintf(`source_principal="spiffe://cluster.local/ns/%s/sa/default"`, f.ns)
	cases := []struct {
		name, target, wantPod, dstNode string
	}{
		{"to a pod on another node", fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort), "far", f.far.Status.HostIP},
		{"to a pod on the same node", fmt.Sprintf("%s:%d", f.near.Status.PodIP, kubetest.EchoHTTPPort), "near", f.near.Status.HostIP},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			before := metric(t, c.dstNode, `reporter="destination"`, `connection_security_policy="mutual_tls"`, principal, source)
			out, err := get(t, env, f.ns, "client", c.target)
			if err != nil || !strings.Contains(out, fmt.Sprintf(`"pod":%q`, c.wantPod)) {
				t.Fatalf("GET %s = %q, %v; want a reply from %s", c.target, out, err, c.wantPod)
			}
			// The destination ztunnel accepted it over mutual TLS from the
			// client's SPIFFE identity.
			env.WaitFor(t, 5*time.Second, "the destination ztunnel's mTLS count", func(context.Context) (bool, error) {
				return metric(t, c.dstNode, `reporter="destination"`, `connection_security_policy="mutual_tls"`, principal, source) > before, nil
			})
		})
	}
	t.Run("through the ClusterIP, both replicas answer", func(t *testing.T) {
		seen := map[string]bool{}
		for i := 0; i < 20 && len(seen) < 2; i++ {
			out, err := get(t, env, f.ns, "client", f.svc.Spec.ClusterIP+":80")
			if err != nil {
				t.Fatal(err)
			}
			for _, p := range []string{"near", "far"} {
				if strings.Contains(out, fmt.Sprintf(`"pod":%q`, p)) {
					seen[p] = true
				}
			}
		}
		if len(seen) != 2 {
			t.Errorf("replicas reached through the VIP: %v", seen)
		}
		if metric(t, f.client.Status.HostIP, `reporter="source"`, fmt.Sprintf(`destination_service="echo.%s.svc.cluster.local"`, f.ns)) == 0 {
			t.Error("the source ztunnel counted no connection to the echo service")
		}
	})
	t.Run("raw TCP echoes through pod IPs and the ClusterIP", func(t *testing.T) {
		for _, target := range []string{f.far.Status.PodIP + ":9000", f.near.Status.PodIP + ":9000", f.svc.Spec.ClusterIP + ":9000"} {
			r, err := load(env, f.ns, "client", "--mode", "tcp", "--target", target, "--size", "4096",
				"--connections", "4", "--requests", "40", "--rate", "200")
			if err != nil {
				t.Fatal(err)
			}
			if r.Succeeded != 40 || r.Failed != 0 {
				t.Errorf("TCP echo to %s: %d of 40 succeeded, errors %v", target, r.Succeeded, r.Errors)
			}
		}
	})
}

func TestAPodOutsideTheMeshStillReachesAnEnrolledPod(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	plain := env.Namespace(t, nil)
	env.CreatePod(t, onNode(kubetest.SleeperPod(plain, "outsider"), "node2"))
	env.WaitPodReady(t, plain, "outsider", 30*time.Second)
	env.CreatePod(t, echoPod(plain, "plainecho", "node2"))
	plainEcho := env.WaitPodReady(t, plain, "plainecho", 30*time.Second)
	near := fmt.Sprintf("%s:%d", f.near.Status.PodIP, kubetest.EchoHTTPPort)
	out, err := get(t, env, plain, "outsider", near)
	if err != nil || !strings.Contains(out, `"pod":"near"`) {
		t.Errorf("plaintext from outside the mesh got %q, %v; want the enrolled pod's reply", out, err)
	}

	t.Run("an enrolled pod reaches a pod outside the mesh", func(t *testing.T) {
		target := fmt.Sprintf("%s:%d", plainEcho.Status.PodIP, kubetest.EchoHTTPPort)
		out, err := get(t, env, f.ns, "client", target)
		if err != nil || !strings.Contains(out, `"pod":"plainecho"`) {
			t.Errorf("from an enrolled pod to %s: %q, %v; want the plain pod's reply", target, out, err)
		}
	})

	t.Run("STRICT PeerAuthentication refuses plaintext, not mTLS", func(t *testing.T) {
		ctx := context.Background()
		cmd := env.KubectlCmd(ctx, "apply", "-f", "-")
		cmd.Stdin = strings.NewReader(fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict, namespace: %s}
spec:
  mtls: {mode: STRICT}
`, f.ns))
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
		t.Cleanup(func() { env.RunKubectl(ctx, "delete", "peerauthentication", "-n", f.ns, "strict") })
		env.WaitFor(t, 10*time.Second, "plaintext from outside the mesh to be refused", func(context.Context) (bool, error) {
			out, err := get(t, env, plain, "outsider", near)
			return err != nil && !strings.Contains(out, `"pod":"near"`), nil
		})
		if out, err := get(t, env, f.ns, "client", near); err != nil || !strings.Contains(out, `"pod":"near"`) {
			t.Errorf("mTLS from an enrolled pod under STRICT: %q, %v; want the reply", out, err)
		}
	})
}

func TestAuthorizationPolicyDenyTakesEffect(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	ctx := context.Background()
	target := fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)
	if out, err := get(t, env, f.ns, "client", target); err != nil {
		t.Fatalf("before the policy: %q, %v", out, err)
	}
	policy := fmt.Sprintf(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-own-namespace, namespace: %[1]s}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - from: [{source: {namespaces: [%[1]s]}}]
`, f.ns)
	cmd := env.KubectlCmd(ctx, "apply", "-f", "-")
	cmd.Stdin = strings.NewReader(policy)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	applied := time.Now()
	env.WaitFor(t, 10*time.Second, "the DENY to take effect", func(context.Context) (bool, error) {
		out, err := get(t, env, f.ns, "client", target)
		return err != nil && !strings.Contains(out, `"pod":"far"`), nil
	})
	t.Logf("denied %s after the policy was applied", time.Since(applied).Round(10*time.Millisecond))
	// response_flags are known when the connection closes.
	if series(t, f.far.Status.HostIP, "istio_tcp_connections_closed_total", `reporter="destination"`, `response_flags="DENY"`) == 0 {
		t.Error("the destination ztunnel counted no DENY")
	}
	if _, err := env.RunKubectl(ctx, "delete", "authorizationpolicy", "-n", f.ns, "deny-own-namespace"); err != nil {
		t.Fatal(err)
	}
	env.WaitFor(t, 10*time.Second, "traffic to flow again", func(context.Context) (bool, error) {
		_, err := get(t, env, f.ns, "client", target)
		return err == nil, nil
	})
}
