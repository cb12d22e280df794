package volume

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"goldilocks/crypto"
	"goldilocks/internal/block"
	"goldilocks/internal/rbd"
	"goldilocks/internal/upstream"
)

// A volume's backing store is a file or block device (a path, locked
// with flock against a second gateway on the same host), a Ceph RBD image
// (leased: its exclusive lock, taken at every read-write open, adopt.go),
// or an export of another NBD server (upstream.IsURI: nbd://… or
// nbd+unix://…), leased in Vault where the volume's key is there
// (lease.go); for other volumes on an upstream export, two gateways
// attaching it at once is the operator's to prevent.

// SetOutageLimit sets how long requests to an upstream backing store wait
// while it is unreachable before they fail (0: upstream's default, 30 s).
func (r *Registry) SetOutageLimit(d time.Duration) { r.outageLimit = d }

// SetUpstreamConns sets how many connections an upstream backing store
// that advertises multi-conn gets (0: upstream's default).
func (r *Registry) SetUpstreamConns(n int) { r.upstreamConns = n }

// SetAlignHomes turns home alignment of encrypted volumes on (the
// default) or off (crypto.Options.NoAlign).
func (r *Registry) SetAlignHomes(on bool) { r.noAlign = !on }

// IsRemote reports whether v's backing store is not a local path: an
// upstream NBD export or a Ceph RBD image.
func IsRemote(v Volume) bool { return isRemote(v.Backing) }

func isRemote(backing string) bool { return upstream.IsURI(backing) || rbd.IsSpec(backing) }

// store is an open backing store.
type store interface {
	block.Device
	// Limit serves only the first size bytes.
	Limit(size int64)
}

// openStore opens v's backing store for I/O; a local one is locked.
func (r *Registry) openStore(v Volume, readOnly bool) (store, error) {
	return r.openStoreLog(v, readOnly, nil)
}

// openStoreLog is openStore with a logger for an upstream's outages.
func (r *Registry) openStoreLog(v Volume, readOnly bool, log *slog.Logger) (store, error) {
	if rbd.IsSpec(v.Backing) {
		spec, err := rbd.Parse(v.Backing)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		img, err := rbd.Open(spec)
		if err != nil {
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		if !readOnly { // the lease (adopt.go): one writing gateway
			if err := img.AcquireLease(r.holder()); err != nil {
				img.Close()
				return nil, fmt.Errorf("volume %s: %w", v.Name, err)
			}
		}
		return img, nil
	}
	if IsRemote(v) {
		if log != nil {
			log = log.With("volume", v.Name)
		}
		o, err := r.upstreamOptions(v, readOnly, log) // the lease (lease.go)
		if err != nil {
			return nil, err
		}
		d, err := upstream.Dial(context.Background(), v.Backing, o)
		if err != nil {
			if o.Lease != nil {
				o.Lease.Release()
			}
			return nil, fmt.Errorf("volume %s: %w", v.Name, err)
		}
		return d, nil
	}
	f, err := block.OpenFile(r.BackingPath(v), readOnly)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	if err := f.Lock(); err != nil {
		f.Close()
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	return f, nil
}

// remoteSize is the size of a remote backing store.
func (r *Registry) remoteSize(backing string) (int64, error) {
	d, err := r.openStore(Volume{Name: "(new)", Backing: backing}, true)
	if err != nil {
		return 0, err
	}
	defer d.Close()
	return d.Size(), nil
}

// header reads the first n bytes of v's backing store without a lock.
func (r *Registry) header(v Volume, n int) ([]byte, error) {
	b := make([]byte, n)
	if IsRemote(v) {
		d, err := r.openStore(v, true)
		if err != nil {
			return nil, err
		}
		defer d.Close()
		if _, err := d.ReadAt(b, 0); err != nil {
			return nil, err
		}
		return b, nil
	}
	f, err := block.OpenFile(r.BackingPath(v), true)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if _, err := io.ReadFull(io.NewSectionReader(f, 0, int64(n)), b); err != nil {
		return nil, err
	}
	return b, nil
}

// Header reads an encrypted volume's current header without its key (the
// MAC is not checked): for `volume info` and key status.
func (r *Registry) Header(v Volume) (*crypto.Header, error) {
	b, err := r.header(v, 2*crypto.HeaderBlockSize)
	if err != nil {
		return nil, fmt.Errorf("volume %s: reading the volume header: %w", v.Name, err)
	}
	h, _, err := crypto.PickHeader(b[:crypto.HeaderBlockSize], b[crypto.HeaderBlockSize:])
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	return h, nil
}

// Format is the format version v's header claims (1 for volumes that
// need `volume upgrade`).
func (r *Registry) Format(v Volume) (int, error) {
	b, err := r.header(v, 16)
	if err != nil {
		return 0, err
	}
	f, err := crypto.HeaderFormat(b)
	return int(f), err
}
