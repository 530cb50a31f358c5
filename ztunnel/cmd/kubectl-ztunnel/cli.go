package main

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/spf13/pflag"
	"k8s.io/client-go/tools/clientcmd"
)

// Exit statuses.
const (
	exitOK    = 0
	exitError = 1 // a ztunnel could not be asked or answered badly
	exitUsage = 2 // unknown command or flag
)

// Defaults of the flags.
const (
	defaultTimeout = 30 * time.Second
	// maxParallel bounds the port-forwards open at once.
	maxParallel = 8
)

// ztunnel is one ztunnel admin server to ask.
type ztunnel struct {
	// node and pod (namespace/name) say which ztunnel it is; both are
	// empty with --admin-url, which url names instead.
	node, pod, url string
	// ready is the pod's Ready condition; nil when not known.
	ready *bool
	// open connects to the admin server; its func releases what open set
	// up (the port-forward).
	open openFunc
	// err says why the ztunnel cannot be asked (its pod is not running);
	// open is nil then.
	err error
}

func (z ztunnel) String() string {
	if z.pod == "" {
		return "ztunnel admin server " + z.url
	}
	return fmt.Sprintf("ztunnel pod %s on node %s", z.pod, cmp.Or(z.node, "<none>"))
}

// options are the parsed flags.
type options struct {
	output string
	// node selects one ztunnel; empty means all.
	node string
	// adminURL, when set, is the one admin server to ask, bypassing
	// Kubernetes.
	adminURL *url.URL
	// namespace (-n) limits lists to one namespace; empty means all.
	namespace        string
	ztunnelNamespace string
	timeout          time.Duration
	kube             clientcmd.ClientConfig
	// overrides are the Kubernetes client flags.
	overrides *clientcmd.ConfigOverrides
}

// one reports whether a single ztunnel was asked for, so -o json prints its
// answer as served rather than answers keyed by node.
func (o *options) one() bool { return o.node != "" || o.adminURL != nil }

// fromKubernetes reports whether ztunnels are found in Kubernetes, so that
// tables name their node.
func (o *options) fromKubernetes() bool { return o.adminURL == nil }

// cli is one run of the plugin.
type cli struct {
	stdout, stderr io.Writer
	now            func() time.Time
	// find finds the ztunnels to ask in Kubernetes.
	find func(ctx context.Context, o *options) ([]ztunnel, error)
}

func newCLI(stdout, stderr io.Writer) *cli {
	return &cli{
		stdout: stdout,
		stderr: stderr,
		now:    time.Now,
		find: func(ctx context.Context, o *options) ([]ztunnel, error) {
			return kubeFinder{config: o.kube}.find(ctx, o.ztunnelNamespace, o.node)
		},
	}
}

// command is one subcommand.
type command struct {
	name, args, summary string
	// maxArgs is how many arguments it takes.
	maxArgs int
	run     func(c *cli, ctx context.Context, o *options, zs []ztunnel, args []string) int
}

var commands = []command{
	{name: "workloads", summary: "workloads known from xDS: addresses, node, identity, protocol, waypoint", run: listRunner(workloadsList)},
	{name: "services", summary: "services known from xDS: VIPs, ports, endpoints, waypoint", run: listRunner(servicesList)},
	{name: "policies", summary: "authorization policies known from xDS: scope, action, rules", run: listRunner(policiesList)},
	{name: "certificates", summary: "certificates held: identity, serial, expiry, rotation, state", run: listRunner(certificatesList)},
	{name: "pods", summary: "pods served in-pod: redirection engine, listeners, active connections", run: listRunner(podsList)},
	{name: "connections", summary: "connections per served pod: open outbound and inbound, total, denied", run: listRunner(connectionsList)},
	{name: "status", summary: "one line per ztunnel: ready, xDS synced, ZDS connected, counts", run: (*cli).status},
	{name: "log-level", args: "[LEVEL]", maxArgs: 1, summary: "show the log level, or set it to debug, info, warn or error", run: (*cli).logLevel},
}

// run runs the plugin with args (without the program name) and returns
// the exit status.
func (c *cli) run(ctx context.Context, args []string) int {
	fs, o := c.flags()
	err := fs.Parse(args)
	if errors.Is(err, pflag.ErrHelp) || (err == nil && fs.Arg(0) == "help") {
		fmt.Fprint(c.stdout, usage(fs, true))
		return exitOK
	}
	var cmd command
	if err == nil {
		cmd, err = c.check(fs, o)
	}
	if err != nil {
		fmt.Fprintf(c.stderr, "error: %v\n\n%s", err, usage(fs, false))
		return exitUsage
	}

	ctx, cancel := context.WithTimeout(ctx, o.timeout)
	defer cancel()
	var zs []ztunnel
	if o.adminURL != nil {
		zs = []ztunnel{adminURLZtunnel(o.adminURL)}
	} else if zs, err = c.find(ctx, o); err != nil {
		fmt.Fprintf(c.stderr, "error: %v\n", timeoutError(err, o.timeout))
		return exitError
	}
	return cmd.run(c, ctx, o, zs, fs.Args()[1:])
}

// flags defines the flags on a new flag set, bound to the returned options.
func (c *cli) flags() (*pflag.FlagSet, *options) {
	o := &options{}
	fs := pflag.NewFlagSet("kubectl ztunnel", pflag.ContinueOnError)
	fs.SetOutput(io.Discard) // errors are printed once, with the usage
	fs.SetInterspersed(true)
	fs.StringVarP(&o.output, "output", "o", "table", "output format: table or json (the config_dump section as served)")
	fs.StringVar(&o.node, "node", "", "ask only the ztunnel on this node (default: every ztunnel)")
	fs.String("admin-url", "", "ask this ztunnel admin server (say http://127.0.0.1:15000) directly, without Kubernetes")
	fs.StringVar(&o.ztunnelNamespace, "ztunnel-namespace", defaultZtunnelNamespace, "namespace of ztunnel's pods (label "+ztunnelSelector+")")
	fs.DurationVar(&o.timeout, "timeout", defaultTimeout, "how long to wait for the API server and the ztunnels")

	kube := pflag.NewFlagSet("kubernetes", pflag.ContinueOnError)
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	o.overrides = &clientcmd.ConfigOverrides{}
	kube.StringVar(&rules.ExplicitPath, "kubeconfig", "", "path to the kubeconfig file")
	flagNames := clientcmd.RecommendedConfigOverrideFlags("")
	flagNames.ContextOverrideFlags.Namespace.Description = "show only this namespace's workloads, services, policies, certificates and pods (default: all)"
	clientcmd.BindOverrideFlags(o.overrides, kube, flagNames)
	fs.AddFlagSet(kube)
	o.kube = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, o.overrides)
	return fs, o
}

// check validates the parsed flags and arguments and returns the command.
func (c *cli) check(fs *pflag.FlagSet, o *options) (command, error) {
	if fs.NArg() == 0 {
		return command{}, errors.New("no command")
	}
	i := slices.IndexFunc(commands, func(cmd command) bool { return cmd.name == fs.Arg(0) })
	if i < 0 {
		return command{}, fmt.Errorf("unknown command %q", fs.Arg(0))
	}
	cmd := commands[i]
	// -n filters what is shown, as in kubectl; it does not choose where
	// ztunnel runs (--ztunnel-namespace does).
	o.namespace = o.overrides.Context.Namespace
	if n := fs.NArg() - 1; n > cmd.maxArgs {
		return command{}, fmt.Errorf("%s takes at most %d argument(s), got %q", cmd.name, cmd.maxArgs, fs.Args()[1:])
	}
	if o.output != "table" && o.output != "json" {
		return command{}, fmt.Errorf("--output %q: want table or json", o.output)
	}
	if o.timeout <= 0 {
		return command{}, errors.New("--timeout must be positive")
	}
	if s := fs.Lookup("admin-url").Value.String(); s != "" {
		if fs.Changed("node") {
			return command{}, errors.New("--admin-url and --node exclude each other")
		}
		u, err := url.Parse(s)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
			return command{}, fmt.Errorf("--admin-url %q: want http://HOST:PORT", s)
		}
		o.adminURL = u
	}
	if cmd.name == "log-level" && fs.NArg() == 2 {
		var l slog.Level
		if err := l.UnmarshalText([]byte(fs.Arg(1))); err != nil {
			return command{}, fmt.Errorf("log level %q: want debug, info, warn or error", fs.Arg(1))
		}
	}
	return cmd, nil
}

// usage is the help text; without flags, it ends with a pointer to them.
func usage(fs *pflag.FlagSet, flags bool) string {
	var b strings.Builder
	b.WriteString(`kubectl ztunnel shows what the mesh's ztunnels hold, read from each one's
admin server (127.0.0.1:15000 on its node) through a port-forward to its pod.

Usage:
  kubectl ztunnel COMMAND [flags]

Commands:
`)
	for _, cmd := range commands {
		fmt.Fprintf(&b, "  %-24s %s\n", strings.TrimSpace(cmd.name+" "+cmd.args), cmd.summary)
	}
	if !flags {
		b.WriteString("\nRun 'kubectl ztunnel --help' for the flags.\n")
		return b.String()
	}
	b.WriteString("\nFlags:\n")
	own, kube := pflag.NewFlagSet("", pflag.ContinueOnError), pflag.NewFlagSet("", pflag.ContinueOnError)
	fs.VisitAll(func(f *pflag.Flag) {
		switch f.Name {
		case "output", "node", "admin-url", "ztunnel-namespace", "timeout", "namespace", "kubeconfig", "context":
			own.AddFlag(f)
		default:
			kube.AddFlag(f)
		}
	})
	b.WriteString(own.FlagUsages())
	b.WriteString("\nOther Kubernetes client flags (as kubectl's):\n")
	b.WriteString(kube.FlagUsages())
	return b.String()
}

// adminURLZtunnel is the ztunnel behind --admin-url.
func adminURLZtunnel(u *url.URL) ztunnel {
	return ztunnel{url: u.String(), open: func(context.Context) (*adminClient, func(), error) {
		return &adminClient{hc: &http.Client{}, base: u}, func() {}, nil
	}}
}

// answer is one ztunnel's answer.
type answer[T any] struct {
	z   ztunnel
	v   T
	err error
}

// ask asks every ztunnel, maxParallel at a time, and returns the answers
// in the order of zs.
func ask[T any](ctx context.Context, zs []ztunnel, timeout time.Duration, f func(context.Context, *adminClient) (T, error)) []answer[T] {
	out := make([]answer[T], len(zs))
	sem := make(chan struct{}, maxParallel)
	var wg sync.WaitGroup
	for i, z := range zs {
		out[i].z = z
		if z.err != nil {
			out[i].err = z.err
			continue
		}
		wg.Go(func() {
			sem <- struct{}{}
			defer func() { <-sem }()
			out[i].err = func() error {
				a, release, err := z.open(ctx)
				if err != nil {
					return err
				}
				defer release()
				out[i].v, err = f(ctx, a)
				return err
			}()
			out[i].err = timeoutError(out[i].err, timeout)
		})
	}
	wg.Wait()
	return out
}

// timeoutError says which flag bounds the wait when ctx ran out.
func timeoutError(err error, timeout time.Duration) error {
	if errors.Is(err, context.DeadlineExceeded) {
		return fmt.Errorf("%w (no answer within --timeout=%s)", err, timeout)
	}
	return err
}

// report prints the failed answers and returns the exit status.
func report[T any](c *cli, answers []answer[T]) int {
	code := exitOK
	for _, a := range answers {
		if a.err != nil {
			fmt.Fprintf(c.stderr, "error: %s: %v\n", a.z, a.err)
			code = exitError
		}
	}
	return code
}
