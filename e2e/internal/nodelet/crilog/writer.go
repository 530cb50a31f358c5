// Package crilog writes and reads container logs in the CRI log format, the
// one the kubelet and every CRI runtime use under /var/log/pods:
//
//	<RFC3339Nano UTC time> <stdout|stderr> <F|P> <text>\n
//
// One record per line of output; a line longer than MaxLineSize, or one still
// unterminated when its stream closes, is split into records tagged P
// (partial), and the record that ends it is tagged F (full). nodelet writes a
// container's stdout and stderr through two Writers onto one file; the log
// endpoint of the kubelet API reads it back with a Reader.
package crilog

import (
	"bytes"
	"errors"
	"io"
	"reflect"
	"sync"
	"time"
)

// Stream names, as written in the second field of a record.
const (
	Stdout = "stdout"
	Stderr = "stderr"
)

// Tags, as written in the third field of a record.
const (
	tagFull    = 'F'
	tagPartial = 'P'
)

// MaxLineSize is the longest text one record carries; a longer line is split
// into partial records. 16 KiB is containerd's and CRI-O's default.
const MaxLineSize = 16 * 1024

// ErrClosed is returned by Write after Close.
var ErrClosed = errors.New("crilog: writer closed")

// now is the clock records are stamped with; tests replace it.
var now = time.Now

// Writer turns a byte stream into CRI log records. It buffers at most
// MaxLineSize bytes of an unterminated line.
//
// Two Writers given the same underlying writer (the same *os.File for stdout and
// stderr, say) share one mutex, so their records never interleave; the mutex is
// found by the underlying writer's identity, which needs a comparable value
// (pointers are). A caller that wraps the file differently per stream must pass
// writers that serialize their Write calls themselves.
type Writer struct {
	stream string
	shared *sharedWriter

	mu     sync.Mutex // guards buf and closed; taken before shared.mu
	buf    []byte     // unterminated tail of the line being written
	closed bool
}

// NewWriter returns a Writer that writes records for stream ("stdout" or
// "stderr") to w. Close flushes an unterminated line as a partial record; it
// does not close w.
func NewWriter(w io.Writer, stream string) io.WriteCloser {
	return &Writer{stream: stream, shared: acquire(w)}
}

// Write splits p into lines and writes one record per complete line. It
// reports len(p) once every complete line is written.
func (cw *Writer) Write(p []byte) (int, error) {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	if cw.closed {
		return 0, ErrClosed
	}
	n := len(p)
	for len(p) > 0 {
		i := bytes.IndexByte(p, '\n')
		if i < 0 {
			room := MaxLineSize - len(cw.buf)
			if len(p) < room {
				cw.buf = append(cw.buf, p...)
				break
			}
			cw.buf = append(cw.buf, p[:room]...)
			p = p[room:]
			if err := cw.emitLocked(tagPartial); err != nil {
				return n - len(p), err
			}
			continue
		}
		line := p[:i]
		p = p[i+1:]
		// A line over the limit goes out as partial chunks, the last one full.
		for len(cw.buf)+len(line) > MaxLineSize {
			room := MaxLineSize - len(cw.buf)
			cw.buf = append(cw.buf, line[:room]...)
			line = line[room:]
			if err := cw.emitLocked(tagPartial); err != nil {
				return n - len(p), err
			}
		}
		cw.buf = append(cw.buf, line...)
		if err := cw.emitLocked(tagFull); err != nil {
			return n - len(p), err
		}
	}
	return n, nil
}

// Close writes a pending unterminated line as a partial record. Calling it
// again does nothing.
func (cw *Writer) Close() error {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	if cw.closed {
		return nil
	}
	cw.closed = true
	var err error
	if len(cw.buf) > 0 {
		err = cw.emitLocked(tagPartial)
	}
	release(cw.shared)
	return err
}

// emitLocked writes cw.buf as one record and empties it.
func (cw *Writer) emitLocked(tag byte) error {
	rec := make([]byte, 0, len(cw.buf)+64)
	rec = now().UTC().AppendFormat(rec, time.RFC3339Nano)
	rec = append(rec, ' ')
	rec = append(rec, cw.stream...)
	rec = append(rec, ' ', tag, ' ')
	rec = append(rec, cw.buf...)
	rec = append(rec, '\n')
	cw.buf = cw.buf[:0]

	cw.shared.mu.Lock()
	defer cw.shared.mu.Unlock()
	_, err := cw.shared.w.Write(rec)
	return err
}

// sharedWriter is one underlying writer with the mutex all Writers on it use.
type sharedWriter struct {
	w          io.Writer
	mu         sync.Mutex // serializes w.Write
	registered bool       // in registry; set before publication
	refs       int        // guarded by registryMu
}

var (
	registryMu sync.Mutex
	registry   = map[io.Writer]*sharedWriter{} // guarded by registryMu; comparable writers only
)

func acquire(w io.Writer) *sharedWriter {
	if w == nil || !reflect.TypeOf(w).Comparable() {
		return &sharedWriter{w: w}
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	s, ok := registry[w]
	if !ok {
		s = &sharedWriter{w: w, registered: true}
		registry[w] = s
	}
	s.refs++
	return s
}

func release(s *sharedWriter) {
	if !s.registered {
		return
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	s.refs--
	if s.refs == 0 && registry[s.w] == s {
		delete(registry, s.w)
	}
}
