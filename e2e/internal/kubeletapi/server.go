// Package kubeletapi serves the part of the kubelet's HTTPS API that the
// kube-apiserver proxies to for `kubectl logs`, `kubectl exec` and
// `kubectl port-forward`: /containerLogs, /exec and /portForward, plus an
// unauthenticated /healthz. Requests are authenticated by client certificate
// or by bearer token (TokenReview) and authorized by SubjectAccessReview on the
// node's subresources, as the kubelet does with webhook authn/authz. The
// containers themselves are found through a Runtime that nodelet implements.
package kubeletapi

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"k8s.io/client-go/kubernetes"
)

// ErrNotFound is wrapped by Runtime errors for an unknown pod or container;
// the API answers 404.
var ErrNotFound = errors.New("not found")

// Runtime finds the containers the API serves.
type Runtime interface {
	// ContainerLogPath returns the CRI log file of the container's current
	// run, or of the one before it when previous is set.
	ContainerLogPath(namespace, pod, container string, previous bool) (string, error)
	// ContainerPID returns the main pid of the running container.
	ContainerPID(namespace, pod, container string) (int, error)
	// PodNetNS returns the pod's network namespace file; "/proc/self/ns/net"
	// for hostNetwork pods.
	PodNetNS(namespace, pod string) (string, error)
}

// Config configures a Server.
type Config struct {
	// Addr is the listen address, ":10250" or "10.0.0.2:10250".
	Addr string
	// CertFile and KeyFile are the serving certificate and key.
	CertFile, KeyFile string
	// ClientCAFile, when set, holds the CAs client certificates are verified
	// against; without it only bearer tokens authenticate.
	ClientCAFile string
	// NodeName is the node whose subresources requests are authorized on.
	NodeName string
	// Client makes the TokenReviews and SubjectAccessReviews.
	Client kubernetes.Interface
	// Runtime finds containers.
	Runtime Runtime
}

// Streaming timeouts, the kubelet's defaults.
const (
	// streamIdleTimeout closes an exec or port-forward connection with no
	// traffic (streamingConnectionIdleTimeout).
	streamIdleTimeout = 4 * time.Hour
	// streamCreationTimeout bounds the wait for a client to open its streams.
	streamCreationTimeout = 30 * time.Second
)

// Server is the kubelet API of one node.
type Server struct {
	cfg   Config
	auth  *authorizer
	srv   *http.Server
	tls   *tls.Config
	ready atomic.Bool

	connsMu sync.Mutex
	conns   map[net.Conn]struct{} // guarded by connsMu; every accepted connection, hijacked ones too

	closeOnce sync.Once
	closeErr  error
}

// New checks cfg and loads the certificates; it does not listen yet.
func New(cfg Config) (*Server, error) {
	if cfg.Addr == "" || cfg.NodeName == "" || cfg.Client == nil || cfg.Runtime == nil {
		return nil, errors.New("kubeletapi: Addr, NodeName, Client and Runtime are required")
	}
	cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
	if err != nil {
		return nil, fmt.Errorf("loading serving certificate: %w", err)
	}
	tc := &tls.Config{
		Certificates: []tls.Certificate{cert},
		MinVersion:   tls.VersionTLS12,
		// SPDY upgrades need HTTP/1.1.
		NextProtos: []string{"http/1.1"},
	}
	if cfg.ClientCAFile != "" {
		pem, err := os.ReadFile(cfg.ClientCAFile)
		if err != nil {
			return nil, fmt.Errorf("reading client CA file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("client CA file %s holds no certificate", cfg.ClientCAFile)
		}
		tc.ClientCAs = pool
		tc.ClientAuth = tls.VerifyClientCertIfGiven
	}
	s := &Server{cfg: cfg, tls: tc, auth: newAuthorizer(cfg.Client, cfg.NodeName), conns: map[net.Conn]struct{}{}}
	s.srv = &http.Server{
		Handler:           s.Handler(),
		ReadHeaderTimeout: 30 * time.Second,
		IdleTimeout:       90 * time.Second,
		TLSConfig:         tc,
		ConnContext:       connContext,
	}
	return s, nil
}

// Ready reports whether Run is serving.
func (s *Server) Ready() bool { return s.ready.Load() }

// Run listens on cfg.Addr and serves until ctx ends or Close is called; both
// are a clean exit.
func (s *Server) Run(ctx context.Context) error {
	ln, err := net.Listen("tcp", s.cfg.Addr)
	if err != nil {
		return fmt.Errorf("listening on %s: %w", s.cfg.Addr, err)
	}
	return s.Serve(ctx, ln)
}

// Serve is Run on a listener the caller made; it takes ownership of ln.
func (s *Server) Serve(ctx context.Context, ln net.Listener) error {
	stop := context.AfterFunc(ctx, func() { s.Close() })
	defer stop()
	s.ready.Store(true)
	defer s.ready.Store(false)
	err := s.srv.Serve(tls.NewListener(&trackingListener{Listener: ln, s: s}, s.tls))
	if errors.Is(err, http.ErrServerClosed) {
		return nil
	}
	return fmt.Errorf("serving kubelet API: %w", err)
}

// Close stops the server and every connection it holds, streams included.
// It is safe to call more than once.
func (s *Server) Close() error {
	s.closeOnce.Do(func() {
		s.closeErr = s.srv.Close()
		// http.Server forgets hijacked connections: exec and port-forward
		// sessions are closed here.
		s.connsMu.Lock()
		conns := make([]net.Conn, 0, len(s.conns))
		for c := range s.conns {
			conns = append(conns, c)
		}
		s.connsMu.Unlock()
		for _, c := range conns {
			c.Close()
		}
	})
	return s.closeErr
}

// trackingListener records accepted connections in s.conns until they close.
type trackingListener struct {
	net.Listener
	s *Server
}

func (l *trackingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	tc := &trackedConn{Conn: c, s: l.s}
	l.s.connsMu.Lock()
	l.s.conns[tc] = struct{}{}
	l.s.connsMu.Unlock()
	return tc, nil
}

type trackedConn struct {
	net.Conn
	s    *Server
	once sync.Once

	mu     sync.Mutex
	cancel context.CancelFunc // guarded by mu; ends the requests on this connection
	closed bool               // guarded by mu
}

func (c *trackedConn) Close() error {
	c.once.Do(func() {
		c.s.connsMu.Lock()
		delete(c.s.conns, c)
		c.s.connsMu.Unlock()
		c.mu.Lock()
		c.closed = true
		if c.cancel != nil {
			c.cancel()
		}
		c.mu.Unlock()
	})
	return c.Conn.Close()
}

// connContext gives each connection a context that ends when it closes.
// net/http stops watching a connection once it is hijacked, so without this
// an exec whose client went away (or a Close) would leave its command
// running; with it the command is killed.
func connContext(ctx context.Context, c net.Conn) context.Context {
	if tc, ok := c.(*tls.Conn); ok {
		c = tc.NetConn()
	}
	t, ok := c.(*trackedConn)
	if !ok {
		return ctx
	}
	ctx, cancel := context.WithCancel(ctx)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.closed {
		cancel()
	} else {
		t.cancel = cancel
	}
	return ctx
}

// Handler returns the API's handler with authentication and authorization,
// for tests and for callers that serve it themselves.
func (s *Server) Handler() http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("GET /containerLogs/{namespace}/{pod}/{container}", s.serveContainerLogs)
	mux.HandleFunc("/exec/{namespace}/{pod}/{container}", s.serveExec)
	mux.HandleFunc("/exec/{namespace}/{pod}/{uid}/{container}", s.serveExec)
	mux.HandleFunc("/portForward/{namespace}/{pod}", s.servePortForward)
	mux.HandleFunc("/portForward/{namespace}/{pod}/{uid}", s.servePortForward)
	authed := s.auth.wrap(mux)
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/healthz" {
			w.Header().Set("Content-Type", "text/plain; charset=utf-8")
			w.Write([]byte("ok"))
			return
		}
		authed.ServeHTTP(w, r)
	})
}

// httpError writes a plain-text error; err wrapping ErrNotFound becomes 404.
func httpError(w http.ResponseWriter, err error, code int) {
	if errors.Is(err, ErrNotFound) {
		code = http.StatusNotFound
	}
	msg := err.Error()
	if !strings.HasSuffix(msg, "\n") {
		msg += "\n"
	}
	http.Error(w, msg, code)
}
