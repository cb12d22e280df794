package audit

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strconv"
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
	Seq      uint64
	Time     string
	Type     string
	Identity string
	Volume   string
	Decision string
	Reason   string
	Details  []byte // the details object as written (keys sorted)
}

// canonicalKeys are the record's keys in their fixed order (FORMAT.md).
var canonicalKeys = [...]string{`{"seq":`, `,"time":`, `,"type":`, `,"identity":`, `,"volume":`, `,"decision":`, `,"reason":`, `,"details":`}

// fastFields reads a canonical record's fields by walking its fixed key
// order, without a general JSON decoder: a million records export in
// seconds. It reports false for a line that is not canonical; the caller
// then decodes it the slow way.
func fastFields(line []byte, f *filterFields) bool {
	rest := line
	for i, k := range canonicalKeys {
		if !bytes.HasPrefix(rest, []byte(k)) {
			return false
		}
		rest = rest[len(k):]
		switch i {
		case 0:
			j := 0
			for j < len(rest) && rest[j] >= '0' && rest[j] <= '9' {
				j++
			}
			n, err := strconv.ParseUint(string(rest[:j]), 10, 64)
			if err != nil {
				return false
			}
			f.Seq, rest = n, rest[j:]
		case 7:
			end := bytes.LastIndex(rest, []byte(`,"prev":"`))
			if end < 0 {
				return false
			}
			f.Details = rest[:end]
		default:
			s, n, ok := jsonString(rest)
			if !ok {
				return false
			}
			rest = rest[n:]
			switch i {
			case 1:
				f.Time = s
			case 2:
				f.Type = s
			case 3:
				f.Identity = s
			case 4:
				f.Volume = s
			case 5:
				f.Decision = s
			case 6:
				f.Reason = s
			}
		}
	}
	return true
}

// jsonString reads the JSON string at the start of b: its value and its
// length in b.
func jsonString(b []byte) (string, int, bool) {
	if len(b) == 0 || b[0] != '"' {
		return "", 0, false
	}
	esc := false
	for i := 1; i < len(b); i++ {
		switch b[i] {
		case '\\':
			esc = true
			i++
		case '"':
			if !esc {
				return string(b[1:i]), i + 1, true
			}
			var s string
			if json.Unmarshal(b[:i+1], &s) != nil {
				return "", 0, false
			}
			return s, i + 1, true
		}
	}
	return "", 0, false
}

// slowFields decodes a record that is not canonical (an edited export).
func slowFields(line []byte, f *filterFields) error {
	var r struct {
		Seq                                            uint64
		Time, Type, Identity, Volume, Decision, Reason string
		Details                                        json.RawMessage
	}
	if err := json.Unmarshal(line, &r); err != nil {
		return err
	}
	*f = filterFields{Seq: r.Seq, Time: r.Time, Type: r.Type, Identity: r.Identity, Volume: r.Volume, Decision: r.Decision, Reason: r.Reason, Details: r.Details}
	return nil
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
		f   filterFields
		cef []byte
	)
	for sc.Scan() {
		l := sc.Line()
		if l.Torn {
			continue // a crash's torn tail is not a record
		}
		if filtered || o.Format == "cef" {
			if !fastFields(l.Bytes, &f) {
				if err := slowFields(l.Bytes, &f); err != nil {
					return n, fmt.Errorf("audit export: %s:%d: not a record: %w", l.Source, l.N, err)
				}
			}
			if filtered && !pass(&f, &o) {
				continue
			}
		}
		if o.Format == "jsonl" {
			bw.Write(l.Bytes)
			bw.WriteByte('\n')
		} else {
			cef = appendCEF(cef[:0], &f, o.Version)
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
	case f.Decision == "deny", f.Type == string(EvIntegrityFailure):
		return 8
	case f.Type == string(EvTLSFailure), f.Type == string(EvVaultUnreachable), f.Type == string(EvSessionRevoked),
		f.Type == string(EvPolicyReloadFailed), f.Type == string(EvAuditRecovered):
		return 5
	}
	return 3
}

// appendCEF appends one CEF line (ArcSight Common Event Format) for f.
func appendCEF(b []byte, f *filterFields, version string) []byte {
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
	var seq [20]byte
	ext("suser", f.Identity)
	if f.Volume != "" {
		ext("cs1Label", "volume")
		ext("cs1", f.Volume)
	}
	ext("act", f.Decision)
	ext("reason", f.Reason)
	b = append(b, " externalId="...)
	b = append(b, strconv.AppendUint(seq[:0], f.Seq, 10)...)
	if len(f.Details) > 2 { // not "{}"
		b = append(b, " cs2Label=details cs2="...)
		b = cefValue(b, string(f.Details))
	}
	return append(b, '\n')
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
