package cowmap

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
)

// mustCommit commits m or fails the test.
func mustCommit(t *testing.T, m *Map) {
	t.Helper()
	if err := m.Commit(noQuiesce); err != nil {
		t.Fatal(err)
	}
	m.waitCheckpoint() // the tests that count checkpoints see it done
}

// content is what the test writes as chunk c's data in round r: a block
// that names both, so that reading it back says where it came from.
func content(c uint64, r int) []byte {
	b := make([]byte, BlockSize)
	binary.LittleEndian.PutUint64(b, c)
	binary.LittleEndian.PutUint64(b[8:], uint64(r))
	b[BlockSize-1] = 0xda
	return b
}

// dataModel is, for every chunk, the round of its last write (-1: unmapped).
type dataModel map[uint64]int

// write writes chunk c as the volume does: Home, the data there, Set.
func (dm dataModel) write(t *testing.T, h *harness, m *Map, c uint64, r int) uint64 {
	t.Helper()
	loc, err := m.Home(c)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.dev.WriteAt(content(c, r), int64(h.g.DataBlock(c, loc)*BlockSize)); err != nil {
		t.Fatal(err)
	}
	m.Set(c, testEntry(c, loc, r))
	dm[c] = r
	return loc
}

// check reads every chunk where its entry says and compares it with the
// model: data, and the entry's fields of that round.
func (dm dataModel) check(t *testing.T, h *harness, m *Map, chunks uint64, what string) {
	t.Helper()
	b := make([]byte, BlockSize)
	for c := uint64(0); c < chunks; c++ {
		e, err := m.Lookup(c)
		if err != nil {
			t.Fatalf("%s: chunk %d: %v", what, c, err)
		}
		r, ok := dm[c]
		if !ok || r < 0 {
			if e.Mapped() {
				t.Fatalf("%s: chunk %d mapped at %x, want unmapped", what, c, e.Loc())
			}
			continue
		}
		want := testEntry(c, e.Loc(), r)
		if !e.Mapped() || !bytes.Equal(e.Tag(), want.Tag()) || e.Epoch() != want.Epoch() {
			t.Fatalf("%s: chunk %d: entry %x, want round %d", what, c, e[:24], r)
		}
		if _, err := h.dev.ReadAt(b, int64(h.g.DataBlock(c, e.Loc())*BlockSize)); err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b, content(c, r)) {
			t.Fatalf("%s: chunk %d at %x holds chunk %d round %d, want round %d", what, c, e.Loc(),
				binary.LittleEndian.Uint64(b), binary.LittleEndian.Uint64(b[8:]), r)
		}
	}
}

// A client that flushes after each small write: the writes go into the
// log beside their commit's log block, rewrites before a commit reuse
// their position, checkpoints move them home, and after every commit a
// recovery from the store finds every chunk's last data where its entry
// says, also across the ring's end.
func TestLogData(t *testing.T) {
	const chunks = 400
	h := newHarness(t, chunks, 64, 1<<20)
	h.cfg.LogData = true
	m := h.open()
	dm := dataModel{}
	rng := rand.New(rand.NewPCG(3, 4))
	var inLog, reused, moved, withData int
	starts := map[uint64]bool{}
	for round := 1; round <= 600; round++ {
		n := 1 + rng.IntN(3)
		if round%97 == 0 {
			n = 40 // a large commit: the next writes go home
		}
		placed := map[uint64]uint64{}
		for j := 0; j < n; j++ {
			c := uint64(rng.IntN(chunks))
			if rng.IntN(20) == 0 {
				m.Set(c, Entry{})
				dm[c] = -1
				delete(placed, c)
				continue
			}
			loc := dm.write(t, h, m, c, round*10+j)
			if IsInLog(loc) {
				inLog++
				if old, ok := placed[c]; ok && old == loc {
					reused++
				}
			}
			placed[c] = loc
		}
		before := h.headers
		slot := m.used % h.g.LogBlocks
		mustCommit(t, m)
		if h.headers > before {
			moved++
		} else if _, _, d, _, ok := openLogBlock(h.dev.block(h.g.logBlock(slot)), testLogKey, testUUID, m.Seq(), slot, [32]byte{}, nil); ok || d > 0 {
			t.Fatal("opened a log block with the wrong chain") // a sanity check of the check below
		}
		if b := h.dev.block(h.g.logBlock(slot)); string(b[:4]) == logMagic && binary.LittleEndian.Uint32(b[24:]) > 0 {
			withData++
		}
		starts[h.st.LogStart] = true
		dm.check(t, h, m, chunks, "live")
		dm.check(t, h, h.open(), chunks, "recovered")
	}
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	dm.check(t, h, h.open(), chunks, "after the last checkpoint")
	for c := uint64(0); c < chunks; c++ {
		if e, _ := m.Lookup(c); IsInLog(e.Loc()) {
			t.Fatalf("chunk %d still in the log after a checkpoint", c)
		}
	}
	t.Logf("%d writes into the log (%d rewrites in place), %d commits with data, %d checkpoints, %d log starts",
		inLog, reused, withData, moved, len(starts))
	if inLog < 500 || reused == 0 || withData < 300 || moved < 5 || len(starts) < 5 {
		t.Fatal("the log's data path was not exercised")
	}
}

// Without LogData, or after a large commit, or on a write of many
// chunks, nothing goes into the log.
func TestLogDataOnlyForSmallFlushedWrites(t *testing.T) {
	h := newHarness(t, 200, 64, 1<<20)
	m := h.open()
	dm := dataModel{}
	for r := 0; r < 5; r++ { // LogData off
		if loc := dm.write(t, h, m, uint64(r), r); IsInLog(loc) {
			t.Fatal("a write went into the log without LogData")
		}
		mustCommit(t, m)
	}
	h.cfg.LogData = true
	m = h.open()
	if loc := dm.write(t, h, m, 7, 1); IsInLog(loc) {
		t.Fatal("the first write after attach went into the log (no small commit seen yet)")
	}
	mustCommit(t, m)
	if loc := dm.write(t, h, m, 8, 2); !IsInLog(loc) {
		t.Fatal("a small write after a small commit did not go into the log")
	}
	out := make([]uint64, smallWrite+1)
	if err := m.Homes(20, out); err != nil {
		t.Fatal(err)
	}
	for _, l := range out {
		if IsInLog(l) {
			t.Fatalf("a write of %d chunks went into the log", len(out))
		}
	}
	for c := uint64(30); c < 30+smallCommit+1; c++ {
		dm.write(t, h, m, c, 3)
	}
	mustCommit(t, m)
	if loc := dm.write(t, h, m, 9, 4); IsInLog(loc) {
		t.Fatal("a write after a large commit went into the log")
	}
	mustCommit(t, m)
	dm.check(t, h, h.open(), 200, "recovered")
}

// A record in the log that names a ring position outside its commit's
// data blocks, MACed with the key (a bug, or a forgery with the key), is
// refused; so is a log block that claims data beyond the ring.
func TestLogDataRecordOutsideItsCommit(t *testing.T) {
	setup := func(t *testing.T) (*harness, uint64) {
		h := newHarness(t, 100, 64, 1<<20)
		h.cfg.LogData = true
		m := h.open()
		dm := dataModel{}
		dm.write(t, h, m, 1, 1)
		mustCommit(t, m)
		if err := m.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		slot := m.used % h.g.LogBlocks
		if loc := dm.write(t, h, m, 2, 2); !IsInLog(loc) || LogPos(loc) != slot+1 {
			t.Fatalf("write went to %x, want the log at %d", loc, slot+1)
		}
		mustCommit(t, m)
		dm.check(t, h, h.open(), 100, "recovered")
		return h, slot
	}
	edit := func(t *testing.T, h *harness, slot uint64, f func(recs []record, data *uint32)) {
		b := h.dev.block(h.g.logBlock(slot))
		seed := Reseed(testLogKey, h.st.Seq, h.st.LogStart)
		recs, commit, data, _, ok := openLogBlock(b, testLogKey, testUUID, h.st.Seq+1, slot, seed, nil)
		if !ok || data != 1 || len(recs) != 1 || !IsInLog(recs[0].e.Loc()) {
			t.Fatalf("the commit's block: ok %v, %d data blocks, records %v", ok, data, recs)
		}
		f(recs, &data)
		sealLogBlock(b, testLogKey, testUUID, recs, commit, h.st.Seq+1, slot, data, seed)
	}
	for _, tc := range []struct {
		name string
		f    func(recs []record, data *uint32)
	}{
		{"position before the block", func(recs []record, _ *uint32) { recs[0].e.SetLoc(InLog(0, HomeA)) }},
		{"position after its data", func(recs []record, _ *uint32) { recs[0].e.SetLoc(InLog(recs[0].e.Loc()+1, HomeA)) }},
		{"no data blocks", func(_ []record, d *uint32) { *d = 0 }},
		{"position beyond the ring", func(recs []record, _ *uint32) { recs[0].e.SetLoc(InLog(64, HomeA)) }},
		{"data beyond the ring", func(_ []record, d *uint32) { *d = 63 }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			h, slot := setup(t)
			edit(t, h, slot, tc.f)
			if _, err := Open(h.cfg, h.st); !errors.Is(err, ErrMapAuth) {
				t.Fatalf("%v, want ErrMapAuth", err)
			}
		})
	}
}

// A commit too large for the log, with data in the log, goes to the tree:
// its data moves home, and the log starts again where the next commit's
// first block is, so that the commits after it recover.
func TestLogDataInALargeCommit(t *testing.T) {
	const chunks = 1000
	h := newHarness(t, chunks, 8, 1<<20)
	h.cfg.LogData = true
	m := h.open()
	dm := dataModel{}
	dm.write(t, h, m, 0, 1)
	mustCommit(t, m)
	inLog := 0
	for c := uint64(1); c < 400; c++ { // the first few go into the log, the rest home
		if IsInLog(dm.write(t, h, m, c, 2)) {
			inLog++
		}
	}
	if inLog == 0 {
		t.Fatal("no write went into the log")
	}
	before := h.headers
	mustCommit(t, m)
	if h.headers != before+1 {
		t.Fatal("the large commit did not go to the tree")
	}
	dm.check(t, h, m, chunks, "live")
	dm.check(t, h, h.open(), chunks, "recovered after the large commit")
	before = h.headers
	dm.write(t, h, m, 5, 3)
	mustCommit(t, m)
	if h.headers != before {
		t.Fatal("the small commit after the large one did not go to the log")
	}
	for r := 4; r < 20; r++ {
		dm.write(t, h, m, uint64(r*7), r)
		mustCommit(t, m)
		dm.check(t, h, h.open(), chunks, "recovered")
	}
}

// With Written, a small flushed write goes into the log only when its
// home is not yet written on the store; after a checkpoint moved it home,
// its next write goes to the other home if that one is written.
func TestLogDataOnlyForUnwrittenHomes(t *testing.T) {
	h := newHarness(t, 200, 64, 1<<20)
	h.cfg.LogData = true
	written := map[uint64]bool{} // data blocks
	h.cfg.Written = func(c, home uint64) bool { return written[h.g.DataBlock(c, home)] }
	m := h.open()
	dm := dataModel{}
	dm.write(t, h, m, 1, 1)
	mustCommit(t, m)
	if loc := dm.write(t, h, m, 2, 2); !IsInLog(loc) || HomeOf(loc) != HomeA {
		t.Fatalf("a write to an unwritten home went to %x, want the log (home A)", loc)
	}
	mustCommit(t, m)
	written[h.g.DataBlock(3, HomeA)] = true
	if loc := dm.write(t, h, m, 3, 3); loc != HomeA {
		t.Fatalf("a write to a written home went to %x, want home A", loc)
	}
	mustCommit(t, m)
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if e, _ := m.Lookup(2); e.Loc() != HomeA {
		t.Fatalf("chunk 2 at %x after the checkpoint, want home A", e.Loc())
	}
	if loc := dm.write(t, h, m, 2, 4); !IsInLog(loc) || HomeOf(loc) != HomeB {
		t.Fatalf("the next write of chunk 2 went to %x, want the log (home B, unwritten)", loc)
	}
	mustCommit(t, m)
	written[h.g.DataBlock(3, HomeB)] = true
	if loc := dm.write(t, h, m, 3, 5); loc != HomeB {
		t.Fatalf("the next write of chunk 3 went to %x, want home B (written)", loc)
	}
	mustCommit(t, m)
	dm.check(t, h, h.open(), 200, "recovered")
}

// The first log block of a commit with two data blocks after it, one
// record in the log (position 13, moving to home B) and one at home A:
// FORMAT.md's offsets for the data count and the location's bits.
func TestVectorLogBlockWithData(t *testing.T) {
	var prev [32]byte
	for i := range prev {
		prev[i] = byte(0x0f ^ i)
	}
	recs := []record{{9, testEntry(9, InLog(13, HomeB), 4)}, {10, testEntry(10, HomeA, 4)}}
	recs[0].e.SetGen(78)
	recs[1].e.SetGen(78)
	b := make([]byte, BlockSize)
	mac := sealLogBlock(b, testLogKey, testUUID, recs, true, 78, 12, 2, prev)
	vector(t, b, "testdata/log-block-data.hex")
	le := binary.LittleEndian
	if le.Uint32(b[24:]) != 2 || le.Uint64(b[logHdr+8:]) != 1<<63|1<<62|13 || le.Uint64(b[logHdr+logRecord+8:]) != 1 {
		t.Fatal("data count or in-log location not at FORMAT.md's offsets")
	}
	got, commit, data, gotMAC, ok := openLogBlock(b, testLogKey, testUUID, 78, 12, prev, nil)
	if !ok || !commit || data != 2 || gotMAC != mac || len(got) != 2 || got[0] != recs[0] {
		t.Fatalf("open: ok %v commit %v data %d", ok, commit, data)
	}
	if l := got[0].e.Loc(); !IsInLog(l) || LogPos(l) != 13 || HomeOf(l) != HomeB || Other(l) != HomeA {
		t.Fatalf("location %x: in log %v, position %d, home %d", l, IsInLog(l), LogPos(l), HomeOf(l))
	}
}

// clone returns a copy of everything on the device (a power cut of a
// device whose every write is durable).
func (d *memDev) clone() *memDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	c := &memDev{size: d.size, blocks: make(map[int64][]byte, len(d.blocks)), written: map[int64]int{}}
	for k, b := range d.blocks {
		c.blocks[k] = bytes.Clone(b)
	}
	return c
}

// A checkpoint that a FLUSH starts runs beside the commits after it
// (FORMAT.md, "Checkpoints beside commits"). With DeferCheckpoint its tree
// and header are written inside the next commit, after that commit is
// durable: the power is cut just before each header, and the old header
// must then replay through the reseed to the last commit; and just after,
// where the new one must. Without it, the checkpoint runs in its own
// goroutine while commits go on, riding on their flushes (Flusher).
func TestCheckpointBesideCommits(t *testing.T) {
	for _, deferred := range []bool{true, false} {
		t.Run(fmt.Sprintf("deferred=%v", deferred), func(t *testing.T) {
			const chunks = 300
			h := newHarness(t, chunks, 64, 24)
			h.cfg.LogData = true
			h.cfg.DeferCheckpoint = deferred
			fl := NewFlusher(h.dev)
			h.cfg.Dev = fl
			var (
				m        *Map
				dm       = dataModel{}
				crossed  int // recoveries from the old header that replayed past the reseed
				headers  int
				hmu      sync.Mutex
				recover_ = func(st State, what string) *Map {
					cfg := h.cfg
					cfg.Dev, cfg.Cache = h.dev.clone(), nil
					r, err := Open(cfg, st)
					if err != nil {
						t.Fatalf("%s: %v", what, err)
					}
					return r
				}
			)
			h.cfg.WriteHeader = func(st State) error {
				hmu.Lock()
				defer hmu.Unlock()
				if deferred { // the power is cut just before this header
					r := recover_(h.st, "before the header")
					if r.Seq() != m.Seq() {
						t.Errorf("before the header of checkpoint %d: recovered commit %d, the last durable is %d", st.Seq, r.Seq(), m.Seq())
					}
					if r.Seq() > st.Seq {
						crossed++
					}
					for c := uint64(0); c < chunks; c++ {
						got, err1 := r.Lookup(c)
						want, err2 := m.Lookup(c)
						if err1 != nil || err2 != nil || got != want {
							t.Errorf("before the header of checkpoint %d: chunk %d: %x (%v), live %x (%v)", st.Seq, c, got[:8], err1, want[:8], err2)
							break
						}
					}
				}
				h.st = st
				headers++
				return nil
			}
			m = h.open()
			rng := rand.New(rand.NewPCG(5, 6))
			for round := 1; round <= 400; round++ {
				for j := 0; j < 1+rng.IntN(3); j++ {
					c := uint64(rng.IntN(chunks))
					if rng.IntN(25) == 0 {
						m.Set(c, Entry{})
						dm[c] = -1
						continue
					}
					dm.write(t, h, m, c, round*10+j)
				}
				if err := m.Commit(noQuiesce); err != nil {
					t.Fatal(err)
				}
				if t.Failed() {
					t.FailNow()
				}
				if round%50 == 0 {
					dm.check(t, h, m, chunks, "live")
					hmu.Lock()
					st := h.st
					hmu.Unlock()
					if !deferred { // whichever header is durable now, with the log as it is
						dm.check(t, h, recover_(st, "mid-run"), chunks, "recovered mid-run")
					}
				}
			}
			m.waitCheckpoint()
			dm.check(t, h, m, chunks, "live")
			dm.check(t, h, recover_(h.st, "after the header"), chunks, "recovered")
			if err := m.Checkpoint(); err != nil {
				t.Fatal(err)
			}
			dm.check(t, h, recover_(h.st, "after the last checkpoint"), chunks, "after the last checkpoint")
			t.Logf("%d checkpoints, %d recoveries across a reseed", headers, crossed)
			if headers < 10 || deferred && crossed < 10 {
				t.Fatalf("%d checkpoints, %d recoveries across a reseed: the path was not exercised", headers, crossed)
			}
		})
	}
}
