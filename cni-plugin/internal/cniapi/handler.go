package cniapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
)

// Agent is what the node agent implements to serve the plugin. Errors
// wrapping ErrUnavailable answer 503 and ErrInvalidRequest 400; any other
// error answers 500. Its message reaches the container runtime, so it
// should say what is wrong with which pod.
type Agent interface {
	Add(ctx context.Context, r *PodRequest) (*Response, error)
	Del(ctx context.Context, r *PodRequest) (*Response, error)
	Check(ctx context.Context, r *PodRequest) (*Response, error)
	Status(ctx context.Context) (*Response, error)
}

// NewHandler serves the plugin's requests from a.
func NewHandler(a Agent, log *slog.Logger) http.Handler {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	mux := http.NewServeMux()
	for path, call := range map[string]func(context.Context, *PodRequest) (*Response, error){
		PathAdd:   a.Add,
		PathDel:   a.Del,
		PathCheck: a.Check,
	} {
		mux.HandleFunc("POST "+path, func(w http.ResponseWriter, req *http.Request) {
			var r PodRequest
			dec := json.NewDecoder(http.MaxBytesReader(w, req.Body, maxBodySize))
			if err := dec.Decode(&r); err != nil {
				writeError(w, log, path, nil, fmt.Errorf("%w: decoding body: %w", ErrInvalidRequest, err))
				return
			}
			if err := r.Validate(path); err != nil {
				writeError(w, log, path, &r, err)
				return
			}
			resp, err := call(req.Context(), &r)
			if err != nil {
				writeError(w, log, path, &r, err)
				return
			}
			log.Debug("cni request", "path", path, "pod", r.String(), "outcome", resp.Outcome)
			writeJSON(w, http.StatusOK, resp)
		})
	}
	mux.HandleFunc("GET "+PathStatus, func(w http.ResponseWriter, req *http.Request) {
		resp, err := a.Status(req.Context())
		if err != nil {
			writeError(w, log, PathStatus, nil, fmt.Errorf("%w: %w", ErrUnavailable, err))
			return
		}
		writeJSON(w, http.StatusOK, resp)
	})
	return mux
}

func writeError(w http.ResponseWriter, log *slog.Logger, path string, r *PodRequest, err error) {
	code := http.StatusInternalServerError
	switch {
	case errors.Is(err, ErrInvalidRequest):
		code = http.StatusBadRequest
	case errors.Is(err, ErrUnavailable):
		code = http.StatusServiceUnavailable
	}
	pod := ""
	if r != nil {
		pod = r.String()
	}
	log.Warn("cni request failed", "path", path, "pod", pod, "status", code, "error", err)
	writeJSON(w, code, &Response{Error: err.Error()})
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(code)
	_ = json.NewEncoder(w).Encode(v)
}

// Listen opens the agent's unix socket at path (mode 0600: only root, which
// the container runtime runs the plugin as, may call it), replacing a stale
// socket file left by a previous agent. Closing the listener removes the
// socket file unless another agent has replaced it since.
func Listen(path string) (_ net.Listener, err error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("creating socket directory: %w", err)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != fs.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, fmt.Errorf("removing stale socket: %w", err)
		}
	}
	// Bind under a temporary name and restrict it before it appears at path.
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+"."+strconv.Itoa(os.Getpid()))
	_ = os.Remove(tmp)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listening on %s: %w", path, err)
	}
	ln.SetUnlinkOnClose(false)
	defer func() {
		if err != nil {
			ln.Close()
			os.Remove(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o600); err != nil {
		return nil, fmt.Errorf("restricting socket permissions: %w", err)
	}
	fi, err := os.Stat(tmp)
	if err != nil {
		return nil, fmt.Errorf("inspecting socket: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return nil, fmt.Errorf("moving socket into place: %w", err)
	}
	return &socketListener{UnixListener: ln, path: path, fi: fi}, nil
}

type socketListener struct {
	*net.UnixListener
	path string
	fi   fs.FileInfo
}

func (l *socketListener) Close() error {
	err := l.UnixListener.Close()
	if fi, statErr := os.Stat(l.path); statErr == nil && os.SameFile(fi, l.fi) {
		os.Remove(l.path)
	}
	return err
}
