package crypto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
)

// epochLimit is how many chunks one subkey seals (FORMAT.md, "Nonces"):
// 2^31 random 95-bit nonces collide with probability ≤ 2^-34.
const epochLimit = 1 << 31

// ErrNonceBudget: every seal epoch of the data key is used (2^63 seals);
// rekey the volume. No disk gets there; kept so that the bound is checked.
var ErrNonceBudget = errors.New("crypto: the data key has used all its seal epochs; rekey the volume (goldilocks key rekey)")

// subkeyInfo is the HKDF info of epoch e's chunk subkey.
func subkeyInfo(e uint32) string {
	var b [len("goldilocks chunk v2") + 4]byte
	n := copy(b[:], "goldilocks chunk v2")
	binary.LittleEndian.PutUint32(b[n:], e)
	return string(b[:])
}

// keyring holds a volume's data keys (by DEK slot) and the sealers of
// their subkeys, derived on first use and kept up to a bound.
type keyring struct {
	uuid  [16]byte
	suite byte

	mu   sync.Mutex // guards deks and cache
	deks [2]*secret
	// cache of sealers by (slot, epoch); the hot one is also in cur.
	cache map[sealerKey]*Sealer
	cur   atomic.Pointer[curSealer]
}

type sealerKey struct {
	slot  uint8
	epoch uint32
}

type curSealer struct {
	sealerKey
	s *Sealer
}

const maxSealers = 64

func newKeyring(uuid [16]byte, suite byte) *keyring {
	return &keyring{uuid: uuid, suite: suite, cache: make(map[sealerKey]*Sealer)}
}

// install makes dek (moved into locked memory; the slice is zeroed) the
// key of DEK slot k.
func (r *keyring) install(k uint8, dek []byte) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deks[k].free()
	r.deks[k] = newSecret(dek)
	r.dropLocked(k)
}

// remove forgets DEK slot k.
func (r *keyring) remove(k uint8) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deks[k].free()
	r.deks[k] = nil
	r.dropLocked(k)
}

func (r *keyring) dropLocked(k uint8) {
	for key := range r.cache {
		if key.slot == k {
			delete(r.cache, key)
		}
	}
	if c := r.cur.Load(); c != nil && c.slot == k {
		r.cur.Store(nil)
	}
}

// derive returns a key derived from DEK slot k with info (header and log
// MAC keys).
func (r *keyring) derive(k uint8, info string) ([]byte, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if k > 1 || r.deks[k] == nil {
		return nil, fmt.Errorf("crypto: DEK slot %d holds no key", k)
	}
	return volumeKey(r.deks[k].bytes(), r.uuid, info)
}

// sealer returns the sealer of epoch e under DEK slot k, or nil if the
// slot holds no key.
func (r *keyring) sealer(k uint8, e uint32) *Sealer {
	if c := r.cur.Load(); c != nil && c.slot == k && c.epoch == e {
		return c.s
	}
	key := sealerKey{k, e}
	r.mu.Lock()
	defer r.mu.Unlock()
	if s, ok := r.cache[key]; ok {
		r.cur.Store(&curSealer{key, s})
		return s
	}
	if k > 1 || r.deks[k] == nil {
		return nil
	}
	sub, err := volumeKey(r.deks[k].bytes(), r.uuid, subkeyInfo(e))
	if err != nil {
		return nil
	}
	s, err := NewSealer(sub, r.suite)
	clear(sub)
	if err != nil {
		return nil
	}
	if len(r.cache) >= maxSealers {
		for old := range r.cache { // evict one at random
			delete(r.cache, old)
			break
		}
	}
	r.cache[key] = s
	r.cur.Store(&curSealer{key, s})
	return s
}

func (r *keyring) free() {
	r.mu.Lock()
	defer r.mu.Unlock()
	for k := range r.deks {
		r.deks[k].free()
		r.deks[k] = nil
	}
	clear(r.cache)
	r.cur.Store(nil)
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
	if v.opt.Anchor != nil { // an older header put back must not rewind it
		if err := v.opt.Anchor.Advance(v.uuid, AnchorState{Generation: h.Generation, Epoch: h.Epoch}); err != nil {
			return fmt.Errorf("volume %s: %w", v.name, err)
		}
	}
	v.seal.Store(uint64(from+1) << 32)
	v.log.Info("seal epoch advanced", "volume", v.name, "epoch", from+1)
	return nil
}
