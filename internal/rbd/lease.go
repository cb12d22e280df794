//go:build ceph

package rbd

import (
	"errors"
	"fmt"
	"strings"
	"syscall"

	gorbd "github.com/ceph/go-ceph/rbd"

	"goldilocks/internal/block"
)

// Image metadata keys (rbd image-meta) that Goldilocks keeps on an image.
const (
	// MetaVolume describes the volume the image holds (JSON), so that a
	// gateway on another host can adopt it.
	MetaVolume = "goldilocks.volume"
	// MetaLease names the gateway that holds the image's exclusive lock.
	MetaLease = "goldilocks.lease"
)

// AcquireLease takes the image's exclusive lock (the exclusive-lock
// feature; rbd_lock_acquire) for this client and records holder next to
// it. While it is held, librbd refuses every other client's writes, and
// no other gateway can take it; it ends at Close, or when another client
// breaks it (BreakLease), which blocklists this one. An image without the
// exclusive-lock feature is refused: nothing would keep a second writer
// out.
func (i *Image) AcquireLease(holder string) error {
	f, err := i.img.GetFeatures()
	if err != nil {
		return fmt.Errorf("rbd %s: %w", i.spec, errno(err))
	}
	if f&gorbd.FeatureExclusiveLock == 0 {
		return fmt.Errorf("rbd %s: the image lacks the exclusive-lock feature that keeps a second gateway from writing it (rbd feature enable %s/%s exclusive-lock)", i.spec, i.spec.Pool, i.spec.Image)
	}
	if err := i.img.LockAcquire(gorbd.LockModeExclusive); err != nil {
		e := errno(err)
		if errors.Is(e, syscall.EROFS) || errors.Is(e, syscall.EBUSY) || errors.Is(e, syscall.EAGAIN) {
			return fmt.Errorf("rbd %s: %w (%s)", i.spec, block.ErrLeased, i.holder())
		}
		return fmt.Errorf("rbd %s: taking the exclusive lock: %w", i.spec, e)
	}
	if err := i.img.SetMetadata(MetaLease, holder); err != nil {
		i.img.LockRelease()
		return fmt.Errorf("rbd %s: recording the lease: %w", i.spec, errno(err))
	}
	i.leased = true
	return nil
}

// holder describes who holds the lock: the gateway its metadata names and
// librbd's owner.
func (i *Image) holder() string {
	var parts []string
	if h, err := i.img.GetMetadata(MetaLease); err == nil && h != "" {
		parts = append(parts, "held by "+h)
	}
	if owners, err := i.img.LockGetOwners(); err == nil {
		for _, o := range owners {
			parts = append(parts, "librbd owner "+o.Owner)
		}
	}
	if len(parts) == 0 {
		return "holder unknown"
	}
	return strings.Join(parts, "; ")
}

// releaseLease ends a lease this image holds.
func (i *Image) releaseLease() {
	if !i.leased {
		return
	}
	i.leased = false
	i.img.RemoveMetadata(MetaLease)
	i.img.LockRelease()
}

// BreakLease breaks whatever exclusive lock another client holds on the
// image: librbd blocklists that client in the cluster (its writes fail
// from then on, even if it lives), then forgets the lock. It returns who
// held it ("" if nobody did).
func BreakLease(s Spec) (string, error) {
	i, err := Open(s)
	if err != nil {
		return "", err
	}
	defer i.Close()
	owners, err := i.img.LockGetOwners()
	if err != nil {
		if errors.Is(errno(err), syscall.ENOENT) {
			return "", nil
		}
		return "", fmt.Errorf("rbd %s: listing the lock's owners: %w", s, errno(err))
	}
	if len(owners) == 0 {
		return "", nil
	}
	who := i.holder()
	for _, o := range owners {
		if err := i.img.LockBreak(o.Mode, o.Owner); err != nil {
			return who, fmt.Errorf("rbd %s: breaking the lock of %s: %w", s, o.Owner, errno(err))
		}
	}
	i.img.RemoveMetadata(MetaLease)
	return who, nil
}

// Metadata returns the image's metadata value for key ("" and no error
// if it has none).
func (i *Image) Metadata(key string) (string, error) {
	v, err := i.img.GetMetadata(key)
	if errors.Is(errno(err), syscall.ENOENT) {
		return "", nil
	}
	if err != nil {
		return "", fmt.Errorf("rbd %s: metadata %s: %w", i.spec, key, errno(err))
	}
	return v, nil
}

// SetMetadata sets the image's metadata value for key.
func (i *Image) SetMetadata(key, value string) error {
	if err := i.img.SetMetadata(key, value); err != nil {
		return fmt.Errorf("rbd %s: metadata %s: %w", i.spec, key, errno(err))
	}
	return nil
}
