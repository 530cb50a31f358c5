package xds

import (
	"encoding/binary"
	"fmt"
	"log/slog"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

// Fuzz input operations, one byte each (mod opCount), some followed by data.
const (
	opRequest = iota // 2-byte length, then a marshalled DeltaDiscoveryRequest
	opUpdate         // 1 byte: which resources of which type change
	opACK            // ACK the last response
	opNACK           // NACK the last response
	opCount
)

// FuzzRequests feeds arbitrary request sequences, interleaved with Updates
// and ACK/NACKs of what was sent, into one stream's request handling. It must
// never panic, and what is sent must stay consistent.
func FuzzRequests(f *testing.F) {
	req := func(r *discoveryv3.DeltaDiscoveryRequest) []byte {
		b, err := proto.Marshal(r)
		if err != nil {
			f.Fatal(err)
		}
		return append([]byte{opRequest, byte(len(b) >> 8), byte(len(b))}, b...)
	}
	seq := func(parts ...[]byte) []byte {
		var out []byte
		for _, p := range parts {
			out = append(out, p...)
		}
		return out
	}
	f.Add(seq(req(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType}), []byte{opACK, opUpdate, 3, opNACK, opUpdate, 7, opACK}))
	f.Add(seq(
		req(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResourceNamesSubscribe: []string{"w0", "nope"},
			InitialResourceVersions: map[string]string{"w0": "x", "w1": ""}}),
		req(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResponseNonce: "1", ResourceNamesUnsubscribe: []string{"w0", "*"}}),
		req(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType, ResourceNamesSubscribe: []string{"*"}}),
		[]byte{opUpdate, 0xff, opACK},
		req(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType, ResponseNonce: "2", ErrorDetail: &statuspb.Status{Message: "no"}}),
	))
	f.Add([]byte{opRequest, 0, 0})
	f.Add([]byte{opUpdate, 1, opRequest, 0, 2, 0x12, 0})

	f.Fuzz(func(t *testing.T, data []byte) {
		s := NewServer(Options{Log: slog.New(slog.DiscardHandler)})
		gen := 0
		update := func(b byte) {
			gen++
			typeURL := testTypes[int(b)&1]
			m := make(map[string]proto.Message)
			for i := range 4 {
				if b&(2<<i) != 0 {
					name := fmt.Sprintf("w%d", i)
					m[name] = workload(name, gen*int(b>>5&1)) // upper bit: content changes too
				}
			}
			s.Update(typeURL, m)
		}
		update(0xff)
		update(0xfe)

		var last *discoveryv3.DeltaDiscoveryResponse
		nonces := map[string]bool{}
		c := s.newConn(authn.Identity{}, func(r *discoveryv3.DeltaDiscoveryResponse) error {
			if r.GetNonce() == "" || nonces[r.GetNonce()] {
				t.Fatalf("response nonce %q empty or reused", r.GetNonce())
			}
			nonces[r.GetNonce()] = true
			seen := map[string]bool{}
			for _, res := range r.GetResources() {
				if seen[res.GetName()] || res.GetVersion() == "" || res.GetResource() == nil {
					t.Fatalf("bad resource %v in %v", res, r)
				}
				seen[res.GetName()] = true
			}
			for _, name := range r.GetRemovedResources() {
				if seen[name] {
					t.Fatalf("%q both sent and removed", name)
				}
				seen[name] = true
			}
			last = r
			return nil
		})
		respond := func(nack bool) error {
			if last == nil {
				return nil
			}
			r := &discoveryv3.DeltaDiscoveryRequest{TypeUrl: last.GetTypeUrl(), ResponseNonce: last.GetNonce()}
			if nack {
				r.ErrorDetail = &statuspb.Status{Message: "rejected"}
			}
			return c.handle(r)
		}

		for len(data) > 0 {
			op := data[0] % opCount
			data = data[1:]
			var err error
			switch op {
			case opRequest:
				if len(data) < 2 {
					return
				}
				n := min(int(binary.BigEndian.Uint16(data)), len(data)-2)
				var r discoveryv3.DeltaDiscoveryRequest
				if proto.Unmarshal(data[2:2+n], &r) == nil {
					err = c.handle(&r)
				}
				data = data[2+n:]
			case opUpdate:
				if len(data) < 1 {
					return
				}
				update(data[0])
				data = data[1:]
				err = c.pushAll()
			case opACK:
				err = respond(false)
			case opNACK:
				err = respond(true)
			}
			if err != nil {
				return // the stream would end here
			}
			c.publish()
			for url, sub := range c.subs {
				if (sub.pendingNonce == "") != (sub.pending == nil) || sub.typeURL != url {
					t.Fatalf("inconsistent subscription %s: nonce %q pending %v", url, sub.pendingNonce, sub.pending)
				}
			}
			_ = c.info()
		}
	})
}
