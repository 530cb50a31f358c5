// Command load-client sends requests at a fixed, open-loop rate over HTTP/1.1,
// h2c, gRPC or TCP and prints the rate achieved, the errors by kind and the
// latency percentiles. With --requests 1 --print-body it prints the echo
// server's reply, for tests that want to see what the server saw.
//
// It exits 0 when every planned request succeeded, 1 when any failed or was
// not sent, and 2 on bad flags.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"strings"
	"syscall"
	"time"

	"github.com/ambient-mesh/ambient/e2e/internal/load"
)

// stringList is a repeatable string flag.
type stringList []string

func (s *stringList) String() string     { return strings.Join(*s, ", ") }
func (s *stringList) Set(v string) error { *s = append(*s, v); return nil }

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	var (
		cfg       load.Config
		mode      string
		headers   stringList
		output    string
		printBody bool
	)
	fs := flag.NewFlagSet("load-client", flag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVar(&mode, "mode", "http", "protocol: http (HTTP/1.1 keep-alive), h2c, grpc or tcp")
	fs.StringVar(&cfg.Target, "target", "", "URL for http and h2c (http:// assumed), host:port for grpc and tcp")
	fs.Float64Var(&cfg.Rate, "rate", 10, "requests per second, sent whatever the replies do")
	fs.DurationVar(&cfg.Duration, "duration", 0, fmt.Sprintf("how long to send for, at most %v", load.MaxDuration))
	fs.Int64Var(&cfg.Requests, "requests", 0, "how many requests to send; with --duration the first bound reached ends the run")
	fs.IntVar(&cfg.Connections, "connections", 1, "connections to spread requests over")
	fs.IntVar(&cfg.Streams, "streams", 1, "requests in flight per connection (h2c and grpc only)")
	fs.IntVar(&cfg.Size, "size", 0, fmt.Sprintf("bytes per request: http/h2c POST body and ?size= reply, grpc payload and reply, tcp bytes echoed (default %d for tcp)", load.DefaultTCPSize))
	fs.DurationVar(&cfg.Timeout, "timeout", 5*time.Second, "bound on each request from when it is sent")
	fs.Var(&headers, "header", "\"Name: value\" to add to every HTTP request or gRPC call; repeatable")
	fs.StringVar(&cfg.Host, "host", "", "Host header (http, h2c) or :authority (grpc) to send")
	fs.StringVar(&output, "output", "text", "summary format: text or json")
	fs.BoolVar(&printBody, "print-body", false, "print each successful reply to stdout, and the summary to stderr")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(stderr, "load-client: unexpected arguments %q\n", fs.Args())
		return 2
	}
	if output != "text" && output != "json" {
		fmt.Fprintf(stderr, "load-client: --output %q: want text or json\n", output)
		return 2
	}
	cfg.Mode = load.Mode(mode)
	cfg.Headers = headers
	summaryOut := stdout
	if printBody {
		cfg.Bodies = stdout
		summaryOut = stderr
	}
	if err := cfg.Validate(); err != nil {
		fmt.Fprintf(stderr, "load-client: %v\n", err)
		return 2
	}

	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	res, err := load.Run(ctx, cfg)
	if err != nil {
		fmt.Fprintf(stderr, "load-client: %v\n", err)
		return 2
	}
	if output == "json" {
		err = res.WriteJSON(summaryOut)
	} else {
		err = res.WriteText(summaryOut)
	}
	if err != nil {
		fmt.Fprintf(stderr, "load-client: writing summary: %v\n", err)
		return 1
	}
	if !res.OK() {
		return 1
	}
	return 0
}
