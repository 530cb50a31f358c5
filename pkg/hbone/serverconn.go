package hbone

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The server side of HBONE speaks HTTP/2 itself, on x/net's Framer and
// hpack: every stream is a CONNECT tunnel, so it needs none of a general
// HTTP server's machinery. x/net's Server hands every frame between three
// goroutines (the frame reader, the serve loop and the handler) and writes
// every flush from a goroutine of its own; here the connection's reader
// delivers DATA straight to the stream that forwards it upstream, and a
// stream writes its DATA frames to the connection itself.

// HTTP/2 protocol facts (RFC 9113).
const (
	frameHeaderLen = 9
	// initialWindow is every flow-control window until SETTINGS or
	// WINDOW_UPDATE change it (§6.9.2).
	initialWindow = 65535
	maxWindow     = 1<<31 - 1
	// defaultMaxFrame is SETTINGS_MAX_FRAME_SIZE until the peer says more.
	defaultMaxFrame = 16 << 10
	// defaultHeaderTable is SETTINGS_HEADER_TABLE_SIZE until the peer says.
	defaultHeaderTable = 4096
)

// Tuning of the server side.
const (
	// maxReadFrame is the SETTINGS_MAX_FRAME_SIZE we announce: the largest
	// frame payload a peer may send. It matches dataChunk, so a peer whose
	// reads are as large as ours sends each one in a single frame; the
	// framer's read buffer (one per connection) is this large.
	maxReadFrame = 32 << 10
	// dataChunk is how much a stream reads from its upstream at once; each
	// read leaves as one DATA frame when the windows allow. 32 KiB is two
	// TLS records, sent in one system call (recordBatcher); larger reads
	// saved little more on loopback, and it is held by every open stream.
	dataChunk = 32 << 10
	// recvChunk sizes the pooled buffers that hold received DATA until the
	// stream writes it upstream; a stream holds none while idle.
	recvChunk = 32 << 10
	// maxHeaderList bounds a request's header list (SETTINGS_MAX_HEADER_LIST_SIZE).
	maxHeaderList = 64 << 10
	// windowRefreshDivisor: a receive window is topped up once a quarter
	// of it has been consumed, so a sender always has three quarters of it
	// and small exchanges cost no WINDOW_UPDATE at all.
	windowRefreshDivisor = 4
)

var (
	dataBufPool = sync.Pool{New: func() any { b := make([]byte, frameHeaderLen+dataChunk); return &b }}
	recvBufPool = sync.Pool{New: func() any { b := make([]byte, 0, recvChunk); return &b }}
)

// Why a stream ended early, as its goroutines see it.
var (
	errStreamReset = errors.New("hbone: stream reset by peer")
	errConnClosed  = errors.New("hbone: connection closed")
	errStreamLocal = errors.New("hbone: stream reset")
)

// transport is what a serverConn speaks HTTP/2 over: TLS (batchedTLS),
// or a plain connection in tests.
type transport interface {
	io.ReadWriter
	SetReadDeadline(t time.Time) error
}

// serverConn is one HBONE connection on the server side.
type serverConn struct {
	s    *Server
	raw  net.Conn  // the accepted connection; closing it ends everything
	tc   transport // TLS over raw
	info connInfo
	log  func(msg string, args ...any)

	streamWindow, connWindow int32  // our receive windows (ServerOptions)
	maxStreams               uint32 // ServerOptions.MaxConcurrentStreams

	// fr reads in the read loop only; its write methods need wmu.
	fr *http2.Framer

	wmu  sync.Mutex    // guards writes to the connection: fr's writes, bw, henc, hbuf, werr, stream.wclosed
	bw   *bufio.Writer // control frames, over tc
	henc *hpack.Encoder
	hbuf bytes.Buffer
	werr error // the first write error; the connection is closed then

	mu          sync.Mutex
	sendCond    sync.Cond                // uses mu; broadcast when send windows grow or streams end
	streams     map[uint32]*serverStream // guarded by mu
	maxStreamID uint32                   // guarded by mu; highest stream the client opened
	sendAvail   int64                    // guarded by mu; the connection's send window
	peerWindow  int32                    // guarded by mu; the peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame   uint32                   // guarded by mu; the peer's SETTINGS_MAX_FRAME_SIZE
	recvAvail   int64                    // guarded by mu; what the peer may still send on the connection
	recvUnsent  int32                    // guarded by mu; consumed, not yet returned to the peer
	goingAway   bool                     // guarded by mu; GOAWAY sent or received: no new streams
	closed      bool                     // guarded by mu; the connection is closed
	idle        *time.Timer              // guarded by mu; armed while there is no stream (IdleTimeout)

	wg        sync.WaitGroup // stream goroutines
	closeOnce sync.Once
}

// serverStream is one CONNECT stream.
type serverStream struct {
	sc     *serverConn
	id     uint32
	ctx    context.Context // ends with the stream; the handler's
	cancel context.CancelFunc
	ready  chan struct{} // 1-buffered: received data, end or reset for toUpstream

	// Guarded by sc.mu.
	recv       []*[]byte // received DATA not yet written upstream, pooled
	recvAvail  int32     // what the peer may still send
	recvUnsent int32     // written upstream, not yet returned to the peer
	recvEnd    bool      // END_STREAM received
	sendAvail  int64     // the peer's window for this stream
	err        error     // why the stream was reset; set once

	wclosed bool // guarded by sc.wmu: END_STREAM or RST_STREAM written
}

func newServerConn(s *Server, raw net.Conn, tc transport, info connInfo) *serverConn {
	sc := &serverConn{
		s:            s,
		raw:          raw,
		tc:           tc,
		info:         info,
		streamWindow: s.opts.StreamWindow,
		connWindow:   s.opts.ConnWindow,
		maxStreams:   s.opts.MaxConcurrentStreams,
		streams:      make(map[uint32]*serverStream),
		sendAvail:    initialWindow,
		peerWindow:   initialWindow,
		peerFrame:    defaultMaxFrame,
		recvAvail:    int64(s.opts.ConnWindow),
	}
	sc.log = func(msg string, args ...any) {
		s.log.Debug(msg, append([]any{"peer", raw.RemoteAddr()}, args...)...)
	}
	sc.sendCond.L = &sc.mu
	// Control frames are small; DATA frames bypass bw.
	sc.bw = bufio.NewWriterSize(tc, 4<<10)
	sc.fr = http2.NewFramer(sc.bw, tc)
	sc.fr.SetMaxReadFrameSize(maxReadFrame)
	sc.fr.MaxHeaderListSize = maxHeaderList
	sc.fr.ReadMetaHeaders = hpack.NewDecoder(defaultHeaderTable, nil)
	sc.henc = hpack.NewEncoder(&sc.hbuf)
	return sc
}

// writeSettings sends our connection preface: SETTINGS, then the
// connection window beyond the initial one. It must precede every other
// frame (RFC 9113 §3.4); the client may already be sending its own.
func (sc *serverConn) writeSettings() error {
	return sc.writeFrames(func(fr *http2.Framer) error {
		err := fr.WriteSettings(
			http2.Setting{ID: http2.SettingMaxConcurrentStreams, Val: sc.maxStreams},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: uint32(sc.streamWindow)},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxReadFrame},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
		)
		if err == nil && sc.connWindow > initialWindow {
			err = fr.WriteWindowUpdate(0, uint32(sc.connWindow-initialWindow))
		}
		return err
	})
}

// serve runs the connection, once writeSettings succeeded, until it ends;
// then it waits for its streams.
func (sc *serverConn) serve(prefaceDeadline time.Time) {
	defer sc.wg.Wait()
	defer sc.close()
	if err := sc.readPreface(prefaceDeadline); err != nil {
		sc.log("hbone: reading client preface", "err", err)
		return
	}
	sc.mu.Lock()
	sc.armIdleLocked()
	sc.mu.Unlock()
	sc.readLoop()
}

// readPreface reads the client's connection preface, which must be
// followed by a SETTINGS frame (RFC 9113 §3.4).
func (sc *serverConn) readPreface(deadline time.Time) error {
	sc.tc.SetReadDeadline(deadline)
	defer sc.tc.SetReadDeadline(time.Time{})
	var preface [len(http2.ClientPreface)]byte
	if _, err := io.ReadFull(sc.tc, preface[:]); err != nil {
		return err
	}
	if string(preface[:]) != http2.ClientPreface {
		return errors.New("bad preface")
	}
	f, err := sc.fr.ReadFrame()
	if err != nil {
		return err
	}
	sf, ok := f.(*http2.SettingsFrame)
	if !ok || sf.IsAck() {
		sc.goAway(http2.ErrCodeProtocol)
		return fmt.Errorf("first frame is %v, want SETTINGS", f.Header().Type)
	}
	if err := sc.processSettings(sf); err != nil {
		sc.connError(err)
		return err
	}
	return nil
}

// readLoop reads and processes frames until the connection fails.
func (sc *serverConn) readLoop() {
	for {
		fh, err := sc.fr.ReadFrameHeader()
		if err == nil {
			var f http2.Frame
			if f, err = sc.fr.ReadFrameForHeader(fh); err == nil {
				err = sc.processFrame(f)
			}
		}
		if err == nil {
			continue
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			if fh.Type == http2.FrameHeaders {
				sc.noteStreamID(se.StreamID) // a refused request still used its id
			}
			sc.resetStream(se.StreamID, se.Code, errStreamLocal)
			continue
		}
		if !sc.connError(err) {
			sc.log("hbone: connection ended", "err", err)
		}
		return
	}
}

// connError answers a connection error with GOAWAY; it reports whether
// err was one.
func (sc *serverConn) connError(err error) bool {
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, http2.ErrFrameTooLarge):
		sc.goAway(http2.ErrCodeFrameSize)
	case errors.As(err, &ce):
		sc.goAway(http2.ErrCode(ce))
	default:
		return false
	}
	sc.log("hbone: connection error", "err", err)
	return true
}

func (sc *serverConn) processFrame(f http2.Frame) error {
	switch f := f.(type) {
	case *http2.DataFrame:
		return sc.processData(f)
	case *http2.MetaHeadersFrame:
		return sc.processHeaders(f)
	case *http2.WindowUpdateFrame:
		return sc.processWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return sc.processReset(f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			return nil
		}
		if err := sc.processSettings(f); err != nil {
			return err
		}
		return nil
	case *http2.PingFrame:
		if f.IsAck() {
			return nil
		}
		return sc.writeFrames(func(fr *http2.Framer) error { return fr.WritePing(true, f.Data) })
	case *http2.GoAwayFrame:
		// The client opens no more streams; those open run to their end.
		sc.mu.Lock()
		sc.goingAway = true
		idle := len(sc.streams) == 0
		sc.mu.Unlock()
		if idle {
			sc.close()
		}
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol) // clients must not push (§8.4)
	}
	return nil // PRIORITY and unknown frame types are ignored (§5.3.2, §5.5)
}

// noteStreamID records id as used by the client.
func (sc *serverConn) noteStreamID(id uint32) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if id%2 == 1 && id > sc.maxStreamID {
		sc.maxStreamID = id
	}
}

func (sc *serverConn) processSettings(f *http2.SettingsFrame) error {
	var tableSize uint32
	hasTable := false
	sc.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - int64(sc.peerWindow)
			for _, st := range sc.streams {
				st.sendAvail += delta
				if st.sendAvail > maxWindow {
					return http2.ConnectionError(http2.ErrCodeFlowControl) // §6.9.2
				}
			}
			sc.peerWindow = int32(s.Val)
		case http2.SettingMaxFrameSize:
			sc.peerFrame = s.Val
		case http2.SettingHeaderTableSize:
			tableSize, hasTable = s.Val, true
		}
		return nil
	})
	sc.sendCond.Broadcast()
	sc.mu.Unlock()
	if err != nil {
		return err
	}
	return sc.writeFrames(func(fr *http2.Framer) error {
		if hasTable {
			// We index nothing we send, but must follow a smaller table.
			sc.henc.SetMaxDynamicTableSize(min(tableSize, defaultHeaderTable))
		}
		return fr.WriteSettingsAck()
	})
}

func (sc *serverConn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.StreamID == 0 {
		sc.sendAvail += int64(f.Increment)
		if sc.sendAvail > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		sc.sendCond.Broadcast()
		return nil
	}
	if f.StreamID > sc.maxStreamID {
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream (§5.1)
	}
	st := sc.streams[f.StreamID]
	if st == nil || st.err != nil {
		return nil // closed streams may still see updates in flight
	}
	st.sendAvail += int64(f.Increment)
	if st.sendAvail > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	sc.sendCond.Broadcast()
	return nil
}

func (sc *serverConn) processReset(f *http2.RSTStreamFrame) error {
	sc.mu.Lock()
	if f.StreamID > sc.maxStreamID {
		sc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream (§6.4)
	}
	st := sc.streams[f.StreamID]
	var credit int32
	if st != nil {
		credit = sc.abortLocked(st, errStreamReset)
	}
	sc.mu.Unlock()
	sc.creditConn(credit)
	if st != nil {
		// The peer sent RST_STREAM: we must not answer with frames.
		sc.wmu.Lock()
		st.wclosed = true
		sc.wmu.Unlock()
	}
	return nil
}

func (sc *serverConn) processData(f *http2.DataFrame) error {
	n := int32(f.Length) // padding included: it counts against the windows
	data := f.Data()
	sc.mu.Lock()
	if f.StreamID > sc.maxStreamID {
		sc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream (§5.1)
	}
	if int64(n) > sc.recvAvail {
		sc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	sc.recvAvail -= int64(n)
	st := sc.streams[f.StreamID]
	switch {
	case st == nil || st.err != nil:
		// Closed or reset: the data is dropped, its window given back.
		sc.mu.Unlock()
		sc.creditConn(n)
		return nil
	case st.recvEnd:
		sc.mu.Unlock()
		sc.creditConn(n)
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeStreamClosed} // §5.1
	case n > st.recvAvail:
		sc.mu.Unlock()
		sc.creditConn(n)
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.recvAvail -= n
	st.appendLocked(data)
	if f.StreamEnded() {
		st.recvEnd = true
	}
	sc.mu.Unlock()
	st.wake()
	if pad := n - int32(len(data)); pad > 0 {
		sc.credit(st, pad)
	}
	return nil
}

// appendLocked queues data for toUpstream, in pooled chunks.
func (st *serverStream) appendLocked(data []byte) {
	for len(data) > 0 {
		var b *[]byte
		if k := len(st.recv); k > 0 && len(*st.recv[k-1]) < cap(*st.recv[k-1]) {
			b = st.recv[k-1]
		} else {
			b = recvBufPool.Get().(*[]byte)
			st.recv = append(st.recv, b)
		}
		k := min(cap(*b)-len(*b), len(data))
		*b = append(*b, data[:k]...)
		data = data[k:]
	}
}

func (st *serverStream) wake() {
	select {
	case st.ready <- struct{}{}:
	default:
	}
}

// processHeaders opens a stream, or ends one with trailers.
func (sc *serverConn) processHeaders(f *http2.MetaHeadersFrame) error {
	id := f.StreamID
	if id%2 == 0 {
		return http2.ConnectionError(http2.ErrCodeProtocol) // clients use odd ids (§5.1.1)
	}
	sc.mu.Lock()
	if st := sc.streams[id]; st != nil {
		// Trailers: they end the request body; their fields mean nothing
		// to a tunnel.
		defer sc.mu.Unlock()
		switch {
		case st.err != nil:
			return nil
		case st.recvEnd:
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
		case !f.StreamEnded() || len(f.PseudoFields()) > 0:
			return http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol} // §8.1
		}
		st.recvEnd = true
		st.wake()
		return nil
	}
	if id <= sc.maxStreamID {
		sc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // a stream id reused (§5.1.1)
	}
	sc.maxStreamID = id
	if sc.goingAway || sc.closed || uint32(len(sc.streams)) >= sc.maxStreams {
		sc.mu.Unlock()
		return http2.StreamError{StreamID: id, Code: http2.ErrCodeRefusedStream} // §5.1.2, §6.8
	}
	sc.mu.Unlock()

	req, status, err := sc.parseRequest(f)
	if err != nil {
		return err
	}

	ctx, cancel := context.WithCancel(sc.s.ctx)
	st := &serverStream{
		sc:        sc,
		id:        id,
		ctx:       ctx,
		cancel:    cancel,
		ready:     make(chan struct{}, 1),
		recvAvail: sc.streamWindow,
		recvEnd:   f.StreamEnded(),
	}
	sc.mu.Lock()
	if sc.closed {
		sc.mu.Unlock()
		cancel()
		return nil
	}
	st.sendAvail = int64(sc.peerWindow)
	sc.streams[id] = st
	if sc.idle != nil {
		sc.idle.Stop()
		sc.idle = nil
	}
	sc.mu.Unlock()
	sc.wg.Add(1)
	go sc.runStream(st, req, status)
	return nil
}

// parseRequest checks a request's header block (RFC 9113 §8.3, §8.5) and
// extracts what the Handler sees. A malformed block is a stream error; a
// well-formed request the tunnel refuses gets a status.
func (sc *serverConn) parseRequest(f *http2.MetaHeadersFrame) (*Request, int, error) {
	malformed := http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol}
	method, authority := f.PseudoValue("method"), f.PseudoValue("authority")
	path, scheme := f.PseudoValue("path"), f.PseudoValue("scheme")
	switch {
	case method == "":
		return nil, 0, malformed
	case f.PseudoValue("protocol") != "":
		return nil, 0, malformed // extended CONNECT is not offered (RFC 8441 §4)
	case method == http.MethodConnect && (authority == "" || path != "" || scheme != ""):
		return nil, 0, malformed
	case method != http.MethodConnect && (path == "" || scheme == ""):
		return nil, 0, malformed
	}
	h := make(http.Header, len(f.Fields))
	for _, hf := range f.RegularFields() {
		if !validRequestField(hf) {
			return nil, 0, malformed
		}
		k := http.CanonicalHeaderKey(hf.Name)
		h[k] = append(h[k], hf.Value)
	}
	if f.Truncated {
		return nil, http.StatusRequestHeaderFieldsTooLarge, nil
	}
	req, status := validateRequest(method, authority, h)
	if req != nil {
		req.Peer, req.PeerAddr = sc.info.peer, sc.info.peerAddr
	}
	return req, status, nil
}

// validRequestField reports whether a request may carry hf: HTTP/2 has no
// connection-specific fields (RFC 9113 §8.2.2).
func validRequestField(hf hpack.HeaderField) bool {
	switch hf.Name {
	case "connection", "proxy-connection", "keep-alive", "transfer-encoding", "upgrade":
		return false
	case "te":
		return hf.Value == "trailers"
	}
	return true
}

// runStream asks the handler for the stream's upstream and tunnels to it,
// or answers status when the request was refused already.
func (sc *serverConn) runStream(st *serverStream, req *Request, status int) {
	defer sc.wg.Done()
	defer sc.streamDone(st)
	if status == 0 {
		up, code := sc.s.handler(st.ctx, req)
		if code == http.StatusOK && up != nil {
			sc.tunnel(st, up)
			return
		}
		if up != nil {
			up.Close()
		}
		status = code
		if status == http.StatusOK || status < 200 || status > 999 {
			status = http.StatusServiceUnavailable
		}
	}
	if err := sc.writeHeaders(st, status, true); err != nil {
		return
	}
	sc.mu.Lock()
	rest := !st.recvEnd && st.err == nil
	sc.mu.Unlock()
	if rest {
		// The answer is complete; the request body is not wanted (§8.1).
		sc.resetStream(st.id, http2.ErrCodeNo, errStreamLocal)
	}
}

// tunnel copies the stream to up and back until both directions end.
func (sc *serverConn) tunnel(st *serverStream, up net.Conn) {
	defer up.Close()
	// A reset (by the peer or the connection's end) closes up, which
	// unblocks both copies.
	stop := context.AfterFunc(st.ctx, func() { up.Close() })
	defer stop()
	if err := sc.writeHeaders(st, http.StatusOK, false); err != nil {
		return
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := st.toUpstream(up); err != nil && !st.isReset() {
			// The upstream failed: a proxy says so with CONNECT_ERROR (§8.5).
			sc.resetStream(st.id, http2.ErrCodeConnect, errStreamLocal)
		}
	}()
	if err := st.fromUpstream(up); err != nil && !st.isReset() {
		sc.resetStream(st.id, http2.ErrCodeConnect, errStreamLocal)
	}
	<-done
}

func (st *serverStream) isReset() bool {
	st.sc.mu.Lock()
	defer st.sc.mu.Unlock()
	return st.err != nil
}

// toUpstream writes what the client sends to up and half-closes up at the
// end of the request body.
func (st *serverStream) toUpstream(up net.Conn) error {
	sc := st.sc
	var bufs net.Buffers
	for {
		sc.mu.Lock()
		chunks, end, err := st.recv, st.recvEnd, st.err
		st.recv = nil
		sc.mu.Unlock()
		if err != nil {
			releaseRecv(chunks)
			return err
		}
		if len(chunks) > 0 {
			bufs = bufs[:0]
			n := 0
			for _, b := range chunks {
				bufs = append(bufs, *b)
				n += len(*b)
			}
			// One writev for everything pending, when up is a socket.
			_, werr := bufs.WriteTo(up)
			releaseRecv(chunks)
			if werr != nil {
				return werr
			}
			sc.credit(st, int32(n))
			continue
		}
		if end {
			return closeWrite(up)
		}
		<-st.ready
	}
}

func releaseRecv(chunks []*[]byte) {
	for _, b := range chunks {
		*b = (*b)[:0]
		recvBufPool.Put(b)
	}
}

// fromUpstream sends what up sends as DATA frames, and END_STREAM at its
// end. Each read lands after room for a frame header, so a frame is
// written without copying.
func (st *serverStream) fromUpstream(up net.Conn) error {
	bp := dataBufPool.Get().(*[]byte)
	defer dataBufPool.Put(bp)
	buf := *bp
	for {
		n, rerr := up.Read(buf[frameHeaderLen:])
		if n > 0 {
			if err := st.sc.writeData(st, buf, n); err != nil {
				return err
			}
		}
		if rerr == io.EOF {
			return st.sc.writeEnd(st)
		}
		if rerr != nil {
			return rerr
		}
	}
}

// writeData sends buf[frameHeaderLen:frameHeaderLen+n] as DATA frames,
// as the flow-control windows and the peer's frame size allow. The
// header of each frame goes in the bytes before its payload: the first
// frameHeaderLen bytes of buf, then bytes already sent.
func (sc *serverConn) writeData(st *serverStream, buf []byte, n int) error {
	off := frameHeaderLen
	for n > 0 {
		k, err := sc.awaitSend(st, n)
		if err != nil {
			return err
		}
		frame := buf[off-frameHeaderLen : off+k]
		putFrameHeader(frame, k, http2.FrameData, 0, st.id)
		if err := sc.writeRaw(st, frame); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// awaitSend waits until both windows are open and takes up to n bytes of
// them, at most a frame's worth.
func (sc *serverConn) awaitSend(st *serverStream, n int) (int, error) {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	for st.err == nil && (st.sendAvail <= 0 || sc.sendAvail <= 0) {
		sc.sendCond.Wait()
	}
	if st.err != nil {
		return 0, st.err
	}
	k := int64(min(n, int(sc.peerFrame)))
	k = min(k, st.sendAvail, sc.sendAvail)
	st.sendAvail -= k
	sc.sendAvail -= k
	return int(k), nil
}

func putFrameHeader(b []byte, length int, t http2.FrameType, flags http2.Flags, id uint32) {
	b[0], b[1], b[2] = byte(length>>16), byte(length>>8), byte(length)
	b[3] = byte(t)
	b[4] = byte(flags)
	binary.BigEndian.PutUint32(b[5:9], id&(1<<31-1))
}

// writeRaw writes a prepared DATA frame of st.
func (sc *serverConn) writeRaw(st *serverStream, frame []byte) error {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.werr != nil {
		return sc.werr
	}
	if st.wclosed {
		return errStreamLocal
	}
	err := sc.bw.Flush() // control frames queued before go first
	if err == nil {
		_, err = sc.tc.Write(frame)
	}
	return sc.writeFailedLocked(err)
}

// writeEnd half-closes the stream's sending side.
func (sc *serverConn) writeEnd(st *serverStream) error {
	return sc.writeStreamFrames(st, func(fr *http2.Framer) error {
		st.wclosed = true
		return fr.WriteData(st.id, true, nil)
	})
}

// writeHeaders sends the response status.
func (sc *serverConn) writeHeaders(st *serverStream, status int, end bool) error {
	return sc.writeStreamFrames(st, func(fr *http2.Framer) error {
		sc.hbuf.Reset()
		sc.henc.WriteField(hpack.HeaderField{Name: ":status", Value: statusCode(status)})
		if end {
			st.wclosed = true
		}
		return fr.WriteHeaders(http2.HeadersFrameParam{
			StreamID:      st.id,
			BlockFragment: sc.hbuf.Bytes(),
			EndStream:     end,
			EndHeaders:    true,
		})
	})
}

func statusCode(code int) string {
	if code == http.StatusOK {
		return "200"
	}
	return strconv.Itoa(code)
}

// writeStreamFrames is writeFrames for a stream that may have ended.
func (sc *serverConn) writeStreamFrames(st *serverStream, write func(fr *http2.Framer) error) error {
	return sc.writeFrames(func(fr *http2.Framer) error {
		if st.wclosed {
			return errStreamLocal
		}
		return write(fr)
	})
}

// writeFrames runs write with the framer and flushes.
func (sc *serverConn) writeFrames(write func(fr *http2.Framer) error) error {
	sc.wmu.Lock()
	defer sc.wmu.Unlock()
	if sc.werr != nil {
		return sc.werr
	}
	err := write(sc.fr)
	if errors.Is(err, errStreamLocal) {
		return err
	}
	if err == nil {
		err = sc.bw.Flush()
	}
	return sc.writeFailedLocked(err)
}

// writeFailedLocked closes the connection on a write error: a frame may
// have been cut short.
func (sc *serverConn) writeFailedLocked(err error) error {
	if err != nil && sc.werr == nil {
		sc.werr = err
		sc.raw.Close()
	}
	return err
}

// credit returns n consumed bytes of st to the peer's windows, with
// WINDOW_UPDATE once enough have gathered.
func (sc *serverConn) credit(st *serverStream, n int32) {
	sc.mu.Lock()
	connInc := sc.takeConnCreditLocked(n)
	var streamInc int32
	if st.err == nil && !st.recvEnd {
		st.recvUnsent += n
		if st.recvUnsent >= sc.streamWindow/windowRefreshDivisor {
			streamInc = st.recvUnsent
			st.recvAvail += streamInc
			st.recvUnsent = 0
		}
	}
	sc.mu.Unlock()
	sc.writeWindowUpdates(connInc, st.id, streamInc)
}

// creditConn returns n bytes to the connection's window only.
func (sc *serverConn) creditConn(n int32) {
	if n == 0 {
		return
	}
	sc.mu.Lock()
	connInc := sc.takeConnCreditLocked(n)
	sc.mu.Unlock()
	sc.writeWindowUpdates(connInc, 0, 0)
}

func (sc *serverConn) takeConnCreditLocked(n int32) int32 {
	sc.recvUnsent += n
	if sc.recvUnsent < sc.connWindow/windowRefreshDivisor {
		return 0
	}
	inc := sc.recvUnsent
	sc.recvAvail += int64(inc)
	sc.recvUnsent = 0
	return inc
}

func (sc *serverConn) writeWindowUpdates(connInc int32, id uint32, streamInc int32) {
	if connInc == 0 && streamInc == 0 {
		return
	}
	sc.writeFrames(func(fr *http2.Framer) error {
		if connInc > 0 {
			if err := fr.WriteWindowUpdate(0, uint32(connInc)); err != nil {
				return err
			}
		}
		if streamInc > 0 {
			return fr.WriteWindowUpdate(id, uint32(streamInc))
		}
		return nil
	})
}

// resetStream sends RST_STREAM with code for id and ends the stream if it
// is open.
func (sc *serverConn) resetStream(id uint32, code http2.ErrCode, why error) {
	sc.mu.Lock()
	st := sc.streams[id]
	var credit int32
	if st != nil {
		credit = sc.abortLocked(st, why)
	}
	sc.mu.Unlock()
	sc.creditConn(credit)
	sc.writeFrames(func(fr *http2.Framer) error {
		if st != nil {
			st.wclosed = true
		}
		return fr.WriteRSTStream(id, code)
	})
}

// abortLocked ends st with err: its goroutines stop and its upstream is
// closed. It returns the received bytes dropped, for the connection window.
func (sc *serverConn) abortLocked(st *serverStream, err error) int32 {
	if st.err != nil {
		return 0
	}
	st.err = err
	var dropped int32
	for _, b := range st.recv {
		dropped += int32(len(*b))
	}
	releaseRecv(st.recv)
	st.recv = nil
	st.cancel()
	st.wake()
	sc.sendCond.Broadcast()
	return dropped
}

// streamDone forgets st once its goroutines are done.
func (sc *serverConn) streamDone(st *serverStream) {
	sc.mu.Lock()
	credit := sc.abortLocked(st, errStreamLocal) // a no-op for a finished stream but its context
	delete(sc.streams, st.id)
	last := len(sc.streams) == 0
	if last {
		sc.armIdleLocked()
	}
	closing := last && sc.goingAway
	sc.mu.Unlock()
	sc.creditConn(credit)
	if closing {
		sc.close()
	}
}

// armIdleLocked starts the idle timer of a connection without streams.
func (sc *serverConn) armIdleLocked() {
	if sc.s.opts.IdleTimeout <= 0 || sc.idle != nil {
		return
	}
	sc.idle = time.AfterFunc(sc.s.opts.IdleTimeout, func() {
		sc.mu.Lock()
		idle := len(sc.streams) == 0
		sc.idle = nil
		sc.mu.Unlock()
		if idle {
			sc.goAway(http2.ErrCodeNo)
		}
	})
}

// goAway sends GOAWAY: no stream after the last one opened will be served.
// Open streams run to their end, then the connection closes; with an
// error code, or without open streams, it closes at once.
func (sc *serverConn) goAway(code http2.ErrCode) {
	sc.mu.Lock()
	sc.goingAway = true
	last := sc.maxStreamID
	idle := len(sc.streams) == 0
	sc.mu.Unlock()
	sc.writeFrames(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) })
	if idle || code != http2.ErrCodeNo {
		sc.close()
	}
}

// close closes the connection; the read loop then ends every stream.
func (sc *serverConn) close() {
	sc.closeOnce.Do(func() {
		sc.raw.Close()
		sc.mu.Lock()
		defer sc.mu.Unlock()
		sc.closed = true
		if sc.idle != nil {
			sc.idle.Stop()
			sc.idle = nil
		}
		for _, st := range sc.streams {
			sc.abortLocked(st, errConnClosed)
		}
	})
}
