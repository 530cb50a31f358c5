package xds

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"log/slog"
	"sort"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
)

// minLogNames is the least number of changed names a type's change log keeps,
// however small the type, so that a client that is a few pushes behind is
// still served from the log.
const minLogNames = 1024

// entry is one resource at one version. It is immutable once published: the
// same *discoveryv3.Resource goes into every client's response.
type entry struct {
	res *discoveryv3.Resource
	sum versionSum // res.Version, undecoded, for cheap comparison
	at  time.Time  // when the Update that produced this version was called
}

// change is one Update's effect on a type: the names upserted or removed.
type change struct {
	rev   uint64
	at    time.Time
	names []string
}

// typeState is the desired set of one resource type at one revision, with the
// recent history of changes. A typeState is immutable once published, so
// connection goroutines read it without locks; Update publishes a new one.
type typeState struct {
	rev     uint64
	entries map[string]*entry
	// log holds the changes with revisions in (base, rev], oldest first. A
	// client whose state was computed at a revision >= base is brought up to
	// date from the log in O(changes); one further behind gets a full diff.
	log      []change
	base     uint64
	logNames int // total names in log
}

// since returns the changes after revision rev, or false when the log no
// longer reaches back that far.
func (t *typeState) since(rev uint64) ([]change, bool) {
	if rev < t.base {
		return nil, false
	}
	i := sort.Search(len(t.log), func(i int) bool { return t.log[i].rev > rev })
	return t.log[i:], true
}

// versionSum is a resource's version: a hash of its deterministic bytes, so
// the same desired state has the same versions across server restarts and
// replicas, and a reconnecting client gets only the difference. On the wire it
// is hex-encoded.
type versionSum [12]byte

func sumOf(b []byte) versionSum {
	full := sha256.Sum256(b)
	return versionSum(full[:12])
}

func (v versionSum) String() string { return hex.EncodeToString(v[:]) }

// newEntry marshals m deterministically and wraps it for the wire.
func newEntry(name string, m proto.Message, at time.Time) (*entry, error) {
	b, v, err := marshal(nil, name, m)
	if err != nil {
		return nil, err
	}
	return wrap(name, m, b, v, at), nil
}

// marshal appends m's deterministic bytes to buf and returns them with their
// version.
func marshal(buf []byte, name string, m proto.Message) ([]byte, versionSum, error) {
	if m == nil || !m.ProtoReflect().IsValid() {
		return buf, versionSum{}, fmt.Errorf("resource %q: nil message", name)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.MarshalAppend(buf[:0], m)
	if err != nil {
		return buf, versionSum{}, fmt.Errorf("marshalling resource %q: %w", name, err)
	}
	return b, sumOf(b), nil
}

// wrap builds the entry of m, whose bytes b (copied) have version v.
func wrap(name string, m proto.Message, b []byte, v versionSum, at time.Time) *entry {
	return &entry{
		sum: v,
		res: &discoveryv3.Resource{
			Name:    name,
			Version: v.String(),
			Resource: &anypb.Any{
				TypeUrl: anyTypePrefix + string(m.ProtoReflect().Descriptor().FullName()),
				Value:   bytes.Clone(b),
			},
		},
		at: at,
	}
}

// anyTypePrefix prefixes a message's full name in an Any's type URL.
const anyTypePrefix = "type.googleapis.com/"

// next returns the state after replacing old's desired set (old may be nil)
// with resources, or nil when nothing changed. A resource that cannot be
// marshalled keeps its previous version (and is logged) rather than vanishing
// from every client.
func next(old *typeState, typeURL string, resources map[string]proto.Message, at time.Time, log *slog.Logger) *typeState {
	var oldEntries map[string]*entry
	if old != nil {
		oldEntries = old.entries
	}
	entries := make(map[string]*entry, len(resources))
	var changed []string
	var buf []byte // reused: only changed resources keep a copy of their bytes
	for name, m := range resources {
		b, v, err := marshal(buf, name, m)
		buf = b
		prev, had := oldEntries[name]
		switch {
		case err != nil:
			log.Error("skipping resource", "type", typeURL, "error", err)
			if had {
				entries[name] = prev
			}
		case had && prev.sum == v:
			entries[name] = prev
		default:
			entries[name] = wrap(name, m, b, v, at)
			changed = append(changed, name)
		}
	}
	for name := range oldEntries {
		if _, ok := entries[name]; !ok {
			changed = append(changed, name)
		}
	}
	if old == nil {
		// The first desired set of a type: clients waiting for it get a full
		// diff, so no history is needed.
		return &typeState{rev: 1, entries: entries, base: 1}
	}
	if len(changed) == 0 {
		return nil
	}
	sort.Strings(changed)
	t := &typeState{
		rev:      old.rev + 1,
		entries:  entries,
		log:      append(old.log, change{rev: old.rev + 1, at: at, names: changed}),
		base:     old.base,
		logNames: old.logNames + len(changed),
	}
	// Once the log names more resources than the type holds, a full diff is
	// cheaper than replaying it.
	limit := max(len(entries), minLogNames)
	for t.logNames > limit && len(t.log) > 1 {
		t.logNames -= len(t.log[0].names)
		t.base = t.log[0].rev
		t.log = t.log[1:]
	}
	return t
}
