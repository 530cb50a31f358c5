package kubeletapi

import (
	"context"
	"fmt"
	"io"
	"net"
	"strconv"
	"sync"

	"github.com/containernetworking/plugins/pkg/ns"
)

// netnsForwarder dials ports on the pod's loopback from inside its network
// namespace.
type netnsForwarder struct {
	netns string
}

// PortForward copies between stream and 127.0.0.1:port in the pod's network
// namespace until either side closes.
func (f netnsForwarder) PortForward(ctx context.Context, _, _ string, port int32, stream io.ReadWriteCloser) error {
	defer stream.Close()
	conn, err := dialInNetNS(ctx, f.netns, net.JoinHostPort("127.0.0.1", strconv.Itoa(int(port))))
	if err != nil {
		return err
	}
	defer conn.Close()

	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		io.Copy(conn, stream)
		// The client is done sending: half-close so the server sees EOF.
		if tc, ok := conn.(*net.TCPConn); ok {
			tc.CloseWrite()
		}
	}()
	_, err = io.Copy(stream, conn)
	// The pod side closed: end the stream, which unblocks the copy above.
	stream.Close()
	conn.Close()
	wg.Wait()
	if err != nil {
		return fmt.Errorf("copying from pod port %d: %w", port, err)
	}
	return nil
}

// dialInNetNS dials addr from inside the network namespace at path. Only the
// socket's creation needs the namespace; ns.WithNetNSPath runs it on a locked
// OS thread and switches back.
func dialInNetNS(ctx context.Context, path, addr string) (net.Conn, error) {
	var conn net.Conn
	err := ns.WithNetNSPath(path, func(ns.NetNS) error {
		var d net.Dialer
		var err error
		conn, err = d.DialContext(ctx, "tcp4", addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("dialing %s in %s: %w", addr, path, err)
	}
	return conn, nil
}
