package crypto

// Snapshots of a volume: copy before write into a store per snapshot
// (SNAPSHOTS.md). The stores are Volumes the caller opens; once handed to
// a volume it owns them (its Close and Handoff close them after itself).

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync/atomic"
	"time"

	"goldilocks/internal/block"
)

// Errors callers branch on.
var (
	ErrNoSnapshot     = errors.New("no such snapshot")
	ErrSnapshotExists = errors.New("a snapshot of that name exists")
	ErrSnapshotBusy   = errors.New("the snapshot is being read (attached as an export)")
	ErrRekeying       = errors.New("a rekey or key rotation is running on the volume")
)

// Snapshot is a snapshot's name and its store, as the caller opened it.
type Snapshot struct {
	Name  string
	Store *Volume
}

// SnapshotInfo describes one snapshot of an open volume.
type SnapshotInfo struct {
	Name   string
	Chunks uint64 // chunks its store holds: written since, before the next snapshot
}

// snapshot is a snapshot as the volume keeps it.
type snapshot struct {
	name  string
	store *Volume
	bits  []atomic.Uint64 // chunks the store maps (SNAPSHOTS.md: "written since")
	dirty atomic.Bool     // a copy since its store's last commit
	// pending: created, its record not yet durable; copies go into the
	// next older snapshot's store too, so that it stays right if the
	// record never is (a failed create, a crash).
	pending atomic.Bool
	views   int // open Views; guarded by Volume.snapMu
}

func (s *snapshot) has(c uint64) bool { return s.bits[c/64].Load()&(1<<(c%64)) != 0 }
func (s *snapshot) set(c uint64)      { s.bits[c/64].Or(1 << (c % 64)) }

func (s *snapshot) count() uint64 {
	var n int
	for i := range s.bits {
		n += bits.OnesCount64(s.bits[i].Load())
	}
	return uint64(n)
}

// snapSet is the volume's snapshots, oldest first; replaced whole, never
// changed, so a write reads it with one atomic load.
type snapSet struct{ list []*snapshot }

func (ss *snapSet) newest() *snapshot {
	if ss == nil || len(ss.list) == 0 {
		return nil
	}
	return ss.list[len(ss.list)-1]
}

func (ss *snapSet) find(name string) int {
	if ss == nil {
		return -1
	}
	return slices.IndexFunc(ss.list, func(s *snapshot) bool { return s.name == name })
}

// find is snapshot name's index in set, or ErrNoSnapshot.
func (v *Volume) find(set *snapSet, name string) (int, error) {
	i := set.find(name)
	if i < 0 {
		return i, fmt.Errorf("volume %s snapshot %s: %w", v.name, name, ErrNoSnapshot)
	}
	return i, nil
}

// newSnapshot checks a store against v and reads which chunks it maps.
func (v *Volume) newSnapshot(name string, store *Volume) (*snapshot, error) {
	if store == nil || store.size != v.size {
		return nil, fmt.Errorf("volume %s snapshot %s: the store is not of the volume's size", v.name, name)
	}
	s := &snapshot{name: name, store: store, bits: make([]atomic.Uint64, (v.geo.Chunks+63)/64)}
	for c := uint64(0); c < v.geo.Chunks; {
		rs, err := store.m.Runs(nil, c, v.geo.Chunks, 4096)
		if err != nil {
			return nil, fmt.Errorf("volume %s snapshot %s: %w", v.name, name, err)
		}
		for _, r := range rs {
			if r.Mapped {
				for i := c; i < c+r.Chunks; i++ {
					s.set(i)
				}
			}
			c += r.Chunks
		}
	}
	return s, nil
}

// LoadSnapshots hands the volume its snapshots at attach, oldest first,
// before any write. On error the stores are not the volume's: the caller
// closes them.
func (v *Volume) LoadSnapshots(snaps []Snapshot) error {
	v.snapMu.Lock()
	defer v.snapMu.Unlock()
	if v.snaps.Load() != nil {
		return fmt.Errorf("volume %s: snapshots loaded twice", v.name)
	}
	set := &snapSet{}
	for _, sn := range snaps {
		s, err := v.newSnapshot(sn.Name, sn.Store)
		if err != nil {
			return err
		}
		set.list = append(set.list, s)
	}
	v.snaps.Store(set)
	return nil
}

// CreateSnapshot makes store (empty, of the volume's size) the newest
// snapshot, named name, at a flush point: writes stop for one commit of
// everything written so far, the snapshot is installed (pending) and
// writes go on; then the anchor is advanced and commit makes the
// snapshot's record durable (the registry), given the commit sequence.
// If either fails the snapshot is undone (its copies also went into the
// next older snapshot) and the store is the caller's again. It returns
// how long writes waited.
func (v *Volume) CreateSnapshot(name string, store *Volume, commit func(seq uint64) error) (time.Duration, error) {
	if !v.keyMu.TryLock() {
		return 0, fmt.Errorf("volume %s: %w", v.name, ErrRekeying)
	}
	defer v.keyMu.Unlock()
	if h := v.Header(); h.Rekeying() {
		return 0, fmt.Errorf("volume %s: %w", v.name, ErrRekeying)
	}
	v.snapMu.Lock()
	defer v.snapMu.Unlock()
	old := v.snaps.Load()
	if old.find(name) >= 0 {
		return 0, fmt.Errorf("volume %s snapshot %s: %w", v.name, name, ErrSnapshotExists)
	}
	if store.m.Dirty() > 0 || store.m.Seq() > 0 {
		return 0, fmt.Errorf("volume %s snapshot %s: the new store is not empty", v.name, name)
	}
	s, err := v.newSnapshot(name, store)
	if err != nil {
		return 0, err
	}
	if s.count() != 0 {
		return 0, fmt.Errorf("volume %s snapshot %s: the new store is not empty", v.name, name)
	}
	// Empty the logs (the volume's, and the store its commit flushes
	// first), so that the commit with writes stopped neither waits for a
	// checkpoint nor makes one: one measured such wait took 2.6 s.
	if err := v.m.Checkpoint(); err != nil {
		return 0, fmt.Errorf("volume %s: %w", v.name, err)
	}
	if n := old.newest(); n != nil {
		if err := n.store.Flush(); err != nil {
			return 0, fmt.Errorf("volume %s snapshot %s: %w", v.name, n.name, err)
		}
		if err := n.store.m.Checkpoint(); err != nil {
			return 0, fmt.Errorf("volume %s snapshot %s: %w", v.name, n.name, err)
		}
	}
	// Then commit what is dirty while writes go on, until little is, so that
	// the commit with writes stopped (the flush point) is a small one; a
	// load that never flushes and dirties as fast as commits go gets
	// preFlushFor of this, then waits for the rest.
	for begun := time.Now(); v.m.Dirty() > preFlushDirty && time.Since(begun) < preFlushFor; {
		if err := v.Flush(); err != nil {
			return 0, err
		}
	}
	// The flush point: writes stop for one commit, and the snapshot
	// serves from the next write on.
	v.wgate.Lock()
	start := time.Now()
	if err := v.Flush(); err != nil {
		v.wgate.Unlock()
		return 0, err
	}
	seq := v.m.Seq()
	set := &snapSet{}
	if old != nil {
		set.list = slices.Clone(old.list)
	}
	set.list = append(set.list, s)
	s.pending.Store(true)
	v.viewMu.Lock() // no view reads with a set older than the first copy
	v.snaps.Store(set)
	v.viewMu.Unlock()
	pause := time.Since(start)
	v.wgate.Unlock()
	// Then, writes going on, the anchor and the record. Until the record
	// is durable the snapshot is not promised: a crash before it leaves
	// a store nobody names (its copies never mattered to the volume).
	err = nil
	if v.opt.Anchor != nil {
		if err = v.opt.Anchor.Advance(v.uuid, AnchorState{Seq: seq}); err != nil {
			err = fmt.Errorf("volume %s: snapshot %s: %w", v.name, name, err)
		}
	}
	if err == nil {
		err = commit(seq)
	}
	if err != nil {
		// Undone, writes stopped: the snapshot leaves the set (the older
		// one got every copy meanwhile too), and the copies are committed
		// (so that no later commit of the volume needs its store).
		v.wgate.Lock()
		defer v.wgate.Unlock()
		v.viewMu.Lock()
		v.snaps.Store(old)
		v.viewMu.Unlock()
		if n := old.newest(); n != nil {
			n.dirty.Store(true)
		}
		if ferr := v.Flush(); ferr != nil {
			return 0, errors.Join(err, ferr)
		}
		return 0, err
	}
	s.pending.Store(false)
	return pause, nil
}

// A create commits ahead, writes going on, while more than preFlushDirty
// entries are dirty, for at most preFlushFor.
const (
	preFlushDirty = 256
	preFlushFor   = 3 * time.Second
)

// DeleteSnapshot removes snapshot name: what only it holds of the next
// older snapshot's view is copied into that one's store (SNAPSHOTS.md,
// "Delete"), then commit removes its record and the store, closed, is
// returned for the caller to remove. A snapshot with open Views is not
// deleted (ErrSnapshotBusy).
func (v *Volume) DeleteSnapshot(name string, commit func() error) (*Volume, error) {
	v.snapMu.Lock()
	defer v.snapMu.Unlock()
	set := v.snaps.Load()
	i, err := v.find(set, name)
	if err != nil {
		return nil, err
	}
	s := set.list[i]
	if s.views > 0 {
		return nil, fmt.Errorf("volume %s snapshot %s: %w", v.name, name, ErrSnapshotBusy)
	}
	newest := i == len(set.list)-1
	if i > 0 {
		o := set.list[i-1]
		if err := v.merge(s, o); err != nil {
			return nil, err
		}
		if newest { // writes preserved into s meanwhile: once more, stopped
			v.wgate.Lock()
			defer v.wgate.Unlock()
			if err := v.merge(s, o); err != nil {
				return nil, err
			}
		}
		if err := o.store.Flush(); err != nil {
			return nil, fmt.Errorf("volume %s snapshot %s: %w", v.name, o.name, err)
		}
	} else if newest {
		v.wgate.Lock()
		defer v.wgate.Unlock()
	}
	if newest {
		// Writes that preserved into s are in commits of v only after
		// s's store is durable: commit v now, while s is still here to
		// be flushed by its hook.
		if err := v.Flush(); err != nil {
			return nil, err
		}
	}
	if err := commit(); err != nil {
		return nil, err
	}
	next := &snapSet{list: slices.Delete(slices.Clone(set.list), i, i+1)}
	v.viewMu.Lock()
	v.snaps.Store(next)
	v.viewMu.Unlock()
	if err := s.store.Close(); err != nil { // deleted all the same: its record is gone
		v.log.Warn("closing a deleted snapshot's store", "volume", v.name, "snapshot", name, "err", err)
	}
	return s.store, nil
}

// merge copies into o every chunk that s holds and o does not. Callers
// hold snapMu.
func (v *Volume) merge(s, o *snapshot) error {
	buf := v.pools.copies.Get().(*[batchChunks * ChunkSize]byte)
	defer v.pools.copies.Put(buf)
	for c := uint64(0); c < v.geo.Chunks; c++ {
		if !s.has(c) || o.has(c) {
			continue
		}
		j := c + 1
		for j < v.geo.Chunks && j-c < batchChunks && s.has(j) && !o.has(j) {
			j++
		}
		p := buf[:(j-c)*ChunkSize]
		if _, err := s.store.ReadAt(p, int64(c*ChunkSize)); err != nil {
			return fmt.Errorf("volume %s snapshot %s: %w", v.name, s.name, err)
		}
		if _, err := o.store.WriteAt(p, int64(c*ChunkSize)); err != nil {
			return fmt.Errorf("volume %s snapshot %s: %w", v.name, o.name, err)
		}
		for k := c; k < j; k++ {
			o.set(k)
		}
		c = j - 1
	}
	return nil
}

// preserve copies chunks first..first+n-1 that the newest snapshot does
// not hold yet into its store, before a write changes them. Callers hold
// the chunks' write locks and v.wgate shared.
func (v *Volume) preserve(first uint64, n int) error {
	set := v.snaps.Load()
	s := set.newest()
	if s == nil {
		return nil
	}
	if s.pending.Load() && len(set.list) > 1 {
		if err := v.preserveInto(set.list[len(set.list)-2], first, n); err != nil {
			return err
		}
	}
	return v.preserveInto(s, first, n)
}

// preserveInto is preserve into snapshot s.
func (v *Volume) preserveInto(s *snapshot, first uint64, n int) error {
	var (
		buf *[batchChunks * ChunkSize]byte
		b   *chunkBuf
		rb  *readBuf
	)
	for i := 0; i < n; i++ {
		if s.has(first + uint64(i)) {
			continue
		}
		j := i + 1
		for j < n && j-i < batchChunks && !s.has(first+uint64(j)) {
			j++
		}
		if buf == nil {
			buf = v.pools.copies.Get().(*[batchChunks * ChunkSize]byte)
			defer v.pools.copies.Put(buf)
			b = v.bufs.Get().(*chunkBuf)
			defer v.bufs.Put(b)
			rb = v.pools.reads.Get().(*readBuf)
			defer v.pools.reads.Put(rb)
		}
		c0 := first + uint64(i)
		if err := v.readLocked(c0, buf[:(j-i)*ChunkSize], b, false, rb); err != nil {
			return err
		}
		if _, err := s.store.WriteAt(buf[:(j-i)*ChunkSize], int64(c0*ChunkSize)); err != nil {
			return fmt.Errorf("volume %s snapshot %s: %w", v.name, s.name, err)
		}
		for k := c0; k < c0+uint64(j-i); k++ {
			s.set(k)
		}
		s.dirty.Store(true) // after the copy is in the store's map, before v's
		i = j - 1
	}
	return nil
}

// beforeCommit is the map's hook (cowmap.Config.BeforeCommit): the
// stores that copies went into are committed before the commit of the
// writes that made them (SNAPSHOTS.md, "Durability order").
func (v *Volume) beforeCommit() error {
	set := v.snaps.Load()
	if set == nil {
		return nil
	}
	for _, s := range set.list {
		if !s.dirty.Swap(false) {
			continue
		}
		if err := s.store.Flush(); err != nil {
			s.dirty.Store(true)
			return fmt.Errorf("volume %s snapshot %s: %w", v.name, s.name, err)
		}
	}
	return nil
}

// closeSnapshots closes (or hands off) the stores after the volume's own
// last commit.
func (v *Volume) closeSnapshots(handoff bool) error {
	set := v.snaps.Load()
	if set == nil {
		return nil
	}
	var first error
	for _, s := range set.list {
		var err error
		if handoff {
			err = s.store.Handoff()
		} else {
			err = s.store.Close()
		}
		if err != nil && first == nil {
			first = fmt.Errorf("volume %s snapshot %s: %w", v.name, s.name, err)
		}
	}
	return first
}

// SnapshotStore returns snapshot name's store (still the volume's: for
// key rotation, which rewraps its data key).
func (v *Volume) SnapshotStore(name string) (*Volume, error) {
	set := v.snaps.Load()
	i, err := v.find(set, name)
	if err != nil {
		return nil, err
	}
	return set.list[i].store, nil
}

// Snapshots lists the volume's snapshots, oldest first.
func (v *Volume) Snapshots() []SnapshotInfo {
	set := v.snaps.Load()
	if set == nil {
		return nil
	}
	out := make([]SnapshotInfo, len(set.list))
	for i, s := range set.list {
		out[i] = SnapshotInfo{Name: s.name, Chunks: s.count()}
	}
	return out
}

// ChangedExtents describes [off, off+length) by whether each chunk was
// written since snapshot name was taken: block.ExtentDirty where it
// was (SNAPSHOTS.md, "Changed since"). At most maxN extents; ranges
// rounded out to chunks.
func (v *Volume) ChangedExtents(name string, dst []block.Extent, off, length int64, maxN int) ([]block.Extent, error) {
	if !block.CheckRange(v.size, off, length) {
		return dst, block.ErrOutOfRange
	}
	v.viewMu.RLock()
	defer v.viewMu.RUnlock()
	set := v.snaps.Load()
	i, err := v.find(set, name)
	if err != nil {
		return dst, err
	}
	since := set.list[i:]
	end := off + length
	limit := (uint64(end) + ChunkSize - 1) / ChunkSize
	for off < end && maxN > 0 {
		c := uint64(off) / ChunkSize
		st := changedAt(since, c)
		e := nextChange(since, c, limit, st)
		n := min(int64(e*ChunkSize)-off, end-off)
		var fl uint32
		if st {
			fl = block.ExtentDirty
		}
		dst = append(dst, block.Extent{Length: n, Flags: fl})
		off += n
		maxN--
	}
	return dst, nil
}

// ChangedRuns calls fn for each run of chunks written after snapshot from
// was taken and before snapshot to was (to "": until now), in increasing
// order: what an incremental backup from from to to holds.
func (v *Volume) ChangedRuns(from, to string, fn func(first, n uint64) error) error {
	v.viewMu.RLock()
	defer v.viewMu.RUnlock()
	set := v.snaps.Load()
	if set == nil {
		return fmt.Errorf("volume %s snapshot %s: %w", v.name, from, ErrNoSnapshot)
	}
	i, j := set.find(from), len(set.list)
	if to != "" {
		j = set.find(to)
	}
	if i < 0 || j < 0 || j <= i && to != "" {
		return fmt.Errorf("volume %s: snapshots %s and %s: %w (the first must be older)", v.name, from, to, ErrNoSnapshot)
	}
	between := set.list[i:j]
	for c := uint64(0); c < v.geo.Chunks; {
		if !changedAt(between, c) {
			c = nextChange(between, c, v.geo.Chunks, false)
			continue
		}
		e := nextChange(between, c, v.geo.Chunks, true)
		if err := fn(c, e-c); err != nil {
			return err
		}
		c = e
	}
	return nil
}

// changedAt reports whether any of snaps holds chunk c.
func changedAt(snaps []*snapshot, c uint64) bool {
	for _, s := range snaps {
		if s.has(c) {
			return true
		}
	}
	return false
}

// nextChange is the first chunk from c on (below limit; else limit)
// whose changedAt differs from st, found 64 chunks at a time: a
// BLOCK_STATUS over a large clean disk scans words, not chunks.
func nextChange(snaps []*snapshot, c, limit uint64, st bool) uint64 {
	for c < limit {
		w := c / 64
		var x uint64
		for _, s := range snaps {
			x |= s.bits[w].Load()
		}
		if st {
			x = ^x
		}
		x &= ^uint64(0) << (c % 64) // from c on
		if x != 0 {
			return min(w*64+uint64(bits.TrailingZeros64(x)), limit)
		}
		c = (w + 1) * 64
	}
	return limit
}

// View is a snapshot's contents as a read-only device. Close it when done:
// a snapshot with open views is not deleted.
type View struct {
	v    *Volume
	s    *snapshot
	once atomic.Bool
}

// SnapshotView opens snapshot name for reading.
func (v *Volume) SnapshotView(name string) (*View, error) {
	v.snapMu.Lock()
	defer v.snapMu.Unlock()
	set := v.snaps.Load()
	i, err := v.find(set, name)
	if err != nil {
		return nil, err
	}
	set.list[i].views++
	return &View{v: v, s: set.list[i]}, nil
}

var (
	_ block.Device  = (*View)(nil)
	_ block.Capable = (*View)(nil)
)

// Caps: a view declares nothing beyond reads.
func (w *View) Caps() block.Caps { return 0 }

// Size is the volume's size.
func (w *View) Size() int64 { return w.v.size }

// WriteAt refuses: a snapshot is read-only.
func (w *View) WriteAt([]byte, int64) (int, error) { return 0, block.ErrReadOnly }

// Flush has nothing to do.
func (w *View) Flush() error { return nil }

// Close ends the view (the volume stays open).
func (w *View) Close() error {
	if w.once.Swap(true) {
		return nil
	}
	w.v.snapMu.Lock()
	w.s.views--
	w.v.snapMu.Unlock()
	return nil
}

// source is which store holds chunk c of the view: an index into
// set.list, or -1 for the live volume. Callers hold c's lock.
func (w *View) source(set *snapSet, from int, c uint64) int {
	for i := from; i < len(set.list); i++ {
		if set.list[i].has(c) {
			return i
		}
	}
	return -1
}

// ReadAt reads the snapshot's contents (SNAPSHOTS.md, "The view"): each
// chunk from the first store at or after the snapshot that holds it, else
// from the live volume, under the chunk's read lock. Whole chunks go in
// batches: one read of a store or of the volume per run of one source.
func (w *View) ReadAt(p []byte, off int64) (int, error) {
	v := w.v
	if w.once.Load() {
		return 0, block.ErrClosed
	}
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	v.viewMu.RLock()
	defer v.viewMu.RUnlock()
	set := v.snaps.Load()
	from := set.find(w.s.name)
	if from < 0 || set.list[from] != w.s {
		return 0, fmt.Errorf("volume %s snapshot %s: %w", v.name, w.s.name, ErrNoSnapshot)
	}
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		c := uint64(pos) / ChunkSize
		if in := int(pos % ChunkSize); in != 0 || len(p)-done < ChunkSize { // a part of a chunk
			n := min(len(p)-done, ChunkSize-in)
			if err := w.readPart(set, from, c, in, p[done:done+n], b); err != nil {
				return done, err
			}
			done += n
			continue
		}
		n := min((len(p)-done)/ChunkSize, batchChunks)
		if err := w.readBatch(set, from, c, p[done:done+n*ChunkSize], b); err != nil {
			return done, err
		}
		done += n * ChunkSize
	}
	return done, nil
}

// readPart reads bytes in.. of chunk c into p.
func (w *View) readPart(set *snapSet, from int, c uint64, in int, p []byte, b *chunkBuf) error {
	v := w.v
	l := v.lock(c)
	l.RLock()
	defer l.RUnlock()
	if src := w.source(set, from, c); src >= 0 {
		if _, err := set.list[src].store.ReadAt(p, int64(c*ChunkSize)+int64(in)); err != nil {
			return fmt.Errorf("volume %s snapshot %s: %w", v.name, set.list[src].name, err)
		}
		return nil
	}
	if err := v.readChunk(c, b.pt[:], b); err != nil {
		return err
	}
	copy(p, b.pt[in:])
	return nil
}

// readBatch reads whole chunks first.. into p (at most a batch).
func (w *View) readBatch(set *snapSet, from int, first uint64, p []byte, b *chunkBuf) error {
	v := w.v
	n := len(p) / ChunkSize
	rb := v.pools.reads.Get().(*readBuf)
	defer v.pools.reads.Put(rb)
	idx := v.rlockRange(first, rb.locks[:n])
	defer v.runlockRange(idx)
	for i := 0; i < n; {
		src := w.source(set, from, first+uint64(i))
		j := i + 1
		for j < n && w.source(set, from, first+uint64(j)) == src {
			j++
		}
		q := p[i*ChunkSize : j*ChunkSize]
		if src >= 0 {
			if _, err := set.list[src].store.ReadAt(q, int64((first+uint64(i))*ChunkSize)); err != nil {
				return fmt.Errorf("volume %s snapshot %s: %w", v.name, set.list[src].name, err)
			}
		} else if err := v.readLocked(first+uint64(i), q, b, false, rb); err != nil {
			return err
		}
		i = j
	}
	return nil
}
