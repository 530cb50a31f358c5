package hbone

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/ambient-mesh/ambient/pkg/sockio"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
)

// Both ends of HBONE speak HTTP/2 themselves, on x/net's Framer and hpack:
// every stream is a CONNECT tunnel, so neither needs a general HTTP
// implementation's machinery. x/net's Server and ClientConn hand every
// frame between goroutines (a frame reader, a serve loop or per-stream
// body writers, handlers and readers); here the connection's reader
// delivers DATA straight to the stream that consumes it, and a stream
// writes its DATA frames to the connection from its own goroutine.
// h2conn and h2stream are what the two ends share: serialized frame
// writes, flow control on both sides, and the queue of received data.

// HTTP/2 protocol facts (RFC 9113).
const (
	frameHeaderLen = 9
	// initialWindow is every flow-control window until SETTINGS or
	// WINDOW_UPDATE change it (§6.9.2).
	initialWindow = 65535
	maxWindow     = 1<<31 - 1
	// defaultMaxFrame is SETTINGS_MAX_FRAME_SIZE until the peer says more;
	// no peer may announce less (§6.5.2).
	defaultMaxFrame = 16 << 10
	// defaultHeaderTable is SETTINGS_HEADER_TABLE_SIZE until the peer says.
	defaultHeaderTable = 4096
	// maxStreamID is the largest stream identifier (§5.1.1).
	maxStreamID = 1<<31 - 1
)

// Tuning shared by both ends.
const (
	// maxReadFrame is the SETTINGS_MAX_FRAME_SIZE we announce: the largest
	// frame payload a peer may send. It matches dataChunk, so a peer whose
	// reads are as large as ours sends each one in a single frame; the
	// framer's read buffer (one per connection) is this large.
	maxReadFrame = 32 << 10
	// dataChunk is the most one DATA write takes at once: what a server
	// stream reads from its upstream, and what a client stream's Write
	// frames per write to the connection. 32 KiB is two TLS records, sent
	// in one system call (recordBatcher); larger writes saved little more
	// on loopback, and the buffer is held by every server stream.
	dataChunk = 32 << 10
	// recvChunk sizes the pooled buffers that hold received DATA until
	// the stream consumes it; a stream holds none while idle.
	recvChunk = 32 << 10
	// maxHeaderList bounds a header list we accept (SETTINGS_MAX_HEADER_LIST_SIZE).
	maxHeaderList = 64 << 10
	// windowRefreshDivisor: a receive window is topped up once a quarter
	// of it has been consumed, so a sender always has three quarters of it
	// and small exchanges cost no WINDOW_UPDATE at all.
	windowRefreshDivisor = 4
	// closeWriteTimeout bounds the last frame (GOAWAY) written before a
	// connection is closed, so that a peer that stopped reading cannot
	// hold the close.
	closeWriteTimeout = time.Second
)

var (
	// dataBufPool holds a server stream's upstream reads, with room for a
	// frame header in front.
	dataBufPool = &sockio.SyncPool{Pool: sync.Pool{New: func() any { b := make([]byte, frameHeaderLen+dataChunk); return &b }}}
	// sendBufPool holds a client stream's DATA frames while one Write
	// sends them: dataChunk of payload in at most two frames, as no peer
	// announces frames smaller than 16 KiB.
	sendBufPool = sync.Pool{New: func() any { b := make([]byte, 2*frameHeaderLen+dataChunk); return &b }}
	recvBufPool = sync.Pool{New: func() any { b := make([]byte, 0, recvChunk); return &b }}
)

// Why a stream ended early, as its users see it.
var (
	errStreamReset = errors.New("hbone: stream reset by peer")
	errConnClosed  = errors.New("hbone: connection closed")
	errStreamLocal = errors.New("hbone: stream reset")
)

// transport is what a connection speaks HTTP/2 over: TLS (batchedTLS),
// or a plain connection in tests.
type transport interface {
	io.ReadWriter
	SetReadDeadline(t time.Time) error
}

// h2conn is the part of an HTTP/2 connection both ends share.
type h2conn struct {
	raw net.Conn  // the TCP connection; closing it ends everything
	tc  transport // TLS over raw

	streamWindow, connWindow int32 // our receive windows

	// fr reads on the connection's reader goroutine only; its write
	// methods need wmu.
	fr *http2.Framer

	wmu  sync.Mutex    // guards writes to the connection: fr's writes, bw, henc, hbuf, werr, h2stream.wclosed
	bw   *bufio.Writer // control frames, over tc
	henc *hpack.Encoder
	hbuf bytes.Buffer
	werr error // the first write error; the connection is closed then

	mu         sync.Mutex
	sendCond   sync.Cond // uses mu; broadcast when send windows grow or streams end
	sendAvail  int64     // guarded by mu; the connection's send window
	peerWindow int32     // guarded by mu; the peer's SETTINGS_INITIAL_WINDOW_SIZE
	peerFrame  uint32    // guarded by mu; the peer's SETTINGS_MAX_FRAME_SIZE
	recvAvail  int64     // guarded by mu; what the peer may still send on the connection
	recvUnsent int32     // guarded by mu; consumed, not yet returned to the peer
}

// h2stream is the part of a stream both ends share.
type h2stream struct {
	id    uint32
	ready chan struct{} // 1-buffered: received data, end or reset for the stream's consumer

	// Guarded by h2conn.mu.
	recv       []*[]byte // received DATA not yet consumed, pooled
	recvOff    int       // consumed bytes of recv[0]
	rbuf       []byte    // a waiting reader's buffer, taking DATA directly while recv is empty
	rn         int       // bytes delivered to rbuf
	recvAvail  int32     // what the peer may still send
	recvUnsent int32     // consumed, not yet returned to the peer
	recvEnd    bool      // END_STREAM received
	sendAvail  int64     // the peer's window for this stream
	err        error     // why the stream was reset or lost; set once
	sendErr    error     // while set, waiting sends fail with it (a passed write deadline)

	wclosed bool // guarded by h2conn.wmu: END_STREAM or RST_STREAM written

	sink   sockio.TryWriter // guarded by h2conn.mu; where drain writes, when it takes bytes without waiting
	sinkMu sync.Mutex       // held while writing received data to the sink (drain, deliver)
	sunk   atomic.Int64     // bytes drain and deliver wrote
}

func (c *h2conn) init(raw net.Conn, tc transport, streamWindow, connWindow int32) {
	c.raw, c.tc = raw, tc
	c.streamWindow, c.connWindow = streamWindow, connWindow
	c.sendAvail = initialWindow
	c.peerWindow = initialWindow
	c.peerFrame = defaultMaxFrame
	c.recvAvail = int64(connWindow)
	c.sendCond.L = &c.mu
	// Control frames are small; DATA frames bypass bw.
	c.bw = bufio.NewWriterSize(tc, 4<<10)
	c.fr = http2.NewFramer(c.bw, tc)
	c.fr.SetMaxReadFrameSize(maxReadFrame)
	c.fr.SetReuseFrames() // DATA is copied out before the next read
	c.fr.MaxHeaderListSize = maxHeaderList
	c.fr.ReadMetaHeaders = hpack.NewDecoder(defaultHeaderTable, nil)
	c.henc = hpack.NewEncoder(&c.hbuf)
}

// readFrame reads the next frame; fh is its header even when err is set.
func (c *h2conn) readFrame() (fh http2.FrameHeader, f http2.Frame, err error) {
	fh, err = c.fr.ReadFrameHeader()
	if err == nil {
		f, err = c.fr.ReadFrameForHeader(fh)
	}
	return fh, f, err
}

// connErrorCode reports the GOAWAY code for a connection error, and
// whether err is one.
func connErrorCode(err error) (http2.ErrCode, bool) {
	var ce http2.ConnectionError
	switch {
	case errors.Is(err, http2.ErrFrameTooLarge):
		return http2.ErrCodeFrameSize, true
	case errors.As(err, &ce):
		return http2.ErrCode(ce), true
	}
	return 0, false
}

// processSettings applies the peer's SETTINGS and acknowledges them.
// streams calls its argument for every open stream (§6.9.2: a new initial
// window changes theirs); other, side-specific settings go to extra. Both
// run with mu held.
func (c *h2conn) processSettings(f *http2.SettingsFrame, streams func(func(*h2stream)), extra func(http2.Setting) error) error {
	var tableSize uint32
	hasTable := false
	c.mu.Lock()
	err := f.ForeachSetting(func(s http2.Setting) error {
		if err := s.Valid(); err != nil {
			return err
		}
		switch s.ID {
		case http2.SettingInitialWindowSize:
			delta := int64(s.Val) - int64(c.peerWindow)
			overflow := false
			streams(func(st *h2stream) {
				st.sendAvail += delta
				overflow = overflow || st.sendAvail > maxWindow
			})
			if overflow {
				return http2.ConnectionError(http2.ErrCodeFlowControl)
			}
			c.peerWindow = int32(s.Val)
		case http2.SettingMaxFrameSize:
			c.peerFrame = s.Val
		case http2.SettingHeaderTableSize:
			tableSize, hasTable = s.Val, true
		default:
			if extra != nil {
				return extra(s)
			}
		}
		return nil
	})
	c.sendCond.Broadcast()
	c.mu.Unlock()
	if err != nil {
		return err
	}
	return c.writeFrames(func(fr *http2.Framer) error {
		if hasTable {
			// We index what we send in at most the default table, and must
			// follow a smaller one.
			c.henc.SetMaxDynamicTableSize(min(tableSize, defaultHeaderTable))
		}
		return fr.WriteSettingsAck()
	})
}

// windowUpdateLocked applies a WINDOW_UPDATE for the connection (stream
// 0) or for st (nil when the stream is closed).
func (c *h2conn) windowUpdateLocked(f *http2.WindowUpdateFrame, st *h2stream) error {
	if f.StreamID == 0 {
		c.sendAvail += int64(f.Increment)
		if c.sendAvail > maxWindow {
			return http2.ConnectionError(http2.ErrCodeFlowControl)
		}
		c.sendCond.Broadcast()
		return nil
	}
	if st == nil || st.err != nil {
		return nil // closed streams may still see updates in flight
	}
	st.sendAvail += int64(f.Increment)
	if st.sendAvail > maxWindow {
		return http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	c.sendCond.Broadcast()
	return nil
}

// dataLocked accounts for DATA frame f, of stream st (nil when the stream
// is closed or unknown), against the receive windows and queues its data
// on st. It returns what goes back to the peer's windows right away
// (dropped data and padding: connCredit on the connection, streamCredit
// also on st), whether data was queued or the stream ended (wake st's
// consumer), and a stream or connection error.
func (c *h2conn) dataLocked(f *http2.DataFrame, st *h2stream) (connCredit, streamCredit int32, wake bool, err error) {
	n := int32(f.Length) // padding included: it counts against the windows
	if int64(n) > c.recvAvail {
		return 0, 0, false, http2.ConnectionError(http2.ErrCodeFlowControl)
	}
	c.recvAvail -= int64(n)
	switch {
	case st == nil || st.err != nil:
		// Closed or reset: the data is dropped, its window given back.
		return n, 0, false, nil
	case st.recvEnd:
		return n, 0, false, http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeStreamClosed} // §5.1
	case n > st.recvAvail:
		return n, 0, false, http2.StreamError{StreamID: f.StreamID, Code: http2.ErrCodeFlowControl}
	}
	st.recvAvail -= n
	data := f.Data()
	st.appendLocked(data)
	if f.StreamEnded() {
		st.recvEnd = true
	}
	pad := n - int32(len(data))
	return 0, pad, len(data) > 0 || st.recvEnd, nil
}

// appendLocked hands data to the stream's consumer: into the buffer of a
// waiting reader, or queued in pooled chunks.
func (st *h2stream) appendLocked(data []byte) {
	if st.rbuf != nil && len(st.recv) == 0 {
		k := copy(st.rbuf[st.rn:], data)
		st.rn += k
		data = data[k:]
		if st.rn == len(st.rbuf) {
			st.rbuf = nil
		}
	}
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

// readLocked moves queued data to p and reports how much.
func (st *h2stream) readLocked(p []byte) int {
	n := 0
	for n < len(p) && len(st.recv) > 0 {
		b := *st.recv[0]
		k := copy(p[n:], b[st.recvOff:])
		n += k
		st.recvOff += k
		if st.recvOff == len(b) {
			// Shift down rather than reslice: the slice's array (a few
			// pointers) is reused by the next chunks.
			releaseRecv(st.recv[:1])
			k := copy(st.recv, st.recv[1:])
			st.recv[k] = nil
			st.recv = st.recv[:k]
			st.recvOff = 0
		}
	}
	return n
}

// takeRecvLocked hands over every queued chunk; the caller releases them.
func (st *h2stream) takeRecvLocked() []*[]byte {
	chunks := st.recv
	st.recv = nil
	return chunks
}

// dropRecvLocked releases the queued data and reports how much it was.
func (st *h2stream) dropRecvLocked() int32 {
	dropped := int32(st.rn)
	st.rbuf, st.rn = nil, 0
	for _, b := range st.recv {
		dropped += int32(len(*b))
	}
	dropped -= int32(st.recvOff)
	releaseRecv(st.recv)
	clear(st.recv)
	st.recv, st.recvOff = st.recv[:0], 0
	return dropped
}

func releaseRecv(chunks []*[]byte) {
	for _, b := range chunks {
		*b = (*b)[:0]
		recvBufPool.Put(b)
	}
}

// drain writes what st receives to w until the stream's data ends (nil)
// or it fails. When w is a sockio.TryWriter, the connection's reader
// goroutine writes the stream's data itself (deliver) as far as w takes
// it without waiting, rather than waking drain for every frame: at a
// request per frame, that hand-over and the thread the scheduler woke for
// it cost more than the write. stopped, called with c.mu held, gives a reason to stop
// early besides the stream's own error (nil: none).
func (c *h2conn) drain(st *h2stream, w io.Writer, stopped func() error) error {
	if tw, ok := w.(sockio.TryWriter); ok {
		c.mu.Lock()
		st.sink = tw
		c.mu.Unlock()
		defer func() {
			st.sinkMu.Lock() // a delivery in progress finishes first
			c.mu.Lock()
			st.sink = nil
			c.mu.Unlock()
			st.sinkMu.Unlock()
		}()
	}
	var bufs net.Buffers
	for {
		st.sinkMu.Lock()
		c.mu.Lock()
		if err := st.err; err != nil {
			c.mu.Unlock()
			st.sinkMu.Unlock()
			return err
		}
		if stopped != nil {
			if err := stopped(); err != nil {
				c.mu.Unlock()
				st.sinkMu.Unlock()
				return err // what arrived stays for the next read
			}
		}
		chunks, end := st.takeRecvLocked(), st.recvEnd
		c.mu.Unlock()
		if len(chunks) > 0 {
			bufs = bufs[:0]
			n := 0
			for _, b := range chunks {
				bufs = append(bufs, *b)
				n += len(*b)
			}
			// Everything pending at once: one writev when w is a bare
			// *net.TCPConn, a write per chunk through wrappers (most of
			// the data went through deliver anyway).
			wn, werr := bufs.WriteTo(w)
			st.sunk.Add(wn)
			st.sinkMu.Unlock()
			releaseRecv(chunks)
			if werr != nil {
				return werr
			}
			c.credit(st, int32(n))
			continue
		}
		st.sinkMu.Unlock()
		if end {
			return nil
		}
		<-st.ready
	}
}

// deliver writes what st received to its sink, on the connection's reader
// goroutine, as far as the sink takes it without waiting and drain is not
// writing. It reports whether it left nothing for drain to do; the end of
// the stream is always left to drain.
func (c *h2conn) deliver(st *h2stream) bool {
	if !st.sinkMu.TryLock() {
		return false // drain is writing; it takes the data next
	}
	c.mu.Lock()
	sink := st.sink
	if sink == nil || st.err != nil || st.recvEnd {
		c.mu.Unlock()
		st.sinkMu.Unlock()
		return false
	}
	chunks := st.takeRecvLocked()
	c.mu.Unlock()

	written, i := 0, 0
	for ; i < len(chunks); i++ {
		b := chunks[i]
		n, err := sink.TryWrite(*b)
		written += n
		if n < len(*b) || err != nil {
			// The rest waits for drain, which also meets the error.
			*b = append((*b)[:0], (*b)[n:]...)
			break
		}
	}
	st.sunk.Add(int64(written))
	releaseRecv(chunks[:i])
	rest := chunks[i:]
	var dropped int32
	if len(rest) > 0 {
		c.mu.Lock()
		if st.err != nil {
			// Ended meanwhile: the data is dropped, its window given back.
			for _, b := range rest {
				dropped += int32(len(*b))
			}
			releaseRecv(rest)
		} else {
			// Only this goroutine queues data, so nothing came after.
			st.recv = append(rest, st.recv...)
		}
		c.mu.Unlock()
	}
	// Window updates may wait for the peer to read; drain need not wait
	// for them.
	st.sinkMu.Unlock()
	c.creditConn(dropped)
	if written > 0 {
		c.credit(st, int32(written))
	}
	return len(rest) == 0
}

func (st *h2stream) wake() {
	select {
	case st.ready <- struct{}{}:
	default:
	}
}

// awaitSend waits until both windows are open and takes up to n bytes of
// them, at most maxFrames frames' worth. It also returns the peer's frame
// size, which splits them.
func (c *h2conn) awaitSend(st *h2stream, n, maxFrames int) (int, uint32, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for {
		switch {
		case st.err != nil:
			return 0, 0, st.err
		case st.sendErr != nil:
			return 0, 0, st.sendErr
		case st.sendAvail > 0 && c.sendAvail > 0:
			k := min(int64(n), int64(maxFrames)*int64(c.peerFrame), st.sendAvail, c.sendAvail)
			st.sendAvail -= k
			c.sendAvail -= k
			return int(k), c.peerFrame, nil
		}
		c.sendCond.Wait()
	}
}

func putFrameHeader(b []byte, length int, t http2.FrameType, flags http2.Flags, id uint32) {
	b[0], b[1], b[2] = byte(length>>16), byte(length>>8), byte(length)
	b[3] = byte(t)
	b[4] = byte(flags)
	binary.BigEndian.PutUint32(b[5:9], id&(1<<31-1))
}

// writeRaw writes prepared DATA frames of st.
func (c *h2conn) writeRaw(st *h2stream, frames []byte) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	if c.werr != nil {
		return c.werr
	}
	if st.wclosed {
		return errStreamLocal
	}
	err := c.bw.Flush() // control frames queued before go first
	if err == nil {
		_, err = c.tc.Write(frames)
	}
	return c.writeFailedLocked(err)
}

// writeEnd half-closes the stream's sending side (END_STREAM).
func (c *h2conn) writeEnd(st *h2stream) error {
	return c.writeStreamFrames(st, func(fr *http2.Framer) error {
		st.wclosed = true
		return fr.WriteData(st.id, true, nil)
	})
}

// writeStreamFrames is writeFrames for a stream that may have ended.
func (c *h2conn) writeStreamFrames(st *h2stream, write func(fr *http2.Framer) error) error {
	return c.writeFrames(func(fr *http2.Framer) error {
		if st.wclosed {
			return errStreamLocal
		}
		return write(fr)
	})
}

// writeFrames runs write with the framer and flushes.
func (c *h2conn) writeFrames(write func(fr *http2.Framer) error) error {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	return c.writeFramesLocked(write)
}

// writeFramesLocked is writeFrames with wmu held.
func (c *h2conn) writeFramesLocked(write func(fr *http2.Framer) error) error {
	if c.werr != nil {
		return c.werr
	}
	err := write(c.fr)
	if errors.Is(err, errStreamLocal) {
		return err
	}
	if err == nil {
		err = c.bw.Flush()
	}
	return c.writeFailedLocked(err)
}

// writeFailedLocked closes the connection on a write error: a frame may
// have been cut short.
func (c *h2conn) writeFailedLocked(err error) error {
	if err != nil && c.werr == nil {
		c.werr = err
		c.raw.Close()
	}
	return err
}

// writeReset sends RST_STREAM with code for stream id; st, when the
// stream is still known, sends nothing after it.
func (c *h2conn) writeReset(id uint32, st *h2stream, code http2.ErrCode) {
	c.writeFrames(func(fr *http2.Framer) error {
		if st != nil {
			st.wclosed = true
		}
		return fr.WriteRSTStream(id, code)
	})
}

// writeGoAwayAndClose sends GOAWAY and closes the connection; a peer that
// does not read gets closeWriteTimeout to take the frame.
func (c *h2conn) writeGoAwayAndClose(last uint32, code http2.ErrCode) {
	c.raw.SetWriteDeadline(time.Now().Add(closeWriteTimeout))
	c.writeFrames(func(fr *http2.Framer) error { return fr.WriteGoAway(last, code, nil) })
	c.raw.Close()
}

// creditLocked counts n consumed bytes of st for the peer's windows and
// returns the WINDOW_UPDATE increments due, once enough have gathered.
func (c *h2conn) creditLocked(st *h2stream, n int32) (connInc, streamInc int32) {
	connInc = c.takeConnCreditLocked(n)
	if st.err == nil && !st.recvEnd {
		st.recvUnsent += n
		if st.recvUnsent >= c.streamWindow/windowRefreshDivisor {
			streamInc = st.recvUnsent
			st.recvAvail += streamInc
			st.recvUnsent = 0
		}
	}
	return connInc, streamInc
}

// credit returns n consumed bytes of st to the peer's windows, with
// WINDOW_UPDATE once enough have gathered.
func (c *h2conn) credit(st *h2stream, n int32) {
	c.mu.Lock()
	connInc, streamInc := c.creditLocked(st, n)
	c.mu.Unlock()
	c.writeWindowUpdates(connInc, st.id, streamInc)
}

// creditConn returns n bytes to the connection's window only.
func (c *h2conn) creditConn(n int32) {
	if n == 0 {
		return
	}
	c.mu.Lock()
	connInc := c.takeConnCreditLocked(n)
	c.mu.Unlock()
	c.writeWindowUpdates(connInc, 0, 0)
}

func (c *h2conn) takeConnCreditLocked(n int32) int32 {
	c.recvUnsent += n
	if c.recvUnsent < c.connWindow/windowRefreshDivisor {
		return 0
	}
	inc := c.recvUnsent
	c.recvAvail += int64(inc)
	c.recvUnsent = 0
	return inc
}

func (c *h2conn) writeWindowUpdates(connInc int32, id uint32, streamInc int32) {
	if connInc == 0 && streamInc == 0 {
		return
	}
	c.writeFrames(func(fr *http2.Framer) error {
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
