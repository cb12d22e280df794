package crypto

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"sync"

	"github.com/google/uuid"
)

// ErrRollback: the store is older than the state its anchor records (the
// store was rolled back, or an older copy was put in its place).
var ErrRollback = errors.New("crypto: the backing store is older than its rollback anchor (rolled back or replaced by an older copy)")

// Anchor keeps, outside the backing store, the newest commit sequence that
// a volume's store is known to have made durable (FORMAT.md, "Rollback
// anchor"). It only moves forward.
type Anchor interface {
	// Load returns the anchored sequence; ok is false if there is none.
	Load(volume [16]byte) (seq uint64, ok bool, err error)
	// Advance records seq if it is newer than the anchored one.
	Advance(volume [16]byte, seq uint64) error
	// Remove forgets the volume's anchor (volume shred).
	Remove(volume [16]byte) error
}

// Anchor file constants (FORMAT.md). Part of the format.
const (
	anchorMagic   = "GLDLANC\x00"
	anchorVersion = 1
	anchorSize    = 48
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
func (a *FileAnchor) Load(v [16]byte) (uint64, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.loadLocked(v)
}

func (a *FileAnchor) loadLocked(v [16]byte) (uint64, bool, error) {
	b, err := os.ReadFile(a.path(v))
	if errors.Is(err, os.ErrNotExist) {
		return 0, false, nil
	}
	if err != nil {
		return 0, false, fmt.Errorf("rollback anchor: %w", err)
	}
	seq, err := parseAnchor(b, v)
	if err != nil {
		return 0, false, fmt.Errorf("rollback anchor %s: %w", a.path(v), err)
	}
	return seq, true, nil
}

func marshalAnchor(v [16]byte, seq uint64) []byte {
	b := make([]byte, anchorSize)
	copy(b, anchorMagic)
	binary.LittleEndian.PutUint32(b[8:], anchorVersion)
	copy(b[16:32], v[:])
	binary.LittleEndian.PutUint64(b[32:], seq)
	binary.LittleEndian.PutUint32(b[40:], crc32.Checksum(b[:40], castagnoli))
	return b
}

func parseAnchor(b []byte, v [16]byte) (uint64, error) {
	if len(b) != anchorSize || string(b[:8]) != anchorMagic || binary.LittleEndian.Uint32(b[8:]) != anchorVersion ||
		binary.LittleEndian.Uint32(b[40:]) != crc32.Checksum(b[:40], castagnoli) {
		return 0, errors.New("damaged anchor file")
	}
	if [16]byte(b[16:32]) != v {
		return 0, errors.New("anchor file of another volume")
	}
	return binary.LittleEndian.Uint64(b[32:]), nil
}

// Advance writes seq if it is newer: temp file, fsync, rename, fsync of
// the directory.
func (a *FileAnchor) Advance(v [16]byte, seq uint64) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	old, ok, err := a.loadLocked(v)
	if err != nil {
		return err
	}
	if ok && old >= seq {
		return nil
	}
	if err := os.MkdirAll(a.dir, 0o700); err != nil {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	p := a.path(v)
	tmp := p + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("rollback anchor: %w", err)
	}
	_, err = f.Write(marshalAnchor(v, seq))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, p)
	}
	if err == nil {
		err = syncDir(a.dir)
	}
	if err != nil {
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
	return syncDir(a.dir)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
