package hbone

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The server side of HBONE: every stream is a CONNECT tunnel, handed to
// the Server's Handler and copied to and from its upstream. See h2conn.go
// for what it shares with the client side.

// serverConn is one HBONE connection on the server side.
type serverConn struct {
	h2conn // raw is the accepted connection, streamWindow and connWindow are ServerOptions'
	s      *Server
	info   connInfo
	log    func(msg string, args ...any)

	maxStreams uint32 // ServerOptions.MaxConcurrentStreams

	streams     map[uint32]*serverStream // guarded by mu
	maxStreamID uint32                   // guarded by mu; highest stream the client opened
	goingAway   bool                     // guarded by mu; GOAWAY sent or received: no new streams
	closed      bool                     // guarded by mu; the connection is closed
	idle        *time.Timer              // guarded by mu; armed while there is no stream (IdleTimeout)

	wg        sync.WaitGroup // stream goroutines
	closeOnce sync.Once
}

// serverStream is one CONNECT stream.
type serverStream struct {
	h2stream // its consumer is toUpstream
	sc       *serverConn
	ctx      context.Context // ends with the stream; the handler's
	cancel   context.CancelFunc
}

func newServerConn(s *Server, raw net.Conn, tc transport, info connInfo) *serverConn {
	sc := &serverConn{
		s:          s,
		info:       info,
		maxStreams: s.opts.MaxConcurrentStreams,
		streams:    make(map[uint32]*serverStream),
	}
	sc.init(raw, tc, s.opts.StreamWindow, s.opts.ConnWindow)
	sc.log = func(msg string, args ...any) {
		s.log.Debug(msg, append([]any{"peer", raw.RemoteAddr()}, args...)...)
	}
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
		fh, f, err := sc.readFrame()
		if err == nil {
			err = sc.processFrame(f)
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
	code, ok := connErrorCode(err)
	if !ok {
		return false
	}
	sc.goAway(code)
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
		return sc.processSettings(f)
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
	return sc.h2conn.processSettings(f, func(each func(*h2stream)) {
		for _, st := range sc.streams {
			each(&st.h2stream)
		}
	}, nil)
}

func (sc *serverConn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	sc.mu.Lock()
	defer sc.mu.Unlock()
	if f.StreamID > sc.maxStreamID {
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream (§5.1)
	}
	var st *h2stream
	if s := sc.streams[f.StreamID]; s != nil {
		st = &s.h2stream
	}
	return sc.windowUpdateLocked(f, st)
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
	sc.mu.Lock()
	if f.StreamID > sc.maxStreamID {
		sc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // idle stream (§5.1)
	}
	var st *h2stream
	if s := sc.streams[f.StreamID]; s != nil {
		st = &s.h2stream
	}
	drop, pad, wake, err := sc.dataLocked(f, st)
	sc.mu.Unlock()
	sc.creditConn(drop)
	if wake && !sc.deliver(st) {
		st.wake()
	}
	if pad > 0 {
		sc.credit(st, pad)
	}
	return err
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
		h2stream: h2stream{
			id:        id,
			ready:     make(chan struct{}, 1),
			recvAvail: sc.streamWindow,
			recvEnd:   f.StreamEnded(),
		},
		sc:     sc,
		ctx:    ctx,
		cancel: cancel,
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
	if err := st.sc.drain(&st.h2stream, up, nil); err != nil {
		return err
	}
	return closeWrite(up)
}

// fromUpstream sends what up sends as DATA frames, and END_STREAM at its
// end. Each read lands after room for a frame header, so a frame is
// written without copying.
//
// A socket upstream (sockio) lends the buffer only while it has data, so
// a stream waiting for its upstream holds none.
func (st *serverStream) fromUpstream(up net.Conn) error {
	for {
		bp, n, rerr := sockio.ReadPooled(up, dataBufPool, frameHeaderLen)
		if n > 0 {
			err := st.sc.writeData(st, *bp, n)
			dataBufPool.Put(bp)
			if err != nil {
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
		k, _, err := sc.awaitSend(&st.h2stream, n, 1)
		if err != nil {
			return err
		}
		b := buf[off-frameHeaderLen : off+k]
		putFrameHeader(b, k, http2.FrameData, 0, st.id)
		if err := sc.writeRaw(&st.h2stream, b); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// writeEnd half-closes the stream's sending side.
func (sc *serverConn) writeEnd(st *serverStream) error {
	return sc.h2conn.writeEnd(&st.h2stream)
}

// writeHeaders sends the response status.
func (sc *serverConn) writeHeaders(st *serverStream, status int, end bool) error {
	return sc.writeStreamFrames(&st.h2stream, func(fr *http2.Framer) error {
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
	var hs *h2stream
	if st != nil {
		hs = &st.h2stream
	}
	sc.writeReset(id, hs, code)
}

// abortLocked ends st with err: its goroutines stop and its upstream is
// closed. It returns the received bytes dropped, for the connection window.
func (sc *serverConn) abortLocked(st *serverStream, err error) int32 {
	if st.err != nil {
		return 0
	}
	st.err = err
	dropped := st.dropRecvLocked()
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
