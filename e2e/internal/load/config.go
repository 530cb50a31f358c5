package load

import (
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"strings"
	"time"
)

// Mode is the protocol requests are sent with.
type Mode string

// The modes a run can use.
const (
	// ModeHTTP sends HTTP/1.1 requests over keep-alive connections.
	ModeHTTP Mode = "http"
	// ModeH2C sends HTTP/2 requests without TLS, with prior knowledge.
	ModeH2C Mode = "h2c"
	// ModeGRPC calls echo.v1.EchoService/Echo.
	ModeGRPC Mode = "grpc"
	// ModeTCP writes Size bytes and reads them back per request.
	ModeTCP Mode = "tcp"
)

// Bounds on a run, so a mistaken flag cannot leave load running on a cluster.
const (
	// MaxDuration is the longest a run may be planned to last.
	MaxDuration = 10 * time.Minute
	// MaxRate is the highest rate a run may ask for.
	MaxRate = 1_000_000
	// MaxConnections bounds Connections*Streams.
	MaxConnections = 10_000
	// MaxSize bounds the bytes sent per request.
	MaxSize = 64 << 20
	// DefaultTCPSize is the bytes per request in tcp mode when Size is 0.
	DefaultTCPSize = 64
)

// ErrUnbounded is returned by Validate for a run with neither a request count
// nor a duration.
var ErrUnbounded = errors.New("refusing an unbounded run: set a request count, a duration, or both")

// Config describes one run.
type Config struct {
	Mode Mode
	// Target is a URL for http and h2c (http:// is assumed when no scheme is
	// given) and host:port for grpc and tcp.
	Target string
	// Rate is the requests per second to send, whatever the replies do.
	Rate float64
	// Duration and Requests bound the run; the first reached ends it.
	// Zero means no bound of that kind; at least one must be set.
	Duration time.Duration
	Requests int64
	// Connections is how many connections carry the requests.
	Connections int
	// Streams is how many requests one connection carries at once in h2c
	// and grpc mode; http and tcp carry one at a time.
	Streams int
	// Size is the request body in http and h2c mode, which also asks the echo
	// server for a reply of the same size; the payload and reply size in grpc
	// mode; and the bytes echoed per request in tcp mode.
	Size int
	// Timeout bounds each request from when it is sent.
	Timeout time.Duration
	// Headers are "Name: value" lines added to every HTTP request or gRPC call.
	Headers []string
	// Host overrides the Host header (HTTP) or :authority (gRPC).
	Host string
	// Bodies, when set, receives the reply of every successful request, each
	// ended by a newline; gRPC replies are written as echo.Reply JSON.
	Bodies io.Writer
}

// Validate reports every setting the run cannot use.
func (c *Config) Validate() error {
	var errs []error
	switch c.Mode {
	case ModeHTTP, ModeH2C, ModeGRPC, ModeTCP:
	default:
		errs = append(errs, fmt.Errorf("unknown mode %q: want http, h2c, grpc or tcp", c.Mode))
	}
	if c.Target == "" {
		errs = append(errs, errors.New("no target"))
	}
	if !(c.Rate > 0) || c.Rate > MaxRate {
		errs = append(errs, fmt.Errorf("rate %v is not above 0 and at most %d", c.Rate, MaxRate))
	}
	switch {
	case c.Duration < 0 || c.Requests < 0:
		errs = append(errs, errors.New("duration and requests must not be negative"))
	case c.Duration == 0 && c.Requests == 0:
		errs = append(errs, ErrUnbounded)
	case c.Duration > MaxDuration:
		errs = append(errs, fmt.Errorf("duration %v is longer than %v", c.Duration, MaxDuration))
	case c.Duration == 0 && c.Rate > 0 && float64(c.Requests)/c.Rate > MaxDuration.Seconds():
		errs = append(errs, fmt.Errorf("%d requests at %v/s would take longer than %v", c.Requests, c.Rate, MaxDuration))
	}
	if c.Connections < 1 || c.Streams < 1 || c.Connections*c.Streams > MaxConnections {
		errs = append(errs, fmt.Errorf("connections %d and streams %d must be at least 1, their product at most %d",
			c.Connections, c.Streams, MaxConnections))
	}
	if c.Streams > 1 && (c.Mode == ModeHTTP || c.Mode == ModeTCP) {
		errs = append(errs, fmt.Errorf("mode %s carries one request per connection at a time: streams must be 1", c.Mode))
	}
	if c.Size < 0 || c.Size > MaxSize {
		errs = append(errs, fmt.Errorf("size %d is not from 0 to %d", c.Size, MaxSize))
	}
	if c.Timeout <= 0 {
		errs = append(errs, fmt.Errorf("timeout %v is not positive", c.Timeout))
	}
	if _, err := c.header(); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// planned returns how many requests the run intends to send.
func (c *Config) planned() int64 {
	n := int64(math.MaxInt64)
	if c.Requests > 0 {
		n = c.Requests
	}
	if c.Duration > 0 {
		// The small epsilon keeps 100ms at 200/s at 20, not 21, despite
		// rounding in the product.
		n = min(n, int64(math.Ceil(c.Duration.Seconds()*c.Rate-1e-9)))
	}
	return n
}

// interval returns the time between two planned sends.
func (c *Config) interval() float64 { return float64(time.Second) / c.Rate }

// header parses Headers.
func (c *Config) header() (http.Header, error) {
	h := http.Header{}
	for _, line := range c.Headers {
		name, value, ok := strings.Cut(line, ":")
		name = strings.TrimSpace(name)
		if !ok || name == "" {
			return nil, fmt.Errorf("header %q is not \"Name: value\"", line)
		}
		h.Add(name, strings.TrimSpace(value))
	}
	return h, nil
}
