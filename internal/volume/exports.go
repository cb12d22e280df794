package volume

import (
	"errors"
	"fmt"
	"sync"

	"goldilocks/gateway"
	"goldilocks/internal/block"
)

// Exports serves a registry's volumes to the gateway. Every connection to
// a volume shares one open device, so a flush on any connection covers the
// writes of all of them (NBD's CAN_MULTI_CONN).
type Exports struct {
	reg *Registry

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
func NewExports(reg *Registry) *Exports {
	return &Exports{reg: reg, open: make(map[string]*shared)}
}

// Open opens the named volume for one connection.
func (e *Exports) Open(name string) (*gateway.Export, func(), error) {
	v, err := e.reg.Get(name)
	if errors.Is(err, ErrNotFound) {
		return nil, nil, gateway.ErrUnknownExport
	}
	if err != nil {
		return nil, nil, err
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.open[name]
	if s == nil || s.uuid != v.UUID {
		if v.Encrypted {
			return nil, nil, fmt.Errorf("volume %s: encrypted volumes are not served by this build", name)
		}
		dev, err := block.OpenFile(e.reg.BackingPath(v), v.ReadOnly)
		if err != nil {
			return nil, nil, fmt.Errorf("volume %s: %w", name, err)
		}
		if dev.Size() < v.Size {
			dev.Close()
			return nil, nil, fmt.Errorf("volume %s: backing store holds %d bytes, registry says %d", name, dev.Size(), v.Size)
		}
		s = &shared{uuid: v.UUID, dev: sized(dev, v.Size)}
		if old := e.open[name]; old != nil {
			// The volume was replaced; connections to the old one keep
			// their device until they end.
			delete(e.open, name)
		}
		e.open[name] = s
	}
	s.refs++
	var once sync.Once
	release := func() { once.Do(func() { e.release(name, s) }) }
	exp := &gateway.Export{
		Name:      v.Name,
		Device:    s.dev,
		ReadOnly:  v.ReadOnly,
		MultiConn: true,
	}
	return exp, release, nil
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
		kind := "plain"
		if v.Encrypted {
			kind = "encrypted"
		}
		out = append(out, gateway.ExportInfo{Name: v.Name, Description: fmt.Sprintf("%s volume, %d bytes", kind, v.Size)})
	}
	return out, nil
}

// sized returns dev limited to the registry's size when the backing store
// is larger (a block device or file bigger than the volume).
func sized(dev *block.File, size int64) block.Device {
	dev.Limit(size)
	return dev
}
