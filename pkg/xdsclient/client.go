// Package xdsclient is the delta xDS client of the mesh's data plane: it keeps
// one DeltaAggregatedResources stream to the control plane for all the
// resource types it is configured with (wildcard subscriptions), hands each
// response to a callback, keeps the accepted resources in a local cache, and
// reconnects with backoff, reporting its cached versions
// (initial_resource_versions) so that it receives only the difference.
//
// It is used by ztunnel, the waypoint and tests, so it must stay small and
// must not depend on Kubernetes libraries, nor on go-control-plane: it speaks
// envoy's protocol with api/xds, our own messages with envoy's field numbers
// (go-control-plane alone added megabytes to ztunnel's resident memory).
package xdsclient

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"math/rand/v2"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/ambient-mesh/ambient/api/xds"
)

// Reconnect backoff: exponential from minBackoff, capped at maxBackoff, each
// wait drawn uniformly from [d/2, d) so that a fleet of clients does not
// reconnect in lockstep after a control-plane restart. The cap is short:
// while a client waits, pods created since the control plane came back are
// unknown to it (ztunnel cannot carry their traffic), and an attempt costs
// one refused or accepted TCP connection.
const (
	minBackoff = 200 * time.Millisecond
	maxBackoff = 5 * time.Second
)

// maxRecvMsgSize is the largest response accepted; the server splits larger
// sets of changes across responses.
const maxRecvMsgSize = 16 << 20

// wildcard subscribes to every resource of a type.
const wildcard = "*"

// Config configures a Client.
type Config struct {
	// Address is the control plane's host:port.
	Address string
	// TLS configures the connection. Nil means plaintext, allowed only
	// without a Token (tests).
	TLS *tls.Config
	// Token returns the bearer token sent with each stream (called once per
	// connection attempt, so a rotated token is picked up); may be nil.
	Token func() (string, error)
	// Node identifies the client to the server (sent on the first request).
	Node *xds.Node
	// TypeURLs are the resource types to subscribe to (wildcard).
	TypeURLs []string
	// OnUpdate is called with each response's resources before they enter the
	// cache; an error rejects the whole response (NACK with the error) and
	// leaves the cache unchanged. It is not called for empty responses (a
	// server's first response when nothing changed). Calls are sequential;
	// the stream waits for them, so a slow OnUpdate slows only this client.
	// The slices must not be modified. May be nil.
	OnUpdate func(typeURL string, upserts []*xds.Resource, removals []string) error
	// Dial, when set, opens the connection to Address instead of a plain TCP
	// dial (a test resolving a Service name to the current pod, say).
	Dial func(ctx context.Context, address string) (net.Conn, error)
}

// Client is a delta xDS client. Create it with New and start it with Run.
type Client struct {
	cfg    Config
	log    *slog.Logger
	synced chan struct{}

	mu sync.Mutex
	// cache holds the accepted resources by type URL and name; guarded by mu.
	// The Resource values are never modified once stored.
	cache map[string]map[string]*xds.Resource
	// unsynced holds the types that have not had a first accepted response;
	// guarded by mu. synced is closed when it becomes empty.
	unsynced map[string]struct{}
}

// New returns a Client for c. It does not connect until Run.
func New(c Config) *Client {
	cl := &Client{
		cfg:      c,
		log:      slog.Default().With("component", "xdsclient", "address", c.Address),
		synced:   make(chan struct{}),
		cache:    make(map[string]map[string]*xds.Resource, len(c.TypeURLs)),
		unsynced: make(map[string]struct{}, len(c.TypeURLs)),
	}
	for _, t := range c.TypeURLs {
		cl.cache[t] = make(map[string]*xds.Resource)
		cl.unsynced[t] = struct{}{}
	}
	if len(cl.unsynced) == 0 {
		close(cl.synced)
	}
	return cl
}

// Synced is closed once a response for every type has been accepted.
func (c *Client) Synced() <-chan struct{} { return c.synced }

// Resources returns a copy of the cached resources of typeURL by name. The
// Resource values are shared with the cache and must not be modified.
func (c *Client) Resources(typeURL string) map[string]*xds.Resource {
	c.mu.Lock()
	defer c.mu.Unlock()
	return maps.Clone(c.cache[typeURL])
}

// Run keeps a stream to the server until ctx ends, reconnecting with backoff
// when it breaks. It returns nil when ctx ends, and an error only when the
// configuration cannot work.
func (c *Client) Run(ctx context.Context) error {
	creds := insecure.NewCredentials()
	switch {
	case c.cfg.TLS != nil:
		creds = credentials.NewTLS(c.cfg.TLS.Clone())
	case c.cfg.Token != nil:
		return errors.New("xdsclient: refusing to send a bearer token without TLS")
	}
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(creds),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(maxRecvMsgSize)),
	}
	if c.cfg.Dial != nil {
		opts = append(opts, grpc.WithContextDialer(c.cfg.Dial))
	}
	cc, err := grpc.NewClient(c.cfg.Address, opts...)
	if err != nil {
		return fmt.Errorf("creating grpc client for %s: %w", c.cfg.Address, err)
	}
	defer cc.Close()

	attempt := 0
	for {
		healthy, err := c.stream(ctx, cc)
		if ctx.Err() != nil {
			return nil
		}
		if healthy {
			attempt = 0
		}
		wait := backoff(attempt)
		attempt++
		c.log.Warn("xds stream ended; reconnecting", "error", err, "in", wait)
		t := time.NewTimer(wait)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C:
		}
	}
}

// backoff returns the wait before reconnect attempt n (0-based).
func backoff(n int) time.Duration {
	d := maxBackoff
	if n < 20 {
		d = min(minBackoff<<n, maxBackoff)
	}
	return d/2 + rand.N(d/2)
}

// stream runs one stream until it fails; healthy reports whether the server
// answered at all (which resets the backoff).
func (c *Client) stream(ctx context.Context, cc grpc.ClientConnInterface) (healthy bool, err error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	if c.cfg.Token != nil {
		tok, err := c.cfg.Token()
		if err != nil {
			return false, fmt.Errorf("getting bearer token: %w", err)
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	}
	s, err := xds.OpenDeltaStream(ctx, cc)
	if err != nil {
		return false, fmt.Errorf("opening delta ads stream: %w", err)
	}
	for i, t := range c.cfg.TypeURLs {
		req := &xds.DeltaDiscoveryRequest{
			TypeUrl:                 t,
			ResourceNamesSubscribe:  []string{wildcard},
			InitialResourceVersions: c.versions(t),
		}
		if i == 0 {
			req.Node = c.cfg.Node
		}
		if err := s.Send(req); err != nil {
			return false, fmt.Errorf("subscribing to %s: %w", t, err)
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return healthy, fmt.Errorf("receiving: %w", err)
		}
		healthy = true
		if err := s.Send(c.apply(resp)); err != nil {
			return healthy, fmt.Errorf("acknowledging %s: %w", resp.GetTypeUrl(), err)
		}
	}
}

// versions returns the cached versions of typeURL for initial_resource_versions.
func (c *Client) versions(typeURL string) map[string]string {
	c.mu.Lock()
	defer c.mu.Unlock()
	v := make(map[string]string, len(c.cache[typeURL]))
	for name, r := range c.cache[typeURL] {
		v[name] = r.GetVersion()
	}
	return v
}

// apply hands a response to OnUpdate and, if accepted, to the cache, and
// returns the ACK or NACK to send.
func (c *Client) apply(resp *xds.DeltaDiscoveryResponse) *xds.DeltaDiscoveryRequest {
	typeURL := resp.GetTypeUrl()
	ack := &xds.DeltaDiscoveryRequest{TypeUrl: typeURL, ResponseNonce: resp.GetNonce()}
	err := c.check(resp)
	if err == nil && c.cfg.OnUpdate != nil && len(resp.GetResources())+len(resp.GetRemovedResources()) > 0 {
		err = c.cfg.OnUpdate(typeURL, resp.GetResources(), resp.GetRemovedResources())
	}
	if err != nil {
		c.log.Warn("rejecting xds response", "type", typeURL, "nonce", resp.GetNonce(), "error", err)
		ack.ErrorDetail = &xds.Status{Code: int32(codes.InvalidArgument), Message: err.Error()}
		return ack
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	cache := c.cache[typeURL]
	for _, name := range resp.GetRemovedResources() {
		delete(cache, name)
	}
	for _, r := range resp.GetResources() {
		cache[r.GetName()] = r
	}
	if _, ok := c.unsynced[typeURL]; ok {
		delete(c.unsynced, typeURL)
		if len(c.unsynced) == 0 {
			close(c.synced)
		}
	}
	return ack
}

// check rejects responses the cache cannot hold.
func (c *Client) check(resp *xds.DeltaDiscoveryResponse) error {
	if _, ok := c.cache[resp.GetTypeUrl()]; !ok { // cache's keys never change
		return fmt.Errorf("response for unsubscribed type %q", resp.GetTypeUrl())
	}
	for _, r := range resp.GetResources() {
		switch {
		case r.GetName() == "":
			return errors.New("resource without a name")
		case r.GetResource() == nil:
			return fmt.Errorf("resource %q without a body", r.GetName())
		}
	}
	return nil
}
