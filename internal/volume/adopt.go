package volume

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/internal/block"
	"goldilocks/internal/rbd"
	"goldilocks/internal/upstream"
)

// Several gateways, one storage: a volume's metadata lives with it (an
// encrypted volume's header; for an RBD image also the image metadata
// rbd.MetaVolume), so a gateway on another host adopts it into its own
// registry (Adopt), and an RBD image's exclusive lock is the lease that
// keeps two gateways from writing it at once (openStoreLog takes it for
// every read-write open; BreakLease breaks a dead holder's).

// ErrNotAdoptable: the backing store holds no volume this gateway can
// take (no Goldilocks header and no --plain, or a key it cannot reach).
var ErrNotAdoptable = errors.New("nothing to adopt")

// remoteMeta is what an RBD image's rbd.MetaVolume holds (JSON).
type remoteMeta struct {
	Version   int       `json:"version"`
	UUID      string    `json:"uuid"`
	Size      int64     `json:"size"`
	Encrypted bool      `json:"encrypted"`
	Created   time.Time `json:"created"`
}

// holder is how this registry's gateway names itself in a lease.
func (r *Registry) holder() string {
	host, _ := os.Hostname()
	return fmt.Sprintf("host=%s pid=%d data-dir=%s since=%s", host, os.Getpid(), r.dir, time.Now().UTC().Format(time.RFC3339))
}

// describeRemote records v on its RBD image (rbd.MetaVolume); other
// stores carry nothing beyond an encrypted volume's header.
func (r *Registry) describeRemote(v Volume) error {
	if !rbd.IsSpec(v.Backing) {
		return nil
	}
	d, err := r.openStore(v, false)
	if err != nil {
		return err
	}
	defer d.Close()
	img, ok := d.(*rbd.Image)
	if !ok {
		return nil
	}
	b, _ := json.Marshal(remoteMeta{Version: 1, UUID: v.UUID, Size: v.Size, Encrypted: v.Encrypted, Created: v.Created})
	if err := img.SetMetadata(rbd.MetaVolume, string(b)); err != nil {
		return fmt.Errorf("volume %s: %w", v.Name, err)
	}
	return nil
}

// AdoptOptions name a volume another gateway made, and how to serve it.
type AdoptOptions struct {
	Name    string
	Backing string // an RBD image, an upstream NBD export, or a path
	// Plain adopts a store without a Goldilocks header as a plain volume.
	Plain    bool
	ReadOnly bool
	Labels   map[string]string
}

// Adopt adds a volume whose backing store another gateway created (or
// one that was released) to this registry, under a name of this
// registry's choosing. An encrypted volume's header gives its UUID, size
// and key, and the key must unwrap here (the KEK provider both gateways
// reach: Vault); a plain one on RBD takes the image's metadata, else the
// store's size and a new UUID. Nothing is written to the store.
func (r *Registry) Adopt(ctx context.Context, o AdoptOptions) (Volume, error) {
	if !nameRE.MatchString(o.Name) {
		return Volume{}, fmt.Errorf("volume %q: %w", o.Name, ErrInvalidName)
	}
	backing := o.Backing
	if !isRemote(backing) {
		abs, err := filepath.Abs(backing)
		if err != nil {
			return Volume{}, err
		}
		backing = abs
	}
	v := Volume{Name: o.Name, Backing: backing, ReadOnly: o.ReadOnly, Labels: o.Labels, Created: time.Now().UTC().Truncate(time.Millisecond)}
	d, err := r.openStore(v, true)
	if err != nil {
		return Volume{}, err
	}
	defer d.Close()
	var magic [16]byte
	if _, err := d.ReadAt(magic[:], 0); err != nil && !errors.Is(err, io.EOF) {
		return Volume{}, fmt.Errorf("volume %s: reading %s: %w", o.Name, backing, err)
	}
	format, ferr := crypto.HeaderFormat(magic[:])
	switch {
	case ferr == nil && o.Plain:
		return Volume{}, fmt.Errorf("volume %s: %s holds an encrypted volume (format %d): adopt it without --plain", o.Name, backing, format)
	case ferr == nil && format == 1:
		return Volume{}, fmt.Errorf("volume %s: %s holds a format-1 volume: upgrade it where it was made (goldilocks volume upgrade) first: %w", o.Name, backing, ErrNotAdoptable)
	case ferr == nil:
		if err := r.adoptEncrypted(ctx, d, &v); err != nil {
			return Volume{}, err
		}
	case !o.Plain:
		return Volume{}, fmt.Errorf("volume %s: %s has no Goldilocks volume header: %w (pass --plain to adopt it as a plain volume)", o.Name, backing, ErrNotAdoptable)
	default:
		if err := r.adoptPlain(d, &v); err != nil {
			return Volume{}, err
		}
	}
	err = r.update(func(vols []Volume) ([]Volume, error) {
		for _, e := range vols {
			switch {
			case e.Name == v.Name:
				return nil, fmt.Errorf("volume %s: %w", v.Name, ErrExists)
			case r.BackingPath(e) == r.BackingPath(v):
				return nil, fmt.Errorf("volume %s: backing %s already holds volume %s here", v.Name, v.Backing, e.Name)
			case e.UUID == v.UUID:
				return nil, fmt.Errorf("volume %s: volume %s here has the same UUID %s", v.Name, e.Name, v.UUID)
			}
		}
		return append(vols, v), nil
	})
	if err != nil {
		return Volume{}, err
	}
	return v, nil
}

func (r *Registry) adoptEncrypted(ctx context.Context, d block.Device, v *Volume) error {
	b := make([]byte, 2*crypto.HeaderBlockSize)
	if _, err := d.ReadAt(b, 0); err != nil {
		return fmt.Errorf("volume %s: reading the volume header: %w", v.Name, err)
	}
	h, _, err := crypto.PickHeader(b[:crypto.HeaderBlockSize], b[crypto.HeaderBlockSize:])
	if err != nil {
		return fmt.Errorf("volume %s: %w", v.Name, err)
	}
	kek, err := r.KEK(h.KEK.Provider)
	if err != nil {
		return fmt.Errorf("volume %s: %w", v.Name, err)
	}
	if _, err := crypto.CheckKey(ctx, d, v.Name, h.UUID, kek, slog.New(slog.DiscardHandler)); err != nil {
		hint := ""
		if h.KEK.Provider == "local" {
			hint = " (its key is in the local keystore of the gateway that made it: volumes that move between gateways keep their keys in Vault, --kek vault:KEY)"
		}
		return fmt.Errorf("%w: %w%s", ErrNotAdoptable, err, hint)
	}
	v.UUID = uuid.UUID(h.UUID).String()
	v.Size = int64(h.Size)
	v.Encrypted = true
	v.KEK = &KEKRef{Provider: h.KEK.Provider, Key: h.KEK.Name, Version: int(h.KEK.Version)}
	return nil
}

func (r *Registry) adoptPlain(d block.Device, v *Volume) error {
	v.UUID = uuid.NewString()
	v.Size = d.Size() &^ (SizeAlign - 1)
	if img, ok := d.(*rbd.Image); ok {
		s, err := img.Metadata(rbd.MetaVolume)
		if err != nil {
			return fmt.Errorf("volume %s: %w", v.Name, err)
		}
		if s != "" {
			var m remoteMeta
			if err := json.Unmarshal([]byte(s), &m); err != nil || m.Version != 1 {
				return fmt.Errorf("volume %s: image metadata %s is not one this gateway reads: %q", v.Name, rbd.MetaVolume, s)
			}
			if m.Encrypted {
				return fmt.Errorf("volume %s: image metadata says encrypted, but the image has no volume header: %w", v.Name, ErrNotAdoptable)
			}
			if _, err := uuid.Parse(m.UUID); err == nil && m.Size > 0 && m.Size <= d.Size() {
				v.UUID, v.Size = m.UUID, m.Size
			}
		}
	}
	if v.Size == 0 {
		return fmt.Errorf("volume %s: backing %s is empty: %w", v.Name, v.Backing, ErrNotAdoptable)
	}
	return nil
}

// BreakLease breaks the lease another gateway holds on v's backing store
// (an RBD image's exclusive lock: the holder is blocklisted, so it cannot
// write again even if it lives; an upstream volume's lease in Vault: the
// holder fences itself at its next renewal, lease.go) and returns who
// held it ("" if nobody did). Stores without a lease say so.
func (r *Registry) BreakLease(v Volume) (string, error) {
	if upstream.IsURI(v.Backing) {
		return r.breakUpstreamLease(v)
	}
	if !rbd.IsSpec(v.Backing) {
		return "", fmt.Errorf("volume %s: backing %s has no lease to break (only RBD images and upstream exports are leased)", v.Name, v.Backing)
	}
	spec, err := rbd.Parse(v.Backing)
	if err != nil {
		return "", fmt.Errorf("volume %s: %w", v.Name, err)
	}
	who, err := rbd.BreakLease(spec)
	if err != nil {
		return who, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	return who, nil
}
