package crypto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"goldilocks/internal/atomicfile"
	"hash/crc32"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/uuid"
)

// ErrRollback: the store is older than the state its anchor records (the
// store was rolled back, or an older copy was put in its place).
var ErrRollback = errors.New("crypto: the backing store is older than its rollback anchor (rolled back or replaced by an older copy)")

// Anchor keeps, outside the backing store, what a volume's store is
// known to have made durable (FORMAT.md, "Rollback anchor"). It only moves
// forward.
type Anchor interface {
	// Load returns the anchored state; ok is false if there is none.
	Load(volume [16]byte) (st AnchorState, ok bool, err error)
	// Advance records st, field by field where it is newer.
	Advance(volume [16]byte, st AnchorState) error
	// Remove forgets the volume's anchor (volume shred).
	Remove(volume [16]byte) error
}

// AnchorState is what an anchor holds: the newest durable commit, and the
// newest header generation and seal epoch that the gateway wrote (so that
// an older header put back cannot rewind the seal count).
type AnchorState struct {
	Seq        uint64
	Generation uint64
	Epoch      uint32
}

// Merge returns the field-by-field maximum of a and b: what an anchor
// holds after recording b.
func (a AnchorState) Merge(b AnchorState) AnchorState {
	return AnchorState{Seq: max(a.Seq, b.Seq), Generation: max(a.Generation, b.Generation), Epoch: max(a.Epoch, b.Epoch)}
}

// Anchor file constants (FORMAT.md). Part of the format.
const (
	anchorMagic   = "GLDLANC\x00"
	anchorVersion = 1
	anchorSize    = 64
	AnchorDir     = "anchors"
)

// FileAnchor keeps anchors as files in DATA_DIR/anchors.
type FileAnchor struct {
	dir string
	mu  sync.Mutex
}

var _ Anchor = (*FileAnchor)(nil)

// NewFileAnchor returns the anchors of a data dir.
func NewFileAnchor(dataDir string) *FileAnchor {
	return &FileAnchor{dir: filepath.Join(dataDir, AnchorDir)}
}

func (a *FileAnchor) path(v [16]byte) string { return filepath.Join(a.dir, uuid.UUID(v).String()) }

// Load reads a volume's anchor.
func (a *FileAnchor) Load(v [16]byte) (AnchorState, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.loadLocked(v)
}

func (a *FileAnchor) loadLocked(v [16]byte) (AnchorState, bool, error) {
	b, err := os.ReadFile(a.path(v))
	if errors.Is(err, os.ErrNotExist) {
		return AnchorState{}, false, nil
	}
	if err != nil {
		return AnchorState{}, false, fmt.Errorf("rollback anchor: %w", err)
	}
	st, err := parseAnchor(b, v)
	if err != nil {
		return AnchorState{}, false, fmt.Errorf("rollback anchor %s: %w", a.path(v), err)
	}
	return st, true, nil
}

func marshalAnchor(v [16]byte, st AnchorState) []byte {
	b := make([]byte, anchorSize)
	le := binary.LittleEndian
	copy(b, anchorMagic)
	le.PutUint32(b[8:], anchorVersion)
	le.PutUint32(b[12:], st.Epoch)
	copy(b[16:32], v[:])
	le.PutUint64(b[32:], st.Seq)
	le.PutUint64(b[40:], st.Generation)
	le.PutUint32(b[48:], crc32.Checksum(b[:48], castagnoli))
	return b
}

func parseAnchor(b []byte, v [16]byte) (AnchorState, error) {
	le := binary.LittleEndian
	if len(b) != anchorSize || string(b[:8]) != anchorMagic || le.Uint32(b[8:]) != anchorVersion ||
		le.Uint32(b[48:]) != crc32.Checksum(b[:48], castagnoli) {
		return AnchorState{}, errors.New("damaged anchor file")
	}
	if [16]byte(b[16:32]) != v {
		return AnchorState{}, errors.New("anchor file of another volume")
	}
	return AnchorState{Seq: le.Uint64(b[32:]), Generation: le.Uint64(b[40:]), Epoch: le.Uint32(b[12:])}, nil
}

// Advance records st where it is newer: temp file, fsync, rename, fsync
// of the directory.
func (a *FileAnchor) Advance(v [16]byte, st AnchorState) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	old, ok, err := a.loadLocked(v)
	if err != nil {
		return err
	}
	if ok {
		if st = old.Merge(st); st == old {
			return nil
		}
	}
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	if err := atomicfile.Write(a.path(v), marshalAnchor(v, st), 0o600); err != nil {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	return nil
}

// Remove deletes a volume's anchor.
func (a *FileAnchor) Remove(v [16]byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	if err := os.Remove(a.path(v)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	if err := atomicfile.SyncDir(a.dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	return nil
}
