package audit

import (
	"bufio"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/klauspost/compress/zstd"
)

// openSegment opens a segment or export file, decompressing zstd (by
// suffix or by magic) on the fly.
func openSegment(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("audit: %w", err)
	}
	br := bufio.NewReaderSize(f, 256<<10)
	magic, _ := br.Peek(4)
	if strings.HasSuffix(path, ".zst") || string(magic) == "\x28\xb5\x2f\xfd" {
		zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("audit: %s: %w", path, err)
		}
		return readCloser{zr.IOReadCloser(), f}, nil
	}
	return readCloser{io.NopCloser(br), f}, nil
}

type readCloser struct {
	io.ReadCloser
	f *os.File
}

func (r readCloser) Close() error { r.ReadCloser.Close(); return r.f.Close() }

func newLineScanner(r io.Reader) *bufio.Scanner {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), maxLine)
	return sc
}

// Source is one file of records: a segment, current.jsonl, an export.
type Source struct {
	Path string
}

// Sources lists the audit directory's files in chain order: the closed
// segments, then current.jsonl.
func Sources(dir string) ([]Source, error) {
	segs, err := Segments(dir)
	if err != nil {
		return nil, err
	}
	var out []Source
	for _, s := range segs {
		out = append(out, Source{Path: s})
	}
	if _, err := os.Stat(filepath.Join(dir, CurrentFile)); err == nil {
		out = append(out, Source{Path: filepath.Join(dir, CurrentFile)})
	}
	return out, nil
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
			rc, err := openSegment(s.srcs[s.i].Path)
			if err != nil {
				s.err = err
				return false
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
