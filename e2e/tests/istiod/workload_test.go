//go:build e2e

package istiod

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

func TestAPodInAnAmbientNamespaceIsServedAsAWorkload(t *testing.T) {
	env := kubetest.Get(t)
	ctx := context.Background()
	ns := env.Namespace(t, map[string]string{"istio.io/dataplane-mode": "ambient"})
	w := watch(t, env, istiodAddr(t, env), token(t, env, ns, "default", caAudience, nil), "test~"+ns)

	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "echo"},
			Ports:    []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromString("http")}},
		},
	}
	svc, err := env.Client.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "echo", Labels: map[string]string{"app": "echo", "version": "v1"}},
		Spec: corev1.PodSpec{
			Containers:                    []corev1.Container{kubetest.EchoContainer()},
			TerminationGracePeriodSeconds: ptr(int64(1)),
		},
	}
	env.CreatePod(t, pod)
	uid := fmt.Sprintf("Kubernetes//Pod/%s/echo", ns)
	hostname := fmt.Sprintf("echo.%s.svc.cluster.local", ns)
	serviceKey := ns + "/" + hostname

	var wl *workloadapi.Workload
	env.WaitFor(t, 30*time.Second, "a healthy workload for the pod", func(context.Context) (bool, error) {
		wl = w.address(uid).GetWorkload()
		return wl != nil && wl.GetStatus() == workloadapi.WorkloadStatus_HEALTHY, nil
	})
	p, err := env.Client.CoreV1().Pods(ns).Get(ctx, "echo", metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	podIP := netip.MustParseAddr(p.Status.PodIP).AsSlice()
	checks := []struct {
		what      string
		got, want any
	}{
		{"name", wl.GetName(), "echo"},
		{"namespace", wl.GetNamespace(), ns},
		{"node", wl.GetNode(), p.Spec.NodeName},
		{"service account", wl.GetServiceAccount(), "default"},
		{"trust domain", wl.GetTrustDomain(), "cluster.local"},
		{"canonical name", wl.GetCanonicalName(), "echo"},
		{"canonical revision", wl.GetCanonicalRevision(), "v1"},
		{"workload type", wl.GetWorkloadType(), workloadapi.WorkloadType_POD},
		{"address count", len(wl.GetAddresses()), 1},
	}
	for _, c := range checks {
		if fmt.Sprint(c.got) != fmt.Sprint(c.want) {
			t.Errorf("workload %s = %v, want %v", c.what, c.got, c.want)
		}
	}
	if len(wl.GetAddresses()) == 1 && !bytes.Equal(wl.GetAddresses()[0], podIP) {
		t.Errorf("workload address %v, want the pod IP %s", wl.GetAddresses()[0], p.Status.PodIP)
	}
	ports := wl.GetServices()[serviceKey].GetPorts()
	if len(ports) != 1 || ports[0].GetServicePort() != 80 || ports[0].GetTargetPort() != kubetest.EchoHTTPPort {
		t.Errorf("workload services[%s] = %v, want port 80 -> %d", serviceKey, ports, kubetest.EchoHTTPPort)
	}

	t.Run("its Service is served with the VIP", func(t *testing.T) {
		var s *workloadapi.Service
		env.WaitFor(t, 10*time.Second, "the service", func(context.Context) (bool, error) {
			s = w.address(serviceKey).GetService()
			return s != nil, nil
		})
		vip := netip.MustParseAddr(svc.Spec.ClusterIP).AsSlice()
		if s.GetHostname() != hostname || len(s.GetAddresses()) != 1 || !bytes.Equal(s.GetAddresses()[0].GetAddress(), vip) {
			t.Errorf("service %v, want hostname %s and VIP %s", s, hostname, svc.Spec.ClusterIP)
		}
	})
	t.Run("enrolled by the CNI agent, it is served with HBONE", func(t *testing.T) {
		// The agent marks the pods it has redirected with the annotation
		// istiod-lite reads: only then does the workload take HBONE.
		env.WaitFor(t, 10*time.Second, "tunnel_protocol HBONE", func(context.Context) (bool, error) {
			return w.address(uid).GetWorkload().GetTunnelProtocol() == workloadapi.TunnelProtocol_HBONE, nil
		})
		p, err := env.Client.CoreV1().Pods(ns).Get(ctx, "echo", metav1.GetOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if got := p.Annotations["ambient.istio.io/redirection"]; got != "enabled" {
			t.Errorf("pod annotation ambient.istio.io/redirection = %q, want enabled (set by the agent)", got)
		}
	})
	t.Run("deleting the pod removes the workload", func(t *testing.T) {
		if err := env.Client.CoreV1().Pods(ns).Delete(ctx, "echo", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		env.WaitFor(t, 30*time.Second, "the workload's removal", func(context.Context) (bool, error) {
			return w.address(uid) == nil, nil
		})
	})
}

func ptr[T any](v T) *T { return &v }
