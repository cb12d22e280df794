package volume

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"path/filepath"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/internal/rbd"
)

// ErrHoldsVolume: the store named as a new volume's backing already holds
// a Goldilocks volume (made here or by another gateway on shared storage).
// Creating over it would destroy that volume: Create refuses unless told
// to overwrite, and points at Adopt.
var ErrHoldsVolume = errors.New("creating over it would destroy it")

// HeldVolume describes the Goldilocks volume that backing (a path, an
// upstream export or an RBD image) already holds, as "an encrypted volume
// (format 2, uuid …)" or "a plain volume (uuid …)", or returns "" when it
// holds none that shows: an encrypted volume's header (either copy: one
// may be torn), or a volume's RBD image metadata. A plain volume on a
// file or an upstream export leaves no mark. A store that cannot be
// opened holds nothing as far as this goes (Create then says why it
// cannot use it). It opens the store read-only and writes nothing.
func (r *Registry) HeldVolume(backing string) (string, error) {
	if !isRemote(backing) {
		abs, err := filepath.Abs(backing)
		if err != nil {
			return "", err
		}
		backing = abs
	}
	d, err := r.openStore(Volume{Name: "(new)", Backing: backing}, true)
	if err != nil {
		return "", nil
	}
	defer d.Close()
	var ab [2 * crypto.HeaderBlockSize]byte
	n, err := d.ReadAt(ab[:], 0)
	if err != nil && !errors.Is(err, io.EOF) {
		return "", fmt.Errorf("backing %s: reading where a volume header would be: %w", backing, err)
	}
	for _, b := range [][]byte{ab[:min(n, crypto.HeaderBlockSize)], ab[min(n, crypto.HeaderBlockSize):n]} {
		format, err := crypto.HeaderFormat(b)
		if err != nil {
			continue
		}
		id := "its header does not parse"
		if h, _, err := crypto.PickHeader(ab[:crypto.HeaderBlockSize], ab[crypto.HeaderBlockSize:]); err == nil {
			id = "uuid " + uuid.UUID(h.UUID).String()
		}
		return fmt.Sprintf("an encrypted volume (format %d, %s)", format, id), nil
	}
	if img, ok := d.(*rbd.Image); ok {
		s, err := img.Metadata(rbd.MetaVolume)
		if err != nil {
			return "", fmt.Errorf("backing %s: %w", backing, err)
		}
		if s != "" {
			var m remoteMeta
			if json.Unmarshal([]byte(s), &m) == nil && m.UUID != "" {
				kind := "a plain"
				if m.Encrypted {
					kind = "an encrypted"
				}
				return fmt.Sprintf("%s volume (uuid %s, image metadata %s)", kind, m.UUID, rbd.MetaVolume), nil
			}
			return fmt.Sprintf("a volume (image metadata %s: %q)", rbd.MetaVolume, s), nil
		}
	}
	return "", nil
}

// refuseHeld fails with ErrHoldsVolume when o.Backing already holds a
// volume and o.Overwrite is not set.
func (r *Registry) refuseHeld(o CreateOptions) error {
	if o.Backing == "" || o.Overwrite {
		return nil
	}
	held, err := r.HeldVolume(o.Backing)
	if err != nil {
		return fmt.Errorf("volume %s: %w", o.Name, err)
	}
	if held != "" {
		return fmt.Errorf("volume %s: backing %s already holds %s, and %w: take it into this gateway with `goldilocks volume adopt %s --backing %s`",
			o.Name, o.Backing, held, ErrHoldsVolume, o.Name, o.Backing)
	}
	return nil
}
