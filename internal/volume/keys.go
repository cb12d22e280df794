package volume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync"

	"goldilocks/audit"
	"goldilocks/crypto"
)

// KeyOpener opens what key operations work on. A running gateway's opens
// through its Exports, sharing an attached volume's device with the VM; a
// command with no gateway to ask opens backing stores itself (LocalOpener).
type KeyOpener interface {
	// OpenKeys opens an encrypted volume's header for rotation.
	OpenKeys(v Volume) (crypto.KeyHeader, func(), error)
	// OpenVolume opens an encrypted volume for a rekey.
	OpenVolume(v Volume) (*crypto.Volume, func(), error)
}

// Keys runs key rotation and rekey over a registry's volumes.
type Keys struct {
	Reg  *Registry
	Open KeyOpener
	Log  *slog.Logger
	// Record, if set, puts each key operation on the audit trail before it
	// starts; if it cannot, the operation is refused (fail closed).
	Record func(audit.Event) error
	// Who names the requester on the audit trail.
	Who string
}

// record puts a key operation on record, or refuses it.
func (k *Keys) record(e audit.Event) error {
	if k.Record == nil {
		return nil
	}
	e.Identity, e.Decision = k.Who, "allow"
	if err := k.Record(e); err != nil {
		return fmt.Errorf("refused: the audit log cannot be written (%w)", err)
	}
	return nil
}

// RotateOptions select and tune a rotation.
type RotateOptions struct {
	// Keys are "[provider:]name" KEK names; with All, every KEK that wraps
	// a volume.
	Keys []string `json:"keys,omitempty"`
	All  bool     `json:"all,omitempty"`
	// RewrapOnly makes no new KEK version: it rewraps what is not yet at
	// the newest (finishing an interrupted rotation).
	RewrapOnly bool `json:"rewrap_only,omitempty"`
	// MinVersion fails the rotation if any selected volume's data key is
	// still wrapped by an older KEK version afterwards.
	MinVersion uint32 `json:"min_version,omitempty"`
	// Progress is called after each volume with volumes done and total.
	Progress func(done, total int) `json:"-"`
}

// RotateResult says what a rotation did.
type RotateResult struct {
	Keys    []RotatedKey    `json:"keys"`
	Volumes []RotatedVolume `json:"volumes"`
}

// RotatedKey is a KEK and its newest version after the rotation.
type RotatedKey struct {
	Provider string `json:"provider"`
	Key      string `json:"key"`
	Version  uint32 `json:"version"`
}

// RotatedVolume is one volume's data key wrapping, before and after.
type RotatedVolume struct {
	Volume   string `json:"volume"`
	Provider string `json:"provider"`
	Key      string `json:"key"`
	From     uint32 `json:"from_version"`
	To       uint32 `json:"to_version"`
	Error    string `json:"error,omitempty"`
}

// ErrRotationIncomplete is returned when some volume could not be
// rewrapped, or stays under a version older than MinVersion.
var ErrRotationIncomplete = errors.New("rotation incomplete")

type keyGroup struct {
	provider, key string
	vols          []Volume
	from          map[string]uint32
}

// groups reads every encrypted volume's header (no key needed) and groups
// the volumes by the KEK that wraps their data key.
func (k *Keys) groups() (map[string]*keyGroup, error) {
	vols, err := k.Reg.List()
	if err != nil {
		return nil, err
	}
	gs := map[string]*keyGroup{}
	for _, v := range vols {
		if !v.Encrypted {
			continue
		}
		h, err := k.Reg.Header(v)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		id := h.KEK.Provider + ":" + h.KEK.Name
		g := gs[id]
		if g == nil {
			g = &keyGroup{provider: h.KEK.Provider, key: h.KEK.Name, from: map[string]uint32{}}
			gs[id] = g
		}
		g.vols = append(g.vols, v)
		g.from[v.Name] = h.KEK.Version
		// A snapshot's store has a data key of its own under the same
		// KEK: it is rewrapped with the volume's (as NAME@SNAP).
		for _, sv := range snapshotStores(v) {
			sh, err := k.Reg.Header(sv)
			if err != nil {
				return nil, fmt.Errorf("volume %s: %w", sv.Name, err)
			}
			g.vols = append(g.vols, sv)
			g.from[sv.Name] = sh.KEK.Version
		}
	}
	return gs, nil
}

// Rotate makes a new version of each selected KEK and rewraps every data
// key it wraps (no chunk is rewritten); online, idempotent with
// RewrapOnly, and safe to repeat after a crash at any point (FORMAT.md of
// crypto, "Key rotation").
func (k *Keys) Rotate(ctx context.Context, o RotateOptions) (RotateResult, error) {
	var res RotateResult
	gs, err := k.groups()
	if err != nil {
		return res, err
	}
	var sel []*keyGroup
	if o.All {
		for _, g := range gs {
			sel = append(sel, g)
		}
	}
	for _, name := range o.Keys {
		prov, key, ok := strings.Cut(name, ":")
		if !ok {
			prov, key = "", name
		}
		var found []*keyGroup
		for _, g := range gs {
			if g.key == key && (prov == "" || g.provider == prov) {
				found = append(found, g)
			}
		}
		switch {
		case len(found) > 1:
			return res, fmt.Errorf("key %s: in both providers; name it local:%s or vault:%s", key, key, key)
		case len(found) == 0 && prov == "":
			return res, fmt.Errorf("key %s: no volume uses it; name it local:%s or vault:%s to rotate it anyway", key, key, key)
		case len(found) == 0:
			found = []*keyGroup{{provider: prov, key: key, from: map[string]uint32{}}}
		}
		for _, g := range found {
			if !slices.Contains(sel, g) {
				sel = append(sel, g)
			}
		}
	}
	if len(sel) == 0 {
		return res, errors.New("no key selected: name one or give --all")
	}
	if err := k.record(audit.Event{Type: audit.EvKeyRotate, Reason: "requested", Details: map[string]any{
		"keys": strings.Join(o.Keys, ","), "all": o.All, "rewrap_only": o.RewrapOnly, "min_version": int64(o.MinVersion)}}); err != nil {
		return res, err
	}
	slices.SortFunc(sel, func(a, b *keyGroup) int { return strings.Compare(a.provider+":"+a.key, b.provider+":"+b.key) })
	total := 0
	for _, g := range sel {
		total += len(g.vols)
	}
	done := 0
	var failed []string
	for _, g := range sel {
		kek, err := k.Reg.KEK(g.provider)
		if err != nil {
			return res, fmt.Errorf("key %s:%s: %w", g.provider, g.key, err)
		}
		var newest uint32
		if !o.RewrapOnly {
			if newest, err = kek.Rotate(ctx, g.key); err != nil {
				return res, fmt.Errorf("key %s:%s: rotating: %w", g.provider, g.key, err)
			}
			k.Log.Info("key rotated", "event", audit.EvKeyRotate, "identity", k.Who, "decision", "allow", "provider", g.provider, "key", g.key, "version", newest)
		}
		vr, err := k.rewrapGroup(ctx, kek, g, newest, func() {
			done++
			if o.Progress != nil {
				o.Progress(done, total)
			}
		})
		if err != nil {
			return res, err
		}
		latest := newest
		for _, r := range vr {
			latest = max(latest, r.To)
			if r.Error != "" {
				failed = append(failed, r.Volume+": "+r.Error)
			} else if r.To < o.MinVersion {
				failed = append(failed, fmt.Sprintf("%s: still under %s:%s v%d, below --min-version %d", r.Volume, g.provider, g.key, r.To, o.MinVersion))
			}
		}
		res.Keys = append(res.Keys, RotatedKey{Provider: g.provider, Key: g.key, Version: latest})
		res.Volumes = append(res.Volumes, vr...)
	}
	if len(failed) > 0 {
		return res, fmt.Errorf("%w: %d volume(s): %s", ErrRotationIncomplete, len(failed), strings.Join(failed, "; "))
	}
	return res, nil
}

// openConcurrency is how many volumes a rotation opens at once (each open
// may unwrap its key at the provider).
const openConcurrency = 8

type opened struct {
	v       Volume
	kh      crypto.KeyHeader
	release func()
	h       crypto.Header
	err     error
}

// rewrapGroup rewraps the data keys of one KEK's volumes to version newest
// (0: whatever is newest), in one batch at the provider.
func (k *Keys) rewrapGroup(ctx context.Context, kek crypto.KEKProvider, g *keyGroup, newest uint32, tick func()) ([]RotatedVolume, error) {
	ops := make([]opened, len(g.vols))
	var wg sync.WaitGroup
	sem := make(chan struct{}, openConcurrency)
	for i, v := range g.vols {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer wg.Done()
			defer func() { <-sem }()
			o := &ops[i]
			o.v = v
			o.kh, o.release, o.err = k.Open.OpenKeys(v)
			if o.err == nil {
				o.h = o.kh.Header()
			}
		}()
	}
	wg.Wait()
	defer func() {
		for _, o := range ops {
			if o.release != nil {
				o.release()
			}
		}
	}()
	out := make([]RotatedVolume, len(ops))
	done := make([]bool, len(ops))
	finish := func(i int) { done[i] = true; tick() }
	for i := range ops {
		o := &ops[i]
		out[i] = RotatedVolume{Volume: o.v.Name, Provider: g.provider, Key: g.key, From: g.from[o.v.Name], To: g.from[o.v.Name]}
		if o.err == nil {
			out[i].From, out[i].To = o.h.KEK.Version, o.h.KEK.Version
		}
	}
	// A volume whose rekey starts or ends meanwhile (ErrKeysChanged) is
	// read again and retried, at most three times.
	for attempt := 0; attempt < 4; attempt++ {
		var keys []crypto.WrappedKey
		idx := make([][2]int, len(ops)) // index in keys of each volume's slots, -1 none
		for i := range ops {
			o := &ops[i]
			idx[i] = [2]int{-1, -1}
			switch {
			case done[i]:
				continue
			case o.err != nil:
				finish(i)
				continue
			case o.h.KEK.Provider != g.provider || o.h.KEK.Name != g.key:
				o.err = fmt.Errorf("its key is now %s:%s", o.h.KEK.Provider, o.h.KEK.Name)
				finish(i)
				continue
			case newest != 0 && o.h.KEK.Version == newest:
				finish(i) // already there: nothing to do (idempotent)
				continue
			}
			for s, w := range o.h.DEK {
				if len(w) > 0 {
					idx[i][s] = len(keys)
					keys = append(keys, crypto.WrappedKey{Volume: o.h.UUID, Version: o.h.KEK.Version, Wrapped: w})
				}
			}
		}
		if len(keys) == 0 {
			break
		}
		if err := kek.Rewrap(ctx, g.key, newest, keys); err != nil {
			return nil, fmt.Errorf("key %s:%s: rewrapping %d data keys: %w", g.provider, g.key, len(keys), err)
		}
		for i := range ops {
			o := &ops[i]
			if done[i] || idx[i] == [2]int{-1, -1} {
				continue
			}
			var deks [2][]byte
			version := uint32(0)
			for s, j := range idx[i] {
				switch {
				case j < 0, o.err != nil:
				case keys[j].Err != nil:
					o.err = keys[j].Err
				case version != 0 && keys[j].Version != version:
					o.err = fmt.Errorf("its two data keys came back under versions %d and %d", version, keys[j].Version)
				default:
					deks[s], version = keys[j].Wrapped, keys[j].Version
				}
			}
			if o.err == nil && version != o.h.KEK.Version { // else: rewrap-only, already newest
				o.err = o.kh.SetWrapped(&o.h, version, deks)
				if errors.Is(o.err, crypto.ErrKeysChanged) && attempt < 3 {
					o.h, o.err = o.kh.Header(), nil // a rekey moved: again
					continue
				}
				if o.err == nil {
					out[i].To = version
				}
			}
			finish(i)
		}
	}
	for i, o := range ops {
		if o.err != nil {
			out[i].Error = o.err.Error()
			k.Log.Error("rewrapping a volume's data key failed", "volume", o.v.Name, "err", o.err)
		}
	}
	return out, nil
}

// RekeyOptions tune a rekey.
type RekeyOptions struct {
	Rate     int64                    `json:"rate,omitempty"` // bytes per second; 0 no cap
	Progress func(done, total uint64) `json:"-"`              // chunks
}

// Rekey gives volume name a new data key and re-encrypts every chunk,
// online, resuming an interrupted rekey.
func (k *Keys) Rekey(ctx context.Context, name string, o RekeyOptions) error {
	v, err := k.Reg.Get(name)
	if err != nil {
		return err
	}
	if !v.Encrypted {
		return fmt.Errorf("volume %s: not encrypted: nothing to rekey", name)
	}
	h, err := k.Reg.Header(v)
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	kek, err := k.Reg.KEK(h.KEK.Provider)
	if err != nil {
		return fmt.Errorf("volume %s: %w", name, err)
	}
	if err := k.record(audit.Event{Type: audit.EvRekeyStart, Volume: name, Reason: "requested",
		Details: map[string]any{"rate": o.Rate, "resume": h.Rekeying(), "cursor": h.RekeyCursor, "chunks": uint64(v.Size) / crypto.ChunkSize}}); err != nil {
		return err
	}
	vol, release, err := k.Open.OpenVolume(v)
	if err != nil {
		return err
	}
	defer release()
	return vol.Rekey(ctx, kek, crypto.RekeyOptions{Rate: o.Rate, Progress: o.Progress})
}

// KeyStatus is one volume's key state, read from its header without a key.
type KeyStatus struct {
	Volume        string `json:"volume"`
	Provider      string `json:"provider"`
	Key           string `json:"key"`
	Version       uint32 `json:"version"`
	Rekeying      bool   `json:"rekeying"`
	RekeyCursor   uint64 `json:"rekey_cursor,omitempty"`
	Chunks        uint64 `json:"chunks"`
	FormatVersion int    `json:"format_version"`
	SealEpoch     uint32 `json:"seal_epoch"`
	Seals         uint64 `json:"seals"` // upper bound: full epochs count 2^31
}

// Status reports the key state of the named volumes (all encrypted ones
// if none is named).
func (k *Keys) Status(names ...string) ([]KeyStatus, error) {
	var vols []Volume
	if len(names) == 0 {
		all, err := k.Reg.List()
		if err != nil {
			return nil, err
		}
		for _, v := range all {
			if v.Encrypted {
				vols = append(vols, v)
				vols = append(vols, snapshotStores(v)...)
			}
		}
	}
	for _, n := range names {
		v, err := k.Reg.Get(n)
		if err != nil {
			return nil, err
		}
		if !v.Encrypted {
			return nil, fmt.Errorf("volume %s: not encrypted", n)
		}
		vols = append(vols, v)
	}
	out := make([]KeyStatus, 0, len(vols))
	for _, v := range vols {
		h, err := k.Reg.Header(v)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		s := KeyStatus{
			Volume: v.Name, Provider: h.KEK.Provider, Key: h.KEK.Name, Version: h.KEK.Version,
			Rekeying: h.Rekeying(), Chunks: h.Size / crypto.ChunkSize, FormatVersion: crypto.HeaderVersion,
			SealEpoch: h.Epoch, Seals: h.Seals(),
		}
		if s.Rekeying {
			s.RekeyCursor = h.RekeyCursor
		}
		out = append(out, s)
	}
	return out, nil
}

// LocalOpener opens backing stores in this process, locked against any
// other (a gateway that has the volume attached answers on its control
// socket instead).
type LocalOpener struct {
	Reg *Registry
	Log *slog.Logger
}

// OpenKeys opens a volume's header only (its map is not read).
func (l LocalOpener) OpenKeys(v Volume) (crypto.KeyHeader, func(), error) {
	f, err := l.Reg.openStore(v, false)
	if err != nil {
		return nil, nil, err
	}
	id, err := v.UUIDBytes()
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	h, err := l.Reg.Header(v)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	kek, err := l.Reg.KEK(h.KEK.Provider)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	hf, err := crypto.OpenHeader(context.Background(), f, v.Name, id, kek, l.Log)
	if err != nil {
		f.Close()
		return nil, nil, err
	}
	return hf, func() { hf.Close() }, nil
}

// OpenVolume opens the whole volume.
func (l LocalOpener) OpenVolume(v Volume) (*crypto.Volume, func(), error) {
	dev, err := l.Reg.OpenDevice(v, l.Log)
	if err != nil {
		return nil, nil, err
	}
	cv, ok := dev.(*crypto.Volume)
	if !ok {
		dev.Close()
		return nil, nil, fmt.Errorf("volume %s: not encrypted", v.Name)
	}
	return cv, func() { cv.Close() }, nil
}

// OpenKeys opens a volume's header for rotation through the gateway's
// shared devices: an attached volume's open device, or a new one that an
// attach arriving meanwhile shares. For NAME@SNAP (snapshotStores) it is
// the snapshot's store, which that device holds open.
func (e *Exports) OpenKeys(v Volume) (crypto.KeyHeader, func(), error) {
	if vol, snap, ok := SplitSnapshot(v.Name); ok {
		dev, release, err := e.acquire(vol)
		if err != nil {
			return nil, nil, err
		}
		cv, ok := dev.(*crypto.Volume)
		var st *crypto.Volume
		if ok {
			st, err = cv.SnapshotStore(snap)
		} else {
			err = fmt.Errorf("volume %s: not encrypted", vol)
		}
		if err != nil {
			release()
			return nil, nil, err
		}
		return st, release, nil
	}
	cv, release, err := e.OpenVolume(v)
	if err != nil {
		return nil, nil, err
	}
	return cv, release, nil
}

// OpenVolume opens an encrypted volume through the gateway's shared
// devices (see OpenKeys).
func (e *Exports) OpenVolume(v Volume) (*crypto.Volume, func(), error) {
	dev, release, err := e.acquire(v.Name)
	if err != nil {
		return nil, nil, err
	}
	cv, ok := dev.(*crypto.Volume)
	if !ok {
		release()
		return nil, nil, fmt.Errorf("volume %s: not encrypted", v.Name)
	}
	return cv, release, nil
}
