package inpod

import (
	"errors"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// FuzzZDSRequest feeds arbitrary datagrams from the agent, without
// descriptors, through decoding and handling on a Manager with no pods: it
// must never panic, must answer a datagram that is not a request with a
// protocol violation, and must never serve a pod (an add needs a netns).
func FuzzZDSRequest(f *testing.F) {
	for _, req := range []*zdsapi.WorkloadRequest{
		{Payload: &zdsapi.WorkloadRequest_Add{Add: &zdsapi.AddWorkload{Uid: "u", WorkloadInfo: &zdsapi.WorkloadInfo{Name: "n", Namespace: "ns", ServiceAccount: "sa"}}}},
		{Payload: &zdsapi.WorkloadRequest_Keep{Keep: &zdsapi.KeepWorkload{Uid: "u"}}},
		{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: "u"}}},
		{Payload: &zdsapi.WorkloadRequest_SnapshotSent{SnapshotSent: &zdsapi.SnapshotSent{}}},
	} {
		b, err := proto.Marshal(req)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b, false, false)
	}
	f.Add([]byte{0xff, 0xff, 0xff, 0xff}, false, false)
	f.Add([]byte{0x98, 0x06, 0x01}, false, false)
	f.Add([]byte{}, true, false)
	f.Add([]byte{0x0a, 0x00}, false, true)

	f.Fuzz(func(t *testing.T, b []byte, truncated, ctruncated bool) {
		flags := 0
		if truncated {
			flags |= unix.MSG_TRUNC
		}
		if ctruncated {
			flags |= unix.MSG_CTRUNC
		}
		m := New(Config{})
		req, derr := decodeRequest(b, flags)
		if derr != nil {
			if !errors.Is(derr, ErrProtocol) {
				t.Fatalf("decode error %v does not wrap ErrProtocol", derr)
			}
			if req != nil {
				t.Fatalf("decode returned a request with error %v", derr)
			}
		} else if req.GetPayload() == nil {
			t.Fatal("decoded a request without payload")
		}
		snapshot := false
		herr := m.handle(1, &snapshot, &message{req: req, err: derr})
		if derr != nil && !errors.Is(herr, ErrProtocol) {
			t.Fatalf("handling an undecodable datagram: %v, want a protocol violation", herr)
		}
		if req.GetAdd() != nil && herr == nil {
			t.Fatal("an add without a netns descriptor was accepted")
		}
		if ws := m.Workloads(); len(ws) != 0 {
			t.Fatalf("serving %d pods after a datagram without descriptors", len(ws))
		}
	})
}
