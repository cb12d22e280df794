package audit

import (
	"bytes"
	"crypto/ed25519"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// fakeClock advances 1 ms per reading, from a fixed instant.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(time.Millisecond)
	return c.t
}

var testSeed = bytes.Repeat([]byte{7}, ed25519.SeedSize)

func testOptions() Options {
	c := &fakeClock{t: time.Date(2026, 11, 26, 12, 0, 0, 0, time.UTC)}
	return Options{CheckpointEvery: 50, SegmentSize: 16 << 10, now: c.now, key: ed25519.NewKeyFromSeed(testSeed)}
}

func ev(i int) Event {
	return Event{Type: "attach", Identity: fmt.Sprintf("vm-%d", i%3), Volume: fmt.Sprintf("vol-%d", i%5), Decision: "allow",
		Reason: "rule at policy.yaml:4", Details: map[string]any{"n": i, "tls": i%2 == 0, "note": "a \"quoted\" \\ \n line"}}
}

// writeLog makes a log of n events, closed.
func writeLog(t *testing.T, dir string, n int) {
	t.Helper()
	l, err := Open(dir, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < n; i++ {
		if err := l.Append(ev(i)); err != nil {
			t.Fatal(err)
		}
	}
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
}

func verifyDir(t *testing.T, dir string) *Report {
	t.Helper()
	srcs, head, err := Snapshot(dir)
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Verify(srcs, VerifyOptions{Key: ed25519.NewKeyFromSeed(testSeed).Public().(ed25519.PublicKey), Head: head, FromStart: true})
	if err != nil {
		t.Fatal(err)
	}
	return rep
}

// 32 writers at once: no two records interleave, the chain holds, across
// segment rotations (compressed) and checkpoints.
func TestConcurrentWritersChain(t *testing.T) {
	dir := t.TempDir()
	l, err := Open(dir, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 32; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 100; i++ {
				if err := l.Append(ev(w*100 + i)); err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	wg.Wait()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	rep := verifyDir(t, dir)
	if rep.Problem != nil {
		t.Fatalf("verify: %v", rep.Problem)
	}
	if rep.Records-uint64(rep.Checkpoints) != 3200 || rep.Checkpoints < 3200/50 || rep.Unsigned != 0 {
		t.Fatalf("report %+v", rep)
	}
	segs, _ := Segments(dir)
	if len(segs) < 3 || !strings.HasSuffix(segs[0], ".jsonl.zst") {
		t.Fatalf("segments %v: want several, compressed", segs)
	}
}

// tamper makes a log, applies fn to a copy, and returns what verify says.
func tamper(t *testing.T, fn func(dir string)) *Finding {
	t.Helper()
	dir := t.TempDir()
	writeLog(t, dir, 400)
	fn(dir)
	return verifyDir(t, dir).Problem
}

func readLines(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return strings.Split(strings.TrimSuffix(string(b), "\n"), "\n")
}

func writeLines(t *testing.T, path string, lines []string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(strings.Join(lines, "\n")+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
}

func editCurrent(t *testing.T, fn func([]string) []string) func(string) {
	return func(dir string) {
		p := filepath.Join(dir, CurrentFile)
		writeLines(t, p, fn(readLines(t, p)))
	}
}

func seqOf(line string) string {
	return regexp.MustCompile(`^\{"seq":(\d+)`).FindStringSubmatch(line)[1]
}

func TestTamperDetected(t *testing.T) {
	for _, tc := range []struct {
		name string
		fn   func(t *testing.T) func(string)
		kind string
		msg  string
	}{
		{"edit one byte of a value", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string { ls[3] = strings.Replace(ls[3], `"vol-`, `"vol_`, 1); return ls })
		}, Modified, "was changed"},
		{"edit the spacing", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string { ls[3] = strings.Replace(ls[3], `,"type"`, `, "type"`, 1); return ls })
		}, Modified, "canonical"},
		{"delete a line", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string { return append(ls[:4], ls[5:]...) })
		}, Deleted, "deleted"},
		{"swap two lines", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string { ls[4], ls[5] = ls[5], ls[4]; return ls })
		}, Reordered, "reordered"},
		{"insert a forged line", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string {
				// A well-formed record that chains to the one before it.
				prev, _ := Parse([]byte(ls[3]))
				forged := Record{Seq: prev.Seq + 1, Time: prev.Time, Event: Event{Type: "attach", Identity: "intruder", Decision: "allow"}, Prev: Hash([]byte(ls[3]))}
				out := append([]string{}, ls[:4]...)
				out = append(out, string(forged.AppendJSON(nil)))
				return append(out, ls[4:]...)
			})
		}, Inserted, "inserted"},
		{"drop a middle segment", func(t *testing.T) func(string) {
			return func(dir string) {
				segs, _ := Segments(dir)
				if len(segs) < 3 {
					t.Fatalf("only %d segments", len(segs))
				}
				os.Remove(segs[1])
			}
		}, SegmentMissing, "a segment was removed"},
		{"truncate the tail", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string { return ls[:len(ls)-3] })
		}, Truncated, "cut off the end"},
		{"torn last line", func(t *testing.T) func(string) {
			return func(dir string) {
				f, _ := os.OpenFile(filepath.Join(dir, CurrentFile), os.O_APPEND|os.O_WRONLY, 0)
				f.WriteString(`{"seq":99999,"ti`)
				f.Close()
			}
		}, Truncated, "cut short"},
		{"forge a checkpoint signature", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string {
				for i, l := range ls {
					if strings.Contains(l, `"type":"checkpoint"`) {
						r, _ := Parse([]byte(l))
						sig := []byte(r.Details["sig"].(string))
						sig[5] ^= 1 // still base64
						r.Details["sig"] = string(sig)
						ls[i] = string(r.AppendJSON(nil))
						return ls
					}
				}
				t.Fatal("no checkpoint in current.jsonl")
				return ls
			})
		}, ForgedCheck, "signature"},
		{"a checkpoint signed by another key", func(t *testing.T) func(string) {
			return editCurrent(t, func(ls []string) []string {
				other := ed25519.NewKeyFromSeed(bytes.Repeat([]byte{9}, 32))
				kid, _ := KeyID(other.Public().(ed25519.PublicKey))
				for i, l := range ls {
					if strings.Contains(l, `"type":"checkpoint"`) {
						r, _ := Parse([]byte(l))
						r.Details["key"] = kid
						ls[i] = string(r.AppendJSON(nil))
						return ls
					}
				}
				return ls
			})
		}, ForgedCheck, "names key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := tamper(t, tc.fn(t))
			if f == nil {
				t.Fatal("not detected")
			}
			t.Logf("%v", f)
			if f.Kind != tc.kind || !strings.Contains(f.Msg, tc.msg) || f.Line == 0 {
				t.Fatalf("finding %+v, want kind %q mentioning %q", f, tc.kind, tc.msg)
			}
		})
	}
}

// The edited record is named: its seq and line.
func TestTamperNamesTheRecord(t *testing.T) {
	dir := t.TempDir()
	writeLog(t, dir, 200)
	p := filepath.Join(dir, CurrentFile)
	ls := readLines(t, p)
	want := seqOf(ls[6])
	ls[6] = strings.Replace(ls[6], `"allow"`, `"deny"`, 1)
	writeLines(t, p, ls)
	f := verifyDir(t, dir).Problem
	if f == nil || f.Kind != Modified || fmt.Sprint(f.Seq) != want || f.Line != 7 || filepath.Base(f.Source) != CurrentFile {
		t.Fatalf("finding %+v, want modified seq %s at current.jsonl:7", f, want)
	}
}

// A crash mid-append leaves a torn line: the next open cuts it and says so
// in the log, and the chain verifies.
func TestTornLineRecovered(t *testing.T) {
	dir := t.TempDir()
	writeLog(t, dir, 30)
	f, _ := os.OpenFile(filepath.Join(dir, CurrentFile), os.O_APPEND|os.O_WRONLY, 0)
	f.WriteString(`{"seq":31,"time":"2026-11-26T12:00:00.0`)
	f.Close()
	l, err := Open(dir, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	l.Append(ev(1))
	l.Close()
	if rep := verifyDir(t, dir); rep.Problem != nil {
		t.Fatalf("after recovery: %v", rep.Problem)
	}
	b, _ := os.ReadFile(filepath.Join(dir, CurrentFile))
	if !bytes.Contains(b, []byte(`"type":"audit_recovered"`)) || !bytes.Contains(b, []byte(`"bytes":39`)) {
		t.Fatal("no audit_recovered record with the bytes cut")
	}
}

// Disk full: Append fails with ErrUnavailable and nothing half-written
// stays.
func TestDiskFullFailsClosed(t *testing.T) {
	if _, err := os.Stat("/dev/full"); err != nil {
		t.Skip("no /dev/full")
	}
	dir := t.TempDir()
	l, err := Open(dir, testOptions())
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	l.mu.Lock()
	full, err := os.OpenFile("/dev/full", os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	l.f.Close()
	l.f = full
	l.mu.Unlock()
	os.Remove(filepath.Join(dir, CurrentFile))
	os.Symlink("/dev/full", filepath.Join(dir, CurrentFile))
	if err := l.Append(ev(1)); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("append on a full disk: %v", err)
	}
}

func TestExport(t *testing.T) {
	dir := t.TempDir()
	writeLog(t, dir, 500)
	srcs, _ := Sources(dir)
	var all bytes.Buffer
	n, err := Export(srcs, &all, ExportOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// Round trip: the export verifies.
	exp := filepath.Join(t.TempDir(), "export.jsonl")
	os.WriteFile(exp, all.Bytes(), 0o600)
	rep, err := Verify([]Source{{Path: exp}}, VerifyOptions{Key: ed25519.NewKeyFromSeed(testSeed).Public().(ed25519.PublicKey), FromStart: true})
	if err != nil || rep.Problem != nil || int64(rep.Records) != n {
		t.Fatalf("verify of the export: %+v %v (%d exported)", rep, err, n)
	}
	// Filters.
	var part bytes.Buffer
	m, _ := Export(srcs, &part, ExportOptions{Volume: "vol-2", Identity: "vm-1"})
	for _, l := range strings.Split(strings.TrimSpace(part.String()), "\n") {
		if !strings.Contains(l, `"identity":"vm-1","volume":"vol-2"`) {
			t.Fatalf("filtered export holds %s", l)
		}
	}
	if m == 0 || m >= n {
		t.Fatalf("filter kept %d of %d", m, n)
	}
	since := time.Date(2026, 11, 26, 12, 0, 0, 100e6, time.UTC)
	var late bytes.Buffer
	k, _ := Export(srcs, &late, ExportOptions{Since: since})
	first, _ := Parse([]byte(strings.SplitN(late.String(), "\n", 2)[0]))
	if k == 0 || k >= n || first.Time.Before(since) {
		t.Fatalf("--since kept %d of %d, first at %v", k, n, first.Time)
	}
	// zstd.
	var z bytes.Buffer
	Export(srcs, &z, ExportOptions{Zstd: true})
	zr, _ := zstd.NewReader(&z)
	un, _ := io.ReadAll(zr)
	if !bytes.Equal(un, all.Bytes()) {
		t.Fatal("zstd export differs")
	}
	// CEF: every line parses as CEF with our fields.
	var cef bytes.Buffer
	Export(srcs, &cef, ExportOptions{Format: "cef", Version: "test"})
	head := regexp.MustCompile(`^CEF:0\|Goldilocks\|goldilocks\|test\|([a-z_]+)\|([a-z_]+)\|(\d+)\|(.*)$`)
	kv := regexp.MustCompile(`([A-Za-z0-9]+)=((?:[^\\= ]|\\.| [^= ]*(?: |$))*)`)
	lines := strings.Split(strings.TrimSpace(cef.String()), "\n")
	if int64(len(lines)) != n {
		t.Fatalf("%d CEF lines for %d records", len(lines), n)
	}
	for _, l := range lines {
		m := head.FindStringSubmatch(l)
		if m == nil {
			t.Fatalf("not CEF: %s", l)
		}
		fields := map[string]string{}
		for _, p := range kv.FindAllStringSubmatch(m[4], -1) {
			fields[p[1]] = strings.TrimSpace(p[2])
		}
		if fields["rt"] == "" || fields["externalId"] == "" {
			t.Fatalf("CEF line without rt or externalId: %s", l)
		}
		if m[1] == "attach" && (fields["suser"] == "" || fields["cs1"] == "" || fields["act"] != "allow") {
			t.Fatalf("CEF attach line lacks its fields: %s (%v)", l, fields)
		}
	}
}

// The format is fixed: a chain written with a fixed key and clock is byte
// for byte the test vector, and the vector verifies.
func TestVector(t *testing.T) {
	dir := t.TempDir()
	o := testOptions()
	o.CheckpointEvery = 3
	l, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4; i++ {
		l.Append(ev(i))
	}
	l.Close()
	got, _ := os.ReadFile(filepath.Join(dir, CurrentFile))
	const path = "testdata/chain-v1.jsonl"
	if os.Getenv("GOLDILOCKS_UPDATE_VECTORS") != "" {
		os.WriteFile(path, got, 0o644)
		os.WriteFile("testdata/chain-v1.pub", encodePublic(o.key.Public().(ed25519.PublicKey)), 0o644)
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("the record encoding changed: the format is fixed (FORMAT.md)\n got %s\nwant %s", got, want)
	}
	pub, err := LoadPublicKey("testdata/chain-v1.pub")
	if err != nil {
		t.Fatal(err)
	}
	rep, err := Verify([]Source{{Path: path}}, VerifyOptions{Key: pub, FromStart: true})
	if err != nil || rep.Problem != nil || rep.Checkpoints != 2 {
		t.Fatalf("vector: %+v %v", rep, err)
	}
}

func BenchmarkAppend(b *testing.B) {
	l, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	e := Event{Type: "attach", Identity: "vm-a", Volume: "a-root", Decision: "allow", Reason: "rule at policy.yaml:12",
		Details: map[string]any{"tls": true, "read_only": false}}
	b.ReportAllocs()
	for b.Loop() {
		if err := l.Append(e); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkAppendLatency reports the median and 99th percentile of single
// appends (checkpoints, with their fdatasync, included as they come).
func BenchmarkAppendLatency(b *testing.B) {
	l, err := Open(b.TempDir(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	e := Event{Type: "attach", Identity: "vm-a", Volume: "a-root", Decision: "allow", Reason: "rule at policy.yaml:12",
		Details: map[string]any{"tls": true, "read_only": false}}
	lat := make([]time.Duration, 0, b.N)
	for b.Loop() {
		t0 := time.Now()
		if err := l.Append(e); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(t0))
	}
	slices.Sort(lat)
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds()), "p50-ns")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds()), "p99-ns")
}

// BenchmarkExport1M exports a log of one million events (made once) to
// io.Discard: JSON Lines as stored, JSON Lines filtered by volume, CEF.
func BenchmarkExport1M(b *testing.B) {
	dir := b.TempDir()
	l, err := Open(dir, Options{})
	if err != nil {
		b.Fatal(err)
	}
	for i := 0; i < 1_000_000; i++ {
		if err := l.Append(ev(i)); err != nil {
			b.Fatal(err)
		}
	}
	l.Close()
	srcs, _ := Sources(dir)
	for _, bc := range []struct {
		name string
		o    ExportOptions
	}{
		{"jsonl", ExportOptions{}},
		{"jsonl-volume-filter", ExportOptions{Volume: "vol-3"}},
		{"cef", ExportOptions{Format: "cef"}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			for b.Loop() {
				n, err := Export(srcs, io.Discard, bc.o)
				if err != nil || n == 0 {
					b.Fatal(n, err)
				}
			}
		})
	}
}

// Two processes' worth of appenders (two Logs on one directory, each its
// own lock description and mapping), rotating small segments: one chain.
func TestTwoAppendersOneChain(t *testing.T) {
	dir := t.TempDir()
	o := testOptions()
	o.SegmentSize = 8 << 10
	a, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	b, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for w := 0; w < 16; w++ {
		for _, l := range []*Log{a, b} {
			wg.Add(1)
			go func(l *Log, w int) {
				defer wg.Done()
				for i := 0; i < 50; i++ {
					if err := l.Append(ev(w*50 + i)); err != nil {
						t.Error(err)
						return
					}
				}
			}(l, w)
		}
	}
	wg.Wait()
	a.Close()
	b.Close()
	rep := verifyDir(t, dir)
	if rep.Problem != nil {
		t.Fatalf("verify: %v", rep.Problem)
	}
	if rep.Records-uint64(rep.Checkpoints) != 1600 {
		t.Fatalf("report %+v, want 1600 events", rep)
	}
}

// FuzzParse: a record line from disk never panics the parser, and what it
// accepts re-encodes to exactly the same bytes.
func FuzzParse(f *testing.F) {
	b, _ := os.ReadFile("testdata/chain-v1.jsonl")
	for _, l := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f.Add([]byte(l))
	}
	f.Fuzz(func(t *testing.T, line []byte) {
		r, err := Parse(line)
		if err == nil && !bytes.Equal(r.AppendJSON(nil), line) {
			t.Fatalf("accepted a line that does not re-encode to itself: %q", line)
		}
		var ff filterFields
		fastFields(line, &ff)
	})
}

// Verifying a log while it is being written sees a consistent prefix: no
// false "truncated" or "torn" findings.
func TestVerifyWhileWriting(t *testing.T) {
	dir := t.TempDir()
	o := testOptions()
	o.CheckpointEvery = 7
	l, err := Open(dir, o)
	if err != nil {
		t.Fatal(err)
	}
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		for i := 0; i < 3000; i++ { // bounded: each verify pass reads it all
			select {
			case <-stop:
				return
			default:
			}
			l.Append(ev(i))
		}
	}()
	for i := 0; i < 15; i++ {
		if rep := verifyDir(t, dir); rep.Problem != nil {
			close(stop)
			<-done
			t.Fatalf("pass %d over a live log: %v", i, rep.Problem)
		}
	}
	close(stop)
	<-done
	l.Close()
}
