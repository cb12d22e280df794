package volume

// Upgrade, in stages (each a step of Registry.Upgrade):
//
//  1. check: an encrypted volume whose header claims format 1, not
//     attached (the backing file's lock), no rollback anchor;
//  2. read: the old store through the format-1 reader (crypto/v1), read
//     only, its lock held to the end;
//  3. write: a new store in BACKING.upgrade (a leftover of an interrupted
//     run is discarded first), formatted with a new data key, every
//     mapped chunk copied, flushed every 64 MiB, detached cleanly, synced;
//  4. switch: rename over the old backing file, sync the directory; then
//     the anchor, the registry's key version, and the old data key at its
//     provider.
//
// Until the rename the old file is untouched and is the volume; after it
// the new one is. A crash anywhere before the rename leaves a partial
// BACKING.upgrade that the next run discards.

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"syscall"

	"goldilocks/crypto"
	v1 "goldilocks/crypto/v1"
	"goldilocks/internal/atomicfile"
	"goldilocks/internal/block"
)

// UpgradeSuffix names the new store while an upgrade writes it, next to
// the backing file.
const UpgradeSuffix = ".upgrade"

// ErrUpToDate: the volume is already in the current format; Upgrade
// changed nothing.
var ErrUpToDate = errors.New("already in the current format")

// upgradeFlushEvery is how much is copied between flushes of the new
// store (64 MiB, as the rekey walk).
const upgradeFlushEvery = 64 << 20

// UpgradeResult says what Upgrade did.
type UpgradeResult struct {
	Volume     string `json:"volume"`
	FromFormat int    `json:"from_format"`
	ToFormat   int    `json:"to_format"`
	Chunks     uint64 `json:"chunks"` // in the volume
	Copied     uint64 `json:"copied"` // mapped chunks copied; the others read as zeros in both formats
	Bytes      uint64 `json:"bytes"`  // plaintext bytes copied
	Backing    string `json:"backing"`
	// KEK wraps the new data key.
	KEK KEKRef `json:"kek"`
	// Discarded: a partial copy left by an interrupted upgrade was
	// thrown away first.
	Discarded bool `json:"discarded_partial,omitempty"`
	// OldKeyDestroyed: the provider destroyed the format-1 data key.
	// Never so far: a format-1 wrapping has no destroyable secret.
	OldKeyDestroyed bool `json:"old_key_destroyed"`
}

// upgradeHook, if set (tests), runs at the named stage of Upgrade; an
// error stops the upgrade there as a crash would: nothing is cleaned up.
var upgradeHook func(stage string) error

// Upgrade rewrites encrypted volume name from format 1 (the previous
// release's, crypto/v1) into the current format (crypto.HeaderVersion),
// offline, and returns what it did. It refuses a plain volume, one already
// in the current format (ErrUpToDate, nothing changed), one whose backing
// store is not a regular file, and one attached by a running gateway
// (block.ErrInUse: detach it first). An online upgrade, through a running
// gateway's control socket while the volume stays attached, does not
// exist yet.
//
// The new store is written to BACKING.upgrade next to the backing file
// (which may be outside the data dir), with a new data key wrapped by the
// same provider and key name, under the same UUID and cipher suite; every
// mapped chunk's plaintext is copied through the format-1 reader, so
// every chunk is checked (DARE tag) on the way: a chunk that fails stops
// the upgrade, naming it, and the volume stays as it was. The new store
// is detached cleanly, synced, and renamed over the backing file, and the
// directory is synced. The space of the new file is needed next to the
// old one until then. A crash or an error before the rename leaves the
// old file the volume; the next Upgrade discards the partial copy (and
// destroys its data key where the provider can) and starts again.
//
// The rollback anchor is written only once the new store is in place: an
// anchor for a volume whose store claims format 1 means that the store is
// an older copy of a volume upgraded before, and Upgrade refuses it
// (crypto.ErrRollback).
//
// After the rename, the old data key is destroyed at its provider if the
// provider can destroy one wrapped key (crypto.KeyDestroyer). A format-1
// wrapped key has no secret to destroy (FORMAT.md, "Local keystore"), so
// it is a no-op for every volume made by the format-1 release: its
// ciphertext is gone with the old file, but a copy of the old file plus
// the KEK still opens it.
//
// progress, if set, is called with chunks walked and the total. log gets
// integrity warnings and failures of the old store, and Upgrade's own
// notes (nil: none).
func (r *Registry) Upgrade(ctx context.Context, name string, progress func(done, total uint64), log *slog.Logger) (UpgradeResult, error) {
	res := UpgradeResult{Volume: name, FromFormat: v1.Version, ToFormat: crypto.HeaderVersion}
	if log == nil {
		log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if progress == nil {
		progress = func(uint64, uint64) {}
	}

	// 1. Check.
	v, err := r.Get(name)
	if err != nil {
		return res, err
	}
	if !v.Encrypted {
		return res, fmt.Errorf("volume %s is plain: it has no on-disk format to upgrade", name)
	}
	if IsRemote(v) { // format 1 volumes were never on an upstream server
		return res, fmt.Errorf("volume %s: %w", name, ErrUpToDate)
	}
	id, err := v.UUIDBytes()
	if err != nil {
		return res, err
	}
	path, err := filepath.EvalSymlinks(r.BackingPath(v)) // the new file goes next to the file itself
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	res.Backing = path
	if err := checkFormat(name, path); err != nil {
		return res, err
	}
	st, err := os.Stat(path)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	if !st.Mode().IsRegular() {
		return res, fmt.Errorf("volume %s: backing store %s is not a regular file: upgrade writes a new file beside it and renames it; export the volume's plaintext with a format-1 build and import it with this one instead", name, path)
	}
	oldFile, err := block.OpenFile(path, true)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	closeOld := oldFile.Close
	defer func() { closeOld() }() // at the end: the lock keeps gateways off until then
	if err := oldFile.Lock(); err != nil {
		return res, fmt.Errorf("volume %s: %w: detach it first (an upgrade is offline; online upgrade through the gateway is not supported yet)", name, err)
	}
	if err := checkFormat(name, path); err != nil { // again, under the lock
		return res, err
	}
	anchor := r.Anchor()
	if st, ok, err := anchor.Load(id); err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	} else if ok {
		return res, fmt.Errorf("volume %s: %w: its store is in format 1, but this data dir anchors it at commit %d of format 2, so it was upgraded before and its store has been replaced by an older copy; refusing to upgrade the older copy (if it is the data you want, remove %s and run this again)",
			name, crypto.ErrRollback, st.Seq, filepath.Join(r.dir, crypto.AnchorDir, v.UUID))
	}
	provider := "local"
	if v.KEK != nil && v.KEK.Provider != "" {
		provider = v.KEK.Provider
	}
	kek, err := r.KEK(provider)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}

	// 2. Read.
	old, err := v1.Open(ctx, oldFile, name, id, kek, log)
	if err != nil {
		return res, err
	}
	closeOld = old.Close
	oh := old.Header()
	if int64(oh.Size) != v.Size {
		return res, fmt.Errorf("volume %s: the registry says %d bytes, its format-1 header %d; nothing was changed", name, v.Size, oh.Size)
	}
	keyName := oh.KEK.Name
	if v.KEK != nil && v.KEK.Key != "" {
		keyName = v.KEK.Key
	}
	res.Chunks = old.Chunks()

	// 3. Write.
	tmp := path + UpgradeSuffix
	if res.Discarded, err = r.discardPartial(ctx, tmp, id, kek, log); err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	committed, crashed := false, false
	defer func() {
		if !committed && !crashed {
			r.discardPartial(context.WithoutCancel(ctx), tmp, id, kek, log)
		}
	}()
	pending := &pendingAnchor{}
	newHdr, err := r.writeUpgrade(ctx, old, tmp, st, id, kek, keyName, pending, log, progress, &res)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w; nothing was changed: the volume is still format 1", name, err)
	}
	if err := hook("before-rename"); err != nil {
		crashed = true
		return res, err
	}

	// 4. Switch. The new file is locked first, so that no gateway attaches
	// it before its anchor and registry entry are written.
	newFile, err := block.OpenFile(tmp, false)
	if err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	defer newFile.Close()
	if err := newFile.Lock(); err != nil {
		return res, fmt.Errorf("volume %s: %s: %w", name, tmp, err)
	}
	if err := newFile.File().Sync(); err != nil {
		return res, fmt.Errorf("volume %s: syncing %s: %w", name, tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return res, fmt.Errorf("volume %s: %w", name, err)
	}
	committed = true
	if err := atomicfile.SyncDir(filepath.Dir(path)); err != nil {
		return res, fmt.Errorf("volume %s: upgraded, but syncing directory %s failed (a power cut now may bring back the format-1 file): %w", name, filepath.Dir(path), err)
	}
	if st, ok := pending.get(); ok {
		if err := anchor.Advance(id, st); err != nil {
			log.Warn("volume upgraded, but its rollback anchor was not written; its next attach writes one", "volume", name, "err", err)
		}
	}
	res.KEK = KEKRef{Provider: newHdr.KEK.Provider, Key: newHdr.KEK.Name, Version: int(newHdr.KEK.Version)}
	if v.KEK == nil || *v.KEK != res.KEK {
		if err := r.setKEK(name, v.UUID, res.KEK); err != nil {
			log.Warn("volume upgraded, but its registry entry still shows the old key version", "volume", name, "err", err)
		}
	}
	if d, ok := kek.(crypto.KeyDestroyer); ok {
		for slot, w := range oh.DEK {
			if len(w) == 0 {
				continue
			}
			if err := d.Destroy(ctx, oh.KEK, id, w); err != nil {
				log.Warn("volume upgraded, but destroying its format-1 data key failed", "volume", name, "slot", slot, "err", err)
			}
		}
	}
	return res, nil
}

// checkFormat refuses anything but a store whose header claims format 1.
func checkFormat(name, path string) error {
	f, err := fileFormat(path)
	switch {
	case err != nil:
		return fmt.Errorf("volume %s: %w", name, err)
	case f == crypto.HeaderVersion:
		return fmt.Errorf("volume %s is already format %d: %w", name, f, ErrUpToDate)
	case f != v1.Version:
		return fmt.Errorf("volume %s: %w: format %d, this build upgrades format %d to %d", name, crypto.ErrUnsupportedVersion, f, v1.Version, crypto.HeaderVersion)
	}
	return nil
}

func hook(stage string) error {
	if upgradeHook == nil {
		return nil
	}
	return upgradeHook(stage)
}

// writeUpgrade creates tmp, formats it, copies old's mapped chunks into
// it, and detaches it cleanly. It returns the new store's header.
func (r *Registry) writeUpgrade(ctx context.Context, old *v1.Volume, tmp string, like os.FileInfo, id [16]byte,
	kek crypto.KEKProvider, keyName string, anchor crypto.Anchor, log *slog.Logger,
	progress func(done, total uint64), res *UpgradeResult) (crypto.Header, error) {
	oh := old.Header()
	if err := createLike(tmp, like, int64(crypto.LayoutFor(oh.Size).End)); err != nil {
		return crypto.Header{}, err
	}
	dev, err := block.OpenFile(tmp, false)
	if err != nil {
		return crypto.Header{}, err
	}
	if err := crypto.Format(ctx, dev, id, oh.Size, oh.Suite, kek, keyName); err != nil {
		dev.Close()
		return crypto.Header{}, err
	}
	// A private node cache: the registry's could hold nodes of this UUID
	// from an earlier attempt's file.
	nv, err := crypto.Open(ctx, dev, res.Volume, id, kek, log, crypto.Options{Anchor: anchor})
	if err != nil {
		dev.Close()
		return crypto.Header{}, err
	}
	if err := copyMapped(ctx, old, nv, progress, res); err != nil {
		nv.Close()
		return crypto.Header{}, err
	}
	h := nv.Header()
	if err := nv.Close(); err != nil { // flush, checkpoint, clean detach
		return crypto.Header{}, err
	}
	return h, nil
}

// copyMapped copies every mapped chunk of old into nv, in runs of up to
// 1 MiB, flushing every 64 MiB.
func copyMapped(ctx context.Context, old *v1.Volume, nv *crypto.Volume, progress func(done, total uint64), res *UpgradeResult) error {
	const run = 256 // chunks
	buf := make([]byte, run*crypto.ChunkSize)
	defer clear(buf)
	total := old.Chunks()
	var sinceFlush uint64
	for c := uint64(0); c < total; {
		if err := ctx.Err(); err != nil {
			return err
		}
		if !old.Mapped(c) {
			c++
			if c%run == 0 || c == total {
				progress(c, total)
			}
			continue
		}
		n := uint64(1)
		for c+n < total && n < run && old.Mapped(c+n) {
			n++
		}
		p := buf[:n*crypto.ChunkSize]
		off := int64(c * crypto.ChunkSize)
		if _, err := old.ReadAt(p, off); err != nil {
			return err
		}
		if _, err := nv.WriteAt(p, off); err != nil {
			return err
		}
		c += n
		res.Copied += n
		res.Bytes += uint64(len(p))
		if sinceFlush += uint64(len(p)); sinceFlush >= upgradeFlushEvery {
			if err := nv.Flush(); err != nil {
				return err
			}
			sinceFlush = 0
		}
		progress(c, total)
	}
	return nv.Flush()
}

// createLike creates path (which must not exist) as a sparse file of size
// bytes with the permissions, and where this process may, the owner of
// like.
func createLike(path string, like os.FileInfo, size int64) error {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_WRONLY, like.Mode().Perm())
	if err != nil {
		return err
	}
	err = f.Chmod(like.Mode().Perm()) // not narrowed by the umask
	if st, ok := like.Sys().(*syscall.Stat_t); ok && err == nil && os.Geteuid() == 0 {
		err = f.Chown(int(st.Uid), int(st.Gid))
	}
	if err == nil {
		err = f.Truncate(size)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		os.Remove(path)
	}
	return err
}

// discardPartial removes a partial new store left by an interrupted
// upgrade (or by this one, failing), first destroying, where the provider
// can, the data key its header wraps: a secret in the keystore that no
// store will ever use. Only the key of that header is destroyed, never
// every key of the UUID (the volume's own key shares it). It reports
// whether there was a file.
func (r *Registry) discardPartial(ctx context.Context, tmp string, id [16]byte, kek crypto.KEKProvider, log *slog.Logger) (bool, error) {
	if _, err := os.Lstat(tmp); errors.Is(err, os.ErrNotExist) {
		return false, nil
	} else if err != nil {
		return false, err
	}
	if h, err := ReadHeaderFile(tmp); err == nil && h.UUID == id {
		if d, ok := kek.(crypto.KeyDestroyer); ok && h.KEK.Provider == kek.Name() {
			for _, w := range h.DEK {
				if len(w) > 0 {
					if err := d.Destroy(ctx, h.KEK, id, w); err != nil {
						log.Warn("discarding a partial upgrade: its data key was not destroyed", "file", tmp, "err", err)
					}
				}
			}
		}
	}
	log.Info("discarding the partial copy of an interrupted upgrade", "file", tmp)
	if err := os.Remove(tmp); err != nil {
		return true, err
	}
	return true, atomicfile.SyncDir(filepath.Dir(tmp))
}

// setKEK records a volume's key reference in the registry, if the entry
// is still the volume with this UUID.
func (r *Registry) setKEK(name, uuid string, ref KEKRef) error {
	return r.update(func(vols []Volume) ([]Volume, error) {
		for i := range vols {
			if vols[i].Name == name && vols[i].UUID == uuid {
				vols[i].KEK = &ref
				return vols, nil
			}
		}
		return nil, fmt.Errorf("volume %s: %w (removed or replaced meanwhile)", name, ErrNotFound)
	})
}

// pendingAnchor is the rollback anchor of the store being written: it
// keeps the sequence in memory until the store replaces the old one.
// Written to the data dir earlier, an anchor would make the still
// format-1 volume look like a rolled-back copy of an upgraded one.
type pendingAnchor struct {
	mu sync.Mutex
	st crypto.AnchorState
	ok bool
}

var _ crypto.Anchor = (*pendingAnchor)(nil)

func (a *pendingAnchor) Load([16]byte) (crypto.AnchorState, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st, a.ok, nil
}

func (a *pendingAnchor) Advance(_ [16]byte, st crypto.AnchorState) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.st = a.st.Merge(st)
	a.ok = true
	return nil
}

func (a *pendingAnchor) Remove([16]byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.st, a.ok = crypto.AnchorState{}, false
	return nil
}

func (a *pendingAnchor) get() (crypto.AnchorState, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.st, a.ok
}
