package v1

import (
	"context"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"log/slog"
	"sync"
	"sync/atomic"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/block"
)

// Format-1 chunk map constants (the format-1 FORMAT.md, "Layout" and "The
// chunk map"). Part of the on-disk format.
const (
	mapPageSize    = 4096
	mapPageHdr     = 16
	mapEntrySize   = 40
	entriesPerPage = (mapPageSize - mapPageHdr) / mapEntrySize // 102
	headerArea     = 2 * crypto.HeaderBlockSize
)

// layout is where a format-1 store keeps its map and slots, as its
// header says.
type layout struct {
	chunks, slots, mapPages uint64
	mapOffset, slotOffset   uint64
	end                     uint64
}

// layoutOf checks a header's offsets against each other: the map after
// the headers, the slots after the map, every chunk with a slot.
func layoutOf(h *Header) (layout, error) {
	n := h.Size / crypto.ChunkSize
	l := layout{
		chunks: n, slots: h.Slots, mapPages: (n + entriesPerPage - 1) / entriesPerPage,
		mapOffset: h.MapOffset, slotOffset: h.SlotOffset,
	}
	if l.mapOffset < headerArea || l.slots < n || l.slots >= 1<<32 || l.slotOffset%crypto.ChunkSize != 0 ||
		l.slotOffset < l.mapOffset+2*mapPageSize*l.mapPages {
		return layout{}, fmt.Errorf("%w: map at %d, %d slots at %d for %d chunks", crypto.ErrHeaderCorrupt, l.mapOffset, l.slots, l.slotOffset, n)
	}
	l.end = l.slotOffset + crypto.ChunkSize*l.slots
	return l, nil
}

func (l layout) pageAt(page uint64, copyB int) int64 {
	return int64(l.mapOffset + 2*mapPageSize*page + mapPageSize*uint64(copyB))
}

func (l layout) slotAt(slot uint32) int64 {
	return int64(l.slotOffset + crypto.ChunkSize*uint64(slot))
}

// entry is a chunk's map entry: slot+1 (0: unmapped), the DEK slot that
// sealed it, and its package's DARE header (16 bytes) and tag (16).
type entry struct {
	slot uint32
	key  uint8
	meta [32]byte
}

// Volume is an open format-1 volume, read-only: its map is loaded at Open
// and never changes. ReadAt is safe for concurrent use.
type Volume struct {
	name  string
	log   *slog.Logger
	store block.Device
	hdr   *Header
	lay   layout
	size  int64

	sealers [2]atomic.Pointer[crypto.Sealer] // by DEK slot; nil: empty slot, or closed
	cur     []entry                          // the map, one entry per chunk; read-only after Open
	mapped  uint64                           // chunks with a slot

	bufs sync.Pool // *chunkBuf
}

type chunkBuf struct {
	pkg [crypto.PackageSize]byte
	pt  [crypto.ChunkSize]byte
}

// Open reads the format-1 volume on store, checking that it is the volume
// with this uuid (name is for errors and logs): the header (both copies:
// the valid one with the higher generation), the active data key
// unwrapped by kek, the header's MAC under it, then the chunk map (each
// page's newer valid copy). A volume whose rekey was interrupted (both
// DEK slots hold a key) opens with both keys: each chunk opens with the
// key its entry names. A damaged copy of the header or of a map page,
// while the other copy is good, is an integrity warning on log (nil:
// none), as it was in format 1 (normal after a crash in a flush).
//
// The store is only read; Close closes it.
func Open(ctx context.Context, store block.Device, name string, uuid [16]byte, kek crypto.KEKProvider, log *slog.Logger) (*Volume, error) {
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	var ab [2 * crypto.HeaderBlockSize]byte
	if _, err := store.ReadAt(ab[:], 0); err != nil {
		return nil, fmt.Errorf("volume %s: reading the header: %w", name, err)
	}
	h, which, err := PickHeader(ab[:crypto.HeaderBlockSize], ab[crypto.HeaderBlockSize:])
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	if _, err := ParseHeader(ab[(1-which)*crypto.HeaderBlockSize:][:crypto.HeaderBlockSize]); err != nil {
		log.Warn("integrity warning: a format-1 volume header copy is damaged; using the other", "event", audit.EvIntegrityWarning,
			"volume", name, "copy", "AB"[1-which:2-which], "err", err)
	}
	if h.UUID != uuid {
		return nil, fmt.Errorf("volume %s: %w", name, crypto.ErrWrongVolume)
	}
	if h.KEK.Provider != kek.Name() {
		return nil, fmt.Errorf("volume %s: its key is in provider %q, not %q", name, h.KEK.Provider, kek.Name())
	}
	l, err := layoutOf(h)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	v := &Volume{
		name: name, log: log, store: store, hdr: h, lay: l, size: int64(h.Size),
		bufs: sync.Pool{New: func() any { return new(chunkBuf) }},
	}
	dek, err := kek.Unwrap(ctx, h.KEK, uuid, h.DEK[h.Active])
	if err != nil {
		return nil, fmt.Errorf("volume %s: unwrapping the data key (%s key %s v%d): %w", name, h.KEK.Provider, h.KEK.Name, h.KEK.Version, err)
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err == nil {
		err = VerifyHeaderMAC(ab[which*crypto.HeaderBlockSize:][:crypto.HeaderBlockSize], mac)
	}
	clear(mac)
	if err == nil {
		err = v.installKey(h.Active, dek)
	}
	clear(dek)
	if err == nil && h.Rekeying() {
		var next []byte
		if next, err = kek.Unwrap(ctx, h.KEK, uuid, h.DEK[1-h.Active]); err != nil {
			err = fmt.Errorf("unwrapping the new data key of an interrupted rekey: %w", err)
		} else {
			err = v.installKey(1-h.Active, next)
			clear(next)
		}
	}
	if err == nil && uint64(store.Size()) < l.end {
		err = fmt.Errorf("%w: %d bytes, the layout needs %d", crypto.ErrStoreTooSmall, store.Size(), l.end)
	}
	if err == nil {
		err = v.loadMap()
	}
	if err != nil {
		v.forgetKeys()
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return v, nil
}

func (v *Volume) installKey(k byte, dek []byte) error {
	s, err := crypto.NewSealer(dek, v.hdr.Suite)
	if err != nil {
		return err
	}
	v.sealers[k].Store(s)
	return nil
}

// forgetKeys drops the sealers, the only holders of the data keys.
func (v *Volume) forgetKeys() {
	for k := range v.sealers {
		v.sealers[k].Store(nil)
	}
}

// mapPageCRC is a map page's checksum: CRC-32C of bytes 0..12 and
// 16..4096.
func mapPageCRC(pg []byte) uint32 {
	c := crc32.Update(0, castagnoli, pg[:12])
	return crc32.Update(c, castagnoli, pg[mapPageHdr:])
}

// parseMapPage checks a map page copy and returns its generation.
func parseMapPage(pg []byte, index uint64) (uint64, bool) {
	if binary.LittleEndian.Uint32(pg[8:]) != uint32(index) || binary.LittleEndian.Uint32(pg[12:]) != mapPageCRC(pg) {
		return 0, false
	}
	return binary.LittleEndian.Uint64(pg[0:]), true
}

// loadMap reads every map page's current copy: the valid one with the
// higher generation.
func (v *Volume) loadMap() error {
	l := v.lay
	v.cur = make([]entry, l.chunks)
	used := make([]bool, l.slots)
	pair := make([]byte, 2*mapPageSize)
	for p := uint64(0); p < l.mapPages; p++ {
		if _, err := v.store.ReadAt(pair, l.pageAt(p, 0)); err != nil {
			return fmt.Errorf("reading map page %d: %w", p, err)
		}
		ga, okA := parseMapPage(pair[:mapPageSize], p)
		gb, okB := parseMapPage(pair[mapPageSize:], p)
		if okA != okB {
			v.log.Warn("integrity warning: a format-1 chunk map page copy is damaged; using the other", "event", audit.EvIntegrityWarning,
				"volume", v.name, "page", p)
		}
		var pg []byte
		switch {
		case okA && (!okB || ga >= gb):
			pg = pair[:mapPageSize]
		case okB:
			pg = pair[mapPageSize:]
		default:
			return fmt.Errorf("%w: both copies of page %d are damaged", ErrMapCorrupt, p)
		}
		for i := uint64(0); i < entriesPerPage; i++ {
			c := p*entriesPerPage + i
			if c >= l.chunks {
				break
			}
			e := pg[mapPageHdr+i*mapEntrySize:][:mapEntrySize]
			slot := binary.LittleEndian.Uint32(e)
			if slot == 0 {
				continue
			}
			if uint64(slot) > l.slots || used[slot-1] {
				return fmt.Errorf("%w: chunk %d names slot %d", ErrMapCorrupt, c, slot-1)
			}
			if e[4] > 1 || v.sealers[e[4]].Load() == nil {
				return fmt.Errorf("%w: chunk %d names DEK slot %d, which holds no key", ErrMapCorrupt, c, e[4])
			}
			used[slot-1] = true
			v.cur[c] = entry{slot: slot, key: e[4]}
			copy(v.cur[c].meta[:], e[8:40])
			v.mapped++
		}
	}
	return nil
}

// Size is the logical size in bytes.
func (v *Volume) Size() int64 { return v.size }

// Chunks is the number of 4096-byte chunks.
func (v *Volume) Chunks() uint64 { return v.lay.chunks }

// MappedChunks is the number of chunks that have ciphertext.
func (v *Volume) MappedChunks() uint64 { return v.mapped }

// Mapped reports whether chunk c has ciphertext; an unmapped chunk (never
// written, or trimmed) reads as zeros, and a copy may skip it.
func (v *Volume) Mapped(c uint64) bool { return c < uint64(len(v.cur)) && v.cur[c].slot != 0 }

// Header returns a copy of the header in use.
func (v *Volume) Header() Header { return *v.hdr.Clone() }

// ReadAt reads plaintext. A chunk that fails authentication fails the read
// with an error wrapping crypto.ErrChunkAuth that names the volume and the
// chunk, and is logged as an integrity failure.
func (v *Volume) ReadAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(v.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	b := v.bufs.Get().(*chunkBuf)
	defer func() {
		clear(b.pt[:]) // no plaintext stays in the pool
		v.bufs.Put(b)
	}()
	done := 0
	for done < len(p) {
		c, in := uint64(off)/crypto.ChunkSize, int(uint64(off)%crypto.ChunkSize)
		m := min(len(p)-done, crypto.ChunkSize-in)
		if m == crypto.ChunkSize {
			if err := v.readChunk(c, p[done:done+m], b); err != nil {
				return done, err
			}
		} else {
			if err := v.readChunk(c, b.pt[:], b); err != nil {
				return done, err
			}
			copy(p[done:done+m], b.pt[in:])
		}
		done += m
		off += int64(m)
	}
	return done, nil
}

// readChunk opens chunk c into dst (4096 bytes).
func (v *Volume) readChunk(c uint64, dst []byte, b *chunkBuf) error {
	e := &v.cur[c]
	if e.slot == 0 {
		clear(dst)
		return nil
	}
	s := v.sealers[e.key].Load()
	if s == nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, block.ErrClosed)
	}
	pkg := b.pkg[:]
	copy(pkg[:crypto.HeaderSize], e.meta[:16])
	if _, err := v.store.ReadAt(pkg[crypto.HeaderSize:crypto.HeaderSize+crypto.ChunkSize], v.lay.slotAt(e.slot-1)); err != nil {
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, err)
	}
	copy(pkg[crypto.HeaderSize+crypto.ChunkSize:], e.meta[16:])
	if _, err := s.Open(dst[:0], uint32(c), pkg); err != nil {
		clear(dst)
		v.log.Error("integrity failure: chunk failed authentication", "event", audit.EvIntegrityFailure, "volume", v.name,
			"chunk", c, "slot", e.slot-1, "format", Version)
		return fmt.Errorf("volume %s chunk %d: %w", v.name, c, crypto.ErrChunkAuth)
	}
	return nil
}

// WriteAt refuses: format 1 is read only.
func (v *Volume) WriteAt([]byte, int64) (int, error) { return 0, block.ErrReadOnly }

// Flush has nothing to do.
func (v *Volume) Flush() error { return nil }

// Close forgets the data keys and closes the store.
func (v *Volume) Close() error {
	v.forgetKeys()
	return v.store.Close()
}

var _ block.Device = (*Volume)(nil)
