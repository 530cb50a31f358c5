package cniapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
)

// maxBodySize bounds request and response bodies; both are a few hundred
// bytes.
const maxBodySize = 1 << 20

// Client talks to the agent from the plugin. Each call is bounded by its
// context.
type Client struct {
	socketPath string
	http       *http.Client
}

// NewClient returns a client for the agent listening on socketPath.
func NewClient(socketPath string) *Client {
	var d net.Dialer
	return &Client{
		socketPath: socketPath,
		http: &http.Client{Transport: &http.Transport{
			DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
				return d.DialContext(ctx, "unix", socketPath)
			},
			// The plugin makes one call per process.
			DisableKeepAlives: true,
		}},
	}
}

// Add asks the agent to enroll the pod if it is ambient.
func (c *Client) Add(ctx context.Context, r *PodRequest) (*Response, error) {
	return c.do(ctx, http.MethodPost, PathAdd, r)
}

// Del asks the agent to unenroll the pod.
func (c *Client) Del(ctx context.Context, r *PodRequest) (*Response, error) {
	return c.do(ctx, http.MethodPost, PathDel, r)
}

// Check asks the agent whether the pod's redirection is in place.
func (c *Client) Check(ctx context.Context, r *PodRequest) (*Response, error) {
	return c.do(ctx, http.MethodPost, PathCheck, r)
}

// Status asks the agent whether it is ready to enroll pods.
func (c *Client) Status(ctx context.Context) (*Response, error) {
	return c.do(ctx, http.MethodGet, PathStatus, nil)
}

func (c *Client) do(ctx context.Context, method, path string, body any) (*Response, error) {
	var rd io.Reader
	if body != nil {
		b, err := json.Marshal(body)
		if err != nil {
			return nil, fmt.Errorf("encoding request: %w", err)
		}
		rd = bytes.NewReader(b)
	}
	req, err := http.NewRequestWithContext(ctx, method, "http://ambient-cni-agent"+path, rd)
	if err != nil {
		return nil, fmt.Errorf("building request: %w", err)
	}
	if body != nil {
		req.Header.Set("Content-Type", "application/json")
	}
	resp, err := c.http.Do(req)
	if err != nil {
		if ctxErr := ctx.Err(); ctxErr != nil {
			return nil, fmt.Errorf("calling node agent at %s: %w", c.socketPath, ctxErr)
		}
		return nil, fmt.Errorf("%w at %s: %w", ErrUnreachable, c.socketPath, unwrapURLError(err))
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBodySize))
	if err != nil {
		return nil, fmt.Errorf("reading node agent answer to %s: %w", path, err)
	}
	var out Response
	decodeErr := json.Unmarshal(b, &out)
	if resp.StatusCode/100 != 2 {
		msg := out.Error
		if decodeErr != nil || msg == "" {
			msg = strings.TrimSpace(string(b))
		}
		if msg == "" {
			msg = http.StatusText(resp.StatusCode)
		}
		return nil, &AgentError{Path: path, StatusCode: resp.StatusCode, Message: msg}
	}
	if decodeErr != nil {
		return nil, fmt.Errorf("decoding node agent answer to %s: %w", path, decodeErr)
	}
	return &out, nil
}

// unwrapURLError drops net/http's `Post "http://...": ` prefix, which names
// a made-up host.
func unwrapURLError(err error) error {
	if ue, ok := errors.AsType[*url.Error](err); ok {
		return ue.Err
	}
	return err
}
