//go:build e2e

package istiod

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net"
	"net/http"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc/metadata"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	caapi "github.com/ambient-mesh/ambient/api/ca"
	"github.com/ambient-mesh/ambient/api/security"
	"github.com/ambient-mesh/ambient/api/workloadapi"
	xdsapi "github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
	"github.com/ambient-mesh/ambient/pkg/xdsclient"
)

const (
	benchNodes   = 10
	benchPods    = 1000
	benchClients = 10
)

// arrivals records when each subscribed client first saw each workload.
type arrivals struct {
	mu   sync.Mutex
	seen map[string][]time.Time // resource name -> one time per client
	want int
	done map[string]chan struct{}
}

func (a *arrivals) expect(name string) chan struct{} {
	a.mu.Lock()
	defer a.mu.Unlock()
	ch := make(chan struct{})
	a.done[name] = ch
	return ch
}

func (a *arrivals) record(name string) {
	now := time.Now()
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seen[name] = append(a.seen[name], now)
	if len(a.seen[name]) == a.want {
		if ch, ok := a.done[name]; ok {
			close(ch)
		}
	}
}

// BenchmarkPodToAllClients measures, with 1,000 pods on 10 simulated nodes
// (API objects only) and 10 connected xDS clients, the time from the API write
// that gives a new pod its IP (what the runtime does) until every client holds
// its Workload. It also reports istiod-lite's resident memory with that state.
func BenchmarkPodToAllClients(b *testing.B) {
	env := kubetest.Get(b)
	ctx := context.Background()
	ns := env.Namespace(b, map[string]string{"istio.io/dataplane-mode": "ambient"})
	b.Cleanup(func() { cleanupSimulated(env, ns) })
	nodes := simulatedNodes(b, env)

	seq := 0
	newPod := func() (*corev1.Pod, string) {
		seq++
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: fmt.Sprintf("sim-%04d", seq), Labels: map[string]string{"app": fmt.Sprintf("app-%d", seq%50)}},
			Spec: corev1.PodSpec{
				NodeName:   nodes[seq%len(nodes)],
				Containers: []corev1.Container{{Name: "c", Image: kubetest.EchoImage}},
			},
		}
		p, err := env.Client.CoreV1().Pods(ns).Create(ctx, p, metav1.CreateOptions{})
		if err != nil {
			b.Fatal(err)
		}
		return p, fmt.Sprintf("10.250.%d.%d", seq/250, seq%250+1)
	}
	setRunning := func(p *corev1.Pod, ip string) {
		now := metav1.Now()
		p.Status = corev1.PodStatus{
			Phase: corev1.PodRunning, PodIP: ip, PodIPs: []corev1.PodIP{{IP: ip}}, HostIP: "172.30.0.200", StartTime: &now,
			Conditions: []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: now}},
		}
		if _, err := env.Client.CoreV1().Pods(ns).UpdateStatus(ctx, p, metav1.UpdateOptions{}); err != nil {
			b.Fatal(err)
		}
	}
	for i := 0; i < benchPods; i++ {
		p, ip := newPod()
		setRunning(p, ip)
	}

	arr := &arrivals{seen: map[string][]time.Time{}, want: benchClients, done: map[string]chan struct{}{}}
	addr := istiodAddr(b, env)
	tok := token(b, env, ns, "default", caAudience, nil)
	roots := meshRoots(b, env)
	for i := 0; i < benchClients; i++ {
		c := xdsclient.New(xdsclient.Config{
			Address:  addr,
			TLS:      &tls.Config{RootCAs: roots, ServerName: istiodServerName, MinVersion: tls.VersionTLS12},
			Token:    func() (string, error) { return tok, nil },
			Node:     &xdsapi.Node{Id: fmt.Sprintf("bench~%d", i)},
			TypeURLs: []string{workloadapi.AddressTypeURL, security.AuthorizationTypeURL},
			OnUpdate: func(typeURL string, upserts []*xdsapi.Resource, _ []string) error {
				for _, r := range upserts {
					arr.record(r.GetName())
				}
				return nil
			},
		})
		cctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() { c.Run(cctx); close(done) }()
		b.Cleanup(func() { cancel(); <-done })
		select {
		case <-c.Synced():
		case <-time.After(60 * time.Second):
			b.Fatal("client not synced")
		}
		if n := len(c.Resources(workloadapi.AddressTypeURL)); n < benchPods {
			b.Fatalf("client %d holds %d addresses, want at least %d", i, n, benchPods)
		}
	}

	var lat []time.Duration
	for b.Loop() {
		b.StopTimer()
		p, ip := newPod()
		ch := arr.expect(fmt.Sprintf("Kubernetes//Pod/%s/%s", ns, p.Name))
		b.StartTimer()
		start := time.Now()
		setRunning(p, ip)
		select {
		case <-ch:
		case <-time.After(10 * time.Second):
			b.Fatalf("pod %s not at all clients in 10s", p.Name)
		}
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[(len(lat)*99)/100].Microseconds())/1000, "p99-ms")
	if rss, err := istiodRSS(addr); err == nil {
		b.ReportMetric(rss/(1<<20), "istiod-RSS-MiB")
	} else {
		b.Logf("reading istiod memory: %v", err)
	}
}

// BenchmarkCreateCertificate measures CreateCertificate round trips from a
// workload (token already reviewed once, as on a running node).
func BenchmarkCreateCertificate(b *testing.B) {
	env := kubetest.Get(b)
	ctx := context.Background()
	ns := env.Namespace(b, map[string]string{"istio.io/dataplane-mode": "ambient"})
	conn := dialCA(b, env)
	tok := token(b, env, ns, "default", caAudience, nil)
	csr := string(csrFor(b, "spiffe://cluster.local/ns/"+ns+"/sa/default"))
	client := caapi.NewIstioCertificateServiceClient(conn)
	call := func() {
		cctx := metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
		if _, err := client.CreateCertificate(cctx, &caapi.IstioCertificateRequest{Csr: csr, ValidityDuration: 3600}); err != nil {
			b.Fatal(err)
		}
	}
	call() // first call reviews the token
	var lat []time.Duration
	for b.Loop() {
		start := time.Now()
		call()
		lat = append(lat, time.Since(start))
	}
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(lat[(len(lat)*99)/100].Microseconds())/1000, "p99-ms")
}

func simulatedNodes(b *testing.B, env *kubetest.Env) []string {
	var names []string
	for i := 0; i < benchNodes; i++ {
		name := fmt.Sprintf("sim-node-%02d", i)
		n := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: map[string]string{
			"kubernetes.io/hostname": name, "topology.kubernetes.io/zone": fmt.Sprintf("zone-%d", i%3),
		}}}
		if _, err := env.Client.CoreV1().Nodes().Create(context.Background(), n, metav1.CreateOptions{}); err != nil {
			b.Fatal(err)
		}
		names = append(names, name)
	}
	return names
}

// cleanupSimulated removes pods no kubelet will ever confirm, then the nodes.
func cleanupSimulated(env *kubetest.Env, ns string) {
	ctx := context.Background()
	zero := int64(0)
	env.Client.CoreV1().Pods(ns).DeleteCollection(ctx, metav1.DeleteOptions{GracePeriodSeconds: &zero}, metav1.ListOptions{})
	for i := 0; i < benchNodes; i++ {
		env.Client.CoreV1().Nodes().Delete(ctx, fmt.Sprintf("sim-node-%02d", i), metav1.DeleteOptions{})
	}
}

// istiodRSS reads process_resident_memory_bytes from istiod-lite's metrics.
func istiodRSS(xdsAddr string) (float64, error) {
	host, _, _ := net.SplitHostPort(xdsAddr)
	resp, err := http.Get("http://" + net.JoinHostPort(host, "15014") + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(body), "\n") {
		if v, ok := strings.CutPrefix(line, "process_resident_memory_bytes "); ok {
			return strconv.ParseFloat(strings.TrimSpace(v), 64)
		}
	}
	return 0, fmt.Errorf("no process_resident_memory_bytes in /metrics")
}
