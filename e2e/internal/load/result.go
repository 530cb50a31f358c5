package load

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"slices"
	"strings"
	"syscall"
	"time"
	"unicode"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// Result is what came of a run.
type Result struct {
	Mode   Mode
	Target string
	// Rate is the rate asked for.
	Rate float64
	// Elapsed runs from the first planned send until the last reply.
	Elapsed time.Duration
	// Planned requests were due within the run's bounds; Sent of them were
	// handed to a connection, and Succeeded or Failed. NotSent were still
	// waiting for a free connection one timeout after the run's planned end.
	Planned, Sent, Succeeded, Failed, NotSent int64
	// Errors counts failed requests by kind, see ErrorKind.
	Errors map[string]int64
	// Latency holds the nanoseconds from each successful request's due time
	// until its reply was read.
	Latency *Histogram
	// Interrupted says the run's context was done before the plan was.
	Interrupted bool
	// Dials counts the connections opened in http, h2c and tcp mode: more
	// than the run's connections means some broke and were opened again.
	Dials int64
}

// AchievedRate returns the requests sent per second of the run.
func (r *Result) AchievedRate() float64 {
	if r.Elapsed <= 0 {
		return 0
	}
	return float64(r.Sent) / r.Elapsed.Seconds()
}

// OK reports whether every planned request was sent and succeeded.
func (r *Result) OK() bool {
	return r.Failed == 0 && r.NotSent == 0 && !r.Interrupted
}

// percentiles are the latency quantiles reported, with their labels.
var percentiles = []struct {
	label string
	q     float64
}{
	{"p50", 0.50},
	{"p90", 0.90},
	{"p99", 0.99},
	{"p99.9", 0.999},
}

// WriteText writes a summary for people.
func (r *Result) WriteText(w io.Writer) error {
	var b strings.Builder
	fmt.Fprintf(&b, "mode       %s\n", r.Mode)
	fmt.Fprintf(&b, "target     %s\n", r.Target)
	fmt.Fprintf(&b, "rate       %.1f/s asked, %.1f/s achieved\n", r.Rate, r.AchievedRate())
	fmt.Fprintf(&b, "elapsed    %v\n", r.Elapsed.Round(time.Millisecond))
	fmt.Fprintf(&b, "requests   %d planned, %d sent, %d succeeded, %d failed, %d not sent\n",
		r.Planned, r.Sent, r.Succeeded, r.Failed, r.NotSent)
	if len(r.Errors) > 0 {
		var kinds []string
		for _, k := range slices.Sorted(maps.Keys(r.Errors)) {
			kinds = append(kinds, fmt.Sprintf("%s=%d", k, r.Errors[k]))
		}
		fmt.Fprintf(&b, "errors     %s\n", strings.Join(kinds, " "))
	}
	if r.Latency != nil && r.Latency.Count() > 0 {
		fmt.Fprintf(&b, "latency   ")
		for _, p := range percentiles {
			fmt.Fprintf(&b, " %s=%v", p.label, time.Duration(r.Latency.Quantile(p.q)))
		}
		fmt.Fprintf(&b, " max=%v\n", time.Duration(r.Latency.Max()))
	}
	if r.Dials > 0 {
		fmt.Fprintf(&b, "dials      %d connections opened\n", r.Dials)
	}
	if r.Interrupted {
		fmt.Fprintf(&b, "interrupted before the plan was done\n")
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// Summary is the JSON form of a Result; latencies are in nanoseconds.
type Summary struct {
	Mode         Mode             `json:"mode"`
	Target       string           `json:"target"`
	Rate         float64          `json:"rate"`
	AchievedRate float64          `json:"achieved_rate"`
	ElapsedNs    int64            `json:"elapsed_ns"`
	Planned      int64            `json:"planned"`
	Sent         int64            `json:"sent"`
	Succeeded    int64            `json:"succeeded"`
	Failed       int64            `json:"failed"`
	NotSent      int64            `json:"not_sent"`
	Errors       map[string]int64 `json:"errors"`
	LatencyNs    map[string]int64 `json:"latency_ns"`
	Interrupted  bool             `json:"interrupted"`
	Dials        int64            `json:"dials"`
}

// Summary returns r in the form WriteJSON writes.
func (r *Result) Summary() Summary {
	s := Summary{
		Mode:         r.Mode,
		Target:       r.Target,
		Rate:         r.Rate,
		AchievedRate: r.AchievedRate(),
		ElapsedNs:    int64(r.Elapsed),
		Planned:      r.Planned,
		Sent:         r.Sent,
		Succeeded:    r.Succeeded,
		Failed:       r.Failed,
		NotSent:      r.NotSent,
		Errors:       map[string]int64{},
		LatencyNs:    map[string]int64{},
		Interrupted:  r.Interrupted,
		Dials:        r.Dials,
	}
	maps.Copy(s.Errors, r.Errors)
	if h := r.Latency; h != nil && h.Count() > 0 {
		s.LatencyNs["min"] = h.Min()
		s.LatencyNs["mean"] = int64(h.Mean())
		for _, p := range percentiles {
			s.LatencyNs[p.label] = h.Quantile(p.q)
		}
		s.LatencyNs["max"] = h.Max()
	}
	return s
}

// WriteJSON writes the Summary as one JSON object.
func (r *Result) WriteJSON(w io.Writer) error {
	enc := json.NewEncoder(w)
	enc.SetIndent("", "  ")
	return enc.Encode(r.Summary())
}

// StatusError is an HTTP reply whose status is 400 or more.
type StatusError struct {
	Code int
}

func (e *StatusError) Error() string { return fmt.Sprintf("HTTP status %d", e.Code) }

// Errors a reply can fail the echo checks with.
var (
	// ErrMismatch is a TCP echo whose bytes differ from those sent.
	ErrMismatch = errors.New("echoed bytes differ from those sent")
	// ErrSizeMismatch is a reply whose size is not the one asked for.
	ErrSizeMismatch = errors.New("reply size differs from the one asked for")
)

// ErrorKind names the kind of a request error, as counted in Result.Errors:
// http_<code>, grpc_<code> (snake case), timeout, canceled,
// connection_refused, connection_reset, eof, mismatch, size_mismatch or other.
func ErrorKind(err error) string {
	var se *StatusError
	var ne net.Error
	if s, ok := status.FromError(err); ok {
		switch s.Code() {
		case codes.DeadlineExceeded:
			return "timeout"
		case codes.Canceled:
			return "canceled"
		}
		return "grpc_" + snake(s.Code().String())
	}
	switch {
	case errors.As(err, &se):
		return fmt.Sprintf("http_%d", se.Code)
	case errors.Is(err, ErrMismatch):
		return "mismatch"
	case errors.Is(err, ErrSizeMismatch):
		return "size_mismatch"
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		return "timeout"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "connection_refused"
	case errors.Is(err, syscall.ECONNRESET), errors.Is(err, syscall.EPIPE):
		return "connection_reset"
	case errors.Is(err, io.EOF), errors.Is(err, io.ErrUnexpectedEOF):
		return "eof"
	}
	return "other"
}

// snake turns a gRPC code name such as PermissionDenied into permission_denied.
func snake(s string) string {
	var b strings.Builder
	for i, r := range s {
		if unicode.IsUpper(r) {
			if i > 0 {
				b.WriteByte('_')
			}
			r = unicode.ToLower(r)
		}
		b.WriteRune(r)
	}
	return b.String()
}
