// Package volume owns the volume registry of a data dir (FORMAT.md): which
// volumes exist, their sizes, backing stores and key references, and the
// creation of their backing files. It opens backing stores as block
// devices for the gateway (files here; upstream NBD exports and RBD images
// through internal/upstream and internal/rbd); it serves no NBD and holds
// no keys.
package volume

import (
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/crypto/cowmap"
	"goldilocks/internal/atomicfile"
)

// Format constants of volumes.json (FORMAT.md). Part of the on-disk format.
const (
	Magic         = "goldilocks-volumes"
	FormatVersion = 2 // written when a volume has snapshots; 1 otherwise
	registryFile  = "volumes.json"
	lockFile      = "volumes.lock"
	volumesDir    = "volumes"
	// Alignment of volume sizes.
	SizeAlign = 4096
)

// Sentinel errors.
var (
	ErrNotFound    = errors.New("no such volume")
	ErrExists      = errors.New("volume already exists")
	ErrInvalidName = errors.New("invalid volume name: use 1-64 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
	ErrBadRegistry = errors.New("volume registry is damaged")
)

var nameRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$`)

// snapNameRE: snapshot names, as volume names (an export is NAME@SNAP).
var snapNameRE = nameRE

// KEKRef names the key that wraps an encrypted volume's data key.
type KEKRef struct {
	Provider string `json:"provider"`
	Key      string `json:"key"`
	Version  int    `json:"version"`
}

// Volume is one entry of the registry.
type Volume struct {
	Name      string            `json:"name"`
	UUID      string            `json:"uuid"`
	Size      int64             `json:"size"`
	Encrypted bool              `json:"encrypted"`
	Backing   string            `json:"backing"`
	ReadOnly  bool              `json:"read_only,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
	Created   time.Time         `json:"created"`
	KEK       *KEKRef           `json:"kek,omitempty"`
	// Snapshots, oldest first (crypto/SNAPSHOTS.md; FORMAT.md version 2).
	Snapshots []SnapshotRecord `json:"snapshots,omitempty"`
	// Base makes the volume a clone of a snapshot: what it has not
	// written reads from there (FORMAT.md version 2).
	Base *BaseRef `json:"base,omitempty"`
}

// BaseRef names the snapshot a clone reads through.
type BaseRef struct {
	Volume   string `json:"volume"`
	Snapshot string `json:"snapshot"`
	UUID     string `json:"uuid"` // the snapshot's store, so that a later one of the same name is not taken for it
}

// SnapshotRecord is one snapshot of a volume: its store, an encrypted
// volume of its own (crypto/SNAPSHOTS.md).
type SnapshotRecord struct {
	Name    string    `json:"name"`
	UUID    string    `json:"uuid"`    // the store's
	Backing string    `json:"backing"` // the store, relative to the data dir
	Created time.Time `json:"created"`
	Seq     uint64    `json:"seq"` // the volume's map commit at the flush point
}

type registryDoc struct {
	Magic   string   `json:"magic"`
	Version int      `json:"version"`
	Volumes []Volume `json:"volumes"`
}

// stamp identifies one version of the registry file on disk.
type stamp struct {
	ino   uint64
	size  int64
	mtime int64
}

// Registry is the volume registry of one data dir. It is safe for
// concurrent use, and other processes may change the file underneath it.
type Registry struct {
	outageLimit   time.Duration // upstream backing stores; 0: the default
	upstreamConns int           // connections to an upstream that offers multi-conn; 0: the default
	leaseTTL      time.Duration // leases of volumes on upstream exports; 0: the default
	noAlign       bool          // encrypted volumes: no home alignment
	dir           string
	passphrase    []byte // seals the local keystore; see SetKeystorePassphrase
	vaultCfg      crypto.VaultConfig

	cache *cowmap.Cache // map nodes of every volume this process opens
	pools *crypto.Pools // their batch buffers

	kekMu sync.Mutex       // guards vault
	vault *crypto.VaultKEK // made at first use

	mu      sync.Mutex // guards stamp, volumes, index
	stamp   stamp
	volumes []Volume
	index   map[string]int // volumes by name
}

// Open opens (creating if needed) the registry of dataDir.
func Open(dataDir string) (*Registry, error) {
	if err := os.MkdirAll(filepath.Join(dataDir, volumesDir), 0o700); err != nil {
		return nil, fmt.Errorf("data dir %s: %w", dataDir, err)
	}
	abs, err := filepath.Abs(dataDir)
	if err != nil {
		return nil, err
	}
	r := &Registry{dir: abs, cache: cowmap.NewCache(cowmap.DefaultCacheBytes), pools: crypto.NewPools()}
	if _, err := r.List(); err != nil {
		return nil, err
	}
	return r, nil
}

// SetCacheBytes sets the size of the map-node cache that the volumes
// this registry opens share (default cowmap.DefaultCacheBytes).
func (r *Registry) SetCacheBytes(n int) { r.cache = cowmap.NewCache(n) }

// MapCache is the map-node cache the registry's encrypted volumes share,
// for its statistics (cowmap.Cache.Stats). SetCacheBytes replaces it.
func (r *Registry) MapCache() *cowmap.Cache { return r.cache }

// Anchor is the rollback anchor store of the data dir.
func (r *Registry) Anchor() crypto.Anchor { return crypto.NewFileAnchor(r.dir) }

// anchorFor is where v's rollback anchor lives: the data dir, and for a
// volume whose key is in Vault also Vault's KV (crypto.VaultAnchor), so
// that the anchor moves with the volume between gateways that share
// storage and Vault.
func (r *Registry) anchorFor(v Volume) (crypto.Anchor, error) {
	file := r.Anchor()
	if v.KEK == nil || v.KEK.Provider != "vault" {
		return file, nil
	}
	kek, err := r.KEK("vault")
	if err != nil {
		return nil, err
	}
	vk, ok := kek.(*crypto.VaultKEK)
	if !ok {
		return file, nil
	}
	return crypto.Anchors{file, vk.Anchor()}, nil
}

// SetKeystorePassphrase sets the passphrase that seals the local keystore
// (a new keystore is sealed by it; a sealed one needs it).
func (r *Registry) SetKeystorePassphrase(p []byte) { r.passphrase = p }

// SetVaultConfig sets how the vault provider reaches Vault beyond the
// VAULT_* environment (Transit mount, AppRole, logger).
func (r *Registry) SetVaultConfig(c crypto.VaultConfig) { r.vaultCfg = c }

// Dir is the data dir.
func (r *Registry) Dir() string { return r.dir }

// BackingPath resolves a volume's backing store to a path.
func (r *Registry) BackingPath(v Volume) string {
	if filepath.IsAbs(v.Backing) || IsRemote(v) {
		return v.Backing
	}
	return filepath.Join(r.dir, v.Backing)
}

// List returns every volume, sorted by name, re-reading the file if it
// changed.
func (r *Registry) List() ([]Volume, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.refreshLocked(); err != nil {
		return nil, err
	}
	return slices.Clone(r.volumes), nil
}

// Get returns the named volume.
func (r *Registry) Get(name string) (Volume, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if err := r.refreshLocked(); err != nil {
		return Volume{}, err
	}
	if i, ok := r.index[name]; ok { // one lookup, whatever the number of volumes
		return r.volumes[i], nil
	}
	return Volume{}, fmt.Errorf("volume %s: %w", name, ErrNotFound)
}

func (r *Registry) path() string { return filepath.Join(r.dir, registryFile) }

func (r *Registry) refreshLocked() error {
	st, err := os.Stat(r.path())
	if errors.Is(err, os.ErrNotExist) {
		r.stamp, r.volumes, r.index = stamp{}, nil, nil
		return nil
	}
	if err != nil {
		return fmt.Errorf("volume registry: %w", err)
	}
	s := stamp{size: st.Size(), mtime: st.ModTime().UnixNano()}
	if sys, ok := st.Sys().(*syscall.Stat_t); ok {
		s.ino = sys.Ino
	}
	if s == r.stamp && r.stamp != (stamp{}) {
		return nil
	}
	vols, err := readRegistry(r.path())
	if err != nil {
		return err
	}
	r.stamp, r.volumes = s, vols
	r.index = make(map[string]int, len(vols))
	for i, v := range vols {
		r.index[v.Name] = i
	}
	return nil
}

// readRegistry parses and checks a registry file.
func readRegistry(path string) ([]Volume, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("volume registry: %w", err)
	}
	return parseRegistry(b, path)
}

func parseRegistry(b []byte, path string) ([]Volume, error) {
	var doc registryDoc
	if err := json.Unmarshal(b, &doc); err != nil {
		return nil, fmt.Errorf("%s: %w: %v", path, ErrBadRegistry, err)
	}
	if doc.Magic != Magic {
		return nil, fmt.Errorf("%s: %w: magic %q is not %q", path, ErrBadRegistry, doc.Magic, Magic)
	}
	if doc.Version < 1 || doc.Version > FormatVersion {
		return nil, fmt.Errorf("%s: %w: format version %d, this build reads 1 to %d", path, ErrBadRegistry, doc.Version, FormatVersion)
	}
	seen, ids := map[string]bool{}, map[uuid.UUID]string{}
	for _, v := range doc.Volumes {
		id, uerr := uuid.Parse(v.UUID)
		switch {
		case !nameRE.MatchString(v.Name):
			return nil, fmt.Errorf("%s: %w: volume name %q", path, ErrBadRegistry, v.Name)
		case seen[v.Name]:
			return nil, fmt.Errorf("%s: %w: volume %s listed twice", path, ErrBadRegistry, v.Name)
		case v.Size <= 0 || v.Size%SizeAlign != 0:
			return nil, fmt.Errorf("%s: %w: volume %s: size %d", path, ErrBadRegistry, v.Name, v.Size)
		case v.Backing == "":
			return nil, fmt.Errorf("%s: %w: volume %s has no backing store", path, ErrBadRegistry, v.Name)
		case uerr != nil:
			return nil, fmt.Errorf("%s: %w: volume %s: uuid %q", path, ErrBadRegistry, v.Name, v.UUID)
		case ids[id] != "":
			// Two volumes, one anchor and one set of key secrets: never.
			return nil, fmt.Errorf("%s: %w: volumes %s and %s have the same UUID %s", path, ErrBadRegistry, ids[id], v.Name, id)
		}
		seen[v.Name], ids[id] = true, v.Name
		if v.Base != nil && (doc.Version < 2 || !v.Encrypted) {
			return nil, fmt.Errorf("%s: %w: volume %s: a clone in a version-1 registry or a plain clone", path, ErrBadRegistry, v.Name)
		}
		if len(v.Snapshots) > 0 && (doc.Version < 2 || !v.Encrypted) {
			return nil, fmt.Errorf("%s: %w: volume %s: snapshots in a version-1 registry or of a plain volume", path, ErrBadRegistry, v.Name)
		}
		snaps := map[string]bool{}
		for _, sn := range v.Snapshots {
			sid, serr := uuid.Parse(sn.UUID)
			switch {
			case !snapNameRE.MatchString(sn.Name) || snaps[sn.Name]:
				return nil, fmt.Errorf("%s: %w: volume %s: snapshot name %q (invalid or listed twice)", path, ErrBadRegistry, v.Name, sn.Name)
			case serr != nil || ids[sid] != "":
				return nil, fmt.Errorf("%s: %w: volume %s snapshot %s: uuid %q (invalid or not unique)", path, ErrBadRegistry, v.Name, sn.Name, sn.UUID)
			case sn.Backing == "" || filepath.IsAbs(sn.Backing) || strings.HasPrefix(filepath.Clean(sn.Backing), ".."):
				return nil, fmt.Errorf("%s: %w: volume %s snapshot %s: backing %q is not inside the data dir", path, ErrBadRegistry, v.Name, sn.Name, sn.Backing)
			}
			snaps[sn.Name], ids[sid] = true, v.Name+"@"+sn.Name
		}
	}
	for _, v := range doc.Volumes { // a clone's base is a snapshot of this file, of its size
		if b := v.Base; b != nil {
			i := slices.IndexFunc(doc.Volumes, func(x Volume) bool { return x.Name == b.Volume })
			if i < 0 || doc.Volumes[i].Size != v.Size || !slices.ContainsFunc(doc.Volumes[i].Snapshots, func(s SnapshotRecord) bool { return s.Name == b.Snapshot && s.UUID == b.UUID }) {
				return nil, fmt.Errorf("%s: %w: volume %s: its base %s@%s is not a snapshot of that size here", path, ErrBadRegistry, v.Name, b.Volume, b.Snapshot)
			}
		}
	}
	return doc.Volumes, nil
}

// update runs fn on the current volumes under the registry lock and writes
// the result atomically.
func (r *Registry) update(fn func([]Volume) ([]Volume, error)) error {
	lf, err := os.OpenFile(filepath.Join(r.dir, lockFile), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("volume registry lock: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("volume registry lock: %w", err)
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	r.stamp = stamp{} // force a re-read under the lock
	if err := r.refreshLocked(); err != nil {
		return err
	}
	vols, err := fn(slices.Clone(r.volumes))
	if err != nil {
		return err
	}
	slices.SortFunc(vols, func(a, b Volume) int {
		switch {
		case a.Name < b.Name:
			return -1
		case a.Name > b.Name:
			return 1
		}
		return 0
	})
	version := 1 // readable by builds without snapshots while no volume has one
	for _, v := range vols {
		if len(v.Snapshots) > 0 || v.Base != nil {
			version = FormatVersion
		}
	}
	b, err := json.MarshalIndent(registryDoc{Magic: Magic, Version: version, Volumes: vols}, "", "  ")
	if err != nil {
		return err
	}
	if _, err := parseRegistry(b, r.path()); err != nil { // never write a file no reader takes
		return err
	}
	if err := atomicfile.Write(r.path(), append(b, '\n'), 0o600); err != nil {
		return fmt.Errorf("volume registry: %w", err)
	}
	r.stamp = stamp{}
	return r.refreshLocked()
}

// CreateOptions describe a new volume.
type CreateOptions struct {
	Name string
	// Size in bytes, a multiple of 4096. Zero with Backing takes the
	// backing store's size.
	Size int64
	// Backing is an existing file or block device; empty creates a sparse
	// file under DATA_DIR/volumes.
	Backing   string
	Encrypted bool
	ReadOnly  bool
	// Labels are key=value tags the access policy can match.
	Labels map[string]string
	// KEK is "local" (the default) or "vault:KEYNAME"; encrypted only.
	KEK string
	// Suite is crypto.AES256GCM (default) or crypto.ChaCha20Poly1305.
	Suite byte
	// Base makes the new volume a clone of that snapshot (Clone).
	Base *BaseRef
	// Overwrite lets a new volume replace one that Backing already holds
	// (HeldVolume), destroying it; without it Create fails with
	// ErrHoldsVolume.
	Overwrite bool
}

// DefaultKeyName is the local keystore's key for volumes that name none.
const DefaultKeyName = "default"

// KEK returns the provider that holds a volume's key-encryption key.
func (r *Registry) KEK(provider string) (crypto.KEKProvider, error) {
	switch provider {
	case "local", "":
		return crypto.NewLocalKEK(r.dir, r.passphrase), nil
	case "vault":
		r.kekMu.Lock()
		defer r.kekMu.Unlock()
		if r.vault == nil {
			v, err := crypto.NewVaultKEK(r.vaultCfg)
			if err != nil {
				return nil, err
			}
			r.vault = v
		}
		return r.vault, nil
	}
	return nil, fmt.Errorf("unknown KEK provider %q (local or vault:KEYNAME)", provider)
}

// UUIDBytes is a volume's UUID in binary.
func (v Volume) UUIDBytes() ([16]byte, error) {
	u, err := uuid.Parse(v.UUID)
	if err != nil {
		return [16]byte{}, fmt.Errorf("volume %s: uuid: %w", v.Name, err)
	}
	return u, nil
}

// Create adds a volume and creates its backing file; an encrypted volume's
// backing store is formatted (crypto/FORMAT.md) with a new data key
// wrapped by its KEK.
func (r *Registry) Create(o CreateOptions) (Volume, error) {
	if !nameRE.MatchString(o.Name) {
		return Volume{}, fmt.Errorf("volume %q: %w", o.Name, ErrInvalidName)
	}
	var kek crypto.KEKProvider
	if o.Encrypted {
		prov, key, _ := strings.Cut(o.KEK, ":")
		if key == "" {
			key = DefaultKeyName
		}
		var err error
		if kek, err = r.KEK(prov); err != nil {
			return Volume{}, fmt.Errorf("volume %s: %w", o.Name, err)
		}
		o.KEK = key
		if o.Size == 0 {
			return Volume{}, fmt.Errorf("volume %s: --size is required for an encrypted volume", o.Name)
		}
	}
	if o.Size < 0 || o.Size%SizeAlign != 0 {
		return Volume{}, fmt.Errorf("volume %s: size %d is not a positive multiple of %d", o.Name, o.Size, SizeAlign)
	}
	v := Volume{
		Name:      o.Name,
		UUID:      uuid.NewString(),
		Size:      o.Size,
		Encrypted: o.Encrypted,
		ReadOnly:  o.ReadOnly,
		Labels:    o.Labels,
		Created:   time.Now().UTC().Truncate(time.Millisecond),
		Base:      o.Base,
	}
	storeSize := o.Size
	if o.Encrypted {
		storeSize = int64(crypto.LayoutFor(uint64(o.Size)).End)
	}
	var created string
	err := r.update(func(vols []Volume) ([]Volume, error) {
		for _, e := range vols {
			if e.Name == o.Name {
				return nil, fmt.Errorf("volume %s: %w", o.Name, ErrExists)
			}
		}
		if isRemote(o.Backing) {
			size, err := r.remoteSize(o.Backing)
			if err != nil {
				return nil, fmt.Errorf("volume %s: %w", o.Name, err)
			}
			if v.Size == 0 {
				v.Size = size &^ (SizeAlign - 1)
			}
			if v.Size == 0 || storeSize > size {
				return nil, fmt.Errorf("volume %s: backing %s holds %d bytes, volume needs %d", o.Name, o.Backing, size, max(v.Size, storeSize))
			}
			v.Backing = o.Backing
		} else if o.Backing != "" {
			abs, err := filepath.Abs(o.Backing)
			if err != nil {
				return nil, err
			}
			size, err := backingSize(abs)
			if err != nil {
				return nil, fmt.Errorf("volume %s: backing %s: %w", o.Name, abs, err)
			}
			if v.Size == 0 {
				v.Size = size &^ (SizeAlign - 1)
			}
			if v.Size == 0 || storeSize > size {
				return nil, fmt.Errorf("volume %s: backing %s holds %d bytes, volume needs %d", o.Name, abs, size, max(v.Size, storeSize))
			}
			v.Backing = abs
		} else {
			if v.Size == 0 {
				return nil, fmt.Errorf("volume %s: --size is required", o.Name)
			}
			v.Backing = filepath.Join(volumesDir, o.Name+".img")
			p := r.BackingPath(v)
			f, err := os.OpenFile(p, os.O_CREATE|os.O_EXCL|os.O_WRONLY, 0o600)
			if err != nil {
				return nil, fmt.Errorf("volume %s: %w", o.Name, err)
			}
			created = p
			err = f.Truncate(storeSize)
			if err == nil {
				err = f.Sync()
			}
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return nil, fmt.Errorf("volume %s: backing file: %w", o.Name, err)
			}
		}
		for _, e := range vols { // one store, one volume
			if r.BackingPath(e) == r.BackingPath(v) {
				return nil, fmt.Errorf("volume %s: backing %s already holds volume %s", o.Name, r.BackingPath(v), e.Name)
			}
		}
		if err := r.refuseHeld(o); err != nil {
			return nil, err
		}
		if o.Encrypted {
			ref, err := r.format(v, kek, o.KEK, o.Suite)
			if err != nil {
				return nil, err
			}
			v.KEK = ref
		}
		if err := r.describeRemote(v); err != nil {
			return nil, err
		}
		return append(vols, v), nil
	})
	if err != nil {
		if created != "" {
			os.Remove(created)
		}
		return Volume{}, err
	}
	return v, nil
}

// format writes a new encrypted volume onto v's backing store.
func (r *Registry) format(v Volume, kek crypto.KEKProvider, keyName string, suite byte) (*KEKRef, error) {
	id, err := v.UUIDBytes()
	if err != nil {
		return nil, err
	}
	dev, err := r.openStore(v, false)
	if err != nil {
		return nil, err
	}
	defer dev.Close()
	if err := crypto.Format(context.Background(), dev, id, uint64(v.Size), suite, kek, keyName); err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	if err := dev.Flush(); err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	h, err := r.Header(v)
	if err != nil {
		return nil, err
	}
	return &KEKRef{Provider: h.KEK.Provider, Key: h.KEK.Name, Version: int(h.KEK.Version)}, nil
}

// ReadHeaderFile reads the current header of an encrypted volume in a
// file without its key (the MAC is not checked).
func ReadHeaderFile(path string) (*crypto.Header, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	b := make([]byte, 2*crypto.HeaderBlockSize)
	if _, err := io.ReadFull(f, b); err != nil {
		return nil, fmt.Errorf("%s: reading the volume header: %w", path, err)
	}
	h, _, err := crypto.PickHeader(b[:crypto.HeaderBlockSize], b[crypto.HeaderBlockSize:])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return h, nil
}

// fileFormat is the format version the header of an encrypted volume in
// a file claims.
func fileFormat(path string) (int, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	b := make([]byte, 16)
	if _, err := io.ReadFull(f, b); err != nil {
		return 0, err
	}
	v, err := crypto.HeaderFormat(b)
	return int(v), err
}

// destroyKeys destroys the volume's data keys at its KEK provider, where
// the provider can. A crypto.VolumeKeyDestroyer (the local keystore)
// destroys every DEK it wrapped for the volume's UUID, as the registry
// says it, without reading the store: a storage tier that blanks or
// relabels the header to keep a key alive while it holds a copy gains
// nothing, and a shred interrupted after the header was overwritten can
// be run again. A provider that is only a crypto.KeyDestroyer destroys
// the wrapped DEK of each slot of the header, which must then read.
func (r *Registry) destroyKeys(v Volume) error {
	id, err := v.UUIDBytes()
	if err != nil {
		return err
	}
	h, herr := r.Header(v)
	provider := "local" // as the registry says; the store could say another
	switch {
	case v.KEK != nil:
		provider = v.KEK.Provider
	case herr == nil:
		provider = h.KEK.Provider
	}
	kek, err := r.KEK(provider)
	if err != nil {
		return fmt.Errorf("volume %s: destroying the data key: %w; nothing was changed", v.Name, err)
	}
	if d, ok := kek.(crypto.VolumeKeyDestroyer); ok {
		if _, err := d.DestroyVolume(context.Background(), id); err != nil {
			return fmt.Errorf("volume %s: destroying its data keys in the %s keystore: %w; nothing was overwritten and the volume stays", v.Name, provider, err)
		}
		return nil
	}
	d, ok := kek.(crypto.KeyDestroyer)
	if !ok {
		return nil
	}
	if herr != nil {
		return fmt.Errorf("volume %s: the header does not read, so its data key cannot be destroyed (nothing was changed): %w", v.Name, herr)
	}
	for slot, w := range h.DEK {
		if len(w) == 0 {
			continue
		}
		if err := d.Destroy(context.Background(), h.KEK, id, w); err != nil {
			return fmt.Errorf("volume %s: destroying the data key of DEK slot %d at %s: %w; nothing was overwritten and the volume stays", v.Name, slot, provider, err)
		}
	}
	return nil
}

// backingSize is the size of a regular file or block device.
func backingSize(path string) (int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	if st.Mode().IsRegular() {
		return st.Size(), nil
	}
	if st.Mode()&os.ModeDevice == 0 {
		return 0, errors.New("not a regular file or block device")
	}
	return f.Seek(0, 2)
}

// Remove deletes a volume from the registry (not its backing store).
func (r *Registry) Remove(name string) error {
	return r.update(func(vols []Volume) ([]Volume, error) {
		for i, v := range vols {
			if v.Name == name {
				return append(vols[:i], vols[i+1:]...), nil
			}
		}
		return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
	})
}

// Shred destroys an encrypted volume's data key, so that its data is
// unreadable at once: first, where the volume's KEK provider can
// (crypto.KeyDestroyer: the local keystore), the secret of every wrapped
// DEK in its header, so that no copy of the header kept by the storage
// tier opens either; then both header copies are overwritten with random
// bytes and synced. Then it removes the volume from the registry and
// deletes its backing file if it lives in the data dir. If a key cannot
// be destroyed, nothing is overwritten and the volume stays. Both
// providers destroy every DEK of the volume's UUID (DestroyVolume: the
// local keystore's secrets, Vault's KV v2 secrets); a Vault wrapping from
// before gl2 has no secret, and a copy of its header still opens with its
// Transit key.
func (r *Registry) Shred(name string) error {
	v, err := r.Get(name)
	if err != nil {
		return err
	}
	if !v.Encrypted {
		return fmt.Errorf("volume %s is plain: it has no key to destroy; remove or overwrite its backing store yourself", name)
	}
	if n := len(v.Snapshots); n > 0 {
		return fmt.Errorf("volume %s has %d snapshots (%s@%s first): delete them first with goldilocks volume snapshot delete", name, n, name, v.Snapshots[0].Name)
	}
	// An attached volume's gateway holds its key in memory and may write
	// its header again (the nonce reservation): shredding under it would
	// not stick. Live revocation is the policy issue's quarantine.
	f, err := r.openStore(v, false)
	if err != nil {
		return fmt.Errorf("%w: detach its clients first", err)
	}
	if err := r.destroyKeys(v); err != nil {
		f.Close()
		return err
	}
	junk := make([]byte, 2*crypto.HeaderBlockSize)
	if _, err := rand.Read(junk); err != nil {
		f.Close()
		return err
	}
	_, err = f.WriteAt(junk, 0)
	if err == nil {
		err = f.Flush()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("volume %s: destroying the key: %w", name, err)
	}
	if err := r.Remove(name); err != nil {
		return err
	}
	if !filepath.IsAbs(v.Backing) && !IsRemote(v) {
		os.Remove(r.BackingPath(v))
	}
	if id, err := v.UUIDBytes(); err == nil {
		anchor, err := r.anchorFor(v)
		if err == nil {
			err = anchor.Remove(id)
		}
		if err != nil {
			return fmt.Errorf("volume %s: shredded, but its rollback anchor stays: %w", name, err)
		}
	}
	return nil
}
