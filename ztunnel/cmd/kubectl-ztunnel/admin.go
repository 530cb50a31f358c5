package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Paths of ztunnel's admin server (ztunnel/internal/proxy/admin.go).
const (
	configDumpPath = "/config_dump"
	loggingPath    = "/logging"
)

// maxResponse bounds what is read from the admin server: a config_dump of
// a large cluster is megabytes, never this much.
const maxResponse = 256 << 20

// configDump is the part of ztunnel's /config_dump the tables show (-o json
// prints the sections as served). The JSON names are those of ztunnel's
// types (state.Dump, inpod.WorkloadStatus, proxy.ConnStats, inpod.ZDSStatus
// and admin.go's certDump); the plugin keeps its own copy so that it links
// none of ztunnel's data path, and its tests check the copy against the
// real types.
type configDump struct {
	Workloads    []workload      `json:"workloads"`
	Services     []service       `json:"services"`
	Policies     []policy        `json:"policies"`
	Certificates []certificate   `json:"certificates"`
	Pods         []inpodWorkload `json:"pods"`
	Connections  []connStats     `json:"connections"`
	ZDS          zdsStatus       `json:"zds"`
	XDSSynced    bool            `json:"xdsSynced"`
}

// workload is state.WorkloadDump.
type workload struct {
	Name      string   `json:"name"`
	Namespace string   `json:"namespace"`
	Addresses []string `json:"addresses"`
	Hostname  string   `json:"hostname"`
	Identity  string   `json:"identity"`
	Protocol  string   `json:"protocol"`
	Node      string   `json:"node"`
	Status    string   `json:"status"`
	Waypoint  string   `json:"waypoint"`
}

// service is state.ServiceDump.
type service struct {
	Namespace string   `json:"namespace"`
	Hostname  string   `json:"hostname"`
	VIPs      []string `json:"vips"`
	Ports     []string `json:"ports"`
	Waypoint  string   `json:"waypoint"`
	Endpoints []string `json:"endpoints"`
}

// policy is state.PolicyDump; Name is "namespace/name". The rules' matches
// are not shown, only counted.
type policy struct {
	Name   string              `json:"name"`
	Scope  string              `json:"scope"`
	Action string              `json:"action"`
	DryRun bool                `json:"dryRun"`
	Rules  [][]json.RawMessage `json:"rules"`
}

// certificate is admin.go's certDump.
type certificate struct {
	Identity  string    `json:"identity"`
	Serial    string    `json:"serial"`
	NotBefore time.Time `json:"notBefore"`
	NotAfter  time.Time `json:"notAfter"`
	RotateAt  time.Time `json:"rotateAt"`
}

// inpodWorkload is inpod.WorkloadStatus: a pod ztunnel serves in-pod.
type inpodWorkload struct {
	UID               string           `json:"uid"`
	Workload          string           `json:"workload"` // namespace/name
	Namespace         string           `json:"namespace"`
	Redirection       string           `json:"redirection"`
	ActiveConnections int64            `json:"activeConnections"`
	Listeners         []listenerStatus `json:"listeners"`
}

// listenerStatus is inpod.ListenerStatus.
type listenerStatus struct {
	Port int `json:"port"`
}

// connStats is proxy.ConnStats; UID is the in-pod workload's.
type connStats struct {
	UID              string `json:"uid"`
	Outbound         int64  `json:"outbound"`
	InboundPlaintext int64  `json:"inboundPlaintext"`
	InboundHBONE     int64  `json:"inboundHbone"`
	Total            int64  `json:"total"`
	Denied           int64  `json:"denied"`
}

// zdsStatus is inpod.ZDSStatus.
type zdsStatus struct {
	Connected        bool `json:"connected"`
	SnapshotReceived bool `json:"snapshotReceived"`
	Draining         bool `json:"draining"`
}

// logLevel is what /logging answers.
type logLevel struct {
	Level string `json:"level"`
}

// adminClient talks to one ztunnel admin server.
type adminClient struct {
	hc   *http.Client
	base *url.URL
}

// fetchedDump is a config_dump as served (its sections as raw JSON, for -o
// json) and decoded.
type fetchedDump struct {
	sections map[string]json.RawMessage
	dump     configDump
}

// configDump fetches and decodes /config_dump.
func (a *adminClient) configDump(ctx context.Context) (*fetchedDump, error) {
	body, err := a.do(ctx, http.MethodGet, configDumpPath, nil)
	if err != nil {
		return nil, err
	}
	f := &fetchedDump{}
	if err := json.Unmarshal(body, &f.sections); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", configDumpPath, err)
	}
	if err := json.Unmarshal(body, &f.dump); err != nil {
		return nil, fmt.Errorf("decoding %s: %w", configDumpPath, err)
	}
	return f, nil
}

// logLevel reads the log level or, when set is not empty, sets it first.
// It returns the answer as served and decoded.
func (a *adminClient) logLevel(ctx context.Context, set string) (json.RawMessage, logLevel, error) {
	method, q := http.MethodGet, url.Values(nil)
	if set != "" {
		method, q = http.MethodPost, url.Values{"level": {set}}
	}
	body, err := a.do(ctx, method, loggingPath, q)
	if err != nil {
		return nil, logLevel{}, err
	}
	var l logLevel
	if err := json.Unmarshal(body, &l); err != nil {
		return nil, logLevel{}, fmt.Errorf("decoding %s: %w", loggingPath, err)
	}
	if l.Level == "" {
		return nil, logLevel{}, fmt.Errorf("decoding %s: no level in %q", loggingPath, firstLine(body))
	}
	return body, l, nil
}

// do sends one request and returns the body of a 2xx answer.
func (a *adminClient) do(ctx context.Context, method, path string, q url.Values) ([]byte, error) {
	u := a.base.JoinPath(path)
	u.RawQuery = q.Encode()
	req, err := http.NewRequestWithContext(ctx, method, u.String(), nil)
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		// url.Error repeats the URL, which for a port-forward names a host
		// that is never dialed; the cause is what matters.
		var ue *url.Error
		if errors.As(err, &ue) {
			err = ue.Err
		}
		return nil, fmt.Errorf("%s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxResponse))
	if err != nil {
		return nil, fmt.Errorf("%s %s: reading the answer: %w", method, path, err)
	}
	if resp.StatusCode/100 != 2 {
		if msg := firstLine(body); msg != "" {
			return nil, fmt.Errorf("%s %s: %s: %s", method, path, resp.Status, msg)
		}
		return nil, fmt.Errorf("%s %s: %s", method, path, resp.Status)
	}
	return body, nil
}

// firstLine is the first line of an answer, for an error message.
func firstLine(b []byte) string {
	line, _, _ := bytes.Cut(bytes.TrimSpace(b), []byte("\n"))
	const max = 200
	if len(line) > max {
		return string(line[:max]) + "..."
	}
	return strings.TrimSpace(string(line))
}

// fetchConfigDump is adminClient.configDump in the shape ask takes.
func fetchConfigDump(ctx context.Context, a *adminClient) (*fetchedDump, error) {
	return a.configDump(ctx)
}
