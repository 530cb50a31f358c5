package echo

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/h2c"
)

// Paths and query parameters of the HTTP echo.
const (
	healthPath   = "/healthz"
	statusPrefix = "/status/" // /status/<code> answers with that status code
	delayParam   = "delay"    // Go duration to hold the reply back
	sizeParam    = "size"     // reply with exactly this many filler bytes
	formatParam  = "format"   // "text" for key=value lines instead of JSON
)

// fillerChunk is written repeatedly for ?size replies.
var fillerChunk = []byte(strings.Repeat("0123456789abcdef", 2048))

func (s *Server) newHTTPServer() (*http.Server, error) {
	h2s := &http2.Server{}
	// h2c serves HTTP/2 without TLS both with prior knowledge and through
	// the HTTP/1.1 Upgrade of RFC 7540 section 3.2. net/http's own
	// unencrypted HTTP/2 only does prior knowledge, and tests want both.
	// Bound bodies both inside, for requests on HTTP/2 connections, and
	// outside, for the Upgrade request h2c reads whole into memory.
	inner := http.MaxBytesHandler(http.HandlerFunc(s.serveHTTP), s.cfg.MaxSize)
	handler := h2c.NewHandler(inner, h2s) //nolint:staticcheck // see above
	handler = http.MaxBytesHandler(handler, s.cfg.MaxSize)
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: readHeaderTimeout,
		ErrorLog:          slog.NewLogLogger(s.log.Handler(), slog.LevelWarn),
	}
	// ConfigureServer makes srv.Shutdown send GOAWAY on h2c connections.
	if err := http2.ConfigureServer(srv, h2s); err != nil {
		return nil, fmt.Errorf("configuring HTTP/2: %w", err)
	}
	return srv, nil
}

// serveHTTP dispatches by hand rather than through http.ServeMux, which would
// redirect paths it considers unclean; an echo server must answer any path.
func (s *Server) serveHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path == healthPath {
		s.serveHealth(w)
		return
	}
	start := time.Now()
	status, n := s.serveEcho(w, r)
	s.log.Info("http request", "proto", r.Proto, "method", r.Method, "host", r.Host,
		"path", r.URL.Path, "peer", r.RemoteAddr, "status", status, "bytes", n,
		"duration", time.Since(start))
}

func (s *Server) serveHealth(w http.ResponseWriter) {
	if !s.ready.Load() {
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = w.Write([]byte("ok\n"))
}

// echoKnobs are the parts of a request that change the reply.
type echoKnobs struct {
	status int
	delay  time.Duration
	size   int64 // -1: reply with the Reply itself
	text   bool
}

func (s *Server) parseKnobs(r *http.Request) (echoKnobs, error) {
	k := echoKnobs{status: http.StatusOK, size: -1}
	if code, ok := strings.CutPrefix(r.URL.Path, statusPrefix); ok {
		n, err := strconv.Atoi(strings.TrimSuffix(code, "/"))
		if err != nil || n < 200 || n > 599 {
			return k, fmt.Errorf("status %q is not a number from 200 to 599", code)
		}
		k.status = n
	}
	q := r.URL.Query()
	if v := q.Get(delayParam); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 || d > s.cfg.MaxDelay {
			return k, fmt.Errorf("delay %q is not a duration from 0 to %v", v, s.cfg.MaxDelay)
		}
		k.delay = d
	}
	if v := q.Get(sizeParam); v != "" {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil || n < 0 || n > s.cfg.MaxSize {
			return k, fmt.Errorf("size %q is not a number from 0 to %d", v, s.cfg.MaxSize)
		}
		k.size = n
	}
	k.text = q.Get(formatParam) == "text"
	return k, nil
}

// serveEcho answers one request and returns the status and body bytes sent.
func (s *Server) serveEcho(w http.ResponseWriter, r *http.Request) (int, int64) {
	k, err := s.parseKnobs(r)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return http.StatusBadRequest, 0
	}
	// Read the whole body before answering: some HTTP/1.1 clients stop
	// reading the reply until their request is sent.
	n, err := io.Copy(io.Discard, r.Body)
	if err != nil {
		var tooLarge *http.MaxBytesError
		if errors.As(err, &tooLarge) {
			http.Error(w, "request body too large", http.StatusRequestEntityTooLarge)
			return http.StatusRequestEntityTooLarge, 0
		}
		return 0, 0 // the client went away
	}
	if k.delay > 0 {
		t := time.NewTimer(k.delay)
		defer t.Stop()
		select {
		case <-t.C:
		case <-r.Context().Done():
			return 0, 0
		}
	}

	if k.size >= 0 {
		w.Header().Set("Content-Type", "application/octet-stream")
		w.Header().Set("Content-Length", strconv.FormatInt(k.size, 10))
		w.WriteHeader(k.status)
		return k.status, writeFiller(w, k.size)
	}

	reply := s.httpReply(r, n)
	var body []byte
	if k.text {
		var b strings.Builder
		_ = reply.WriteText(&b)
		body = []byte(b.String())
		w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	} else {
		body, _ = json.Marshal(reply)
		body = append(body, '\n')
		w.Header().Set("Content-Type", "application/json")
	}
	w.Header().Set("Content-Length", strconv.Itoa(len(body)))
	w.WriteHeader(k.status)
	written, _ := w.Write(body)
	return k.status, int64(written)
}

func writeFiller(w http.ResponseWriter, size int64) int64 {
	var n int64
	for n < size {
		chunk := fillerChunk[:min(int64(len(fillerChunk)), size-n)]
		m, err := w.Write(chunk)
		n += int64(m)
		if err != nil {
			break
		}
	}
	return n
}

func (s *Server) httpReply(r *http.Request, bodyBytes int64) Reply {
	id := s.cfg.Identity
	reply := Reply{
		Pod:          id.Pod,
		Namespace:    id.Namespace,
		PodIP:        id.PodIP,
		Hostname:     id.Hostname,
		Version:      id.Version,
		PeerAddress:  r.RemoteAddr,
		Host:         r.Host,
		Method:       r.Method,
		Path:         r.URL.Path,
		Query:        r.URL.RawQuery,
		Proto:        r.Proto,
		Headers:      r.Header.Clone(),
		RequestBytes: bodyBytes,
	}
	if reply.Headers == nil {
		reply.Headers = map[string][]string{}
	}
	if local, ok := r.Context().Value(http.LocalAddrContextKey).(net.Addr); ok {
		reply.LocalAddress = local.String()
	}
	return reply
}

func hostname() string {
	h, _ := os.Hostname()
	return h
}
