package crypto

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"goldilocks/audit"
	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// ErrKeysChanged is returned by SetWrapped when the header's wrapped keys
// are no longer the ones the caller rewrapped (a rekey started or ended
// meanwhile): read the header again and retry.
var ErrKeysChanged = errors.New("crypto: the volume's wrapped data keys changed meanwhile")

// KeyHeader is what key rotation needs of a volume: its header, and an
// atomic update of the wrapping of its data keys. Both an open Volume and
// a HeaderFile are one.
type KeyHeader interface {
	Header() Header
	SetWrapped(expect *Header, version uint32, deks [2][]byte) error
}

var (
	_ KeyHeader = (*Volume)(nil)
	_ KeyHeader = (*HeaderFile)(nil)
)

// setWrapped replaces the wrapped DEKs (same keys, new KEK version) if
// they are still the ones in expect.
func (s *headerState) setWrapped(expect *Header, version uint32, deks [2][]byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for k := range deks {
		if !bytes.Equal(s.hdr.DEK[k], expect.DEK[k]) || (len(deks[k]) == 0) != (len(expect.DEK[k]) == 0) {
			return fmt.Errorf("volume %s: %w", s.name, ErrKeysChanged)
		}
	}
	h := s.hdr.Clone()
	h.KEK.Version = version
	h.DEK = deks
	return s.writeLocked(h)
}

// SetWrapped records a new wrapping of the volume's data keys (rotation):
// deks[k] must wrap the same key as expect.DEK[k], under KEK version.
func (v *Volume) SetWrapped(expect *Header, version uint32, deks [2][]byte) error {
	return v.h.setWrapped(expect, version, deks)
}

// HeaderFile is an encrypted volume's header opened without its chunk map,
// for key rotation of a volume nobody has attached: checking the header's
// MAC needs the data key, which it keeps only until Close.
type HeaderFile struct {
	h   headerState
	dek *secret
}

// OpenHeader opens the header of the volume on store.
func OpenHeader(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (*HeaderFile, error) {
	h, dek, err := headerOf(ctx, store, name, uuid, kek, log)
	if err != nil {
		return nil, err
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err != nil {
		clear(dek)
		return nil, err
	}
	return &HeaderFile{h: headerState{store: store, name: name, hdr: h, macKey: mac}, dek: newSecret(dek)}, nil
}

// Header returns a copy of the header.
func (f *HeaderFile) Header() Header {
	f.h.mu.Lock()
	defer f.h.mu.Unlock()
	return *f.h.hdr.Clone()
}

// SetWrapped is Volume.SetWrapped for a volume that is not open.
func (f *HeaderFile) SetWrapped(expect *Header, version uint32, deks [2][]byte) error {
	return f.h.setWrapped(expect, version, deks)
}

// Close forgets the key and closes the store.
func (f *HeaderFile) Close() error {
	f.dek.free()
	clear(f.h.macKey)
	return f.h.store.Close()
}

// RekeyOptions tune Volume.Rekey.
type RekeyOptions struct {
	// Rate caps re-sealing at this many bytes per second; 0 is no cap.
	Rate int64
	// Progress, if set, is called now and then with chunks walked and the
	// volume's chunk count.
	Progress func(done, total uint64)

	every  uint64 // tests: chunks between checkpoints (0: rekeyCheckpoint)
	stopAt uint64 // tests: stop the walk there as a cancel would (0: never)
}

// rekeyCheckpoint is how far the walk goes between cursor updates: the map
// is flushed, then the cursor written (FORMAT.md, "Rekey").
const rekeyCheckpoint = 64 << 20 / ChunkSize

// Rekey gives the volume a new data key and re-seals every chunk under it
// while the volume keeps serving, resuming an interrupted rekey if there is
// one; at the end the old key is destroyed (FORMAT.md, "Rekey"). A
// cancelled ctx stops the walk at a consistent point: a later Rekey
// resumes it.
func (v *Volume) Rekey(ctx context.Context, kek KEKProvider, opt RekeyOptions) error {
	v.keyMu.Lock()
	defer v.keyMu.Unlock()
	if err := v.beginRekey(ctx, kek); err != nil {
		return err
	}
	v.h.mu.Lock()
	from := v.h.hdr.RekeyCursor
	v.h.mu.Unlock()
	if err := v.walk(ctx, from, opt); err != nil {
		return err
	}
	return v.finishRekey(ctx, kek)
}

// beginRekey wraps a new DEK into the inactive slot, unless a rekey is
// already in progress.
func (v *Volume) beginRekey(ctx context.Context, kek KEKProvider) error {
	v.h.mu.Lock()
	h := v.h.hdr.Clone()
	v.h.mu.Unlock()
	if h.Rekeying() {
		return nil
	}
	if h.KEK.Provider != kek.Name() {
		return fmt.Errorf("volume %s: its key is in provider %q, not %q", v.name, h.KEK.Provider, kek.Name())
	}
	dek := make([]byte, 32)
	if _, err := rand.Read(dek); err != nil {
		return err
	}
	wrapped, version, err := kek.Wrap(ctx, h.KEK.Name, v.uuid, dek)
	if err != nil {
		clear(dek)
		return fmt.Errorf("volume %s: wrapping the new data key with %s key %s: %w", v.name, kek.Name(), h.KEK.Name, err)
	}
	old := h.Active
	deks := h.DEK
	deks[1-old] = wrapped
	if version != h.KEK.Version { // both slots are wrapped by one version
		ks := []WrappedKey{{Volume: v.uuid, Version: h.KEK.Version, Wrapped: h.DEK[old]}}
		err := kek.Rewrap(ctx, h.KEK.Name, version, ks)
		if err == nil {
			err = ks[0].Err // a per-key failure (the whole call may succeed)
		}
		if err != nil {
			clear(dek)
			return fmt.Errorf("volume %s: rewrapping the data key to %s key %s v%d: %w", v.name, kek.Name(), h.KEK.Name, version, err)
		}
		deks[old] = ks[0].Wrapped
	}
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	if v.h.hdr.Rekeying() || !bytes.Equal(v.h.hdr.DEK[old], h.DEK[old]) { // rotated meanwhile
		clear(dek)
		return fmt.Errorf("volume %s: %w", v.name, ErrKeysChanged)
	}
	nh := v.h.hdr.Clone()
	nh.KEK.Version, nh.DEK, nh.RekeyCursor = version, deks, 0
	if err := v.h.writeLocked(nh); err != nil {
		clear(dek)
		return err
	}
	v.keys.install(1-old, dek)
	v.sealSlot.Store(uint32(1 - old))
	v.log.Info("rekey started", "event", audit.EvRekeyStart, "volume", v.name, "kek", nh.KEK.Name, "kek_version", version)
	return nil
}

// walk re-seals under the sealing slot every mapped chunk from chunk from
// on that names the other slot.
func (v *Volume) walk(ctx context.Context, from uint64, opt RekeyOptions) error {
	target := uint8(v.sealSlot.Load())
	total := v.geo.Chunks
	b := v.bufs.Get().(*chunkBuf)
	defer v.bufs.Put(b)
	start := time.Now()
	var resealed int64
	last := time.Now()
	every := opt.every
	if every == 0 {
		every = rekeyCheckpoint
	}
	if opt.Progress != nil {
		opt.Progress(from, total)
	}
	var (
		runs    [1]cowmap.Run
		pending bool // chunks re-sealed since the last checkpoint
	)
	for c := from; c < total; c++ {
		if c%every == 0 && c > from && pending {
			if err := v.checkpoint(c); err != nil {
				return err
			}
			pending = false
			v.log.Info("rekey progress", "event", audit.EvRekeyProgress, "volume", v.name, "cursor", c, "chunks", total)
		}
		if opt.stopAt != 0 && c == opt.stopAt {
			return context.Canceled
		}
		if c%256 == 0 {
			if err := ctx.Err(); err != nil {
				return err
			}
			if opt.Progress != nil && time.Since(last) > 200*time.Millisecond {
				opt.Progress(c, total)
				last = time.Now()
			}
			if opt.Rate > 0 {
				ahead := time.Duration(float64(resealed)/float64(opt.Rate)*float64(time.Second)) - time.Since(start)
				if ahead > 0 {
					select {
					case <-ctx.Done():
						return ctx.Err()
					case <-time.After(ahead):
					}
				}
			}
		}
		e, err := v.m.Lookup(c)
		if err != nil {
			return err
		}
		if !e.Mapped() {
			// Skip the unmapped run (never-written subtrees cost nothing),
			// up to the next place the loop acts on.
			rs, err := v.m.Runs(runs[:0], c, total, 1)
			if err != nil {
				return err
			}
			if len(rs) == 1 && !rs[0].Mapped {
				next := min(c+rs[0].Chunks, (c/every+1)*every, (c/256+1)*256)
				if opt.stopAt > c {
					next = min(next, opt.stopAt)
				}
				c = next - 1
			}
			continue
		}
		if e.KeySlot() == target {
			continue
		}
		done, err := v.reseal(c, target, b)
		if err != nil {
			return err
		}
		if done {
			resealed += ChunkSize
			pending = true
		}
	}
	if opt.Progress != nil {
		opt.Progress(total, total)
	}
	return v.checkpoint(total)
}

// reseal opens chunk c with its key and seals it under slot target.
func (v *Volume) reseal(c uint64, target uint8, b *chunkBuf) (bool, error) {
	l := v.lock(c)
	l.Lock()
	defer l.Unlock()
	e, err := v.m.Lookup(c)
	if err != nil {
		return false, err
	}
	if !e.Mapped() || e.KeySlot() == target { // a write or trim beat us to it
		return false, nil
	}
	if err := v.readChunk(c, b.pt[:], b); err != nil {
		return false, err
	}
	err = v.writeChunk(c, b.pt[:], b)
	clear(b.pt[:])
	return err == nil, err
}

// checkpoint makes the walk so far durable, then records it in the header.
func (v *Volume) checkpoint(cursor uint64) error {
	if err := v.Flush(); err != nil {
		return err
	}
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	h := v.h.hdr.Clone()
	h.RekeyCursor = cursor
	return v.h.writeLocked(h)
}

// finishRekey makes the new slot active and destroys the old key, once no
// chunk in the durable map names the old slot: the map is checkpointed
// (so no log block MACed under the old key is needed again), the header
// switches keys, and the provider destroys the old wrapped DEK.
func (v *Volume) finishRekey(ctx context.Context, kek KEKProvider) error {
	target := uint8(v.sealSlot.Load())
	for c := uint64(0); c < v.geo.Chunks; {
		runs, err := v.m.Runs(nil, c, v.geo.Chunks, 1024)
		if err != nil {
			return err
		}
		for _, r := range runs {
			if r.Mapped {
				for i := c; i < c+r.Chunks; i++ {
					e, err := v.m.Lookup(i)
					if err != nil {
						return err
					}
					if e.Mapped() && e.KeySlot() != target {
						return fmt.Errorf("volume %s: chunk %d still under the old key after the walk", v.name, i)
					}
				}
			}
			c += r.Chunks
		}
	}
	if err := v.Flush(); err != nil {
		return err
	}
	logKey, err := v.keys.derive(target, infoLogMAC)
	if err != nil {
		return err
	}
	mac, err := v.keys.derive(target, infoHeaderMAC)
	if err != nil {
		return err
	}
	old := 1 - target
	var oldWrapped []byte
	var ref KeyRef
	err = v.m.SwitchKey(logKey, func(st cowmap.State) error {
		v.h.mu.Lock()
		defer v.h.mu.Unlock()
		h := v.h.hdr.Clone()
		oldWrapped, ref = h.DEK[old], h.KEK
		h.Seq, h.Root, h.LogStart = st.Seq, st.Root, st.LogStart
		h.Active, h.DEK[old], h.RekeyCursor = target, nil, 0
		prev := v.h.macKey
		v.h.macKey = mac
		if err := v.h.writeLocked(h); err != nil {
			v.h.macKey = prev
			return err
		}
		clear(prev)
		return nil
	})
	if err != nil {
		return err
	}
	v.keys.remove(old)
	if d, ok := kek.(KeyDestroyer); ok {
		if err := d.Destroy(ctx, ref, v.uuid, oldWrapped); err != nil {
			return fmt.Errorf("volume %s: the rekey finished, but destroying the old data key failed: %w", v.name, err)
		}
	}
	v.log.Info("rekey finished; the old data key is destroyed", "event", audit.EvRekeyFinish, "volume", v.name, "chunks", uint64(v.size)/ChunkSize)
	return nil
}

// RekeyState reports a rekey in progress: the durable cursor and the
// chunk count.
func (v *Volume) RekeyState() (rekeying bool, cursor, total uint64) {
	v.h.mu.Lock()
	defer v.h.mu.Unlock()
	return v.h.hdr.Rekeying(), v.h.hdr.RekeyCursor, v.geo.Chunks
}
