package cowmap

import (
	"bytes"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"math/rand/v2"
	"os"
	"reflect"
	"strings"
	"sync"
	"testing"
)

// memDev is a sparse in-memory block device of 4096-byte blocks that
// counts reads, writes and flushes. Everything written is durable.
type memDev struct {
	mu       sync.Mutex
	size     int64
	blocks   map[int64][]byte
	reads    int // blocks read
	written  map[int64]int
	flushes  int
	failNext bool // the next Flush fails
}

func newMemDev(g Geometry) *memDev {
	return &memDev{size: int64(g.End * BlockSize), blocks: map[int64][]byte{}, written: map[int64]int{}}
}

func (d *memDev) Size() int64 { return d.size }

func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off%BlockSize != 0 || len(p)%BlockSize != 0 || off+int64(len(p)) > d.size {
		return 0, errors.New("memDev: unaligned or out of range read")
	}
	for i := 0; i < len(p); i += BlockSize {
		if b, ok := d.blocks[off/BlockSize+int64(i/BlockSize)]; ok {
			copy(p[i:], b)
		} else {
			clear(p[i : i+BlockSize])
		}
		d.reads++
	}
	return len(p), nil
}

func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if off%BlockSize != 0 || len(p)%BlockSize != 0 || off+int64(len(p)) > d.size {
		return 0, errors.New("memDev: unaligned or out of range write")
	}
	for i := 0; i < len(p); i += BlockSize {
		b := off/BlockSize + int64(i/BlockSize)
		d.blocks[b] = bytes.Clone(p[i : i+BlockSize])
		d.written[b]++
	}
	return len(p), nil
}

func (d *memDev) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flushes++
	if d.failNext {
		d.failNext = false
		return errors.New("memDev: injected flush failure")
	}
	return nil
}

func (d *memDev) Close() error { return nil }

// block returns block b (to read or edit in place).
func (d *memDev) block(b uint64) []byte {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.blocks[int64(b)] == nil {
		d.blocks[int64(b)] = make([]byte, BlockSize)
	}
	return d.blocks[int64(b)]
}

var (
	testUUID   = [16]byte{0x10, 0x20, 0x30, 15: 0xff}
	testLogKey = bytes.Repeat([]byte{0x4b}, 32)
)

func noQuiesce() func() { return func() {} }

// harness is a map on a memDev and the header state its checkpoints wrote.
type harness struct {
	t       *testing.T
	g       Geometry
	dev     *memDev
	st      State
	headers int // WriteHeader calls
	cfg     Config
}

func newHarness(t *testing.T, chunks, logBlocks uint64, maxLogged int) *harness {
	t.Helper()
	g, err := NewGeometry(chunks, logBlocks)
	if err != nil {
		t.Fatal(err)
	}
	h := &harness{t: t, g: g, dev: newMemDev(g)}
	h.cfg = Config{Dev: h.dev, Geo: g, UUID: testUUID, LogKey: testLogKey, MaxLogged: maxLogged,
		WriteHeader: func(st State) error { h.st = st; h.headers++; return nil }}
	return h
}

// open opens the map from the last state a checkpoint wrote (a reopen,
// or a recovery after a crash).
func (h *harness) open() *Map {
	h.t.Helper()
	m, err := Open(h.cfg, h.st)
	if err != nil {
		h.t.Fatal(err)
	}
	return m
}

// testEntry is a mapped entry at loc whose other fields say c and round.
func testEntry(c, loc uint64, round int) Entry {
	var e Entry
	e.SetLoc(loc)
	e.SetEpoch(uint32(round))
	e.SetKeySlot(uint8(c % 2))
	for i := range e.DAREHeader() {
		e.DAREHeader()[i] = byte(c>>8) ^ byte(i*7+round)
	}
	for i := range e.Tag() {
		e.Tag()[i] = byte(c) ^ byte(i*13+round)
	}
	return e
}

// model is what every chunk's entry must be.
type model map[uint64]Entry

// write sets chunk c, as the volume does: at the home Home gives.
func (md model) write(t *testing.T, m *Map, c uint64, round int) {
	t.Helper()
	home, err := m.Home(c)
	if err != nil {
		t.Fatal(err)
	}
	e := testEntry(c, home, round)
	m.Set(c, e)
	md[c] = e
}

// writeEvery writes chunks from, from+step, ... below to, and returns
// them (for commit).
func (md model) writeEvery(t *testing.T, m *Map, from, to, step uint64, round int) []uint64 {
	t.Helper()
	var written []uint64
	for c := from; c < to; c += step {
		md.write(t, m, c, round)
		written = append(written, c)
	}
	return written
}

func (md model) unmap(m *Map, c uint64) {
	m.Set(c, Entry{})
	md[c] = Entry{}
}

// commit commits m and stamps the model's uncommitted entries with the
// commit's sequence.
func (md model) commit(t *testing.T, m *Map, pending []uint64) {
	t.Helper()
	if err := m.Commit(noQuiesce); err != nil {
		t.Fatal(err)
	}
	m.waitCheckpoint() // the tests that count checkpoints see it done
	for _, c := range pending {
		e := md[c]
		e.SetGen(m.Seq())
		md[c] = e
	}
}

func (md model) check(t *testing.T, m *Map, chunks uint64, what string) {
	t.Helper()
	for c := uint64(0); c < chunks; c++ {
		got, err := m.Lookup(c)
		if err != nil {
			t.Fatalf("%s: chunk %d: %v", what, c, err)
		}
		if want := md[c]; got != want {
			t.Fatalf("%s: chunk %d: entry %x, want %x", what, c, got[:24], want[:24])
		}
	}
}

func TestSetCommitLookupReopen(t *testing.T) {
	h := newHarness(t, 500, 16, 1000)
	m := h.open()
	md := model{}
	pending := md.writeEvery(t, m, 0, 500, 3, 1)
	md.check(t, m, 500, "before the commit (dirty)")
	md.commit(t, m, pending)
	if m.Seq() != 1 || h.headers != 0 {
		t.Fatalf("after one commit: seq %d, %d header writes (want 1, 0: it fits the log)", m.Seq(), h.headers)
	}
	md.check(t, m, 500, "after the commit (logged)")
	md.check(t, h.open(), 500, "reopened from the log")

	pending = md.writeEvery(t, m, 1, 500, 7, 2)
	md.unmap(m, 3)
	pending = append(pending, 3)
	md.commit(t, m, pending)
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if h.headers != 1 || h.st.Seq != 2 || h.st.Root.Absent() {
		t.Fatalf("checkpoint wrote %d headers, state %+v", h.headers, h.st)
	}
	if h.st.Root.MaxGen != 2 {
		t.Errorf("root max generation %d, want 2", h.st.Root.MaxGen)
	}
	md.check(t, m, 500, "after the checkpoint")
	m2 := h.open()
	if m2.Seq() != 2 {
		t.Fatalf("reopened at seq %d, want 2", m2.Seq())
	}
	md.check(t, m2, 500, "reopened from the tree")
	// An empty checkpoint writes nothing.
	before := h.headers
	if err := m2.Checkpoint(); err != nil || h.headers != before {
		t.Fatalf("empty checkpoint: %v, %d header writes", err, h.headers-before)
	}
	// A commit of nothing is a flush only.
	flushes := h.dev.flushes
	if err := m2.Commit(noQuiesce); err != nil || m2.Seq() != 2 || h.dev.flushes != flushes+1 {
		t.Fatalf("empty commit: %v, seq %d, %d flushes", err, m2.Seq(), h.dev.flushes-flushes)
	}
}

// TryLookupRange answers from memory or says ErrNotCached, reading
// nothing; what it answers is what LookupRange does.
func TestTryLookupRangeReadsNothing(t *testing.T) {
	h := newHarness(t, 500, 16, 1000)
	m := h.open()
	md := model{}
	md.commit(t, m, md.writeEvery(t, m, 0, 300, 2, 1))
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	m2 := h.open() // its own, empty cache
	out := make([]Entry, 300)
	readsNow := func() int {
		h.dev.mu.Lock()
		defer h.dev.mu.Unlock()
		return h.dev.reads
	}
	missesNow := func() int {
		_, _, misses := m2.cfg.Cache.Stats()
		return int(misses)
	}
	before, missedBefore := readsNow(), missesNow()
	if err := m2.TryLookupRange(0, out); !errors.Is(err, ErrNotCached) {
		t.Fatalf("TryLookupRange on a cold cache: %v, want ErrNotCached", err)
	}
	if reads := readsNow() - before; reads != 0 {
		t.Fatalf("TryLookupRange read %d blocks", reads)
	}
	// The cache's misses are nodes read (goldilocks_map_cache_misses_total):
	// the probe that gave up read none.
	if m := missesNow() - missedBefore; m != 0 {
		t.Fatalf("TryLookupRange read nothing but counted %d misses", m)
	}
	if err := m2.LookupRange(0, out); err != nil {
		t.Fatal(err)
	}
	if reads, m := readsNow()-before, missesNow()-missedBefore; reads == 0 || m != reads {
		t.Fatalf("LookupRange read %d nodes and counted %d misses", reads, m)
	}
	clear(out)
	if err := m2.TryLookupRange(0, out); err != nil {
		t.Fatalf("TryLookupRange after LookupRange: %v", err)
	}
	for c := range out {
		if out[c] != md[uint64(c)] {
			t.Fatalf("chunk %d: TryLookupRange gave another entry than LookupRange", c)
		}
	}
}

// A commit too large for the log goes straight into the tree: nothing is
// written to the log, and the header names the commit.
func TestLargeCommitCheckpoints(t *testing.T) {
	h := newHarness(t, 1000, 4, 0) // room for 3 log blocks: 165 entries
	m := h.open()
	md := model{}
	pending := md.writeEvery(t, m, 0, 400, 1, 1)
	md.commit(t, m, pending)
	if h.headers != 1 || h.st.Seq != 1 || h.st.LogStart != 0 {
		t.Fatalf("a commit that does not fit the log: %d headers, state seq %d log start %d", h.headers, h.st.Seq, h.st.LogStart)
	}
	for p := uint64(0); p < h.g.LogBlocks; p++ {
		if h.dev.written[int64(h.g.logBlock(p))] != 0 {
			t.Fatalf("log block %d written by a commit that went to the tree", p)
		}
	}
	md.check(t, m, 1000, "after the large commit")
	md.check(t, h.open(), 1000, "reopened")
	// A small commit after it goes to the log again.
	md.write(t, m, 999, 2)
	md.commit(t, m, []uint64{999})
	if h.headers != 1 {
		t.Fatal("a small commit checkpointed")
	}
	md.check(t, h.open(), 1000, "reopened with a logged commit")
}

// Many commits of random sizes in a small log: the ring wraps (a commit
// is written in two runs), the checkpoint moves the log start around the
// ring, and after every commit a recovery from the store sees the model.
func TestRingWraps(t *testing.T) {
	const chunks = 300
	h := newHarness(t, chunks, 8, 1<<20)
	m := h.open()
	md := model{}
	rng := rand.New(rand.NewPCG(7, 7))
	starts := map[uint64]bool{}
	split := 0
	for i := 0; i < 120; i++ {
		n := 1 + rng.IntN(150) // up to 3 log blocks
		seen := map[uint64]bool{}
		var pending []uint64
		for j := 0; j < n; j++ {
			c := uint64(rng.IntN(chunks))
			if seen[c] {
				continue
			}
			seen[c] = true
			if rng.IntN(10) == 0 {
				md.unmap(m, c)
			} else {
				md.write(t, m, c, i)
			}
			pending = append(pending, c)
		}
		blocks := (uint64(len(pending)) + LogPerBlock - 1) / LogPerBlock
		head := m.used % h.g.LogBlocks
		toLog := m.used-m.base+blocks <= h.g.LogBlocks-1
		md.commit(t, m, pending)
		if toLog && head+blocks > h.g.LogBlocks {
			split++
		}
		starts[h.st.LogStart] = true
		md.check(t, h.open(), chunks, "recovered")
	}
	md.check(t, m, chunks, "live")
	t.Logf("log starts %v, %d commits written across the ring's end", starts, split)
	if len(starts) < int(h.g.LogBlocks)/2 || split == 0 {
		t.Fatalf("the ring did not wrap: log starts %v, %d commits across the ring's end", starts, split)
	}
}

func TestHomeAlternates(t *testing.T) {
	h := newHarness(t, 100, 16, 1000)
	m := h.open()
	md := model{}
	home := func(c uint64) uint64 {
		t.Helper()
		l, err := m.Home(c)
		if err != nil {
			t.Fatal(err)
		}
		return l
	}
	const c = 42
	if home(c) != HomeA {
		t.Fatal("a chunk never written goes to home A")
	}
	md.write(t, m, c, 1)
	if home(c) != HomeA {
		t.Fatal("rewritten before a commit: not the same home")
	}
	md.commit(t, m, []uint64{c})
	if home(c) != HomeB {
		t.Fatal("after a commit naming A: not B")
	}
	md.write(t, m, c, 2)
	md.write(t, m, c, 3)
	if home(c) != HomeB {
		t.Fatal("rewritten twice before a commit: not the same home")
	}
	md.commit(t, m, []uint64{c})
	if home(c) != HomeA {
		t.Fatal("after a commit naming B: not A")
	}
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	if home(c) != HomeA {
		t.Fatal("after a checkpoint (the tree names B): not A")
	}
	m = h.open()
	if home(c) != HomeA {
		t.Fatal("after a reopen (the tree names B): not A")
	}
	// An unmap not yet committed: the durable entry still names B, so a
	// write goes to A; once the unmap is durable, to A as for a new chunk.
	md.unmap(m, c)
	if home(c) != HomeA {
		t.Fatal("unmapped, not committed: not the home the durable entry does not name")
	}
	md.commit(t, m, []uint64{c})
	if home(c) != HomeA {
		t.Fatal("unmapped and committed: not A")
	}
}

// Runs against a brute-force Lookup of every chunk, over a three-level
// tree with never-written subtrees, tree entries, logged entries that
// override them (some unmapping), and uncommitted ones.
func TestRuns(t *testing.T) {
	const chunks = 2*LeafFanout*InteriorFanout + 5 // three levels
	h := newHarness(t, chunks, 64, 1<<20)
	m := h.open()
	h.dev.reads = 0 // the log replay's
	// A fresh map's runs read nothing: the root is absent.
	runs, err := m.Runs(nil, 0, chunks, 10)
	if err != nil || !reflect.DeepEqual(runs, []Run{{chunks, false}}) || h.dev.reads != 0 {
		t.Fatalf("fresh map: %v %v, %d blocks read", runs, err, h.dev.reads)
	}
	md := model{}
	rng := rand.New(rand.NewPCG(3, 4))
	write := func(lo, hi uint64) []uint64 {
		var p []uint64
		for c := lo; c < hi; c++ {
			md.write(t, m, c, 1)
			p = append(p, c)
		}
		return p
	}
	// In the tree: a few ranges, one across a leaf boundary, one at the end.
	var p []uint64
	p = append(p, write(10, 20)...)
	p = append(p, write(LeafFanout-3, LeafFanout+4)...)
	p = append(p, write(chunks-7, chunks)...)
	p = append(p, write(6000, 6001)...)
	md.commit(t, m, p)
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	// A reopened map reads a subtree only where something was written.
	m = h.open()
	h.dev.reads = 0
	if _, err := m.Runs(nil, 3*LeafFanout, LeafFanout*InteriorFanout, 10); err != nil {
		t.Fatal(err)
	}
	if h.dev.reads > h.g.Levels {
		t.Errorf("runs over never-written leaves read %d blocks", h.dev.reads)
	}
	// Logged: some new, some unmapping tree entries.
	p = write(15, 25)
	md.unmap(m, LeafFanout)
	md.unmap(m, chunks-1)
	p = append(p, LeafFanout, chunks-1)
	md.commit(t, m, p)
	// Dirty: not committed.
	write(200, 203)
	md.unmap(m, 12)
	mapped := make([]bool, chunks) // the truth, by Lookup of every chunk
	for c := range mapped {
		e, err := m.Lookup(uint64(c))
		if err != nil {
			t.Fatal(err)
		}
		mapped[c] = e.Mapped()
	}
	brute := func(from, to uint64, maxRuns int) []Run {
		var out []Run
		for c := from; c < to; c++ {
			if k := len(out); k > 0 && out[k-1].Mapped == mapped[c] {
				out[k-1].Chunks++
				continue
			}
			if len(out) == maxRuns {
				break
			}
			out = append(out, Run{1, mapped[c]})
		}
		return out
	}
	check := func(from, to uint64, maxRuns int) {
		t.Helper()
		got, err := m.Runs(nil, from, to, maxRuns)
		if err != nil {
			t.Fatal(err)
		}
		if want := brute(from, to, maxRuns); !reflect.DeepEqual(got, want) {
			t.Fatalf("Runs(%d, %d, %d) = %v, want %v", from, to, maxRuns, got, want)
		}
	}
	check(0, chunks, 1000)
	check(0, chunks, 1)
	check(0, chunks, 3)
	check(12, 13, 5)
	check(LeafFanout-5, LeafFanout+10, 100)
	check(5000, 7000, 100)
	check(chunks-10, chunks, 100)
	for i := 0; i < 200; i++ {
		from := uint64(rng.IntN(chunks))
		to := from + 1 + uint64(rng.IntN(int(chunks-from)))
		check(from, to, 1+rng.IntN(8))
	}
}

// The map's own defences, seen with the key (the tests play the key
// holder to get past the MAC and the hashes): each fails with ErrMapAuth
// or ends the log, never returns a forged entry.
func TestTamper(t *testing.T) {
	setup := func(t *testing.T) (*harness, *Map, model) {
		h := newHarness(t, 200, 16, 1000)
		m := h.open()
		md := model{}
		var p []uint64
		for c := uint64(0); c < 200; c++ {
			md.write(t, m, c, 1)
			p = append(p, c)
		}
		md.commit(t, m, p)
		if err := m.Checkpoint(); err != nil {
			t.Fatal(err)
		}
		md.write(t, m, 5, 2)
		md.commit(t, m, []uint64{5})
		md.write(t, m, 6, 3)
		md.commit(t, m, []uint64{6})
		return h, m, md
	}
	leafBlock := func(h *harness, idx uint64) []byte {
		root := h.dev.block(h.g.nodeBlock(1, 0, h.st.Root.Loc))
		ref := ParseRef(root[nodeHdr+idx*RefSize:])
		return h.dev.block(h.g.nodeBlock(0, idx, ref.Loc))
	}
	// fix puts leaf idx's hash in the root and the root's in the state.
	fix := func(h *harness, idx uint64) {
		root := h.dev.block(h.g.nodeBlock(1, 0, h.st.Root.Loc))
		ref := ParseRef(root[nodeHdr+idx*RefSize:])
		ref.Hash = sha256.Sum256(leafBlock(h, idx))
		ref.Marshal(root[nodeHdr+idx*RefSize:])
		h.st.Root.Hash = sha256.Sum256(root)
	}
	lookupFails := func(t *testing.T, m *Map, c uint64) {
		t.Helper()
		if e, err := m.Lookup(c); !errors.Is(err, ErrMapAuth) {
			t.Fatalf("chunk %d: %x, %v; want ErrMapAuth", c, e[:8], err)
		}
	}
	t.Run("leaf edited, hash not fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		leafBlock(h, 1)[nodeHdr+10] ^= 1
		lookupFails(t, h.open(), LeafFanout)
	})
	t.Run("entry location 3, hashes fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		binary.LittleEndian.PutUint64(leafBlock(h, 1)[nodeHdr+2*EntrySize:], 3)
		fix(h, 1)
		m := h.open()
		lookupFails(t, m, LeafFanout)
		if _, err := m.Lookup(0); err != nil {
			t.Fatalf("another leaf: %v", err)
		}
	})
	t.Run("entry reserved bytes, hashes fixed", func(t *testing.T) {
		for _, off := range []int{21, 56, 63} {
			h, _, _ := setup(t)
			leafBlock(h, 1)[nodeHdr+off] = 1
			fix(h, 1)
			lookupFails(t, h.open(), LeafFanout)
		}
	})
	t.Run("entry key slot 2, hashes fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		leafBlock(h, 1)[nodeHdr+20] = 2
		fix(h, 1)
		lookupFails(t, h.open(), LeafFanout)
	})
	t.Run("leaf at another index's place, hashes fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		copy(leafBlock(h, 1), leafBlock(h, 2))
		fix(h, 1)
		lookupFails(t, h.open(), LeafFanout)
	})
	t.Run("leaf of another volume, hashes fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		leafBlock(h, 1)[24] ^= 1 // the UUID
		fix(h, 1)
		lookupFails(t, h.open(), LeafFanout)
	})
	t.Run("reference location 3, hashes fixed", func(t *testing.T) {
		h, _, _ := setup(t)
		root := h.dev.block(h.g.nodeBlock(1, 0, h.st.Root.Loc))
		binary.LittleEndian.PutUint64(root[nodeHdr+1*RefSize:], 3)
		h.st.Root.Hash = sha256.Sum256(root)
		lookupFails(t, h.open(), LeafFanout)
	})
	t.Run("root location 3 in the state", func(t *testing.T) {
		h, _, _ := setup(t)
		h.st.Root.Loc = 3
		if _, err := Open(h.cfg, h.st); !errors.Is(err, ErrMapAuth) {
			t.Fatalf("%v, want ErrMapAuth", err)
		}
	})
	t.Run("log record location 3, MACed", func(t *testing.T) {
		h, _, _ := setup(t)
		b := h.dev.block(h.g.logBlock(h.st.LogStart))
		recs, commit, _, _, ok := openLogBlock(b, testLogKey, testUUID, h.st.Seq+1, h.st.LogStart, Reseed(testLogKey, h.st.Seq, h.st.LogStart), nil)
		if !ok {
			t.Fatal("the first log block does not open")
		}
		recs[0].e.SetLoc(3)
		sealLogBlock(b, testLogKey, testUUID, recs, commit, h.st.Seq+1, h.st.LogStart, 0, Reseed(testLogKey, h.st.Seq, h.st.LogStart))
		if _, err := Open(h.cfg, h.st); !errors.Is(err, ErrMapAuth) {
			t.Fatalf("%v, want ErrMapAuth", err)
		}
	})
	t.Run("log record for a chunk beyond the volume, MACed", func(t *testing.T) {
		h, _, _ := setup(t)
		b := h.dev.block(h.g.logBlock(h.st.LogStart))
		seed := Reseed(testLogKey, h.st.Seq, h.st.LogStart)
		recs, commit, _, _, _ := openLogBlock(b, testLogKey, testUUID, h.st.Seq+1, h.st.LogStart, seed, nil)
		recs[0].chunk = 200
		sealLogBlock(b, testLogKey, testUUID, recs, commit, h.st.Seq+1, h.st.LogStart, 0, seed)
		if _, err := Open(h.cfg, h.st); !errors.Is(err, ErrMapAuth) {
			t.Fatalf("%v, want ErrMapAuth", err)
		}
	})
	t.Run("log block edited: the log ends before it", func(t *testing.T) {
		h, _, md := setup(t)
		h.dev.block(h.g.logBlock(h.st.LogStart + 1))[logHdr+9] ^= 1 // the second commit
		m := h.open()
		if m.Seq() != h.st.Seq+1 {
			t.Fatalf("recovered seq %d, want %d", m.Seq(), h.st.Seq+1)
		}
		if e, _ := m.Lookup(6); e == md[6] {
			t.Fatal("the edited commit was applied")
		}
	})
	t.Run("log under another key: nothing replays", func(t *testing.T) {
		h, _, _ := setup(t)
		h.cfg.LogKey = bytes.Repeat([]byte{1}, 32)
		if m := h.open(); m.Seq() != h.st.Seq {
			t.Fatalf("recovered seq %d with another key, want %d", m.Seq(), h.st.Seq)
		}
	})
}

// Recovery drops a last commit whose data Verify does not find (a crash
// inside a flush), and only the last.
func TestRecoveryDropsUnverifiedLastCommit(t *testing.T) {
	h := newHarness(t, 100, 16, 1000)
	m := h.open()
	md := model{}
	md.write(t, m, 1, 1)
	md.commit(t, m, []uint64{1})
	md.write(t, m, 2, 2)
	md.commit(t, m, []uint64{2})
	h.cfg.Verify = func(c uint64, e *Entry) bool { return c != 2 }
	m2 := h.open()
	if m2.Seq() != 1 || !m2.DroppedLastCommit() {
		t.Fatalf("seq %d, dropped %v; want 1, true", m2.Seq(), m2.DroppedLastCommit())
	}
	if e, _ := m2.Lookup(2); e.Mapped() {
		t.Fatal("the dropped commit's entry is served")
	}
	h.cfg.Verify = func(c uint64, e *Entry) bool { return c != 1 } // not the last commit
	if m3 := h.open(); m3.Seq() != 2 || m3.DroppedLastCommit() {
		t.Fatalf("seq %d, dropped %v; want 2, false", m3.Seq(), m3.DroppedLastCommit())
	}
	// The next commit after a drop reuses the sequence and the position.
	h.cfg.Verify = func(c uint64, e *Entry) bool { return c != 2 }
	m4 := h.open()
	md2 := model{1: md[1]}
	md2.write(t, m4, 3, 3)
	md2.commit(t, m4, []uint64{3})
	h.cfg.Verify = nil
	m5 := h.open()
	if m5.Seq() != 2 {
		t.Fatalf("seq %d after the commit that replaced the dropped one", m5.Seq())
	}
	md2.check(t, m5, 100, "after a drop and a new commit")
}

// A failed flush fails the map: commits and Home refuse from then on.
func TestFailedFlushFailsTheMap(t *testing.T) {
	h := newHarness(t, 100, 16, 1000)
	m := h.open()
	md := model{}
	md.write(t, m, 1, 1)
	h.dev.failNext = true
	if err := m.Commit(noQuiesce); !errors.Is(err, ErrFailed) {
		t.Fatalf("commit with a failed flush: %v", err)
	}
	if _, err := m.Home(2); !errors.Is(err, ErrFailed) {
		t.Fatalf("Home after a failed flush: %v", err)
	}
	if err := m.Commit(noQuiesce); !errors.Is(err, ErrFailed) || m.Failed() == nil {
		t.Fatalf("commit after a failed flush: %v", err)
	}
	if err := m.Checkpoint(); !errors.Is(err, ErrFailed) {
		t.Fatalf("checkpoint after a failed flush: %v", err)
	}
}

// vector compares b with the hex file path (written anew when
// GOLDILOCKS_UPDATE_VECTORS is set).
func vector(t *testing.T, b []byte, path string) {
	t.Helper()
	if os.Getenv("GOLDILOCKS_UPDATE_VECTORS") != "" {
		if err := os.WriteFile(path, []byte(hex.EncodeToString(b)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want, err := hex.DecodeString(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, want) {
		t.Fatalf("%s: the encoding changed: the format is fixed (crypto/FORMAT.md)", path)
	}
}

func TestVectorLeafNode(t *testing.T) {
	n := newNode(0, 7, 1234, testUUID)
	for i, c := range []uint64{0, 1, 62} {
		e := testEntry(7*LeafFanout+c, uint64(1+i%2), i)
		e.SetGen(1000 + uint64(i))
		*n.entry(int(c)) = e
	}
	vector(t, n[:], "testdata/leaf-node.hex")
	le := binary.LittleEndian
	if string(n[0:4]) != "GLMN" || n[4] != 0 || le.Uint64(n[8:]) != 7 || le.Uint64(n[16:]) != 1234 || [16]byte(n[24:40]) != testUUID {
		t.Fatal("node header fields not at FORMAT.md's offsets")
	}
	if n.check(0, 7, testUUID) != nil || n.check(0, 8, testUUID) == nil || n.check(1, 7, testUUID) == nil {
		t.Fatal("check does not bind level and index")
	}
	e := n.entry(62)
	if e.Loc() != HomeA || e.Gen() != 1002 || e.Epoch() != 2 || le.Uint64(n[64+62*64:]) != HomeA || le.Uint64(n[64+62*64+8:]) != 1002 {
		t.Fatalf("entry 62: loc %d gen %d epoch %d", e.Loc(), e.Gen(), e.Epoch())
	}
	if !bytes.Equal(e.DAREHeader(), n[64+62*64+24:64+62*64+40]) || !bytes.Equal(e.Tag(), n[64+62*64+40:64+62*64+56]) {
		t.Fatal("DARE header and tag not at FORMAT.md's offsets")
	}
	if !n.entry(5).valid() || n.entry(5).Mapped() || !e.valid() {
		t.Fatal("entries' validity")
	}
	if n.maxGen() != 1002 {
		t.Fatalf("max generation %d", n.maxGen())
	}
}

func TestVectorInteriorNode(t *testing.T) {
	n := newNode(2, 3, 99, testUUID)
	for i, c := range []int{0, 40, 83} {
		var h [32]byte
		for j := range h {
			h[j] = byte(j*3 + i)
		}
		n.setRef(c, Ref{Loc: uint64(1 + i%2), Hash: h, MaxGen: 50 + uint64(i)})
	}
	vector(t, n[:], "testdata/interior-node.hex")
	r := n.ref(83)
	le := binary.LittleEndian
	if r.Loc != HomeA || r.MaxGen != 52 || r.Hash[0] != 2 || le.Uint64(n[64+83*48:]) != HomeA ||
		!bytes.Equal(n[64+83*48+8:64+83*48+40], r.Hash[:]) || le.Uint64(n[64+83*48+40:]) != 52 {
		t.Fatalf("reference 83: %+v", r)
	}
	if n.ref(1).Absent() != true || n.level() != 2 || n.index() != 3 || n.maxGen() != 52 {
		t.Fatal("interior node fields")
	}
}

func TestVectorLogBlock(t *testing.T) {
	var prev [32]byte
	for i := range prev {
		prev[i] = byte(0xf0 ^ i)
	}
	recs := []record{{5, testEntry(5, HomeB, 1)}, {6, Entry{}}, {1 << 31, testEntry(1<<31, HomeA, 2)}}
	recs[0].e.SetGen(77)
	recs[1].e.SetGen(77)
	recs[2].e.SetGen(77)
	b := make([]byte, BlockSize)
	mac := sealLogBlock(b, testLogKey, testUUID, recs, true, 77, 12, 0, prev)
	vector(t, b, "testdata/log-block.hex")
	le := binary.LittleEndian
	if string(b[0:4]) != "GLML" || le.Uint16(b[4:]) != 3 || b[6] != 1 || le.Uint64(b[8:]) != 77 || le.Uint64(b[16:]) != 12 ||
		!bytes.Equal(b[32:64], prev[:]) || le.Uint64(b[64+72*2:]) != 1<<31 || !bytes.Equal(b[BlockSize-32:], mac[:]) {
		t.Fatal("log block fields not at FORMAT.md's offsets")
	}
	// The MAC is HMAC-SHA256(Kl, bytes 0..4064 ‖ UUID).
	hm := hmac.New(sha256.New, testLogKey)
	hm.Write(b[:BlockSize-32])
	hm.Write(testUUID[:])
	if !hmac.Equal(hm.Sum(nil), mac[:]) {
		t.Fatal("the MAC is not HMAC-SHA256(Kl, block ‖ UUID)")
	}
	got, commit, data, gotMAC, ok := openLogBlock(b, testLogKey, testUUID, 77, 12, prev, nil)
	if !ok || !commit || data != 0 || gotMAC != mac || !reflect.DeepEqual(got, recs) {
		t.Fatalf("open: ok %v commit %v records %v", ok, commit, got)
	}
	for _, bad := range []struct {
		name     string
		seq, pos uint64
		prev     [32]byte
		key      []byte
		uuid     [16]byte
	}{
		{"seq", 78, 12, prev, testLogKey, testUUID},
		{"pos", 77, 13, prev, testLogKey, testUUID},
		{"prev", 77, 12, [32]byte{}, testLogKey, testUUID},
		{"key", 77, 12, prev, bytes.Repeat([]byte{1}, 32), testUUID},
		{"uuid", 77, 12, prev, testLogKey, [16]byte{1}},
	} {
		if _, _, _, _, ok := openLogBlock(b, bad.key, bad.uuid, bad.seq, bad.pos, bad.prev, nil); ok {
			t.Errorf("opened with the wrong %s", bad.name)
		}
	}
}

func TestVectorSeed(t *testing.T) {
	root := Ref{Loc: HomeB, Hash: [32]byte{1, 2, 3, 31: 4}, MaxGen: 41}
	s := Seed(testLogKey, 41, root, 9)
	vector(t, s[:], "testdata/seed.hex")
	// HMAC-SHA256(Kl, "seed" ‖ S ‖ root reference ‖ log start).
	hm := hmac.New(sha256.New, testLogKey)
	hm.Write([]byte("seed"))
	hm.Write(binary.LittleEndian.AppendUint64(nil, 41))
	var r [RefSize]byte
	root.Marshal(r[:])
	hm.Write(r[:])
	hm.Write(binary.LittleEndian.AppendUint64(nil, 9))
	if !hmac.Equal(hm.Sum(nil), s[:]) {
		t.Fatal("the seed is not HMAC-SHA256(Kl, \"seed\" ‖ S ‖ root ‖ log start)")
	}
	for _, other := range [][32]byte{Seed(testLogKey, 42, root, 9), Seed(testLogKey, 41, Ref{}, 9), Seed(testLogKey, 41, root, 10)} {
		if other == s {
			t.Fatal("the seed does not bind every field")
		}
	}
}

func TestVectorReseed(t *testing.T) {
	s := Reseed(testLogKey, 41, 9)
	vector(t, s[:], "testdata/reseed.hex")
	// HMAC-SHA256(Kl, "reseed" ‖ S ‖ P).
	hm := hmac.New(sha256.New, testLogKey)
	hm.Write([]byte("reseed"))
	hm.Write(binary.LittleEndian.AppendUint64(nil, 41))
	hm.Write(binary.LittleEndian.AppendUint64(nil, 9))
	if !hmac.Equal(hm.Sum(nil), s[:]) {
		t.Fatal("the reseed is not HMAC-SHA256(Kl, \"reseed\" ‖ S ‖ P)")
	}
	if Reseed(testLogKey, 42, 9) == s || Reseed(testLogKey, 41, 10) == s || s == Seed(testLogKey, 41, Ref{}, 9) {
		t.Fatal("the reseed does not bind every field, or equals a seed")
	}
}

// FuzzOpenLogBlock feeds any 4096 bytes (the map reads whole blocks) to
// openLogBlock. It must never panic, and never accept a block unless its
// MAC is the HMAC of its bytes under the key and its header is the one
// asked for. With sign, the fuzzer plays the key holder (header fields
// and MAC set right), so that what lies past the MAC is explored too.
func FuzzOpenLogBlock(f *testing.F) {
	var prev [32]byte
	prev[0] = 9
	good := make([]byte, BlockSize)
	sealLogBlock(good, testLogKey, testUUID, []record{{3, testEntry(3, HomeA, 1)}}, true, 5, 2, 0, prev)
	f.Add(good, uint64(5), uint64(2), false)
	f.Add(good[:100], uint64(5), uint64(2), true)
	f.Add([]byte{}, uint64(0), uint64(0), false)
	bad := bytes.Clone(good)
	bad[4] = 56 // more records than fit
	f.Add(bad, uint64(5), uint64(2), true)
	f.Fuzz(func(t *testing.T, data []byte, seq, pos uint64, sign bool) {
		b := make([]byte, BlockSize)
		copy(b, data)
		if sign {
			copy(b[0:4], "GLML")
			binary.LittleEndian.PutUint64(b[8:], seq)
			binary.LittleEndian.PutUint64(b[16:], pos)
			copy(b[32:64], prev[:])
			hm := hmac.New(sha256.New, testLogKey)
			hm.Write(b[:BlockSize-32])
			hm.Write(testUUID[:])
			copy(b[BlockSize-32:], hm.Sum(nil))
		}
		recs, commit, nData, _, ok := openLogBlock(b, testLogKey, testUUID, seq, pos, prev, nil)
		if !ok {
			return
		}
		hm := hmac.New(sha256.New, testLogKey)
		hm.Write(b[:BlockSize-32])
		hm.Write(testUUID[:])
		if !hmac.Equal(hm.Sum(nil), b[BlockSize-32:]) {
			t.Fatal("accepted a block whose MAC is not the key's")
		}
		le := binary.LittleEndian
		if string(b[:4]) != "GLML" || le.Uint64(b[8:]) != seq || le.Uint64(b[16:]) != pos || !bytes.Equal(b[32:64], prev[:]) {
			t.Fatal("accepted a block with another header")
		}
		if len(recs) > LogPerBlock || len(recs) != int(le.Uint16(b[4:])) || commit != (b[6] == 1) || b[6] > 1 {
			t.Fatalf("accepted %d records, flags %x", len(recs), b[6])
		}
		if nData > maxLogData || nData != le.Uint32(b[24:]) || b[7] != 0 || le.Uint32(b[28:]) != 0 {
			t.Fatalf("accepted %d data blocks, reserved bytes %x %x", nData, b[7], b[28:32])
		}
		for i, r := range recs {
			if r.chunk != le.Uint64(b[logHdr+i*logRecord:]) || !bytes.Equal(r.e[:], b[logHdr+i*logRecord+8:][:EntrySize]) {
				t.Fatalf("record %d does not match its bytes", i)
			}
		}
		if !sign && !bytes.Equal(b, good) {
			t.Fatal("accepted a block the key holder never sealed")
		}
	})
}

func TestGeometry(t *testing.T) {
	const L = 16
	for _, tc := range []struct {
		chunks uint64
		levels int
		counts []uint64
		starts []uint64
		nodes  uint64
		end    uint64
	}{
		{1, 1, []uint64{1}, []uint64{0}, 1, 22},
		{63, 1, []uint64{1}, []uint64{0}, 1, 146},
		{64, 2, []uint64{2, 1}, []uint64{0, 2}, 3, 152},
		{63 * 84, 2, []uint64{84, 1}, []uint64{0, 84}, 85, 10772},
		{63*84 + 1, 3, []uint64{85, 2, 1}, []uint64{0, 85, 87}, 88, 10780},
		{1 << 32, 6, []uint64{68174085, 811597, 9662, 116, 2, 1}, []uint64{0, 68174085, 68985682, 68995344, 68995460, 68995462}, 68995463, 8727925536},
	} {
		g, err := NewGeometry(tc.chunks, L)
		if err != nil {
			t.Fatalf("%d chunks: %v", tc.chunks, err)
		}
		if g.Levels != tc.levels || !reflect.DeepEqual(g.LevelCount, tc.counts) || !reflect.DeepEqual(g.LevelStart, tc.starts) ||
			g.Nodes != tc.nodes || g.End != tc.end {
			t.Errorf("%d chunks: levels %d counts %v starts %v nodes %d end %d; want %d %v %v %d %d",
				tc.chunks, g.Levels, g.LevelCount, g.LevelStart, g.Nodes, g.End, tc.levels, tc.counts, tc.starts, tc.nodes, tc.end)
		}
		// FORMAT.md's layout: header 0..2, log 2..2+L, nodes, data.
		if g.LogBase != 2 || g.NodeBase != 2+L || g.DataBase != 2+L+2*tc.nodes ||
			g.DataBlock(0, HomeA) != g.DataBase || g.DataBlock(tc.chunks-1, HomeB) != g.End-1 ||
			g.nodeBlock(0, 0, HomeA) != g.NodeBase || g.nodeBlock(g.Levels-1, 0, HomeB) != g.DataBase-1 {
			t.Errorf("%d chunks: regions at %d %d %d", tc.chunks, g.LogBase, g.NodeBase, g.DataBase)
		}
	}
	for _, n := range []uint64{0, 1<<32 + 1} {
		if _, err := NewGeometry(n, L); err == nil {
			t.Errorf("NewGeometry(%d chunks) accepted", n)
		}
	}
	for _, l := range []uint64{0, 3, 1<<24 + 1} {
		if _, err := NewGeometry(1, l); err == nil {
			t.Errorf("NewGeometry with a log of %d blocks accepted", l)
		}
	}
	for _, l := range []uint64{4, 1 << 24} {
		if _, err := NewGeometry(1, l); err != nil {
			t.Errorf("NewGeometry with a log of %d blocks: %v", l, err)
		}
	}
}

// A checkpoint's new version of a node replaces the old one in the cache:
// after many checkpoints rewriting every node, the cache holds one
// version per node and serves every lookup without a read. (With the
// home in the cache key, both versions stayed and a cache sized for the
// map held half of it.)
func TestCacheOneVersionPerNode(t *testing.T) {
	const chunks = 63 * 40
	h := newHarness(t, chunks, 64, 1<<20)
	h.cfg.Cache = NewCache(int(h.g.Nodes) * BlockSize * 4) // room for all, twice over
	m := h.open()
	md := model{}
	for round := 1; round <= 4; round++ {
		pending := make([]uint64, 0, chunks)
		for c := uint64(0); c < chunks; c++ {
			md.write(t, m, c, round)
			pending = append(pending, c)
		}
		md.commit(t, m, pending)
		if err := m.Checkpoint(); err != nil {
			t.Fatal(err)
		}
	}
	if nodes, _, _ := h.cfg.Cache.Stats(); nodes > int(h.g.Nodes) {
		t.Errorf("cache holds %d nodes for a map of %d: old versions kept", nodes, h.g.Nodes)
	}
	reads := h.dev.reads
	md.check(t, m, chunks, "after four checkpoints")
	if h.dev.reads != reads {
		t.Errorf("lookups read %d blocks with every node cached", h.dev.reads-reads)
	}
}

// A map node read from the store is used only if its hash matches its
// parent's reference; behind that check its contents are still parsed
// with care. Here the fuzzer plays an adversary who also controls the
// reference (as if it could forge the header): whatever the leaf and
// root hold, Open, Lookup, LookupRange and Homes return values or
// errors, never panic, and never name a location other than A, B or
// unmapped.
func FuzzNode(f *testing.F) {
	g, _ := NewGeometry(63*3, 16)
	leaf := newNode(0, 1, 4, testUUID)
	e := testEntry(70, HomeB, 2)
	e.SetGen(4)
	*leaf.entry(70 % LeafFanout) = e
	f.Add(leaf[:], leaf[:], uint8(0))
	root := newNode(1, 0, 4, testUUID)
	root.setRef(1, Ref{Loc: HomeA, Hash: leaf.hash(), MaxGen: 4})
	f.Add(root[:], leaf[:], uint8(1))
	f.Fuzz(func(t *testing.T, rootB, leafB []byte, loc uint8) {
		var r, l node
		copy(r[:], rootB)
		copy(l[:], leafB)
		// The root names the fuzzed leaf as child 1 if it says so.
		if loc&1 == 1 {
			r.setRef(1, Ref{Loc: HomeA, Hash: l.hash(), MaxGen: r.ref(1).MaxGen})
		}
		d := newMemDev(g)
		d.WriteAt(r[:], int64(g.nodeBlock(g.Levels-1, 0, HomeA)*BlockSize))
		d.WriteAt(l[:], int64(g.nodeBlock(0, 1, HomeA)*BlockSize))
		cfg := Config{Dev: d, Geo: g, UUID: testUUID, LogKey: testLogKey, WriteHeader: func(State) error { return nil }}
		m, err := Open(cfg, State{Seq: 4, Root: Ref{Loc: HomeA, Hash: r.hash(), MaxGen: 4}, LogStart: 0})
		if err != nil {
			return
		}
		defer m.Close()
		for c := uint64(0); c < g.Chunks; c++ {
			if e, err := m.Lookup(c); err == nil && e.Loc() > HomeB {
				t.Fatalf("chunk %d: location %d served", c, e.Loc())
			}
		}
		es := make([]Entry, g.Chunks)
		m.LookupRange(0, es)
		homes := make([]uint64, g.Chunks)
		if err := m.Homes(0, homes); err == nil {
			for c, h := range homes {
				if h != HomeA && h != HomeB {
					t.Fatalf("chunk %d: a write would go to home %d", c, h)
				}
			}
		}
	})
}

// While a checkpoint runs in the background, Homes walks the tree its
// header has not yet replaced: the nodes it rewrote must not push the old
// versions out of the cache (each walk would then read and hash them
// again), and once its header is written the new versions are cached.
func TestHomesDuringCheckpointReadNothing(t *testing.T) {
	const chunks = 63 * 84 * 3 // three interior nodes below the root
	h := newHarness(t, chunks, 64, 1<<20)
	h.cfg.Cache = NewCache(int(h.g.Nodes) * BlockSize * 4) // room for all, twice over
	m := h.open()
	defer m.Close()
	md := model{}
	md.commit(t, m, md.writeEvery(t, m, 0, chunks, 1, 1))
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	// The next checkpoint runs in the background and waits in its header
	// write until the test lets it go.
	m.cfg.MaxLogged = 10
	entered, release := make(chan struct{}), make(chan struct{})
	write := h.cfg.WriteHeader
	m.cfg.WriteHeader = func(st State) error {
		close(entered)
		<-release
		return write(st)
	}
	// Chunks of even leaves change; a write to an odd leaf asks where.
	var pending []uint64
	for li := uint64(0); li < chunks/LeafFanout; li += 2 {
		md.write(t, m, li*LeafFanout, 2)
		pending = append(pending, li*LeafFanout)
	}
	if err := m.Commit(noQuiesce); err != nil {
		t.Fatal(err)
	}
	for _, c := range pending {
		e := md[c]
		e.SetGen(m.Seq())
		md[c] = e
	}
	<-entered
	homes := func(when string) {
		t.Helper()
		reads := h.dev.reads
		out := make([]uint64, 1)
		for li := uint64(1); li < chunks/LeafFanout; li += 2 {
			if err := m.Homes(li*LeafFanout+5, out); err != nil {
				t.Fatal(err)
			}
		}
		if n := h.dev.reads - reads; n != 0 {
			t.Errorf("%s: Homes read %d map blocks with every node cached", when, n)
		}
	}
	homes("during the checkpoint")
	close(release)
	m.waitCheckpoint()
	if h.st.Seq != 2 {
		t.Fatalf("the checkpoint wrote state seq %d, want 2", h.st.Seq)
	}
	homes("after the checkpoint")
	md.check(t, m, chunks, "after the checkpoint")
	md.check(t, h.open(), chunks, "reopened")
}

// Changed against a brute-force model: every chunk's last committed
// change (the commit sequence) and the staged ones, for every since from
// before the first commit to the last, across checkpointed, logged and
// staged entries; and a reopened map answers "changed since the last
// checkpoint but one" by reading only the subtrees that changed.
func TestChanged(t *testing.T) {
	const chunks = 2*LeafFanout*InteriorFanout + 5 // three levels
	h := newHarness(t, chunks, 64, 1<<20)
	m := h.open()
	md := model{}
	rng := rand.New(rand.NewPCG(5, 6))
	changedAt := map[uint64]uint64{} // chunk -> commit of its last change
	var seqs []uint64
	round := func(n int, commit bool) {
		var p []uint64
		for range n {
			c := uint64(rng.IntN(chunks))
			if rng.IntN(5) == 0 {
				md.unmap(m, c) // a TRIM is a change too
			} else {
				md.write(t, m, c, 1)
			}
			p = append(p, c)
		}
		if commit {
			md.commit(t, m, p)
			for _, c := range p {
				changedAt[c] = m.Seq()
			}
			seqs = append(seqs, m.Seq())
		}
	}
	round(300, true)
	round(50, true)
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	round(40, true) // logged
	round(5, true)
	staged := map[uint64]bool{}
	for range 7 { // staged, not committed
		c := uint64(rng.IntN(chunks))
		md.write(t, m, c, 2)
		staged[c] = true
	}
	brute := func(from, to, since uint64, maxRuns int) []Run {
		var out []Run
		for c := from; c < to; c++ {
			ch := staged[c] || changedAt[c] > since
			if k := len(out); k > 0 && out[k-1].Mapped == ch {
				out[k-1].Chunks++
				continue
			}
			if len(out) == maxRuns {
				break
			}
			out = append(out, Run{1, ch})
		}
		return out
	}
	for _, since := range append([]uint64{0}, seqs...) {
		for _, r := range [][3]uint64{{0, chunks, 100000}, {0, chunks, 3}, {LeafFanout - 5, LeafFanout + 10, 100}} {
			got, err := m.Changed(nil, r[0], r[1], since, int(r[2]))
			if err != nil {
				t.Fatal(err)
			}
			if want := brute(r[0], r[1], since, int(r[2])); !reflect.DeepEqual(got, want) {
				i := 0
				for i < min(len(got), len(want)) && got[i] == want[i] {
					i++
				}
				t.Fatalf("Changed(%d, %d, since %d, %d): %d runs, want %d; first difference at run %d: %v, want %v",
					r[0], r[1], since, r[2], len(got), len(want), i, got[i:min(i+3, len(got))], want[i:min(i+3, len(want))])
			}
		}
	}
	// Checkpointed, reopened: changes after the commit before the last
	// one are in one subtree path each; nothing else is read.
	if err := m.Commit(noQuiesce); err != nil {
		t.Fatal(err)
	}
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	last := m.Seq()
	md.write(t, m, 7, 3)
	md.commit(t, m, []uint64{7})
	if err := m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	m = h.open()
	h.dev.reads = 0
	got, err := m.Changed(nil, 0, chunks, last, 100)
	if err != nil {
		t.Fatal(err)
	}
	if want := []Run{{7, false}, {1, true}, {chunks - 8, false}}; !reflect.DeepEqual(got, want) {
		t.Fatalf("changed since %d: %v, want %v", last, got, want)
	}
	if h.dev.reads > h.g.Levels {
		t.Errorf("changed since %d read %d blocks, want at most the path to chunk 7 (%d)", last, h.dev.reads, h.g.Levels)
	}
}
