package hbone

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// The client side of HBONE: a Pool's connection opens CONNECT streams and
// hands each to its caller as a net.Conn. x/net's ClientConn wrote every
// request body from a goroutine per stream (fed through a pipe), passed
// every response frame from its reader through a per-stream pipe, and
// sent a WINDOW_UPDATE for every read of 4 KiB or more. Here a stream's
// Write frames its bytes and writes them to the connection itself,
// waiting only for flow control; the connection's one reader goroutine
// copies DATA into the buffer of a waiting Read, or queues it for the next
// one (the one hand-off that cannot be avoided); and window updates wait
// until a quarter of a window has been read, as on the server side (see
// h2conn.go).

// Why a stream could not be opened on a connection whose server did not
// process it: Connect tries another connection.
var (
	errGoingAway = errors.New("hbone: connection going away")
	errRefused   = errors.New("hbone: stream refused by peer")
	errConnFull  = errors.New("hbone: connection at its stream limit")
)

// retryable reports whether a stream that failed to open with err may be
// opened on another connection.
func retryable(err error) bool {
	return errors.Is(err, errGoingAway) || errors.Is(err, errRefused) ||
		errors.Is(err, errConnFull) || errors.Is(err, errConnClosed)
}

// resetError is why a stream failed when the peer reset it.
type resetError struct{ code http2.ErrCode }

func (e *resetError) Error() string { return errStreamReset.Error() + ": " + e.code.String() }
func (e *resetError) Unwrap() error { return errStreamReset }

// monoBase anchors monoNow, a cheap monotonic clock in nanoseconds.
var monoBase = time.Now()

func monoNow() int64 { return int64(time.Since(monoBase)) }

// clientConn is one HBONE connection of a Pool.
type clientConn struct {
	h2conn
	pingInterval, pingTimeout time.Duration
	// onChange is called, without locks held, once the connection stops
	// taking new streams: GOAWAY received, or closed.
	onChange func()

	streams        map[uint32]*clientStream // guarded by mu
	nextID         uint32                   // guarded by mu; the next stream's id
	peerMaxStreams uint32                   // guarded by mu; the peer's SETTINGS_MAX_CONCURRENT_STREAMS
	peerMaxHeaders uint32                   // guarded by mu; the peer's SETTINGS_MAX_HEADER_LIST_SIZE
	goAwayLast     uint32                   // guarded by mu; the lowest last-stream-id of the GOAWAYs received
	goingAway      bool                     // guarded by mu; GOAWAY received or sent: no new streams
	sentGoAway     bool                     // guarded by mu
	closed         bool                     // guarded by mu
	pingTimer      *time.Timer              // guarded by mu; the next health check
	pingPending    bool                     // guarded by mu; our PING awaits its answer
	pingData       [8]byte                  // guarded by mu; what that PING carries
	pingSeq        uint64                   // guarded by mu

	// Only the reader goroutine uses these.
	gotSettings  bool // the peer's first SETTINGS arrived
	settingsAcks int  // SETTINGS we sent, not yet acknowledged

	lastRead  atomic.Int64 // monoNow of the last frame read
	closeOnce sync.Once
	done      chan struct{} // closed when the reader goroutine ends
}

// clientStream is one CONNECT stream: its Writes are the request body,
// its Reads the response body.
type clientStream struct {
	h2stream
	cc *clientConn
	// pool and pc: the slot Close gives back (nil until Connect returns).
	pool *Pool
	pc   *poolConn

	readMu  sync.Mutex // serializes Reads
	writeMu sync.Mutex // serializes Writes and CloseWrite; guards ended
	ended   bool       // CloseWrite called

	// Guarded by cc.mu.
	status    int   // the response's status; 0 until it arrives
	infoSize  int   // header bytes of the 1xx responses so far
	sentEnd   bool  // END_STREAM written
	closedErr error // set by Close: what reads and writes return
	rExpired  bool  // the read deadline passed

	dlMu      sync.Mutex  // guards rTimer, wTimer, rGen, wGen
	rTimer    *time.Timer // read deadline
	wTimer    *time.Timer // write deadline
	rGen      uint64      // counts read deadlines set, so a replaced timer does nothing
	wGen      uint64
	closeOnce sync.Once
}

// newClientConn starts HTTP/2 over tc (TLS over raw): it sends the
// connection preface and starts the reader and the health checks.
func newClientConn(raw net.Conn, tc transport, pingInterval, pingTimeout time.Duration, onChange func()) (*clientConn, error) {
	cc := &clientConn{
		pingInterval:   pingInterval,
		pingTimeout:    pingTimeout,
		onChange:       onChange,
		streams:        make(map[uint32]*clientStream),
		nextID:         1,
		peerMaxStreams: ^uint32(0), // unlimited until the peer says (§5.1.2)
		peerMaxHeaders: ^uint32(0),
		goAwayLast:     maxStreamID,
		settingsAcks:   1,
		done:           make(chan struct{}),
	}
	cc.init(raw, tc, clientStreamWindow, clientConnWindow)
	err := cc.writeFrames(func(fr *http2.Framer) error {
		if _, err := cc.bw.WriteString(http2.ClientPreface); err != nil {
			return err
		}
		err := fr.WriteSettings(
			http2.Setting{ID: http2.SettingEnablePush, Val: 0},
			http2.Setting{ID: http2.SettingInitialWindowSize, Val: clientStreamWindow},
			http2.Setting{ID: http2.SettingMaxFrameSize, Val: maxReadFrame},
			http2.Setting{ID: http2.SettingMaxHeaderListSize, Val: maxHeaderList},
		)
		if err == nil {
			err = fr.WriteWindowUpdate(0, clientConnWindow-initialWindow)
		}
		return err
	})
	if err != nil {
		return nil, err
	}
	cc.lastRead.Store(monoNow())
	cc.mu.Lock()
	cc.pingTimer = time.AfterFunc(pingInterval, cc.healthCheck)
	cc.mu.Unlock()
	go cc.readLoop()
	return cc, nil
}

// readLoop reads and processes frames until the connection fails.
func (cc *clientConn) readLoop() {
	defer close(cc.done)
	for {
		fh, f, err := cc.readFrame()
		cc.lastRead.Store(monoNow())
		if err == nil {
			err = cc.processFrame(f)
		}
		if err == nil {
			continue
		}
		var se http2.StreamError
		if errors.As(err, &se) {
			if cc.isIdle(se.StreamID) {
				// A stream we never opened cannot be in error (§5.1).
				err = http2.ConnectionError(http2.ErrCodeProtocol)
			} else {
				cc.resetStream(se.StreamID, se.Code, fmt.Errorf("hbone: stream error from peer's %v frame: %w", fh.Type, se))
				continue
			}
		}
		if code, ok := connErrorCode(err); ok {
			// The peer is authenticated but not trusted: a protocol
			// violation ends the connection.
			cc.writeGoAwayAndClose(0, code)
			cc.close(fmt.Errorf("%w: protocol error: %w", errConnClosed, err))
			return
		}
		cc.close(fmt.Errorf("%w: %w", errConnClosed, err))
		return
	}
}

// isIdle reports whether id names a stream we never opened: the peer
// opens none (push is off).
func (cc *clientConn) isIdle(id uint32) bool {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	return cc.isIdleLocked(id)
}

func (cc *clientConn) isIdleLocked(id uint32) bool {
	return id%2 == 0 || id >= cc.nextID
}

func (cc *clientConn) processFrame(f http2.Frame) error {
	if !cc.gotSettings {
		// The server's preface is a SETTINGS frame (RFC 9113 §3.4).
		if sf, ok := f.(*http2.SettingsFrame); !ok || sf.IsAck() {
			return http2.ConnectionError(http2.ErrCodeProtocol)
		}
		cc.gotSettings = true
	}
	switch f := f.(type) {
	case *http2.DataFrame:
		return cc.processData(f)
	case *http2.MetaHeadersFrame:
		return cc.processHeaders(f)
	case *http2.WindowUpdateFrame:
		return cc.processWindowUpdate(f)
	case *http2.RSTStreamFrame:
		return cc.processReset(f)
	case *http2.SettingsFrame:
		if f.IsAck() {
			if cc.settingsAcks == 0 {
				return http2.ConnectionError(http2.ErrCodeProtocol) // an ACK of nothing
			}
			cc.settingsAcks--
			return nil
		}
		return cc.processSettings(f)
	case *http2.PingFrame:
		if f.IsAck() {
			cc.pingAnswered(f.Data)
			return nil
		}
		return cc.writeFrames(func(fr *http2.Framer) error { return fr.WritePing(true, f.Data) })
	case *http2.GoAwayFrame:
		cc.processGoAway(f)
		return nil
	case *http2.PushPromiseFrame:
		return http2.ConnectionError(http2.ErrCodeProtocol) // we disabled push (§8.4)
	}
	return nil // PRIORITY and unknown frame types are ignored (§5.3.2, §5.5)
}

func (cc *clientConn) processSettings(f *http2.SettingsFrame) error {
	return cc.h2conn.processSettings(f, func(each func(*h2stream)) {
		for _, cs := range cc.streams {
			each(&cs.h2stream)
		}
	}, func(s http2.Setting) error {
		switch s.ID {
		case http2.SettingMaxConcurrentStreams:
			cc.peerMaxStreams = s.Val
		case http2.SettingMaxHeaderListSize:
			cc.peerMaxHeaders = s.Val
		case http2.SettingEnablePush:
			if s.Val != 0 {
				return http2.ConnectionError(http2.ErrCodeProtocol) // servers must not (§6.5.2)
			}
		}
		return nil
	})
}

func (cc *clientConn) processWindowUpdate(f *http2.WindowUpdateFrame) error {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if f.StreamID != 0 && cc.isIdleLocked(f.StreamID) {
		return http2.ConnectionError(http2.ErrCodeProtocol) // §5.1
	}
	var st *h2stream
	if cs := cc.streams[f.StreamID]; cs != nil {
		st = &cs.h2stream
	}
	return cc.windowUpdateLocked(f, st)
}

func (cc *clientConn) processData(f *http2.DataFrame) error {
	cc.mu.Lock()
	if cc.isIdleLocked(f.StreamID) {
		cc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // §5.1
	}
	cs := cc.streams[f.StreamID]
	var st *h2stream
	early := cs != nil && cs.status == 0
	if cs != nil && !early {
		st = &cs.h2stream
	}
	drop, pad, wake, err := cc.dataLocked(f, st)
	if err == nil && early {
		err = http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeProtocol} // DATA before the response (§8.1)
	}
	closing := false
	if st != nil && cs.recvEnd {
		closing = cc.maybeForgetLocked(cs)
	}
	cc.mu.Unlock()
	cc.creditConn(drop)
	if wake && !cc.deliver(st) {
		st.wake()
	}
	if pad > 0 {
		cc.credit(st, pad)
	}
	if closing {
		cc.close(errConnClosed)
	}
	return err
}

// processHeaders takes a stream's response, or trailers that end it.
func (cc *clientConn) processHeaders(f *http2.MetaHeadersFrame) error {
	cc.mu.Lock()
	closing, err := cc.headersLocked(f)
	cc.mu.Unlock()
	if closing {
		cc.close(errConnClosed)
	}
	return err
}

func (cc *clientConn) headersLocked(f *http2.MetaHeadersFrame) (closing bool, err error) {
	id := f.StreamID
	if cc.isIdleLocked(id) {
		return false, http2.ConnectionError(http2.ErrCodeProtocol) // the server opens no streams (§5.1, §8.4)
	}
	cs := cc.streams[id]
	if cs == nil || cs.err != nil {
		return false, nil // closed or reset by us; the Framer kept the hpack state
	}
	malformed := http2.StreamError{StreamID: id, Code: http2.ErrCodeProtocol}
	switch {
	case cs.recvEnd:
		return false, http2.StreamError{StreamID: id, Code: http2.ErrCodeStreamClosed}
	case cs.status != 0:
		// Trailers: they end the response; their fields mean nothing to
		// a tunnel.
		if !f.StreamEnded() || len(f.PseudoFields()) > 0 {
			malformed.Cause = errors.New("trailers without END_STREAM or with pseudo-headers")
			return false, malformed // §8.1
		}
	default:
		status, err := responseStatus(f)
		if err != nil {
			malformed.Cause = err
			return false, malformed
		}
		if status < 200 {
			// Informational: the final response follows; bound what the
			// peer may send meanwhile.
			for _, hf := range f.Fields {
				cs.infoSize += int(hf.Size())
			}
			if f.StreamEnded() || cs.infoSize > maxHeaderList {
				malformed.Cause = errors.New("bad informational response")
				return false, malformed
			}
			return false, nil
		}
		cs.status = status
	}
	if f.StreamEnded() {
		cs.recvEnd = true
	}
	cs.wake()
	return cc.maybeForgetLocked(cs), nil
}

// responseStatus checks a response's header block (RFC 9113 §8.3.2) and
// returns its status.
func responseStatus(f *http2.MetaHeadersFrame) (int, error) {
	if f.Truncated {
		return 0, errors.New("response header list too large")
	}
	pf := f.PseudoFields()
	if len(pf) != 1 || pf[0].Name != ":status" {
		return 0, errors.New("response pseudo-headers other than :status")
	}
	v := pf[0].Value
	code, err := strconv.Atoi(v)
	if err != nil || len(v) != 3 || code < 100 || code == http.StatusSwitchingProtocols {
		return 0, fmt.Errorf("bad response status %q", v) // HTTP/2 has no 101 (§8.6)
	}
	return code, nil
}

func (cc *clientConn) processReset(f *http2.RSTStreamFrame) error {
	cc.mu.Lock()
	if cc.isIdleLocked(f.StreamID) {
		cc.mu.Unlock()
		return http2.ConnectionError(http2.ErrCodeProtocol) // §6.4
	}
	cs := cc.streams[f.StreamID]
	if cs == nil {
		cc.mu.Unlock()
		return nil
	}
	var err error = &resetError{code: f.ErrCode}
	if cs.status == 0 && f.ErrCode == http2.ErrCodeRefusedStream {
		err = errRefused // not processed: safe to retry (§8.7)
	}
	// What arrived before the reset is still read (§8.1 asks as much of
	// a complete response followed by RST_STREAM(NO_ERROR)).
	cc.abortLocked(cs, err)
	closing := cc.forgetLocked(cs)
	cc.mu.Unlock()
	// The peer sent RST_STREAM: we must not answer with frames.
	cc.wmu.Lock()
	cs.wclosed = true
	cc.wmu.Unlock()
	if closing {
		cc.close(errConnClosed)
	}
	return nil
}

// processGoAway stops new streams; streams the server did not process
// (above its last stream id) fail so that Connect tries elsewhere; the
// others run to their end, then the connection closes.
func (cc *clientConn) processGoAway(f *http2.GoAwayFrame) {
	cc.mu.Lock()
	cc.goingAway = true
	cc.goAwayLast = min(cc.goAwayLast, f.LastStreamID)
	var gone []*clientStream
	for id, cs := range cc.streams {
		if id > cc.goAwayLast {
			cs.dropRecvLocked()
			cc.abortLocked(cs, errGoingAway)
			cc.forgetLocked(cs)
			gone = append(gone, cs)
		}
	}
	idle := len(cc.streams) == 0
	cc.mu.Unlock()
	cc.wmu.Lock()
	for _, cs := range gone {
		cs.wclosed = true // never processed: nothing more to send
	}
	cc.wmu.Unlock()
	if idle {
		cc.close(errConnClosed)
		return
	}
	cc.onChange()
}

// abortLocked ends cs with err: its waiting reads and writes return.
func (cc *clientConn) abortLocked(cs *clientStream, err error) {
	if cs.err == nil {
		cs.err = err
	}
	cs.wake()
	cc.sendCond.Broadcast()
}

// maybeForgetLocked forgets cs once both its sides have ended; it
// reports whether the connection should now close.
func (cc *clientConn) maybeForgetLocked(cs *clientStream) bool {
	if !cs.recvEnd || !cs.sentEnd {
		return false
	}
	return cc.forgetLocked(cs)
}

// forgetLocked removes cs from the connection's streams; it reports
// whether the connection should now close: it goes away and this was the
// last stream.
func (cc *clientConn) forgetLocked(cs *clientStream) bool {
	if cc.streams[cs.id] != cs {
		return false
	}
	delete(cc.streams, cs.id)
	return cc.goingAway && len(cc.streams) == 0
}

// resetStream sends RST_STREAM with code for id and ends the stream, if
// still open, with err.
func (cc *clientConn) resetStream(id uint32, code http2.ErrCode, err error) {
	cc.mu.Lock()
	cs := cc.streams[id]
	var st *h2stream
	var dropped int32
	closing := false
	if cs != nil {
		st = &cs.h2stream
		dropped = cs.dropRecvLocked()
		cc.abortLocked(cs, err)
		closing = cc.forgetLocked(cs)
	}
	cc.mu.Unlock()
	cc.creditConn(dropped)
	cc.writeReset(id, st, code)
	if closing {
		cc.close(errConnClosed)
	}
}

// healthCheck runs every PingInterval of silence: it sends a PING, and
// closes the connection when the answer has not come PingTimeout later.
func (cc *clientConn) healthCheck() {
	cc.mu.Lock()
	if cc.closed {
		cc.mu.Unlock()
		return
	}
	if cc.pingPending {
		cc.mu.Unlock()
		cc.close(fmt.Errorf("%w: no answer to ping within %v", errConnClosed, cc.pingTimeout))
		return
	}
	if idle := time.Duration(monoNow() - cc.lastRead.Load()); idle < cc.pingInterval {
		cc.pingTimer.Reset(cc.pingInterval - idle)
		cc.mu.Unlock()
		return
	}
	cc.pingSeq++
	binary.BigEndian.PutUint64(cc.pingData[:], cc.pingSeq)
	cc.pingPending = true
	data := cc.pingData
	// Armed before the write: a write stuck on a peer that stopped
	// reading must not hold the check.
	cc.pingTimer.Reset(cc.pingTimeout)
	cc.mu.Unlock()
	cc.writeFrames(func(fr *http2.Framer) error { return fr.WritePing(false, data) })
}

func (cc *clientConn) pingAnswered(data [8]byte) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	if cc.pingPending && data == cc.pingData {
		cc.pingPending = false
		if !cc.closed {
			cc.pingTimer.Reset(cc.pingInterval)
		}
	}
}

// available reports whether the connection takes new streams, and how
// many it may carry at once.
func (cc *clientConn) available() (bool, int) {
	cc.mu.Lock()
	defer cc.mu.Unlock()
	err := cc.openErrLocked()
	return err == nil || err == errConnFull, int(min(cc.peerMaxStreams, 1<<30))
}

// usable reports whether the connection is open and not going away.
func (cc *clientConn) usable() bool {
	ok, _ := cc.available()
	return ok
}

// openErrLocked says why no stream can be opened now, if so.
func (cc *clientConn) openErrLocked() error {
	switch {
	case cc.closed:
		return errConnClosed
	case cc.goingAway || cc.nextID > maxStreamID:
		return errGoingAway
	case uint32(len(cc.streams)) >= cc.peerMaxStreams:
		return errConnFull
	}
	return nil
}

// shutdown tells the server (GOAWAY) and closes the connection; its
// streams fail with err.
func (cc *clientConn) shutdown(err error) {
	cc.mu.Lock()
	send := !cc.closed && !cc.sentGoAway
	cc.sentGoAway = true
	cc.goingAway = true
	cc.mu.Unlock()
	if send {
		cc.writeGoAwayAndClose(0, http2.ErrCodeNo) // the server opens no streams: none to report
	}
	cc.close(err)
}

// close closes the connection; open streams fail with err, after the
// data they have received.
func (cc *clientConn) close(err error) {
	cc.closeOnce.Do(func() {
		cc.raw.Close()
		cc.mu.Lock()
		cc.closed = true
		if cc.pingTimer != nil {
			cc.pingTimer.Stop()
		}
		for _, cs := range cc.streams {
			cc.abortLocked(cs, err)
			delete(cc.streams, cs.id)
		}
		cc.mu.Unlock()
		cc.onChange()
	})
}

// openStream sends a CONNECT for authority and waits, until ctx ends, for
// the response. A stream the server answers with anything but 200 is
// closed and reported as a *StatusError.
func (cc *clientConn) openStream(ctx context.Context, authority string, hdr Headers) (*clientStream, error) {
	fields, size, err := requestFields(authority, hdr)
	if err != nil {
		return nil, err
	}
	cs := &clientStream{cc: cc}
	cs.ready = make(chan struct{}, 1)
	cs.recvAvail = cc.streamWindow

	// Stream ids must be used in order (§5.1.1): the id is taken and the
	// HEADERS written under wmu.
	cc.wmu.Lock()
	cc.mu.Lock()
	if err := cc.openErrLocked(); err != nil {
		cc.mu.Unlock()
		cc.wmu.Unlock()
		return nil, err
	}
	if size > cc.peerMaxHeaders {
		cc.mu.Unlock()
		cc.wmu.Unlock()
		return nil, fmt.Errorf("request headers of %d bytes exceed the server's limit of %d", size, cc.peerMaxHeaders)
	}
	cs.id = cc.nextID
	cc.nextID += 2
	cs.sendAvail = int64(cc.peerWindow)
	cc.streams[cs.id] = cs
	frame := int(cc.peerFrame)
	cc.mu.Unlock()
	err = cc.writeFramesLocked(func(fr *http2.Framer) error {
		cc.hbuf.Reset()
		for _, hf := range fields {
			cc.henc.WriteField(hf)
		}
		block := cc.hbuf.Bytes()
		k := min(len(block), frame)
		err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: cs.id, BlockFragment: block[:k], EndHeaders: k == len(block)})
		for block = block[k:]; err == nil && len(block) > 0; block = block[k:] {
			k = min(len(block), frame)
			err = fr.WriteContinuation(cs.id, k == len(block), block[:k])
		}
		return err
	})
	cc.wmu.Unlock()
	if err != nil {
		err = fmt.Errorf("%w: %w", errConnClosed, err)
		cc.close(err)
		return nil, err
	}

	var status int
	for {
		cc.mu.Lock()
		status, err = cs.status, cs.err
		cc.mu.Unlock()
		if status != 0 {
			break // a reset that followed the response shows on reads
		}
		if err != nil {
			cs.Close()
			return nil, err
		}
		select {
		case <-cs.ready:
		case <-ctx.Done():
			cs.Close()
			return nil, ctx.Err()
		}
	}
	if status != http.StatusOK {
		cs.Close()
		return nil, &StatusError{Code: status}
	}
	return cs, nil
}

// requestFields returns a CONNECT request's header fields and their size
// as SETTINGS_MAX_HEADER_LIST_SIZE counts it.
func requestFields(authority string, hdr Headers) ([]hpack.HeaderField, uint32, error) {
	if authority == "" || !httpguts.ValidHostHeader(authority) {
		return nil, 0, fmt.Errorf("invalid authority %q", authority)
	}
	fields := make([]hpack.HeaderField, 2, 5)
	fields[0] = hpack.HeaderField{Name: ":method", Value: http.MethodConnect}
	fields[1] = hpack.HeaderField{Name: ":authority", Value: authority}
	if hdr.ForwardedFor.IsValid() {
		fields = append(fields, hpack.HeaderField{Name: wireForwarded, Value: formatForwarded(hdr.ForwardedFor)})
	}
	if hdr.Baggage != "" {
		fields = append(fields, hpack.HeaderField{Name: wireBaggage, Value: hdr.Baggage})
	}
	if hdr.Traceparent != "" {
		fields = append(fields, hpack.HeaderField{Name: wireTraceparent, Value: hdr.Traceparent})
	}
	var size uint32
	for _, hf := range fields[2:] {
		if !httpguts.ValidHeaderFieldValue(hf.Value) {
			return nil, 0, fmt.Errorf("invalid %s header value", hf.Name)
		}
	}
	for _, hf := range fields {
		size += hf.Size()
	}
	return fields, size, nil
}

// Read returns what the server sent, then io.EOF once it ended the
// stream; a stream reset by the server or lost with its connection
// returns the data that arrived before, then the error. While Read
// waits, the connection's reader copies DATA into b directly.
func (cs *clientStream) Read(b []byte) (int, error) {
	if len(b) == 0 {
		return 0, nil
	}
	cs.readMu.Lock()
	defer cs.readMu.Unlock()
	cc := cs.cc
	cc.mu.Lock()
	for {
		n := cs.rn // delivered into b while we waited
		cs.rbuf, cs.rn = nil, 0
		if n == 0 && cs.closedErr == nil && !cs.rExpired && len(cs.recv) > 0 {
			n = cs.readLocked(b)
		}
		switch {
		case cs.closedErr != nil:
			cc.mu.Unlock()
			return 0, cs.closedErr
		case n > 0:
			var connInc, streamInc int32
			if !cc.closed {
				connInc, streamInc = cc.creditLocked(&cs.h2stream, int32(n))
			}
			cc.mu.Unlock()
			cc.writeWindowUpdates(connInc, cs.id, streamInc)
			return n, nil
		case cs.rExpired:
			cc.mu.Unlock()
			return 0, os.ErrDeadlineExceeded
		case cs.recvEnd:
			cc.mu.Unlock()
			return 0, io.EOF
		case cs.err != nil:
			cc.mu.Unlock()
			return 0, cs.err
		}
		cs.rbuf = b
		cc.mu.Unlock()
		<-cs.ready
		cc.mu.Lock()
	}
}

// WriteTo writes what the server sends to w until the stream ends (nil)
// or fails, as Read would return it; io.Copy uses it. When w takes bytes
// without waiting (sockio.Conn), the connection's reader goroutine writes
// most of them itself.
func (cs *clientStream) WriteTo(w io.Writer) (int64, error) {
	cs.readMu.Lock()
	defer cs.readMu.Unlock()
	cc := cs.cc
	start := cs.sunk.Load()
	err := cc.drain(&cs.h2stream, w, func() error {
		switch {
		case cs.closedErr != nil:
			return cs.closedErr
		case cs.rExpired:
			return os.ErrDeadlineExceeded
		}
		return nil
	})
	return cs.sunk.Load() - start, err
}

// Write sends b as DATA frames from the caller's goroutine, waiting only
// while the flow-control windows are closed.
func (cs *clientStream) Write(b []byte) (int, error) {
	cs.writeMu.Lock()
	defer cs.writeMu.Unlock()
	if cs.ended {
		return 0, cs.writeErr(net.ErrClosed) // written after CloseWrite
	}
	cc := cs.cc
	n := 0
	for len(b) > 0 {
		k, frame, err := cc.awaitSend(&cs.h2stream, min(len(b), dataChunk), 2)
		if err != nil {
			return n, cs.writeErr(err)
		}
		bp := sendBufPool.Get().(*[]byte)
		buf := *bp
		off := 0
		for p := b[:k]; len(p) > 0; {
			m := min(len(p), int(frame))
			putFrameHeader(buf[off:], m, http2.FrameData, 0, cs.id)
			copy(buf[off+frameHeaderLen:], p[:m])
			off += frameHeaderLen + m
			p = p[m:]
		}
		err = cc.writeRaw(&cs.h2stream, buf[:off])
		sendBufPool.Put(bp)
		if err != nil {
			return n, cs.writeErr(err)
		}
		n += k
		b = b[k:]
	}
	return n, nil
}

// writeErr prefers the reason the stream ended (Close, reset) over how a
// write noticed.
func (cs *clientStream) writeErr(err error) error {
	cc := cs.cc
	cc.mu.Lock()
	defer cc.mu.Unlock()
	switch {
	case cs.closedErr != nil:
		return cs.closedErr
	case errors.Is(err, errStreamLocal) && cs.err != nil:
		return cs.err
	case errors.Is(err, errStreamLocal):
		return net.ErrClosed
	}
	return err
}

// CloseWrite ends the request body (END_STREAM): the server half-closes
// its upstream. Reads continue until the server ends the response. It
// waits for a Write in progress.
func (cs *clientStream) CloseWrite() error {
	cs.writeMu.Lock()
	defer cs.writeMu.Unlock()
	if cs.ended {
		return nil
	}
	cs.ended = true
	cc := cs.cc
	if err := cc.writeEnd(&cs.h2stream); err != nil {
		if errors.Is(err, errStreamLocal) {
			return nil // reset already: there is nothing left to end
		}
		return cs.writeErr(err)
	}
	cc.mu.Lock()
	cs.sentEnd = true
	closing := cc.maybeForgetLocked(cs)
	cc.mu.Unlock()
	if closing {
		cc.close(errConnClosed)
	}
	return nil
}

// Close resets the stream if it is still open, drops what it received
// and did not read, and releases its slot in the pool. It is safe to call
// twice.
func (cs *clientStream) Close() error {
	cs.closeOnce.Do(func() {
		cc := cs.cc
		cc.mu.Lock()
		cs.closedErr = net.ErrClosed
		dropped := cs.dropRecvLocked()
		open := cc.streams[cs.id] == cs
		cc.abortLocked(cs, net.ErrClosed)
		closing := cc.forgetLocked(cs)
		dead := cc.closed
		cc.mu.Unlock()
		if !dead {
			cc.creditConn(dropped)
		}
		if open {
			cc.writeReset(cs.id, &cs.h2stream, http2.ErrCodeCancel)
		}
		if closing {
			cc.close(errConnClosed)
		}
		cs.dlMu.Lock()
		stopTimer(cs.rTimer)
		stopTimer(cs.wTimer)
		cs.rGen++
		cs.wGen++
		cs.dlMu.Unlock()
		if cs.pool != nil {
			cs.pool.release(cs.pc)
		}
	})
	return nil
}

func (cs *clientStream) LocalAddr() net.Addr  { return cs.cc.raw.LocalAddr() }
func (cs *clientStream) RemoteAddr() net.Addr { return cs.cc.raw.RemoteAddr() }

// SetDeadline sets both deadlines.
func (cs *clientStream) SetDeadline(t time.Time) error {
	cs.SetReadDeadline(t)
	return cs.SetWriteDeadline(t)
}

// SetReadDeadline makes reads waiting at t, and later ones, fail with
// os.ErrDeadlineExceeded, as on a socket: the stream stays usable, and a
// new deadline (zero: none) lets reads continue.
func (cs *clientStream) SetReadDeadline(t time.Time) error {
	cs.setDeadline(t, &cs.rTimer, &cs.rGen, func(expired bool) {
		cs.rExpired = expired
		cs.wake()
	})
	return nil
}

// SetWriteDeadline makes writes waiting for flow control at t, and later
// ones, fail with os.ErrDeadlineExceeded; a write in progress on the
// socket itself completes. A new deadline lets writes continue.
func (cs *clientStream) SetWriteDeadline(t time.Time) error {
	cs.setDeadline(t, &cs.wTimer, &cs.wGen, func(expired bool) {
		cs.sendErr = nil
		if expired {
			cs.sendErr = os.ErrDeadlineExceeded
		}
		cs.cc.sendCond.Broadcast()
	})
	return nil
}

// setDeadline replaces a deadline's timer; set records, under cc.mu,
// whether the deadline has passed.
func (cs *clientStream) setDeadline(t time.Time, timer **time.Timer, gen *uint64, set func(expired bool)) {
	cc := cs.cc
	cs.dlMu.Lock()
	defer cs.dlMu.Unlock()
	stopTimer(*timer)
	*timer = nil
	*gen++
	d := time.Until(t)
	cc.mu.Lock()
	set(!t.IsZero() && d <= 0)
	cc.mu.Unlock()
	if t.IsZero() || d <= 0 {
		return
	}
	g := *gen
	*timer = time.AfterFunc(d, func() {
		cs.dlMu.Lock()
		defer cs.dlMu.Unlock()
		if *gen != g {
			return // replaced, or the stream closed
		}
		cc.mu.Lock()
		set(true)
		cc.mu.Unlock()
	})
}

func stopTimer(t *time.Timer) {
	if t != nil {
		t.Stop()
	}
}
