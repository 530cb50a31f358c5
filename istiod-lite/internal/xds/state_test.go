package xds

import (
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/protobuf/proto"

	"github.com/ambient-mesh/ambient/istiod-lite/internal/authn"
)

func TestVersionsDependOnlyOnContent(t *testing.T) {
	a, b := workload("w0", 1), workload("w0", 1)
	if version(t, a) != version(t, b) {
		t.Error("equal messages have different versions")
	}
	if version(t, a) == version(t, workload("w0", 2)) {
		t.Error("different messages have the same version")
	}
}

func TestChangeLogIsTrimmedAndFallsBackToAFullComparison(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	var st *typeState
	set := map[string]proto.Message{"w0": workload("w0", 0)}
	st = next(st, addressType, set, time.Now(), log)
	if next(st, addressType, set, time.Now(), log) != nil {
		t.Fatal("an unchanged set made a new revision")
	}
	for gen := 1; gen <= 2*minLogNames; gen++ {
		set = map[string]proto.Message{"w0": workload("w0", gen)}
		st = next(st, addressType, set, time.Now(), log)
	}
	if st.logNames > minLogNames {
		t.Errorf("log holds %d names, want at most %d", st.logNames, minLogNames)
	}
	if _, ok := st.since(1); ok {
		t.Error("the log still reaches revision 1")
	}
	if changes, ok := st.since(st.rev - 1); !ok || len(changes) != 1 {
		t.Errorf("since(rev-1) = %v, %v; want one change", changes, ok)
	}
}

func TestAClientFarBehindTheLogGetsTheExactDifference(t *testing.T) {
	s := NewServer(Options{Log: slog.New(slog.DiscardHandler)})
	set := workloads(10)
	s.Update(addressType, set)
	var sent []*discoveryv3.DeltaDiscoveryResponse
	c := s.newConn(authn.Identity{}, func(r *discoveryv3.DeltaDiscoveryResponse) error {
		sent = append(sent, r)
		return nil
	})
	if err := c.handle(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType}); err != nil {
		t.Fatal(err)
	}
	first := sent[0]

	// Far more changes than the log keeps, all while un-ACKed.
	for gen := 1; gen <= 2*minLogNames; gen++ {
		set = maps.Clone(set)
		name := fmt.Sprintf("w%d", gen%3)
		set[name] = workload(name, gen)
		s.Update(addressType, set)
	}
	delete(set, "w9")
	s.Update(addressType, set)
	if err := c.pushAll(); err != nil || len(sent) != 1 {
		t.Fatalf("pushed %d responses while un-ACKed (err %v)", len(sent), err)
	}
	if err := c.handle(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: addressType, ResponseNonce: first.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	resp := sent[len(sent)-1]
	got := names(resp)
	want := map[string]string{}
	for _, n := range []string{"w0", "w1", "w2"} {
		want[n] = version(t, set[n])
	}
	if !maps.Equal(got, want) || !slices.Equal(resp.GetRemovedResources(), []string{"w9"}) {
		t.Fatalf("response = %v removals %v, want %v and w9 removed", got, resp.GetRemovedResources(), want)
	}
}
