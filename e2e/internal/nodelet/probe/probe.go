// Package probe runs a container's startup, readiness and liveness probes the
// way the kubelet's prober does: one attempt with Run (httpGet, tcpSocket,
// exec through nsenter, grpc health), and Watch to run attempts on the
// probe's schedule and report each change of the thresholded result.
package probe

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/ambient-mesh/ambient/e2e/internal/nsexec"
)

// Kind says which probe a Watch runs; it decides the starting state and when
// watching stops.
type Kind int

const (
	// Startup has no starting state: its first thresholded result is always
	// reported (passing: the container started; failing: restart it), and
	// watching stops there, as the kubelet stops probing startup.
	Startup Kind = iota
	// Readiness starts failing and is watched for as long as ctx lives.
	Readiness
	// Liveness starts passing; watching stops once it fails, since the
	// container is then restarted and gets a new Watch.
	Liveness
)

func (k Kind) String() string {
	switch k {
	case Startup:
		return "Startup"
	case Readiness:
		return "Readiness"
	case Liveness:
		return "Liveness"
	}
	return "Kind(" + strconv.Itoa(int(k)) + ")"
}

// Target is the container a probe checks.
type Target struct {
	// PodIP is the default host of httpGet and tcpSocket, and grpc's host.
	PodIP string
	// ContainerPID is the container's main process; exec probes join its
	// mount and network namespaces.
	ContainerPID int
	// Env is the environment of exec probe commands ("K=V").
	Env []string
}

// Kubernetes' defaults for unset probe fields.
const (
	defaultPeriodSeconds    = 10
	defaultTimeoutSeconds   = 1
	defaultSuccessThreshold = 1
	defaultFailureThreshold = 3
)

// maxBody bounds how much of an HTTP response is read, as the kubelet does;
// maxMsg bounds how much output a result message carries.
const (
	maxBody = 10 << 10
	maxMsg  = 1 << 10
)

// userAgent is what the kubelet sends on HTTP and gRPC probes.
const userAgent = "kube-probe/1.36"

// tick is the length of a probe "second" for periodSeconds and
// initialDelaySeconds; tests shorten it.
var tick = time.Second

// Run makes one attempt of p against t and reports whether it passed, with a
// message saying why not (or, for HTTP, what the body said). timeoutSeconds
// bounds the attempt.
func Run(ctx context.Context, p *corev1.Probe, t Target, ports []corev1.ContainerPort) (ok bool, msg string) {
	if p == nil {
		return false, "no probe"
	}
	timeout := time.Duration(orDefault(p.TimeoutSeconds, defaultTimeoutSeconds)) * time.Second
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	switch {
	case p.HTTPGet != nil:
		return runHTTP(ctx, p.HTTPGet, t, ports)
	case p.TCPSocket != nil:
		return runTCP(ctx, p.TCPSocket, t, ports)
	case p.Exec != nil:
		return runExec(ctx, p.Exec, t, timeout)
	case p.GRPC != nil:
		return runGRPC(ctx, p.GRPC, t)
	}
	return false, "probe has no handler"
}

// Watch runs p on its schedule until ctx ends (or, see Kind, until the
// probe's outcome is settled) and calls update whenever the thresholded
// state changes: successThreshold passes in a row make it passing,
// failureThreshold failures in a row make it failing. update is called
// from Watch's goroutine.
func Watch(ctx context.Context, p *corev1.Probe, kind Kind, t Target, ports []corev1.ContainerPort, update func(passing bool, msg string)) {
	if p == nil {
		return
	}
	period := time.Duration(orDefault(p.PeriodSeconds, defaultPeriodSeconds)) * tick
	successes := int(orDefault(p.SuccessThreshold, defaultSuccessThreshold))
	failures := int(orDefault(p.FailureThreshold, defaultFailureThreshold))
	state, known := kind == Liveness, kind != Startup

	if !sleep(ctx, time.Duration(p.InitialDelaySeconds)*tick) {
		return
	}
	var (
		last bool
		run  int // attempts in a row with result last
	)
	for {
		ok, msg := Run(ctx, p, t, ports)
		if ctx.Err() != nil {
			return
		}
		if run == 0 || ok != last {
			last, run = ok, 0
		}
		run++
		if (ok && run >= successes) || (!ok && run >= failures) {
			if !known || ok != state {
				state, known = ok, true
				update(ok, msg)
				if kind == Startup || (kind == Liveness && !ok) {
					return
				}
			}
		}
		if !sleep(ctx, period) {
			return
		}
	}
}

func sleep(ctx context.Context, d time.Duration) bool {
	if d <= 0 {
		return ctx.Err() == nil
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}

func orDefault(v, def int32) int32 {
	if v <= 0 {
		return def
	}
	return v
}

// resolvePort turns a probe's port (a number or the name of one of the
// container's ports) into a number.
func resolvePort(p intstr.IntOrString, ports []corev1.ContainerPort) (int, error) {
	if p.Type == intstr.Int {
		if p.IntVal <= 0 || p.IntVal > 65535 {
			return 0, fmt.Errorf("invalid port %d", p.IntVal)
		}
		return int(p.IntVal), nil
	}
	for _, cp := range ports {
		if cp.Name == p.StrVal {
			return int(cp.ContainerPort), nil
		}
	}
	if n, err := strconv.Atoi(p.StrVal); err == nil && n > 0 && n <= 65535 {
		return n, nil
	}
	return 0, fmt.Errorf("no container port named %q", p.StrVal)
}

func truncate(s string) string {
	if len(s) <= maxMsg {
		return s
	}
	return s[:maxMsg] + "...(truncated)"
}

func runHTTP(ctx context.Context, h *corev1.HTTPGetAction, t Target, ports []corev1.ContainerPort) (bool, string) {
	port, err := resolvePort(h.Port, ports)
	if err != nil {
		return false, err.Error()
	}
	host := h.Host
	if host == "" {
		host = t.PodIP
	}
	scheme := strings.ToLower(string(h.Scheme))
	if scheme == "" {
		scheme = "http"
	}
	u, err := url.Parse(h.Path)
	if err != nil {
		return false, fmt.Sprintf("invalid path %q: %v", h.Path, err)
	}
	u.Scheme = scheme
	u.Host = net.JoinHostPort(host, strconv.Itoa(port))
	if u.Path == "" {
		u.Path = "/"
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return false, err.Error()
	}
	req.Header.Set("User-Agent", userAgent)
	req.Header.Set("Accept", "*/*")
	for _, hd := range h.HTTPHeaders {
		if strings.EqualFold(hd.Name, "Host") {
			req.Host = hd.Value
			continue
		}
		req.Header.Add(hd.Name, hd.Value)
	}
	client := &http.Client{
		Transport: &http.Transport{
			// The kubelet does not verify a probed container's certificate.
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true},
			DisableKeepAlives: true,
			Proxy:             nil,
		},
		// Like the kubelet, follow redirects on the same host only; a
		// redirect elsewhere counts as success (3xx) without being followed.
		CheckRedirect: func(r *http.Request, via []*http.Request) error {
			if len(via) >= 10 || r.URL.Hostname() != via[0].URL.Hostname() {
				return http.ErrUseLastResponse
			}
			return nil
		},
	}
	resp, err := client.Do(req)
	if err != nil {
		return false, fmt.Sprintf("Get %q: %v", u.String(), unwrapURLError(err))
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if resp.StatusCode >= 200 && resp.StatusCode < 400 {
		return true, truncate(string(body))
	}
	return false, truncate(fmt.Sprintf("HTTP probe failed with statuscode: %d: %s", resp.StatusCode, body))
}

func unwrapURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

func runTCP(ctx context.Context, s *corev1.TCPSocketAction, t Target, ports []corev1.ContainerPort) (bool, string) {
	port, err := resolvePort(s.Port, ports)
	if err != nil {
		return false, err.Error()
	}
	host := s.Host
	if host == "" {
		host = t.PodIP
	}
	addr := net.JoinHostPort(host, strconv.Itoa(port))
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", addr)
	if err != nil {
		return false, fmt.Sprintf("dial tcp %s: %v", addr, err)
	}
	conn.Close()
	return true, ""
}

// runExec runs the command in the container as nsexec.EnterArgv does.
func runExec(ctx context.Context, e *corev1.ExecAction, t Target, timeout time.Duration) (bool, string) {
	if len(e.Command) == 0 {
		return false, "exec probe has no command"
	}
	if t.ContainerPID <= 0 {
		return false, "no container process to exec in"
	}
	argv, err := nsexec.EnterArgv(t.ContainerPID, false, e.Command)
	if err != nil {
		return false, err.Error()
	}
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.Env = t.Env
	if cmd.Env == nil {
		cmd.Env = []string{}
	}
	// A command that leaves children holding the output pipe must not hold
	// the probe past its timeout.
	cmd.WaitDelay = 100 * time.Millisecond
	out, err := cmd.CombinedOutput()
	if ctx.Err() != nil {
		return false, fmt.Sprintf("command %q timed out after %s", strings.Join(e.Command, " "), timeout)
	}
	if err != nil {
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			return false, truncate(fmt.Sprintf("command %q exited with %d: %s", strings.Join(e.Command, " "), ee.ExitCode(), out))
		}
		return false, fmt.Sprintf("running %q: %v", strings.Join(e.Command, " "), err)
	}
	return true, truncate(string(out))
}

func runGRPC(ctx context.Context, g *corev1.GRPCAction, t Target) (bool, string) {
	addr := net.JoinHostPort(t.PodIP, strconv.Itoa(int(g.Port)))
	conn, err := grpc.NewClient(addr,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithUserAgent(userAgent))
	if err != nil {
		return false, fmt.Sprintf("connecting to %s: %v", addr, err)
	}
	defer conn.Close()
	service := ""
	if g.Service != nil {
		service = *g.Service
	}
	resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
	if err != nil {
		return false, fmt.Sprintf("health check of %s (service %q): %v", addr, service, err)
	}
	if resp.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		return false, fmt.Sprintf("service unhealthy (responded with %q)", resp.GetStatus())
	}
	return true, ""
}
