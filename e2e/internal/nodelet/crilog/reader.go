package crilog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"time"
)

// ErrMalformed is wrapped by the errors ParseLine and Reader.Next return for
// a line that is not a CRI log record; a reader skips such a line.
var ErrMalformed = errors.New("malformed CRI log line")

// maxRecordSize bounds how much of one line a Reader buffers: a line longer
// than this (no writer of ours makes one) is cut and reported malformed.
const maxRecordSize = 1 << 20

// Entry is one record of a CRI log.
type Entry struct {
	Time   time.Time
	Stream string // Stdout or Stderr
	// Partial says the line goes on in the next record of the same stream.
	Partial bool
	// Text is the record's text without the line's newline. It aliases the
	// Reader's buffer and is valid until the next call to Next.
	Text []byte
}

// ParseLine parses one record, with or without its trailing newline.
func ParseLine(line []byte) (Entry, error) {
	line = bytes.TrimSuffix(line, []byte{'\n'})
	var e Entry
	ts, rest, ok := bytes.Cut(line, []byte{' '})
	if !ok {
		return e, fmt.Errorf("%w: no stream field", ErrMalformed)
	}
	t, err := time.Parse(time.RFC3339Nano, string(ts))
	if err != nil {
		return e, fmt.Errorf("%w: timestamp: %v", ErrMalformed, err)
	}
	stream, rest, ok := bytes.Cut(rest, []byte{' '})
	if !ok {
		return e, fmt.Errorf("%w: no tag field", ErrMalformed)
	}
	switch string(stream) {
	case Stdout:
		e.Stream = Stdout
	case Stderr:
		e.Stream = Stderr
	default:
		return e, fmt.Errorf("%w: unknown stream %q", ErrMalformed, stream)
	}
	// Tags are ':'-separated; the first says full or partial and the CRI
	// reserves the rest for later use.
	tags, text, _ := bytes.Cut(rest, []byte{' '})
	first, _, _ := bytes.Cut(tags, []byte{':'})
	switch {
	case len(first) == 1 && first[0] == tagFull:
	case len(first) == 1 && first[0] == tagPartial:
		e.Partial = true
	default:
		return e, fmt.Errorf("%w: unknown tag %q", ErrMalformed, tags)
	}
	e.Time = t
	e.Text = text
	return e, nil
}

// Reader reads records from a CRI log that may still be growing.
type Reader struct {
	r     io.Reader
	buf   []byte // buf[start:end] is read but not yet returned
	start int
	end   int
	err   error // sticky read error other than io.EOF
}

// NewReader returns a Reader reading records from r.
func NewReader(r io.Reader) *Reader {
	return &Reader{r: r, buf: make([]byte, 32*1024)}
}

// Next returns the next complete (newline-terminated) record. At the end of
// the input it returns io.EOF and keeps an unterminated tail, so a follower
// can call Next again after the file has grown; Tail gives that tail for a
// file that will not grow. A line that does not parse yields an error wrapping
// ErrMalformed and the next call goes on with the following line.
func (r *Reader) Next() (Entry, error) {
	for {
		if i := bytes.IndexByte(r.buf[r.start:r.end], '\n'); i >= 0 {
			line := r.buf[r.start : r.start+i]
			r.start += i + 1
			return ParseLine(line)
		}
		if r.end-r.start >= maxRecordSize {
			// Drop the oversized line up to its end.
			r.start, r.end = 0, 0
			r.skipToNewline()
			return Entry{}, fmt.Errorf("%w: line longer than %d bytes", ErrMalformed, maxRecordSize)
		}
		if err := r.fill(); err != nil {
			return Entry{}, err
		}
	}
}

// Tail parses the unterminated bytes left at the end of the input, for a log
// whose writer died mid-line. It reports false when there are none or they do
// not parse. The tail is consumed.
func (r *Reader) Tail() (Entry, bool) {
	if r.start == r.end {
		return Entry{}, false
	}
	line := r.buf[r.start:r.end]
	r.start = r.end
	e, err := ParseLine(line)
	return e, err == nil
}

// fill reads more input after compacting the buffer; it returns io.EOF when
// nothing more can be read now.
func (r *Reader) fill() error {
	if r.err != nil {
		return r.err
	}
	if r.start > 0 {
		r.end = copy(r.buf, r.buf[r.start:r.end])
		r.start = 0
	}
	if r.end == len(r.buf) {
		nb := make([]byte, min(2*len(r.buf), maxRecordSize+1))
		copy(nb, r.buf[:r.end])
		r.buf = nb
	}
	n, err := r.r.Read(r.buf[r.end:])
	r.end += n
	if n > 0 {
		return nil
	}
	if err == nil {
		return io.EOF // nothing now; a follower tries again later
	}
	if !errors.Is(err, io.EOF) {
		r.err = err
	}
	return err
}

// skipToNewline discards input up to and including the next newline, or to
// the end of what can be read now.
func (r *Reader) skipToNewline() {
	for {
		if err := r.fill(); err != nil {
			return
		}
		if i := bytes.IndexByte(r.buf[r.start:r.end], '\n'); i >= 0 {
			r.start += i + 1
			return
		}
		r.start, r.end = 0, 0
	}
}
