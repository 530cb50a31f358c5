package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/portforward"
	"k8s.io/client-go/transport/spdy"
	streamhttp "k8s.io/streaming/pkg/httpstream"
)

// remoteErrorWait bounds how long a connection whose data stream ended
// waits for the kubelet's error stream, which says why (say, nothing
// listens on the port).
const remoteErrorWait = 2 * time.Second

// dialPortForward opens a port-forward connection to the pods/portforward
// URL u as kubectl does: SPDY tunneled over a websocket, falling back to
// SPDY when the API server cannot upgrade to a websocket.
func dialPortForward(ctx context.Context, rc *rest.Config, u *url.URL) (streamhttp.Connection, error) {
	transport, upgrader, err := spdy.RoundTripperFor(rc)
	if err != nil {
		return nil, err
	}
	dialer := spdy.NewDialerForStreaming(upgrader, &http.Client{Transport: transport}, http.MethodPost, u)
	tunneling, err := portforward.NewSPDYOverWebsocketDialerForStreaming(u, rc)
	if err != nil {
		return nil, err
	}
	dialer = portforward.NewFallbackDialerForStreaming(tunneling, dialer, func(err error) bool {
		return streamhttp.IsUpgradeFailure(err) || streamhttp.IsHTTPSProxyError(err)
	})

	// Dial takes no context; give up on it when ctx ends and close what it
	// may still return.
	type dialed struct {
		conn streamhttp.Connection
		err  error
	}
	ch := make(chan dialed, 1)
	go func() {
		conn, _, err := dialer.Dial(portforward.PortForwardProtocolV1Name)
		ch <- dialed{conn, err}
	}()
	select {
	case d := <-ch:
		return d.conn, d.err
	case <-ctx.Done():
		go func() {
			if d := <-ch; d.conn != nil {
				d.conn.Close()
			}
		}()
		return nil, ctx.Err()
	}
}

// portForward turns a port-forward connection into net.Conns to one port
// of the pod: each is a pair of streams (error and data) with its own
// request ID, as in the portforward.k8s.io protocol. Unlike client-go's
// PortForwarder it needs no local listener, and the kubelet's reason for a
// failed forward comes back as the connection's error.
type portForward struct {
	conn   streamhttp.Connection
	port   int
	nextID atomic.Int64
}

// dial opens a connection to the pod's port; it is an http.Transport's
// DialContext, so network and address (the URL's) are ignored.
func (f *portForward) dial(ctx context.Context, _, _ string) (net.Conn, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	h := http.Header{}
	h.Set(corev1.StreamType, corev1.StreamTypeError)
	h.Set(corev1.PortHeader, strconv.Itoa(f.port))
	h.Set(corev1.PortForwardRequestIDHeader, strconv.FormatInt(f.nextID.Add(1), 10))
	errStream, err := f.conn.CreateStream(h)
	if err != nil {
		return nil, fmt.Errorf("creating the error stream: %w", err)
	}
	// Only the kubelet writes to the error stream.
	errStream.Close()
	h.Set(corev1.StreamType, corev1.StreamTypeData)
	data, err := f.conn.CreateStream(h)
	if err != nil {
		f.conn.RemoveStreams(errStream)
		return nil, fmt.Errorf("creating the data stream: %w", err)
	}
	c := &streamConn{conn: f.conn, data: data, errStream: errStream, remoteDone: make(chan struct{}), port: f.port}
	go c.readRemoteError()
	return c, nil
}

// streamConn is one forwarded connection.
type streamConn struct {
	conn            streamhttp.Connection
	data, errStream streamhttp.Stream
	port            int

	// remoteErr is what the kubelet wrote on the error stream; it is set
	// before remoteDone is closed.
	remoteErr  error
	remoteDone chan struct{}
	closeOnce  sync.Once
}

func (c *streamConn) readRemoteError() {
	defer close(c.remoteDone)
	msg, err := io.ReadAll(c.errStream)
	switch {
	case len(msg) > 0:
		c.remoteErr = fmt.Errorf("port-forward: %s", strings.TrimSpace(string(msg)))
	case err != nil:
		c.remoteErr = fmt.Errorf("port-forward: reading the error stream: %w", err)
	}
}

// Read returns the kubelet's error, when it sent one, in place of the end
// of the data stream.
func (c *streamConn) Read(p []byte) (int, error) {
	n, err := c.data.Read(p)
	if err != nil {
		select {
		case <-c.remoteDone:
			if c.remoteErr != nil {
				return n, c.remoteErr
			}
		case <-time.After(remoteErrorWait):
		}
	}
	return n, err
}

func (c *streamConn) Write(p []byte) (int, error) { return c.data.Write(p) }

// Close resets the data stream (the kubelet then ends the forward) and
// drops both streams from the connection.
func (c *streamConn) Close() error {
	var err error
	c.closeOnce.Do(func() {
		err = c.data.Reset()
		c.conn.RemoveStreams(c.data, c.errStream)
	})
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	return err
}

func (c *streamConn) LocalAddr() net.Addr  { return forwardAddr("local") }
func (c *streamConn) RemoteAddr() net.Addr { return forwardAddr("pod:" + strconv.Itoa(c.port)) }

// Deadlines are not supported by streams; requests are bounded by their
// context, whose end closes the connection.
func (c *streamConn) SetDeadline(time.Time) error      { return nil }
func (c *streamConn) SetReadDeadline(time.Time) error  { return nil }
func (c *streamConn) SetWriteDeadline(time.Time) error { return nil }

// forwardAddr is an end of a forwarded connection.
type forwardAddr string

func (a forwardAddr) Network() string { return "portforward" }
func (a forwardAddr) String() string  { return string(a) }
