package xds

import (
	"context"
	"fmt"
	"log/slog"
	"testing"
	"time"

	xdsapi "github.com/ambient-mesh/ambient/api/xds"
	"github.com/ambient-mesh/ambient/pkg/xdsclient"
)

// BenchmarkUpdateOneOf2000To10Clients changes one resource out of 2,000 and
// waits until each of 10 connected clients (real gRPC, TLS, loopback) has
// received it. ns/op is the time from Update to the last client having the
// change; update-ns/op is the Update call alone (hashing the set and
// signalling the clients).
func BenchmarkUpdateOneOf2000To10Clients(b *testing.B) {
	const resources, clients = 2000, 10
	serverTLS, clientTLS := testTLS(b)
	ts := startServer(b, "127.0.0.1:0", serverTLS)
	desired := workloads(resources)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)

	received := make(chan struct{}, clients)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i := range clients {
		c := xdsclient.New(xdsclient.Config{
			Address:  ts.addr,
			TLS:      clientTLS,
			Token:    func() (string, error) { return testToken, nil },
			Node:     &xdsapi.Node{Id: fmt.Sprintf("node-%d", i)},
			TypeURLs: testTypes,
			OnUpdate: func(_ string, upserts []*xdsapi.Resource, _ []string) error {
				if len(upserts) == 1 {
					received <- struct{}{}
				}
				return nil
			},
		})
		go c.Run(ctx)
		select {
		case <-c.Synced():
		case <-time.After(waitLimit):
			b.Fatal("client not synced")
		}
	}
	defer slog.SetDefault(slog.Default())
	slog.SetDefault(slog.New(slog.DiscardHandler)) // clients log their reconnects at shutdown

	var updating time.Duration
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		name := fmt.Sprintf("w%d", i%resources)
		desired[name] = workload(name, i+1)
		start := time.Now()
		ts.Update(addressType, desired)
		updating += time.Since(start)
		for range clients {
			<-received
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(updating.Nanoseconds())/float64(b.N), "update-ns/op")
}
