package crypto

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"sync"
	"sync/atomic"

	"goldilocks/internal/block"
)

// Chunk map constants (FORMAT.md, "The chunk map"). Part of the format.
const (
	mapPageSize    = 4096
	mapPageHdr     = 16
	mapEntrySize   = 40
	entriesPerPage = (mapPageSize - mapPageHdr) / mapEntrySize // 102
	headerArea     = 2 * HeaderBlockSize
	minSpare       = 1024

	nonceReserveStep = 1 << 20
	nonceWarnAt      = 1 << 31
	nonceLimit       = 1 << 32

	// NonceLimit is how many chunks one data key may seal (FORMAT.md,
	// "Nonce budget").
	NonceLimit = nonceLimit
)

// Errors callers branch on.
var (
	ErrMapCorrupt    = errors.New("crypto: chunk map is corrupt")
	ErrNonceBudget   = errors.New("crypto: the data key has sealed 2^32 chunks; rekey the volume (goldilocks key rekey)")
	ErrNoFreeSlots   = errors.New("crypto: no free slot even after a flush")
	ErrWrongVolume   = errors.New("crypto: the backing store holds another volume")
	ErrStoreTooSmall = errors.New("crypto: backing store is smaller than the volume's layout")
)

// Layout is where things live in a backing store.
type Layout struct {
	Chunks, Slots, MapPages    uint64
	MapOffset, SlotOffset, End uint64
}

// LayoutFor computes the layout of a volume of size bytes.
func LayoutFor(size uint64) Layout {
	n := size / ChunkSize
	pages := (n + entriesPerPage - 1) / entriesPerPage
	l := Layout{Chunks: n, Slots: n + max(minSpare, n/32), MapPages: pages, MapOffset: headerArea}
	l.SlotOffset = l.MapOffset + 2*mapPageSize*pages
	l.End = l.SlotOffset + ChunkSize*l.Slots
	return l
}

func layoutOf(h *Header) Layout {
	l := LayoutFor(h.Size)
	l.Slots, l.MapOffset, l.SlotOffset = h.Slots, h.MapOffset, h.SlotOffset
	l.End = l.SlotOffset + ChunkSize*l.Slots
	return l
}

func (l Layout) pageOffset(page uint64, copyB uint8) int64 {
	return int64(l.MapOffset + 2*mapPageSize*page + mapPageSize*uint64(copyB))
}

func (l Layout) slotOffset(slot uint32) int64 {
	return int64(l.SlotOffset + ChunkSize*uint64(slot))
}

// entry is a chunk's map entry: slot+1 (0: unmapped) and the DARE header
// and tag of its package.
type entry struct {
	slot uint32
	key  uint8 // DEK slot that sealed it
	meta [32]byte
}

// Format writes a new, empty encrypted volume on store: a fresh random
// data key wrapped by kek's key keyName, both header copies, and every map
// page twice (all chunks unmapped).
func Format(ctx context.Context, store block.Device, uuid [16]byte, size uint64, suite byte, kek KEKProvider, keyName string) error {
	if size == 0 || size%ChunkSize != 0 || size/ChunkSize > 1<<32 {
		return fmt.Errorf("crypto: volume size %d is not a multiple of 4096 up to 16 TiB", size)
	}
	l := LayoutFor(size)
	if uint64(store.Size()) < l.End {
		return fmt.Errorf("%w: %d bytes, need %d", ErrStoreTooSmall, store.Size(), l.End)
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
		Generation: 1, UUID: uuid, Size: size, ChunkSize: ChunkSize, Suite: suite,
		Slots: l.Slots, MapOffset: l.MapOffset, SlotOffset: l.SlotOffset,
		KEK: KeyRef{Provider: kek.Name(), Name: keyName, Version: version}, DEK: [2][]byte{wrapped},
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err != nil {
		return err
	}
	buf := make([]byte, 256*mapPageSize)
	for p := uint64(0); p < l.MapPages; {
		n := min(uint64(len(buf)/(2*mapPageSize)), l.MapPages-p)
		for i := uint64(0); i < n; i++ {
			for c := 0; c < 2; c++ {
				pg := buf[(2*i+uint64(c))*mapPageSize:][:mapPageSize]
				clear(pg)
				sealMapPage(pg, 0, p+i)
			}
		}
		if _, err := store.WriteAt(buf[:2*n*mapPageSize], l.pageOffset(p, 0)); err != nil {
			return fmt.Errorf("writing the chunk map: %w", err)
		}
		p += n
	}
	for c := 0; c < 2; c++ {
		h.Generation = uint64(2 - c)
		b, err := h.Marshal(mac)
		if err != nil {
			return err
		}
		if _, err := store.WriteAt(b, int64(c)*HeaderBlockSize); err != nil {
			return fmt.Errorf("writing the header: %w", err)
		}
	}
	return store.Flush()
}

// sealMapPage sets a map page's generation, index and checksum.
func sealMapPage(pg []byte, gen, index uint64) {
	binary.LittleEndian.PutUint64(pg[0:], gen)
	binary.LittleEndian.PutUint32(pg[8:], uint32(index))
	binary.LittleEndian.PutUint32(pg[12:], mapPageCRC(pg))
}

func mapPageCRC(pg []byte) uint32 {
	c := crc32.Update(0, castagnoli, pg[:12])
	return crc32.Update(c, castagnoli, pg[mapPageHdr:])
}

// parseMapPage checks a map page and returns its generation.
func parseMapPage(pg []byte, index uint64) (uint64, bool) {
	if binary.LittleEndian.Uint32(pg[8:]) != uint32(index) || binary.LittleEndian.Uint32(pg[12:]) != mapPageCRC(pg) {
		return 0, false
	}
	return binary.LittleEndian.Uint64(pg[0:]), true
}

// Volume is an open encrypted volume: a block.Device whose chunks are
// sealed into a backing store by copy-on-write (FORMAT.md).
type Volume struct {
	name  string
	uuid  [16]byte
	log   *slog.Logger
	store block.Device
	lay   Layout
	size  int64

	// sealers[k] opens chunks whose entry names DEK slot k (nil: empty
	// slot); sealSlot is the slot new seals use.
	sealers  [2]atomic.Pointer[Sealer]
	sealSlot atomic.Uint32

	keyMu sync.Mutex // one rotation or rekey at a time

	h    headerState
	deks [2]*secret // guarded by h.mu

	bgFlush  atomic.Bool // a background flush is running
	bgWG     sync.WaitGroup
	seals    atomic.Uint64 // nonces used, counted from the reservation at open
	reserved atomic.Uint64 // header's nonce reservation
	warned   atomic.Bool

	locks [1024]sync.RWMutex // chunk i is guarded by locks[i%1024]

	flushMu sync.Mutex // one flush at a time

	mu       sync.Mutex // guards the map state below
	cur      []entry    // current map, in memory
	dur      []uint32   // slot+1 of each chunk in the durable map
	pageGen  []uint64   // generation of each page's current copy
	pageCopy []uint8    // which copy (0 A, 1 B) is current
	dirty    []bool     // page changed since the last flush snapshot
	nDirty   int
	free     []uint32 // free slots, a stack
	pending  []retired
	flushing bool

	bufs sync.Pool // *chunkBuf
}

type retired struct {
	chunk uint64
	slot  uint32 // slot+1
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

// headerOf reads and checks a volume's header: the current copy, its
// UUID, provider and MAC (with the active DEK, which it returns unwrapped).
func headerOf(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (h *Header, which int, dek []byte, err error) {
	var ab [2 * HeaderBlockSize]byte
	if _, err := store.ReadAt(ab[:], 0); err != nil {
		return nil, 0, nil, fmt.Errorf("volume %s: reading the header: %w", name, err)
	}
	h, which, err = PickHeader(ab[:HeaderBlockSize], ab[HeaderBlockSize:])
	if err != nil {
		return nil, 0, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	if _, err := ParseHeader(ab[(1-which)*HeaderBlockSize:][:HeaderBlockSize]); err != nil {
		// Normal after a crash during a header update; else tampering.
		log.Warn("integrity warning: a volume header copy is damaged; using the other", "event", "integrity_warning",
			"volume", name, "copy", "AB"[1-which:2-which], "err", err)
	}
	if h.UUID != uuid {
		return nil, 0, nil, fmt.Errorf("volume %s: %w", name, ErrWrongVolume)
	}
	if h.KEK.Provider != kek.Name() {
		return nil, 0, nil, fmt.Errorf("volume %s: its key is in provider %q, not %q", name, h.KEK.Provider, kek.Name())
	}
	dek, err = kek.Unwrap(ctx, h.KEK, uuid, h.DEK[h.Active])
	if err != nil {
		return nil, 0, nil, fmt.Errorf("volume %s: unwrapping the data key (%s key %s v%d): %w", name, h.KEK.Provider, h.KEK.Name, h.KEK.Version, err)
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err == nil {
		err = VerifyHeaderMAC(ab[which*HeaderBlockSize:][:HeaderBlockSize], mac)
	}
	if err != nil {
		clear(dek)
		return nil, 0, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return h, which, dek, nil
}

// Open opens the encrypted volume on store, checking that it is the volume
// with this uuid. name is for errors and logs. A volume whose rekey was
// interrupted opens with both data keys and seals under the new one.
func Open(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (*Volume, error) {
	h, which, dek, err := headerOf(ctx, store, name, uuid, kek, log)
	if err != nil {
		return nil, err
	}
	l := layoutOf(h)
	v := &Volume{
		name: name, uuid: uuid, log: log, store: store, lay: l,
		size: int64(h.Size), h: headerState{store: store, name: name, hdr: h, which: which},
		cur: make([]entry, l.Chunks), dur: make([]uint32, l.Chunks),
		pageGen: make([]uint64, l.MapPages), pageCopy: make([]uint8, l.MapPages), dirty: make([]bool, l.MapPages),
		bufs: sync.Pool{New: func() any { return new(chunkBuf) }},
	}
	v.h.macKey, err = HeaderMACKey(dek, uuid)
	if err == nil {
		err = v.installKey(h.Active, dek, h.Suite)
	}
	if err == nil && h.Rekeying() {
		var next []byte
		if next, err = kek.Unwrap(ctx, h.KEK, uuid, h.DEK[1-h.Active]); err != nil {
			err = fmt.Errorf("volume %s: unwrapping the new data key of an interrupted rekey: %w", name, err)
		} else {
			err = v.installKey(1-h.Active, next, h.Suite)
			log.Warn("volume has an interrupted rekey; resume it with goldilocks key rekey", "volume", name,
				"cursor", h.RekeyCursor, "chunks", l.Chunks)
		}
	}
	if err == nil && uint64(store.Size()) < l.End {
		err = fmt.Errorf("volume %s: %w", name, ErrStoreTooSmall)
	}
	if err == nil {
		err = v.loadMap()
	}
	if err != nil {
		v.freeKeys()
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	v.seals.Store(h.NonceReserved) // never undercount: assume every reserved nonce was used
	v.reserved.Store(h.NonceReserved)
	return v, nil
}

// installKey makes dek (zeroed here) the key of DEK slot k and, since
// the newest key installed seals, the sealing slot.
func (v *Volume) installKey(k byte, dek []byte, suite byte) error {
	s, err := NewSealer(dek, suite)
	if err != nil {
		clear(dek)
		return err
	}
	v.deks[k] = newSecret(dek)
	v.sealers[k].Store(s)
	v.sealSlot.Store(uint32(k))
	return nil
}

func (v *Volume) freeKeys() {
	for k := range v.deks {
		v.sealers[k].Store(nil)
		v.deks[k].free()
		v.deks[k] = nil
	}
}

func (v *Volume) loadMap() error {
	l := v.lay
	used := make([]bool, l.Slots)
	pair := make([]byte, 2*mapPageSize)
	for p := uint64(0); p < l.MapPages; p++ {
		if _, err := v.store.ReadAt(pair, l.pageOffset(p, 0)); err != nil {
			return fmt.Errorf("reading map page %d: %w", p, err)
		}
		ga, okA := parseMapPage(pair[:mapPageSize], p)
		gb, okB := parseMapPage(pair[mapPageSize:], p)
		if okA != okB {
			// Normal for the pages a crash interrupted in a flush; else
			// tampering (the older copy's values are legal, but old).
			v.log.Warn("integrity warning: a chunk map page copy is damaged; using the other", "event", "integrity_warning",
				"volume", v.name, "page", p)
		}
		var pg []byte
		switch {
		case okA && (!okB || ga >= gb):
			pg, v.pageGen[p], v.pageCopy[p] = pair[:mapPageSize], ga, 0
		case okB:
			pg, v.pageGen[p], v.pageCopy[p] = pair[mapPageSize:], gb, 1
		default:
			return fmt.Errorf("%w: both copies of page %d are damaged", ErrMapCorrupt, p)
		}
		for i := uint64(0); i < entriesPerPage; i++ {
			c := p*entriesPerPage + i
			if c >= l.Chunks {
				break
			}
			e := pg[mapPageHdr+i*mapEntrySize:][:mapEntrySize]
			slot := binary.LittleEndian.Uint32(e)
			if slot == 0 {
				continue
			}
			if uint64(slot) > l.Slots || used[slot-1] {
				return fmt.Errorf("%w: chunk %d names slot %d", ErrMapCorrupt, c, slot-1)
			}
			if e[4] > 1 || v.sealers[e[4]].Load() == nil {
				return fmt.Errorf("%w: chunk %d names DEK slot %d, which holds no key", ErrMapCorrupt, c, e[4])
			}
			used[slot-1] = true
			v.cur[c].slot = slot
			v.cur[c].key = e[4]
			copy(v.cur[c].meta[:], e[8:])
			v.dur[c] = slot
		}
	}
	for s := int64(l.Slots) - 1; s >= 0; s-- {
		if !used[s] {
			v.free = append(v.free, uint32(s))
		}
	}
	return nil
}

// Size is the logical size.
func (v *Volume) Size() int64 { return v.size }

// Header returns a copy of the current header (for `volume info`).
func (v *Volume) Header() Header {
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	return *v.h.hdr.Clone()
}

// Seals is the number of nonces counted against the data key.
func (v *Volume) Seals() uint64 { return v.seals.Load() }

func (v *Volume) lock(c uint64) *sync.RWMutex { return &v.locks[c%uint64(len(v.locks))] }

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
// with ErrChunkAuth, naming the chunk, and is logged.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	return pieces(off, len(p), func(c uint64, in, lo, hi int) error {
		l := v.lock(c)
		l.RLock()
		defer l.RUnlock()
		if hi-lo == ChunkSize {
			return v.readChunk(c, p[lo:hi], b)
		}
		if err := v.readChunk(c, b.pt[:], b); err != nil {
			return err
		}
		copy(p[lo:hi], b.pt[in:])
		return nil
	})
}

// readChunk opens chunk c into dst (4096 bytes). Callers hold its lock.
func (v *Volume) readChunk(c uint64, dst []byte, b *chunkBuf) error {
	v.mu.Lock()
	e := v.cur[c]
	v.mu.Unlock()
	if e.slot == 0 {
		clear(dst)
		return nil
	}
	copy(b.pkg[:HeaderSize], e.meta[:16])
	if _, err := v.store.ReadAt(b.pkg[HeaderSize:HeaderSize+ChunkSize], v.lay.slotOffset(e.slot-1)); err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	copy(b.pkg[HeaderSize+ChunkSize:], e.meta[16:])
	s := v.sealers[e.key].Load()
	if s == nil {
		clear(dst)
		return fmt.Errorf("volume %s chunk %d: sealed under DEK slot %d, which holds no key: %w", v.name, c, e.key, ErrChunkAuth)
	}
	if _, err := s.Open(dst[:0], uint32(c), b.pkg[:]); err != nil {
		clear(dst)
		v.log.Error("integrity failure: chunk failed authentication", "event", "integrity_failure", "volume", v.name, "chunk", c, "slot", e.slot-1)
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, ErrChunkAuth)
	}
	return nil
}

// WriteAt writes plaintext; partial chunks are read, modified and written
// under the chunk's lock.
func (v *Volume) WriteAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	return pieces(off, len(p), func(c uint64, in, lo, hi int) error {
		l := v.lock(c)
		l.Lock()
		defer l.Unlock()
		if hi-lo == ChunkSize {
			return v.writeChunk(c, p[lo:hi], b)
		}
		if err := v.readChunk(c, b.pt[:], b); err != nil {
			return err
		}
		copy(b.pt[in:], p[lo:hi])
		return v.writeChunk(c, b.pt[:], b)
	})
}

// writeChunk seals pt as chunk c into a free slot and maps it. Callers
// hold the chunk's lock.
func (v *Volume) writeChunk(c uint64, pt []byte, b *chunkBuf) error {
	if err := v.countSeal(); err != nil {
		return err
	}
	slot, err := v.allocSlot()
	if err != nil {
		return err
	}
	k := v.sealSlot.Load()
	pkg, err := v.sealers[k].Load().Seal(b.pkg[:0], uint32(c), pt)
	if err == nil {
		_, err = v.store.WriteAt(pkg[HeaderSize:HeaderSize+ChunkSize], v.lay.slotOffset(slot))
	}
	if err != nil {
		v.mu.Lock()
		v.free = append(v.free, slot)
		v.mu.Unlock()
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	e := entry{slot: slot + 1, key: uint8(k)}
	copy(e.meta[:16], pkg[:HeaderSize])
	copy(e.meta[16:], pkg[HeaderSize+ChunkSize:])
	v.mu.Lock()
	v.replaceLocked(c, e)
	v.mu.Unlock()
	return nil
}

// replaceLocked maps chunk c to e and retires its previous slot.
func (v *Volume) replaceLocked(c uint64, e entry) {
	old := v.cur[c].slot
	v.cur[c] = e
	if p := c / entriesPerPage; !v.dirty[p] {
		v.dirty[p] = true
		v.nDirty++
	}
	if old == 0 {
		return
	}
	switch {
	case v.flushing:
		v.pending = append(v.pending, retired{c, old}) // the flush may be writing it
	case old != v.dur[c]:
		v.free = append(v.free, old-1) // never durable: free at once
	}
	// else: the durable map still names it; the next flush frees it.
}

// allocSlot takes a free slot. When the pool runs low it starts a flush in
// the background, so that superseded slots come back before writers must
// wait for one.
func (v *Volume) allocSlot() (uint32, error) {
	for try := 0; try < 2; try++ {
		v.mu.Lock()
		if n := len(v.free); n > 0 {
			s := v.free[n-1]
			v.free = v.free[:n-1]
			low := uint64(n) < (v.lay.Slots-v.lay.Chunks)/2 && !v.flushing
			v.mu.Unlock()
			if low && v.bgFlush.CompareAndSwap(false, true) {
				v.bgWG.Add(1)
				go func() {
					defer v.bgWG.Done()
					defer v.bgFlush.Store(false)
					if err := v.Flush(); err != nil {
						v.log.Error("background flush failed", "volume", v.name, "err", err)
					}
				}()
			}
			return s, nil
		}
		v.mu.Unlock()
		if err := v.Flush(); err != nil { // reclaims superseded slots
			return 0, err
		}
	}
	return 0, fmt.Errorf("volume %s: %w", v.name, ErrNoFreeSlots)
}

// countSeal counts a nonce against the data key, raising the header's
// reservation before it is passed, so a crash never undercounts.
func (v *Volume) countSeal() error {
	n := v.seals.Add(1)
	if n > nonceLimit {
		return fmt.Errorf("volume %s: %w", v.name, ErrNonceBudget)
	}
	if n > nonceWarnAt && v.warned.CompareAndSwap(false, true) {
		v.log.Warn("data key nears its nonce budget; rekey the volume with goldilocks key rekey", "volume", v.name, "seals", n)
	}
	if n <= v.reserved.Load() {
		return nil
	}
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	if n <= v.reserved.Load() {
		return nil
	}
	h := *v.h.hdr
	h.NonceReserved = min(n+nonceReserveStep, nonceLimit)
	if err := v.h.writeLocked(&h); err != nil {
		return err
	}
	v.reserved.Store(h.NonceReserved)
	return nil
}

// headerState is a volume's current header and where the next update
// goes: the older copy.
type headerState struct {
	mu     sync.Mutex // guards the fields below; serialises header writes
	store  block.Device
	name   string
	hdr    *Header
	which  int
	macKey []byte
}

// writeLocked writes h to the older header copy and syncs it.
func (s *headerState) writeLocked(h *Header) error {
	h.Generation = s.hdr.Generation + 1
	b, err := h.Marshal(s.macKey)
	if err != nil {
		return err
	}
	other := 1 - s.which
	if _, err := s.store.WriteAt(b, int64(other)*HeaderBlockSize); err != nil {
		return fmt.Errorf("volume %s: writing the header: %w", s.name, err)
	}
	if err := s.store.Flush(); err != nil {
		return fmt.Errorf("volume %s: syncing the header: %w", s.name, err)
	}
	s.hdr, s.which = h, other
	return nil
}

// Flush makes every completed write durable: slots first, then the map
// pages they changed, each to its older copy (FORMAT.md, "Writes, FLUSH
// and crash recovery").
func (v *Volume) Flush() error {
	v.flushMu.Lock()
	defer v.flushMu.Unlock()

	v.mu.Lock()
	if v.nDirty == 0 {
		v.mu.Unlock()
		return v.store.Flush()
	}
	type snap struct {
		page  uint64
		buf   []byte
		slots []uint32
	}
	snaps := make([]snap, 0, v.nDirty)
	for p, d := range v.dirty {
		if !d {
			continue
		}
		pg := make([]byte, mapPageSize)
		s := snap{page: uint64(p), buf: pg}
		for i := uint64(0); i < entriesPerPage; i++ {
			c := uint64(p)*entriesPerPage + i
			if c >= v.lay.Chunks {
				break
			}
			e := v.cur[c]
			s.slots = append(s.slots, e.slot)
			if e.slot != 0 {
				o := pg[mapPageHdr+i*mapEntrySize:]
				binary.LittleEndian.PutUint32(o, e.slot)
				o[4] = e.key
				copy(o[8:40], e.meta[:])
			}
		}
		sealMapPage(pg, v.pageGen[p]+1, uint64(p))
		snaps = append(snaps, s)
		v.dirty[p] = false
	}
	v.nDirty = 0
	v.flushing = true
	v.mu.Unlock()

	err := v.store.Flush() // the slots the snapshot names are durable
	for i := 0; err == nil && i < len(snaps); i++ {
		s := snaps[i]
		_, err = v.store.WriteAt(s.buf, v.lay.pageOffset(s.page, 1-v.pageCopy[s.page]))
	}
	if err == nil {
		err = v.store.Flush()
	}

	v.mu.Lock()
	defer v.mu.Unlock()
	v.flushing = false
	if err != nil {
		for _, s := range snaps { // try again at the next flush
			if !v.dirty[s.page] {
				v.dirty[s.page] = true
				v.nDirty++
			}
		}
		return fmt.Errorf("volume %s: flush: %w", v.name, err)
	}
	for _, s := range snaps {
		v.pageGen[s.page]++
		v.pageCopy[s.page] = 1 - v.pageCopy[s.page]
		for i, slot := range s.slots {
			c := s.page*entriesPerPage + uint64(i)
			old := v.dur[c]
			v.dur[c] = slot
			if old != 0 && old != slot && old != v.cur[c].slot {
				v.free = append(v.free, old-1)
			}
		}
	}
	keep := v.pending[:0]
	for _, r := range v.pending {
		switch {
		case r.slot == v.dur[r.chunk]:
			// Durable now; freed when a later flush supersedes it.
		case r.slot == v.cur[r.chunk].slot:
			keep = append(keep, r) // cannot happen; kept to be safe
		default:
			v.free = append(v.free, r.slot-1)
		}
	}
	v.pending = keep
	return nil
}

// unmap makes whole chunks [first, last] read as zeros.
func (v *Volume) unmap(first, last uint64) {
	for c := first; c <= last; c++ {
		l := v.lock(c)
		l.Lock()
		v.mu.Lock()
		if v.cur[c].slot != 0 {
			v.replaceLocked(c, entry{})
		}
		v.mu.Unlock()
		l.Unlock()
	}
}

// Zero makes the range read as zeros: whole chunks are unmapped (nothing
// is written and no ciphertext stays referenced), partial ones rewritten.
// NO_HOLE is not needed: an unmapped chunk costs no space to keep zero.
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
	v.unmap(uint64(first), uint64(last-1))
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
	v.mu.Lock()
	defer v.mu.Unlock()
	end := off + length
	for off < end && maxN > 0 {
		c := off / ChunkSize
		hole := v.cur[c].slot == 0
		n := min(end, (c+1)*ChunkSize) - off
		for next := (c + 1) * ChunkSize; next < end && (v.cur[next/ChunkSize].slot == 0) == hole; next += ChunkSize {
			n = min(end, next+ChunkSize) - off
		}
		var fl uint32
		if hole {
			fl = block.ExtentHole | block.ExtentZero
		}
		dst = append(dst, block.Extent{Length: n, Flags: fl})
		off += n
		maxN--
	}
	return dst, nil
}

// Close flushes, forgets the data key and closes the store.
func (v *Volume) Close() error {
	v.bgWG.Wait()
	err := v.Flush()
	v.h.mu.Lock()
	v.freeKeys()
	v.h.mu.Unlock()
	if cerr := v.store.Close(); err == nil {
		err = cerr
	}
	return err
}
