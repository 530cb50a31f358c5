//go:build e2e

package localcluster

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func onNode(pod *corev1.Pod, node string) *corev1.Pod {
	pod.Spec.NodeSelector = map[string]string{"kubernetes.io/hostname": node}
	return pod
}

func TestAFailingCNIChainFailsOnlyNewPodsAndRecovers(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()
	bystander := env.CreatePod(t, onNode(kubetest.SleeperPod(ns, "bystander"), "node2"))
	env.WaitPodReady(t, ns, bystander.Name, 30*time.Second)

	// Chain a plugin that does not exist after the primary one, the way our
	// own plugin is chained in by editing the node's conflist.
	conflist := filepath.Join(env.Config.Dir, "nodes", "node2", "etc", "cni", "net.d", "10-ambk.conflist")
	orig, err := os.ReadFile(conflist)
	if err != nil {
		t.Fatal(err)
	}
	restore := func() { os.WriteFile(conflist, orig, 0o644) }
	t.Cleanup(restore)
	var conf map[string]any
	if err := json.Unmarshal(orig, &conf); err != nil {
		t.Fatal(err)
	}
	conf["plugins"] = append(conf["plugins"].([]any), map[string]any{"type": "no-such-plugin"})
	broken, _ := json.Marshal(conf)
	if err := os.WriteFile(conflist, broken, 0o644); err != nil {
		t.Fatal(err)
	}

	victim := env.CreatePod(t, onNode(kubetest.SleeperPod(ns, "victim"), "node2"))
	waitEvent(t, env, ns, victim.Name, "FailedCreatePodSandBox", "no-such-plugin")
	p, err := env.Client.CoreV1().Pods(ns).Get(ctx, victim.Name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if p.Status.Phase != corev1.PodPending || p.Status.PodIP != "" {
		t.Errorf("pod with a failing CNI chain: phase %s IP %q, want Pending without an IP", p.Status.Phase, p.Status.PodIP)
	}
	b, _ := env.Client.CoreV1().Pods(ns).Get(ctx, bystander.Name, metav1.GetOptions{})
	if !kubetest.PodReady(b) {
		t.Errorf("the bystander on the same node lost readiness")
	}
	restore()
	env.WaitPodReady(t, ns, victim.Name, 90*time.Second)
}

func TestTheKubeletAPIAuthorizesAgainstTheAPIServer(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()
	pod := env.CreatePod(t, onNode(kubetest.SleeperPod(ns, "logged"), "node1"))
	pod = env.WaitPodReady(t, ns, pod.Name, 30*time.Second)

	pki := func(f string) string { return filepath.Join(env.Config.Dir, "pki", f) }
	caPEM, err := os.ReadFile(pki("ca.crt"))
	if err != nil {
		t.Fatal(err)
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(caPEM)
	apiserverCert, err := tls.LoadX509KeyPair(pki("apiserver-kubelet-client.crt"), pki("apiserver-kubelet-client.key"))
	if err != nil {
		t.Fatal(err)
	}
	tr, err := env.Client.CoreV1().ServiceAccounts(ns).CreateToken(ctx, "default", &authnv1.TokenRequest{}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	url := fmt.Sprintf("https://%s:10250/containerLogs/%s/%s/sh", pod.Status.HostIP, ns, pod.Name)
	tests := []struct {
		name   string
		certs  []tls.Certificate
		bearer string
		want   int
	}{
		{"an anonymous caller is unauthenticated", nil, "", http.StatusUnauthorized},
		{"a service account without nodes/proxy is forbidden", nil, tr.Status.Token, http.StatusForbidden},
		{"a forged bearer token is unauthenticated", nil, "not-a-token", http.StatusUnauthorized},
		{"the apiserver's kubelet client reads the logs", []tls.Certificate{apiserverCert}, "", http.StatusOK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			client := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{
				TLSClientConfig: &tls.Config{RootCAs: roots, Certificates: tt.certs},
			}}
			req, _ := http.NewRequest(http.MethodGet, url, nil)
			if tt.bearer != "" {
				req.Header.Set("Authorization", "Bearer "+tt.bearer)
			}
			resp, err := client.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
}

func TestProjectedTokensCarryTheirAudienceAndExpiry(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()
	pod := kubetest.SleeperPod(ns, "token")
	expiry := int64(600)
	pod.Spec.Volumes = []corev1.Volume{{Name: "istio-token", VolumeSource: corev1.VolumeSource{Projected: &corev1.ProjectedVolumeSource{
		Sources: []corev1.VolumeProjection{{ServiceAccountToken: &corev1.ServiceAccountTokenProjection{
			Audience: "istio-ca", ExpirationSeconds: &expiry, Path: "istio-token",
		}}},
	}}}}
	pod.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "istio-token", MountPath: "/var/run/secrets/tokens"}}
	env.CreatePod(t, pod)
	env.WaitPodReady(t, ns, pod.Name, 30*time.Second)
	token, err := env.RunKubectl(ctx, "exec", "-n", ns, pod.Name, "--", "cat", "/var/run/secrets/tokens/istio-token")
	if err != nil {
		t.Fatal(err)
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 {
		t.Fatalf("token %q is not a JWT", token)
	}
	raw, err := base64.RawURLEncoding.DecodeString(parts[1])
	if err != nil {
		t.Fatal(err)
	}
	var claims struct {
		Aud []string `json:"aud"`
		Exp int64    `json:"exp"`
		Iat int64    `json:"iat"`
	}
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	if len(claims.Aud) != 1 || claims.Aud[0] != "istio-ca" || claims.Exp-claims.Iat != expiry {
		t.Errorf("claims aud=%v lifetime=%ds, want [istio-ca] and %ds", claims.Aud, claims.Exp-claims.Iat, expiry)
	}
	review := func(audience string) *authnv1.TokenReview {
		tr, err := env.Client.AuthenticationV1().TokenReviews().Create(ctx, &authnv1.TokenReview{
			Spec: authnv1.TokenReviewSpec{Token: token, Audiences: []string{audience}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr
	}
	if tr := review("istio-ca"); !tr.Status.Authenticated || tr.Status.User.Username != "system:serviceaccount:"+ns+":default" {
		t.Errorf("TokenReview for istio-ca: authenticated=%v user=%q", tr.Status.Authenticated, tr.Status.User.Username)
	}
	if tr := review("some-other-audience"); tr.Status.Authenticated {
		t.Errorf("TokenReview accepted the token for an audience it was not issued for")
	}
}

func TestHostNetworkPrivilegeAndHostnameAreHonoured(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	ctx := context.Background()

	host := onNode(kubetest.SleeperPod(ns, "host"), "node1")
	host.Spec.HostNetwork = true
	privileged := true
	host.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{Privileged: &privileged}
	plain := onNode(kubetest.SleeperPod(ns, "plain"), "node1")
	env.CreatePod(t, host)
	env.CreatePod(t, plain)
	hostPod := env.WaitPodReady(t, ns, "host", 30*time.Second)
	env.WaitPodReady(t, ns, "plain", 30*time.Second)

	if hostPod.Status.PodIP != hostPod.Status.HostIP || hostPod.Status.PodIP != "172.30.0.11" {
		t.Errorf("host-network pod IP %s (host %s), want node1's 172.30.0.11", hostPod.Status.PodIP, hostPod.Status.HostIP)
	}
	exec := func(pod string, cmd ...string) string {
		out, err := env.RunKubectl(ctx, append([]string{"exec", "-n", ns, pod, "--"}, cmd...)...)
		if err != nil {
			t.Fatal(err)
		}
		return strings.TrimSpace(out)
	}
	// The host-network pod sees the node's eth0; the plain pod its own.
	if out := exec("host", "cat", "/proc/net/dev"); !strings.Contains(out, "cni0") {
		t.Errorf("host-network pod does not see the node's links:\n%s", out)
	}
	if out := exec("plain", "cat", "/proc/net/dev"); strings.Contains(out, "cni0") {
		t.Errorf("plain pod sees the node's links:\n%s", out)
	}
	// CAP_NET_ADMIN (bit 12) only for the privileged container.
	bnd := func(pod string) uint64 {
		var v uint64
		line := exec(pod, "grep", "CapBnd", "/proc/self/status")
		fmt.Sscanf(strings.Fields(line)[1], "%x", &v)
		return v
	}
	if b := bnd("host"); b&(1<<12) == 0 {
		t.Errorf("privileged container bounding set %x lacks CAP_NET_ADMIN", b)
	}
	if b := bnd("plain"); b&(1<<12) != 0 {
		t.Errorf("unprivileged container bounding set %x has CAP_NET_ADMIN", b)
	}
	if got := exec("plain", "hostname"); got != "plain" {
		t.Errorf("hostname in the pod = %q, want the pod name", got)
	}
}

func TestAFailingLivenessProbeRestartsTheContainer(t *testing.T) {
	env := kubetest.Get(t)
	ns := env.Namespace(t, nil)
	pod := kubetest.SleeperPod(ns, "unhealthy")
	pod.Spec.Containers[0].LivenessProbe = &corev1.Probe{
		ProbeHandler:     corev1.ProbeHandler{TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(1)}},
		PeriodSeconds:    1,
		FailureThreshold: 1,
	}
	env.CreatePod(t, pod)
	waitEvent(t, env, ns, pod.Name, "Unhealthy", "Liveness probe failed")
	env.WaitFor(t, 60*time.Second, "a restart after the liveness failure", func(ctx context.Context) (bool, error) {
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, pod.Name, metav1.GetOptions{})
		return err == nil && len(p.Status.ContainerStatuses) == 1 && p.Status.ContainerStatuses[0].RestartCount >= 1, nil
	})
}
