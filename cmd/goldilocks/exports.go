package main

import (
	"errors"
	"fmt"
	"time"

	"goldilocks/crypto"
	"goldilocks/crypto/cowmap"
	"goldilocks/gateway"
	"goldilocks/internal/block"
	"goldilocks/internal/volume"
)

// gatewayExports is the registry's volumes as the gateway sees them: the
// one place where volumes meet NBD.
type gatewayExports struct{ vols *volume.Exports }

func (g gatewayExports) Open(name string) (*gateway.Export, func(), error) {
	a, release, err := g.vols.Open(name)
	if err != nil {
		return nil, nil, openError(err)
	}
	return &gateway.Export{
		Name:        a.Volume.Name,
		Description: volume.Describe(a.Volume),
		Device:      a.Device,
		ReadOnly:    a.Volume.ReadOnly,
		MultiConn:   true,
	}, release, nil
}

func (g gatewayExports) List() ([]gateway.ExportInfo, error) {
	vols, err := g.vols.List()
	if err != nil {
		return nil, err
	}
	out := make([]gateway.ExportInfo, 0, len(vols))
	for _, v := range vols {
		info := gateway.ExportInfo{Name: v.Name, Description: volume.Describe(v), Labels: v.Labels}
		for _, sn := range v.Snapshots {
			info.Changed = append(info.Changed, sn.Name)
		}
		out = append(out, info)
		for _, sn := range v.Snapshots { // read-only exports NAME@SNAP
			out = append(out, gateway.ExportInfo{Name: v.Name + "@" + sn.Name,
				Description: fmt.Sprintf("snapshot of %s taken %s", volume.Describe(v), sn.Created.Format(time.RFC3339)), Labels: v.Labels})
		}
	}
	return out, nil
}

// openError maps why a volume did not open to what the gateway tells the
// client: an unknown export, or a message the client should understand
// (gateway.OpenError); the detail stays in the log.
func openError(err error) error {
	public := ""
	switch {
	case errors.Is(err, volume.ErrNotFound):
		return gateway.ErrUnknownExport
	case errors.Is(err, crypto.ErrVaultUnavailable):
		public = "the key service (Vault) is unreachable: the volume's key cannot be unwrapped now; try again later"
	case errors.Is(err, block.ErrLeased):
		public = "the volume is in use by another gateway (its lease is held there): try again once it is released"
	case errors.Is(err, crypto.ErrRollback):
		public = "the volume's backing store is older than its rollback anchor: refused (the gateway's log says more)"
	case errors.Is(err, crypto.ErrHeaderAuth), errors.Is(err, crypto.ErrHeaderCorrupt), errors.Is(err, crypto.ErrWrongVolume),
		errors.Is(err, crypto.ErrStoreTooSmall), errors.Is(err, cowmap.ErrMapAuth):
		public = "the volume failed its integrity check: refused (the gateway's log says more)"
	case errors.Is(err, crypto.ErrNeedsUpgrade):
		public = "the volume is in format 1: run goldilocks volume upgrade"
	default:
		return err
	}
	return &gateway.OpenError{Public: public, Err: err}
}

// Labels is one volume's labels (gateway.Labeler: no listing per attach).
func (g gatewayExports) Labels(name string) (map[string]string, bool) {
	if vol, _, ok := volume.SplitSnapshot(name); ok {
		name = vol // a snapshot has its volume's labels
	}
	v, err := g.vols.Get(name)
	if err != nil {
		return nil, false
	}
	return v.Labels, true
}
