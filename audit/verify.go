package audit

import (
	"bytes"
	"crypto/ed25519"
	"encoding/base64"
	"errors"
	"fmt"
	"path/filepath"
	"strconv"
	"strings"
)

// Finding kinds (FORMAT.md, "Verification").
const (
	Modified       = "modified"
	Deleted        = "deleted"
	Inserted       = "inserted"
	Reordered      = "reordered"
	SegmentMissing = "segment missing"
	Truncated      = "truncated"
	ForgedCheck    = "forged checkpoint"
)

// Finding is the first thing wrong with a log.
type Finding struct {
	Kind   string `json:"kind"`
	Source string `json:"file"`
	Line   int    `json:"line"`
	Seq    uint64 `json:"seq"`
	Msg    string `json:"message"`
}

func (f *Finding) Error() string {
	return fmt.Sprintf("%s:%d: %s: %s", f.Source, f.Line, f.Kind, f.Msg)
}

// Report is what Verify found.
type Report struct {
	Records     uint64   `json:"records"`
	Checkpoints int      `json:"checkpoints"`
	FirstSeq    uint64   `json:"first_seq"`
	LastSeq     uint64   `json:"last_seq"`
	Unsigned    int      `json:"unsigned_tail"` // records after the last checkpoint
	Problem     *Finding `json:"problem,omitempty"`
}

// VerifyOptions say what to trust.
type VerifyOptions struct {
	// Key verifies checkpoints; nil skips signatures (and says so).
	Key ed25519.PublicKey
	// Head is the head file's line of a live log (FORMAT.md; from
	// Snapshot): a log that ends before it is truncated. Empty for exports.
	Head string
	// FromStart requires the first record to be seq 1 (a whole log).
	FromStart bool
}

type entry struct {
	src   int
	path  string
	n     int
	line  []byte
	rec   *Record
	err   error
	torn  bool
	hash  string
	first bool // first line of its source
}

// Verify checks the chain and the signatures over srcs in order and
// reports the first problem, named precisely. It reads in constant memory.
func Verify(srcs []Source, o VerifyOptions) (*Report, error) {
	kid := ""
	if o.Key != nil {
		var err error
		if kid, err = KeyID(o.Key); err != nil {
			return nil, err
		}
	}
	sc := NewScanner(srcs)
	defer sc.Close()
	read := func() *entry {
		if !sc.Scan() {
			return nil
		}
		l := sc.Line()
		e := &entry{src: sc.SourceIndex(), path: l.Source, n: l.N, line: bytes.Clone(l.Bytes), torn: l.Torn, first: l.N == 1}
		e.rec, e.err = Parse(e.line)
		e.hash = Hash(e.line)
		return e
	}
	rep := &Report{}
	fail := func(e *entry, kind, format string, args ...any) (*Report, error) {
		rep.Problem = &Finding{Kind: kind, Source: e.path, Line: e.n, Msg: fmt.Sprintf(format, args...)}
		if e.rec != nil {
			rep.Problem.Seq = e.rec.Seq
		}
		return rep, nil
	}
	var prev *entry
	cur, peek := read(), read()
	for ; cur != nil; cur, peek = peek, read() {
		switch {
		case cur.torn && peek == nil:
			return fail(cur, Truncated, "the last line is cut short (a crash mid-append, or the file was cut)")
		case cur.torn:
			return fail(cur, Truncated, "%s ends in the middle of a record", filepath.Base(cur.path))
		case errors.Is(cur.err, ErrNotCanonical):
			return fail(cur, Modified, "record seq %d was edited: it is not in the canonical form it was written in", cur.rec.Seq)
		case cur.err != nil:
			return fail(cur, Modified, "not a record: %v", cur.err)
		}
		r := cur.rec
		if prev == nil {
			rep.FirstSeq = r.Seq
			if r.Seq != 1 && o.FromStart {
				return fail(cur, Deleted, "the log starts at seq %d: records 1 to %d are missing", r.Seq, r.Seq-1)
			}
			if r.Seq == 1 && r.Prev != zeroPrev {
				return fail(cur, Modified, "record 1 names a previous record")
			}
		} else {
			expect := prev.rec.Seq + 1
			switch {
			case r.Seq == expect && r.Prev != prev.hash:
				if peek != nil && peek.rec != nil && peek.rec.Seq == r.Seq {
					return fail(cur, Inserted, "record seq %d here does not chain to seq %d, and %s:%d claims seq %d too: this line was inserted", r.Seq, prev.rec.Seq, filepath.Base(peek.path), peek.n, r.Seq)
				}
				return fail(prev, Modified, "record seq %d was changed: record seq %d (%s:%d) names another hash for it", prev.rec.Seq, r.Seq, filepath.Base(cur.path), cur.n)
			case r.Seq == expect:
			case r.Seq > expect && peek != nil && peek.rec != nil && peek.rec.Seq == expect:
				return fail(cur, Reordered, "record seq %d comes before seq %d (%s:%d): records were reordered", r.Seq, expect, filepath.Base(peek.path), peek.n)
			case r.Seq > expect && cur.first && cur.src != prev.src:
				return fail(cur, SegmentMissing, "records %d to %d are missing between %s and %s: a segment was removed", expect, r.Seq-1, filepath.Base(prev.path), filepath.Base(cur.path))
			case r.Seq > expect:
				if r.Seq == expect+1 {
					return fail(cur, Deleted, "record seq %d is missing before this line: it was deleted", expect)
				}
				return fail(cur, Deleted, "records %d to %d are missing before this line: they were deleted", expect, r.Seq-1)
			case r.Seq == prev.rec.Seq:
				// Two records claim one seq: the inserted one is the one the
				// chain does not continue from.
				if peek != nil && peek.rec != nil && peek.rec.Prev == cur.hash {
					return fail(prev, Inserted, "this line and %s:%d both claim seq %d; the chain continues from the other: this line was inserted", filepath.Base(cur.path), cur.n, r.Seq)
				}
				return fail(cur, Inserted, "this line and %s:%d both claim seq %d; the chain continues from the other: this line was inserted", filepath.Base(prev.path), prev.n, r.Seq)
			default:
				return fail(cur, Reordered, "record seq %d comes after seq %d: records were reordered", r.Seq, prev.rec.Seq)
			}
		}
		if r.Type == "checkpoint" {
			if f := checkCheckpoint(r, o.Key, kid); f != "" {
				return fail(cur, ForgedCheck, "%s", f)
			}
			rep.Checkpoints++
			rep.Unsigned = 0
		} else {
			rep.Unsigned++
		}
		rep.Records++
		rep.LastSeq = r.Seq
		prev = cur
	}
	if err := sc.Err(); err != nil {
		return nil, err
	}
	if o.Head != "" {
		seqStr, hash, _ := strings.Cut(strings.TrimSpace(o.Head), " ")
		hs, perr := strconv.ParseUint(seqStr, 10, 64)
		switch {
		case perr != nil:
			rep.Problem = &Finding{Kind: Modified, Source: HeadFile, Line: 1, Msg: "the head file is damaged"}
		case hs > rep.LastSeq:
			last := &entry{path: HeadFile, n: 1}
			if prev != nil {
				last = prev
			}
			rep.Problem = &Finding{Kind: Truncated, Source: last.path, Line: last.n, Seq: rep.LastSeq,
				Msg: fmt.Sprintf("the log ends at seq %d, but checkpoint seq %d was written (%s): records were cut off the end", rep.LastSeq, hs, HeadFile)}
		case hs == rep.LastSeq && prev != nil && prev.hash != hash:
			rep.Problem = &Finding{Kind: Modified, Source: prev.path, Line: prev.n, Seq: hs, Msg: "the last checkpoint differs from the one the head file names"}
		}
	}
	return rep, nil
}

// checkCheckpoint returns what is wrong with a checkpoint, or "".
func checkCheckpoint(r *Record, key ed25519.PublicKey, kid string) string {
	k, _ := r.Details["key"].(string)
	s, _ := r.Details["sig"].(string)
	sig, err := base64.StdEncoding.DecodeString(s)
	switch {
	case key == nil:
		return ""
	case k != kid:
		return fmt.Sprintf("checkpoint seq %d names key %s, not the log's key %s", r.Seq, k, kid)
	case err != nil || len(sig) != ed25519.SignatureSize:
		return fmt.Sprintf("checkpoint seq %d has no valid signature", r.Seq)
	case !ed25519.Verify(key, checkpointMessage(r.Seq, r.Time, r.Prev), sig):
		return fmt.Sprintf("checkpoint seq %d: the signature does not verify", r.Seq)
	}
	return ""
}
