package zds

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"google.golang.org/protobuf/proto"

	zdsapi "github.com/ambient-mesh/ambient/api/zds"
)

// maxMessageSize bounds one datagram read from ztunnel. Hellos and acks are
// tens of bytes; anything longer than this is a misbehaving peer.
const maxMessageSize = 16 << 10

// oobSize leaves room for a few descriptors a misbehaving peer might attach,
// so they can be received and closed instead of leaking or truncating.
var oobSize = unix.CmsgSpace(16 * 4)

// ErrProtocol marks a peer that broke the protocol: bytes that are not the
// expected message, an unexpected message type, an unsupported version, or
// a message that is too long. The connection is closed.
var ErrProtocol = errors.New("zds protocol violation")

func protocolErrorf(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// decodeHello parses the first datagram a ztunnel sends.
func decodeHello(b []byte) (*zdsapi.ZdsHello, error) {
	var h zdsapi.ZdsHello
	if err := proto.Unmarshal(b, &h); err != nil {
		return nil, protocolErrorf("decoding hello: %v", err)
	}
	if h.GetVersion() != zdsapi.Version_V1 {
		return nil, protocolErrorf("unsupported hello version %v (want %v)", h.GetVersion(), zdsapi.Version_V1)
	}
	return &h, nil
}

// decodeAck parses a datagram ztunnel sends after the hello: it must be a
// WorkloadResponse carrying an Ack. It returns the ack's error text, empty
// when the request succeeded.
func decodeAck(b []byte) (string, error) {
	var r zdsapi.WorkloadResponse
	if err := proto.Unmarshal(b, &r); err != nil {
		return "", protocolErrorf("decoding response: %v", err)
	}
	ack := r.GetAck()
	if ack == nil {
		return "", protocolErrorf("response carries no ack")
	}
	return ack.GetError(), nil
}

// closeRights closes any file descriptors carried in the control messages
// of a received datagram; ztunnel has no reason to send any.
func closeRights(oob []byte) int {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return 0
	}
	n := 0
	for i := range msgs {
		fds, err := unix.ParseUnixRights(&msgs[i])
		if err != nil {
			continue
		}
		for _, fd := range fds {
			unix.Close(fd)
			n++
		}
	}
	return n
}

// dupFile duplicates f's descriptor (close-on-exec) so the copy can be
// owned and closed independently of f.
func dupFile(f *os.File) (*os.File, error) {
	rc, err := f.SyscallConn()
	if err != nil {
		return nil, err
	}
	var nfd int
	var dupErr error
	if err := rc.Control(func(fd uintptr) {
		nfd, dupErr = unix.FcntlInt(fd, unix.F_DUPFD_CLOEXEC, 0)
	}); err != nil {
		return nil, err
	}
	if dupErr != nil {
		return nil, dupErr
	}
	return os.NewFile(uintptr(nfd), f.Name()), nil
}
