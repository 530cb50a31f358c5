package standin

import (
	"encoding/json"
	"errors"
	"os"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"
)

func TestDecodeRequest(t *testing.T) {
	valid, _ := proto.Marshal(delReq("uid-1"))
	unknownOnly := []byte{0x3a, 0x01, 'x'} // field 7, bytes: not a payload we know
	for _, tc := range []struct {
		name    string
		b       []byte
		flags   int
		wantErr string
	}{
		{"a del decodes", valid, 0, ""},
		{"bytes that are not protobuf are a protocol error", []byte{0xff, 0xff, 0xff, 0xff}, 0, "decoding request"},
		{"a request with no known payload is a protocol error", unknownOnly, 0, "no known payload"},
		{"a truncated datagram is a protocol error", valid, unix.MSG_TRUNC, "longer than"},
		{"truncated descriptors are a protocol error", valid, unix.MSG_CTRUNC, "descriptors"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, err := decodeRequest(tc.b, tc.flags)
			if tc.wantErr == "" {
				if err != nil || req.GetDel().GetUid() != "uid-1" {
					t.Fatalf("got %v, %v", req, err)
				}
				return
			}
			if !errors.Is(err, ErrProtocol) || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("error %v, want ErrProtocol with %q", err, tc.wantErr)
			}
		})
	}
}

// The agent misbehaving is acked with an error and reported; the connection
// stays up and later requests are served. None of this needs privileges.
func TestStandInReportsProtocolErrorsAndCarriesOn(t *testing.T) {
	agent := newFakeAgent(t, "")
	s := startStandIn(t, agent.path)
	c := agent.accept(t)

	notNetns, err := os.Open(os.DevNull)
	if err != nil {
		t.Fatal(err)
	}
	defer notNetns.Close()
	fd := int(notNetns.Fd())

	for _, tc := range []struct {
		name    string
		send    func() string
		wantErr string
		counted bool // as a protocol error
	}{
		{"garbage is refused", func() string { c.sendRaw([]byte("\xff\xff garbage \x00")); return c.ack() }, "zds protocol violation", true},
		{"an add without a netns descriptor is refused", func() string { return c.request(addReq("uid-1", "demo", "a")) }, "carries 0 descriptors", true},
		{"an add with two descriptors is refused", func() string { return c.request(addReq("uid-1", "demo", "a"), fd, fd) }, "carries 2 descriptors", true},
		{"an add without uid is refused", func() string { return c.request(addReq("", "demo", "a"), fd) }, "without uid", true},
		{"a del with a descriptor is refused", func() string { return c.request(delReq("uid-1"), fd) }, "carries 1 descriptors", true},
		{"an add whose descriptor is not a netns fails", func() string { return c.request(addReq("uid-1", "demo", "a"), fd) }, "not a namespace", false},
		{"a keep of an unknown workload fails", func() string { return c.request(keepReq("uid-nope")) }, "unknown workload", false},
		{"a del of an unknown workload succeeds", func() string { return c.request(delReq("uid-nope")) }, "", false},
		{"the snapshot is acked", func() string { return c.request(snapshotReq()) }, "", false},
		{"a second snapshot is refused", func() string { return c.request(snapshotReq()) }, "second snapshot_sent", true},
		{"a keep after the snapshot is refused", func() string { return c.request(keepReq("uid-1")) }, "after snapshot_sent", true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := s.protocolErrors.Load()
			got := tc.send()
			if tc.wantErr == "" && got != "" || !strings.Contains(got, tc.wantErr) {
				t.Fatalf("ack error %q, want %q", got, tc.wantErr)
			}
			if n := s.protocolErrors.Load() - before; (n == 1) != tc.counted {
				t.Errorf("protocol errors counted: %d", n)
			}
		})
	}

	code, b := s.getAdmin(t, "/zds")
	var st ZDSStatus
	if err := json.Unmarshal(b, &st); err != nil || code != 200 {
		t.Fatalf("/zds %d %s: %v", code, b, err)
	}
	if !st.Connected || !st.SnapshotReceived || st.ProtocolErrors != 7 || st.AcksOK != 2 || st.AcksError != 9 ||
		!strings.Contains(st.LastProtocolError, "after snapshot_sent") {
		t.Errorf("/zds = %+v", st)
	}
	if code, _ := s.getAdmin(t, "/healthz/ready"); code != 200 {
		t.Errorf("ready: %d", code)
	}
}

// A stand-in started before the agent keeps trying, and reports why.
func TestStandInWaitsForTheAgent(t *testing.T) {
	path := t.TempDir() + "/ztunnel.sock"
	s := startStandIn(t, path)
	code, b := s.getAdmin(t, "/healthz/ready")
	if code != 503 || !strings.Contains(string(b), "not connected") {
		t.Errorf("ready before the agent: %d %s", code, b)
	}
	agent := newFakeAgent(t, path)
	c := agent.accept(t)
	mustAck(t, "snapshot", c.request(snapshotReq()))
	waitFor(t, "ready", s.Ready)
	// SOCK_SEQPACKET hello, once per connection.
	if st := s.ZDS(); st.Connects != 1 {
		t.Errorf("connects = %d", st.Connects)
	}
}
