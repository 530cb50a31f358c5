//go:build e2e

package ztunnel

import (
	"context"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/kubetest"
)

// accessLog is the part of ztunnel's per-connection log line the test reads.
type accessLog struct {
	Msg       string `json:"msg"`
	Direction string `json:"direction"`
	Src       struct {
		Workload, Namespace, Identity string
	} `json:"src"`
	Dst struct {
		Addr, Workload, Namespace string
	} `json:"dst"`
	BytesSent int64  `json:"bytes_sent"`
	BytesRecv int64  `json:"bytes_recv"`
	Security  string `json:"security"`
}

func TestAccessLogsAndByteCountsDescribeTheConnection(t *testing.T) {
	env := kubetest.Get(t)
	f := setup(t, env)
	ctx := context.Background()
	const size = 12345
	target := fmt.Sprintf("%s:%d", f.far.Status.PodIP, kubetest.EchoHTTPPort)
	out, err := env.RunKubectl(ctx, "exec", "-n", f.ns, "client", "--", "curl", "-sS", "--max-time", "5", fmt.Sprintf("http://%s/?size=%d", target, size))
	if err != nil || len(out) != size {
		t.Fatalf("GET with size=%d returned %d bytes, %v", size, len(out), err)
	}
	// The destination ztunnel (on the far pod's node) logs the connection
	// when it closes.
	zt, err := env.Client.CoreV1().Pods("istio-system").List(ctx, metav1.ListOptions{LabelSelector: "app=ztunnel", FieldSelector: "spec.nodeName=" + f.far.Spec.NodeName})
	if err != nil || len(zt.Items) != 1 {
		t.Fatalf("ztunnel on %s: %v %v", f.far.Spec.NodeName, zt, err)
	}
	var found *accessLog
	env.WaitFor(t, 10*time.Second, "the destination's access log line", func(ctx context.Context) (bool, error) {
		logs, err := env.RunKubectl(ctx, "logs", "-n", "istio-system", zt.Items[0].Name)
		if err != nil {
			return false, nil
		}
		for _, line := range strings.Split(logs, "\n") {
			var l accessLog
			if json.Unmarshal([]byte(line), &l) != nil || l.Msg != "connection complete" {
				continue
			}
			if l.Dst.Workload == "far" && l.Dst.Namespace == f.ns && l.Direction == "inbound" {
				found = &l
				return true, nil
			}
		}
		return false, nil
	})
	wantID := fmt.Sprintf("spiffe://cluster.local/ns/%s/sa/default", f.ns)
	if found.Src.Identity != wantID || found.Src.Workload != "client" || found.Security != "mutual_tls" {
		t.Errorf("access log source %+v security %q, want the client's workload and %s over mutual_tls", found.Src, found.Security, wantID)
	}
	// The reply carried size bytes of body plus headers back to the client.
	if found.BytesSent < size || found.BytesRecv == 0 {
		t.Errorf("access log bytes sent %d received %d, want at least %d sent and the request received", found.BytesSent, found.BytesRecv, size)
	}

	// Both ztunnels count it with Istio's labels and byte semantics:
	// received bytes are the request's, sent bytes the reply's, for either
	// reporter.
	labels := []string{
		`source_workload="client"`, fmt.Sprintf(`source_workload_namespace=%q`, f.ns), fmt.Sprintf(`source_principal=%q`, wantID),
		`source_canonical_service="client"`, `source_canonical_revision="latest"`,
		`destination_workload="far"`, fmt.Sprintf(`destination_workload_namespace=%q`, f.ns), fmt.Sprintf(`destination_principal=%q`, wantID),
		`destination_canonical_service="echo"`, `connection_security_policy="mutual_tls"`, `request_protocol="tcp"`, `response_flags="-"`,
	}
	for _, side := range []struct{ reporter, node string }{
		{"destination", f.far.Status.HostIP},
		{"source", f.client.Status.HostIP},
	} {
		want := append([]string{fmt.Sprintf(`reporter=%q`, side.reporter)}, labels...)
		env.WaitFor(t, 10*time.Second, side.reporter+" ztunnel's closed connection and bytes", func(context.Context) (bool, error) {
			return series(t, side.node, "istio_tcp_connections_closed_total", want...) >= 1 &&
				series(t, side.node, "istio_tcp_sent_bytes_total", want...) >= size &&
				series(t, side.node, "istio_tcp_received_bytes_total", want...) > 0, nil
		})
		if sent, recv := series(t, side.node, "istio_tcp_sent_bytes_total", want...), series(t, side.node, "istio_tcp_received_bytes_total", want...); recv >= sent {
			t.Errorf("%s ztunnel: %v bytes received (the request), %v sent (the reply of %d bytes)", side.reporter, recv, sent, size)
		}
		if n := series(t, side.node, "istio_tcp_connections_opened_total", want...); n < 1 {
			t.Errorf("%s ztunnel: istio_tcp_connections_opened_total{%v} = %v, want 1", side.reporter, want, n)
		}
	}
}
