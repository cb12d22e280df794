package crypto

import (
	"fmt"
	"slices"
	"sync"
	"time"

	"goldilocks/crypto/cowmap"
)

// Home alignment (FORMAT.md, "Home alignment"). Each chunk has two homes
// and every write after a commit goes to the one its durable entry does
// not name, so random writes leave neighbouring chunks alternating
// between home A and home B, and they stay so: a later sequential write
// flips every chunk and keeps the pattern. A 1 MiB request over such
// chunks is then dozens of store requests instead of one or two
// (BenchmarkAlignedWrite1M: about half the throughput). A large request
// that finds its chunks scattered marks their leaves; once the volume has
// been idle for a while the marked leaves are aligned: in each, every
// clean chunk in the home that fewer of its mapped chunks use is copied,
// its ciphertext unchanged and verified first, to its other home (where
// its next write would go anyway) and recorded like a write; one commit
// ends the pass. Nothing is written to a durable home, and no chunk is
// sealed again, so crash safety and nonces are those of ordinary writes.
const (
	alignMinChunks = 16              // a request of at least this many chunks...
	alignRunLen    = 8               // ...whose store requests average fewer chunks marks its leaves
	alignMaxMarked = 1 << 16         // leaves remembered between passes (4 M chunks); more are dropped
	alignIdle      = 2 * time.Second // without a request: a guest file system that commits every 5 s leaves such gaps
	alignPass      = maxDirty / 2    // chunks moved in one pass, then a commit
)

// alignMarks are the leaves (indices, LeafFanout chunks each) that a
// large request found scattered.
type alignMarks struct {
	mu     sync.Mutex
	leaves map[uint64]struct{}
}

// touch records client activity for the idle test of the background
// loop: a load on the hot path, a store at most once a tick.
func (v *Volume) touch() {
	if !v.touched.Load() {
		v.touched.Store(true)
	}
}

// markScattered marks the leaves of chunks first..first+n-1 if a request
// over them took runs store requests, too many for its size.
func (v *Volume) markScattered(first uint64, n, runs int) {
	if v.opt.NoAlign || n < alignMinChunks || runs*alignRunLen <= n {
		return
	}
	v.marks.mu.Lock()
	defer v.marks.mu.Unlock()
	if v.marks.leaves == nil {
		v.marks.leaves = make(map[uint64]struct{})
	}
	for li := first / cowmap.LeafFanout; li <= (first+uint64(n)-1)/cowmap.LeafFanout; li++ {
		if len(v.marks.leaves) >= alignMaxMarked {
			return
		}
		v.marks.leaves[li] = struct{}{}
	}
}

// markedLeaves takes the marked leaves, in order.
func (v *Volume) markedLeaves() []uint64 {
	v.marks.mu.Lock()
	defer v.marks.mu.Unlock()
	if len(v.marks.leaves) == 0 {
		return nil
	}
	out := make([]uint64, 0, len(v.marks.leaves))
	for li := range v.marks.leaves {
		out = append(out, li)
	}
	clear(v.marks.leaves)
	slices.Sort(out)
	return out
}

// remark puts back leaves a pass did not get to.
func (v *Volume) remark(leaves []uint64) {
	v.marks.mu.Lock()
	defer v.marks.mu.Unlock()
	for _, li := range leaves {
		if len(v.marks.leaves) >= alignMaxMarked {
			return
		}
		v.marks.leaves[li] = struct{}{}
	}
}

// align aligns the marked leaves, moving at most alignPass chunks, and
// commits the moves. busy reports client activity: the pass then stops,
// and the leaves it did not get to stay marked. It returns the chunks
// moved.
func (v *Volume) align(busy func() bool) (int, error) {
	if !v.keyMu.TryLock() { // a rotation or rekey: another time
		return 0, nil
	}
	defer v.keyMu.Unlock()
	leaves := v.markedLeaves()
	if len(leaves) == 0 {
		return 0, nil
	}
	ab := new(alignBuf)
	moved := 0
	for i, li := range leaves {
		if moved >= alignPass || busy() {
			v.remark(leaves[i:])
			break
		}
		n, err := v.alignLeaf(li, ab)
		moved += n
		if err != nil {
			v.remark(leaves[i+1:])
			return moved, err
		}
	}
	if moved == 0 {
		return 0, nil
	}
	if err := v.Flush(); err != nil {
		return moved, err
	}
	return moved, nil
}

type alignBuf struct {
	homes [cowmap.LeafFanout]uint64
	es    [cowmap.LeafFanout]cowmap.Entry
	locks [cowmap.LeafFanout]int
	move  [cowmap.LeafFanout]int // indices in the leaf of the chunks to move
	runs  [cowmap.LeafFanout]ioRun
	ct    [cowmap.LeafFanout * ChunkSize]byte
}

// alignLeaf moves leaf li's clean chunks in its minority home to their
// other home, and returns how many it moved.
func (v *Volume) alignLeaf(li uint64, ab *alignBuf) (int, error) {
	first := li * cowmap.LeafFanout
	if first >= v.geo.Chunks {
		return 0, nil
	}
	n := int(min(cowmap.LeafFanout, v.geo.Chunks-first))
	if n < alignMinChunks {
		// A volume's short last leaf: not worth it, and Homes may give
		// a write of a few chunks places in the log.
		return 0, nil
	}
	// The chunk locks keep writes out for the whole move; the gate (which
	// a commit waits for) is held only around the choice of homes and
	// around the write and its Set, as for a client write, not across
	// the read.
	v.lockRange(first, ab.locks[:n])
	defer v.unlockRange(ab.locks[:n])
	homes, es := ab.homes[:n], ab.es[:n]
	v.gate.RLock()
	err := v.m.Homes(first, homes)
	if err == nil {
		if err = v.m.LookupRange(first, es); err != nil {
			v.integrityFailure("map", err)
		}
	}
	v.gate.RUnlock()
	if err != nil {
		return 0, fmt.Errorf("volume %s chunk %d: %w", v.name, first, err)
	}
	var on [2]int // mapped chunks in home A, in home B
	for i := range es {
		if l := es[i].Loc(); l == cowmap.HomeA || l == cowmap.HomeB {
			on[l-cowmap.HomeA]++
		}
	}
	to, from := uint64(cowmap.HomeA), uint64(cowmap.HomeB)
	if on[1] > on[0] {
		to, from = from, to
	}
	// A chunk in the minority home whose next write would go to the
	// majority's: committed there, not written since (a chunk written
	// since the last commit is rewritten in place, its durable copy in
	// the other home).
	move := ab.move[:0]
	for i := range es {
		if es[i].Loc() == from && homes[i] == to {
			move = append(move, i)
		}
	}
	if len(move) == 0 {
		return 0, nil
	}
	if err := v.doRuns(v.alignRuns(first, move, from, ab), false); err != nil {
		return 0, err
	}
	// Only what opens is copied: damage stays where it is, to be reported
	// by the read that meets it, and never becomes part of a commit.
	b := v.bufs.Get().(*chunkBuf)
	ok := move[:0]
	for _, i := range move {
		c := first + uint64(i)
		s := v.keys.sealer(es[i].KeySlot(), es[i].Epoch())
		copy(b.pkg[HeaderSize:HeaderSize+ChunkSize], ab.ct[i*ChunkSize:])
		if s == nil || openBuffered(s, c, &es[i], b.pt[:], b) != nil {
			v.integrityFailure("data", fmt.Errorf("volume %s chunk %d: %w (found while aligning homes; left in place)", v.name, c, ErrChunkAuth))
			continue
		}
		ok = append(ok, i)
	}
	clear(b.pt[:])
	v.bufs.Put(b)
	if len(ok) == 0 {
		return 0, nil
	}
	v.gate.RLock()
	defer v.gate.RUnlock()
	// A commit may have run meanwhile; with the chunks locked it cannot
	// have changed where their next writes go, but that is what the
	// write must follow, so it is asked again.
	if err := v.m.Homes(first, homes); err != nil {
		return 0, fmt.Errorf("volume %s chunk %d: %w", v.name, first, err)
	}
	still := ok[:0]
	for _, i := range ok {
		if homes[i] == to {
			still = append(still, i)
		}
	}
	if ok = still; len(ok) == 0 {
		return 0, nil
	}
	if err := v.doRuns(v.alignRuns(first, ok, to, ab), true); err != nil {
		return 0, err
	}
	for _, i := range ok {
		e := es[i]
		e.SetLoc(to)
		if v.m.Set(first+uint64(i), e) > maxDirty {
			v.flushInBackground()
		}
	}
	return len(ok), nil
}

// alignRuns is one store request per run of neighbouring chunks of idx
// (ascending indices in the leaf at first) in home loc, over ab.ct.
func (v *Volume) alignRuns(first uint64, idx []int, loc uint64, ab *alignBuf) []ioRun {
	runs := ab.runs[:0]
	for a := 0; a < len(idx); {
		b := a + 1
		for b < len(idx) && idx[b] == idx[b-1]+1 {
			b++
		}
		i, j := idx[a], idx[b-1]+1
		runs = append(runs, ioRun{ab.ct[i*ChunkSize : j*ChunkSize], int64(v.geo.DataBlock(first+uint64(i), loc) * ChunkSize), first + uint64(i)})
		a = b
	}
	return runs
}
