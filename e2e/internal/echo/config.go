package echo

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strconv"
	"strings"
	"time"
)

// Default ports, matching the container ports the e2e manifests declare.
const (
	DefaultHTTPPort = 8080
	DefaultGRPCPort = 9090
	DefaultTCPPort  = 9000
)

// Config says what a Server listens on and who it says it is.
type Config struct {
	// Bind is the address to listen on; empty listens on every address.
	Bind string
	// HTTPPorts serve HTTP/1.1 and h2c; GRPCPorts serve gRPC; TCPPorts echo
	// raw bytes. Port 0 picks a free port; an empty list serves none.
	HTTPPorts, GRPCPorts, TCPPorts []int

	Identity Identity

	// MaxDelay bounds the delay a caller may ask for.
	MaxDelay time.Duration
	// MaxSize bounds request bodies and the reply size a caller may ask for.
	MaxSize int64
	// ShutdownTimeout bounds how long Run waits for calls in flight once its
	// context is done.
	ShutdownTimeout time.Duration

	// LogLevel is only read by the command; the Server logs through Logger.
	LogLevel slog.Level
	// Logger receives one line per request; nil means slog.Default().
	Logger *slog.Logger
}

// Identity names the workload in every reply. In a pod it comes from the
// downward API.
type Identity struct {
	Pod       string
	Namespace string
	PodIP     string
	// Hostname defaults to the kernel's.
	Hostname string
	// Version lets tests of traffic splitting tell two deployments apart.
	Version string
}

// envFallbacks maps each flag to the environment variable read when the flag
// is not given on the command line.
var envFallbacks = map[string]string{
	"bind":             "BIND_ADDRESS",
	"http-ports":       "HTTP_PORTS",
	"grpc-ports":       "GRPC_PORTS",
	"tcp-ports":        "TCP_PORTS",
	"pod-name":         "POD_NAME",
	"pod-namespace":    "POD_NAMESPACE",
	"pod-ip":           "POD_IP",
	"version":          "SERVICE_VERSION",
	"max-delay":        "MAX_DELAY",
	"max-size":         "MAX_SIZE",
	"shutdown-timeout": "SHUTDOWN_TIMEOUT",
	"log-level":        "LOG_LEVEL",
}

// RegisterFlags defines the server's flags on fs, writing into c. Call
// ApplyEnv after fs.Parse to fill unset flags from the environment.
func (c *Config) RegisterFlags(fs *flag.FlagSet) {
	c.HTTPPorts = []int{DefaultHTTPPort}
	c.GRPCPorts = []int{DefaultGRPCPort}
	c.TCPPorts = []int{DefaultTCPPort}
	fs.StringVar(&c.Bind, "bind", "", "address to listen on; empty for all addresses")
	fs.Var((*portList)(&c.HTTPPorts), "http-ports", "comma-separated ports serving HTTP/1.1 and h2c; empty for none")
	fs.Var((*portList)(&c.GRPCPorts), "grpc-ports", "comma-separated ports serving gRPC; empty for none")
	fs.Var((*portList)(&c.TCPPorts), "tcp-ports", "comma-separated ports echoing raw TCP; empty for none")
	fs.StringVar(&c.Identity.Pod, "pod-name", "", "pod name to report")
	fs.StringVar(&c.Identity.Namespace, "pod-namespace", "", "pod namespace to report")
	fs.StringVar(&c.Identity.PodIP, "pod-ip", "", "pod IP to report")
	fs.StringVar(&c.Identity.Version, "version", "", "workload version to report, to tell deployments apart")
	fs.DurationVar(&c.MaxDelay, "max-delay", 30*time.Second, "largest delay a caller may ask for")
	fs.Int64Var(&c.MaxSize, "max-size", 16<<20, "largest request body and reply size in bytes")
	fs.DurationVar(&c.ShutdownTimeout, "shutdown-timeout", 10*time.Second, "how long to drain calls in flight on SIGTERM")
	fs.TextVar(&c.LogLevel, "log-level", slog.LevelInfo, "log level: debug, info, warn or error")
}

// ApplyEnv sets every flag of fs that was not given on the command line from
// its environment variable, when that is set. lookup is usually os.LookupEnv.
func ApplyEnv(fs *flag.FlagSet, lookup func(string) (string, bool)) error {
	given := map[string]bool{}
	fs.Visit(func(f *flag.Flag) { given[f.Name] = true })
	var errs []error
	for _, name := range slices.Sorted(maps.Keys(envFallbacks)) {
		env := envFallbacks[name]
		if given[name] || fs.Lookup(name) == nil {
			continue
		}
		v, ok := lookup(env)
		if !ok {
			continue
		}
		if err := fs.Set(name, v); err != nil {
			errs = append(errs, fmt.Errorf("%s=%q: %w", env, v, err))
		}
	}
	return errors.Join(errs...)
}

// Validate reports settings the server cannot run with.
func (c *Config) Validate() error {
	var errs []error
	if len(c.HTTPPorts)+len(c.GRPCPorts)+len(c.TCPPorts) == 0 {
		errs = append(errs, errors.New("no ports to serve"))
	}
	if c.MaxDelay < 0 {
		errs = append(errs, fmt.Errorf("max delay %v is negative", c.MaxDelay))
	}
	if c.MaxSize < 0 {
		errs = append(errs, fmt.Errorf("max size %d is negative", c.MaxSize))
	}
	if c.ShutdownTimeout < 0 {
		errs = append(errs, fmt.Errorf("shutdown timeout %v is negative", c.ShutdownTimeout))
	}
	return errors.Join(errs...)
}

// portList is a flag.Value for a comma-separated list of TCP ports.
type portList []int

func (p *portList) String() string {
	if p == nil {
		return ""
	}
	s := make([]string, len(*p))
	for i, port := range *p {
		s[i] = strconv.Itoa(port)
	}
	return strings.Join(s, ",")
}

func (p *portList) Set(v string) error {
	var ports []int
	for f := range strings.SplitSeq(v, ",") {
		f = strings.TrimSpace(f)
		if f == "" {
			continue
		}
		port, err := strconv.ParseUint(f, 10, 16)
		if err != nil {
			return fmt.Errorf("port %q: %w", f, err)
		}
		ports = append(ports, int(port))
	}
	*p = ports
	return nil
}
