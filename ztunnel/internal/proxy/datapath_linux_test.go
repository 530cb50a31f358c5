package proxy

import (
	"context"
	"crypto/x509"
	"io"
	"log/slog"
	"net"
	"net/netip"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/ambient-mesh/ambient/api/workloadapi"
	"github.com/ambient-mesh/ambient/ztunnel/internal/identity"
	"github.com/ambient-mesh/ambient/ztunnel/internal/state"
	"github.com/ambient-mesh/ambient/ztunnel/internal/telemetry"
)

// The benchmarks below carry traffic through both ztunnel hops in one
// process, as in production: app client -> outbound listener ->
// Proxy.Outbound -> HBONE pool (TLS 1.3 with SPIFFE certificates, HTTP/2
// CONNECT) -> HBONE listener -> Proxy.HBONE -> inbound handler -> app, all
// over TCP on loopback. Each has a "direct" variant (client straight to the
// app, no mesh) run side by side, so that what the mesh adds is the
// difference, and that the machine's noise hits both alike.
//
// CPU time is the whole process's (getrusage), which includes the client
// and the app: subtract the direct variant's cpu-ns/op to get ztunnel's.
//
//	go test -run '^$' -bench DataPath -count 6 ./ztunnel/internal/proxy/

const (
	// benchConns is how many persistent connections carry the
	// request/response benchmarks (the end-to-end HTTP load uses 16).
	benchConns = 16
	// benchMsg is the request and reply size of one exchange.
	benchMsg = 1 << 10
	// benchRate is the paced benchmark's total exchange rate, as in the
	// end-to-end HTTP load.
	benchRate = 1000
	// benchChunk is what one bulk operation moves.
	benchChunk = 64 << 10
)

// benchMesh is a client pod (127.0.0.1) and a server pod (127.0.0.2) with
// three apps (echo, sink, source), each reachable directly and through
// the mesh.
type benchMesh struct {
	proxy   *Proxy
	reg     *prometheus.Registry
	echo    netip.AddrPort // app echoing what it reads
	sink    netip.AddrPort // app reading everything, reporting the total on sunk
	source  netip.AddrPort // app writing until the peer goes away
	sunk    chan int64
	viaMesh map[netip.AddrPort]netip.AddrPort // app -> outbound listener carrying to it
}

func newBenchMesh(tb testing.TB) *benchMesh {
	tb.Helper()
	ca := newTestCA(tb)
	certs := identity.NewManager(ca, identity.Options{Roots: []*x509.Certificate{ca.root}})
	tb.Cleanup(certs.Close)
	reg := prometheus.NewRegistry()
	// Access logs are formatted as in production, and discarded.
	metrics, err := telemetry.New(reg, slog.New(slog.NewJSONHandler(io.Discard, nil)))
	if err != nil {
		tb.Fatal(err)
	}
	m := &benchMesh{reg: reg, sunk: make(chan int64, 1), viaMesh: map[netip.AddrPort]netip.AddrPort{}}
	store := state.New()
	var hboneAddr netip.AddrPort
	m.proxy = New(Config{
		State: store, Certs: certs, Metrics: metrics, StateWait: time.Millisecond,
		Log: slog.New(slog.DiscardHandler),
		// The server pod's HBONE port is a free port on 127.0.0.2.
		Dial: func(ctx context.Context, network, addr string) (net.Conn, error) {
			if addr == "127.0.0.2:15008" {
				addr = hboneAddr.String()
			}
			return dialer()(ctx, network, addr)
		},
	})
	tb.Cleanup(func() { m.proxy.Close() })
	client := &Pod{UID: "uid-client", Name: "client", Namespace: "a", ServiceAccount: "client", Dial: dialer()}
	server := &Pod{UID: "uid-echo", Name: "echo", Namespace: "a", ServiceAccount: "echo", Dial: dialer()}

	buf := make([]byte, 32<<10)
	m.echo = serve(tb, "127.0.0.2:0", func(c net.Conn) {
		buf := make([]byte, 32<<10)
		for {
			n, err := c.Read(buf)
			if n > 0 {
				if _, err := c.Write(buf[:n]); err != nil {
					return
				}
			}
			if err != nil {
				return
			}
		}
	})
	m.sink = serve(tb, "127.0.0.2:0", func(c net.Conn) {
		n, _ := io.CopyBuffer(struct{ io.Writer }{io.Discard}, struct{ io.Reader }{c}, make([]byte, 32<<10))
		m.sunk <- n
	})
	m.source = serve(tb, "127.0.0.2:0", func(c net.Conn) {
		for {
			if _, err := c.Write(buf); err != nil {
				return
			}
		}
	})
	hboneAddr = serve(tb, "127.0.0.2:0", func(c net.Conn) { m.proxy.HBONE(server, c) })
	err = store.Apply(workloadapi.AddressTypeURL, []state.Update{
		workload("a", "client", "client", "127.0.0.1"),
		workload("a", "echo", "echo", "127.0.0.2", inService(echoKey, 80, uint32(m.echo.Port()))),
		service("a", "echo.a.svc.cluster.local", "10.96.0.1", 80, uint32(m.echo.Port())),
	}, nil)
	if err != nil {
		tb.Fatal(err)
	}
	// The echo app is addressed by its service VIP, the others by pod IP.
	for app, origDst := range map[netip.AddrPort]netip.AddrPort{
		m.echo:   netip.MustParseAddrPort("10.96.0.1:80"),
		m.sink:   m.sink,
		m.source: m.source,
	} {
		m.viaMesh[app] = serve(tb, "127.0.0.1:0", func(c net.Conn) { m.proxy.Outbound(client, c, origDst) })
	}
	return m
}

// dial connects the client to app, through the mesh or not.
func (m *benchMesh) dial(tb testing.TB, app netip.AddrPort, mesh bool) net.Conn {
	tb.Helper()
	addr := app
	if mesh {
		addr = m.viaMesh[app]
	}
	c, err := net.Dial("tcp", addr.String())
	if err != nil {
		tb.Fatal(err)
	}
	return c
}

// paths are the two ways a client reaches an app, run side by side.
var paths = []struct {
	name string
	mesh bool
}{{"direct", false}, {"mesh", true}}

// BenchmarkDataPathRequestResponse exchanges 1 KiB requests and replies
// over 16 persistent connections as fast as they go (closed loop): ns/op
// is the inverse of the throughput, cpu-ns/op what one exchange costs.
func BenchmarkDataPathRequestResponse(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			conns := m.openEchoConns(b, p.mesh)
			b.ReportAllocs()
			var next atomic.Int64
			lat := make([][]time.Duration, len(conns))
			cpu := startCPU(b)
			var wg sync.WaitGroup
			for i, c := range conns {
				wg.Go(func() {
					lat[i] = exchange(b, c, func() bool { return next.Add(1) <= int64(b.N) })
				})
			}
			wg.Wait()
			cpu.report(b)
			reportLatency(b, lat)
		})
	}
}

// BenchmarkDataPathPaced exchanges 1 KiB requests and replies at 1,000 per
// second over 16 persistent connections, as the end-to-end HTTP load does:
// at that rate every exchange wakes the data path from idle, which is where
// the per-exchange CPU cost and the added latency show. ns/op is the pacing
// (1 ms); read p50-ns, p99-ns and cpu-ns/op.
func BenchmarkDataPathPaced(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			conns := m.openEchoConns(b, p.mesh)
			b.ReportAllocs()
			lat := make([][]time.Duration, len(conns))
			interval := time.Second / benchRate * benchConns // per connection
			start := time.Now()
			cpu := startCPU(b)
			var wg sync.WaitGroup
			for i, c := range conns {
				// Connection i sends exchanges i, i+16, i+32, ... at
				// start + k/rate, so the load is evenly spread.
				ops := (b.N - i + len(conns) - 1) / len(conns)
				wg.Go(func() {
					k := 0
					lat[i] = exchange(b, c, func() bool {
						if k >= ops {
							return false
						}
						time.Sleep(time.Until(start.Add(time.Duration(i)*time.Second/benchRate + time.Duration(k)*interval)))
						k++
						return true
					})
				})
			}
			wg.Wait()
			cpu.report(b)
			reportLatency(b, lat)
		})
	}
}

// BenchmarkDataPathUpload streams client -> app on one connection (MB/s).
func BenchmarkDataPathUpload(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			c := m.dial(b, m.sink, p.mesh)
			defer c.Close()
			chunk := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			cpu := startCPU(b)
			var sent int64
			for b.Loop() {
				n, err := c.Write(chunk)
				if err != nil {
					b.Fatal(err)
				}
				sent += int64(n)
			}
			cpu.report(b)
			c.(*net.TCPConn).CloseWrite()
			if got := <-m.sunk; got != sent {
				b.Fatalf("app received %d bytes, sent %d", got, sent)
			}
		})
	}
}

// BenchmarkDataPathDownload streams app -> client on one connection (MB/s).
func BenchmarkDataPathDownload(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			c := m.dial(b, m.source, p.mesh)
			defer c.Close()
			buf := make([]byte, benchChunk)
			b.SetBytes(benchChunk)
			b.ReportAllocs()
			cpu := startCPU(b)
			for b.Loop() {
				if _, err := io.ReadFull(c, buf); err != nil {
					b.Fatal(err)
				}
			}
			cpu.report(b)
		})
	}
}

// BenchmarkDataPathConnect opens a new app connection, exchanges one byte
// and closes it; through the mesh the stream rides the HBONE connection an
// earlier connection left in the pool.
func BenchmarkDataPathConnect(b *testing.B) {
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			connectOnce := func() {
				c := m.dial(b, m.echo, p.mesh)
				defer c.Close()
				if _, err := c.Write([]byte{'x'}); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
					b.Fatal(err)
				}
			}
			connectOnce() // dials the HBONE connection
			b.ReportAllocs()
			cpu := startCPU(b)
			for b.Loop() {
				connectOnce()
			}
			cpu.report(b)
		})
	}
}

// BenchmarkDataPathHeldConnMemory measures what an open, idle connection
// holds: heap and stacks (B/conn) and goroutines (goroutines/conn), both
// ends of the mesh and the client and app included. Connections are held
// in batches of 256.
func BenchmarkDataPathHeldConnMemory(b *testing.B) {
	const batch = 256
	for _, p := range paths {
		b.Run(p.name, func(b *testing.B) {
			m := newBenchMesh(b)
			m.dial(b, m.echo, p.mesh).Close() // the pool's HBONE connection is not per connection
			var bytes, goroutines, held float64
			for n := 0; n < b.N; {
				k := min(batch, b.N-n)
				base, baseG := heldMemory()
				conns := m.openN(b, k, p.mesh)
				with, withG := heldMemory()
				bytes += float64(with - base)
				goroutines += float64(withG - baseG)
				held += float64(k)
				b.StopTimer()
				for _, c := range conns {
					c.Close()
				}
				b.StartTimer()
				n += k
			}
			b.ReportMetric(bytes/held, "B/conn")
			b.ReportMetric(goroutines/held, "goroutines/conn")
		})
	}
}

// openEchoConns opens benchConns connections to the echo app and exchanges
// once on each.
func (m *benchMesh) openEchoConns(tb testing.TB, mesh bool) []net.Conn {
	tb.Helper()
	conns := m.openN(tb, benchConns, mesh)
	tb.Cleanup(func() {
		for _, c := range conns {
			c.Close()
		}
	})
	return conns
}

// openN opens n connections to the echo app, each having carried one 1 KiB
// exchange.
func (m *benchMesh) openN(tb testing.TB, n int, mesh bool) []net.Conn {
	tb.Helper()
	conns := make([]net.Conn, n)
	for i := range conns {
		conns[i] = m.dial(tb, m.echo, mesh)
		once := true
		exchange(tb, conns[i], func() bool { r := once; once = false; return r })
	}
	return conns
}

// exchange writes a request and reads the reply on c while more says so,
// returning each exchange's latency.
func exchange(tb testing.TB, c net.Conn, more func() bool) []time.Duration {
	msg := make([]byte, benchMsg)
	reply := make([]byte, benchMsg)
	var lat []time.Duration
	for more() {
		t0 := time.Now()
		if _, err := c.Write(msg); err != nil {
			tb.Error(err)
			return lat
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			tb.Error(err)
			return lat
		}
		lat = append(lat, time.Since(t0))
	}
	return lat
}

func reportLatency(b *testing.B, per [][]time.Duration) {
	all := slices.Concat(per...)
	if len(all) == 0 {
		return
	}
	slices.Sort(all)
	b.ReportMetric(float64(all[len(all)/2]), "p50-ns")
	b.ReportMetric(float64(all[len(all)*99/100]), "p99-ns")
}

// cpuClock measures the process's CPU time (user and system) over the
// timed part of a benchmark.
type cpuClock struct{ start time.Duration }

func startCPU(b *testing.B) cpuClock {
	b.ResetTimer()
	return cpuClock{start: processCPU()}
}

// report stops the timer and reports CPU time per op as cpu-ns/op.
func (c cpuClock) report(b *testing.B) {
	used := processCPU() - c.start
	b.StopTimer()
	b.ReportMetric(float64(used)/float64(b.N), "cpu-ns/op")
}

func processCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// heldMemory is the heap and stack memory in use and the number of
// goroutines, once the connections just opened or closed have settled.
func heldMemory() (int64, int) {
	time.Sleep(20 * time.Millisecond)
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return int64(ms.HeapInuse + ms.StackInuse), runtime.NumGoroutine()
}
