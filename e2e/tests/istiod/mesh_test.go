//go:build e2e

package istiod

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	xdsapi "github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
	"github.com/ambient-mesh/ambient/pkg/xdsclient"
)

const (
	istioNamespace = "istio-system"
	// istiodServerName is the name on istiod-lite's serving certificate.
	istiodServerName = "istiod.istio-system.svc"
	xdsPort          = 15012
	caAudience       = "istio-ca"
)

// istiodAddr returns host:port of the running istiod-lite pod. The test runs in
// the control plane's namespace, which routes pod IPs but not Service IPs.
func istiodAddr(t testing.TB, env *kubetest.Env) string {
	t.Helper()
	var addr string
	env.WaitFor(t, 60*time.Second, "a ready istiod pod", func(ctx context.Context) (bool, error) {
		pods, err := env.Client.CoreV1().Pods(istioNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"})
		if err != nil {
			return false, nil
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil && kubetest.PodReady(&p) {
				addr = net.JoinHostPort(p.Status.PodIP, fmt.Sprint(xdsPort))
				return true, nil
			}
		}
		return false, nil
	})
	return addr
}

// meshRoots is the mesh root certificate as istiod-lite publishes it.
func meshRoots(t testing.TB, env *kubetest.Env) *x509.CertPool {
	t.Helper()
	var pool *x509.CertPool
	env.WaitFor(t, 30*time.Second, "istio-ca-root-cert", func(ctx context.Context) (bool, error) {
		cm, err := env.Client.CoreV1().ConfigMaps(istioNamespace).Get(ctx, "istio-ca-root-cert", metav1.GetOptions{})
		if err != nil {
			return false, nil
		}
		pool = x509.NewCertPool()
		return pool.AppendCertsFromPEM([]byte(cm.Data["root-cert.pem"])), nil
	})
	return pool
}

// token returns a service-account token for audience, optionally bound to a pod.
func token(t testing.TB, env *kubetest.Env, ns, sa, audience string, pod *corev1.Pod) string {
	t.Helper()
	req := &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{Audiences: []string{audience}}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	tr, err := env.Client.CoreV1().ServiceAccounts(ns).CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("token for %s/%s: %v", ns, sa, err)
	}
	return tr.Status.Token
}

// watcher is a running xDS client that records what it receives.
type watcher struct {
	*xdsclient.Client
	mu      sync.Mutex
	upserts int // resources received since start
	removed int
	// redundant counts upserts of a version the client already held: the
	// server sent something that had not changed.
	redundant int
	versions  map[string]string // typeURL + " " + name -> version
	cancel    context.CancelFunc
	done      chan error
	stopOnce  sync.Once
}

// istiodService is what clients dial (passthrough: no DNS lookup; the
// local cluster has no DNS); dialIstiod stands in for cluster DNS
// and kube-proxy, which the test's namespace lacks, by resolving it to the
// ready istiod pod at each dial, so a client follows a restarted istiod.
const istiodService = "passthrough:///istiod.istio-system.svc:15012"

func dialIstiod(env *kubetest.Env) func(ctx context.Context, _ string) (net.Conn, error) {
	return func(ctx context.Context, _ string) (net.Conn, error) {
		pods, err := env.Client.CoreV1().Pods(istioNamespace).List(ctx, metav1.ListOptions{LabelSelector: "app=istiod"})
		if err != nil {
			return nil, err
		}
		for _, p := range pods.Items {
			if p.DeletionTimestamp == nil && kubetest.PodReady(&p) {
				var d net.Dialer
				return d.DialContext(ctx, "tcp", net.JoinHostPort(p.Status.PodIP, fmt.Sprint(xdsPort)))
			}
		}
		return nil, fmt.Errorf("no ready istiod pod")
	}
}

func watch(t testing.TB, env *kubetest.Env, addr, tok, nodeID string) *watcher {
	t.Helper()
	w := &watcher{done: make(chan error, 1), versions: map[string]string{}}
	w.Client = xdsclient.New(xdsclient.Config{
		Address:  addr,
		Dial:     dialIstiod(env),
		TLS:      &tls.Config{RootCAs: meshRoots(t, env), ServerName: istiodServerName, MinVersion: tls.VersionTLS12},
		Token:    func() (string, error) { return tok, nil },
		Node:     &xdsapi.Node{Id: nodeID},
		TypeURLs: []string{workloadapi.AddressTypeURL, security.AuthorizationTypeURL},
		OnUpdate: func(typeURL string, upserts []*xdsapi.Resource, removals []string) error {
			w.mu.Lock()
			defer w.mu.Unlock()
			w.upserts += len(upserts)
			w.removed += len(removals)
			for _, r := range upserts {
				key := typeURL + " " + r.GetName()
				if v, ok := w.versions[key]; ok && v == r.GetVersion() {
					w.redundant++
				}
				w.versions[key] = r.GetVersion()
			}
			for _, name := range removals {
				delete(w.versions, typeURL+" "+name)
			}
			return nil
		},
	})
	ctx, cancel := context.WithCancel(context.Background())
	w.cancel = cancel
	go func() { w.done <- w.Run(ctx) }()
	t.Cleanup(w.stop)
	select {
	case <-w.Synced():
	case err := <-w.done:
		t.Fatalf("xds client stopped before syncing: %v", err)
	case <-time.After(30 * time.Second):
		t.Fatal("xds client not synced in 30s")
	}
	return w
}

func (w *watcher) stop() {
	w.stopOnce.Do(func() {
		w.cancel()
		<-w.done
	})
}

func (w *watcher) counts() (upserts, redundant int) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.upserts, w.redundant
}

// address decodes the named Address resource, or nil.
func (w *watcher) address(name string) *workloadapi.Address {
	r, ok := w.Resources(workloadapi.AddressTypeURL)[name]
	if !ok {
		return nil
	}
	var a workloadapi.Address
	if err := r.GetResource().UnmarshalTo(&a); err != nil {
		return nil
	}
	return &a
}

// authorization decodes the named Authorization resource, or nil.
func (w *watcher) authorization(name string) *security.Authorization {
	r, ok := w.Resources(security.AuthorizationTypeURL)[name]
	if !ok {
		return nil
	}
	var a security.Authorization
	if err := r.GetResource().UnmarshalTo(&a); err != nil {
		return nil
	}
	return &a
}
