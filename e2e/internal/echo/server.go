package echo

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
)

// readHeaderTimeout bounds how long a client may take to send request headers,
// so an idle half-open connection cannot pin a goroutine forever.
const readHeaderTimeout = 10 * time.Second

// Server serves the HTTP, gRPC and TCP echo listeners of one workload.
type Server struct {
	cfg Config
	log *slog.Logger

	// ready is what /healthz and the gRPC health service report.
	ready atomic.Bool

	httpLns, grpcLns, tcpLns []net.Listener

	httpSrv *http.Server
	grpcSrv *grpc.Server
	health  *health.Server

	// httpConns and tcpConns hold open connections. net/http forgets h2c
	// connections once the h2c handler hijacks them, so shutdown waits for
	// and closes them through httpConns.
	httpConns, tcpConns connSet

	closeOnce sync.Once
}

// New listens on every configured port. Nothing is served until Run.
func New(cfg Config) (_ *Server, err error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	if cfg.Identity.Hostname == "" {
		cfg.Identity.Hostname = hostname()
	}
	s := &Server{cfg: cfg, log: log}
	defer func() {
		if err != nil {
			s.Close()
		}
	}()

	listen := func(ports []int) ([]net.Listener, error) {
		var lns []net.Listener
		for _, port := range ports {
			ln, err := net.Listen("tcp", net.JoinHostPort(cfg.Bind, strconv.Itoa(port)))
			if err != nil {
				return lns, fmt.Errorf("listening on port %d: %w", port, err)
			}
			lns = append(lns, ln)
		}
		return lns, nil
	}
	if s.httpLns, err = listen(cfg.HTTPPorts); err != nil {
		return nil, err
	}
	if s.grpcLns, err = listen(cfg.GRPCPorts); err != nil {
		return nil, err
	}
	if s.tcpLns, err = listen(cfg.TCPPorts); err != nil {
		return nil, err
	}

	s.httpSrv, err = s.newHTTPServer()
	if err != nil {
		return nil, err
	}
	s.grpcSrv, s.health = s.newGRPCServer()
	return s, nil
}

// HTTPAddrs returns the addresses serving HTTP/1.1 and h2c.
func (s *Server) HTTPAddrs() []string { return addrs(s.httpLns) }

// GRPCAddrs returns the addresses serving gRPC.
func (s *Server) GRPCAddrs() []string { return addrs(s.grpcLns) }

// TCPAddrs returns the addresses echoing raw TCP.
func (s *Server) TCPAddrs() []string { return addrs(s.tcpLns) }

func addrs(lns []net.Listener) []string {
	out := make([]string, len(lns))
	for i, ln := range lns {
		out[i] = ln.Addr().String()
	}
	return out
}

// Run serves until ctx is done, then stops taking new calls and waits up to
// the shutdown timeout for calls in flight. A done ctx is a clean exit; a
// listener that fails stops everything and its error is returned.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, len(s.httpLns)+len(s.grpcLns)+len(s.tcpLns))
	var serving sync.WaitGroup
	serve := func(kind string, ln net.Listener, fn func(net.Listener) error) {
		serving.Go(func() {
			if err := fn(ln); err != nil {
				errc <- fmt.Errorf("serving %s on %s: %w", kind, ln.Addr(), err)
			}
		})
	}
	for _, ln := range s.httpLns {
		serve("HTTP", ln, func(ln net.Listener) error {
			if err := s.httpSrv.Serve(s.httpConns.listener(ln)); !errors.Is(err, http.ErrServerClosed) {
				return err
			}
			return nil
		})
	}
	for _, ln := range s.grpcLns {
		serve("gRPC", ln, func(ln net.Listener) error {
			if err := s.grpcSrv.Serve(ln); !errors.Is(err, grpc.ErrServerStopped) {
				return err
			}
			return nil
		})
	}
	for _, ln := range s.tcpLns {
		serve("TCP", ln, s.serveTCP)
	}
	s.setReady(true)
	s.log.Info("serving", "http", s.HTTPAddrs(), "grpc", s.GRPCAddrs(), "tcp", s.TCPAddrs(),
		"pod", s.cfg.Identity.Pod, "namespace", s.cfg.Identity.Namespace)

	var runErr error
	select {
	case <-ctx.Done():
	case runErr = <-errc:
	}
	s.setReady(false)
	s.log.Info("shutting down", "timeout", s.cfg.ShutdownTimeout)
	s.shutdown()
	serving.Wait()
	return runErr
}

// shutdown stops listening and drains calls in flight, then closes what is
// left once the shutdown timeout is up.
func (s *Server) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), s.cfg.ShutdownTimeout)
	defer cancel()
	var wg sync.WaitGroup
	wg.Go(func() {
		// Shutdown also sends GOAWAY on h2c connections, through the hook
		// http2.ConfigureServer registered, but does not wait for them.
		_ = s.httpSrv.Shutdown(ctx)
		s.httpConns.wait(ctx)
	})
	wg.Go(func() {
		done := make(chan struct{})
		go func() { s.grpcSrv.GracefulStop(); close(done) }()
		select {
		case <-done:
		case <-ctx.Done():
			s.grpcSrv.Stop()
		}
	})
	wg.Go(func() {
		for _, ln := range s.tcpLns {
			_ = ln.Close()
		}
		s.tcpConns.wait(ctx)
	})
	wg.Wait()
	s.Close()
}

// Close stops everything at once, dropping calls in flight. It is safe to
// call more than once and after Run returned.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.setReady(false)
		for _, lns := range [][]net.Listener{s.httpLns, s.grpcLns, s.tcpLns} {
			for _, ln := range lns {
				_ = ln.Close()
			}
		}
		if s.httpSrv != nil {
			_ = s.httpSrv.Close()
		}
		if s.grpcSrv != nil {
			s.grpcSrv.Stop()
		}
		s.httpConns.closeAll()
		s.tcpConns.closeAll()
	})
	return nil
}

func (s *Server) setReady(ready bool) {
	s.ready.Store(ready)
	if s.health == nil {
		return
	}
	status := healthpb.HealthCheckResponse_NOT_SERVING
	if ready {
		status = healthpb.HealthCheckResponse_SERVING
	}
	s.health.SetServingStatus("", status)
}
