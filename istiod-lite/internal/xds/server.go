// Package xds serves the mesh state to ztunnels and waypoints over delta xDS
// (envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources).
//
// The control loop hands the server the full desired set of each resource type
// with Update; the server versions every resource by a hash of its
// deterministic bytes and sends each client only what it lacks: new and
// changed resources, and removals. Because versions are content hashes, a
// client that reconnects (even to a restarted server) and reports its
// initial_resource_versions receives only the difference.
//
// Flow control: each stream has its own goroutine, and at most one response
// per type is un-ACKed at a time. While a client has not ACKed, further
// Updates coalesce: its next response carries the state current at that time,
// not the intermediate ones. Update never blocks on clients: it publishes an
// immutable snapshot and signals every stream without blocking.
//
// A client that stops reading or ACKing therefore costs only its own
// goroutines and bookkeeping: nothing queues up for it (its un-ACKed response
// is at most one per type, bounded by gRPC flow control), and a Send blocked
// on it holds up no one else. It is dropped when its stream context ends: the
// client disconnects, gRPC keepalive (keepalive.ServerParameters on the
// grpc.Server) finds its transport dead, MaxConnectionAge recycles it, or
// Close is called.
//
// A type is served only after its first Update (see NewServer). Responses
// larger than about 3 MiB are split; the rest follows each ACK.
package xds

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

// Options configure a Server.
type Options struct {
	// Authenticate identifies the caller of each stream from its context
	// (gRPC metadata). Nil disables authentication (tests only).
	Authenticate func(ctx context.Context) (authn.Identity, error)
	// Metrics registers the server's collectors; may be nil.
	Metrics prometheus.Registerer
	// Log defaults to slog.Default().
	Log *slog.Logger
}

// Server is a delta Aggregated Discovery Service. It is safe for concurrent use.
type Server struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer

	authenticate func(ctx context.Context) (authn.Identity, error)
	log          *slog.Logger
	metrics      *metrics

	// updateMu serialises Updates so the O(resources) diff runs outside mu.
	updateMu sync.Mutex

	mu sync.RWMutex
	// types holds the published state of each type; the values are
	// immutable. Guarded by mu.
	types map[string]*typeState
	// conns are the open streams. Guarded by mu.
	conns map[*conn]struct{}
	// closed is set by Close; no stream is added after. Guarded by mu.
	closed bool

	done      chan struct{} // closed by Close
	closeOnce sync.Once
	handlers  sync.WaitGroup // running stream handlers
	nextID    atomic.Uint64
}

// NewServer returns a Server with no resources. A type is served only once
// Update has been called for it (with an empty set if need be), so a freshly
// started server never tells reconnecting clients to remove everything before
// it has computed the mesh state.
func NewServer(o Options) *Server {
	log := o.Log
	if log == nil {
		log = slog.Default()
	}
	log = log.With("component", "xds")
	return &Server{
		authenticate: o.Authenticate,
		log:          log,
		metrics:      newMetrics(o.Metrics, log),
		types:        make(map[string]*typeState),
		conns:        make(map[*conn]struct{}),
		done:         make(chan struct{}),
	}
}

// Register adds the Aggregated Discovery Service to g.
func (s *Server) Register(g *grpc.Server) {
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, s)
}

// StreamAggregatedResources is state-of-the-world ADS, which this server does
// not speak.
func (s *Server) StreamAggregatedResources(grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return status.Error(codes.Unimplemented, "state-of-the-world ADS is not supported; use DeltaAggregatedResources")
}

// Update replaces the desired set of one resource type and pushes the
// difference to every subscribed client. It costs O(resources) to hash the
// set and O(clients) non-blocking signals; the per-client work happens on the
// clients' own goroutines. resources is not retained or modified.
func (s *Server) Update(typeURL string, resources map[string]proto.Message) {
	at := time.Now()
	s.updateMu.Lock()
	defer s.updateMu.Unlock()

	s.mu.RLock()
	old := s.types[typeURL]
	s.mu.RUnlock()
	t := next(old, typeURL, resources, at, s.log)
	if t == nil {
		return
	}

	s.mu.Lock()
	s.types[typeURL] = t
	for c := range s.conns {
		c.wake()
	}
	s.mu.Unlock()
	s.log.Debug("updated", "type", typeURL, "revision", t.rev, "resources", len(t.entries))
}

// state returns the published state of typeURL, or nil before its first Update.
func (s *Server) state(typeURL string) *typeState {
	s.mu.RLock()
	defer s.mu.RUnlock()
	return s.types[typeURL]
}

// ClientInfo describes one connected stream.
type ClientInfo struct {
	ID       string         `json:"id"`
	Identity authn.Identity `json:"identity"`
	Peer     string         `json:"peer,omitempty"`
	// NodeID and NodeMetadata come from the first request that carried a node.
	NodeID       string         `json:"nodeId,omitempty"`
	NodeMetadata map[string]any `json:"nodeMetadata,omitempty"`
	ConnectedAt  time.Time      `json:"connectedAt"`
	// Types are the subscribed types by type URL.
	Types map[string]TypeInfo `json:"types"`
}

// TypeInfo is one client's subscription to one type.
type TypeInfo struct {
	Wildcard bool `json:"wildcard"`
	// Names is the number of explicitly subscribed names.
	Names int `json:"names,omitempty"`
	// Acked is the number of resource versions the client has ACKed (holds).
	Acked int `json:"acked"`
	// PendingNonce is the nonce of the un-ACKed response, if any.
	PendingNonce string    `json:"pendingNonce,omitempty"`
	LastAck      time.Time `json:"lastAck,omitzero"`
	Nacks        int       `json:"nacks,omitempty"`
}

// Clients returns a snapshot of the connected clients, oldest first.
func (s *Server) Clients() []ClientInfo {
	s.mu.RLock()
	conns := make([]*conn, 0, len(s.conns))
	for c := range s.conns {
		conns = append(conns, c)
	}
	s.mu.RUnlock()
	out := make([]ClientInfo, 0, len(conns))
	for _, c := range conns {
		out = append(out, c.info())
	}
	sort.Slice(out, func(i, j int) bool {
		return out[i].ConnectedAt.Before(out[j].ConnectedAt) || (out[i].ConnectedAt.Equal(out[j].ConnectedAt) && out[i].ID < out[j].ID)
	})
	return out
}

// Close ends every stream (with codes.Unavailable, so clients reconnect
// elsewhere) and refuses new ones. It is safe to call more than once.
func (s *Server) Close() {
	s.closeOnce.Do(func() {
		s.mu.Lock()
		s.closed = true
		s.mu.Unlock()
		close(s.done)
	})
	s.handlers.Wait()
}

// errClosed ends streams when the server closes.
var errClosed = status.Error(codes.Unavailable, "xds server shutting down")

// DeltaAggregatedResources serves one client stream.
func (s *Server) DeltaAggregatedResources(stream grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	ctx := stream.Context()
	var id authn.Identity
	if s.authenticate != nil {
		var err error
		if id, err = s.authenticate(ctx); err != nil {
			return authError(err)
		}
	}
	c := s.newConn(id, stream.Send)
	if p, ok := peer.FromContext(ctx); ok && p.Addr != nil {
		c.peer = p.Addr.String()
	}
	if !s.add(c) {
		return errClosed
	}
	defer s.remove(c)
	s.log.Info("client connected", "id", c.id, "peer", c.peer, "identity", id.Username)

	// The stream runs on its own goroutine so that Close can end the handler
	// even while that goroutine is blocked in Send on a client that does not
	// read: returning cancels the stream context, which unblocks the Send.
	errc := make(chan error, 1)
	go func() { errc <- c.serve(ctx, stream.Recv, s.done) }()
	var err error
	select {
	case err = <-errc:
	case <-s.done:
		err = errClosed
	}
	s.log.Info("client disconnected", "id", c.id, "peer", c.peer, "reason", err)
	return err
}

// authError turns an authentication failure into the gRPC status the client
// sees: Unavailable when the token could not be checked at all (the client
// should retry), Unauthenticated otherwise.
func authError(err error) error {
	if st, ok := status.FromError(err); ok && st.Code() != codes.Unknown {
		return err
	}
	if errors.Is(err, authn.ErrReviewFailed) {
		return status.Errorf(codes.Unavailable, "authenticating xds client: %v", err)
	}
	return status.Errorf(codes.Unauthenticated, "authenticating xds client: %v", err)
}

func (s *Server) newConn(id authn.Identity, send func(*discoveryv3.DeltaDiscoveryResponse) error) *conn {
	return &conn{
		s:           s,
		id:          strconv.FormatUint(s.nextID.Add(1), 10),
		identity:    id,
		connectedAt: time.Now(),
		send:        send,
		wakeCh:      make(chan struct{}, 1),
		subs:        make(map[string]*subscription),
	}
}

func (s *Server) add(c *conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return false
	}
	s.conns[c] = struct{}{}
	s.handlers.Add(1)
	s.metrics.clients.Inc()
	return true
}

func (s *Server) remove(c *conn) {
	s.mu.Lock()
	delete(s.conns, c)
	s.mu.Unlock()
	s.metrics.clients.Dec()
	s.handlers.Done()
}
