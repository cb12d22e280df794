package crypto

import (
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"sync"
	"sync/atomic"
	"time"

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
	maxDirty    = 1 << 16 // entries waiting for a commit before a background flush
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

	m    *cowmap.Map
	keys *keyring
	h    headerState

	sealSlot   atomic.Uint32 // DEK slot new seals use
	seal       atomic.Uint64 // epoch<<32 | seals in it
	epochLimit uint64

	keyMu sync.Mutex // one rotation or rekey at a time
	locks [1024]sync.RWMutex

	bgFlush    atomic.Bool
	bg         sync.WaitGroup
	lastCommit atomic.Int64 // unix nanos of the last commit
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
}

// NewPools returns empty pools.
func NewPools() *Pools {
	return &Pools{
		batches: sync.Pool{New: func() any { return new(batchBuf) }},
		reads:   sync.Pool{New: func() any { return new(readBuf) }},
	}
}

type chunkBuf struct {
	pkg [PackageSize]byte
	pt  [ChunkSize]byte
}

var (
	_ block.Device   = (*Volume)(nil)
	_ block.Trimmer  = (*Volume)(nil)
	_ block.Zeroer   = (*Volume)(nil)
	_ block.Extenter = (*Volume)(nil)
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

// headerOf reads the header, unwraps the active DEK and checks the MAC. A
// copy that fails to parse or to verify while the other one is good is an
// integrity warning (normal after a crash during an update).
func headerOf(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (*Header, []byte, error) {
	var ab [2 * HeaderBlockSize]byte
	if _, err := store.ReadAt(ab[:], 0); err != nil {
		return nil, nil, fmt.Errorf("volume %s: reading the header: %w", name, err)
	}
	copies := [2][]byte{ab[:HeaderBlockSize], ab[HeaderBlockSize:]}
	h, which, err := PickHeader(copies[0], copies[1])
	if errors.Is(err, ErrNeedsUpgrade) {
		return nil, nil, fmt.Errorf("volume %s: %w %s", name, err, name)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	var firstErr error
	for try := 0; try < 2; try++ {
		if try == 1 {
			which = 1 - which
			if h, err = ParseHeader(copies[which]); err != nil {
				break
			}
		}
		dek, err := openHeader(ctx, h, copies[which], name, uuid, kek)
		if err == nil {
			if _, perr := ParseHeader(copies[1-which]); perr != nil || try == 1 {
				log.Warn("integrity warning: a volume header copy is damaged or stale; using the other", "event", "integrity_warning",
					"volume", name, "copy", "AB"[1-which:2-which])
			}
			return h, dek, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		if errors.Is(err, ErrWrongVolume) || errors.Is(err, ErrUnwrap) || errors.Is(err, context.Canceled) {
			break // the other copy names the same key
		}
	}
	return nil, nil, firstErr
}

func openHeader(ctx context.Context, h *Header, raw []byte, name string, uuid [16]byte, kek KEKProvider) ([]byte, error) {
	if h.UUID != uuid {
		return nil, fmt.Errorf("volume %s: %w", name, ErrWrongVolume)
	}
	if h.KEK.Provider != kek.Name() {
		return nil, fmt.Errorf("volume %s: its key is in provider %q, not %q", name, h.KEK.Provider, kek.Name())
	}
	dek, err := kek.Unwrap(ctx, h.KEK, uuid, h.DEK[h.Active])
	if err != nil {
		return nil, fmt.Errorf("volume %s: unwrapping the data key (%s key %s v%d): %w", name, h.KEK.Provider, h.KEK.Name, h.KEK.Version, err)
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err == nil {
		err = VerifyHeaderMAC(raw, mac)
	}
	if err != nil {
		clear(dek)
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return dek, nil
}

// Open attaches the encrypted volume on store, checking that it is the
// volume with this uuid: it recovers the map, refuses a store older than
// its anchor, and marks the header open. name is for errors and logs. A
// volume whose rekey was interrupted opens with both data keys and seals
// under the new one.
func Open(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger, opt Options) (*Volume, error) {
	h, dek, err := headerOf(ctx, store, name, uuid, kek, log)
	if err != nil {
		return nil, err
	}
	g, err := cowmap.NewGeometry(h.Size/ChunkSize, uint64(h.LogBlocks))
	if err != nil {
		clear(dek)
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	v := &Volume{
		name: name, uuid: uuid, log: log, store: store, geo: g, size: int64(h.Size), opt: opt,
		keys: newKeyring(uuid, h.Suite), epochLimit: epochLimit,
		h:    headerState{store: store, name: name, hdr: h},
		poke: make(chan struct{}, 1), done: make(chan struct{}),
		bufs:  sync.Pool{New: func() any { return new(chunkBuf) }},
		pools: opt.Pools,
	}
	if v.pools == nil {
		v.pools = NewPools()
	}
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
		return fail(fmt.Errorf("volume %s: %w: %d bytes, the layout needs %d", name, ErrStoreTooSmall, store.Size(), g.End*ChunkSize))
	}
	logKey, err := v.keys.derive(h.Active, infoLogMAC)
	if err != nil {
		return fail(err)
	}
	v.m, err = cowmap.Open(cowmap.Config{
		Dev: store, Geo: g, UUID: uuid, LogKey: logKey, Cache: opt.Cache, MaxLogged: opt.MaxLogged,
		Verify: v.verifyData, WriteHeader: v.writeCheckpoint,
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
	if opt.Anchor != nil {
		a, ok, err := opt.Anchor.Load(uuid)
		if err != nil {
			return fail(fmt.Errorf("volume %s: %w", name, err))
		}
		if ok && seq < a {
			err := fmt.Errorf("volume %s: %w: the store is at commit %d, the anchor at %d", name, ErrRollback, seq, a)
			v.integrityFailure("rollback", err)
			v.m.Close()
			return fail(err)
		}
	}
	// Seal epochs: a clean detach left an exact count; after a crash the
	// count is unknown, so a new epoch starts (FORMAT.md, "Nonces").
	epoch, n := h.Epoch, h.EpochSeals
	if h.Open {
		if epoch == ^uint32(0) {
			return fail(fmt.Errorf("volume %s: %w", name, ErrNonceBudget))
		}
		epoch, n = epoch+1, 0
	}
	v.h.mu.Lock()
	nh := v.h.hdr.Clone()
	nh.Open, nh.Epoch, nh.EpochSeals = true, epoch, n
	err = v.h.writeLocked(nh)
	v.h.mu.Unlock()
	if err != nil {
		v.m.Close()
		return fail(err)
	}
	v.seal.Store(uint64(epoch)<<32 | n)
	if opt.Anchor != nil {
		if err := opt.Anchor.Advance(uuid, seq); err != nil {
			v.m.Close()
			return fail(fmt.Errorf("volume %s: %w", name, err))
		}
	}
	v.lastCommit.Store(time.Now().UnixNano())
	v.bg.Add(1)
	go v.background()
	return v, nil
}

// integrityFailure logs an integrity error of the store as an event the
// audit trail records.
func (v *Volume) integrityFailure(kind string, err error) {
	v.log.Error("integrity failure", "event", "integrity_failure", "volume", v.name, "kind", kind, "err", err)
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
	for {
		select {
		case <-v.done:
			return
		case <-t.C:
		}
		if v.m.Failed() != nil {
			continue
		}
		if time.Since(time.Unix(0, v.lastCommit.Load())) > idleCkpt {
			if err := v.m.Checkpoint(); err != nil {
				v.log.Error("checkpoint failed", "volume", v.name, "err", err)
			}
		}
		if seq := v.m.Seq(); v.opt.Anchor != nil && seq > anchored {
			if err := v.opt.Anchor.Advance(v.uuid, seq); err != nil {
				v.log.Error("advancing the rollback anchor failed", "volume", v.name, "err", err)
				continue
			}
			anchored = seq
		}
	}
}

// Size is the logical size.
func (v *Volume) Size() int64 { return v.size }

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

// quiesce write-locks every chunk lock: no write is between its data and
// its map entry (cowmap.Map.Commit).
func (v *Volume) quiesce() func() {
	for i := range v.locks {
		v.locks[i].Lock()
	}
	return func() {
		for i := range v.locks {
			v.locks[i].Unlock()
		}
	}
}

// pieces calls fn for each chunk that [off, off+n) touches, in order, with
// the chunk index, the piece's offset inside the chunk and its bounds in
// the caller's buffer; it stops at the first error and returns the bytes
// done before it.
func pieces(off int64, n int, fn func(c uint64, in, lo, hi int) error) (int, error) {
	done := 0
	for done < n {
		c, in := uint64(off)/ChunkSize, int(uint64(off)%ChunkSize)
		m := min(n-done, ChunkSize-in)
		if err := fn(c, in, done, done+m); err != nil {
			return done, err
		}
		done += m
		off += int64(m)
	}
	return done, nil
}

// ReadAt reads plaintext; a chunk that fails authentication fails the read
// with ErrChunkAuth, naming the chunk, and is logged. Runs of whole
// chunks are read with one pread per run of neighbouring homes and opened
// in place.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
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
		if err := v.readChunks(uint64(off+int64(done))/ChunkSize, p[done:done+n*ChunkSize], b); err != nil {
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
func (v *Volume) readChunks(first uint64, p []byte, b *chunkBuf) error {
	n := len(p) / ChunkSize
	rb := v.pools.reads.Get().(*readBuf)
	defer v.pools.reads.Put(rb)
	for i := 0; i < n; i++ {
		rb.locks[i] = int((first + uint64(i)) % uint64(len(v.locks)))
	}
	idx := rb.locks[:n]
	slices.Sort(idx)
	for _, i := range idx {
		v.locks[i].RLock()
	}
	defer func() {
		for _, i := range idx {
			v.locks[i].RUnlock()
		}
	}()
	es := rb.es[:n]
	if err := v.m.LookupRange(first, es); err != nil {
		v.integrityFailure("map", err)
		return fmt.Errorf("volume %s chunk %d: %w", v.name, first, err)
	}
	for i := 0; i < n; {
		if !es[i].Mapped() {
			clear(p[i*ChunkSize : (i+1)*ChunkSize])
			i++
			continue
		}
		j := i + 1
		for j < n && es[j].Loc() == es[i].Loc() {
			j++
		}
		if _, err := v.store.ReadAt(p[i*ChunkSize:j*ChunkSize], int64(v.geo.DataBlock(first+uint64(i), es[i].Loc())*ChunkSize)); err != nil {
			return fmt.Errorf("volume %s chunk %d: %w", v.name, first+uint64(i), err)
		}
		for ; i < j; i++ {
			c := first + uint64(i)
			dst := p[i*ChunkSize : (i+1)*ChunkSize]
			copy(b.pkg[HeaderSize:], dst)
			if err := v.openPackage(c, &es[i], dst, b); err != nil {
				return err
			}
		}
	}
	return nil
}

type readBuf struct {
	es    [batchChunks]cowmap.Entry
	locks [batchChunks]int
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
		clear(dst)
		return nil
	}
	err = v.openEntry(c, &e, dst, b)
	if errors.Is(err, ErrChunkAuth) {
		v.log.Error("integrity failure: chunk failed authentication", "event", "integrity_failure", "volume", v.name,
			"chunk", c, "kind", "chunk")
	}
	if err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	return nil
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
	copy(b.pkg[:HeaderSize], e.DAREHeader())
	copy(b.pkg[HeaderSize+ChunkSize:], e.Tag())
	if _, err := s.Open(dst[:0], uint32(c), b.pkg[:]); err != nil {
		clear(dst)
		return ErrChunkAuth
	}
	return nil
}

// openPackage opens chunk c whose ciphertext is already in b.pkg, into
// dst, logging an authentication failure.
func (v *Volume) openPackage(c uint64, e *cowmap.Entry, dst []byte, b *chunkBuf) error {
	s := v.keys.sealer(e.KeySlot(), e.Epoch())
	var err error
	if s == nil {
		err = fmt.Errorf("sealed under DEK slot %d, which holds no key: %w", e.KeySlot(), ErrChunkAuth)
	} else {
		copy(b.pkg[:HeaderSize], e.DAREHeader())
		copy(b.pkg[HeaderSize+ChunkSize:], e.Tag())
		if _, oerr := s.Open(dst[:0], uint32(c), b.pkg[:]); oerr != nil {
			err = ErrChunkAuth
		}
	}
	if err != nil {
		clear(dst)
		v.log.Error("integrity failure: chunk failed authentication", "event", "integrity_failure", "volume", v.name,
			"chunk", c, "kind", "chunk")
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	return nil
}

// WriteAt writes plaintext; partial chunks are read, modified and written
// under the chunk's lock; runs of whole chunks are sealed in batches and
// written with one pwrite per run of neighbouring homes.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	if v.m.Dirty() > 2*maxDirty { // back-pressure: the commit cannot keep up
		if err := v.Flush(); err != nil {
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
}

// writeChunks writes whole chunks first.. from p (at most batchChunks).
func (v *Volume) writeChunks(first uint64, p []byte) error {
	n := len(p) / ChunkSize
	bb := v.pools.batches.Get().(*batchBuf)
	defer v.pools.batches.Put(bb)
	v.lockRange(first, bb.locks[:n])
	defer v.unlockRange(bb.locks[:n])
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
	for i := 0; i < n; { // one write per run of neighbouring homes
		j := i + 1
		for j < n && homes[j] == homes[i] {
			j++
		}
		if _, err := v.store.WriteAt(bb.ct[i*ChunkSize:j*ChunkSize], int64(v.geo.DataBlock(first+uint64(i), homes[i])*ChunkSize)); err != nil {
			return fmt.Errorf("volume %s chunk %d: %w", v.name, first+uint64(i), err)
		}
		i = j
	}
	if v.m.SetRange(first, bb.es[:n]) > maxDirty {
		v.flushInBackground()
	}
	return nil
}

// lockRange write-locks the locks of chunks first..first+len(idx)-1
// (fewer than the locks) in ascending lock order, as quiesce does.
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

// nextSeal counts a seal and returns its epoch, moving to the next epoch
// (header first) when this one is used up.
func (v *Volume) nextSeal() (uint32, error) {
	for {
		s := v.seal.Add(1)
		e, n := uint32(s>>32), s&0xffffffff
		if n <= v.epochLimit {
			return e, nil
		}
		if err := v.nextEpoch(e); err != nil {
			return 0, err
		}
	}
}

func (v *Volume) nextEpoch(from uint32) error {
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	if uint32(v.seal.Load()>>32) != from {
		return nil // another writer moved it
	}
	if from == ^uint32(0) {
		return fmt.Errorf("volume %s: %w", v.name, ErrNonceBudget)
	}
	h := v.h.hdr.Clone()
	h.Epoch, h.EpochSeals = from+1, 0
	if err := v.h.writeLocked(h); err != nil {
		return err
	}
	v.seal.Store(uint64(from+1) << 32)
	v.log.Info("seal epoch advanced", "volume", v.name, "epoch", from+1)
	return nil
}

// headerState is a volume's current header.
type headerState struct {
	mu     sync.Mutex // guards the fields below; serialises header writes
	store  block.Device
	name   string
	hdr    *Header
	macKey []byte
	onFail func(error) // a flush failed: what the store holds is unknown
}

// writeLocked writes h to both header copies, each followed by a flush,
// so that neither copy is ever older than what the store's log and nodes
// still hold (FORMAT.md, "Volume header").
func (s *headerState) writeLocked(h *Header) error {
	h.Generation = s.hdr.Generation + 1
	b, err := h.Marshal(s.macKey)
	if err != nil {
		return err
	}
	for c := 0; c < 2; c++ {
		if _, err := s.store.WriteAt(b, int64(c)*HeaderBlockSize); err != nil {
			return fmt.Errorf("volume %s: writing the header: %w", s.name, err)
		}
		if err := s.store.Flush(); err != nil {
			if s.onFail != nil {
				s.onFail(err)
			}
			return fmt.Errorf("volume %s: syncing the header: %w: %w", s.name, ErrVolumeFailed, err)
		}
	}
	s.hdr = h
	return nil
}

// Flush makes every completed write durable: one map commit, one flush of
// the store (FORMAT.md, "Writes, FLUSH, checkpoints").
func (v *Volume) Flush() error {
	if err := v.m.Commit(v.quiesce); err != nil {
		return fmt.Errorf("volume %s: flush: %w", v.name, err)
	}
	v.lastCommit.Store(time.Now().UnixNano())
	if v.opt.AnchorEveryFlush && v.opt.Anchor != nil {
		if err := v.opt.Anchor.Advance(v.uuid, v.m.Seq()); err != nil {
			return fmt.Errorf("volume %s: flush: %w", v.name, err)
		}
	}
	return nil
}

// unmap makes whole chunks [first, last] read as zeros.
func (v *Volume) unmap(first, last uint64) error {
	for c := first; c <= last; c++ {
		l := v.lock(c)
		l.Lock()
		e, err := v.m.Lookup(c)
		if err == nil && e.Mapped() {
			if err = v.m.Failed(); err == nil {
				v.m.Set(c, cowmap.Entry{})
			}
		}
		l.Unlock()
		if err != nil {
			return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
		}
	}
	return nil
}

// Zero makes the range read as zeros: whole chunks are unmapped (nothing
// is written and no ciphertext stays referenced), partial ones rewritten.
func (v *Volume) Zero(off, length int64, _, _ bool) error {
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
		if _, err := v.WriteAt(zeros[:n], from); err != nil {
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

// stopBackground ends the background flushes and checkpoints.
func (v *Volume) stopBackground() {
	select {
	case <-v.done:
	default:
		close(v.done)
	}
	v.bg.Wait()
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
			err = v.opt.Anchor.Advance(v.uuid, v.m.Seq())
		}
		v.m.Close()
		v.h.mu.Lock()
		v.keys.free()
		clear(v.h.macKey)
		v.h.mu.Unlock()
		if cerr := v.store.Close(); err == nil {
			err = cerr
		}
	})
	return err
}
