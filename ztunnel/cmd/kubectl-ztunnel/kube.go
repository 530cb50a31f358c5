package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	corev1client "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Where ztunnel runs: deploy/ztunnel's DaemonSet.
const (
	defaultZtunnelNamespace = "istio-system"
	ztunnelSelector         = "app=ztunnel"
	// adminPort is ztunnel's admin server (proxy.DefaultAdminAddr). It
	// listens on the node's loopback only, so it is reached through the
	// API server's pods/portforward, which the kubelet dials from inside
	// the (host-network) pod's network namespace.
	adminPort = 15000
)

// errNoZtunnel is wrapped when no ztunnel pod matches.
var errNoZtunnel = errors.New("no ztunnel pod")

// kubeFinder finds ztunnels through the Kubernetes API.
type kubeFinder struct {
	config clientcmd.ClientConfig
}

// find lists ztunnel's pods in namespace and returns the one on node, or
// one per node when node is empty. A pod that cannot be asked (not
// running) is returned with its err set, so the caller reports it next to
// the others' answers.
func (k kubeFinder) find(ctx context.Context, namespace, node string) ([]ztunnel, error) {
	rc, err := k.config.ClientConfig()
	if clientcmd.IsEmptyConfig(err) {
		return nil, errors.New("no kubeconfig: set --kubeconfig or KUBECONFIG, or use --admin-url")
	}
	if err != nil {
		return nil, fmt.Errorf("loading kubeconfig: %w", err)
	}
	client, err := corev1client.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("building the Kubernetes client: %w", err)
	}
	list, err := client.Pods(namespace).List(ctx, metav1.ListOptions{LabelSelector: ztunnelSelector})
	if err != nil {
		return nil, fmt.Errorf("listing ztunnel pods (%s, label %s): %w", namespace, ztunnelSelector, err)
	}
	zs, err := ztunnelsOf(list.Items, node, func(p *corev1.Pod) openFunc {
		return forwarder{rc: rc, client: client, namespace: p.Namespace, pod: p.Name}.open
	})
	if err != nil {
		return nil, fmt.Errorf("%w (namespace %s, label %s)", err, namespace, ztunnelSelector)
	}
	return zs, nil
}

// openFunc connects to a ztunnel's admin server; its func releases what it
// set up.
type openFunc func(ctx context.Context) (*adminClient, func(), error)

// ztunnelsOf returns the ztunnels to ask among ztunnel's pods (see
// selectZtunnels); a running one is opened with what open returns for its
// pod, any other carries the reason it cannot be asked.
func ztunnelsOf(pods []corev1.Pod, node string, open func(*corev1.Pod) openFunc) ([]ztunnel, error) {
	selected, err := selectZtunnels(pods, node)
	if err != nil {
		return nil, err
	}
	out := make([]ztunnel, 0, len(selected))
	for _, p := range selected {
		z := ztunnel{node: p.Spec.NodeName, pod: p.Namespace + "/" + p.Name, ready: podReady(p)}
		if p.Status.Phase == corev1.PodRunning {
			z.open = open(p)
		} else {
			z.err = fmt.Errorf("pod is %s, not Running", cmp.Or(string(p.Status.Phase), "in no phase"))
		}
		out = append(out, z)
	}
	return out, nil
}

// selectZtunnels picks the pods to ask: the one on node, or one per node
// when node is empty, ordered by node. A node may briefly run two ztunnel
// pods during a rolling update; the one that serves is preferred: running
// and not being deleted, then the newest.
func selectZtunnels(pods []corev1.Pod, node string) ([]*corev1.Pod, error) {
	byNode := map[string]*corev1.Pod{}
	for i := range pods {
		p := &pods[i]
		if cur, ok := byNode[p.Spec.NodeName]; !ok || preferred(p, cur) {
			byNode[p.Spec.NodeName] = p
		}
	}
	// An unscheduled pod has no node ("") and sorts first.
	nodes := slices.Sorted(maps.Keys(byNode))
	switch {
	case node != "" && byNode[node] != nil:
		return []*corev1.Pod{byNode[node]}, nil
	case node != "":
		scheduled := slices.DeleteFunc(slices.Clone(nodes), func(n string) bool { return n == "" })
		if len(scheduled) == 0 {
			return nil, fmt.Errorf("%w on node %q: no ztunnel pod is on any node", errNoZtunnel, node)
		}
		return nil, fmt.Errorf("%w on node %q (ztunnel pods are on %s)", errNoZtunnel, node, strings.Join(scheduled, ", "))
	case len(nodes) == 0:
		return nil, fmt.Errorf("%w found: is ztunnel installed?", errNoZtunnel)
	}
	out := make([]*corev1.Pod, 0, len(nodes))
	for _, n := range nodes {
		out = append(out, byNode[n])
	}
	return out, nil
}

// preferred reports whether a serves its node rather than b.
func preferred(a, b *corev1.Pod) bool {
	rank := func(p *corev1.Pod) int {
		r := 0
		if p.Status.Phase == corev1.PodRunning {
			r += 2
		}
		if p.DeletionTimestamp == nil {
			r++
		}
		return r
	}
	if ra, rb := rank(a), rank(b); ra != rb {
		return ra > rb
	}
	if !a.CreationTimestamp.Equal(&b.CreationTimestamp) {
		return b.CreationTimestamp.Before(&a.CreationTimestamp)
	}
	return a.Name < b.Name
}

// podReady is the pod's Ready condition.
func podReady(p *corev1.Pod) *bool {
	ready := false
	for _, c := range p.Status.Conditions {
		if c.Type == corev1.PodReady {
			ready = c.Status == corev1.ConditionTrue
		}
	}
	return &ready
}

// forwarder opens port-forwards to one ztunnel pod's admin port.
type forwarder struct {
	rc             *rest.Config
	client         corev1client.CoreV1Interface
	namespace, pod string
}

// open port-forwards to the pod's admin port.
func (f forwarder) open(ctx context.Context) (*adminClient, func(), error) {
	u := f.client.RESTClient().Post().Resource("pods").Namespace(f.namespace).Name(f.pod).SubResource("portforward").URL()
	return openPortForward(ctx, f.rc, u, f.pod+"."+f.namespace)
}

// openPortForward port-forwards through the pods/portforward URL u to the
// admin port and returns a client whose every connection is a stream of
// that port-forward; host only names the pod in its URLs, it is never
// resolved. The func closes the port-forward.
func openPortForward(ctx context.Context, rc *rest.Config, u *url.URL, host string) (*adminClient, func(), error) {
	conn, err := dialPortForward(ctx, rc, u)
	if err != nil {
		return nil, nil, fmt.Errorf("port-forward to port %d: %w", adminPort, err)
	}
	pf := &portForward{conn: conn, port: adminPort}
	hc := &http.Client{Transport: &http.Transport{
		DialContext: pf.dial,
		// One stream pair per request: nothing is left to reuse once the
		// port-forward closes.
		DisableKeepAlives: true,
	}}
	base := &url.URL{Scheme: "http", Host: host + ":" + strconv.Itoa(adminPort)}
	return &adminClient{hc: hc, base: base}, func() { conn.Close() }, nil
}
