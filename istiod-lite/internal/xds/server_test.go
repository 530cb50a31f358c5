package xds

import (
	"errors"
	"fmt"
	"maps"
	"slices"
	"strings"
	"testing"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	statuspb "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"github.com/ambient-mesh/ambient/api/security"
)

func TestWildcardSubscriberGetsTheFullSet(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ts.Update(addressType, workloads(5))
	ts.Update(authzType, map[string]proto.Message{"default/allow": policy("allow", security.Action_ALLOW)})

	c := startClient(t, ts.addr, clientTLS, "node-1")
	c.waitSynced(t)

	got := c.Resources(addressType)
	if len(got) != 5 {
		t.Fatalf("got %d addresses, want 5", len(got))
	}
	for name, m := range workloads(5) {
		if got[name].GetVersion() != version(t, m) {
			t.Errorf("%s: version %q, want %q", name, got[name].GetVersion(), version(t, m))
		}
	}
	if got := c.Resources(authzType); len(got) != 1 || got["default/allow"] == nil {
		t.Errorf("authorizations = %v, want default/allow", slices.Collect(maps.Keys(got)))
	}

	info, ok := ts.client("node-1")
	if !ok {
		t.Fatal("client not listed")
	}
	if info.Identity.ServiceAccount != "ztunnel" || info.NodeMetadata["NODE_NAME"] != "node-1" {
		t.Errorf("client info = %+v", info)
	}
	eventually(t, "both types ACKed", func() bool {
		info, _ := ts.client("node-1")
		a, z := info.Types[addressType], info.Types[authzType]
		return a.Wildcard && a.Acked == 5 && a.PendingNonce == "" && z.Acked == 1 && z.PendingNonce == ""
	})
	if got := ts.metric(t, "istiod_xds_connected_clients", ""); got != 1 {
		t.Errorf("connected clients gauge = %v, want 1", got)
	}
}

func TestUpdatePushesOnlyChangedAndRemovedResources(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(4)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)
	c := startClient(t, ts.addr, clientTLS, "node-1")
	c.waitSynced(t)
	if u := c.nextOf(t, addressType); len(u.upserts) != 4 {
		t.Fatalf("initial update has %d resources, want 4", len(u.upserts))
	}

	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1) // changed
	delete(desired, "w2")             // removed
	desired["w9"] = workload("w9", 0) // added
	ts.Update(addressType, desired)
	ts.Update(authzType, nil) // no change: no push

	u := c.next(t)
	want := map[string]string{"w1": version(t, desired["w1"]), "w9": version(t, desired["w9"])}
	if u.typeURL != addressType || !maps.Equal(u.upserts, want) || !slices.Equal(u.removals, []string{"w2"}) {
		t.Fatalf("update = %+v, want upserts %v and removal w2", u, want)
	}

	// The unchanged authorization set produced nothing: the next update is
	// the one after it.
	ts.Update(authzType, map[string]proto.Message{"default/deny": policy("deny", security.Action_DENY)})
	if u := c.next(t); u.typeURL != authzType || len(u.upserts) != 1 {
		t.Fatalf("update = %+v, want the new policy only", u)
	}
	if got := ts.metric(t, "istiod_xds_push_latency_seconds", addressType); got != 1 {
		t.Errorf("push latency observations = %v, want 1 (the initial sync is not a push)", got)
	}
	if got := c.Resources(addressType); len(got) != 4 || got["w2"] != nil {
		t.Errorf("cached addresses = %v", slices.Sorted(maps.Keys(got)))
	}
}

func TestNACKedVersionsAreNotResentUntilTheyChange(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(3)
	ts.Update(addressType, desired)

	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType})
	first := s.recv()
	if len(first.GetResources()) != 3 {
		t.Fatalf("first response has %d resources, want 3", len(first.GetResources()))
	}
	s.ack(first)

	desired = maps.Clone(desired)
	desired["w0"] = workload("w0", 1)
	ts.Update(addressType, desired)
	resp := s.recv()
	if got := names(resp); len(got) != 1 || got["w0"] != version(t, desired["w0"]) {
		t.Fatalf("response = %v, want w0 only", got)
	}
	s.send(&discoveryv3.DeltaDiscoveryRequest{
		TypeUrl:       addressType,
		ResponseNonce: resp.GetNonce(),
		ErrorDetail:   &statuspb.Status{Code: int32(codes.InvalidArgument), Message: "bad address"},
	})

	// The same desired state again, plus a change elsewhere: the rejected
	// w0 is not resent, only w1 is.
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1)
	ts.Update(addressType, desired)
	if got := names(s.recv()); len(got) != 1 || got["w1"] == "" {
		t.Fatalf("response = %v, want w1 only", got)
	}
	if got := ts.metric(t, "istiod_xds_nacks_total", addressType); got != 1 {
		t.Errorf("nacks = %v, want 1", got)
	}
	eventually(t, "the client info to show the NACK", func() bool {
		info := ts.Clients()[0].Types[addressType]
		return info.Nacks == 1 && info.Acked == 3
	})
}

func TestNACKedVersionIsResentOnceItChanges(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(2)
	ts.Update(addressType, desired)
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType})
	s.ack(s.recv())

	desired = maps.Clone(desired)
	desired["w0"] = workload("w0", 1)
	ts.Update(addressType, desired)
	resp := s.recv()
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResponseNonce: resp.GetNonce(),
		ErrorDetail: &statuspb.Status{Message: "no"}})

	desired = maps.Clone(desired)
	desired["w0"] = workload("w0", 2)
	ts.Update(addressType, desired)
	if got := names(s.recv()); got["w0"] != version(t, desired["w0"]) {
		t.Fatalf("response = %v, want w0 at its new version", got)
	}
}

func TestStaleNonceIsIgnoredAndChangesCoalesceUntilACK(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(3)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType})
	first := s.recv()

	// Several Updates while the first response is un-ACKed.
	for gen := 1; gen <= 5; gen++ {
		desired = maps.Clone(desired)
		desired["w0"] = workload("w0", gen)
		if gen == 3 {
			delete(desired, "w2")
		}
		ts.Update(addressType, desired)
	}
	// A wrong nonce is not an ACK: nothing may be sent for it.
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResponseNonce: "not-" + first.GetNonce()})
	// Requests are handled in order: once the next one is answered, the
	// wrong nonce has been seen.
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType})
	if resp := s.recv(); resp.GetTypeUrl() != authzType {
		t.Fatalf("got a %s response before the ACK", resp.GetTypeUrl())
	}
	if got := ts.metric(t, "istiod_xds_pushes_total", addressType); got != 1 {
		t.Fatalf("pushes before the ACK = %v, want 1", got)
	}

	s.ack(first)
	resp := s.recv()
	if got := names(resp); len(got) != 1 || got["w0"] != version(t, desired["w0"]) {
		t.Fatalf("coalesced response = %v, want w0 at generation 5 only", got)
	}
	if !slices.Equal(resp.GetRemovedResources(), []string{"w2"}) {
		t.Fatalf("removals = %v, want w2", resp.GetRemovedResources())
	}
	s.ack(resp)

	// Nothing else was queued: the next response is the next change.
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1)
	ts.Update(addressType, desired)
	if got := names(s.recv()); len(got) != 1 || got["w1"] == "" {
		t.Fatalf("response = %v, want w1 only", got)
	}
}

func TestExplicitSubscriptionsAndUnsubscribe(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(3)
	ts.Update(addressType, desired)
	s := dialRaw(t, ts.addr, clientTLS, testToken)

	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResourceNamesSubscribe: []string{"w0", "missing"}})
	resp := s.recv()
	if got := names(resp); len(got) != 1 || got["w0"] == "" {
		t.Fatalf("response = %v, want w0 only", got)
	}
	if !slices.Equal(resp.GetRemovedResources(), []string{"missing"}) {
		t.Fatalf("removals = %v, want the missing name reported", resp.GetRemovedResources())
	}
	s.ack(resp)

	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResourceNamesSubscribe: []string{"w1"}, ResourceNamesUnsubscribe: []string{"w0"}})
	resp = s.recv()
	if got := names(resp); len(got) != 1 || got["w1"] == "" || len(resp.GetRemovedResources()) != 0 {
		t.Fatalf("response = %v removals %v, want w1 only", got, resp.GetRemovedResources())
	}
	s.ack(resp)

	// w0 (unsubscribed) and w2 (never subscribed) change; then w1 does.
	desired = maps.Clone(desired)
	desired["w0"] = workload("w0", 1)
	desired["w2"] = workload("w2", 1)
	ts.Update(addressType, desired)
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1)
	ts.Update(addressType, desired)
	if got := names(s.recv()); len(got) != 1 || got["w1"] != version(t, desired["w1"]) {
		t.Fatalf("response = %v, want only w1's change", got)
	}
	if info := ts.Clients()[0].Types[addressType]; info.Wildcard || info.Names != 2 {
		t.Errorf("type info = %+v, want 2 explicit names", info)
	}

	// Switching to the wildcard brings the rest.
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResourceNamesSubscribe: []string{"*"}})
	eventually(t, "the switch to wildcard", func() bool { return ts.Clients()[0].Types[addressType].Wildcard })
}

func TestUnsubscribedTypesAreNotPushed(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ts.Update(addressType, workloads(1))
	ts.Update(authzType, nil)
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType})
	s.ack(s.recv())

	ts.Update(addressType, workloads(2))
	ts.Update(authzType, map[string]proto.Message{"default/p": policy("p", security.Action_DENY)})
	if resp := s.recv(); resp.GetTypeUrl() != authzType {
		t.Fatalf("got a %s response on a stream subscribed only to %s", resp.GetTypeUrl(), authzType)
	}
}

func TestTypeIsNotServedBeforeItsFirstUpdate(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ts.Update(authzType, nil)
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	// The client holds addresses from an earlier server; until this server
	// has computed addresses it must not tell the client to remove them.
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, InitialResourceVersions: map[string]string{"w0": "old"}})
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType})
	if resp := s.recv(); resp.GetTypeUrl() != authzType {
		t.Fatalf("first response is for %s, want %s", resp.GetTypeUrl(), authzType)
	}
	ts.Update(addressType, map[string]proto.Message{"w0": workload("w0", 0)})
	resp := s.recv()
	if resp.GetTypeUrl() != addressType || len(resp.GetResources()) != 1 || len(resp.GetRemovedResources()) != 0 {
		t.Fatalf("response = %v, want w0 updated and nothing removed", resp)
	}
}

func TestReconnectWithInitialVersionsGetsOnlyTheDifference(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(50)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)
	c := startClient(t, ts.addr, clientTLS, "node-1")
	c.waitSynced(t)
	c.nextOf(t, addressType)

	ts.disconnect()
	desired = maps.Clone(desired)
	desired["w7"] = workload("w7", 1)
	delete(desired, "w8")
	ts.Update(addressType, desired)
	sentBefore := ts.metric(t, "istiod_xds_resources_sent_total", addressType)
	ts.serve(t, ts.addr)

	u := c.next(t)
	if u.typeURL != addressType || !maps.Equal(u.upserts, map[string]string{"w7": version(t, desired["w7"])}) ||
		!slices.Equal(u.removals, []string{"w8"}) {
		t.Fatalf("update after reconnect = %+v, want w7 changed and w8 removed", u)
	}
	if sent := ts.metric(t, "istiod_xds_resources_sent_total", addressType) - sentBefore; sent != 1 {
		t.Errorf("resources sent after reconnect = %v, want 1", sent)
	}
	if got := c.Resources(addressType); len(got) != 49 {
		t.Errorf("cache has %d addresses, want 49", len(got))
	}
}

func TestClientReconnectingToARestartedServerGetsOnlyTheDifference(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	desired := workloads(100)
	policies := map[string]proto.Message{"default/allow": policy("allow", security.Action_ALLOW)}
	old := startServer(t, "127.0.0.1:0", serverTLS)
	old.Update(addressType, desired)
	old.Update(authzType, policies)
	c := startClient(t, old.addr, clientTLS, "node-1")
	c.waitSynced(t)
	c.nextOf(t, addressType)
	c.nextOf(t, authzType)

	// Restart: a fresh server with the same desired state.
	old.stop()
	restarted := startServer(t, old.addr, serverTLS)
	restarted.Update(addressType, desired)
	restarted.Update(authzType, policies)
	eventually(t, "the client to reconnect and ACK both types", func() bool {
		info, ok := restarted.client("node-1")
		return ok && restarted.metric(t, "istiod_xds_pushes_total", "") == 2 &&
			info.Types[addressType].Acked == 100 && info.Types[addressType].PendingNonce == "" &&
			info.Types[authzType].Acked == 1 && info.Types[authzType].PendingNonce == ""
	})
	if sent, removed := restarted.metric(t, "istiod_xds_resources_sent_total", ""), restarted.metric(t, "istiod_xds_removals_sent_total", ""); sent != 0 || removed != 0 {
		t.Fatalf("restarted server sent %v resources and %v removals, want none", sent, removed)
	}
	if !c.quiet() {
		t.Fatalf("client saw an update after the restart: %+v", c.next(t))
	}

	// Restart again with one change made while the server was down.
	restarted.stop()
	desired = maps.Clone(desired)
	desired["w42"] = workload("w42", 1)
	again := startServer(t, old.addr, serverTLS)
	again.Update(addressType, desired)
	again.Update(authzType, policies)
	u := c.next(t)
	if u.typeURL != addressType || !maps.Equal(u.upserts, map[string]string{"w42": version(t, desired["w42"])}) || len(u.removals) != 0 {
		t.Fatalf("update = %+v, want only w42", u)
	}
	if sent := again.metric(t, "istiod_xds_resources_sent_total", ""); sent != 1 {
		t.Errorf("resources sent = %v, want 1", sent)
	}
}

func TestClientThatNeverACKsDoesNotDelayOthers(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(10)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)
	slow := startClient(t, ts.addr, clientTLS, "slow")
	fast := startClient(t, ts.addr, clientTLS, "fast")
	slow.waitSynced(t)
	fast.waitSynced(t)
	slow.nextOf(t, addressType)
	fast.nextOf(t, addressType)

	// From now on the slow client sits on its first response.
	release := make(chan struct{})
	stuck := make(chan update, 1)
	slow.setHook(func(u update) error {
		stuck <- u
		<-release
		return nil
	})
	defer close(release)

	const n = 20
	for gen := 1; gen <= n; gen++ {
		desired = maps.Clone(desired)
		desired["w0"] = workload("w0", gen)
		ts.Update(addressType, desired)
		if u := fast.nextOf(t, addressType); u.upserts["w0"] != version(t, desired["w0"]) {
			t.Fatalf("fast client update %d = %+v", gen, u)
		}
	}
	first := <-stuck
	eventually(t, "the slow client's pending nonce to be listed", func() bool {
		info, _ := ts.client("slow")
		return info.Types[addressType].PendingNonce != ""
	})
	if len(stuck) != 0 {
		t.Fatal("slow client got a second response before ACKing the first")
	}

	// Released, it ACKs and then gets one response with the latest state.
	slow.setHook(nil)
	release <- struct{}{}
	slow.nextOf(t, addressType) // the held response, recorded once accepted
	if first.upserts["w0"] == version(t, desired["w0"]) {
		return // the first push already carried the last generation
	}
	if u := slow.nextOf(t, addressType); u.upserts["w0"] != version(t, desired["w0"]) {
		t.Fatalf("slow client after release = %+v, want the latest w0", u)
	}
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1)
	ts.Update(addressType, desired)
	if u := slow.nextOf(t, addressType); len(u.upserts) != 1 || u.upserts["w1"] == "" {
		t.Fatalf("slow client update = %+v, want w1 only (no queued intermediate states)", u)
	}
}

func TestClientRejectionKeepsItsCacheAndIsCounted(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	desired := workloads(2)
	ts.Update(addressType, desired)
	ts.Update(authzType, nil)
	c := startClient(t, ts.addr, clientTLS, "node-1")
	c.waitSynced(t)
	c.nextOf(t, addressType)
	c.setHook(func(u update) error {
		if _, bad := u.upserts["w1"]; bad {
			return errors.New("w1 is not acceptable")
		}
		return nil
	})

	before := c.Resources(addressType)["w1"].GetVersion()
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 1)
	ts.Update(addressType, desired)
	eventually(t, "the NACK", func() bool { return ts.metric(t, "istiod_xds_nacks_total", addressType) == 1 })
	if got := c.Resources(addressType)["w1"].GetVersion(); got != before {
		t.Errorf("cached w1 version = %s after a NACK, want the old %s", got, before)
	}

	c.setHook(nil)
	desired = maps.Clone(desired)
	desired["w1"] = workload("w1", 2)
	ts.Update(addressType, desired)
	if u := c.nextOf(t, addressType); u.upserts["w1"] != version(t, desired["w1"]) {
		t.Fatalf("update = %+v, want w1's next version", u)
	}
}

func TestUnauthenticatedStreamsAreRejected(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ts.Update(addressType, workloads(1))
	for _, tc := range []struct{ name, token, want string }{
		{"a stream without a token is rejected", "", "no bearer token"},
		{"a stream with a bad token is rejected", "wrong", "token rejected"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := dialRaw(t, ts.addr, clientTLS, tc.token)
			_ = s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType})
			_, err := s.Recv()
			if status.Code(err) != codes.Unauthenticated || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Recv error = %v, want Unauthenticated saying %q", err, tc.want)
			}
		})
	}
	if n := len(ts.Clients()); n != 0 {
		t.Errorf("%d clients listed, want 0", n)
	}
}

func TestStateOfTheWorldIsUnimplemented(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ctx := metadata.AppendToOutgoingContext(t.Context(), "authorization", "Bearer "+testToken)
	sotw, err := discoveryv3.NewAggregatedDiscoveryServiceClient(dialConn(t, ts.addr, clientTLS)).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := sotw.Recv(); status.Code(err) != codes.Unimplemented {
		t.Fatalf("Recv error = %v, want Unimplemented", err)
	}
}

func TestCloseEndsStreams(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	ts.Update(addressType, workloads(1))
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType})
	s.recv() // not ACKed
	ts.Close()
	ts.Close()
	if _, err := s.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("Recv error = %v, want Unavailable", err)
	}
	if got := ts.metric(t, "istiod_xds_connected_clients", ""); got != 0 {
		t.Errorf("connected clients gauge = %v, want 0", got)
	}
}

func TestLargeStatesAreSplitAcrossResponses(t *testing.T) {
	serverTLS, clientTLS := testTLS(t)
	ts := startServer(t, "127.0.0.1:0", serverTLS)
	// 40 resources of 100 KiB: more than one response can carry.
	desired := make(map[string]proto.Message)
	for i := range 40 {
		name := fmt.Sprintf("big%d", i)
		desired[name] = &security.Authorization{Name: name, Namespace: strings.Repeat("x", 100<<10)}
	}
	ts.Update(authzType, desired)
	s := dialRaw(t, ts.addr, clientTLS, testToken)
	s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: authzType})
	got := map[string]string{}
	responses := 0
	for len(got) < 40 {
		resp := s.recv()
		responses++
		if size := proto.Size(resp); size > 4<<20 {
			t.Fatalf("response of %d bytes exceeds gRPC's default limit", size)
		}
		maps.Copy(got, names(resp))
		s.ack(resp)
	}
	if responses < 2 {
		t.Errorf("%d responses, want the set split", responses)
	}
}
