package audit

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// openSegment opens a segment or export file, decompressing zstd (by
// suffix or by magic) on the fly.
func openSegment(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	return readSegment(f, path)
}

func readSegment(f *os.File, path string) (io.ReadCloser, error) {
	return readFrom(f, f, path)
}

// readFrom reads r (closing c at the end), decompressing zstd.
func readFrom(r io.Reader, c io.Closer, path string) (io.ReadCloser, error) {
	br := bufio.NewReaderSize(r, 256<<10)
	magic, _ := br.Peek(4)
	if strings.HasSuffix(path, ".zst") || string(magic) == "\x28\xb5\x2f\xfd" {
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("audit: %s: %w", path, err)
		}
		return readCloser{zr.IOReadCloser(), c}, nil
	}
	return readCloser{io.NopCloser(br), c}, nil
}

type readCloser struct {
	io.ReadCloser
	c io.Closer
}

func (r readCloser) Close() error { r.ReadCloser.Close(); return r.c.Close() }

type nopCloser struct{}

func (nopCloser) Close() error { return nil }

type limited struct {
	io.Reader
	io.Closer
}

func newLineScanner(r io.Reader) *bufio.Scanner {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	return sc
}

// Source is one file of records: a segment, current.jsonl, an export.
type Source struct {
	Path string
	// Limit, if positive, reads only this many bytes: what was complete
	// when a live log was looked at (appenders may be mid-write after it).
	Limit int64
	// f is the file opened at the snapshot: a rotation may rename or
	// remove the path meanwhile, never this file's bytes.
	f *os.File
}

// Sources lists the audit directory's files in chain order: the closed
// segments, then current.jsonl up to its size at this instant.
func Sources(dir string) ([]Source, error) {
	srcs, _, err := Snapshot(dir)
	return srcs, err
}

// Snapshot is Sources and the head file's line, taken together under the
// appenders' lock for a moment, so that a log being written reads as a
// consistent prefix (no half-written last record, no head ahead of it).
func Snapshot(dir string) (srcs []Source, head string, err error) {
	if lf, err := os.OpenFile(filepath.Join(dir, lockFile), os.O_RDWR, 0); err == nil {
		defer lf.Close()
		if err := unix.Flock(int(lf.Fd()), unix.LOCK_EX); err == nil {
			defer unix.Flock(int(lf.Fd()), unix.LOCK_UN)
		}
	}
	segs, err := Segments(dir)
	if err != nil {
		return nil, "", err
	}
	for _, s := range segs {
		src := Source{Path: s}
		if strings.HasSuffix(s, ".jsonl") { // compression removes it soon
			if src.f, err = os.Open(s); err != nil {
				return nil, "", fmt.Errorf("audit: %w", err)
			}
		}
		srcs = append(srcs, src)
	}
	if f, err := os.Open(filepath.Join(dir, CurrentFile)); err == nil {
		if st, err := f.Stat(); err == nil && st.Size() > 0 {
			srcs = append(srcs, Source{Path: f.Name(), Limit: st.Size(), f: f})
		} else {
			f.Close()
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, HeadFile))
	if err != nil && !os.IsNotExist(err) {
		return nil, "", fmt.Errorf("audit: %w", err)
	}
	return srcs, string(b), nil
}

// Line is one line of a source, as read.
type Line struct {
	Source string
	N      int    // line number in the source, from 1
	Bytes  []byte // without the newline; valid until the next Scan
	Torn   bool   // the source's last line had no newline
}

// Scanner reads the lines of sources in order, in constant memory.
type Scanner struct {
	srcs []Source
	i    int
	rc   io.ReadCloser
	br   *bufio.Reader
	line Line
	buf  []byte
	err  error
}

// NewScanner reads srcs in order.
func NewScanner(srcs []Source) *Scanner { return &Scanner{srcs: srcs, i: -1} }

// Scan advances to the next line.
func (s *Scanner) Scan() bool {
	for s.err == nil {
		if s.br == nil {
			if s.i+1 >= len(s.srcs) {
				return false
			}
			s.i++
			src := s.srcs[s.i]
			var rc io.ReadCloser
			var err error
			if src.f != nil { // read at offsets: the snapshot may be read again
				rc, err = readFrom(io.NewSectionReader(src.f, 0, 1<<62), nopCloser{}, src.Path)
			} else {
				rc, err = openSegment(src.Path)
			}
			if err != nil {
				s.err = err
				return false
			}
			if n := s.srcs[s.i].Limit; n > 0 {
				rc = limited{io.LimitReader(rc, n), rc}
			}
			s.rc, s.br, s.line = rc, bufio.NewReaderSize(rc, 256<<10), Line{Source: s.srcs[s.i].Path}
		}
		b, err := s.br.ReadSlice('\n')
		if err == bufio.ErrBufferFull {
			s.buf = append(s.buf[:0], b...)
			for err == bufio.ErrBufferFull && len(s.buf) < maxLine {
				b, err = s.br.ReadSlice('\n')
				s.buf = append(s.buf, b...)
			}
			b = s.buf
		}
		if err != nil && err != io.EOF {
			s.err = fmt.Errorf("audit: %s: %w", s.srcs[s.i].Path, err)
			return false
		}
		if len(b) == 0 && err == io.EOF {
			s.rc.Close()
			s.br = nil
			continue
		}
		s.line.N++
		s.line.Torn = b[len(b)-1] != '\n'
		if !s.line.Torn {
			b = b[:len(b)-1]
		}
		s.line.Bytes = b
		return true
	}
	return false
}

// Line is the current line.
func (s *Scanner) Line() *Line { return &s.line }

// Err is the first read error.
func (s *Scanner) Err() error { return s.err }

// Close releases the open source.
func (s *Scanner) Close() {
	if s.br != nil {
		s.rc.Close()
		s.br = nil
	}
}

// SourceIndex is the index in srcs of the current line's source.
func (s *Scanner) SourceIndex() int { return s.i }
