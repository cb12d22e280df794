package audit

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strconv"
	"time"
	"unicode/utf8"
)

// TimeFormat is the record time: RFC 3339, UTC, always 9 fractional
// digits (FORMAT.md). Part of the format.
const TimeFormat = "2006-01-02T15:04:05.000000000Z"

// zeroPrev is the prev of record 1.
var zeroPrev = "sha256:" + hex.EncodeToString(make([]byte, 32))

// Event is what a caller records.
type Event struct {
	Type     EventType
	Identity string
	Volume   string
	Decision string // "allow", "deny" or ""
	Reason   string
	// Details hold strings, integers or booleans only.
	Details map[string]any
}

// Record is one line of the log.
type Record struct {
	Seq  uint64
	Time time.Time
	Event
	Prev string
}

// ErrNotCanonical is returned by Parse for a line that decodes but is not
// in the canonical encoding (FORMAT.md): it was edited.
var ErrNotCanonical = errors.New("audit: record is not in canonical form")

// AppendJSON appends r's canonical encoding (no newline) to b.
func (r *Record) AppendJSON(b []byte) []byte {
	b = append(b, `{"seq":`...)
	b = strconv.AppendUint(b, r.Seq, 10)
	b = append(b, `,"time":`...)
	b = appendString(b, r.Time.UTC().Format(TimeFormat))
	for _, f := range [...]struct{ k, v string }{
		{`,"type":`, string(r.Type)}, {`,"identity":`, r.Identity}, {`,"volume":`, r.Volume},
		{`,"decision":`, r.Decision}, {`,"reason":`, r.Reason},
	} {
		b = append(b, f.k...)
		b = appendString(b, f.v)
	}
	b = append(b, `,"details":{`...)
	keys := make([]string, 0, len(r.Details))
	for k := range r.Details {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for i, k := range keys {
		if i > 0 {
			b = append(b, ',')
		}
		b = appendString(b, k)
		b = append(b, ':')
		b = appendValue(b, r.Details[k])
	}
	b = append(b, `},"prev":`...)
	b = appendString(b, r.Prev)
	return append(b, '}')
}

func appendValue(b []byte, v any) []byte {
	switch x := v.(type) {
	case string:
		return appendString(b, x)
	case bool:
		return strconv.AppendBool(b, x)
	case int:
		return strconv.AppendInt(b, int64(x), 10)
	case int64:
		return strconv.AppendInt(b, x, 10)
	case int32:
		return strconv.AppendInt(b, int64(x), 10)
	case uint32:
		return strconv.AppendUint(b, uint64(x), 10)
	case uint64:
		return strconv.AppendUint(b, x, 10)
	case float64: // only whole numbers stay numbers; the format has no floats
		if x == float64(int64(x)) {
			return strconv.AppendInt(b, int64(x), 10)
		}
		return appendString(b, strconv.FormatFloat(x, 'g', -1, 64))
	case time.Duration:
		return appendString(b, x.String())
	case error:
		return appendString(b, x.Error())
	case fmt.Stringer:
		return appendString(b, x.String())
	default:
		return appendString(b, fmt.Sprint(x))
	}
}

const hexDigits = "0123456789abcdef"

// appendString quotes s as encoding/json does with HTML escaping off.
func appendString(b []byte, s string) []byte {
	b = append(b, '"')
	start := 0
	for i := 0; i < len(s); {
		if c := s[i]; c < utf8.RuneSelf {
			if c >= 0x20 && c != '"' && c != '\\' {
				i++
				continue
			}
			b = append(b, s[start:i]...)
			switch c {
			case '\\', '"':
				b = append(b, '\\', c)
			case '\n':
				b = append(b, '\\', 'n')
			case '\r':
				b = append(b, '\\', 'r')
			case '\t':
				b = append(b, '\\', 't')
			default:
				b = append(b, '\\', 'u', '0', '0', hexDigits[c>>4], hexDigits[c&0xf])
			}
			i++
			start = i
			continue
		}
		r, size := utf8.DecodeRuneInString(s[i:])
		if r == utf8.RuneError && size == 1 {
			b = append(b, s[start:i]...)
			b = append(b, `\ufffd`...)
			i += size
			start = i
			continue
		}
		if r == '\u2028' || r == '\u2029' {
			b = append(b, s[start:i]...)
			b = append(b, '\\', 'u', '2', '0', '2', hexDigits[r&0xf])
			i += size
			start = i
			continue
		}
		i += size
	}
	b = append(b, s[start:]...)
	return append(b, '"')
}

// Hash is a record line's hash as records name it: "sha256:" and hex.
func Hash(line []byte) string {
	h := sha256.Sum256(line)
	return "sha256:" + hex.EncodeToString(h[:])
}

// rawRecord is the JSON shape, for parsing.
type rawRecord struct {
	Seq      *uint64                    `json:"seq"`
	Time     string                     `json:"time"`
	Type     string                     `json:"type"`
	Identity string                     `json:"identity"`
	Volume   string                     `json:"volume"`
	Decision string                     `json:"decision"`
	Reason   string                     `json:"reason"`
	Details  map[string]json.RawMessage `json:"details"`
	Prev     string                     `json:"prev"`
}

// Parse decodes one line (without its newline) and checks that it is
// canonical: ErrNotCanonical if it decodes but was edited.
func Parse(line []byte) (*Record, error) {
	var raw rawRecord
	dec := json.NewDecoder(bytes.NewReader(line))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&raw); err != nil {
		return nil, fmt.Errorf("audit: not a record: %w", err)
	}
	if raw.Seq == nil || raw.Type == "" {
		return nil, errors.New("audit: not a record: no seq or type")
	}
	t, err := time.Parse(TimeFormat, raw.Time)
	if err != nil {
		return nil, fmt.Errorf("audit: record %d: time %q: %w", *raw.Seq, raw.Time, ErrNotCanonical)
	}
	r := &Record{Seq: *raw.Seq, Time: t, Prev: raw.Prev, Event: Event{
		Type: EventType(raw.Type), Identity: raw.Identity, Volume: raw.Volume, Decision: raw.Decision, Reason: raw.Reason,
	}}
	if len(raw.Details) > 0 {
		r.Details = make(map[string]any, len(raw.Details))
		for k, v := range raw.Details {
			var x any
			d := json.NewDecoder(bytes.NewReader(v))
			d.UseNumber()
			if err := d.Decode(&x); err != nil {
				return nil, fmt.Errorf("audit: record %d: detail %s: %w", r.Seq, k, err)
			}
			switch y := x.(type) {
			case json.Number:
				n, err := strconv.ParseInt(string(y), 10, 64)
				if err != nil {
					return nil, fmt.Errorf("audit: record %d: detail %s: %w", r.Seq, k, ErrNotCanonical)
				}
				r.Details[k] = n
			case string, bool:
				r.Details[k] = y
			default:
				return nil, fmt.Errorf("audit: record %d: detail %s is not a string, integer or boolean: %w", r.Seq, k, ErrNotCanonical)
			}
		}
	}
	if !bytes.Equal(r.AppendJSON(nil), line) {
		return r, fmt.Errorf("audit: record %d: %w", r.Seq, ErrNotCanonical)
	}
	return r, nil
}

// checkpointMessage is what a checkpoint's signature covers (FORMAT.md).
func checkpointMessage(seq uint64, t time.Time, prev string) []byte {
	return fmt.Appendf(nil, "goldilocks audit checkpoint v1\n%d\n%s\n%s\n", seq, t.UTC().Format(TimeFormat), prev)
}
