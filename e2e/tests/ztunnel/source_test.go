//go:build e2e

package ztunnel

import (
	"encoding/json"
	"fmt"
	"net/netip"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/echo"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// seenPeer returns the address the echo server reports as the peer of the
// request (its reply's peer_address, the HTTP request's remote address),
// checking that the reply came from the pod named wantPod ("" for any).
func seenPeer(t *testing.T, out, wantPod string) netip.Addr {
	t.Helper()
	var r echo.Reply
	if err := json.Unmarshal([]byte(out), &r); err != nil {
		t.Fatalf("echo reply %q: %v", out, err)
	}
	if wantPod != "" && r.Pod != wantPod {
		t.Fatalf("reply from pod %q, want %q: %s", r.Pod, wantPod, out)
	}
	ap, err := netip.ParseAddrPort(r.PeerAddress)
	if err != nil {
		t.Fatalf("peer_address %q: %v", r.PeerAddress, err)
	}
	return ap.Addr().Unmap()
}

func podIP(t *testing.T, p *corev1.Pod) netip.Addr {
	t.Helper()
	ip, err := netip.ParseAddr(p.Status.PodIP)
	if err != nil {
		t.Fatalf("pod %s/%s IP %q: %v", p.Namespace, p.Name, p.Status.PodIP, err)
	}
	return ip
}

// TestTheAppSeesTheClientsAddress: the destination ztunnel connects to the
// application from the client's own address (validated against the client's
// identity for HBONE), as Istio's ambient mesh does, so the application sees
// the client pod's IP as its peer rather than its own or a node's.
func TestTheAppSeesTheClientsAddress(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	client := podIP(t, f.client)

	for _, c := range []struct {
		name, target, wantPod string
	}{
		{"on another node", fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort), "far"},
		{"on the same node", fmt.Sprintf("%s:%d", f.near.Status.PodIP, kubetest.EchoHTTPPort), "near"},
		{"through the ClusterIP", f.svc.Spec.ClusterIP + ":80", ""},
	} {
		t.Run("an enrolled client reaching a pod "+c.name+" is seen with its pod IP", func(t *testing.T) {
			out, err := get(t, env, f.ns, "client", c.target)
			if err != nil {
				t.Fatalf("GET %s = %q, %v", c.target, out, err)
			}
			if got := seenPeer(t, out, c.wantPod); got != client {
				t.Errorf("the app saw the request from %v, want the client pod's %v (reply %s)", got, client, out)
			}
		})
	}

	t.Run("a client outside the mesh is seen with its pod IP", func(t *testing.T) {
		plain := env.Namespace(t, nil)
		env.CreatePod(t, onNode(kubetest.SleeperPod(plain, "outsider"), "node2"))
		outsider := env.WaitPodReady(t, plain, "outsider", 30*time.Second)
		target := fmt.Sprintf("%s:%d", f.near.Status.PodIP, kubetest.EchoHTTPPort)
		out, err := get(t, env, plain, "outsider", target)
		if err != nil {
			t.Fatalf("GET %s = %q, %v", target, out, err)
		}
		if got, want := seenPeer(t, out, "near"), podIP(t, outsider); got != want {
			t.Errorf("the app saw the plaintext request from %v, want the outsider's %v (reply %s)", got, want, out)
		}
	})
}
