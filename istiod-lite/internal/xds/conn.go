package xds

import (
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"slices"
	"sort"
	"strconv"
	"sync"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

// Limits on what one client can make the server hold or send.
const (
	// maxResponseBytes caps the resources in one response, below gRPC's
	// default 4 MiB receive limit; the rest follow after the ACK.
	maxResponseBytes = 3 << 20
	// maxTypesPerStream caps the distinct type URLs one stream subscribes to.
	maxTypesPerStream = 64
	// maxNamesPerType caps the explicit names one stream subscribes to per type.
	maxNamesPerType = 1 << 17
)

// wildcardName in resource_names_subscribe/unsubscribe is the wildcard.
const wildcardName = "*"

// removed stands for a removal in a subscription's pending and nacked maps
// (a real version is never empty).
const removed = ""

// conn is one client stream. Its subscriptions are owned by the goroutine
// running serve; the summary reported by Clients is behind mu.
type conn struct {
	s           *Server
	id          string
	identity    authn.Identity
	peer        string
	connectedAt time.Time
	send        func(*discoveryv3.DeltaDiscoveryResponse) error
	// wakeCh (capacity 1) tells the stream that some type changed; Update
	// never blocks on it, so signals coalesce.
	wakeCh chan struct{}

	// Owned by the serving goroutine.
	subs      map[string]*subscription
	nonceSeq  uint64
	hasNode   bool
	lastTypes map[string]TypeInfo // last published summary, to skip no-op publishes

	mu sync.Mutex
	// nodeID, nodeMeta and types are the summary for Clients; guarded by mu.
	nodeID   string
	nodeMeta *structpb.Struct
	types    map[string]TypeInfo
}

// subscription is one stream's view of one type: what it asked for, what it
// holds (acked), what it rejected, and the response it has not ACKed yet.
type subscription struct {
	typeURL  string
	wildcard bool
	names    map[string]struct{} // explicitly subscribed
	// acked maps each resource the client holds to its version.
	acked map[string]string
	// nacked maps resources to the version (or removal) the client rejected;
	// that version is not sent again until the resource changes.
	nacked map[string]string
	// pending maps the resources of the un-ACKed response to their versions
	// (removed for removals); pendingNonce is its nonce, "" when none.
	pending      map[string]string
	pendingNonce string
	// rev is the revision of the type's state the client was last brought up
	// to date with (counting what is pending).
	rev uint64
	// full asks the next push to compare the whole state, not the change log.
	full bool
	// dirty names must be re-evaluated at the next push: newly subscribed
	// names (true: say "removed" when the resource does not exist, so the
	// client stops waiting for it) and names that did not fit in the last
	// response (false).
	dirty     map[string]bool
	sentFirst bool
	lastAck   time.Time
	nacks     int
}

func (s *subscription) subscribed(name string) bool {
	if s.wildcard {
		return true
	}
	_, ok := s.names[name]
	return ok
}

// forget drops what is known about name once the client no longer subscribes
// to it (the client drops the resource itself).
func (s *subscription) forget(name string) {
	delete(s.acked, name)
	delete(s.nacked, name)
	delete(s.dirty, name)
}

// wake signals the stream without blocking.
func (c *conn) wake() {
	select {
	case c.wakeCh <- struct{}{}:
	default:
	}
}

// serve runs the stream until the client goes away, a request is invalid, a
// send fails, ctx ends or done is closed.
func (c *conn) serve(ctx context.Context, recv func() (*discoveryv3.DeltaDiscoveryRequest, error), done <-chan struct{}) error {
	reqs := make(chan *discoveryv3.DeltaDiscoveryRequest)
	recvErr := make(chan error, 1)
	go func() {
		for {
			req, err := recv()
			if err != nil {
				recvErr <- err
				return
			}
			select {
			case reqs <- req:
			case <-ctx.Done():
				return
			}
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-done:
			return errClosed
		case err := <-recvErr:
			if errors.Is(err, io.EOF) {
				return nil
			}
			return err
		case req := <-reqs:
			if err := c.handle(req); err != nil {
				return err
			}
		case <-c.wakeCh:
			if err := c.pushAll(); err != nil {
				return err
			}
		}
		c.publish()
	}
}

// handle applies one request: ACK/NACK, subscription changes, then pushes
// whatever the request made due.
func (c *conn) handle(req *discoveryv3.DeltaDiscoveryRequest) error {
	typeURL := req.GetTypeUrl()
	if typeURL == "" {
		return status.Error(codes.InvalidArgument, "delta discovery request without type_url")
	}
	if !c.hasNode && req.GetNode() != nil {
		c.hasNode = true
		c.mu.Lock()
		c.nodeID, c.nodeMeta = req.GetNode().GetId(), req.GetNode().GetMetadata()
		c.mu.Unlock()
	}
	sub := c.subs[typeURL]
	if sub == nil {
		if len(c.subs) >= maxTypesPerStream {
			return status.Errorf(codes.ResourceExhausted, "subscribing to more than %d resource types", maxTypesPerStream)
		}
		sub = &subscription{
			typeURL: typeURL,
			// An empty first request is the (legacy) wildcard subscription.
			wildcard: len(req.GetResourceNamesSubscribe()) == 0,
			names:    make(map[string]struct{}),
			acked:    make(map[string]string, len(req.GetInitialResourceVersions())),
			nacked:   make(map[string]string),
			dirty:    make(map[string]bool),
			full:     true,
		}
		c.subs[typeURL] = sub
		// A nonce on the first request of a type refers to an earlier stream
		// and is ignored; initial_resource_versions say what the client
		// still holds from it.
		for name, v := range req.GetInitialResourceVersions() {
			if name != "" && name != wildcardName && v != removed {
				sub.acked[name] = v
			}
		}
		if err := c.subscribe(sub, req); err != nil {
			return err
		}
		for name := range sub.acked {
			if !sub.subscribed(name) {
				delete(sub.acked, name)
			}
		}
	} else {
		c.acknowledge(sub, req)
		if err := c.subscribe(sub, req); err != nil {
			return err
		}
	}
	return c.push(sub)
}

// acknowledge applies the ACK or NACK a request carries, if its nonce is the
// one pending; other nonces are stale (or bogus) and ignored.
func (c *conn) acknowledge(sub *subscription, req *discoveryv3.DeltaDiscoveryRequest) {
	nonce := req.GetResponseNonce()
	if nonce == "" {
		return
	}
	if nonce != sub.pendingNonce {
		c.s.log.Debug("ignoring stale nonce", "id", c.id, "type", sub.typeURL, "nonce", nonce, "pending", sub.pendingNonce)
		return
	}
	if d := req.GetErrorDetail(); d != nil {
		// NACK: the client kept what it had. Remember what it rejected so the
		// same versions are not sent again until they change.
		sub.nacks++
		c.s.metrics.nacks.WithLabelValues(typeLabel(sub.typeURL)).Inc()
		c.s.log.Warn("client rejected resources", "id", c.id, "peer", c.peer, "type", sub.typeURL,
			"nonce", nonce, "resources", len(sub.pending), "code", d.GetCode(), "error", d.GetMessage())
		for name, v := range sub.pending {
			if sub.subscribed(name) {
				sub.nacked[name] = v
			}
		}
	} else {
		for name, v := range sub.pending {
			if !sub.subscribed(name) {
				continue
			}
			if v == removed {
				delete(sub.acked, name)
			} else {
				sub.acked[name] = v
			}
			delete(sub.nacked, name)
		}
		sub.lastAck = time.Now()
	}
	sub.pending, sub.pendingNonce = nil, ""
}

// subscribe applies a request's resource_names_subscribe/unsubscribe.
func (c *conn) subscribe(sub *subscription, req *discoveryv3.DeltaDiscoveryRequest) error {
	for _, name := range req.GetResourceNamesSubscribe() {
		if name == wildcardName {
			if !sub.wildcard {
				sub.wildcard, sub.full = true, true
			}
			continue
		}
		if _, ok := sub.names[name]; ok {
			continue
		}
		if len(sub.names) >= maxNamesPerType {
			return status.Errorf(codes.ResourceExhausted, "subscribing to more than %d names of %s", maxNamesPerType, sub.typeURL)
		}
		sub.names[name] = struct{}{}
		sub.dirty[name] = true
	}
	dropWildcard := false
	for _, name := range req.GetResourceNamesUnsubscribe() {
		if name == wildcardName {
			dropWildcard = dropWildcard || sub.wildcard
			sub.wildcard = false
			continue
		}
		if _, ok := sub.names[name]; !ok {
			continue
		}
		delete(sub.names, name)
		if !sub.subscribed(name) {
			sub.forget(name)
		}
	}
	if dropWildcard {
		for name := range sub.acked {
			if !sub.subscribed(name) {
				sub.forget(name)
			}
		}
		for name := range sub.nacked {
			if !sub.subscribed(name) {
				delete(sub.nacked, name)
			}
		}
	}
	return nil
}

// pushAll pushes every subscribed type that is not waiting for an ACK.
func (c *conn) pushAll() error {
	for _, sub := range c.subs {
		if err := c.push(sub); err != nil {
			return err
		}
	}
	return nil
}

// push sends sub's type the difference between the desired state and what
// the client holds, unless a response is un-ACKed (the difference is then
// computed against the latest state once the ACK arrives) or there is none.
func (c *conn) push(sub *subscription) error {
	if sub.pendingNonce != "" {
		return nil
	}
	st := c.s.state(sub.typeURL)
	if st == nil {
		return nil // no desired set yet; see NewServer
	}
	if sub.sentFirst && !sub.full && len(sub.dirty) == 0 && sub.rev == st.rev {
		return nil
	}
	d := sub.diff(st)
	if len(d.resources) == 0 && len(d.removals) == 0 && sub.sentFirst {
		return nil
	}
	// The first response of a type is sent even when empty: it tells the
	// client it is in sync.
	sub.sentFirst = true
	c.nonceSeq++
	nonce := strconv.FormatUint(c.nonceSeq, 10)
	sub.pending, sub.pendingNonce = d.versions, nonce
	resp := &discoveryv3.DeltaDiscoveryResponse{
		SystemVersionInfo: strconv.FormatUint(st.rev, 10),
		TypeUrl:           sub.typeURL,
		Resources:         d.resources,
		RemovedResources:  d.removals,
		Nonce:             nonce,
	}
	// Counted before sending, so that whoever sees the response sees it
	// counted.
	label := typeLabel(sub.typeURL)
	c.s.metrics.pushes.WithLabelValues(label).Inc()
	c.s.metrics.sent.WithLabelValues(label).Add(float64(len(d.resources)))
	c.s.metrics.removals.WithLabelValues(label).Add(float64(len(d.removals)))
	if !d.oldest.IsZero() {
		c.s.metrics.latency.WithLabelValues(label).Observe(time.Since(d.oldest).Seconds())
	}
	if err := c.send(resp); err != nil {
		return fmt.Errorf("sending %s response: %w", label, err)
	}
	c.s.log.Debug("pushed", "id", c.id, "type", sub.typeURL, "nonce", nonce,
		"resources", len(d.resources), "removals", len(d.removals), "revision", st.rev)
	return nil
}

// diff is one response's worth of difference.
type diff struct {
	resources []*discoveryv3.Resource
	removals  []string
	versions  map[string]string // what the client will hold once it ACKs
	// oldest is when the earliest Update among the changes sent was made;
	// zero for full comparisons (initial sync), which are not push latency.
	oldest time.Time
	size   int
}

// diff computes the difference between st and what the client holds, and
// brings sub's bookkeeping to st's revision. From the change log it costs
// O(changes since the client's revision); a full comparison costs
// O(resources). Names that do not fit in one response stay dirty.
func (s *subscription) diff(st *typeState) diff {
	d := diff{versions: make(map[string]string)}
	dirty := s.dirty
	s.dirty = make(map[string]bool)
	seen := make(map[string]struct{}, len(dirty))
	consider := func(name string, sayAbsent bool, at time.Time) {
		if _, ok := seen[name]; ok {
			return
		}
		seen[name] = struct{}{}
		if d.size >= maxResponseBytes {
			s.dirty[name] = sayAbsent
			return
		}
		if s.evaluate(st, name, sayAbsent, &d) && !at.IsZero() && (d.oldest.IsZero() || at.Before(d.oldest)) {
			d.oldest = at
		}
	}
	for name, sayAbsent := range dirty {
		consider(name, sayAbsent, time.Time{})
	}
	if changes, ok := st.since(s.rev); ok && !s.full {
		for _, ch := range changes {
			for _, name := range ch.names {
				consider(name, false, ch.at)
			}
		}
	} else {
		for name := range st.entries {
			consider(name, false, time.Time{})
		}
		for name := range s.acked {
			consider(name, false, time.Time{})
		}
	}
	s.rev, s.full = st.rev, false
	sort.Slice(d.resources, func(i, j int) bool { return d.resources[i].GetName() < d.resources[j].GetName() })
	sort.Strings(d.removals)
	return d
}

// evaluate adds name to d if the client lacks its current version or holds
// a resource that no longer exists, and reports whether it did.
func (s *subscription) evaluate(st *typeState, name string, sayAbsent bool, d *diff) bool {
	if !s.subscribed(name) {
		return false
	}
	held, holds := s.acked[name]
	rejected, wasRejected := s.nacked[name]
	if e := st.entries[name]; e != nil {
		v := e.res.GetVersion()
		if holds && held == v {
			delete(s.nacked, name)
			return false
		}
		if wasRejected && rejected == v {
			return false
		}
		d.resources = append(d.resources, e.res)
		d.versions[name] = v
		d.size += len(name) + len(v) + len(e.res.GetResource().GetValue())
		return true
	}
	if !holds {
		delete(s.nacked, name)
		if !sayAbsent {
			return false
		}
	} else if wasRejected && rejected == removed {
		return false
	}
	d.removals = append(d.removals, name)
	d.versions[name] = removed
	d.size += len(name)
	return true
}

// publish refreshes the summary Clients reports.
func (c *conn) publish() {
	changed := len(c.subs) != len(c.lastTypes)
	types := make(map[string]TypeInfo, len(c.subs))
	for url, sub := range c.subs {
		ti := TypeInfo{
			Wildcard:     sub.wildcard,
			Names:        len(sub.names),
			Acked:        len(sub.acked),
			PendingNonce: sub.pendingNonce,
			LastAck:      sub.lastAck,
			Nacks:        sub.nacks,
		}
		types[url] = ti
		if !changed && c.lastTypes[url] != ti {
			changed = true
		}
	}
	if !changed {
		return
	}
	c.lastTypes = types
	c.mu.Lock()
	c.types = types
	c.mu.Unlock()
}

// info returns the stream's ClientInfo.
func (c *conn) info() ClientInfo {
	c.mu.Lock()
	nodeID, meta, types := c.nodeID, c.nodeMeta, c.types
	c.mu.Unlock()
	var md map[string]any
	if meta != nil {
		md = meta.AsMap()
	}
	id := c.identity
	id.Groups = slices.Clone(id.Groups)
	return ClientInfo{
		ID:           c.id,
		Identity:     id,
		Peer:         c.peer,
		NodeID:       nodeID,
		NodeMetadata: md,
		ConnectedAt:  c.connectedAt,
		Types:        maps.Clone(types),
	}
}
