package audit

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/klauspost/compress/zstd"
)

// ExportOptions select and shape an export.
type ExportOptions struct {
	Since, Until time.Time // zero: unbounded; Until is exclusive
	Volume       string
	Identity     string
	Format       string // "jsonl" (default) or "cef"
	Zstd         bool
	Version      string // the product version in CEF headers
}

// filterFields are what filters and CEF need of a record.
type filterFields struct {
	Seq      uint64                     `json:"seq"`
	Time     string                     `json:"time"`
	Type     string                     `json:"type"`
	Identity string                     `json:"identity"`
	Volume   string                     `json:"volume"`
	Decision string                     `json:"decision"`
	Reason   string                     `json:"reason"`
	Details  map[string]json.RawMessage `json:"details"`
}

// Export streams the records of srcs that pass the filters to w, in
// order and in constant memory, and returns how many it wrote. JSON Lines
// are the records byte for byte, so an unfiltered export verifies.
func Export(srcs []Source, w io.Writer, o ExportOptions) (n int64, err error) {
	if o.Format == "" {
		o.Format = "jsonl"
	}
	if o.Format != "jsonl" && o.Format != "cef" {
		return 0, fmt.Errorf("audit export: format %q: want jsonl or cef", o.Format)
	}
	out := w
	var zw *zstd.Encoder
	if o.Zstd {
		if zw, err = zstd.NewWriter(w, zstd.WithEncoderConcurrency(1)); err != nil {
			return 0, err
		}
		out = zw
	}
	bw := bufio.NewWriterSize(out, 256<<10)
	filtered := !o.Since.IsZero() || !o.Until.IsZero() || o.Volume != "" || o.Identity != ""
	sc := NewScanner(srcs)
	defer sc.Close()
	var (
		f    filterFields
		cef  []byte
		keys []string
	)
	for sc.Scan() {
		l := sc.Line()
		if l.Torn {
			continue // a crash's torn tail is not a record
		}
		if filtered || o.Format == "cef" {
			f = filterFields{}
			if err := json.Unmarshal(l.Bytes, &f); err != nil {
				return n, fmt.Errorf("audit export: %s:%d: not a record: %w", l.Source, l.N, err)
			}
			if filtered && !pass(&f, &o) {
				continue
			}
		}
		if o.Format == "jsonl" {
			bw.Write(l.Bytes)
			bw.WriteByte('\n')
		} else {
			cef, keys = appendCEF(cef[:0], keys, &f, o.Version)
			bw.Write(cef)
		}
		n++
	}
	if err := sc.Err(); err != nil {
		return n, err
	}
	if err := bw.Flush(); err != nil {
		return n, err
	}
	if zw != nil {
		return n, zw.Close()
	}
	return n, nil
}

func pass(f *filterFields, o *ExportOptions) bool {
	if o.Volume != "" && f.Volume != o.Volume || o.Identity != "" && f.Identity != o.Identity {
		return false
	}
	if !o.Since.IsZero() || !o.Until.IsZero() {
		t, err := time.Parse(TimeFormat, f.Time)
		if err != nil {
			return false
		}
		if !o.Since.IsZero() && t.Before(o.Since) || !o.Until.IsZero() && !t.Before(o.Until) {
			return false
		}
	}
	return true
}

// Severity of an event in CEF (FORMAT.md, "Export").
func severity(f *filterFields) int {
	switch {
	case f.Decision == "deny", f.Type == "integrity_failure":
		return 8
	case f.Type == "tls_failure", f.Type == "vault_unreachable", f.Type == "session_revoked",
		f.Type == "policy_reload_failed", f.Type == "audit_recovered":
		return 5
	}
	return 3
}

// appendCEF appends one CEF line (ArcSight Common Event Format) for f.
func appendCEF(b []byte, keys []string, f *filterFields, version string) ([]byte, []string) {
	b = append(b, "CEF:0|Goldilocks|goldilocks|"...)
	b = cefHeader(b, version)
	b = append(b, '|')
	b = cefHeader(b, f.Type)
	b = append(b, '|')
	b = cefHeader(b, f.Type)
	b = append(b, '|')
	b = strconv.AppendInt(b, int64(severity(f)), 10)
	b = append(b, '|')
	if t, err := time.Parse(TimeFormat, f.Time); err == nil {
		b = append(b, "rt="...)
		b = strconv.AppendInt(b, t.UnixMilli(), 10)
	}
	ext := func(k, v string) {
		if v == "" {
			return
		}
		b = append(b, ' ')
		b = append(b, k...)
		b = append(b, '=')
		b = cefValue(b, v)
	}
	ext("suser", f.Identity)
	if f.Volume != "" {
		ext("cs1Label", "volume")
		ext("cs1", f.Volume)
	}
	ext("act", f.Decision)
	ext("reason", f.Reason)
	ext("externalId", strconv.FormatUint(f.Seq, 10))
	if len(f.Details) > 0 {
		keys = keys[:0]
		for k := range f.Details {
			keys = append(keys, k)
		}
		slices.Sort(keys)
		var d strings.Builder
		d.WriteByte('{')
		for i, k := range keys {
			if i > 0 {
				d.WriteByte(',')
			}
			d.Write(appendString(nil, k))
			d.WriteByte(':')
			d.Write(f.Details[k])
		}
		d.WriteByte('}')
		ext("cs2Label", "details")
		ext("cs2", d.String())
	}
	return append(b, '\n'), keys
}

// cefHeader escapes a header field: \ and |.
func cefHeader(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\', '|':
			b = append(b, '\\', c)
		case '\n', '\r':
			b = append(b, ' ')
		default:
			b = append(b, c)
		}
	}
	return b
}

// cefValue escapes an extension value: \, = and line ends.
func cefValue(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		switch c := s[i]; c {
		case '\\', '=':
			b = append(b, '\\', c)
		case '\n':
			b = append(b, '\\', 'n')
		case '\r':
			b = append(b, '\\', 'r')
		default:
			b = append(b, c)
		}
	}
	return b
}
