package crypto

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"math/rand/v2"
	"strings"
	"testing"
	"time"

	"goldilocks/crypto/cowmap"
)

func never() bool { return false }

// scatteredVolume is a volume on a counting store whose chunks were all
// written twice (home B), then ~30 % of them once more at random (home
// A), every step flushed: what random writes leave. It returns the
// contents.
func scatteredVolume(t *testing.T, chunks int, opt Options, log *slog.Logger) (*Volume, *countDev, []byte, func() *Volume) {
	t.Helper()
	ctx := context.Background()
	size := uint64(chunks * ChunkSize)
	kek := NewLocalKEK(t.TempDir(), nil)
	d := &countDev{size: int64(LayoutFor(size).End), fast: true}
	id := [16]byte{0xa1}
	if err := Format(ctx, d, id, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	opt.NoLogData = true
	if log == nil {
		log = quietLog()
	}
	v, err := Open(ctx, d, "al", id, kek, log, opt)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { v.Close() })
	want := make([]byte, size)
	rng := rand.New(rand.NewPCG(7, 7))
	for pass := 0; pass < 2; pass++ {
		for i := range want {
			want[i] = byte(rng.Uint32())
		}
		if _, err := v.WriteAt(want, 0); err != nil {
			t.Fatal(err)
		}
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
	}
	for i := 0; i < chunks*3/10; i++ {
		c := rng.IntN(chunks)
		p := want[c*ChunkSize : (c+1)*ChunkSize]
		for j := range p {
			p[j] = byte(rng.Uint32())
		}
		if _, err := v.WriteAt(p, int64(c*ChunkSize)); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	reopen := func() *Volume {
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
		v, err = Open(ctx, d, "al", id, kek, log, opt)
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
	return v, d, want, reopen
}

// readCalls reads the whole volume in 1 MiB requests, checks it against
// want and returns how many store reads that took.
func readCalls(t *testing.T, v *Volume, d *countDev, want []byte) int {
	t.Helper()
	d.mu.Lock()
	before := d.reads
	d.mu.Unlock()
	got := make([]byte, 1<<20)
	for off := 0; off < len(want); off += len(got) {
		p := got[:min(len(got), len(want)-off)]
		if _, err := v.ReadAt(p, int64(off)); err != nil {
			t.Fatalf("read at %d: %v", off, err)
		}
		if !bytes.Equal(p, want[off:off+len(p)]) {
			t.Fatalf("read at %d: contents differ", off)
		}
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.reads - before
}

// TestAlignHomes: large reads over chunks that random writes scattered
// between their homes mark them; an alignment pass moves each leaf's
// minority, and afterwards a 1 MiB request is a handful of store
// requests again, for reads and for writes, with the contents unchanged,
// after a reattach too.
func TestAlignHomes(t *testing.T) {
	const chunks = 1024 // 4 MiB, 17 leaves
	v, d, want, reopen := scatteredVolume(t, chunks, Options{}, nil)
	before := readCalls(t, v, d, want)
	if before < 200 {
		t.Fatalf("reading the scattered volume took %d store reads: the setup did not scatter it", before)
	}
	moved, err := v.align(never)
	if err != nil {
		t.Fatal(err)
	}
	if moved == 0 || moved > chunks/2 {
		t.Fatalf("alignment moved %d chunks of %d", moved, chunks)
	}
	after := readCalls(t, v, d, want)
	// A 1 MiB request spans at most 6 leaves, each now in one home.
	if after > 4*6 {
		t.Fatalf("after aligning %d chunks, reading 4 MiB still took %d store reads (before: %d)", moved, after, before)
	}
	if left := v.markedLeaves(); len(left) != 0 {
		t.Fatalf("reads over aligned chunks marked leaves %v", left)
	}
	if again, err := v.align(never); err != nil || again != 0 {
		t.Fatalf("a second pass moved %d chunks (%v), want 0", again, err)
	}
	// The next sequential write goes to one home per leaf as well.
	d.mu.Lock()
	w0 := d.writes
	d.mu.Unlock()
	for i := range want {
		want[i] ^= 0x5a
	}
	if _, err := v.WriteAt(want, 0); err != nil {
		t.Fatal(err)
	}
	d.mu.Lock()
	writes := d.writes - w0
	d.mu.Unlock()
	if writes > 4*6 {
		t.Fatalf("after alignment a 4 MiB write took %d store writes", writes)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	if got := readCalls(t, v, d, want); got > 4*6 {
		t.Fatalf("after alignment and a rewrite, reading 4 MiB took %d store reads", got)
	}
	v = reopen()
	if got := readCalls(t, v, d, want); got > 4*6 {
		t.Fatalf("after a reattach, reading 4 MiB took %d store reads", got)
	}
}

// TestAlignHomesOff: with NoAlign nothing is marked and nothing moves.
func TestAlignHomesOff(t *testing.T) {
	v, d, want, _ := scatteredVolume(t, 256, Options{NoAlign: true}, nil)
	readCalls(t, v, d, want)
	if moved, err := v.align(never); err != nil || moved != 0 {
		t.Fatalf("NoAlign: alignment moved %d chunks (%v)", moved, err)
	}
}

// TestAlignHomesLeavesWhatItMustNot: a chunk written since the last
// commit (its durable copy sits in the other home) is not moved, a chunk
// whose ciphertext does not open stays where it is and is reported, and
// a pass stops when the client is busy, leaving the rest marked.
func TestAlignHomesLeavesWhatItMustNot(t *testing.T) {
	const chunks = 256
	var logs atkLogBuf
	v, d, want, _ := scatteredVolume(t, chunks, Options{}, slog.New(slog.NewTextHandler(&logs, nil)))
	readCalls(t, v, d, want) // marks every leaf
	// Leaf 0: find two chunks in its minority home.
	es := make([]cowmap.Entry, cowmap.LeafFanout)
	if err := v.m.LookupRange(0, es); err != nil {
		t.Fatal(err)
	}
	var on [2]int
	for i := range es {
		on[es[i].Loc()-cowmap.HomeA]++
	}
	minority := uint64(cowmap.HomeB)
	if on[1] > on[0] {
		minority = cowmap.HomeA
	}
	dirty, damaged := -1, -1
	for i := range es {
		switch {
		case es[i].Loc() == minority && damaged < 0:
			damaged = i
		case es[i].Loc() != minority && dirty < 0:
			dirty = i
		}
	}
	if dirty < 0 || damaged < 0 {
		t.Fatalf("leaf 0: %d chunks in home A, %d in B", on[0], on[1])
	}
	// dirty: in the majority home, rewritten and not flushed, so that the
	// new data sits in the minority home and its durable copy in the
	// majority's, where a move would put it.
	p := bytes.Repeat([]byte{0xd1}, ChunkSize)
	if _, err := v.WriteAt(p, int64(dirty*ChunkSize)); err != nil {
		t.Fatal(err)
	}
	// damaged: one byte of its ciphertext flipped on the store.
	blk := int64(v.geo.DataBlock(uint64(damaged), minority))
	d.mu.Lock()
	d.blocks[blk][100] ^= 1
	d.mu.Unlock()
	// A busy client stops the pass before the first leaf.
	if moved, err := v.align(func() bool { return true }); err != nil || moved != 0 {
		t.Fatalf("busy: moved %d (%v)", moved, err)
	}
	if left := v.markedLeaves(); len(left) != (chunks+cowmap.LeafFanout-1)/cowmap.LeafFanout {
		t.Fatalf("a pass stopped at once left %d leaves marked", len(left))
	} else {
		v.remark(left)
	}
	moved, err := v.align(never)
	if err != nil {
		t.Fatal(err)
	}
	if moved == 0 {
		t.Fatal("nothing moved")
	}
	for _, c := range []int{dirty, damaged} {
		e, err := v.m.Lookup(uint64(c))
		if err != nil {
			t.Fatal(err)
		}
		if e.Loc() != minority {
			t.Fatalf("chunk %d moved to home %d (want it left in %d)", c, e.Loc(), minority)
		}
	}
	if !strings.Contains(logs.String(), "found while aligning homes") {
		t.Fatalf("the damaged chunk was not reported:\n%s", logs.String())
	}
	got := make([]byte, ChunkSize)
	if _, err := v.ReadAt(got, int64(damaged*ChunkSize)); !errors.Is(err, ErrChunkAuth) {
		t.Fatalf("reading the damaged chunk: %v, want ErrChunkAuth", err)
	}
	if _, err := v.ReadAt(got, int64(dirty*ChunkSize)); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("the chunk written before the pass reads %v", err)
	}
}

// BenchmarkAlignedWrite1M: sequential 1 MiB writes over a file-backed
// volume whose chunks random writes scattered between their homes
// (~26 % of them rewritten once), flushed every 256 MiB, before and after
// an alignment pass.
func BenchmarkAlignedWrite1M(b *testing.B) {
	for _, aligned := range []bool{false, true} {
		name := "scattered"
		if aligned {
			name = "aligned"
		}
		b.Run(name, func(b *testing.B) {
			v := fileVolume(b, 256<<20)
			p := make([]byte, 1<<20)
			for pass := 0; pass < 2; pass++ { // every chunk in home A, then B
				for i := 0; i < 256; i++ {
					if _, err := v.WriteAt(p, int64(i)<<20); err != nil {
						b.Fatal(err)
					}
				}
				if err := v.Flush(); err != nil {
					b.Fatal(err)
				}
			}
			rng := rand.New(rand.NewPCG(1, 2))
			for i := 0; i < 20000; i++ {
				if _, err := v.WriteAt(p[:ChunkSize], int64(rng.IntN(65536))*ChunkSize); err != nil {
					b.Fatal(err)
				}
			}
			if err := v.Flush(); err != nil {
				b.Fatal(err)
			}
			if aligned {
				for off := int64(0); off < 256<<20; off += 1 << 20 { // large reads mark the leaves
					if _, err := v.ReadAt(p, off); err != nil {
						b.Fatal(err)
					}
				}
				for {
					moved, err := v.align(never)
					if err != nil {
						b.Fatal(err)
					}
					if moved == 0 {
						break
					}
				}
			}
			b.SetBytes(1 << 20)
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if _, err := v.WriteAt(p, int64(i%256)<<20); err != nil {
					b.Fatal(err)
				}
				if i%256 == 255 {
					if err := v.Flush(); err != nil {
						b.Fatal(err)
					}
				}
			}
		})
	}
}

// TestAlignHomesWhenIdle: the background loop aligns marked leaves once
// no request has come for alignIdle, and not while requests keep coming.
func TestAlignHomesWhenIdle(t *testing.T) {
	const chunks = 256
	v, d, want, _ := scatteredVolume(t, chunks, Options{}, nil)
	readCalls(t, v, d, want) // marks every leaf
	got := make([]byte, ChunkSize)
	// A request every 200 ms, for longer than the first idle chance
	// would have come had nothing come.
	busyUntil := time.Now().Add(alignIdle + 3*time.Second)
	for time.Now().Before(busyUntil) {
		if _, err := v.ReadAt(got, 0); err != nil {
			t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	v.marks.mu.Lock()
	marked := len(v.marks.leaves)
	v.marks.mu.Unlock()
	if marked == 0 {
		t.Fatal("leaves were aligned while requests kept coming")
	}
	deadline := time.Now().Add(alignIdle + 6*time.Second)
	for {
		v.marks.mu.Lock()
		marked = len(v.marks.leaves)
		v.marks.mu.Unlock()
		if marked == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d leaves still marked %v after the volume went idle", marked, alignIdle+6*time.Second)
		}
		time.Sleep(100 * time.Millisecond)
	}
	// The pass took the marks holding keyMu: once that is free, it has
	// moved and committed.
	v.keyMu.Lock()
	//lint:ignore SA2001 the lock is taken only to wait for the pass that holds it
	v.keyMu.Unlock()
	if n := readCalls(t, v, d, want); n > 6 {
		t.Fatalf("after the idle pass, reading 1 MiB took %d store reads", n)
	}
}
