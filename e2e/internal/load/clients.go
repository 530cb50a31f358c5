package load

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/ambient-mesh/ambient/e2e/internal/echo"
	"github.com/ambient-mesh/ambient/e2e/internal/echopb"
)

// client sends requests over one connection, redialing when it breaks.
type client interface {
	// do sends one request and returns the reply body.
	do(ctx context.Context) ([]byte, error)
	close()
}

// newClients returns one client per connection of cfg. The http, h2c and
// tcp clients count the connections they open in dials.
func newClients(cfg *Config, dials *atomic.Int64) (_ []client, err error) {
	clients := make([]client, 0, cfg.Connections)
	defer func() {
		if err != nil {
			for _, c := range clients {
				c.close()
			}
		}
	}()
	header, err := cfg.header()
	if err != nil {
		return nil, err
	}
	for range cfg.Connections {
		var c client
		switch cfg.Mode {
		case ModeHTTP, ModeH2C:
			c, err = newHTTPClient(cfg, header, dials)
		case ModeGRPC:
			c, err = newGRPCClient(cfg, header)
		case ModeTCP:
			c = newTCPClient(cfg, dials)
		default:
			err = fmt.Errorf("unknown mode %q", cfg.Mode)
		}
		if err != nil {
			return nil, err
		}
		clients = append(clients, c)
	}
	return clients, nil
}

// payload returns n bytes of a pattern that shifts with seq, so an echo of an
// earlier request does not pass for this one.
func payload(buf []byte, seq uint64) []byte {
	for i := range buf {
		buf[i] = byte(uint64(i) + seq)
	}
	return buf
}

// httpClient sends HTTP/1.1 or h2c requests over a transport that keeps at
// most one connection.
type httpClient struct {
	client *http.Client
	url    string
	method string
	header http.Header
	host   string
	body   []byte
	size   int
}

func newHTTPClient(cfg *Config, header http.Header, dials *atomic.Int64) (*httpClient, error) {
	target := cfg.Target
	if !strings.Contains(target, "://") {
		target = "http://" + target
	}
	u, err := url.Parse(target)
	if err != nil {
		return nil, fmt.Errorf("parsing target: %w", err)
	}
	if u.Scheme != "http" {
		return nil, fmt.Errorf("target scheme %q: only http is supported", u.Scheme)
	}
	c := &httpClient{method: http.MethodGet, header: header, host: cfg.Host, size: cfg.Size}
	if cfg.Size > 0 {
		// Ask the echo server for a reply as large as the request.
		q := u.Query()
		q.Set("size", strconv.Itoa(cfg.Size))
		u.RawQuery = q.Encode()
		c.method = http.MethodPost
		c.body = payload(make([]byte, cfg.Size), 0)
	}
	c.url = u.String()

	var dialer net.Dialer
	tr := &http.Transport{
		// No Proxy: a proxy from the environment would hide the mesh.
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			c, err := dialer.DialContext(ctx, network, addr)
			if err == nil {
				dials.Add(1)
			}
			return c, err
		},
		MaxIdleConnsPerHost: 1,
		MaxConnsPerHost:     1,
		DisableCompression:  true,
	}
	if cfg.Mode == ModeH2C {
		tr.Protocols = new(http.Protocols)
		tr.Protocols.SetUnencryptedHTTP2(true)
	}
	c.client = &http.Client{
		Transport: tr,
		// Report redirects as they are instead of following them.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse },
	}
	return c, nil
}

func (c *httpClient) do(ctx context.Context) ([]byte, error) {
	var body io.Reader
	if c.body != nil {
		body = bytes.NewReader(c.body)
	}
	req, err := http.NewRequestWithContext(ctx, c.method, c.url, body)
	if err != nil {
		return nil, err
	}
	req.Header = c.header.Clone()
	if c.host != "" {
		req.Host = c.host
	}
	resp, err := c.client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode >= 400 {
		return data, &StatusError{Code: resp.StatusCode}
	}
	if c.size > 0 && len(data) != c.size {
		return data, fmt.Errorf("%w: %d bytes, asked for %d", ErrSizeMismatch, len(data), c.size)
	}
	return data, nil
}

func (c *httpClient) close() { c.client.CloseIdleConnections() }

// grpcEnvelope is room for the fields around a payload of MaxSize bytes.
const grpcEnvelope = 64 << 10

// grpcClient calls Echo over one gRPC channel, which keeps one connection.
type grpcClient struct {
	conn     *grpc.ClientConn
	echo     echopb.EchoServiceClient
	md       metadata.MD
	req      *echopb.EchoRequest
	wantBody bool
}

func newGRPCClient(cfg *Config, header http.Header) (*grpcClient, error) {
	opts := []grpc.DialOption{
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(
			grpc.MaxCallRecvMsgSize(MaxSize+grpcEnvelope),
			grpc.MaxCallSendMsgSize(MaxSize+grpcEnvelope),
		),
	}
	if cfg.Host != "" {
		opts = append(opts, grpc.WithAuthority(cfg.Host))
	}
	conn, err := grpc.NewClient(cfg.Target, opts...)
	if err != nil {
		return nil, fmt.Errorf("creating gRPC client: %w", err)
	}
	md := metadata.MD{}
	for k, v := range header {
		md.Append(k, v...)
	}
	req := &echopb.EchoRequest{ResponseSize: int64(cfg.Size)}
	if cfg.Size > 0 {
		req.Payload = payload(make([]byte, cfg.Size), 0)
	}
	return &grpcClient{
		conn:     conn,
		echo:     echopb.NewEchoServiceClient(conn),
		md:       md,
		req:      req,
		wantBody: cfg.Bodies != nil,
	}, nil
}

func (c *grpcClient) do(ctx context.Context) ([]byte, error) {
	if len(c.md) > 0 {
		ctx = metadata.NewOutgoingContext(ctx, c.md)
	}
	resp, err := c.echo.Echo(ctx, c.req)
	if err != nil {
		return nil, err
	}
	if got, want := int64(len(resp.GetPayload())), c.req.GetResponseSize(); got != want {
		return nil, fmt.Errorf("%w: %d bytes, asked for %d", ErrSizeMismatch, got, want)
	}
	if !c.wantBody {
		return nil, nil
	}
	return json.Marshal(echo.ReplyFromProto(resp))
}

func (c *grpcClient) close() { _ = c.conn.Close() }

// tcpClient writes a payload and reads it back per request. Only one worker
// uses a tcpClient, so its fields need no lock.
type tcpClient struct {
	addr   string
	dialer net.Dialer
	conn   net.Conn // nil until dialed, and after an error
	dials  *atomic.Int64
	sent   []byte
	got    []byte
	seq    uint64
}

func newTCPClient(cfg *Config, dials *atomic.Int64) *tcpClient {
	size := cfg.Size
	if size == 0 {
		size = DefaultTCPSize
	}
	return &tcpClient{addr: cfg.Target, sent: make([]byte, size), got: make([]byte, size), dials: dials}
}

func (c *tcpClient) do(ctx context.Context) (_ []byte, err error) {
	if c.conn == nil {
		conn, err := c.dialer.DialContext(ctx, "tcp", c.addr)
		if err != nil {
			return nil, err
		}
		c.dials.Add(1)
		c.conn = conn
	}
	defer func() {
		if err != nil {
			c.close()
		}
	}()
	conn := c.conn
	deadline, ok := ctx.Deadline()
	if !ok {
		deadline = time.Time{}
	}
	_ = conn.SetDeadline(deadline)
	// A context done before its deadline (an interrupted run) unblocks I/O.
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()

	c.seq++
	sent := payload(c.sent, c.seq)
	// Write while reading: a payload larger than the socket buffers would
	// otherwise block both ends.
	werr := make(chan error, 1)
	go func() {
		_, err := conn.Write(sent)
		werr <- err
	}()
	_, rerr := io.ReadFull(conn, c.got)
	if rerr != nil {
		_ = conn.Close() // unblocks the writer
	}
	if err := <-werr; err != nil && rerr == nil {
		return nil, err
	}
	if rerr != nil {
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, rerr
	}
	if !bytes.Equal(sent, c.got) {
		return nil, ErrMismatch
	}
	return c.got, nil
}

func (c *tcpClient) close() {
	if c.conn != nil {
		_ = c.conn.Close()
		c.conn = nil
	}
}
