package kubeletapi

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"strconv"
	"time"

	corev1 "k8s.io/api/core/v1"

	"github.com/ambient-mesh/ambient/e2e/internal/nodelet/crilog"
)

// followPoll is how often a followed log is checked for growth.
const followPoll = 200 * time.Millisecond

// stoppedGrace is how long a followed log is kept open after its container
// stopped, so that a quick restart's new log is picked up; after it the
// stream ends, as the kubelet's does when the container is not running.
const stoppedGrace = 2 * time.Second

// logTimestampFormat is how timestamps=true prefixes lines: the kubelet's
// RFC3339Nano with fixed-width nanoseconds.
const logTimestampFormat = "2006-01-02T15:04:05.000000000Z07:00"

// logOptions are the query parameters of /containerLogs.
type logOptions struct {
	follow, previous, timestamps bool
	tailLines                    int64 // < 0: all
	limitBytes                   int64 // < 0: no limit
	since                        time.Time
	stdout, stderr               bool
}

// parseLogOptions decodes the v1.PodLogOptions query parameters the
// apiserver passes on, and the legacy "tail" ("all" or a count).
func parseLogOptions(r *http.Request) (logOptions, error) {
	q := r.URL.Query()
	o := logOptions{tailLines: -1, limitBytes: -1, stdout: true, stderr: true}
	var err error
	flag := func(name string) bool {
		v := q.Get(name)
		if v == "" || err != nil {
			return false
		}
		b, perr := strconv.ParseBool(v)
		if perr != nil {
			err = fmt.Errorf("%s: %w", name, perr)
		}
		return b
	}
	count := func(name string) (int64, bool) {
		v := q.Get(name)
		if v == "" || err != nil {
			return 0, false
		}
		n, perr := strconv.ParseInt(v, 10, 64)
		if perr != nil {
			err = fmt.Errorf("%s: %w", name, perr)
		}
		return n, perr == nil
	}
	o.follow, o.previous, o.timestamps = flag("follow"), flag("previous"), flag("timestamps")
	if tail := q.Get("tail"); tail != "" && q.Get("tailLines") == "" && tail != "all" {
		q.Set("tailLines", tail)
	}
	if n, ok := count("tailLines"); ok {
		if n < 0 {
			return o, errors.New("tailLines must not be negative")
		}
		o.tailLines = n
	}
	if n, ok := count("limitBytes"); ok {
		if n < 1 {
			return o, errors.New("limitBytes must be positive")
		}
		o.limitBytes = n
	}
	secs, haveSecs := count("sinceSeconds")
	if err != nil {
		return o, err
	}
	if o.follow && o.previous {
		return o, errors.New("follow and previous are mutually exclusive")
	}
	sinceTime := q.Get("sinceTime")
	switch {
	case haveSecs && sinceTime != "":
		return o, errors.New("sinceSeconds and sinceTime are mutually exclusive")
	case haveSecs:
		if secs < 1 {
			return o, errors.New("sinceSeconds must be positive")
		}
		o.since = time.Now().Add(-time.Duration(secs) * time.Second)
	case sinceTime != "":
		t, err := time.Parse(time.RFC3339, sinceTime)
		if err != nil {
			return o, fmt.Errorf("sinceTime: %w", err)
		}
		o.since = t
	}
	switch q.Get("stream") {
	case "", corev1.LogStreamAll:
	case corev1.LogStreamStdout:
		o.stderr = false
	case corev1.LogStreamStderr:
		o.stdout = false
	default:
		return o, fmt.Errorf("unknown stream %q", q.Get("stream"))
	}
	return o, nil
}

// serveContainerLogs answers GET /containerLogs/{namespace}/{pod}/{container}
// with the container's log as plain text.
func (s *Server) serveContainerLogs(w http.ResponseWriter, r *http.Request) {
	ns, pod, ctr := r.PathValue("namespace"), r.PathValue("pod"), r.PathValue("container")
	opts, err := parseLogOptions(r)
	if err != nil {
		httpError(w, err, http.StatusBadRequest)
		return
	}
	path, err := s.cfg.Runtime.ContainerLogPath(ns, pod, ctr, opts.previous)
	if err != nil {
		httpError(w, fmt.Errorf("container %q in pod %s/%s: %w", ctr, ns, pod, err), http.StatusInternalServerError)
		return
	}
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		what := "log"
		if opts.previous {
			what = "previous terminated container's log"
		}
		httpError(w, fmt.Errorf("%s of container %q in pod %s/%s: %w", what, ctr, ns, pod, ErrNotFound), 0)
		return
	}
	if err != nil {
		httpError(w, fmt.Errorf("opening log: %w", err), http.StatusInternalServerError)
		return
	}
	if opts.tailLines >= 0 {
		off, err := tailOffset(f, opts.tailLines)
		if err == nil {
			_, err = f.Seek(off, io.SeekStart)
		}
		if err != nil {
			f.Close()
			httpError(w, fmt.Errorf("finding tail of log: %w", err), http.StatusInternalServerError)
			return
		}
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.WriteHeader(http.StatusOK)
	lc := &logCopier{
		s: s, ns: ns, pod: pod, ctr: ctr, opts: opts,
		out: w, rc: http.NewResponseController(w),
		remaining: opts.limitBytes,
		midLine:   map[string]bool{},
	}
	lc.copy(r.Context(), f, path)
}

// logCopier turns CRI records into the plain text kubectl shows.
type logCopier struct {
	s            *Server
	ns, pod, ctr string
	opts         logOptions
	out          io.Writer
	rc           *http.ResponseController
	remaining    int64           // bytes left under limitBytes; < 0: no limit
	midLine      map[string]bool // stream -> last record was partial
	dropping     map[string]bool // stream -> the current line is before since
}

// copy writes f's records, then follows the log while asked to; it closes
// whatever file it has open last.
func (lc *logCopier) copy(ctx context.Context, f *os.File, path string) {
	defer func() { f.Close() }()
	rd := crilog.NewReader(f)
	var stoppedSince time.Time
	for {
		wrote := false
		for {
			e, err := rd.Next()
			if errors.Is(err, crilog.ErrMalformed) {
				continue
			}
			if err != nil {
				break
			}
			if !lc.emit(e) {
				return
			}
			wrote = true
		}
		if wrote {
			lc.rc.Flush()
		}
		if !lc.opts.follow {
			if e, ok := rd.Tail(); ok {
				lc.emit(e)
			}
			return
		}
		if wrote {
			stoppedSince = time.Time{}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(followPoll):
		}
		if grown(f) {
			continue
		}
		// The file stopped growing: a restarted container writes a new one.
		next, err := lc.s.cfg.Runtime.ContainerLogPath(lc.ns, lc.pod, lc.ctr, false)
		if errors.Is(err, ErrNotFound) {
			lc.finish(rd)
			return
		}
		if err == nil && next != path {
			if nf, err := os.Open(next); err == nil {
				lc.finish(rd)
				f.Close()
				f, path, rd = nf, next, crilog.NewReader(nf)
				stoppedSince = time.Time{}
				continue
			}
		}
		if _, err := lc.s.cfg.Runtime.ContainerPID(lc.ns, lc.pod, lc.ctr); err != nil {
			if stoppedSince.IsZero() {
				stoppedSince = time.Now()
			} else if time.Since(stoppedSince) > stoppedGrace {
				lc.finish(rd)
				return
			}
		} else {
			stoppedSince = time.Time{}
		}
	}
}

// finish drains rd, which will not grow any more, tail included.
func (lc *logCopier) finish(rd *crilog.Reader) {
	for {
		e, err := rd.Next()
		if errors.Is(err, crilog.ErrMalformed) {
			continue
		}
		if err != nil {
			break
		}
		if !lc.emit(e) {
			return
		}
	}
	if e, ok := rd.Tail(); ok {
		lc.emit(e)
	}
	lc.rc.Flush()
}

// grown reports whether f has bytes past its read offset.
func grown(f *os.File) bool {
	off, err := f.Seek(0, io.SeekCurrent)
	if err != nil {
		return false
	}
	fi, err := f.Stat()
	return err == nil && fi.Size() > off
}

// emit writes one record; false means stop (limit reached or client gone).
func (lc *logCopier) emit(e crilog.Entry) bool {
	if (e.Stream == crilog.Stdout && !lc.opts.stdout) || (e.Stream == crilog.Stderr && !lc.opts.stderr) {
		return true
	}
	starts := !lc.midLine[e.Stream]
	lc.midLine[e.Stream] = e.Partial
	// A line is in or out by the time of its first record.
	if starts && !lc.opts.since.IsZero() {
		if lc.dropping == nil {
			lc.dropping = map[string]bool{}
		}
		lc.dropping[e.Stream] = e.Time.Before(lc.opts.since)
	}
	if lc.dropping[e.Stream] {
		return true
	}
	var buf []byte
	if starts && lc.opts.timestamps {
		buf = e.Time.UTC().AppendFormat(buf, logTimestampFormat)
		buf = append(buf, ' ')
	}
	buf = append(buf, e.Text...)
	if !e.Partial {
		buf = append(buf, '\n')
	}
	stop := false
	if lc.remaining >= 0 {
		if int64(len(buf)) >= lc.remaining {
			buf = buf[:lc.remaining]
			stop = true
		}
		lc.remaining -= int64(len(buf))
	}
	if _, err := lc.out.Write(buf); err != nil {
		return false
	}
	return !stop
}

// tailOffset returns the offset of the record that starts the n-th last line
// of a CRI log; a line split into partial records counts once.
func tailOffset(f *os.File, n int64) (int64, error) {
	if n == 0 {
		return f.Seek(0, io.SeekEnd)
	}
	br := bufio.NewReaderSize(f, 64*1024)
	starts := make([]int64, 0, min(n, 1024)) // ring of the last n line starts
	next := 0
	var off int64
	midLine := map[string]bool{}
	for {
		line, err := br.ReadSlice('\n')
		if errors.Is(err, bufio.ErrBufferFull) {
			long := append([]byte(nil), line...)
			for errors.Is(err, bufio.ErrBufferFull) {
				line, err = br.ReadSlice('\n')
				long = append(long, line...)
			}
			line = long
		}
		if len(line) > 0 {
			if e, perr := crilog.ParseLine(line); perr == nil {
				if !midLine[e.Stream] {
					if int64(len(starts)) < n {
						starts = append(starts, off)
					} else {
						starts[next] = off
						next = (next + 1) % len(starts)
					}
				}
				midLine[e.Stream] = e.Partial
			}
			off += int64(len(line))
		}
		if err != nil {
			if !errors.Is(err, io.EOF) {
				return 0, err
			}
			break
		}
	}
	if len(starts) == 0 {
		return off, nil
	}
	if int64(len(starts)) < n {
		return starts[0], nil
	}
	return starts[next], nil
}
