package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"strconv"
	"testing"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// rawH2 is an HTTP/2 client that writes frames to a test server directly,
// for what the Pool never sends.
type rawH2 struct {
	t   testing.TB
	c   net.Conn
	fr  *http2.Framer
	buf bytes.Buffer
	enc *hpack.Encoder
}

func dialRawH2(t testing.TB, e *testEnv, settings ...http2.Setting) *rawH2 {
	t.Helper()
	conf := e.clientTLS.Clone()
	conf.NextProtos = []string{alpnH2}
	c, err := tls.Dial("tcp", e.srvAddr.String(), conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	h := &rawH2{t: t, c: c, fr: http2.NewFramer(c, c)}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(defaultHeaderTable, nil)
	h.enc = hpack.NewEncoder(&h.buf)
	if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	h.check(h.fr.WriteSettings(settings...))
	return h
}

func (h *rawH2) check(err error) {
	h.t.Helper()
	if err != nil {
		h.t.Fatal(err)
	}
}

// headers sends a header block of name, value pairs on stream id.
func (h *rawH2) headers(id uint32, end bool, kv ...string) {
	h.t.Helper()
	h.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		h.check(h.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]}))
	}
	h.check(h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.buf.Bytes(), EndStream: end, EndHeaders: true}))
}

// connect opens stream id as a CONNECT to authority and waits for 200.
func (h *rawH2) connect(id uint32, authority string) {
	h.t.Helper()
	h.headers(id, false, ":method", "CONNECT", ":authority", authority)
	h.expectStatus(id, "200")
}

func (h *rawH2) expectStatus(id uint32, status string) {
	h.t.Helper()
	f := h.expect("response headers of stream "+strconv.Itoa(int(id)), func(f http2.Frame) bool {
		mh, ok := f.(*http2.MetaHeadersFrame)
		return ok && mh.StreamID == id
	}).(*http2.MetaHeadersFrame)
	if got := f.PseudoValue("status"); got != status {
		h.t.Fatalf("stream %d answered %s, want %s", id, got, status)
	}
}

// expect reads frames until match accepts one.
func (h *rawH2) expect(what string, match func(http2.Frame) bool) http2.Frame {
	h.t.Helper()
	h.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		f, err := h.fr.ReadFrame()
		if err != nil {
			h.t.Fatalf("waiting for %s: %v", what, err)
		}
		if match(f) {
			return f
		}
	}
}

func (h *rawH2) expectReset(id uint32, code http2.ErrCode) {
	h.t.Helper()
	f := h.expect("RST_STREAM", func(f http2.Frame) bool {
		rst, ok := f.(*http2.RSTStreamFrame)
		return ok && rst.StreamID == id
	}).(*http2.RSTStreamFrame)
	if f.ErrCode != code {
		h.t.Fatalf("stream %d reset with %v, want %v", id, f.ErrCode, code)
	}
}

// data collects the DATA of stream id until want bytes arrived.
func (h *rawH2) data(id uint32, want int) []byte {
	h.t.Helper()
	var got []byte
	for len(got) < want {
		f := h.expect("DATA", func(f http2.Frame) bool {
			d, ok := f.(*http2.DataFrame)
			return ok && d.StreamID == id
		}).(*http2.DataFrame)
		got = append(got, f.Data()...)
	}
	return got
}

// quiet checks that no DATA arrives for a while: flow control holds it.
func (h *rawH2) quiet(what string) {
	h.t.Helper()
	h.c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
	for {
		f, err := h.fr.ReadFrame()
		if errors.Is(err, os.ErrDeadlineExceeded) {
			return
		}
		if err != nil {
			h.t.Fatal(err)
		}
		if d, ok := f.(*http2.DataFrame); ok && len(d.Data()) > 0 {
			h.t.Fatalf("%s: %d more bytes of DATA arrived", what, len(d.Data()))
		}
	}
}

// source is an upstream that writes 1 MiB to every connection and then
// waits for its peer.
func source(t testing.TB) string {
	return startUpstream(t, func(c net.Conn) {
		c.Write(make([]byte, 1<<20))
		io.Copy(io.Discard, c)
	}).String()
}

func TestServerAnswersPingAndSettings(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.check(h.fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8}))
	f := h.expect("PING ack", func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	if f.(*http2.PingFrame).Data != [8]byte{1, 2, 3, 4, 5, 6, 7, 8} {
		t.Fatalf("PING ack carries %v", f.(*http2.PingFrame).Data)
	}
	h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}))
	h.expect("SETTINGS ack", func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && s.IsAck() })
	// The encoder follows the smaller table: responses still decode.
	h.connect(1, e.echoAddr.String())
}

func TestServerSendsNoMoreThanTheStreamWindow(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1000})
	h.connect(1, source(t))
	if got := len(h.data(1, 1000)); got != 1000 {
		t.Fatalf("got %d bytes, want the window's 1000", got)
	}
	h.quiet("with the stream window closed")
	h.check(h.fr.WriteWindowUpdate(1, 3000))
	if got := len(h.data(1, 3000)); got != 3000 {
		t.Fatalf("got %d bytes after WINDOW_UPDATE, want 3000", got)
	}
	h.quiet("with the stream window closed again")
	// A larger initial window opens open streams too (RFC 9113 §6.9.2).
	h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 2000}))
	if got := len(h.data(1, 1000)); got != 1000 {
		t.Fatalf("got %d bytes after SETTINGS, want 1000", got)
	}
}

func TestServerSendsNoMoreThanTheConnectionWindow(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	h.connect(1, source(t)) // its window is 1 MiB, the connection's 65,535
	got := 0
	for got < initialWindow {
		d := h.expect("DATA", func(f http2.Frame) bool { _, ok := f.(*http2.DataFrame); return ok }).(*http2.DataFrame)
		got += len(d.Data())
	}
	if got != initialWindow {
		t.Fatalf("got %d bytes, want the connection window's %d", got, initialWindow)
	}
	h.quiet("with the connection window closed")
	h.check(h.fr.WriteWindowUpdate(0, 100))
	if got := len(h.data(1, 100)); got != 100 {
		t.Fatalf("got %d bytes after a connection WINDOW_UPDATE of 100", got)
	}
	h.quiet("with the connection window closed again")
}

func TestServerRefusesStreamsBeyondItsLimit(t *testing.T) {
	e := newTestEnv(t, envOptions{server: ServerOptions{MaxConcurrentStreams: 2}})
	h := dialRawH2(t, e)
	h.connect(1, e.echoAddr.String())
	h.connect(3, e.echoAddr.String())
	h.headers(5, false, ":method", "CONNECT", ":authority", e.echoAddr.String())
	h.expectReset(5, http2.ErrCodeRefusedStream)
	// A stream that ends frees its slot.
	h.check(h.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	for id := uint32(7); ; id += 2 {
		h.headers(id, false, ":method", "CONNECT", ":authority", e.echoAddr.String())
		f := h.expect("an answer", func(f http2.Frame) bool {
			switch f := f.(type) {
			case *http2.MetaHeadersFrame:
				return f.StreamID == id
			case *http2.RSTStreamFrame:
				return f.StreamID == id
			}
			return false
		})
		if mh, ok := f.(*http2.MetaHeadersFrame); ok {
			if mh.PseudoValue("status") != "200" {
				t.Fatalf("stream %d answered %s", id, mh.PseudoValue("status"))
			}
			return
		}
		if id > 1001 {
			t.Fatal("the reset stream's slot was never freed")
		}
		time.Sleep(5 * time.Millisecond)
	}
}

func TestShutdownSendsGoAwayAndRefusesNewStreams(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.connect(1, e.echoAddr.String())
	done := make(chan error, 1)
	go func() { done <- e.srv.Shutdown(context.Background()) }()
	ga := h.expect("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if ga.LastStreamID != 1 || ga.ErrCode != http2.ErrCodeNo {
		t.Fatalf("GOAWAY last stream %d code %v, want 1 NO_ERROR", ga.LastStreamID, ga.ErrCode)
	}
	h.headers(3, false, ":method", "CONNECT", ":authority", e.echoAddr.String())
	h.expectReset(3, http2.ErrCodeRefusedStream)
	// The open stream still flows, then ends both ways.
	h.check(h.fr.WriteData(1, true, []byte("bye")))
	if got := string(h.data(1, 3)); got != "bye" {
		t.Fatalf("echo %q, want bye", got)
	}
	h.expect("END_STREAM", func(f http2.Frame) bool { d, ok := f.(*http2.DataFrame); return ok && d.StreamEnded() })
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Shutdown: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Shutdown did not return after the last stream ended")
	}
}

func TestProtocolViolationsEndTheConnectionWithGoAway(t *testing.T) {
	tests := []struct {
		name   string
		server ServerOptions
		send   func(h *rawH2, e *testEnv)
		want   http2.ErrCode
	}{
		{"DATA on stream 0 is a protocol error", ServerOptions{},
			func(h *rawH2, _ *testEnv) { h.check(h.fr.WriteRawFrame(http2.FrameData, 0, 0, []byte("x"))) }, http2.ErrCodeProtocol},
		{"a request on an even stream is a protocol error", ServerOptions{},
			func(h *rawH2, e *testEnv) {
				h.headers(2, false, ":method", "CONNECT", ":authority", e.echoAddr.String())
			}, http2.ErrCodeProtocol},
		{"DATA on a stream never opened is a protocol error", ServerOptions{},
			func(h *rawH2, _ *testEnv) { h.check(h.fr.WriteData(5, false, []byte("x"))) }, http2.ErrCodeProtocol},
		{"a reused stream id is a protocol error", ServerOptions{},
			func(h *rawH2, e *testEnv) {
				h.connect(3, e.echoAddr.String())
				h.headers(1, false, ":method", "CONNECT", ":authority", e.echoAddr.String())
			}, http2.ErrCodeProtocol},
		{"a connection window beyond 2^31-1 is a flow-control error", ServerOptions{},
			func(h *rawH2, _ *testEnv) { h.check(h.fr.WriteWindowUpdate(0, maxWindow)) }, http2.ErrCodeFlowControl},
		{"an initial window beyond 2^31-1 is a flow-control error", ServerOptions{},
			func(h *rawH2, _ *testEnv) {
				h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31}))
			}, http2.ErrCodeFlowControl},
		{"DATA beyond the connection window is a flow-control error", ServerOptions{StreamWindow: 1 << 20, ConnWindow: initialWindow},
			func(h *rawH2, _ *testEnv) {
				h.connect(1, "10.0.0.1:1") // stuckHandler's
				for range 5 {
					h.fr.WriteData(1, false, make([]byte, 16<<10)) // the server may hang up first
				}
			}, http2.ErrCodeFlowControl},
		{"a frame larger than announced is a frame-size error", ServerOptions{},
			func(h *rawH2, _ *testEnv) {
				// The server may hang up before it has all of it.
				h.fr.WriteRawFrame(http2.FrameData, 0, 1, make([]byte, maxReadFrame+1))
			}, http2.ErrCodeFrameSize},
		{"PUSH_PROMISE from a client is a protocol error", ServerOptions{},
			func(h *rawH2, e *testEnv) {
				h.connect(1, e.echoAddr.String())
				h.check(h.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: []byte{0x82}, EndHeaders: true}))
			}, http2.ErrCodeProtocol},
		{"CONTINUATION without HEADERS is a protocol error", ServerOptions{},
			func(h *rawH2, _ *testEnv) { h.check(h.fr.WriteContinuation(1, true, []byte{0x82})) }, http2.ErrCodeProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := newTestEnv(t, envOptions{server: tt.server, handler: stuckHandler(t)})
			h := dialRawH2(t, e)
			tt.send(h, e)
			ga := h.expect("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
			if ga.ErrCode != tt.want {
				t.Fatalf("GOAWAY code %v, want %v", ga.ErrCode, tt.want)
			}
			h.c.SetReadDeadline(time.Now().Add(10 * time.Second))
			for {
				if _, err := h.fr.ReadFrame(); err != nil {
					break // the server closed the connection
				}
			}
		})
	}
}

func TestMalformedRequestsAreResetAndTheConnectionLives(t *testing.T) {
	e := newTestEnv(t, envOptions{server: ServerOptions{StreamWindow: initialWindow}, handler: stuckHandler(t)})
	const stuck = "10.0.0.1:1" // stuckHandler's: flow control shows
	block := make(chan struct{})
	t.Cleanup(func() { close(block) })
	idle := startUpstream(t, func(net.Conn) { <-block }).String() // can be half-closed
	h := dialRawH2(t, e, http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	a := e.echoAddr.String()
	tests := []struct {
		name string
		send func(id uint32)
		want http2.ErrCode
	}{
		{"a CONNECT with a path is malformed",
			func(id uint32) { h.headers(id, false, ":method", "CONNECT", ":authority", a, ":path", "/") }, http2.ErrCodeProtocol},
		{"a CONNECT without authority is malformed",
			func(id uint32) { h.headers(id, false, ":method", "CONNECT") }, http2.ErrCodeProtocol},
		{"a request without method is malformed",
			func(id uint32) { h.headers(id, false, ":authority", a) }, http2.ErrCodeProtocol},
		{"an extended CONNECT is not offered",
			func(id uint32) {
				h.headers(id, false, ":method", "CONNECT", ":protocol", "websocket", ":scheme", "https", ":path", "/", ":authority", a)
			}, http2.ErrCodeProtocol},
		{"a connection-specific header is malformed",
			func(id uint32) { h.headers(id, false, ":method", "CONNECT", ":authority", a, "connection", "close") }, http2.ErrCodeProtocol},
		{"an unknown pseudo-header is malformed",
			func(id uint32) { h.headers(id, false, ":method", "CONNECT", ":authority", a, ":foo", "bar") }, http2.ErrCodeProtocol},
		{"trailers that do not end the stream are malformed",
			func(id uint32) {
				h.connect(id, a)
				h.headers(id, false, "x-trailer", "1")
			}, http2.ErrCodeProtocol},
		{"DATA after the end of the request is a stream-closed error",
			func(id uint32) {
				h.connect(id, idle)
				h.check(h.fr.WriteData(id, true, nil))
				h.check(h.fr.WriteData(id, false, []byte("late")))
			}, http2.ErrCodeStreamClosed},
		{"DATA beyond the stream window is a flow-control error",
			func(id uint32) {
				h.connect(id, stuck)
				for range 5 {
					h.check(h.fr.WriteData(id, false, make([]byte, 16<<10)))
				}
			}, http2.ErrCodeFlowControl},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h.t = t
			id := uint32(1 + 2*i)
			tt.send(id)
			h.expectReset(id, tt.want)
		})
	}
	// The connection still serves requests.
	h.t = t
	id := uint32(1 + 2*len(tests))
	h.connect(id, a)
	h.check(h.fr.WriteData(id, false, []byte("ok")))
	if got := string(h.data(id, 2)); got != "ok" {
		t.Fatalf("echo %q, want ok", got)
	}
}

func TestMalformedRequestsGetStatusAnswers(t *testing.T) {
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.headers(1, false, ":method", "GET", ":scheme", "https", ":path", "/", ":authority", e.echoAddr.String())
	h.expectStatus(1, "405")
	h.expectReset(1, http2.ErrCodeNo) // the request body is not wanted (RFC 9113 §8.1)
	h.headers(3, true, ":method", "CONNECT", ":authority", "example.com:80")
	h.expectStatus(3, "400")
}

func TestClientResetClosesTheUpstream(t *testing.T) {
	closed := make(chan struct{})
	up := startUpstream(t, func(c net.Conn) {
		io.Copy(io.Discard, c)
		close(closed)
	})
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.connect(1, up.String())
	h.check(h.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("upstream still open after RST_STREAM")
	}
}

func TestUpstreamResetIsAConnectError(t *testing.T) {
	up := startUpstream(t, func(c net.Conn) {
		c.Read(make([]byte, 1))
		c.(*net.TCPConn).SetLinger(0) // Close sends RST
	})
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.connect(1, up.String())
	h.check(h.fr.WriteData(1, false, []byte("x")))
	h.expectReset(1, http2.ErrCodeConnect) // RFC 9113 §8.5
}

func TestClientMaySendAfterTheUpstreamEndsItsSide(t *testing.T) {
	got := make(chan string, 1)
	up := startUpstream(t, func(c net.Conn) {
		c.Write([]byte("banner"))
		c.(*net.TCPConn).CloseWrite()
		b, _ := io.ReadAll(c)
		got <- string(b)
	})
	e := newTestEnv(t, envOptions{})
	h := dialRawH2(t, e)
	h.connect(1, up.String())
	if b := string(h.data(1, 6)); b != "banner" {
		t.Fatalf("read %q, want banner", b)
	}
	h.expect("END_STREAM", func(f http2.Frame) bool { d, ok := f.(*http2.DataFrame); return ok && d.StreamEnded() })
	h.check(h.fr.WriteData(1, true, []byte("after")))
	select {
	case b := <-got:
		if b != "after" {
			t.Fatalf("upstream read %q, want after", b)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("upstream never saw the client's end")
	}
}

func TestIdleConnectionsAreClosedByTheServer(t *testing.T) {
	e := newTestEnv(t, envOptions{server: ServerOptions{IdleTimeout: 50 * time.Millisecond}})
	h := dialRawH2(t, e)
	h.connect(1, e.echoAddr.String())
	h.check(h.fr.WriteRSTStream(1, http2.ErrCodeCancel))
	ga := h.expect("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if ga.ErrCode != http2.ErrCodeNo || ga.LastStreamID != 1 {
		t.Fatalf("GOAWAY last stream %d code %v, want 1 NO_ERROR", ga.LastStreamID, ga.ErrCode)
	}
}

// FuzzServerConn feeds arbitrary frames, after a valid preface, to a
// server connection over an in-memory pipe: it must never panic, and once
// the client hangs up the connection and every stream must end.
func FuzzServerConn(f *testing.F) {
	sd := newFrameSeeder()
	fr, block := sd.fr, sd.block
	seed := func(write func()) {
		sd.reset()
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 100})
		write()
		f.Add(sd.bytes())
	}
	seed(func() {})
	seed(func() {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:81"), EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(1, 1000)
		fr.WriteWindowUpdate(0, 1000)
		fr.WriteData(1, true, []byte("bye"))
	})
	seed(func() {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:81"), EndStream: true, EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":method", "CONNECT", ":authority", "[fd00::1]:80", "forwarded", "for=1.2.3.4"), EndHeaders: false})
		fr.WriteContinuation(3, true, block("baggage", "a=b"))
		fr.WritePing(false, [8]byte{1})
		fr.WriteRSTStream(3, http2.ErrCodeCancel)
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 20}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		fr.WriteGoAway(0, http2.ErrCodeNo, nil)
	})
	seed(func() {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":method", "CONNECT", ":authority", "10.0.0.1:80"), EndHeaders: true})
		fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 10))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("trailer", "x"), EndStream: true, EndHeaders: true})
		fr.WritePriority(1, http2.PriorityParam{StreamDep: 3, Weight: 1})
	})

	// Ports 1 mod 4 reach a TCP echo through a sockio socket, so that the
	// reader writes received data itself (deliver); others as pipeHandler.
	echo := startEcho(f)
	handler := func(ctx context.Context, req *Request) (net.Conn, int) {
		if req.Addr.Port()%4 != 1 {
			return pipeHandler(ctx, req)
		}
		c, err := net.Dial("tcp", echo.String())
		if err != nil {
			return nil, 503
		}
		return sockio.Wrap(c), 200
	}
	s := NewServer(&tls.Config{}, handler, ServerOptions{Logger: slog.New(slog.DiscardHandler), MaxConcurrentStreams: 8})
	defer s.Close()
	f.Fuzz(func(t *testing.T, frames []byte) {
		client, server := net.Pipe()
		sc := newServerConn(s, server, server, connInfo{})
		done := make(chan struct{})
		go func() {
			defer close(done)
			if sc.writeSettings() == nil {
				sc.serve(time.Now().Add(10 * time.Second))
			}
		}()
		go io.Copy(io.Discard, client)
		client.Write([]byte(http2.ClientPreface))
		client.Write(frames)
		client.Close()
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			t.Fatal("server connection still running after the client hung up")
		}
	})
}

// stuckHandler connects 10.0.0.1:1 to an upstream that never reads, and
// anything else with dialHandler.
func stuckHandler(t testing.TB) Handler {
	return func(ctx context.Context, req *Request) (net.Conn, int) {
		if req.Authority != "10.0.0.1:1" {
			return dialHandler(ctx, req)
		}
		a, b := net.Pipe()
		t.Cleanup(func() { b.Close() })
		return a, 200
	}
}

// pipeHandler connects CONNECT streams to an in-memory echo; even ports
// are refused.
func pipeHandler(_ context.Context, req *Request) (net.Conn, int) {
	if req.Addr.Port()%2 == 0 {
		return nil, 401
	}
	a, b := net.Pipe()
	go func() {
		defer b.Close()
		io.Copy(b, b)
	}()
	return a, 200
}

// frameSeeder writes HTTP/2 frames, with header blocks from its own hpack
// encoder, into the seed corpora of the connection fuzzers.
type frameSeeder struct {
	b, hb bytes.Buffer
	fr    *http2.Framer
	enc   *hpack.Encoder
}

func newFrameSeeder() *frameSeeder {
	sd := &frameSeeder{}
	sd.fr = http2.NewFramer(&sd.b, nil)
	sd.enc = hpack.NewEncoder(&sd.hb)
	return sd
}

// block returns the header block of the name/value pairs kv.
func (sd *frameSeeder) block(kv ...string) []byte {
	sd.hb.Reset()
	for i := 0; i < len(kv); i += 2 {
		sd.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]})
	}
	return append([]byte(nil), sd.hb.Bytes()...)
}

// reset starts a seed: no frames, a fresh hpack table.
func (sd *frameSeeder) reset() {
	sd.b.Reset()
	sd.hb.Reset()
	sd.enc = hpack.NewEncoder(&sd.hb)
}

// bytes returns a copy of the frames written since reset.
func (sd *frameSeeder) bytes() []byte { return append([]byte(nil), sd.b.Bytes()...) }
