package zds

import (
	"errors"
	"log/slog"
	"net"
	"os"
	"testing"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// socketPair returns a connected SEQPACKET pair as the server and peer ends.
func socketPair(t testing.TB) (server *net.UnixConn, peer *os.File) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	sf := os.NewFile(uintptr(fds[0]), "server")
	defer sf.Close()
	fc, err := net.FileConn(sf)
	if err != nil {
		t.Fatal(err)
	}
	return fc.(*net.UnixConn), os.NewFile(uintptr(fds[1]), "peer")
}

func FuzzDecode(f *testing.F) {
	for _, m := range []proto.Message{
		&zdsapi.ZdsHello{Version: zdsapi.Version_V1},
		&zdsapi.ZdsHello{Version: 7},
		&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{}}},
		&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: "no such netns"}}},
		&zdsapi.WorkloadRequest{Payload: &zdsapi.WorkloadRequest_Del{Del: &zdsapi.DelWorkload{Uid: "u"}}},
	} {
		b, _ := proto.Marshal(m)
		f.Add(b)
	}
	f.Add([]byte("\xff\xff\xff\xff garbage"))
	f.Add([]byte{0x0a, 0xff, 0x01})

	f.Fuzz(func(t *testing.T, b []byte) {
		if h, err := decodeHello(b); err == nil {
			if h.GetVersion() != zdsapi.Version_V1 {
				t.Fatalf("accepted hello with version %v", h.GetVersion())
			}
		} else if !errors.Is(err, ErrProtocol) {
			t.Fatalf("hello error %v is not ErrProtocol", err)
		}
		ack, err := decodeAck(b)
		if err == nil {
			// An accepted ack re-encodes to one that decodes the same.
			again, _ := proto.Marshal(&zdsapi.WorkloadResponse{Payload: &zdsapi.WorkloadResponse_Ack{Ack: &zdsapi.Ack{Error: ack}}})
			if got, err := decodeAck(again); err != nil || got != ack {
				t.Fatalf("ack %q does not round-trip: %q, %v", ack, got, err)
			}
		} else if !errors.Is(err, ErrProtocol) {
			t.Fatalf("ack error %v is not ErrProtocol", err)
		}

		// The same bytes as a datagram on a real socket.
		if len(b) == 0 || len(b) > 64<<10 {
			return
		}
		uc, peer := socketPair(t)
		defer uc.Close()
		defer peer.Close()
		if _, err := peer.Write(b); err != nil {
			t.Skip(err)
		}
		c := &conn{uc: uc, log: slog.New(slog.DiscardHandler)}
		got, err := c.readDatagram()
		switch {
		case len(b) > maxMessageSize:
			if !errors.Is(err, ErrProtocol) {
				t.Fatalf("oversized datagram: %v, want ErrProtocol", err)
			}
		case err != nil || string(got) != string(b):
			t.Fatalf("datagram read back as %q, %v", got, err)
		}
	})
}
