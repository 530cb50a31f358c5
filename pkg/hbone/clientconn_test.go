package hbone

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// fakeServer is an HBONE server that speaks raw frames, written with the
// Framer, for what our Server never sends.
type fakeServer struct {
	t     testing.TB
	addr  netip.AddrPort
	conns chan *rawServer
	dials atomic.Int32
	pool  *Pool
	tls   *tls.Config
	first *rawServer // the first connection, shared by subtests
}

// rawServer is one connection of a fakeServer, past the client's preface.
type rawServer struct {
	t        testing.TB
	c        net.Conn
	fr       *http2.Framer
	buf      bytes.Buffer
	enc      *hpack.Encoder
	settings *http2.SettingsFrame // the client's
}

type fakeOptions struct {
	settings  []http2.Setting // the server's SETTINGS
	noPreface bool            // send no SETTINGS: the test sends the first frame
	pool      PoolOptions
}

func newFakeServer(t testing.TB, o fakeOptions) *fakeServer {
	t.Helper()
	ca := newTestCA(t)
	conf := ca.serverTLS(t, serverID)
	conf.NextProtos = []string{alpnH2}
	ln, err := tls.Listen("tcp", "127.0.0.1:0", conf)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	fs := &fakeServer{t: t, addr: ln.Addr().(*net.TCPAddr).AddrPort(), conns: make(chan *rawServer, 8), tls: ca.clientTLS(t, clientID)}
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			t.Cleanup(func() { c.Close() })
			go func() {
				h, err := acceptRaw(t, c, o)
				if err != nil {
					c.Close()
					return
				}
				fs.conns <- h
			}()
		}
	}()
	popts := o.pool
	popts.Dial = func(ctx context.Context, network, addr string) (net.Conn, error) {
		fs.dials.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	fs.pool = NewPool(popts)
	t.Cleanup(func() { fs.pool.Close() })
	return fs
}

// acceptRaw reads the client's preface and SETTINGS and sends ours.
func acceptRaw(t testing.TB, c net.Conn, o fakeOptions) (*rawServer, error) {
	c.SetDeadline(time.Now().Add(10 * time.Second))
	defer c.SetDeadline(time.Time{})
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(c, preface[:]); err != nil || string(preface[:]) != http2.ClientPreface {
		return nil, errors.New("no client preface")
	}
	h := &rawServer{t: t, c: c, fr: http2.NewFramer(c, c)}
	h.fr.ReadMetaHeaders = hpack.NewDecoder(defaultHeaderTable, nil)
	h.fr.MaxHeaderListSize = 1 << 20
	h.enc = hpack.NewEncoder(&h.buf)
	f, err := h.fr.ReadFrame()
	if err != nil {
		return nil, err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok {
		return nil, errors.New("first frame is not SETTINGS")
	}
	h.settings = sf
	if !o.noPreface {
		if err := h.fr.WriteSettings(o.settings...); err != nil {
			return nil, err
		}
	}
	return h, nil
}

func (fs *fakeServer) key() Key { return Key{Src: clientID, Dst: serverID, Addr: fs.addr} }

// accept waits for the next connection the Pool dials.
func (fs *fakeServer) accept() *rawServer {
	fs.t.Helper()
	select {
	case h := <-fs.conns:
		return h
	case <-time.After(10 * time.Second):
		fs.t.Fatal("no connection")
		return nil
	}
}

type connectResult struct {
	c   net.Conn
	err error
}

// connect runs Pool.Connect in the background.
func (fs *fakeServer) connect(hdr Headers) <-chan connectResult {
	res := make(chan connectResult, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		c, err := fs.pool.Connect(ctx, fs.key(), fs.tls, "10.0.0.1:80", hdr)
		if c != nil {
			fs.t.Cleanup(func() { c.Close() })
		}
		res <- connectResult{c, err}
	}()
	return res
}

func wait(t testing.TB, res <-chan connectResult) (net.Conn, error) {
	t.Helper()
	select {
	case r := <-res:
		return r.c, r.err
	case <-time.After(10 * time.Second):
		t.Fatal("Connect did not return")
		return nil, nil
	}
}

func mustConn(t testing.TB, res <-chan connectResult) net.Conn {
	t.Helper()
	c, err := wait(t, res)
	if err != nil {
		t.Fatalf("Connect: %v", err)
	}
	return c
}

func (h *rawServer) check(err error) {
	h.t.Helper()
	if err != nil {
		h.t.Fatal(err)
	}
}

// expect reads frames until match accepts one.
func (h *rawServer) expect(what string, match func(http2.Frame) bool) http2.Frame {
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

// request waits for the next request's headers.
func (h *rawServer) request() *http2.MetaHeadersFrame {
	h.t.Helper()
	return h.expect("request headers", func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok }).(*http2.MetaHeadersFrame)
}

// block encodes name, value pairs.
func (h *rawServer) block(kv ...string) []byte {
	h.buf.Reset()
	for i := 0; i < len(kv); i += 2 {
		h.check(h.enc.WriteField(hpack.HeaderField{Name: kv[i], Value: kv[i+1]}))
	}
	return append([]byte(nil), h.buf.Bytes()...)
}

func (h *rawServer) headers(id uint32, end bool, kv ...string) {
	h.t.Helper()
	h.check(h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: h.block(kv...), EndStream: end, EndHeaders: true}))
}

// accept takes the next request and answers 200; it returns its stream.
func (h *rawServer) accept() uint32 {
	h.t.Helper()
	id := h.request().StreamID
	h.headers(id, false, ":status", "200")
	return id
}

func (h *rawServer) expectReset(id uint32, code http2.ErrCode) {
	h.t.Helper()
	f := h.expect("RST_STREAM", func(f http2.Frame) bool {
		rst, ok := f.(*http2.RSTStreamFrame)
		return ok && rst.StreamID == id
	}).(*http2.RSTStreamFrame)
	if f.ErrCode != code {
		h.t.Fatalf("stream %d reset with %v, want %v", id, f.ErrCode, code)
	}
}

func (h *rawServer) expectGoAway(code http2.ErrCode) {
	h.t.Helper()
	ga := h.expect("GOAWAY", func(f http2.Frame) bool { _, ok := f.(*http2.GoAwayFrame); return ok }).(*http2.GoAwayFrame)
	if ga.ErrCode != code || ga.LastStreamID != 0 {
		h.t.Fatalf("GOAWAY last stream %d code %v, want 0 %v", ga.LastStreamID, ga.ErrCode, code)
	}
}

// expectClosed reads until the client closes the connection.
func (h *rawServer) expectClosed() {
	h.t.Helper()
	h.c.SetReadDeadline(time.Now().Add(10 * time.Second))
	for {
		if _, err := h.fr.ReadFrame(); err != nil {
			if errors.Is(err, os.ErrDeadlineExceeded) {
				h.t.Fatal("connection still open")
			}
			return
		}
	}
}

// data collects the DATA of stream id until want bytes arrived.
func (h *rawServer) data(id uint32, want int) []byte {
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

// quiet checks that nothing matching arrives for a while.
func (h *rawServer) quiet(what string, match func(http2.Frame) bool) {
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
		if match(f) {
			h.t.Fatalf("%s: got %v", what, f)
		}
	}
}

func isData(f http2.Frame) bool {
	d, ok := f.(*http2.DataFrame)
	return ok && len(d.Data()) > 0
}

func isWindowUpdate(f http2.Frame) bool { _, ok := f.(*http2.WindowUpdateFrame); return ok }

func TestClientPrefaceAndRequest(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{
		ForwardedFor: netip.MustParseAddrPort("10.0.0.9:4711"),
		Baggage:      "k=v",
		Traceparent:  "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	})
	h := fs.accept()
	want := map[http2.SettingID]uint32{
		http2.SettingEnablePush:        0,
		http2.SettingInitialWindowSize: clientStreamWindow,
		http2.SettingMaxFrameSize:      maxReadFrame,
		http2.SettingMaxHeaderListSize: maxHeaderList,
	}
	for id, v := range want {
		if got, ok := h.settings.Value(id); !ok || got != v {
			t.Errorf("client SETTINGS %v = %d, %v; want %d", id, got, ok, v)
		}
	}
	wu := h.expect("connection WINDOW_UPDATE", isWindowUpdate).(*http2.WindowUpdateFrame)
	if wu.StreamID != 0 || wu.Increment != clientConnWindow-initialWindow {
		t.Errorf("WINDOW_UPDATE stream %d +%d, want 0 +%d", wu.StreamID, wu.Increment, clientConnWindow-initialWindow)
	}
	req := h.request()
	if req.StreamEnded() || req.StreamID != 1 {
		t.Errorf("request on stream %d, END_STREAM %v; want 1, false", req.StreamID, req.StreamEnded())
	}
	got := map[string]string{}
	for _, hf := range req.Fields {
		got[hf.Name] = hf.Value
	}
	wantFields := map[string]string{
		":method":     "CONNECT",
		":authority":  "10.0.0.1:80",
		"forwarded":   `for="10.0.0.9:4711"`,
		"baggage":     "k=v",
		"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
	}
	if len(got) != len(wantFields) {
		t.Errorf("request fields %v, want exactly %v", got, wantFields)
	}
	for k, v := range wantFields {
		if got[k] != v {
			t.Errorf("request field %s = %q, want %q", k, got[k], v)
		}
	}
	h.headers(1, false, ":status", "200")
	mustConn(t, res)
}

func TestClientAnswersPingAndSettings(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.request().StreamID
	h.check(h.fr.WritePing(false, [8]byte{1, 2, 3, 4, 5, 6, 7, 8}))
	f := h.expect("PING ack", func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && p.IsAck() })
	if f.(*http2.PingFrame).Data != [8]byte{1, 2, 3, 4, 5, 6, 7, 8} {
		t.Fatalf("PING ack carries %v", f.(*http2.PingFrame).Data)
	}
	h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0}))
	h.expect("SETTINGS ack", func(f http2.Frame) bool { s, ok := f.(*http2.SettingsFrame); return ok && s.IsAck() })
	h.headers(id, false, ":status", "200")
	mustConn(t, res)
	// The encoder follows the smaller table: requests still decode.
	res = fs.connect(Headers{Baggage: "x=y"})
	if req := h.request(); req.StreamID != id+2 || req.PseudoValue("authority") != "10.0.0.1:80" {
		t.Fatalf("second request on stream %d for %q", req.StreamID, req.PseudoValue("authority"))
	}
}

func TestClientSendsNoMoreThanTheStreamWindow(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1000}}})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	written := make(chan error, 1)
	go func() {
		_, err := c.Write(make([]byte, 5000))
		written <- err
	}()
	if got := len(h.data(id, 1000)); got != 1000 {
		t.Fatalf("got %d bytes, want the window's 1000", got)
	}
	h.quiet("with the stream window closed", isData)
	h.check(h.fr.WriteWindowUpdate(id, 3000))
	if got := len(h.data(id, 3000)); got != 3000 {
		t.Fatalf("got %d bytes after WINDOW_UPDATE, want 3000", got)
	}
	h.quiet("with the stream window closed again", isData)
	// A larger initial window opens open streams too (RFC 9113 §6.9.2).
	h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 2000}))
	if got := len(h.data(id, 1000)); got != 1000 {
		t.Fatalf("got %d bytes after SETTINGS, want 1000", got)
	}
	select {
	case err := <-written:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Write did not return")
	}
}

func TestClientSendsNoMoreThanTheConnectionWindow(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1 << 20}}})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	go c.Write(make([]byte, 1<<20))
	if got := len(h.data(id, initialWindow)); got != initialWindow {
		t.Fatalf("got %d bytes, want the connection window's %d", got, initialWindow)
	}
	h.quiet("with the connection window closed", isData)
	h.check(h.fr.WriteWindowUpdate(0, 100))
	if got := len(h.data(id, 100)); got != 100 {
		t.Fatalf("got %d bytes after a connection WINDOW_UPDATE of 100", got)
	}
	h.quiet("with the connection window closed again", isData)
}

func TestClientWriteDeadlineWhileFlowControlled(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 10}}})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	c.SetWriteDeadline(time.Now().Add(50 * time.Millisecond))
	n, err := c.Write(make([]byte, 100))
	if n != 10 || !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Write = %d, %v; want 10, os.ErrDeadlineExceeded", n, err)
	}
	// As on a socket, a new deadline lets writes continue.
	c.SetWriteDeadline(time.Time{})
	h.check(h.fr.WriteWindowUpdate(id, 90))
	if n, err := c.Write(make([]byte, 90)); n != 90 || err != nil {
		t.Fatalf("Write after clearing the deadline = %d, %v", n, err)
	}
	if got := len(h.data(id, 100)); got != 100 {
		t.Fatalf("server got %d bytes, want 100", got)
	}
}

func TestClientReadDeadlineIsSocketLike(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	c.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read after the deadline = %v, want os.ErrDeadlineExceeded", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	h.check(h.fr.WriteData(id, false, []byte("late")))
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "late" {
		t.Fatalf("Read after a new deadline = %q, %v", buf, err)
	}
}

func TestClientBatchesWindowUpdates(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	h.expect("connection WINDOW_UPDATE", isWindowUpdate)
	id := h.accept()
	c := mustConn(t, res)
	send := func(n int) {
		for n > 0 {
			k := min(n, 16<<10)
			h.check(h.fr.WriteData(id, false, make([]byte, k)))
			n -= k
		}
	}
	// Reads of less than a quarter of the stream window are not
	// acknowledged one by one.
	quarter := clientStreamWindow / windowRefreshDivisor
	send(quarter - 1)
	if _, err := io.ReadFull(c, make([]byte, quarter-1)); err != nil {
		t.Fatal(err)
	}
	h.quiet("before a quarter of the window was read", isWindowUpdate)
	send(1)
	if _, err := io.ReadFull(c, make([]byte, 1)); err != nil {
		t.Fatal(err)
	}
	wu := h.expect("stream WINDOW_UPDATE", isWindowUpdate).(*http2.WindowUpdateFrame)
	if wu.StreamID != id || wu.Increment != uint32(quarter) {
		t.Fatalf("WINDOW_UPDATE stream %d +%d, want %d +%d", wu.StreamID, wu.Increment, id, quarter)
	}
}

func TestClientStreamEndsBothWays(t *testing.T) {
	for _, tc := range []struct {
		name string
		end  func(h *rawServer, id uint32)
	}{
		{"END_STREAM on DATA ends the response", func(h *rawServer, id uint32) { h.check(h.fr.WriteData(id, true, nil)) }},
		{"trailers end the response and are ignored", func(h *rawServer, id uint32) { h.headers(id, true, "x-trailer", "1") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			fs := newFakeServer(t, fakeOptions{})
			res := fs.connect(Headers{})
			h := fs.accept()
			id := h.accept()
			c := mustConn(t, res)
			h.check(h.fr.WriteData(id, false, []byte("bye")))
			tc.end(h, id)
			got, err := io.ReadAll(c)
			if err != nil || string(got) != "bye" {
				t.Fatalf("read %q, %v; want bye then EOF", got, err)
			}
			// The other way still flows, until CloseWrite.
			if _, err := c.Write([]byte("more")); err != nil {
				t.Fatal(err)
			}
			if got := string(h.data(id, 4)); got != "more" {
				t.Fatalf("server got %q", got)
			}
			if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
				t.Fatal(err)
			}
			h.expect("END_STREAM", func(f http2.Frame) bool { d, ok := f.(*http2.DataFrame); return ok && d.StreamEnded() })
			if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
				t.Fatalf("Write after CloseWrite = %v, want net.ErrClosed", err)
			}
			c.Close()
			// Both sides ended: Close resets nothing.
			h.quiet("after both sides ended", func(f http2.Frame) bool { _, ok := f.(*http2.RSTStreamFrame); return ok })
		})
	}
}

func TestClientCloseResetsAnOpenStream(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	h.check(h.fr.WriteData(id, false, []byte("unread")))
	c.Close()
	h.expectReset(id, http2.ErrCodeCancel)
	if _, err := c.Read(make([]byte, 1)); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read after Close = %v, want net.ErrClosed", err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Write after Close = %v, want net.ErrClosed", err)
	}
}

func TestClientStreamResetByServer(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	h.check(h.fr.WriteData(id, false, []byte("partial")))
	h.check(h.fr.WriteRSTStream(id, http2.ErrCodeConnect))
	got, err := io.ReadAll(c)
	if string(got) != "partial" || !errors.Is(err, errStreamReset) {
		t.Fatalf("read %q, %v; want what came before the reset, then the reset", got, err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, errStreamReset) {
		t.Fatalf("Write after reset = %v, want the reset", err)
	}
	// The connection serves the next stream.
	res = fs.connect(Headers{})
	h.accept()
	mustConn(t, res)
	if n := fs.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1", n)
	}
}

func TestClientKeepsACompleteResponseDespiteAReset(t *testing.T) {
	// RFC 9113 §8.1: a server may end the response, then reset the
	// request with NO_ERROR; the client keeps the response.
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	h.check(h.fr.WriteData(id, true, []byte("all")))
	h.check(h.fr.WriteRSTStream(id, http2.ErrCodeNo))
	got, err := io.ReadAll(c)
	if string(got) != "all" || err != nil {
		t.Fatalf("read %q, %v; want all, EOF", got, err)
	}
}

func TestClientStatusAnswers(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	for _, tc := range []struct {
		name string
		send func(h *rawServer, id uint32)
		want int
	}{
		{"a 401 ending the stream", func(h *rawServer, id uint32) { h.headers(id, true, ":status", "401") }, 401},
		{"a 503 followed by a body", func(h *rawServer, id uint32) {
			h.headers(id, false, ":status", "503")
			h.check(h.fr.WriteData(id, true, []byte("down")))
		}, 503},
		{"informational answers, then 200", func(h *rawServer, id uint32) {
			h.headers(id, false, ":status", "100")
			h.headers(id, false, ":status", "103", "link", "</a>")
			h.headers(id, false, ":status", "200")
		}, 200},
		{"a response in HEADERS and CONTINUATION", func(h *rawServer, id uint32) {
			b := h.block(":status", "200", "x-a", strings.Repeat("a", 100))
			h.check(h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b[:5]}))
			h.check(h.fr.WriteContinuation(id, false, b[5:50]))
			h.check(h.fr.WriteContinuation(id, true, b[50:]))
		}, 200},
	} {
		t.Run(tc.name, func(t *testing.T) {
			res := fs.connect(Headers{})
			h := fs.shared(t)
			id := h.request().StreamID
			tc.send(h, id)
			c, err := wait(t, res)
			if tc.want == 200 {
				if err != nil {
					t.Fatalf("Connect: %v", err)
				}
				c.Close()
				h.expectReset(id, http2.ErrCodeCancel)
				return
			}
			var se *StatusError
			if !errors.As(err, &se) || se.Code != tc.want {
				t.Fatalf("Connect error = %v, want StatusError %d", err, tc.want)
			}
			h.expectReset(id, http2.ErrCodeCancel)
		})
	}
	if n := fs.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want every answer on one connection", n)
	}
}

// shared returns the first connection, for subtests that share it.
func (fs *fakeServer) shared(t testing.TB) *rawServer {
	if fs.first == nil {
		fs.first = fs.accept()
	}
	fs.first.t = t
	return fs.first
}

func TestClientRefusesMalformedResponses(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	tests := []struct {
		name string
		send func(h *rawServer, id uint32)
	}{
		{"a response without status", func(h *rawServer, id uint32) { h.headers(id, false, "x-a", "b") }},
		{"a status of two digits", func(h *rawServer, id uint32) { h.headers(id, false, ":status", "20") }},
		{"a status that is not a number", func(h *rawServer, id uint32) { h.headers(id, false, ":status", "2x0") }},
		{"101, which HTTP/2 does not have", func(h *rawServer, id uint32) { h.headers(id, false, ":status", "101") }},
		{"a request pseudo-header in a response", func(h *rawServer, id uint32) {
			h.headers(id, false, ":status", "200", ":path", "/")
		}},
		{"an informational answer ending the stream", func(h *rawServer, id uint32) { h.headers(id, true, ":status", "100") }},
		{"DATA before the response", func(h *rawServer, id uint32) { h.check(h.fr.WriteData(id, false, []byte("x"))) }},
		{"a response header list beyond the limit", func(h *rawServer, id uint32) {
			b := h.block(":status", "200", "x-big", strings.Repeat("b", maxHeaderList))
			h.check(h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: id, BlockFragment: b[:16<<10]}))
			for b = b[16<<10:]; len(b) > 0; {
				k := min(len(b), 16<<10)
				h.check(h.fr.WriteContinuation(id, k == len(b), b[:k]))
				b = b[k:]
			}
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := fs.connect(Headers{})
			h := fs.shared(t)
			id := h.request().StreamID
			tt.send(h, id)
			_, err := wait(t, res)
			var se *StatusError
			if err == nil || errors.As(err, &se) {
				t.Fatalf("Connect error = %v, want a protocol error", err)
			}
			h.expectReset(id, http2.ErrCodeProtocol)
		})
	}
	// The connection lives on.
	res := fs.connect(Headers{})
	h := fs.shared(t)
	h.accept()
	mustConn(t, res)
	if n := fs.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1", n)
	}
}

func TestClientStreamErrors(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	tests := []struct {
		name string
		send func(h *rawServer, id uint32)
		want http2.ErrCode
	}{
		{"trailers without END_STREAM are malformed", func(h *rawServer, id uint32) { h.headers(id, false, "x-trailer", "1") }, http2.ErrCodeProtocol},
		{"trailers with a pseudo-header are malformed", func(h *rawServer, id uint32) { h.headers(id, true, ":status", "200") }, http2.ErrCodeProtocol},
		{"DATA after END_STREAM is a stream-closed error", func(h *rawServer, id uint32) {
			h.check(h.fr.WriteData(id, true, nil))
			h.check(h.fr.WriteData(id, false, []byte("late")))
		}, http2.ErrCodeStreamClosed},
		{"DATA beyond the stream window is a flow-control error", func(h *rawServer, id uint32) {
			for range clientStreamWindow/(16<<10) + 1 {
				h.check(h.fr.WriteData(id, false, make([]byte, 16<<10)))
			}
		}, http2.ErrCodeFlowControl},
		{"a stream window beyond 2^31-1 is a flow-control error", func(h *rawServer, id uint32) {
			h.check(h.fr.WriteWindowUpdate(id, maxWindow))
		}, http2.ErrCodeFlowControl},
		{"a WINDOW_UPDATE of zero is a protocol error", func(h *rawServer, id uint32) {
			h.check(h.fr.WriteRawFrame(http2.FrameWindowUpdate, 0, id, []byte{0, 0, 0, 0}))
		}, http2.ErrCodeProtocol},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			res := fs.connect(Headers{})
			h := fs.shared(t)
			id := h.accept()
			c := mustConn(t, res)
			tt.send(h, id)
			h.expectReset(id, tt.want)
			c.SetReadDeadline(time.Now().Add(10 * time.Second))
			if _, err := io.ReadAll(c); err == nil && tt.want != http2.ErrCodeStreamClosed {
				t.Fatal("stream ended cleanly after a stream error")
			}
			c.Close()
		})
	}
	if n := fs.dials.Load(); n != 1 {
		t.Fatalf("%d dials, want 1: stream errors keep the connection", n)
	}
}

func TestClientProtocolViolationsEndTheConnectionWithGoAway(t *testing.T) {
	tests := []struct {
		name      string
		noPreface bool
		send      func(h *rawServer)
		want      http2.ErrCode
	}{
		{"a first frame other than SETTINGS is a protocol error", true,
			func(h *rawServer) { h.check(h.fr.WritePing(false, [8]byte{})) }, http2.ErrCodeProtocol},
		{"DATA on a stream never opened is a protocol error", false,
			func(h *rawServer) { h.check(h.fr.WriteData(5, false, []byte("x"))) }, http2.ErrCodeProtocol},
		{"HEADERS on a server stream is a protocol error", false,
			func(h *rawServer) { h.headers(2, false, ":status", "200") }, http2.ErrCodeProtocol},
		{"RST_STREAM on a stream never opened is a protocol error", false,
			func(h *rawServer) { h.check(h.fr.WriteRSTStream(7, http2.ErrCodeCancel)) }, http2.ErrCodeProtocol},
		{"WINDOW_UPDATE on a stream never opened is a protocol error", false,
			func(h *rawServer) { h.check(h.fr.WriteWindowUpdate(9, 1)) }, http2.ErrCodeProtocol},
		{"PUSH_PROMISE is a protocol error", false,
			func(h *rawServer) {
				h.check(h.fr.WritePushPromise(http2.PushPromiseParam{StreamID: 1, PromiseID: 2, BlockFragment: h.block(":method", "GET"), EndHeaders: true}))
			}, http2.ErrCodeProtocol},
		{"SETTINGS enabling push is a protocol error", false,
			func(h *rawServer) { h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingEnablePush, Val: 1})) }, http2.ErrCodeProtocol},
		{"a SETTINGS ack of nothing is a protocol error", false,
			func(h *rawServer) {
				h.check(h.fr.WriteSettingsAck()) // of the client's preface
				h.check(h.fr.WriteSettingsAck())
			}, http2.ErrCodeProtocol},
		{"a connection window beyond 2^31-1 is a flow-control error", false,
			func(h *rawServer) { h.check(h.fr.WriteWindowUpdate(0, maxWindow)) }, http2.ErrCodeFlowControl},
		{"an initial window beyond 2^31-1 is a flow-control error", false,
			func(h *rawServer) {
				h.check(h.fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 31}))
			}, http2.ErrCodeFlowControl},
		{"a frame larger than announced is a frame-size error", false,
			func(h *rawServer) { h.fr.WriteRawFrame(http2.FrameData, 0, 1, make([]byte, maxReadFrame+1)) }, http2.ErrCodeFrameSize},
		{"CONTINUATION without HEADERS is a protocol error", false,
			func(h *rawServer) { h.check(h.fr.WriteContinuation(1, true, []byte{0x88})) }, http2.ErrCodeProtocol},
		{"a header block that does not decode is a compression error", false,
			func(h *rawServer) {
				h.check(h.fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: []byte{0xff, 0xff, 0xff}, EndHeaders: true}))
			}, http2.ErrCodeCompression},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			fs := newFakeServer(t, fakeOptions{noPreface: tt.noPreface})
			res := fs.connect(Headers{})
			h := fs.accept()
			h.request()
			tt.send(h)
			h.expectGoAway(tt.want)
			h.expectClosed()
			// Connect tries a new connection, which nobody answers; the
			// pool's Close ends it.
			_ = res
		})
	}
}

func TestClientRetriesStreamsAGoAwayLeftUnprocessed(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h1 := fs.accept()
	id := h1.accept()
	kept := mustConn(t, res)

	res = fs.connect(Headers{})
	if second := h1.request().StreamID; second != id+2 {
		t.Fatalf("second stream %d", second)
	}
	h1.check(h1.fr.WriteGoAway(id, http2.ErrCodeNo, nil))
	// The unprocessed stream is retried on a new connection.
	h2 := fs.accept()
	h2.accept()
	mustConn(t, res)
	if n := fs.dials.Load(); n != 2 {
		t.Fatalf("%d dials, want 2", n)
	}
	// The stream the GOAWAY covers carries on.
	if _, err := kept.Write([]byte("still")); err != nil {
		t.Fatal(err)
	}
	if got := string(h1.data(id, 5)); got != "still" {
		t.Fatalf("server got %q", got)
	}
	// New streams go elsewhere, and the connection closes once its last
	// stream ends.
	res = fs.connect(Headers{})
	h2.accept()
	mustConn(t, res)
	kept.Close()
	h1.expectReset(id, http2.ErrCodeCancel)
	h1.expectClosed()
}

func TestClientRetriesRefusedStreams(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.request().StreamID
	h.check(h.fr.WriteRSTStream(id, http2.ErrCodeRefusedStream))
	if id2 := h.accept(); id2 != id+2 {
		t.Fatalf("retried on stream %d, want %d", id2, id+2)
	}
	mustConn(t, res)
}

func TestClientHonoursTheServersStreamLimit(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingMaxConcurrentStreams, Val: 1}}})
	res := fs.connect(Headers{})
	h1 := fs.accept()
	h1.accept()
	c := mustConn(t, res)
	res = fs.connect(Headers{})
	h2 := fs.accept()
	h2.accept()
	mustConn(t, res)
	h1.quiet("a stream beyond the limit", func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok })
	c.Close()
}

func TestClientRefusesHeadersBeyondTheServersLimit(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingMaxHeaderListSize, Val: 200}}})
	res := fs.connect(Headers{})
	h := fs.accept()
	h.accept()
	mustConn(t, res)
	res = fs.connect(Headers{Baggage: strings.Repeat("b", 200)})
	if _, err := wait(t, res); err == nil || !strings.Contains(err.Error(), "exceed") {
		t.Fatalf("Connect = %v, want the headers refused", err)
	}
	h.quiet("a request beyond the limit", func(f http2.Frame) bool { _, ok := f.(*http2.MetaHeadersFrame); return ok })
}

func TestClientSplitsLargeHeaderBlocks(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	baggage := strings.Repeat("k=v,", 10<<10)
	res := fs.connect(Headers{Baggage: baggage})
	h := fs.accept()
	req := h.request() // the Framer joins HEADERS and CONTINUATION
	got := ""
	for _, hf := range req.RegularFields() {
		if hf.Name == "baggage" {
			got = hf.Value
		}
	}
	if got != baggage {
		t.Fatalf("baggage of %d bytes arrived as %d", len(baggage), len(got))
	}
	h.headers(req.StreamID, false, ":status", "200")
	mustConn(t, res)
}

func TestClientRefusesInvalidHeaderValues(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	for _, hdr := range []Headers{{Baggage: "a\r\nb: c"}, {Traceparent: "\x00"}} {
		c, err := fs.pool.Connect(context.Background(), fs.key(), fs.tls, "10.0.0.1:80", hdr)
		if err == nil {
			c.Close()
			t.Fatalf("Connect with %+v succeeded", hdr)
		}
	}
	if _, err := fs.pool.Connect(context.Background(), fs.key(), fs.tls, "10.0.0.1:80\r\n", Headers{}); err == nil {
		t.Fatal("Connect with an invalid authority succeeded")
	}
}

func TestPoolCloseSendsGoAway(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{})
	res := fs.connect(Headers{})
	h := fs.accept()
	h.accept()
	c := mustConn(t, res)
	fs.pool.Close()
	h.expectGoAway(http2.ErrCodeNo)
	h.expectClosed()
	if _, err := c.Read(make([]byte, 1)); err == nil {
		t.Fatal("a stream of a closed pool still reads")
	}
	if _, err := fs.pool.Connect(context.Background(), fs.key(), fs.tls, "10.0.0.1:80", Headers{}); !errors.Is(err, ErrPoolClosed) {
		t.Fatalf("Connect after Close = %v, want ErrPoolClosed", err)
	}
}

func TestIdleExpirySendsGoAway(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{pool: PoolOptions{IdleTimeout: 50 * time.Millisecond}})
	res := fs.connect(Headers{})
	h := fs.accept()
	h.accept()
	mustConn(t, res).Close()
	h.expectGoAway(http2.ErrCodeNo)
	h.expectClosed()
}

func TestClientPingsASilentServer(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{pool: PoolOptions{PingInterval: 50 * time.Millisecond, PingTimeout: 50 * time.Millisecond}})
	res := fs.connect(Headers{})
	h := fs.accept()
	id := h.accept()
	c := mustConn(t, res)
	// Answered pings keep the connection.
	for range 3 {
		p := h.expect("PING", func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && !p.IsAck() }).(*http2.PingFrame)
		h.check(h.fr.WritePing(true, p.Data))
	}
	h.check(h.fr.WriteData(id, false, []byte("ok")))
	buf := make([]byte, 2)
	if _, err := io.ReadFull(c, buf); err != nil {
		t.Fatal(err)
	}
	// An unanswered one closes it, and fails its streams.
	h.expect("PING", func(f http2.Frame) bool { p, ok := f.(*http2.PingFrame); return ok && !p.IsAck() })
	if _, err := c.Read(buf); !errors.Is(err, errConnClosed) {
		t.Fatalf("Read = %v, want the connection's loss", err)
	}
	h.expectClosed()
}

func TestClientPadding(t *testing.T) {
	fs := newFakeServer(t, fakeOptions{settings: []http2.Setting{{ID: http2.SettingInitialWindowSize, Val: 1 << 20}}})
	res := fs.connect(Headers{})
	h := fs.accept()
	h.expect("connection WINDOW_UPDATE", isWindowUpdate)
	id := h.accept()
	c := mustConn(t, res)
	// Padding counts against the windows and is given back at once.
	quarter := clientStreamWindow / windowRefreshDivisor
	h.check(h.fr.WriteDataPadded(id, false, []byte("padded"), make([]byte, 255)))
	buf := make([]byte, 6)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "padded" {
		t.Fatalf("read %q, %v", buf, err)
	}
	sent := 6 + 256
	for sent < quarter {
		k := min(quarter-sent, 255)
		h.check(h.fr.WriteDataPadded(id, false, nil, make([]byte, k-1)))
		sent += k
	}
	wu := h.expect("stream WINDOW_UPDATE", isWindowUpdate).(*http2.WindowUpdateFrame)
	if wu.StreamID != id {
		t.Fatalf("WINDOW_UPDATE for stream %d, want %d", wu.StreamID, id)
	}
}

// FuzzClientConn feeds arbitrary server frames, after a valid SETTINGS,
// to a client connection with two streams waiting for their responses,
// over an in-memory pipe: it must never panic, and once the server hangs
// up the connection and every stream must end.
func FuzzClientConn(f *testing.F) {
	sd := newFrameSeeder()
	fr, block := sd.fr, sd.block
	seed := func(write func()) {
		sd.reset()
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 100}, http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: 10})
		write()
		f.Add(sd.bytes())
	}
	seed(func() {})
	seed(func() {
		fr.WriteSettingsAck()
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":status", "200"), EndHeaders: true})
		fr.WriteData(1, false, []byte("hello"))
		fr.WriteWindowUpdate(1, 1000)
		fr.WriteWindowUpdate(0, 1000)
		fr.WriteData(1, true, []byte("bye"))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":status", "401"), EndStream: true, EndHeaders: true})
	})
	seed(func() {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":status", "100"), EndHeaders: true})
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":status", "200"), EndHeaders: false})
		fr.WriteContinuation(3, true, block("x-a", "b"))
		fr.WritePing(false, [8]byte{1})
		fr.WriteRSTStream(3, http2.ErrCodeCancel)
		fr.WriteSettings(http2.Setting{ID: http2.SettingMaxFrameSize, Val: 1 << 20}, http2.Setting{ID: http2.SettingHeaderTableSize, Val: 0})
		fr.WriteGoAway(1, http2.ErrCodeNo, nil)
	})
	seed(func() {
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block(":status", "200"), EndHeaders: true})
		fr.WriteDataPadded(1, false, []byte("padded"), make([]byte, 10))
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: block("trailer", "x"), EndStream: true, EndHeaders: true})
		fr.WritePriority(1, http2.PriorityParam{StreamDep: 3, Weight: 1})
		fr.WriteRSTStream(1, http2.ErrCodeNo)
		fr.WriteGoAway(0, http2.ErrCodeProtocol, []byte("bye"))
	})
	seed(func() {
		fr.WriteRSTStream(1, http2.ErrCodeRefusedStream)
		fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 3, BlockFragment: block(":status", "200"), EndHeaders: true})
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 0})
		fr.WriteData(3, false, make([]byte, 1000))
		fr.WriteSettings(http2.Setting{ID: http2.SettingInitialWindowSize, Val: 1 << 20})
	})

	f.Fuzz(func(t *testing.T, frames []byte) {
		client, server := net.Pipe()
		go io.Copy(io.Discard, server)
		cc, err := newClientConn(client, client, time.Hour, time.Hour, func() {})
		if err != nil {
			t.Fatal(err)
		}
		done := make(chan struct{}, 2)
		for range 2 {
			go func() {
				defer func() { done <- struct{}{} }()
				cs, err := cc.openStream(context.Background(), "10.0.0.1:80", Headers{})
				if err != nil {
					return
				}
				defer cs.Close()
				cs.Write([]byte("request"))
				cs.CloseWrite()
				io.Copy(io.Discard, cs)
			}()
		}
		// Both requests are out before the server answers.
		for deadline := time.Now().Add(10 * time.Second); ; {
			cc.mu.Lock()
			next := cc.nextID
			cc.mu.Unlock()
			if next == 5 {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("requests not sent")
			}
			runtime.Gosched()
		}
		server.Write(frames)
		server.Close()
		for range 2 {
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				t.Fatal("a stream still running after the server hung up")
			}
		}
		select {
		case <-cc.done:
		case <-time.After(10 * time.Second):
			t.Fatal("client connection still reading after the server hung up")
		}
	})
}
