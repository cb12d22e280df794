package volume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"goldilocks/audit"
	"goldilocks/crypto"
	"goldilocks/internal/block"
)

// Snapshots of encrypted volumes (crypto/SNAPSHOTS.md): each is a store
// of its own in the data dir's snapshots/ directory, named by the
// volume's record in the registry.

const (
	snapshotsDir = "snapshots"
	// MaxSnapshots per volume.
	MaxSnapshots = 64
)

// ErrSnapshotName: NAME@SNAP malformed.
var ErrSnapshotName = errors.New("invalid snapshot: write NAME@SNAP, SNAP of 1-64 of A-Z a-z 0-9 . _ - starting with a letter or digit")

// SplitSnapshot splits an export name NAME@SNAP; ok is false for a plain
// volume name.
func SplitSnapshot(export string) (vol, snap string, ok bool) {
	return strings.Cut(export, "@")
}

// ParseSnapshot checks NAME@SNAP.
func ParseSnapshot(s string) (vol, snap string, err error) {
	vol, snap, ok := SplitSnapshot(s)
	if !ok || !nameRE.MatchString(vol) || !snapNameRE.MatchString(snap) {
		return "", "", fmt.Errorf("%q: %w", s, ErrSnapshotName)
	}
	return vol, snap, nil
}

// SnapshotOpener opens a volume to snapshot it: a running gateway's
// Exports (the attached volume's device), or LocalOpener.
type SnapshotOpener interface {
	OpenVolume(v Volume) (*crypto.Volume, func(), error)
}

// Snapshots creates and deletes snapshots of a registry's volumes.
type Snapshots struct {
	Reg  *Registry
	Open SnapshotOpener
	Log  *slog.Logger
	// Record, if set, puts each operation on the audit trail before it
	// starts; if it cannot, the operation is refused (fail closed).
	Record func(audit.Event) error
	Who    string
	mu     sync.Mutex // one create or delete at a time in this process
}

// SnapshotStatus is one snapshot as `volume snapshot list` shows it.
type SnapshotStatus struct {
	Volume  string    `json:"volume"`
	Name    string    `json:"name"`
	Created time.Time `json:"created"`
	Seq     uint64    `json:"seq"`
	// Bytes the store takes on disk (its file's allocated blocks):
	// the chunks written since the snapshot, before the next one.
	Bytes int64 `json:"bytes"`
}

// CreateResult says what a create did.
type CreateResult struct {
	Snapshot SnapshotRecord `json:"snapshot"`
	// Pause is how long writes to the volume waited: the flush point.
	Pause time.Duration `json:"pause_ns"`
}

func (s *Snapshots) record(e audit.Event) error {
	if s.Record == nil {
		return nil
	}
	e.Identity, e.Decision = s.Who, "allow"
	if err := s.Record(e); err != nil {
		return fmt.Errorf("refused: the audit log cannot be written (%w)", err)
	}
	return nil
}

func (s *Snapshots) volume(name string) (Volume, error) {
	v, err := s.Reg.Get(name)
	if err != nil {
		return v, err
	}
	if !v.Encrypted {
		return v, fmt.Errorf("volume %s: snapshots need an encrypted volume", name)
	}
	if IsRemote(v) {
		return v, fmt.Errorf("volume %s: snapshots of a volume on %s are not supported yet (crypto/SNAPSHOTS.md, \"Cost and limits\")", name, v.Backing)
	}
	return v, nil
}

// Create takes snapshot snap of volume name.
func (s *Snapshots) Create(ctx context.Context, name, snap string) (CreateResult, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	var res CreateResult
	if !snapNameRE.MatchString(snap) {
		return res, fmt.Errorf("%s@%s: %w", name, snap, ErrSnapshotName)
	}
	v, err := s.volume(name)
	if err != nil {
		return res, err
	}
	if len(v.Snapshots) >= MaxSnapshots {
		return res, fmt.Errorf("volume %s: it has %d snapshots, the most it may have", name, len(v.Snapshots))
	}
	if slices.ContainsFunc(v.Snapshots, func(r SnapshotRecord) bool { return r.Name == snap }) {
		return res, fmt.Errorf("volume %s snapshot %s: %w", name, snap, crypto.ErrSnapshotExists)
	}
	if err := s.record(audit.Event{Type: audit.EvSnapshotCreate, Volume: name, Reason: "requested",
		Details: map[string]any{"snapshot": snap}}); err != nil {
		return res, err
	}
	cv, release, err := s.Open.OpenVolume(v)
	if err != nil {
		return res, err
	}
	defer release()
	h := cv.Header()
	kek, err := s.Reg.KEK(h.KEK.Provider)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	sid := uuid.New()
	rec := SnapshotRecord{Name: snap, UUID: sid.String(), Backing: filepath.Join(snapshotsDir, v.UUID+"-"+sid.String()+".img")}
	path := filepath.Join(s.Reg.Dir(), rec.Backing)
	store, err := s.Reg.createSnapshotStore(ctx, v, rec, path, h.Suite, kek, h.KEK.Name, s.Log)
	if err != nil {
		return res, fmt.Errorf("volume %s snapshot %s: %w", name, snap, err)
	}
	res.Pause, err = cv.CreateSnapshot(snap, store, func(seq uint64) error {
		rec.Created, rec.Seq = time.Now().UTC(), seq
		return s.Reg.update(func(vols []Volume) ([]Volume, error) {
			i := slices.IndexFunc(vols, func(x Volume) bool { return x.Name == name && x.UUID == v.UUID })
			if i < 0 {
				return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
			}
			vols[i].Snapshots = append(slices.Clone(vols[i].Snapshots), rec)
			return vols, nil
		})
	})
	if err != nil {
		store.Close()
		s.Reg.removeSnapshotStore(rec, path)
		return res, err
	}
	res.Snapshot = rec
	s.Log.Info("snapshot created", "volume", name, "snapshot", snap, "seq", rec.Seq, "pause_ms", float64(res.Pause.Microseconds())/1000)
	return res, nil
}

// Delete removes snapshot snap of volume name (crypto.Volume.DeleteSnapshot).
func (s *Snapshots) Delete(ctx context.Context, name, snap string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, err := s.volume(name)
	if err != nil {
		return err
	}
	i := slices.IndexFunc(v.Snapshots, func(r SnapshotRecord) bool { return r.Name == snap })
	if i < 0 {
		return fmt.Errorf("volume %s snapshot %s: %w", name, snap, crypto.ErrNoSnapshot)
	}
	rec := v.Snapshots[i]
	if clones, err := s.Reg.clonesOf(name, snap); err != nil {
		return err
	} else if len(clones) > 0 {
		return fmt.Errorf("volume %s snapshot %s: %w: clone %s reads through it (delete the clones first)", name, snap, crypto.ErrSnapshotBusy, clones[0])
	}
	if err := s.record(audit.Event{Type: audit.EvSnapshotDelete, Volume: name, Reason: "requested",
		Details: map[string]any{"snapshot": snap}}); err != nil {
		return err
	}
	cv, release, err := s.Open.OpenVolume(v)
	if err != nil {
		return err
	}
	defer release()
	store, err := cv.DeleteSnapshot(snap, func() error {
		return s.Reg.update(func(vols []Volume) ([]Volume, error) {
			i := slices.IndexFunc(vols, func(x Volume) bool { return x.Name == name && x.UUID == v.UUID })
			if i < 0 {
				return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
			}
			for _, x := range vols { // checked again under the lock: a clone made meanwhile
				if x.Base != nil && x.Base.Volume == name && x.Base.Snapshot == snap {
					return nil, fmt.Errorf("volume %s snapshot %s: %w: clone %s reads through it", name, snap, crypto.ErrSnapshotBusy, x.Name)
				}
			}
			vols[i].Snapshots = slices.DeleteFunc(slices.Clone(vols[i].Snapshots), func(r SnapshotRecord) bool { return r.Name == snap })
			return vols, nil
		})
	})
	if err != nil {
		return err
	}
	_ = store // closed by DeleteSnapshot
	// Its data key is destroyed as a shred destroys a volume's: a copy of
	// the store kept anywhere no longer opens.
	var kerr error
	if kerr = s.Reg.destroyKeys(snapshotStore(v, rec)); kerr != nil {
		s.Log.Error("snapshot deleted, but its data key could not be destroyed", "volume", name, "snapshot", snap, "err", kerr)
	}
	s.Reg.removeSnapshotStore(rec, filepath.Join(s.Reg.Dir(), rec.Backing))
	s.Log.Info("snapshot deleted", "volume", name, "snapshot", snap)
	if kerr != nil {
		return fmt.Errorf("volume %s snapshot %s: deleted, but its data key was not destroyed: %w", name, snap, kerr)
	}
	return nil
}

// List lists the snapshots of the named volumes (all if none is named).
func (s *Snapshots) List(names ...string) ([]SnapshotStatus, error) {
	var vols []Volume
	if len(names) == 0 {
		all, err := s.Reg.List()
		if err != nil {
			return nil, err
		}
		vols = all
	}
	for _, n := range names {
		v, err := s.Reg.Get(n)
		if err != nil {
			return nil, err
		}
		vols = append(vols, v)
	}
	out := []SnapshotStatus{}
	for _, v := range vols {
		for _, r := range v.Snapshots {
			st := SnapshotStatus{Volume: v.Name, Name: r.Name, Created: r.Created, Seq: r.Seq}
			var fi syscall.Stat_t
			if err := syscall.Stat(filepath.Join(s.Reg.Dir(), r.Backing), &fi); err == nil {
				st.Bytes = fi.Blocks * 512
			}
			out = append(out, st)
		}
	}
	return out, nil
}

// createSnapshotStore makes a new, empty store for snapshot rec of v at
// path (a sparse file of the volume's layout) and opens it.
func (r *Registry) createSnapshotStore(ctx context.Context, v Volume, rec SnapshotRecord, path string, suite byte, kek crypto.KEKProvider, keyName string, log *slog.Logger) (*crypto.Volume, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_RDWR, 0o600)
	if err != nil {
		return nil, err
	}
	err = f.Truncate(int64(crypto.LayoutFor(uint64(v.Size)).End))
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	dev, err := block.OpenFile(path, false)
	if err == nil {
		err = dev.Lock()
		if err != nil {
			dev.Close()
		}
	}
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	id := uuid.MustParse(rec.UUID)
	if err := crypto.Format(ctx, dev, id, uint64(v.Size), suite, kek, keyName); err != nil {
		dev.Close()
		os.Remove(path)
		return nil, err
	}
	cv, err := r.openSnapshotStore(v, rec, dev, kek, log)
	if err != nil {
		os.Remove(path)
		return nil, err
	}
	return cv, nil
}

// openSnapshotStore opens a snapshot's store on dev (closed on error).
// Its anchor advances at every commit: no rollback window
// (crypto/SNAPSHOTS.md, "Against the adversary"). It is the data dir's
// anchor file only, even for a volume whose key is in Vault: a store
// lives in the data dir and does not move between gateways (what Vault's
// copy of an anchor is for), and a Vault round trip at every commit with
// copies would make Vault's availability the volume's.
func (r *Registry) openSnapshotStore(v Volume, rec SnapshotRecord, dev block.Device, kek crypto.KEKProvider, log *slog.Logger) (*crypto.Volume, error) {
	anchor := r.Anchor()
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	cv, err := crypto.Open(context.Background(), dev, v.Name+"@"+rec.Name, uuid.MustParse(rec.UUID), kek, log,
		crypto.Options{Anchor: anchor, AnchorEveryFlush: true, Cache: r.cache, Pools: r.pools, NoAlign: r.noAlign})
	if err != nil {
		dev.Close()
		return nil, err
	}
	return cv, nil
}

// loadSnapshots opens v's snapshot stores and hands them to cv.
func (r *Registry) loadSnapshots(v Volume, cv *crypto.Volume, kek crypto.KEKProvider, log *slog.Logger) error {
	if len(v.Snapshots) == 0 {
		return nil
	}
	var snaps []crypto.Snapshot
	fail := func(err error) error {
		for _, s := range snaps {
			s.Store.Close()
		}
		return err
	}
	for _, rec := range v.Snapshots {
		dev, err := block.OpenFile(filepath.Join(r.dir, rec.Backing), false)
		if err == nil {
			if err = dev.Lock(); err != nil {
				dev.Close()
			}
		}
		if err != nil {
			return fail(fmt.Errorf("volume %s snapshot %s: %w", v.Name, rec.Name, err))
		}
		st, err := r.openSnapshotStore(v, rec, dev, kek, log)
		if err != nil {
			return fail(fmt.Errorf("volume %s snapshot %s: %w", v.Name, rec.Name, err))
		}
		snaps = append(snaps, crypto.Snapshot{Name: rec.Name, Store: st})
	}
	if err := cv.LoadSnapshots(snaps); err != nil {
		return fail(err)
	}
	return nil
}

// snapshotStores describes v's snapshot stores as volumes named
// NAME@SNAP, for the key operations that read or rewrap their headers.
func snapshotStores(v Volume) []Volume {
	var out []Volume
	for _, sn := range v.Snapshots {
		out = append(out, snapshotStore(v, sn))
	}
	return out
}

// snapshotStore describes snapshot sn's store as a volume named NAME@SNAP.
func snapshotStore(v Volume, sn SnapshotRecord) Volume {
	return Volume{Name: v.Name + "@" + sn.Name, UUID: sn.UUID, Size: v.Size, Encrypted: true,
		Backing: sn.Backing, Created: sn.Created, KEK: v.KEK}
}

// removeSnapshotStore removes a snapshot's store and its anchor.
func (r *Registry) removeSnapshotStore(rec SnapshotRecord, path string) {
	os.Remove(path)
	if a := r.Anchor(); a != nil {
		a.Remove(uuid.MustParse(rec.UUID))
	}
}

// Clone creates volume name as a clone of snapshot snap of volume vol:
// an encrypted volume of its own (a new data key under vol's KEK) that
// reads what it has not written from the snapshot (crypto/SNAPSHOTS.md,
// "Clones"). O(1): nothing is copied.
func (s *Snapshots) Clone(vol, snap, name string, labels map[string]string) (Volume, error) {
	v, err := s.volume(vol)
	if err != nil {
		return Volume{}, err
	}
	i := slices.IndexFunc(v.Snapshots, func(r SnapshotRecord) bool { return r.Name == snap })
	if i < 0 {
		return Volume{}, fmt.Errorf("volume %s snapshot %s: %w", vol, snap, crypto.ErrNoSnapshot)
	}
	h, err := s.Reg.Header(v)
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: %w", vol, err)
	}
	kek := h.KEK.Provider + ":" + h.KEK.Name
	if err := s.record(audit.Event{Type: audit.EvVolumeClone, Volume: name, Reason: "requested",
		Details: map[string]any{"base": vol + "@" + snap}}); err != nil {
		return Volume{}, err
	}
	// Create checks the base again under the registry lock (update's
	// check of the whole file), so a delete racing this cannot leave a
	// clone of nothing.
	return s.Reg.Create(CreateOptions{Name: name, Size: v.Size, Encrypted: true, KEK: kek, Suite: h.Suite, Labels: labels,
		Base: &BaseRef{Volume: vol, Snapshot: snap, UUID: v.Snapshots[i].UUID}})
}

// clonesOf lists the volumes that read through snapshot snap of vol.
func (r *Registry) clonesOf(vol, snap string) ([]string, error) {
	all, err := r.List()
	if err != nil {
		return nil, err
	}
	var out []string
	for _, v := range all {
		if v.Base != nil && v.Base.Volume == vol && v.Base.Snapshot == snap {
			out = append(out, v.Name)
		}
	}
	return out, nil
}
