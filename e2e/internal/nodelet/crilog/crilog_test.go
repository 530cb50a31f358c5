package crilog

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
)

// fixedClock makes records carry a known time.
func fixedClock(t *testing.T) time.Time {
	t.Helper()
	ts := time.Date(2026, 5, 4, 3, 2, 1, 123456789, time.FixedZone("X", 3600))
	old := now
	now = func() time.Time { return ts }
	t.Cleanup(func() { now = old })
	return ts
}

func TestWriterFormatsRecords(t *testing.T) {
	fixedClock(t)
	const ts = "2026-05-04T02:02:01.123456789Z"
	long := strings.Repeat("x", MaxLineSize)
	tests := []struct {
		name   string
		writes []string
		want   string
	}{
		{"one line becomes one full record", []string{"hello\n"}, ts + " stdout F hello\n"},
		{"two lines in one write become two records", []string{"a\nb\n"}, ts + " stdout F a\n" + ts + " stdout F b\n"},
		{"a line split over writes is joined", []string{"he", "llo\n"}, ts + " stdout F hello\n"},
		{"an empty line is an empty full record", []string{"\n"}, ts + " stdout F \n"},
		{"an unterminated line is written partial at close", []string{"tail"}, ts + " stdout P tail\n"},
		{"a line of exactly the limit then more is split", []string{long + "y\n"}, ts + " stdout P " + long + "\n" + ts + " stdout F y\n"},
		{"an unterminated line over the limit is flushed partial", []string{long, "z"}, ts + " stdout P " + long + "\n" + ts + " stdout P z\n"},
		{"a long line over several writes is split at the limit", []string{long[:10], long[10:] + "\n"}, ts + " stdout F " + long + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out bytes.Buffer
			w := NewWriter(&out, Stdout)
			for _, s := range tt.writes {
				if n, err := w.Write([]byte(s)); err != nil || n != len(s) {
					t.Fatalf("Write(%q) = %d, %v", s, n, err)
				}
			}
			if err := w.Close(); err != nil {
				t.Fatal(err)
			}
			if err := w.Close(); err != nil {
				t.Fatalf("second Close: %v", err)
			}
			if got := out.String(); got != tt.want {
				t.Errorf("got\n%q\nwant\n%q", got, tt.want)
			}
			if _, err := w.Write([]byte("x")); !errors.Is(err, ErrClosed) {
				t.Errorf("Write after Close = %v, want ErrClosed", err)
			}
		})
	}
}

// TestWritersSharingAFileDoNotInterleave writes from stdout and stderr
// concurrently to one file and checks every record reads back whole.
func TestWritersSharingAFileDoNotInterleave(t *testing.T) {
	f, err := os.Create(filepath.Join(t.TempDir(), "0.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	out, errw := NewWriter(f, Stdout), NewWriter(f, Stderr)
	const n = 500
	var wg sync.WaitGroup
	for _, w := range []io.WriteCloser{out, errw} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range n {
				// Odd-sized writes so lines straddle Write calls.
				fmt.Fprintf(w, "line %d %s\n", i, strings.Repeat("a", i%97))
			}
			w.Close()
		}()
	}
	wg.Wait()
	if _, err := f.Seek(0, io.SeekStart); err != nil {
		t.Fatal(err)
	}
	r := NewReader(f)
	count := map[string]int{}
	for {
		e, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("line %d %s", count[e.Stream], strings.Repeat("a", count[e.Stream]%97))
		if string(e.Text) != want || e.Partial {
			t.Fatalf("%s record %d = %q partial=%v, want %q", e.Stream, count[e.Stream], e.Text, e.Partial, want)
		}
		count[e.Stream]++
	}
	if count[Stdout] != n || count[Stderr] != n {
		t.Errorf("read %v records, want %d per stream", count, n)
	}
	registryMu.Lock()
	defer registryMu.Unlock()
	if len(registry) != 0 {
		t.Errorf("registry keeps %d writers after Close", len(registry))
	}
}

func TestParseLine(t *testing.T) {
	ts := time.Date(2026, 1, 2, 3, 4, 5, 6, time.UTC)
	tests := []struct {
		name string
		line string
		want Entry
		bad  bool
	}{
		{name: "a full stdout record parses", line: "2026-01-02T03:04:05.000000006Z stdout F hi there\n", want: Entry{Time: ts, Stream: Stdout, Text: []byte("hi there")}},
		{name: "a partial stderr record parses", line: "2026-01-02T03:04:05.000000006Z stderr P part", want: Entry{Time: ts, Stream: Stderr, Partial: true, Text: []byte("part")}},
		{name: "extra tags after a colon are ignored", line: "2026-01-02T03:04:05.000000006Z stdout F:x y", want: Entry{Time: ts, Stream: Stdout, Text: []byte("y")}},
		{name: "a record without text has empty text", line: "2026-01-02T03:04:05.000000006Z stdout F", want: Entry{Time: ts, Stream: Stdout}},
		{name: "a timestamp with an offset is accepted", line: "2026-01-02T04:04:05.000000006+01:00 stdout F a", want: Entry{Time: ts, Stream: Stdout, Text: []byte("a")}},
		{name: "a bad timestamp is malformed", line: "yesterday stdout F a", bad: true},
		{name: "an unknown stream is malformed", line: "2026-01-02T03:04:05Z stdin F a", bad: true},
		{name: "an unknown tag is malformed", line: "2026-01-02T03:04:05Z stdout X a", bad: true},
		{name: "a line with only a timestamp is malformed", line: "2026-01-02T03:04:05Z", bad: true},
		{name: "an empty line is malformed", line: "", bad: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := ParseLine([]byte(tt.line))
			if tt.bad {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !got.Time.Equal(tt.want.Time) || got.Stream != tt.want.Stream || got.Partial != tt.want.Partial || !bytes.Equal(got.Text, tt.want.Text) {
				t.Errorf("got %+v, want %+v", got, tt.want)
			}
		})
	}
}

// TestReaderFollowsAGrowingLog feeds a record in pieces, as a follower sees a
// file being appended to.
func TestReaderFollowsAGrowingLog(t *testing.T) {
	var src bytes.Buffer
	r := NewReader(&src)
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("empty: %v", err)
	}
	src.WriteString("2026-01-02T03:04:05Z stdout F one\n2026-01-02T03:04:05Z std")
	e, err := r.Next()
	if err != nil || string(e.Text) != "one" {
		t.Fatalf("first = %q, %v", e.Text, err)
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("half a record: %v", err)
	}
	src.WriteString("err F two\ngarbage\n2026-01-02T03:04:05Z stdout P cut")
	e, err = r.Next()
	if err != nil || string(e.Text) != "two" || e.Stream != Stderr {
		t.Fatalf("second = %+v, %v", e, err)
	}
	if _, err := r.Next(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("garbage: %v", err)
	}
	if _, err := r.Next(); !errors.Is(err, io.EOF) {
		t.Fatalf("truncated tail: %v", err)
	}
	e, ok := r.Tail()
	if !ok || string(e.Text) != "cut" || !e.Partial {
		t.Fatalf("Tail = %+v, %v", e, ok)
	}
	if _, ok := r.Tail(); ok {
		t.Fatal("Tail twice returned a record")
	}
}

func TestReaderSkipsOversizedLines(t *testing.T) {
	in := strings.Repeat("x", maxRecordSize+10) + "\n2026-01-02T03:04:05Z stdout F ok\n"
	r := NewReader(strings.NewReader(in))
	if _, err := r.Next(); !errors.Is(err, ErrMalformed) {
		t.Fatalf("oversized: %v", err)
	}
	e, err := r.Next()
	if err != nil || string(e.Text) != "ok" {
		t.Fatalf("after oversized = %q, %v", e.Text, err)
	}
}

// FuzzParse checks that no input panics the parser or reader, and that what
// the writer writes always reads back as the same text.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		"2026-01-02T03:04:05.000000006Z stdout F hi\n",
		"2026-01-02T03:04:05Z stderr P part\n2026-01-02T03:04:05Z stderr F rest\n",
		"2026-01-02T03:04:05Z stdout F:x\n",
		"garbage\n\n\n",
		"2026-01-02T03:04:05Z stdout",
		"",
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		ParseLine(data)
		r := NewReader(bytes.NewReader(data))
		for range len(data) + 2 {
			if _, err := r.Next(); errors.Is(err, io.EOF) {
				break
			}
		}
		r.Tail()

		// Round trip: whatever is written comes back byte for byte.
		var out bytes.Buffer
		w := NewWriter(&out, Stderr)
		w.Write(data)
		w.Close()
		var got []byte
		rr := NewReader(&out)
		for {
			e, err := rr.Next()
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("reading back %q: %v", out.Bytes(), err)
			}
			got = append(got, e.Text...)
			if !e.Partial {
				got = append(got, '\n')
			}
		}
		if !bytes.Equal(got, data) {
			t.Fatalf("round trip of %q gave %q", data, got)
		}
	})
}
