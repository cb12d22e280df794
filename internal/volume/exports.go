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
	"goldilocks/internal/block"
)

// Exports opens a registry's volumes for the connections that attach
// them (the CLI wires it to the gateway; this package knows nothing of
// NBD). Every connection to a volume shares one open device, so a flush on
// any connection covers the writes of all of them (NBD's CAN_MULTI_CONN).
type Exports struct {
	reg *Registry
	log *slog.Logger

	mu      sync.Mutex // guards open, handoff
	open    map[string]*shared
	handoff bool // SetHandoff
}

type shared struct {
	uuid    string
	opening chan struct{} // set while dev opens or closes, closed when that is done; nil otherwise
	dev     block.Device
	refs    int
}

// NewExports returns the shared opener of reg's volumes.
func NewExports(reg *Registry, log *slog.Logger) *Exports {
	return &Exports{reg: reg, log: log, open: make(map[string]*shared)}
}

// Attached is a volume opened for one connection: its record and the
// device every connection to it shares.
type Attached struct {
	Volume Volume
	Device block.Device
}

// Open opens the named volume for one connection (ErrNotFound if there
// is none); release ends the connection's share of it.
func (e *Exports) Open(name string) (a *Attached, release func(), err error) {
	if vol, snap, ok := SplitSnapshot(name); ok {
		return e.openSnapshot(vol, snap)
	}
	v, s, release, err := e.acquireVolume(name)
	if err != nil {
		return nil, nil, err
	}
	return &Attached{Volume: v, Device: s.dev}, release, nil
}

// openSnapshot opens snapshot snap of volume vol, read-only, for one
// connection: the view of the volume's shared device (ErrNotFound if
// either is unknown).
func (e *Exports) openSnapshot(vol, snap string) (*Attached, func(), error) {
	v, s, rel, err := e.acquireVolume(vol)
	if err != nil {
		return nil, nil, err
	}
	w, err := snapshotView(s.dev, BaseRef{Volume: vol, Snapshot: snap})
	if err != nil {
		rel()
		if errors.Is(err, crypto.ErrNoSnapshot) {
			return nil, nil, fmt.Errorf("%s@%s: %w", vol, snap, ErrNotFound)
		}
		return nil, nil, err
	}
	v.Name, v.ReadOnly, v.Snapshots = vol+"@"+snap, true, nil
	var once sync.Once
	return &Attached{Volume: v, Device: w}, func() { once.Do(func() { w.Close(); rel() }) }, nil
}

// openBase opens a clone's base through the shared devices: the base
// volume stays open (and attachable) while its clone is.
func (e *Exports) openBase(b BaseRef) (block.Device, func(), error) {
	dev, rel, err := e.acquire(b.Volume)
	if err != nil {
		return nil, nil, err
	}
	view, err := snapshotView(dev, b)
	if err != nil {
		rel()
		return nil, nil, err
	}
	return view, func() { view.Close(); rel() }, nil
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
	if err != nil {
		return v, nil, nil, err
	}
	e.mu.Lock()
	s := e.open[name]
	for s != nil && s.uuid == v.UUID && s.opening != nil {
		// Another attach opens it: wait for that (volumes open in
		// parallel, one attach each; an upgrade adopts them all at once).
		ch := s.opening
		e.mu.Unlock()
		<-ch
		e.mu.Lock()
		s = e.open[name]
	}
	if s == nil || s.uuid != v.UUID {
		// A replaced volume's old connections keep their device (and
		// their own reference) until they end.
		prev := s
		s = &shared{uuid: v.UUID, opening: make(chan struct{})}
		e.open[name] = s
		e.mu.Unlock()
		dev, err := e.reg.openDevice(v, e.log, e.openBase)
		e.mu.Lock()
		close(s.opening)
		s.opening, s.dev = nil, dev
		if err != nil {
			if e.open[name] == s {
				if prev != nil {
					e.open[name] = prev
				} else {
					delete(e.open, name)
				}
			}
			e.mu.Unlock()
			return v, nil, nil, err
		}
	}
	s.refs++
	e.mu.Unlock()
	var once sync.Once
	return v, s, func() { once.Do(func() { e.release(name, s) }) }, nil
}

func (e *Exports) release(name string, s *shared) {
	e.mu.Lock()
	s.refs--
	if s.refs > 0 {
		e.mu.Unlock()
		return
	}
	// Closing: an attach of the volume meanwhile waits for it (the store
	// is locked until then), as for an opening. The close runs without
	// e.mu: a clone's close releases its base volume here.
	s.opening = make(chan struct{})
	handoff := e.handoff
	e.mu.Unlock()
	if h, ok := s.dev.(block.Handoffer); ok && handoff {
		if err := h.Handoff(); err != nil {
			e.log.Error("volume handoff", "volume", name, "err", err)
		}
	} else {
		s.dev.Close()
	}
	e.mu.Lock()
	if e.open[name] == s {
		delete(e.open, name)
	}
	close(s.opening)
	e.mu.Unlock()
}

// SetHandoff makes the last release of a volume a handoff (block.Handoffer)
// instead of a close, while on: an upgrade in place sets it while it hands
// the connections to the new process, which opens the volumes right after.
func (e *Exports) SetHandoff(on bool) {
	e.mu.Lock()
	e.handoff = on
	e.mu.Unlock()
}

// List lists every volume.
func (e *Exports) List() ([]Volume, error) { return e.reg.List() }

// Get returns the named volume (ErrNotFound if there is none).
func (e *Exports) Get(name string) (Volume, error) { return e.reg.Get(name) }

// OpenDevice opens a volume's backing store, locked against other
// processes, as the device the gateway serves: the file itself for a plain
// volume, the decrypting crypto.Volume for an encrypted one.
func (r *Registry) OpenDevice(v Volume, log *slog.Logger) (block.Device, error) {
	return r.openDevice(v, log, func(b BaseRef) (block.Device, func(), error) {
		bv, err := r.Get(b.Volume)
		if err != nil {
			return nil, nil, err
		}
		dev, err := r.OpenDevice(bv, log)
		if err != nil {
			return nil, nil, err
		}
		view, err := snapshotView(dev, b)
		if err != nil {
			dev.Close()
			return nil, nil, err
		}
		return view, func() { view.Close(); dev.Close() }, nil
	})
}

// snapshotView opens the view of b on its volume's open device.
func snapshotView(dev block.Device, b BaseRef) (block.Device, error) {
	cv, ok := dev.(*crypto.Volume)
	if !ok {
		return nil, fmt.Errorf("%s@%s: %w", b.Volume, b.Snapshot, ErrNotFound)
	}
	view, err := cv.SnapshotView(b.Snapshot)
	if err != nil {
		return nil, fmt.Errorf("%s@%s: %w", b.Volume, b.Snapshot, err)
	}
	return view, nil
}

// baseOpener opens a clone's base: the view of a snapshot, and what lets
// it go.
type baseOpener func(BaseRef) (block.Device, func(), error)

// openDevice is OpenDevice with a clone's base opened by openBase.
func (r *Registry) openDevice(v Volume, log *slog.Logger, openBase baseOpener) (block.Device, error) {
	// Encrypted volumes are opened read-write even when served read-only:
	// the nonce reservation lives in the header.
	f, err := r.openStoreLog(v, v.ReadOnly && !v.Encrypted, log)
	if err != nil {
		return nil, err
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
	anchor, err := r.anchorFor(v)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	opt := crypto.Options{Anchor: anchor, Cache: r.cache, Pools: r.pools, NoAlign: r.noAlign}
	if v.Base != nil {
		base, release, err := openBase(*v.Base)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("volume %s: its base: %w", v.Name, err)
		}
		opt.Base, opt.Release = base, release
	}
	cv, err := crypto.Open(context.Background(), f, v.Name, id, kek, log, opt)
	if err != nil {
		f.Close()
		if opt.Release != nil {
			opt.Release()
		}
		return nil, err
	}
	if err := r.loadSnapshots(v, cv, kek, log); err != nil {
		cv.Close()
		return nil, err
	}
	return cv, nil
}

// Describe is a one-line description of a volume (NBD_INFO_DESCRIPTION):
// its kind and size, then its labels, sorted.
func Describe(v Volume) string {
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
