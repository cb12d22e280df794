package crypto

// Reads submitted to a store that completes requests itself
// (block.Submitter: RBD through librbd's aio). The transport's reader
// starts them, and the store's completion goroutine opens the chunks and
// answers: no goroutine waits per read, as none does on the store itself.

import (
	"fmt"
	"sync"
	"sync/atomic"

	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// subRead is one submitted read in flight: the chunks' read locks and
// map entries (rb) are held until its last run completes.
type subRead struct {
	v     *Volume
	p     []byte
	first uint64
	n     int
	rb    *readBuf
	idx   []int
	done  func(error, *block.Batch)
	left  atomic.Int32 // runs not yet completed
	mu    sync.Mutex
	err   error // the first run's failure
	// ranFn is ran, bound once per subRead: no closure per request.
	ranFn func(error, *block.Batch)
}

func newSubRead() any {
	s := new(subRead)
	s.ranFn = s.ran
	return s
}

// SubmitReadAt starts a read of whole chunks on a store that completes
// requests itself; done runs with the result on the store's goroutine
// (block.Submitter). It declines (false: use ReadAt) what ReadAt does
// with more than reads: partial chunks, more than a batch, a map entry
// not in the cache, a chunk in the log (a checkpoint may move it), a
// clone's unwritten chunk, or homes that need more runs than spanRuns.
func (v *Volume) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	if v.submitter == nil || len(p) == 0 || off%ChunkSize != 0 || len(p)%ChunkSize != 0 ||
		len(p) > batchChunks*ChunkSize || !block.CheckRange(v.size, off, int64(len(p))) {
		return false
	}
	first, n := uint64(off)/ChunkSize, len(p)/ChunkSize
	rb := v.pools.reads.Get().(*readBuf)
	idx := v.rlockRange(first, rb.locks[:n])
	es := rb.es[:n]
	runs := rb.runs[:0]
	ok := v.m.TryLookupRange(first, es) == nil
	for i := 0; ok && i < n; i++ {
		if es[i].Mapped() {
			ok = !cowmap.IsInLog(es[i].Loc())
		} else {
			ok = v.opt.Base == nil
		}
	}
	for i := 0; ok && i < n; {
		if !es[i].Mapped() {
			clear(p[i*ChunkSize : (i+1)*ChunkSize])
			i++
			continue
		}
		var r ioRun
		r, i = v.readRun(first, es, p, i)
		runs = append(runs, r)
	}
	if !ok || len(runs) == 0 || len(runs) > spanRuns {
		v.runlockRange(idx)
		v.pools.reads.Put(rb)
		return false
	}
	v.touch()
	v.markScattered(first, n, len(runs))
	s := v.subs.Get().(*subRead)
	s.v, s.p, s.first, s.n, s.rb, s.idx, s.done, s.err = v, p, first, n, rb, idx, done, nil
	s.left.Store(int32(len(runs)))
	for _, r := range runs { // (the last completion puts rb back: r is a copy)
		if !v.submitter.SubmitReadAt(r.p, r.off, s.ranFn) {
			_, err := v.store.ReadAt(r.p, r.off) // no room at the store: here, waiting
			s.ran(err, nil)
		}
	}
	return true
}

// ran completes one run of s; the last opens the chunks, releases their
// locks and answers.
func (s *subRead) ran(err error, b *block.Batch) {
	if err != nil {
		s.mu.Lock()
		if s.err == nil {
			s.err = err
		}
		s.mu.Unlock()
	}
	if s.left.Add(-1) != 0 {
		return
	}
	v := s.v
	s.mu.Lock()
	err = s.err
	s.mu.Unlock()
	if err != nil {
		err = fmt.Errorf("volume %s chunk %d: %w", v.name, s.first, err)
	} else {
		cb := v.bufs.Get().(*chunkBuf)
		es := s.rb.es[:s.n]
		for i := range es {
			if !es[i].Mapped() {
				continue
			}
			if oerr := v.openAt(s.first+uint64(i), &es[i], s.p, i, cb); oerr != nil {
				err = v.authFailure(s.first+uint64(i), oerr)
				break
			}
		}
		v.bufs.Put(cb)
	}
	v.runlockRange(s.idx)
	v.pools.reads.Put(s.rb)
	done := s.done
	s.v, s.p, s.rb, s.idx, s.done, s.err = nil, nil, nil, nil, nil, nil
	v.subs.Put(s)
	done(err, b)
}

// SubmitWriteAt declines: a write seals, may read a partial chunk, copies
// before write for a snapshot and waits for back pressure, so it runs on
// a goroutine of its own (WriteAt).
func (v *Volume) SubmitWriteAt([]byte, int64, bool, func(error, *block.Batch)) bool { return false }

// Push passes on to the store.
func (v *Volume) Push() {
	if v.submitter != nil {
		v.submitter.Push()
	}
}
