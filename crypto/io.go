package crypto

// The data path of a Volume: reads, writes, zeroing, extents.

import (
	"errors"
	"fmt"
	"slices"
	"sync"

	"goldilocks/audit"
	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// ReadAt reads plaintext; a chunk that fails authentication fails the read
// with ErrChunkAuth, naming the chunk, and is logged. Runs of whole
// chunks are read with one pread per run of neighbouring homes and opened
// in place.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	v.touch()
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	done := 0
	if in := int(off % ChunkSize); in != 0 || len(p) < ChunkSize { // head
		n := min(len(p), ChunkSize-in)
		if err := v.readPartial(uint64(off)/ChunkSize, in, p[:n], b); err != nil {
			return 0, err
		}
		done = n
	}
	for len(p)-done >= ChunkSize {
		n := min((len(p)-done)/ChunkSize, batchChunks)
		if err := v.readChunks(uint64(off+int64(done))/ChunkSize, p[done:done+n*ChunkSize], b, false); err != nil {
			return done, err
		}
		done += n * ChunkSize
	}
	if done < len(p) {
		if err := v.readPartial(uint64(off+int64(done))/ChunkSize, 0, p[done:], b); err != nil {
			return done, err
		}
		done = len(p)
	}
	return done, nil
}

// TryReadAt is ReadAt from memory alone, for the transport to run on its
// reader: block.ErrWouldBlock, at once, unless p covers whole chunks
// (at most a batch) whose map entries are in the cache, none in the log,
// and whose ciphertext is in the store's cache. A chunk that does not
// open is left to ReadAt, which reports it.
func (v *Volume) TryReadAt(p []byte, off int64) (int, error) {
	v.touch()
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	if v.tryStore == nil || len(p) == 0 || off%ChunkSize != 0 || len(p)%ChunkSize != 0 || len(p) > batchChunks*ChunkSize {
		return 0, block.ErrWouldBlock
	}
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	if err := v.readChunks(uint64(off)/ChunkSize, p, b, true); err != nil {
		return 0, block.ErrWouldBlock
	}
	return len(p), nil
}

func (v *Volume) readPartial(c uint64, in int, p []byte, b *chunkBuf) error {
	l := v.lock(c)
	l.RLock()
	defer l.RUnlock()
	if err := v.readChunk(c, b.pt[:], b); err != nil {
		return err
	}
	copy(p, b.pt[in:])
	return nil
}

// readChunks reads whole chunks first.. into p (at most batchChunks).
// With nowait it reads nothing that is not in memory and reports no
// failure (TryReadAt): any error means "not now".
func (v *Volume) readChunks(first uint64, p []byte, b *chunkBuf, nowait bool) error {
	n := len(p) / ChunkSize
	rb := v.pools.reads.Get().(*readBuf)
	defer v.pools.reads.Put(rb)
	idx := v.rlockRange(first, rb.locks[:n])
	defer v.runlockRange(idx)
	return v.readLocked(first, p, b, nowait, rb)
}

// rlockRange read-locks the locks of chunks first..first+len(idx)-1
// (fewer than the locks) in ascending lock order.
func (v *Volume) rlockRange(first uint64, idx []int) []int {
	for i := range idx {
		idx[i] = int((first + uint64(i)) % uint64(len(v.locks)))
	}
	slices.Sort(idx)
	for _, i := range idx {
		if !v.locks[i].TryRLock() {
			// A writer holds the chunk or waits for it, and it may be
			// waiting on a read this goroutine submitted that the store
			// starts only at Push (block.Submitter): start them first.
			v.Push()
			v.locks[i].RLock()
		}
	}
	return idx
}

func (v *Volume) runlockRange(idx []int) {
	for _, i := range idx {
		v.locks[i].RUnlock()
	}
}

// readLocked is readChunks with the chunks' locks held; it uses rb's
// entries and runs, not its locks.
func (v *Volume) readLocked(first uint64, p []byte, b *chunkBuf, nowait bool, rb *readBuf) error {
	n := len(p) / ChunkSize
	es := rb.es[:n]
	if nowait {
		if err := v.m.TryLookupRange(first, es); err != nil {
			return err
		}
	} else if err := v.m.LookupRange(first, es); err != nil {
		v.integrityFailure("map", err)
		return fmt.Errorf("volume %s chunk %d: %w", v.name, first, err)
	}
	runs := rb.runs[:0]
	inLog := false
	for i := 0; i < n; {
		if !es[i].Mapped() {
			if v.opt.Base != nil { // a clone's: from its base, below
				if nowait {
					return block.ErrWouldBlock
				}
				j := i + 1
				for j < n && !es[j].Mapped() {
					j++
				}
				if err := v.readBase(first+uint64(i), p[i*ChunkSize:j*ChunkSize]); err != nil {
					return err
				}
				i = j
				continue
			}
			clear(p[i*ChunkSize : (i+1)*ChunkSize])
			i++
			continue
		}
		inLog = inLog || cowmap.IsInLog(es[i].Loc())
		var r ioRun
		r, i = v.readRun(first, es, p, i)
		runs = append(runs, r)
	}
	v.markScattered(first, n, len(runs))
	if nowait {
		if inLog { // a checkpoint may move it meanwhile: ReadAt copes
			return block.ErrWouldBlock
		}
		for _, r := range runs {
			if _, err := v.tryStore.TryReadAt(r.p, r.off); err != nil {
				return err
			}
		}
	} else if v.parallel && len(runs) > spanRuns && !inLog {
		// Homes that alternate chunk by chunk (what random writes leave)
		// make dozens of small requests; on a store that counts requests
		// (RBD: an OSD operation each) two reads, of the span of each
		// home, cost less than them, whatever they read in between.
		if err := v.readSpans(first, es, p, rb); err != nil {
			return err
		}
	} else if err := v.doRuns(runs, false); err != nil {
		return err
	}
	for i := 0; i < n; i++ {
		if !es[i].Mapped() {
			continue
		}
		err := v.openAt(first+uint64(i), &es[i], p, i, b)
		switch {
		case err == nil:
		case nowait:
			return err
		case cowmap.IsInLog(es[i].Loc()):
			// A checkpoint may have moved it home and the ring moved on
			// since the lookup: read it again from where it is now.
			if err := v.readChunk(first+uint64(i), p[i*ChunkSize:(i+1)*ChunkSize], b); err != nil {
				return err
			}
		default:
			return v.authFailure(first+uint64(i), err)
		}
	}
	return nil
}

// readRun is the store request for the run of mapped chunks from es[i]
// (es for first.., p their room) whose places on the store neighbour,
// and the index after the run.
func (v *Volume) readRun(first uint64, es []cowmap.Entry, p []byte, i int) (ioRun, int) {
	blk := v.geo.DataBlock(first+uint64(i), es[i].Loc())
	j := i + 1
	for j < len(es) && es[j].Mapped() && v.geo.DataBlock(first+uint64(j), es[j].Loc()) == blk+uint64(j-i) {
		j++
	}
	return ioRun{p[i*ChunkSize : j*ChunkSize], int64(blk * ChunkSize), first + uint64(i)}, j
}

// openAt opens chunk c, whose ciphertext is p's i-th chunk, where it lies.
// The tag goes after it, over the first bytes of the next chunk, kept
// aside meanwhile; the last chunk of p, with nothing after it in p, is
// copied into b.pkg instead. A failure clears the chunk and is reported
// only to the caller.
func (v *Volume) openAt(c uint64, e *cowmap.Entry, p []byte, i int, b *chunkBuf) error {
	dst := p[i*ChunkSize : (i+1)*ChunkSize]
	s := v.keys.sealer(e.KeySlot(), e.Epoch())
	if s == nil {
		clear(dst)
		return fmt.Errorf("sealed under DEK slot %d, which holds no key: %w", e.KeySlot(), ErrChunkAuth)
	}
	if len(p) < (i+1)*ChunkSize+TagSize {
		copy(b.pkg[HeaderSize:], dst)
		return openBuffered(s, c, e, dst, b)
	}
	next := p[(i+1)*ChunkSize:]
	var kept [TagSize]byte
	copy(kept[:], next)
	err := s.OpenInPlace(p[i*ChunkSize:(i+1)*ChunkSize+TagSize], ChunkSize, uint32(c), e.DAREHeader(), e.Tag())
	copy(next, kept[:])
	return err
}

// spanRuns: more runs than this in a batch on a store with network
// latency are read as the two spans of their homes (readSpans).
const spanRuns = 4

// readSpans reads the batch's mapped chunks as two requests, one over
// the span of the chunks in home A and one in home B, at once, and puts
// each chunk's ciphertext in its place in p.
func (v *Volume) readSpans(first uint64, es []cowmap.Entry, p []byte, rb *readBuf) error {
	var spans [2]struct{ lo, hi int }
	for h := range spans {
		spans[h].lo = -1
	}
	for i := range es {
		if !es[i].Mapped() {
			continue
		}
		sp := &spans[es[i].Loc()-cowmap.HomeA]
		if sp.lo < 0 {
			sp.lo = i
		}
		sp.hi = i + 1
	}
	if rb.span == nil {
		rb.span = make([]byte, 2*batchChunks*ChunkSize)
	}
	var runs [2]ioRun
	k := 0
	for h, sp := range spans {
		if sp.lo < 0 {
			continue
		}
		loc := cowmap.HomeA + uint64(h)
		buf := rb.span[h*batchChunks*ChunkSize:]
		runs[k] = ioRun{buf[sp.lo*ChunkSize : sp.hi*ChunkSize], int64(v.geo.DataBlock(first+uint64(sp.lo), loc) * ChunkSize), first + uint64(sp.lo)}
		k++
	}
	if err := v.doRuns(runs[:k], false); err != nil {
		return err
	}
	for i := range es {
		if es[i].Mapped() {
			h := int(es[i].Loc() - cowmap.HomeA)
			copy(p[i*ChunkSize:(i+1)*ChunkSize], rb.span[h*batchChunks*ChunkSize+i*ChunkSize:])
		}
	}
	return nil
}

type readBuf struct {
	es    [batchChunks]cowmap.Entry
	locks [batchChunks]int
	runs  [batchChunks]ioRun
	span  []byte // readSpans: home A's span, then home B's (made at first use)
}

// ioRun is one store request of a batch: a run of neighbouring chunks in
// the same home.
type ioRun struct {
	p     []byte
	off   int64
	chunk uint64
}

// doRuns sends a batch's runs to the store: one after another, or on a
// store with network latency all at once (a 1 MiB request over chunks
// whose homes alternate is dozens of runs: a round trip each).
func (v *Volume) doRuns(runs []ioRun, write bool) error {
	if !v.parallel || len(runs) < 2 {
		for _, r := range runs {
			if err := v.doRun(r, write); err != nil {
				return err
			}
		}
		return nil
	}
	errs := make([]error, len(runs))
	var wg sync.WaitGroup
	for i := range runs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = v.doRun(runs[i], write)
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

func (v *Volume) doRun(r ioRun, write bool) error {
	var err error
	if write {
		_, err = v.store.WriteAt(r.p, r.off)
	} else {
		_, err = v.store.ReadAt(r.p, r.off)
	}
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, r.chunk, err)
	}
	return nil
}

// readChunk opens chunk c into dst (4096 bytes). Callers hold its lock.
func (v *Volume) readChunk(c uint64, dst []byte, b *chunkBuf) error {
	e, err := v.m.Lookup(c)
	if err != nil {
		clear(dst)
		v.integrityFailure("map", err)
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	if !e.Mapped() {
		return v.readBase(c, dst)
	}
	err = v.openEntry(c, &e, dst, b)
	if err != nil && cowmap.IsInLog(e.Loc()) {
		// A checkpoint may have moved it home and the ring moved on since
		// the lookup: once more, from where the map says it is now.
		if e2, lerr := v.m.Lookup(c); lerr == nil && e2 != e {
			e = e2
			if !e.Mapped() {
				return v.readBase(c, dst)
			}
			err = v.openEntry(c, &e, dst, b)
		}
	}
	if errors.Is(err, ErrChunkAuth) {
		return v.authFailure(c, err)
	}
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	return nil
}

// readBase reads whole chunks from c on that the volume has not written:
// zeros, or a clone's base.
func (v *Volume) readBase(c uint64, dst []byte) error {
	if v.opt.Base == nil {
		clear(dst)
		return nil
	}
	if _, err := v.opt.Base.ReadAt(dst, int64(c*ChunkSize)); err != nil {
		return fmt.Errorf("volume %s chunk %d: its base: %w", v.name, c, err)
	}
	return nil
}

// authFailure reports chunk c's failed authentication. After a failed
// flush it is what that flush lost (fdatasync may drop pages the map
// already names), not tampering: the read fails with ErrVolumeFailed,
// and the log says so instead of raising an integrity alarm.
func (v *Volume) authFailure(c uint64, err error) error {
	if v.m.Failed() != nil {
		v.log.Warn("chunk unreadable after a failed flush", "volume", v.name, "chunk", c)
		return fmt.Errorf("volume %s chunk %d: %w (%w)", v.name, c, ErrVolumeFailed, err)
	}
	v.log.Error("integrity failure: chunk failed authentication", "event", audit.EvIntegrityFailure, "volume", v.name,
		"chunk", c, "kind", "chunk")
	return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
}

// openEntry reads and opens the data that e names for chunk c.
func (v *Volume) openEntry(c uint64, e *cowmap.Entry, dst []byte, b *chunkBuf) error {
	if _, err := v.store.ReadAt(b.pkg[HeaderSize:HeaderSize+ChunkSize], int64(v.geo.DataBlock(c, e.Loc())*ChunkSize)); err != nil {
		clear(dst)
		return err
	}
	s := v.keys.sealer(e.KeySlot(), e.Epoch())
	if s == nil {
		clear(dst)
		return fmt.Errorf("sealed under DEK slot %d, which holds no key: %w", e.KeySlot(), ErrChunkAuth)
	}
	return openBuffered(s, c, e, dst, b)
}

// openBuffered opens chunk c, whose ciphertext is in b.pkg already, into
// dst; a failure clears dst.
func openBuffered(s *Sealer, c uint64, e *cowmap.Entry, dst []byte, b *chunkBuf) error {
	copy(b.pkg[:HeaderSize], e.DAREHeader())
	copy(b.pkg[HeaderSize+ChunkSize:], e.Tag())
	if _, err := s.Open(dst[:0], uint32(c), b.pkg[:]); err != nil {
		clear(dst)
		return ErrChunkAuth
	}
	return nil
}

// WriteAt writes plaintext; partial chunks are read, modified and written
// under the chunk's lock; runs of whole chunks are sealed in batches and
// written with one pwrite per run of neighbouring homes.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	v.wgate.RLock()
	defer v.wgate.RUnlock()
	return v.writeAt(p, off)
}

func (v *Volume) writeAt(p []byte, off int64) (int, error) {
	v.touch()
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	if v.m.Dirty() > 2*maxDirty {
		if err := v.backPressure(); err != nil {
			return 0, err
		}
	}
	done := 0
	if in := int(off % ChunkSize); in != 0 || len(p) < ChunkSize { // head
		n := min(len(p), ChunkSize-in)
		if err := v.writePartial(uint64(off)/ChunkSize, in, p[:n]); err != nil {
			return 0, err
		}
		done = n
	}
	for len(p)-done >= ChunkSize { // whole chunks
		n := min((len(p)-done)/ChunkSize, batchChunks)
		if err := v.writeChunks(uint64(off+int64(done))/ChunkSize, p[done:done+n*ChunkSize]); err != nil {
			return done, err
		}
		done += n * ChunkSize
	}
	if done < len(p) { // tail
		if err := v.writePartial(uint64(off+int64(done))/ChunkSize, 0, p[done:]); err != nil {
			return done, err
		}
		done = len(p)
	}
	return done, nil
}

// writePartial writes p at byte in of chunk c: read, modify, write.
func (v *Volume) writePartial(c uint64, in int, p []byte) error {
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	l := v.lock(c)
	l.Lock()
	defer l.Unlock()
	if err := v.preserve(c, 1); err != nil {
		return err
	}
	if len(p) == ChunkSize {
		return v.writeChunk(c, p, b)
	}
	if err := v.readChunk(c, b.pt[:], b); err != nil {
		return err
	}
	copy(b.pt[in:], p)
	return v.writeChunk(c, b.pt[:], b)
}

// batchChunks is how many whole chunks one batch seals (1 MiB): fewer
// than the chunk locks, so a batch never takes one lock twice.
const batchChunks = 256

// batchBuf is a batch's ciphertext (contiguous, as it goes to the store),
// homes and map entries.
type batchBuf struct {
	ct    [batchChunks*ChunkSize + TagSize]byte
	homes [batchChunks]uint64
	es    [batchChunks]cowmap.Entry
	locks [batchChunks]int
	runs  [batchChunks]ioRun
}

// writeChunks writes whole chunks first.. from p (at most batchChunks).
func (v *Volume) writeChunks(first uint64, p []byte) error {
	n := len(p) / ChunkSize
	bb := v.pools.batches.Get().(*batchBuf)
	defer v.pools.batches.Put(bb)
	v.lockRange(first, bb.locks[:n])
	defer v.unlockRange(bb.locks[:n])
	if err := v.preserve(first, n); err != nil {
		return err
	}
	v.gate.RLock()
	defer v.gate.RUnlock()
	homes := bb.homes[:n]
	if err := v.m.Homes(first, homes); err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, first, err)
	}
	k := uint8(v.sealSlot.Load())
	for i := 0; i < n; i++ {
		c := first + uint64(i)
		epoch, err := v.nextSeal()
		if err != nil {
			return err
		}
		s := v.keys.sealer(k, epoch)
		if s == nil {
			return fmt.Errorf("volume %s: DEK slot %d holds no key", v.name, k)
		}
		e := &bb.es[i]
		*e = cowmap.Entry{}
		// The tag lands on the next chunk's first 16 bytes, which that
		// chunk's seal then overwrites: keep it first.
		if err := s.SealChunk(bb.ct[i*ChunkSize:i*ChunkSize:(i+1)*ChunkSize+TagSize], (*[HeaderSize]byte)(e.DAREHeader()), uint32(c), p[i*ChunkSize:(i+1)*ChunkSize]); err != nil {
			return err
		}
		copy(e.Tag(), bb.ct[(i+1)*ChunkSize:])
		e.SetLoc(homes[i])
		e.SetEpoch(epoch)
		e.SetKeySlot(k)
	}
	runs := bb.runs[:0]
	for i := 0; i < n; { // one write per run of neighbouring blocks
		blk := v.geo.DataBlock(first+uint64(i), homes[i])
		j := i + 1
		for j < n && v.geo.DataBlock(first+uint64(j), homes[j]) == blk+uint64(j-i) {
			j++
		}
		runs = append(runs, ioRun{bb.ct[i*ChunkSize : j*ChunkSize], int64(blk * ChunkSize), first + uint64(i)})
		i = j
	}
	v.markScattered(first, n, len(runs))
	if err := v.doRuns(runs, true); err != nil {
		return err
	}
	if v.m.SetRange(first, bb.es[:n]) > maxDirty {
		v.flushInBackground()
	}
	return nil
}

// lockRange write-locks the locks of chunks first..first+len(idx)-1
// (fewer than the locks) in ascending lock order.
func (v *Volume) lockRange(first uint64, idx []int) {
	for i := range idx {
		idx[i] = int((first + uint64(i)) % uint64(len(v.locks)))
	}
	slices.Sort(idx)
	for _, i := range idx {
		v.locks[i].Lock()
	}
}

func (v *Volume) unlockRange(idx []int) {
	for _, i := range idx {
		v.locks[i].Unlock()
	}
}

// writeChunk seals pt as chunk c into the home the map gives and records
// the new entry. Callers hold the chunk's write lock.
func (v *Volume) writeChunk(c uint64, pt []byte, b *chunkBuf) error {
	v.gate.RLock()
	defer v.gate.RUnlock()
	home, err := v.m.Home(c)
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	epoch, err := v.nextSeal()
	if err != nil {
		return err
	}
	k := uint8(v.sealSlot.Load())
	s := v.keys.sealer(k, epoch)
	if s == nil {
		return fmt.Errorf("volume %s: DEK slot %d holds no key", v.name, k)
	}
	pkg, err := s.Seal(b.pkg[:0], uint32(c), pt)
	if err == nil {
		_, err = v.store.WriteAt(pkg[HeaderSize:HeaderSize+ChunkSize], int64(v.geo.DataBlock(c, home)*ChunkSize))
	}
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	var e cowmap.Entry
	e.SetLoc(home)
	e.SetEpoch(epoch)
	e.SetKeySlot(k)
	copy(e.DAREHeader(), pkg[:HeaderSize])
	copy(e.Tag(), pkg[HeaderSize+ChunkSize:])
	if v.m.Set(c, e) > maxDirty {
		v.flushInBackground()
	}
	return nil
}

// backPressure holds a writer back while the commits cannot keep up: one
// writer at a time commits, and those that waited behind it go on if it
// brought the dirty entries down (a commit each, an fdatasync each,
// would only make the wait longer).
func (v *Volume) backPressure() error {
	v.pressure.Lock()
	defer v.pressure.Unlock()
	if v.m.Dirty() <= 2*maxDirty {
		return nil
	}
	return v.Flush()
}

func (v *Volume) flushInBackground() {
	if !v.bgFlush.CompareAndSwap(false, true) {
		return
	}
	v.bg.Add(1)
	go func() {
		defer v.bg.Done()
		defer v.bgFlush.Store(false)
		if err := v.Flush(); err != nil {
			v.log.Error("background flush failed", "volume", v.name, "err", err)
		}
	}()
}

// unmap makes whole chunks [first, last] read as zeros.
func (v *Volume) unmap(first, last uint64) error {
	if v.opt.Base != nil { // a clone: unmapped would read its base
		var zeros [ChunkSize]byte
		for c := first; c <= last; c++ {
			if v.m.Dirty() > 2*maxDirty { // a whole-disk discard: held back as writes are
				if err := v.backPressure(); err != nil {
					return err
				}
			}
			if err := v.writePartial(c, 0, zeros[:]); err != nil {
				return err
			}
		}
		return nil
	}
	// Only mapped runs need work: a TRIM of a whole, mostly empty volume
	// (mkfs does one) skips the subtrees that were never written.
	var runs [64]cowmap.Run
	for c := first; c <= last; {
		rs, err := v.m.Runs(runs[:0], c, last+1, len(runs))
		if err != nil {
			return fmt.Errorf("volume %s: %w", v.name, err)
		}
		for _, r := range rs {
			if r.Mapped {
				for i := c; i < c+r.Chunks; i++ {
					if err := v.unmapChunk(i); err != nil {
						return err
					}
				}
			}
			c += r.Chunks
		}
	}
	return nil
}

func (v *Volume) unmapChunk(c uint64) error {
	l := v.lock(c)
	l.Lock()
	defer l.Unlock()
	e, err := v.m.Lookup(c)
	if err == nil && e.Mapped() {
		if err = v.preserve(c, 1); err == nil {
			err = v.m.Failed()
		}
		if err == nil {
			v.m.Set(c, cowmap.Entry{})
		}
	}
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	return nil
}

// Zero makes the range read as zeros: whole chunks are unmapped (nothing
// is written and no ciphertext stays referenced), partial ones rewritten.
func (v *Volume) Zero(off, length int64, _, _ bool) error {
	v.wgate.RLock()
	defer v.wgate.RUnlock()
	v.touch()
	if !block.CheckRange(v.size, off, length) {
		return block.ErrOutOfRange
	}
	end := off + length
	first := (off + ChunkSize - 1) / ChunkSize
	last := end / ChunkSize // exclusive
	if first >= last {      // within one chunk, or two partial ones
		return v.zeroBytes(off, end)
	}
	if err := v.zeroBytes(off, first*ChunkSize); err != nil {
		return err
	}
	if err := v.unmap(uint64(first), uint64(last-1)); err != nil {
		return err
	}
	return v.zeroBytes(last*ChunkSize, end)
}

func (v *Volume) zeroBytes(from, to int64) error {
	var zeros [ChunkSize]byte
	for from < to {
		n := min(to-from, ChunkSize-from%ChunkSize)
		if _, err := v.writeAt(zeros[:n], from); err != nil {
			return err
		}
		from += n
	}
	return nil
}

// Trim discards the range; here that is zeroing, which never leaks old
// ciphertext and costs no writes for whole chunks.
func (v *Volume) Trim(off, length int64) error { return v.Zero(off, length, true, false) }

// Extents reports unmapped chunks as holes that read as zeros.
func (v *Volume) Extents(dst []block.Extent, off, length int64, maxN int) ([]block.Extent, error) {
	if !block.CheckRange(v.size, off, length) {
		return dst, block.ErrOutOfRange
	}
	if length == 0 || maxN <= 0 {
		return dst, nil
	}
	if v.opt.Base != nil { // a clone's unwritten chunks are its base's: data
		return append(dst, block.Extent{Length: length}), nil
	}
	end := off + length
	first, last := uint64(off)/ChunkSize, (uint64(end)+ChunkSize-1)/ChunkSize
	runs, err := v.m.Runs(nil, first, last, maxN)
	if err != nil {
		return dst, fmt.Errorf("volume %s: %w", v.name, err)
	}
	for _, r := range runs {
		n := min(int64(r.Chunks*ChunkSize)-(off%ChunkSize), end-off)
		var fl uint32
		if !r.Mapped {
			fl = block.ExtentHole | block.ExtentZero
		}
		dst = append(dst, block.Extent{Length: n, Flags: fl})
		off += n
		if off >= end {
			break
		}
	}
	return dst, nil
}
