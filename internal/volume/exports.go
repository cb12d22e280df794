package volume

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"sync"

	"goldilocks/crypto"
	"goldilocks/crypto/cowmap"
	"goldilocks/gateway"
	"goldilocks/internal/block"
)

// Exports serves a registry's volumes to the gateway. Every connection to
// a volume shares one open device, so a flush on any connection covers the
// writes of all of them (NBD's CAN_MULTI_CONN).
type Exports struct {
	reg *Registry
	log *slog.Logger

	mu   sync.Mutex // guards open
	open map[string]*shared
}

type shared struct {
	uuid string
	dev  block.Device
	refs int
}

var _ gateway.Exports = (*Exports)(nil)

// NewExports returns the gateway's view of reg.
func NewExports(reg *Registry, log *slog.Logger) *Exports {
	return &Exports{reg: reg, log: log, open: make(map[string]*shared)}
}

// Open opens the named volume for one connection.
func (e *Exports) Open(name string) (*gateway.Export, func(), error) {
	v, s, release, err := e.acquireVolume(name)
	if err != nil {
		return nil, nil, publicError(err)
	}
	exp := &gateway.Export{
		Name:        v.Name,
		Description: describe(v),
		Device:      s.dev,
		ReadOnly:    v.ReadOnly,
		MultiConn:   true,
	}
	return exp, release, nil
}

// acquire takes a reference on the named volume's shared device, opening
// it if nobody has.
func (e *Exports) acquire(name string) (block.Device, func(), error) {
	_, s, release, err := e.acquireVolume(name)
	if err != nil {
		return nil, nil, err
	}
	return s.dev, release, nil
}

func (e *Exports) acquireVolume(name string) (Volume, *shared, func(), error) {
	v, err := e.reg.Get(name)
	if errors.Is(err, ErrNotFound) {
		return v, nil, nil, gateway.ErrUnknownExport
	}
	if err != nil {
		return v, nil, nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.open[name]
	if s == nil || s.uuid != v.UUID {
		dev, err := e.reg.OpenDevice(v, e.log)
		if err != nil {
			return v, nil, nil, err
		}
		// A replaced volume's old connections keep their device (and
		// their own reference) until they end.
		s = &shared{uuid: v.UUID, dev: dev}
		e.open[name] = s
	}
	s.refs++
	var once sync.Once
	return v, s, func() { once.Do(func() { e.release(name, s) }) }, nil
}

func (e *Exports) release(name string, s *shared) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s.refs--
	if s.refs > 0 {
		return
	}
	if e.open[name] == s {
		delete(e.open, name)
	}
	s.dev.Close()
}

// List lists every volume.
func (e *Exports) List() ([]gateway.ExportInfo, error) {
	vols, err := e.reg.List()
	if err != nil {
		return nil, err
	}
	out := make([]gateway.ExportInfo, 0, len(vols))
	for _, v := range vols {
		out = append(out, gateway.ExportInfo{Name: v.Name, Description: describe(v), Labels: v.Labels})
	}
	return out, nil
}

// OpenDevice opens a volume's backing store, locked against other
// processes, as the device the gateway serves: the file itself for a plain
// volume, the decrypting crypto.Volume for an encrypted one.
func (r *Registry) OpenDevice(v Volume, log *slog.Logger) (block.Device, error) {
	// Encrypted volumes are opened read-write even when served read-only:
	// the nonce reservation lives in the header.
	f, err := block.OpenFile(r.BackingPath(v), v.ReadOnly && !v.Encrypted)
	if err != nil {
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	if err := f.Lock(); err != nil {
		f.Close()
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	if !v.Encrypted {
		if f.Size() < v.Size {
			f.Close()
			return nil, fmt.Errorf("volume %s: backing store holds %d bytes, registry says %d", v.Name, f.Size(), v.Size)
		}
		f.Limit(v.Size) // a larger block device or file serves the volume's size
		return f, nil
	}
	id, err := v.UUIDBytes()
	if err != nil {
		f.Close()
		return nil, err
	}
	provider := "local"
	if v.KEK != nil {
		provider = v.KEK.Provider
	}
	kek, err := r.KEK(provider)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	cv, err := crypto.Open(context.Background(), f, v.Name, id, kek, log, crypto.Options{Anchor: r.Anchor(), Cache: r.cache, Pools: r.pools})
	if err != nil {
		f.Close()
		return nil, err
	}
	return cv, nil
}

// describe is a volume's NBD description (NBD_INFO_DESCRIPTION, LIST):
// its kind and size, then its labels, sorted.
func describe(v Volume) string {
	kind := "plain"
	if v.Encrypted {
		kind = "encrypted"
	}
	d := fmt.Sprintf("%s volume, %d bytes", kind, v.Size)
	if len(v.Labels) > 0 {
		keys := slices.Sorted(maps.Keys(v.Labels))
		for i, k := range keys {
			keys[i] = k + "=" + v.Labels[k]
		}
		d += "; " + strings.Join(keys, ", ")
	}
	return d
}

// publicError gives the errors an attaching client should understand a
// message it may see (gateway.OpenError); the detail stays in the log.
func publicError(err error) error {
	switch {
	case errors.Is(err, crypto.ErrVaultUnavailable):
		return &gateway.OpenError{Public: "the key service (Vault) is unreachable: the volume's key cannot be unwrapped now; try again later", Err: err}
	case errors.Is(err, crypto.ErrRollback):
		return &gateway.OpenError{Public: "the volume's backing store is older than its rollback anchor: refused (the gateway's log says more)", Err: err}
	case errors.Is(err, crypto.ErrHeaderAuth), errors.Is(err, crypto.ErrHeaderCorrupt), errors.Is(err, crypto.ErrWrongVolume),
		errors.Is(err, crypto.ErrStoreTooSmall), errors.Is(err, cowmap.ErrMapAuth):
		return &gateway.OpenError{Public: "the volume failed its integrity check: refused (the gateway's log says more)", Err: err}
	case errors.Is(err, crypto.ErrNeedsUpgrade):
		return &gateway.OpenError{Public: "the volume is in format 1: run goldilocks volume upgrade", Err: err}
	}
	return err
}
