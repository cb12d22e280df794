package crypto

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"goldilocks/audit"
	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// Errors callers branch on.
var (
	ErrMapAuth       = cowmap.ErrMapAuth
	ErrVolumeFailed  = cowmap.ErrFailed
	ErrWrongVolume   = errors.New("crypto: the backing store holds another volume")
	ErrStoreTooSmall = errors.New("crypto: backing store is smaller than the volume's layout")
	ErrTooLarge      = errors.New("crypto: volume size is not a multiple of 4096 between 4 KiB and 16 TiB")
)

const (
	maxDirty    = 1 << 16 // entries waiting for a commit before a background flush (256 MiB of writes)
	idleCkpt    = 5 * time.Second
	anchorEvery = time.Second
)

// Layout is where things live in a backing store.
type Layout struct {
	cowmap.Geometry
	End uint64 // bytes the backing store must hold
}

// logBlocksFor is the default log length for n chunks.
func logBlocksFor(n uint64) uint64 { return min(4096, max(16, n/8)) }

// LayoutFor computes the layout of a volume of size bytes (zero Layout if
// the size is not one a volume can have).
func LayoutFor(size uint64) Layout {
	g, err := cowmap.NewGeometry(size/ChunkSize, logBlocksFor(size/ChunkSize))
	if err != nil {
		return Layout{}
	}
	return Layout{Geometry: g, End: g.End * ChunkSize}
}

// Options tune an open volume.
type Options struct {
	// Anchor keeps the rollback anchor; nil: no rollback check (tests).
	Anchor Anchor
	// Cache holds map nodes; nil: a small private one.
	Cache *cowmap.Cache
	// MaxLogged: logged entries before a checkpoint (0: cowmap's default).
	MaxLogged int
	// Pools holds the batch buffers; share one among the volumes of a
	// process (nil: the volume's own).
	Pools *Pools
	// AnchorEveryFlush advances the anchor after every commit, before the
	// FLUSH returns: no rollback window at all, for the cost of a file
	// write and two fsyncs in the data dir per FLUSH (FORMAT.md, "The
	// window"). By default the anchor follows at most a second behind.
	AnchorEveryFlush bool
	// NoLogData keeps small flushed writes out of the log (FORMAT.md,
	// "Small writes into the log"): every write goes to a home. For
	// comparisons; a store with network latency never uses the log.
	NoLogData bool
	// NoAlign turns home alignment off (align.go; FORMAT.md, "Home
	// alignment"): chunks that random writes left alternating between
	// their homes stay so.
	NoAlign bool
	// Base makes the volume a clone (SNAPSHOTS.md, "Clones"): a chunk it
	// has not written reads from Base (a snapshot's View, of the same
	// size), and zeroing writes zeros instead of unmapping.
	Base block.Device
	// Release, if set, runs once the volume is closed or handed off (a
	// clone's base is let go there).
	Release func()
	// deferCheckpoint: cowmap.Config.DeferCheckpoint (tests that cut the
	// power at every operation of a fixed workload).
	deferCheckpoint bool
}

// Volume is an open encrypted volume (format 2): a block.Device whose
// chunks are sealed into a backing store, mapped by an authenticated
// copy-on-write map (FORMAT.md).
type Volume struct {
	name  string
	uuid  [16]byte
	log   *slog.Logger
	store block.Device
	geo   cowmap.Geometry
	size  int64
	opt   Options
	// parallel: the store answers at network speed (RBD, an upstream
	// NBD server: no CanFastWrite), so the runs of a batch and the nodes
	// of a checkpoint go to it at once rather than one after another.
	parallel bool
	// tryStore: the store can try a read without waiting for I/O (a
	// file's page cache): so then can the volume (TryReadAt).
	tryStore block.TryReader
	// submitter: the store completes requests itself (RBD's aio): so
	// then can the volume's reads of whole chunks (submit.go).
	submitter block.Submitter
	subs      sync.Pool // *subRead

	m    *cowmap.Map
	keys *keyring
	h    headerState

	sealSlot   atomic.Uint32 // DEK slot new seals use
	seal       atomic.Uint64 // epoch<<32 | seals in it
	epochLimit uint64

	keyMu sync.Mutex // one rotation, rekey or snapshot create at a time
	// wgate is held shared by every client write, trim and zero for its
	// whole length, and exclusively by a snapshot's create (and a delete's
	// last pass): the flush point (snapshot.go). Outside the chunk locks.
	wgate  sync.RWMutex
	snapMu sync.Mutex              // one snapshot create or delete at a time; guards views
	snaps  atomic.Pointer[snapSet] // nil or the snapshots, oldest first
	// viewMu is held shared by a View's read for its whole length, and
	// exclusively by a delete while it replaces snaps: no read then uses
	// a store that the delete closes.
	viewMu sync.RWMutex
	locks  [1024]sync.RWMutex
	// gate is held shared by every write from the Home that chooses
	// where its data goes to the Set that records it; a commit takes it
	// exclusively to snapshot the map (quiesce).
	gate sync.RWMutex
	// quiesceFn and unquiesce are quiesce and gate.Unlock as values, made
	// once: a FLUSH allocates nothing.
	quiesceFn func() func()
	unquiesce func()

	bgFlush    atomic.Bool
	pressure   sync.Mutex // one writer at a time commits for back-pressure
	bg         sync.WaitGroup
	lastCommit atomic.Int64 // unix nanos of the last commit
	touched    atomic.Bool  // a client request since the background loop's last tick
	marks      alignMarks
	poke       chan struct{}
	done       chan struct{}
	closeOnce  sync.Once

	bufs  sync.Pool // *chunkBuf
	pools *Pools
}

// Pools are buffers that volumes share: a batch of sealed chunks is 1 MiB,
// too much to keep per volume when a gateway serves a thousand.
type Pools struct {
	batches sync.Pool // *batchBuf
	reads   sync.Pool // *readBuf
	copies  sync.Pool // *[batchChunks * ChunkSize]byte: a snapshot's copies
}

// NewPools returns empty pools.
func NewPools() *Pools {
	return &Pools{
		batches: sync.Pool{New: func() any { return new(batchBuf) }},
		reads:   sync.Pool{New: func() any { return new(readBuf) }},
		copies:  sync.Pool{New: func() any { return new([batchChunks * ChunkSize]byte) }},
	}
}

type chunkBuf struct {
	pkg [PackageSize]byte
	pt  [ChunkSize]byte
}

var (
	_ block.Device        = (*Volume)(nil)
	_ block.Capable       = (*Volume)(nil)
	_ block.Trimmer       = (*Volume)(nil)
	_ block.Zeroer        = (*Volume)(nil)
	_ block.Extenter      = (*Volume)(nil)
	_ block.ChangeTracker = (*Volume)(nil)
	_ block.Submitter     = (*Volume)(nil)
)

// Format writes a new, empty encrypted volume on store: a fresh random
// data key wrapped by kek's key keyName, and the header, twice. Nothing
// else is written: the map and data are created as they are written.
func Format(ctx context.Context, store block.Device, uuid [16]byte, size uint64, suite byte, kek KEKProvider, keyName string) error {
	return format(ctx, store, uuid, size, suite, kek, keyName, logBlocksFor(size/ChunkSize))
}

func format(ctx context.Context, store block.Device, uuid [16]byte, size uint64, suite byte, kek KEKProvider, keyName string, logBlocks uint64) error {
	if size == 0 || size%ChunkSize != 0 || size/ChunkSize > cowmap.MaxChunks {
		return fmt.Errorf("%w: %d bytes", ErrTooLarge, size)
	}
	g, err := cowmap.NewGeometry(size/ChunkSize, logBlocks)
	if err != nil {
		return err
	}
	if uint64(store.Size()) < g.End*ChunkSize {
		return fmt.Errorf("%w: %d bytes, need %d", ErrStoreTooSmall, store.Size(), g.End*ChunkSize)
	}
	dek := make([]byte, 32)
	defer clear(dek)
	if _, err := rand.Read(dek); err != nil {
		return err
	}
	wrapped, version, err := kek.Wrap(ctx, keyName, uuid, dek)
	if err != nil {
		return fmt.Errorf("wrapping the data key with %s key %s: %w", kek.Name(), keyName, err)
	}
	h := &Header{
		UUID: uuid, Size: size, ChunkSize: ChunkSize, Suite: suite, LogBlocks: uint32(logBlocks),
		KEK: KeyRef{Provider: kek.Name(), Name: keyName, Version: version}, DEK: [2][]byte{wrapped},
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err != nil {
		return err
	}
	s := headerState{store: store, name: "new volume", hdr: h, macKey: mac}
	if err := s.writeLocked(h.Clone()); err != nil {
		return err
	}
	return nil
}

// Open attaches the encrypted volume on store, checking that it is the
// volume with this uuid: it recovers the map, refuses a store older than
// its anchor, and marks the header open. name is for errors and logs. A
// volume whose rekey was interrupted opens with both data keys and seals
// under the new one.
func Open(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger, opt Options) (*Volume, error) {
	h, dek, err := headerOf(ctx, store, name, uuid, kek, log)
	if err != nil {
		if isIntegrity(err) {
			log.Error("integrity failure: attach refused", "event", audit.EvIntegrityFailure, "volume", name, "kind", "header", "err", err)
		}
		return nil, err
	}
	g, err := cowmap.NewGeometry(h.Size/ChunkSize, uint64(h.LogBlocks))
	if err != nil {
		clear(dek)
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	// Commits, a checkpoint beside them and header writes all flush the
	// store: one at a time, and a failure stays (cowmap.Flusher).
	flusher := cowmap.NewFlusher(store)
	so := block.OptionalOf(store)
	v := &Volume{
		name: name, uuid: uuid, log: log, store: store, geo: g, size: int64(h.Size), opt: opt,
		parallel: !so.FastWrite,
		tryStore: so.TryReader, submitter: so.Submitter,
		subs: sync.Pool{New: newSubRead},
		keys: newKeyring(uuid, h.Suite), epochLimit: epochLimit,
		h:    headerState{store: flusher, name: name, hdr: h},
		poke: make(chan struct{}, 1), done: make(chan struct{}),
		bufs:  sync.Pool{New: func() any { return new(chunkBuf) }},
		pools: opt.Pools,
	}
	if v.pools == nil {
		v.pools = NewPools()
	}
	v.quiesceFn, v.unquiesce = v.quiesce, v.gate.Unlock
	fail := func(err error) (*Volume, error) {
		v.keys.free()
		return nil, err
	}
	v.keys.install(h.Active, dek)
	v.sealSlot.Store(uint32(h.Active))
	if h.Rekeying() {
		next, err := kek.Unwrap(ctx, h.KEK, uuid, h.DEK[1-h.Active])
		if err != nil {
			return fail(fmt.Errorf("volume %s: unwrapping the new data key of an interrupted rekey: %w", name, err))
		}
		v.keys.install(1-h.Active, next)
		v.sealSlot.Store(uint32(1 - h.Active))
		log.Warn("volume has an interrupted rekey; resume it with goldilocks key rekey", "volume", name,
			"cursor", h.RekeyCursor, "chunks", g.Chunks)
	}
	if v.h.macKey, err = v.keys.derive(h.Active, infoHeaderMAC); err != nil {
		return fail(err)
	}
	if uint64(store.Size()) < g.End*ChunkSize {
		err := fmt.Errorf("volume %s: %w: %d bytes, the layout needs %d", name, ErrStoreTooSmall, store.Size(), g.End*ChunkSize)
		v.integrityFailure("truncated", err)
		return fail(err)
	}
	logKey, err := v.keys.derive(h.Active, infoLogMAC)
	if err != nil {
		return fail(err)
	}
	v.m, err = cowmap.Open(cowmap.Config{
		Dev: flusher, Geo: g, UUID: uuid, LogKey: logKey, Cache: opt.Cache, MaxLogged: opt.MaxLogged, ParallelIO: v.parallel,
		LogData:         !v.parallel && !opt.NoLogData, // used by writes, after the header below sets its flag
		DeferCheckpoint: opt.deferCheckpoint,
		Written:         v.homeWritten(store),
		Verify:          v.verifyData, WriteHeader: v.writeCheckpoint,
		BeforeCommit: v.beforeCommit,
	}, h.MapState())
	if err != nil {
		v.integrityFailure("map", err)
		return fail(fmt.Errorf("volume %s: %w", name, err))
	}
	v.h.onFail = v.m.Fail
	if v.m.DroppedLastCommit() {
		log.Info("recovery: the last map commit's data had not reached the store (a crash inside a flush); it was never acknowledged and is dropped",
			"volume", name, "seq", v.m.Seq())
	}
	seq := v.m.Seq()
	var anchored AnchorState
	if opt.Anchor != nil {
		a, ok, err := opt.Anchor.Load(uuid)
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", name, err))
		}
		if ok && seq < a.Seq {
			err := fmt.Errorf("volume %s: %w: the store is at commit %d, the anchor at %d", name, ErrRollback, seq, a.Seq)
			v.integrityFailure("rollback", err)
			v.m.Close()
			return fail(err)
		}
		anchored = a
	}
	// Seal epochs: a clean detach left an exact count; after a crash the
	// count is unknown, so a new epoch starts (FORMAT.md, "Nonces"). The
	// count is trusted only from the header the last detach wrote: a
	// clean detach empties the log (so a clean header with commits after
	// it is an older one put back), and the anchor holds the newest header
	// generation and epoch the gateway wrote (so an older header put back
	// over unflushed seals is caught too).
	epoch, n := h.Epoch, h.EpochSeals
	if h.Open || v.m.Replayed() > 0 || h.Generation < anchored.Generation {
		epoch = max(epoch, v.m.MaxLoggedEpoch(), anchored.Epoch)
		if epoch == ^uint32(0) {
			return fail(fmt.Errorf("volume %s: %w", name, ErrNonceBudget))
		}
		epoch, n = epoch+1, 0
	}
	v.h.mu.Lock()
	nh := v.h.hdr.Clone()
	nh.Open, nh.Epoch, nh.EpochSeals = true, epoch, n
	nh.LogData = nh.LogData || !v.parallel && !opt.NoLogData
	nh.Reseed = true // before the first commit, which may chain to a reseed
	err = v.h.writeLocked(nh)
	gen := v.h.hdr.Generation
	v.h.mu.Unlock()
	if err != nil {
		v.m.Close()
		return fail(err)
	}
	v.seal.Store(uint64(epoch)<<32 | n)
	if opt.Anchor != nil { // before the first seal in this epoch
		if err := opt.Anchor.Advance(uuid, AnchorState{Seq: seq, Generation: gen, Epoch: epoch}); err != nil {
			v.m.Close()
			return fail(fmt.Errorf("volume %s: %w", name, err))
		}
	}
	v.lastCommit.Store(time.Now().UnixNano())
	v.bg.Add(1)
	go v.background()
	return v, nil
}

// isIntegrity reports whether an attach failed because of what the store
// holds (damage or tampering) rather than, say, an unreachable KEK.
func isIntegrity(err error) bool {
	for _, e := range []error{ErrHeaderCorrupt, ErrHeaderAuth, ErrWrongVolume, ErrBadMagic, ErrStoreTooSmall, ErrMapAuth, ErrRollback} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// integrityFailure logs an integrity error of the store as an event the
// audit trail records.
func (v *Volume) integrityFailure(kind string, err error) {
	v.log.Error("integrity failure", "event", audit.EvIntegrityFailure, "volume", v.name, "kind", kind, "err", err)
}

// homeWritten is the map's Written on a store that can tell (a file:
// SEEK_DATA), or nil: then small flushed writes always go into the log.
func (v *Volume) homeWritten(store block.Device) func(c, home uint64) bool {
	p, ok := store.(block.Prober)
	if !ok {
		return nil
	}
	return func(c, home uint64) bool { return p.Written(int64(v.geo.DataBlock(c, home) * ChunkSize)) }
}

// verifyData reports whether chunk c's data matches entry e (recovery).
func (v *Volume) verifyData(c uint64, e *cowmap.Entry) bool {
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	return v.openEntry(c, e, b.pt[:], b) == nil
}

// writeCheckpoint is the map's WriteHeader: a checkpoint's state into
// both header copies.
func (v *Volume) writeCheckpoint(st cowmap.State) error {
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	h := v.h.hdr.Clone()
	h.Seq, h.Root, h.LogStart = st.Seq, st.Root, st.LogStart
	return v.h.writeLocked(h)
}

// background checkpoints an idle volume and advances the anchor after
// commits, at most once a second.
func (v *Volume) background() {
	defer v.bg.Done()
	t := time.NewTicker(anchorEvery)
	defer t.Stop()
	var anchored uint64
	lastActive := time.Now()
	for {
		select {
		case <-v.done:
			return
		case <-t.C:
		}
		if v.touched.Swap(false) {
			lastActive = time.Now()
		}
		if v.m.Failed() != nil {
			continue
		}
		if !v.opt.NoAlign && time.Since(lastActive) > alignIdle {
			moved, err := v.align(v.busy)
			if err != nil {
				v.log.Error("aligning homes failed", "volume", v.name, "err", err)
			} else if moved > 0 {
				v.log.Debug("aligned homes", "volume", v.name, "chunks", moved)
			}
		}
		if time.Since(time.Unix(0, v.lastCommit.Load())) > idleCkpt {
			if err := v.m.Checkpoint(); err != nil {
				v.log.Error("checkpoint failed", "volume", v.name, "err", err)
			}
		}
		if seq := v.m.Seq(); v.opt.Anchor != nil && seq > anchored {
			if err := v.opt.Anchor.Advance(v.uuid, AnchorState{Seq: seq}); err != nil {
				v.log.Error("advancing the rollback anchor failed", "volume", v.name, "err", err)
				continue
			}
			anchored = seq
		}
	}
}

// busy reports a client request since the last tick, or a detach.
func (v *Volume) busy() bool {
	select {
	case <-v.done:
		return true
	default:
	}
	return v.touched.Load()
}

// Size is the logical size.
func (v *Volume) Size() int64 { return v.size }

// Caps: an encrypted volume trims, zeroes and reports extents from its
// map; its bytes are not its file's (no zero-copy), nor cached by the
// kernel as plaintext (no Cache). On a store that can try a read
// without waiting (a file), so can it (TryReadAt).
func (v *Volume) Caps() block.Caps {
	c := block.CanTrim | block.CanZero | block.CanExtents | block.CanChanges
	if !v.parallel { // a seal and a write to a fast store
		c |= block.CanFastWrite
	}
	if v.tryStore != nil {
		c |= block.CanTryRead
	}
	if v.submitter != nil {
		c |= block.CanSubmit
	}
	return c
}

// Header returns a copy of the current header (for `volume info`).
func (v *Volume) Header() Header {
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	h := *v.h.hdr.Clone()
	s := v.seal.Load()
	h.Epoch, h.EpochSeals = uint32(s>>32), s&0xffffffff
	return h
}

// Seals is an upper bound of the chunks sealed since the volume's first
// epoch.
func (v *Volume) Seals() uint64 {
	s := v.seal.Load()
	return (s>>32)*epochLimit + s&0xffffffff
}

// Seq is the last durable commit of the map.
func (v *Volume) Seq() uint64 { return v.m.Seq() }

func (v *Volume) lock(c uint64) *sync.RWMutex { return &v.locks[c%uint64(len(v.locks))] }

// quiesce closes the gate: no write is then between the Home that chose
// its place and the Set that records it (cowmap.Map.Commit).
func (v *Volume) quiesce() func() {
	v.gate.Lock()
	return v.unquiesce
}

// Flush makes every completed write durable: one map commit, one flush of
// the store (FORMAT.md, "Writes, FLUSH, checkpoints").
func (v *Volume) Flush() error {
	if err := v.m.Commit(v.quiesceFn); err != nil {
		return fmt.Errorf("volume %s: flush: %w", v.name, err)
	}
	v.lastCommit.Store(time.Now().UnixNano())
	if v.opt.AnchorEveryFlush && v.opt.Anchor != nil {
		if err := v.opt.Anchor.Advance(v.uuid, AnchorState{Seq: v.m.Seq()}); err != nil {
			return fmt.Errorf("volume %s: flush: %w", v.name, err)
		}
	}
	return nil
}

// stopBackground ends the background flushes and checkpoints.
func (v *Volume) stopBackground() {
	select {
	case <-v.done:
	default:
		close(v.done)
	}
	v.bg.Wait()
}

// Handoff ends this process's use of the volume for another process
// that opens it right after (an upgrade in place, gateway/handover.go):
// the writes so far are committed, as by a FLUSH, and nothing else is
// written: no checkpoint, no clean header, no anchor advance. The store
// is then as after a crash right after a FLUSH, which the next Open
// recovers by the format's own rules (the log replayed, its last commit's
// data checked, a new seal epoch), so a handoff costs one commit where
// Close costs a checkpoint and four synced writes of the header and the
// anchor. The data keys are forgotten and the store closed, as by Close;
// Close after Handoff does nothing.
func (v *Volume) Handoff() error {
	var err error
	v.closeOnce.Do(func() {
		v.stopBackground()
		err = v.closeStore(v.Flush())
		if serr := v.closeSnapshots(true); err == nil {
			err = serr
		}
		if v.opt.Release != nil {
			v.opt.Release()
		}
	})
	return err
}

// closeStore ends the map, forgets the data keys and closes the store,
// returning err or else the store's close error.
func (v *Volume) closeStore(err error) error {
	v.m.Close()
	v.h.mu.Lock()
	v.keys.free()
	clear(v.h.macKey)
	v.h.mu.Unlock()
	if cerr := v.store.Close(); err == nil {
		err = cerr
	}
	return err
}

// Close flushes, checkpoints, records a clean detach (the exact seal
// count, the anchor), forgets the data keys and closes the store.
func (v *Volume) Close() error {
	var err error
	v.closeOnce.Do(func() {
		v.stopBackground()
		err = v.Flush()
		if err == nil {
			err = v.m.Checkpoint()
		}
		if err == nil {
			v.h.mu.Lock()
			h := v.h.hdr.Clone()
			s := v.seal.Load()
			h.Open, h.Epoch, h.EpochSeals = false, uint32(s>>32), s&0xffffffff
			err = v.h.writeLocked(h)
			v.h.mu.Unlock()
		}
		if err == nil && v.opt.Anchor != nil {
			h := v.Header()
			err = v.opt.Anchor.Advance(v.uuid, AnchorState{Seq: v.m.Seq(), Generation: h.Generation, Epoch: h.Epoch})
		}
		err = v.closeStore(err)
		if serr := v.closeSnapshots(false); err == nil {
			err = serr
		}
		if v.opt.Release != nil {
			v.opt.Release()
		}
	})
	return err
}
