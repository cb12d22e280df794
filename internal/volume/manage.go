package volume

import (
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"

	"goldilocks/internal/block"
)

// Errors of the management operations, for callers to branch on.
var (
	ErrShrink       = errors.New("shrinking loses the data past the new end")
	ErrResizeFormat = errors.New("an encrypted volume's size is fixed by its format (the second home of every chunk sits at an offset that depends on it)")
)

// lockBacking opens v's backing store and takes its lock: the volume is
// not attached (a gateway that serves it holds the lock).
func (r *Registry) lockBacking(v Volume) (store, error) {
	f, err := r.openStore(v, false)
	if err != nil {
		return nil, fmt.Errorf("%w: detach its clients first", err)
	}
	return f, nil
}

// SetLabels sets the labels in set and removes those named in rm, and
// returns the volume as it then is. A label both set and removed is an
// error; removing one that is not there is not.
func (r *Registry) SetLabels(name string, set map[string]string, rm []string) (Volume, error) {
	for _, k := range rm {
		if _, ok := set[k]; ok {
			return Volume{}, fmt.Errorf("volume %s: label %q both set and removed", name, k)
		}
	}
	for k := range set {
		if k == "" {
			return Volume{}, fmt.Errorf("volume %s: a label needs a key (KEY=VALUE)", name)
		}
	}
	var out Volume
	err := r.update(func(vols []Volume) ([]Volume, error) {
		for i := range vols {
			if vols[i].Name != name {
				continue
			}
			l := maps.Clone(vols[i].Labels)
			if l == nil {
				l = map[string]string{}
			}
			maps.Copy(l, set)
			for _, k := range rm {
				delete(l, k)
			}
			if len(l) == 0 {
				l = nil
			}
			vols[i].Labels = l
			out = vols[i]
			return vols, nil
		}
		return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
	})
	return out, err
}

// Resize sets a plain volume's size: a backing file in the data dir (or
// elsewhere) grows sparse or is cut; a block device must hold the new
// size. Shrinking needs allowShrink. The volume must not be attached.
// Encrypted volumes are refused (ErrResizeFormat).
func (r *Registry) Resize(name string, size int64, allowShrink bool) (Volume, error) {
	v, err := r.Get(name)
	if err != nil {
		return Volume{}, err
	}
	if size <= 0 || size%SizeAlign != 0 {
		return Volume{}, fmt.Errorf("volume %s: size %d is not a positive multiple of %d", name, size, SizeAlign)
	}
	if v.Encrypted {
		return Volume{}, fmt.Errorf("volume %s: %w: export it, create a new volume and import", name, ErrResizeFormat)
	}
	if IsRemote(v) {
		return Volume{}, fmt.Errorf("volume %s: its size is the upstream export's (%s): resize it there, then create the volume again", name, v.Backing)
	}
	if size < v.Size && !allowShrink {
		return Volume{}, fmt.Errorf("volume %s: %d to %d bytes: %w (--allow-shrink if that is what you want)", name, v.Size, size, ErrShrink)
	}
	f, err := r.lockBacking(v)
	if err != nil {
		return Volume{}, err
	}
	defer f.Close()
	file := f.(*block.File)
	st, err := file.File().Stat()
	if err != nil {
		return Volume{}, fmt.Errorf("volume %s: %w", name, err)
	}
	if st.Mode().IsRegular() {
		if err := file.File().Truncate(size); err != nil {
			return Volume{}, fmt.Errorf("volume %s: %w", name, err)
		}
		if err := file.File().Sync(); err != nil {
			return Volume{}, fmt.Errorf("volume %s: %w", name, err)
		}
	} else if f.Size() < size {
		return Volume{}, fmt.Errorf("volume %s: its block device %s holds %d bytes, fewer than %d", name, r.BackingPath(v), f.Size(), size)
	}
	var out Volume
	err = r.update(func(vols []Volume) ([]Volume, error) {
		for i := range vols {
			if vols[i].Name == name {
				vols[i].Size = size
				out = vols[i]
				return vols, nil
			}
		}
		return nil, fmt.Errorf("volume %s: %w", name, ErrNotFound)
	})
	return out, err
}

// Delete removes a volume. An encrypted one is shredded (its key
// destroyed, Shred), since its backing store is unreadable without it. A
// plain one leaves the registry; its backing store stays unless shred,
// which overwrites it with zeros (synced) and then removes a backing file
// that lives in the data dir. The volume must not be attached.
func (r *Registry) Delete(name string, shred bool, progress func(done, total int64)) error {
	v, err := r.Get(name)
	if err != nil {
		return err
	}
	if v.Encrypted {
		return r.Shred(name)
	}
	f, err := r.lockBacking(v)
	if err != nil {
		return err
	}
	defer f.Close()
	if shred {
		if err := zeroAll(f, v.Size, progress); err != nil {
			return fmt.Errorf("volume %s: overwriting its backing store: %w", name, err)
		}
	}
	if err := r.Remove(name); err != nil {
		return err
	}
	if shred && !filepath.IsAbs(v.Backing) && !IsRemote(v) {
		if err := os.Remove(r.BackingPath(v)); err != nil {
			return fmt.Errorf("volume %s: removed, but its backing file stays: %w", name, err)
		}
	}
	return nil
}

// zeroAll writes zeros over the first size bytes of f and syncs.
func zeroAll(f block.Device, size int64, progress func(done, total int64)) error {
	buf := make([]byte, 1<<20)
	for off := int64(0); off < size; {
		n := min(int64(len(buf)), size-off)
		if _, err := f.WriteAt(buf[:n], off); err != nil {
			return err
		}
		off += n
		if progress != nil {
			progress(off, size)
		}
	}
	return f.Flush()
}
