package main

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// none fills an empty cell, as in kubectl.
const none = "<none>"

// listCommand shows one list section of /config_dump.
type listCommand struct {
	section string
	header  []string
	// rows returns one row per element of the section, in its order.
	rows func(d *configDump, now time.Time) []row
}

// row is one element of a section as a table row.
type row struct {
	// namespace is the element's, for -n; empty when not known.
	namespace string
	cells     []string
}

var workloadsList = listCommand{
	section: "workloads",
	header:  []string{"NAMESPACE", "NAME", "ADDRESSES", "WORKLOAD NODE", "IDENTITY", "PROTOCOL", "WAYPOINT", "STATUS"},
	rows: func(d *configDump, _ time.Time) []row {
		out := make([]row, 0, len(d.Workloads))
		for _, w := range d.Workloads {
			addrs := strings.Join(w.Addresses, ",")
			if addrs == "" {
				addrs = w.Hostname
			}
			out = append(out, row{w.Namespace, []string{w.Namespace, w.Name, addrs, w.Node, w.Identity, protocol(w.Protocol), w.Waypoint, w.Status}})
		}
		return out
	},
}

// protocol names a workload's tunnel protocol: workload.proto's NONE is
// plain TCP.
func protocol(p string) string {
	if p == "NONE" {
		return "TCP"
	}
	return p
}

var servicesList = listCommand{
	section: "services",
	header:  []string{"HOSTNAME", "VIPS", "PORTS", "ENDPOINTS", "WAYPOINT"},
	rows: func(d *configDump, _ time.Time) []row {
		out := make([]row, 0, len(d.Services))
		for _, s := range d.Services {
			vips := make([]string, 0, len(s.VIPs))
			for _, v := range s.VIPs {
				// "network/ip"; the default network is empty.
				vips = append(vips, strings.TrimPrefix(v, "/"))
			}
			out = append(out, row{s.Namespace, []string{s.Hostname, strings.Join(vips, ","), strings.Join(s.Ports, ","),
				strconv.Itoa(len(s.Endpoints)), s.Waypoint}})
		}
		return out
	},
}

var policiesList = listCommand{
	section: "policies",
	header:  []string{"NAMESPACE", "NAME", "SCOPE", "ACTION", "DRY RUN", "RULES"},
	rows: func(d *configDump, _ time.Time) []row {
		out := make([]row, 0, len(d.Policies))
		for _, p := range d.Policies {
			ns, name, _ := strings.Cut(p.Name, "/")
			out = append(out, row{ns, []string{ns, name, p.Scope, p.Action, strconv.FormatBool(p.DryRun), strconv.Itoa(len(p.Rules))}})
		}
		return out
	},
}

var certificatesList = listCommand{
	section: "certificates",
	header:  []string{"IDENTITY", "SERIAL", "NOT AFTER", "ROTATE AT", "STATE"},
	rows: func(d *configDump, now time.Time) []row {
		out := make([]row, 0, len(d.Certificates))
		for _, c := range d.Certificates {
			out = append(out, row{identityNamespace(c.Identity), []string{c.Identity, c.Serial, timestamp(c.NotAfter), timestamp(c.RotateAt), certState(c, now)}})
		}
		return out
	},
}

// Certificate states.
const (
	certValid       = "VALID"
	certNotYetValid = "NOT-YET-VALID"
	// certRotationDue: past the rotation time and still held; ztunnel is
	// renewing it, or failing to.
	certRotationDue = "ROTATION-DUE"
	certExpired     = "EXPIRED"
)

// certState is a certificate's state at now (the plugin's clock).
func certState(c certificate, now time.Time) string {
	switch {
	case now.Before(c.NotBefore):
		return certNotYetValid
	case !now.Before(c.NotAfter):
		return certExpired
	case !c.RotateAt.IsZero() && !now.Before(c.RotateAt):
		return certRotationDue
	}
	return certValid
}

// identityNamespace is the namespace of spiffe://<td>/ns/<ns>/sa/<sa>.
func identityNamespace(id string) string {
	_, rest, ok := strings.Cut(id, "/ns/")
	if !ok {
		return ""
	}
	ns, _, _ := strings.Cut(rest, "/")
	return ns
}

func timestamp(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339)
}

var podsList = listCommand{
	section: "pods",
	header:  []string{"WORKLOAD", "REDIRECTION", "LISTENERS", "ACTIVE CONNECTIONS"},
	rows: func(d *configDump, _ time.Time) []row {
		out := make([]row, 0, len(d.Pods))
		for _, p := range d.Pods {
			ports := make([]string, 0, len(p.Listeners))
			for _, l := range p.Listeners {
				ports = append(ports, strconv.Itoa(l.Port))
			}
			out = append(out, row{p.Namespace, []string{p.Workload, p.Redirection, strings.Join(ports, ","), strconv.FormatInt(p.ActiveConnections, 10)}})
		}
		return out
	},
}

var connectionsList = listCommand{
	section: "connections",
	header:  []string{"WORKLOAD", "OUTBOUND", "INBOUND PLAINTEXT", "INBOUND HBONE", "TOTAL", "DENIED"},
	rows: func(d *configDump, _ time.Time) []row {
		// Counters are kept by in-pod uid; the pods section names them.
		pods := make(map[string]inpodWorkload, len(d.Pods))
		for _, p := range d.Pods {
			pods[p.UID] = p
		}
		out := make([]row, 0, len(d.Connections))
		for _, c := range d.Connections {
			p, ok := pods[c.UID]
			name := p.Workload
			if !ok {
				name = c.UID
			}
			out = append(out, row{p.Namespace, []string{name, itoa(c.Outbound), itoa(c.InboundPlaintext), itoa(c.InboundHBONE), itoa(c.Total), itoa(c.Denied)}})
		}
		return out
	},
}

func itoa(v int64) string { return strconv.FormatInt(v, 10) }

// listRunner runs a list command: a table of every ztunnel's rows, or the
// section as served with -o json.
func listRunner(lc listCommand) func(*cli, context.Context, *options, []ztunnel, []string) int {
	return func(c *cli, ctx context.Context, o *options, zs []ztunnel, _ []string) int {
		answers := ask(ctx, zs, o.timeout, fetchConfigDump)
		now := c.now()
		if o.output == "json" {
			sections := make([]answer[json.RawMessage], len(answers))
			for i, a := range answers {
				sections[i] = answer[json.RawMessage]{z: a.z, err: a.err}
				if a.err == nil {
					sections[i].v, sections[i].err = lc.json(a.v, o.namespace, now)
				}
			}
			writeJSON(c.stdout, o, sections)
			return report(c, sections)
		}
		var rows [][]string
		for _, a := range answers {
			if a.err != nil {
				continue
			}
			for _, r := range lc.rows(&a.v.dump, now) {
				if o.namespace != "" && r.namespace != o.namespace {
					continue
				}
				rows = append(rows, withNode(o, a.z, r.cells))
			}
		}
		code := report(c, answers)
		if len(rows) == 0 {
			if code == exitOK {
				fmt.Fprintf(c.stderr, "No %s found%s.\n", lc.section, inNamespace(o.namespace))
			}
			return code
		}
		slices.SortFunc(rows, slices.Compare)
		writeTable(c.stdout, withNodeHeader(o, lc.header), rows)
		return code
	}
}

func inNamespace(ns string) string {
	if ns == "" {
		return ""
	}
	return " in namespace " + ns
}

// json returns the section as served, only the elements in namespace when
// it is set.
func (lc listCommand) json(f *fetchedDump, namespace string, now time.Time) (json.RawMessage, error) {
	raw, ok := f.sections[lc.section]
	if !ok {
		return nil, fmt.Errorf("%s has no %q section", configDumpPath, lc.section)
	}
	if namespace == "" {
		return raw, nil
	}
	var elems []json.RawMessage
	if err := json.Unmarshal(raw, &elems); err != nil {
		return nil, fmt.Errorf("decoding %s section %q: %w", configDumpPath, lc.section, err)
	}
	rows := lc.rows(&f.dump, now)
	if len(rows) != len(elems) {
		return nil, fmt.Errorf("decoding %s section %q: %d elements, %d decoded", configDumpPath, lc.section, len(elems), len(rows))
	}
	kept := []json.RawMessage{}
	for i, e := range elems {
		if rows[i].namespace == namespace {
			kept = append(kept, e)
		}
	}
	return json.Marshal(kept)
}

// withNode prepends the ztunnel's node to a row when ztunnels come from
// Kubernetes.
func withNode(o *options, z ztunnel, cells []string) []string {
	if !o.fromKubernetes() {
		return cells
	}
	return append([]string{cmp.Or(z.node, none)}, cells...)
}

// withNodeHeader is withNode for the header.
func withNodeHeader(o *options, header []string) []string {
	if !o.fromKubernetes() {
		return header
	}
	return append([]string{"NODE"}, header...)
}

// writeTable writes an aligned table; empty cells read <none>.
func writeTable(w io.Writer, header []string, rows [][]string) {
	tw := tabwriter.NewWriter(w, 0, 4, 3, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		cells := make([]string, len(r))
		for i, c := range r {
			cells[i] = cmp.Or(c, none)
		}
		fmt.Fprintln(tw, strings.Join(cells, "\t"))
	}
	tw.Flush()
}

// writeJSON writes the JSON answers: the one answer as served when one
// ztunnel was asked for (--node, --admin-url), else an object of the
// answers keyed by node. Failed answers are left out (report names them).
func writeJSON(w io.Writer, o *options, answers []answer[json.RawMessage]) {
	var out []byte
	if o.one() {
		if len(answers) != 1 || answers[0].err != nil {
			return
		}
		out = answers[0].v
	} else {
		byNode := map[string]json.RawMessage{}
		for _, a := range answers {
			if a.err == nil {
				byNode[a.z.node] = a.v
			}
		}
		out, _ = json.Marshal(byNode)
	}
	var b bytes.Buffer
	if err := json.Indent(&b, out, "", "  "); err != nil {
		// Sections were decoded, so this does not happen; print as served.
		b.Reset()
		b.Write(out)
	}
	b.WriteByte('\n')
	w.Write(b.Bytes())
}

// statusRow is one ztunnel in `status`.
type statusRow struct {
	Node string `json:"node,omitempty"`
	Pod  string `json:"pod,omitempty"`
	URL  string `json:"url,omitempty"`
	// Ready is the pod's Ready condition, else the readiness ztunnel
	// reports; nil when neither is known. The rest is known only when
	// the ztunnel answered.
	Ready        *bool  `json:"ready,omitempty"`
	XDSSynced    *bool  `json:"xdsSynced,omitempty"`
	ZDSConnected *bool  `json:"zdsConnected,omitempty"`
	Workloads    *int   `json:"workloads,omitempty"`
	Services     *int   `json:"services,omitempty"`
	Policies     *int   `json:"policies,omitempty"`
	Certificates *int   `json:"certificates,omitempty"`
	Pods         *int   `json:"pods,omitempty"`
	Error        string `json:"error,omitempty"`
}

// status shows one line per ztunnel, answered or not.
func (c *cli) status(ctx context.Context, o *options, zs []ztunnel, _ []string) int {
	answers := ask(ctx, zs, o.timeout, fetchConfigDump)
	rows := make([]statusRow, 0, len(answers))
	for _, a := range answers {
		r := statusRow{Node: a.z.node, Pod: a.z.pod, URL: a.z.url, Ready: a.z.ready}
		if a.err != nil {
			r.Error = a.err.Error()
			rows = append(rows, r)
			continue
		}
		d := a.v.dump
		if r.Ready == nil {
			// ztunnel's own readiness (/healthz/ready).
			r.Ready = ptr(d.XDSSynced && d.ZDS.SnapshotReceived && !d.ZDS.Draining)
		}
		r.XDSSynced, r.ZDSConnected = &d.XDSSynced, &d.ZDS.Connected
		r.Workloads, r.Services, r.Policies = ptr(len(d.Workloads)), ptr(len(d.Services)), ptr(len(d.Policies))
		r.Certificates, r.Pods = ptr(len(d.Certificates)), ptr(len(d.Pods))
		rows = append(rows, r)
	}
	if o.output == "json" {
		out, _ := json.MarshalIndent(rows, "", "  ")
		fmt.Fprintf(c.stdout, "%s\n", out)
		return report(c, answers)
	}
	header := []string{"READY", "XDS SYNCED", "ZDS CONNECTED", "WORKLOADS", "SERVICES", "POLICIES", "CERTIFICATES", "PODS"}
	if o.fromKubernetes() {
		header = append([]string{"NODE", "POD"}, header...)
	}
	cells := make([][]string, 0, len(rows))
	for _, r := range rows {
		row := []string{boolCell(r.Ready), boolCell(r.XDSSynced), boolCell(r.ZDSConnected),
			intCell(r.Workloads), intCell(r.Services), intCell(r.Policies), intCell(r.Certificates), intCell(r.Pods)}
		if o.fromKubernetes() {
			_, pod, _ := strings.Cut(r.Pod, "/")
			row = append([]string{cmp.Or(r.Node, none), pod}, row...)
		}
		cells = append(cells, row)
	}
	writeTable(c.stdout, header, cells)
	return report(c, answers)
}

func ptr[T any](v T) *T { return &v }

// unknown fills a cell of a ztunnel that did not answer.
const unknown = "?"

func boolCell(b *bool) string {
	if b == nil {
		return unknown
	}
	return strconv.FormatBool(*b)
}

func intCell(n *int) string {
	if n == nil {
		return unknown
	}
	return strconv.Itoa(*n)
}

// logLevel shows every ztunnel's log level, after setting it when a level
// is given.
func (c *cli) logLevel(ctx context.Context, o *options, zs []ztunnel, args []string) int {
	set := ""
	if len(args) == 1 {
		set = args[0]
	}
	type level struct {
		raw json.RawMessage
		l   logLevel
	}
	answers := ask(ctx, zs, o.timeout, func(ctx context.Context, a *adminClient) (level, error) {
		raw, l, err := a.logLevel(ctx, set)
		if err != nil && set != "" {
			err = fmt.Errorf("setting the log level to %s: %w", set, err)
		}
		return level{raw, l}, err
	})
	if o.output == "json" {
		raws := make([]answer[json.RawMessage], len(answers))
		for i, a := range answers {
			raws[i] = answer[json.RawMessage]{z: a.z, v: a.v.raw, err: a.err}
		}
		writeJSON(c.stdout, o, raws)
		return report(c, answers)
	}
	var rows [][]string
	for _, a := range answers {
		if a.err == nil {
			rows = append(rows, withNode(o, a.z, []string{a.v.l.Level}))
		}
	}
	if len(rows) > 0 {
		slices.SortFunc(rows, slices.Compare)
		writeTable(c.stdout, withNodeHeader(o, []string{"LEVEL"}), rows)
	}
	return report(c, answers)
}
