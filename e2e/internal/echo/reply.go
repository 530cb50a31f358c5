package echo

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	"github.com/ambient-mesh/ambient/e2e/internal/echopb"
)

// Reply is what the server saw of one call. HTTP replies carry it as JSON (or
// as text, see WriteText); gRPC replies carry the same facts in an
// echopb.EchoResponse, which ReplyFromProto turns into a Reply.
type Reply struct {
	Pod       string `json:"pod"`
	Namespace string `json:"namespace"`
	PodIP     string `json:"pod_ip"`
	Hostname  string `json:"hostname"`
	Version   string `json:"version,omitempty"`
	// LocalAddress is the address the connection was accepted on.
	LocalAddress string `json:"local_address"`
	// PeerAddress is the address the connection came from.
	PeerAddress string `json:"peer_address"`
	Host        string `json:"host"`
	Method      string `json:"method"`
	Path        string `json:"path"`
	Query       string `json:"query,omitempty"`
	Proto       string `json:"proto"`
	// Headers are the request headers; gRPC metadata keys are lower case.
	Headers map[string][]string `json:"headers"`
	// RequestBytes is the length of the request body or payload.
	RequestBytes int64 `json:"request_bytes"`
	// Message is the gRPC request's message, returned unchanged.
	Message string `json:"message,omitempty"`
}

// WriteText writes r as key=value lines, one header value per line as
// header.<Name>=<value>, headers sorted by name.
func (r *Reply) WriteText(w io.Writer) error {
	var b strings.Builder
	line := func(k, v string) { fmt.Fprintf(&b, "%s=%s\n", k, v) }
	line("pod", r.Pod)
	line("namespace", r.Namespace)
	line("pod_ip", r.PodIP)
	line("hostname", r.Hostname)
	line("version", r.Version)
	line("local_address", r.LocalAddress)
	line("peer_address", r.PeerAddress)
	line("host", r.Host)
	line("method", r.Method)
	line("path", r.Path)
	line("query", r.Query)
	line("proto", r.Proto)
	line("request_bytes", fmt.Sprint(r.RequestBytes))
	if r.Message != "" {
		line("message", r.Message)
	}
	for _, name := range slices.Sorted(maps.Keys(r.Headers)) {
		for _, v := range r.Headers[name] {
			line("header."+name, v)
		}
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// ReplyFromProto turns a gRPC reply into a Reply, so tests read both alike.
func ReplyFromProto(m *echopb.EchoResponse) Reply {
	r := Reply{
		Pod:          m.GetPod(),
		Namespace:    m.GetNamespace(),
		PodIP:        m.GetPodIp(),
		Hostname:     m.GetHostname(),
		Version:      m.GetVersion(),
		LocalAddress: m.GetLocalAddress(),
		PeerAddress:  m.GetPeerAddress(),
		Host:         m.GetHost(),
		Method:       m.GetMethod(),
		Path:         m.GetPath(),
		Proto:        m.GetProto(),
		Headers:      make(map[string][]string, len(m.GetHeaders())),
		RequestBytes: m.GetRequestBytes(),
		Message:      m.GetMessage(),
	}
	for k, v := range m.GetHeaders() {
		r.Headers[k] = slices.Clone(v.GetValues())
	}
	return r
}
