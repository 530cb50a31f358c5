package kubeletapi

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"strconv"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/cri-streaming/pkg/streaming/remotecommand"
	"k8s.io/streaming/pkg/httpstream/wsstream"
)

// execProtocols are the SPDY (and, by the same names, websocket) remote
// command protocols served: the kubelet's list, newest first; v5 is websocket
// only and handled by serveExecV5.
var execProtocols = remotecommand.SupportedStreamingProtocols

// exitError is a command's non-zero exit. remotecommand.ServeExec recognises
// it (by the methods of k8s.io/utils/exec.ExitError) and sends the code to
// the client, so `kubectl exec -- false` exits 1.
type exitError struct{ code int }

func (e exitError) Error() string   { return "command terminated with exit code " + strconv.Itoa(e.code) }
func (e exitError) String() string  { return e.Error() }
func (e exitError) Exited() bool    { return true }
func (e exitError) ExitStatus() int { return e.code }

// containerExecutor runs commands in one container; the name and uid
// arguments of ExecInContainer are ignored.
type containerExecutor struct {
	pid int
}

// serveExec answers /exec/{namespace}/{pod}[/{uid}]/{container}?command=...
func (s *Server) serveExec(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		http.Error(w, "method not allowed\n", http.StatusMethodNotAllowed)
		return
	}
	ns, pod, ctr := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	opts, err := remotecommand.NewOptions(r)
	if err != nil {
		httpError(w, err, http.StatusBadRequest)
		return
	}
	cmd := r.URL.Query()["command"]
	if len(cmd) == 0 {
		httpError(w, fmt.Errorf("no command given"), http.StatusBadRequest)
		return
	}
	pid, err := s.cfg.Runtime.ContainerPID(ns, pod, ctr)
	if err != nil {
		httpError(w, fmt.Errorf("container %q in pod %s/%s: %w", ctr, ns, pod, err), http.StatusInternalServerError)
		return
	}
	ex := containerExecutor{pid: pid}
	if wsstream.IsWebSocketRequestWithStreamCloseProtocol(r) {
		serveExecV5(w, r, ex, cmd, opts)
		return
	}
	remotecommand.ServeExec(w, r, ex, ns+"/"+pod, r.PathValue("uid"), ctr, cmd, opts,
		streamIdleTimeout, streamCreationTimeout, execProtocols)
}

// Websocket channel numbers of the remote command protocol.
const (
	chanStdin = iota
	chanStdout
	chanStderr
	chanError
	chanResize
)

// serveExecV5 serves a websocket exec that asked for v5.channel.k8s.io, the
// protocol kubectl speaks when the apiserver passes websockets through
// (ExtendWebSocketsToKubelet). cri-streaming stops at v4; v5 adds only the
// CLOSE signal for stdin, which wsstream implements.
func serveExecV5(w http.ResponseWriter, r *http.Request, ex containerExecutor, cmd []string, opts *remotecommand.Options) {
	channel := func(use bool, t wsstream.ChannelType) wsstream.ChannelType {
		if use {
			return t
		}
		return wsstream.IgnoreChannel
	}
	channels := []wsstream.ChannelType{
		chanStdin:  channel(opts.Stdin, wsstream.ReadChannel),
		chanStdout: channel(opts.Stdout, wsstream.WriteChannel),
		chanStderr: channel(opts.Stderr, wsstream.WriteChannel),
		chanError:  wsstream.WriteChannel,
		chanResize: channel(opts.TTY, wsstream.ReadChannel),
	}
	conn := wsstream.NewConn(map[string]wsstream.ChannelProtocolConfig{
		remotecommand.StreamProtocolV5Name: {Binary: true, Channels: channels},
		remotecommand.StreamProtocolV4Name: {Binary: true, Channels: channels},
	})
	conn.SetIdleTimeout(streamIdleTimeout)
	_, streams, err := conn.Open(w, r)
	if err != nil {
		slog.Error("upgrading exec websocket", "err", err)
		return
	}
	defer conn.Close()
	// An empty message on the lowest writable channel tells the client the
	// connection is up (as cri-streaming does).
	switch {
	case opts.Stdout:
		streams[chanStdout].Write(nil)
	case opts.Stderr:
		streams[chanStderr].Write(nil)
	default:
		streams[chanError].Write(nil)
	}
	var in io.Reader
	if opts.Stdin {
		in = streams[chanStdin]
	}
	var out, errw io.WriteCloser
	if opts.Stdout {
		out = streams[chanStdout]
	}
	if opts.Stderr {
		errw = streams[chanStderr]
	}
	var resize chan remotecommand.TerminalSize
	if opts.TTY {
		resize = make(chan remotecommand.TerminalSize)
		go decodeResizes(r.Context(), streams[chanResize], resize)
	}
	err = ex.ExecInContainer(r.Context(), "", "", "", cmd, in, out, errw, opts.TTY, resize, 0)
	st := execStatus(err)
	b, _ := json.Marshal(st)
	streams[chanError].Write(b)
}

// execStatus is the status the v4 and v5 protocols send on the error channel.
func execStatus(err error) metav1.Status {
	if err == nil {
		return metav1.Status{Status: metav1.StatusSuccess}
	}
	if ee, ok := err.(exitError); ok {
		return metav1.Status{
			Status:  metav1.StatusFailure,
			Reason:  remotecommand.NonZeroExitCodeReason,
			Message: fmt.Sprintf("command terminated with non-zero exit code: %v", ee),
			Details: &metav1.StatusDetails{Causes: []metav1.StatusCause{{
				Type:    remotecommand.ExitCodeCauseType,
				Message: strconv.Itoa(ee.code),
			}}},
		}
	}
	return metav1.Status{
		Status:  metav1.StatusFailure,
		Code:    http.StatusInternalServerError,
		Reason:  metav1.StatusReasonInternalError,
		Message: fmt.Sprintf("error executing command in container: %v", err),
		Details: &metav1.StatusDetails{Causes: []metav1.StatusCause{{Message: err.Error()}}},
	}
}

// decodeResizes reads JSON terminal sizes until the stream ends.
func decodeResizes(ctx context.Context, r io.Reader, out chan<- remotecommand.TerminalSize) {
	defer close(out)
	dec := json.NewDecoder(r)
	for {
		var size remotecommand.TerminalSize
		if err := dec.Decode(&size); err != nil {
			return
		}
		select {
		case out <- size:
		case <-ctx.Done():
			return
		}
	}
}

// execWaitDelay bounds how long output is still copied after the command
// exits while something it started keeps its stdout or stderr open.
const execWaitDelay = 2 * time.Second
