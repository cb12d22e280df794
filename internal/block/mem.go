package block

import "sync"

// Mem is a Device held in memory, for tests of the stages above a device
// (the gateway, the crypto layer). Trim and Zero clear the range; Flush
// does nothing (everything written is already "durable").
type Mem struct {
	mu sync.RWMutex
	b  []byte
}

// NewMem returns a zeroed in-memory device of size bytes.
func NewMem(size int64) *Mem { return &Mem{b: make([]byte, size)} }

// MemOf returns an in-memory device holding b (not copied).
func MemOf(b []byte) *Mem { return &Mem{b: b} }

func (m *Mem) Size() int64 { return int64(len(m.b)) }

func (m *Mem) ReadAt(p []byte, off int64) (int, error) {
	if !CheckRange(m.Size(), off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	m.mu.RLock()
	defer m.mu.RUnlock()
	return copy(p, m.b[off:]), nil
}

func (m *Mem) WriteAt(p []byte, off int64) (int, error) {
	if !CheckRange(m.Size(), off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(m.b[off:], p), nil
}

func (m *Mem) Trim(off, length int64) error { return m.Zero(off, length, true, false) }

func (m *Mem) Zero(off, length int64, mayUnmap, fast bool) error {
	if !CheckRange(m.Size(), off, length) {
		return ErrOutOfRange
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	clear(m.b[off : off+length])
	return nil
}

func (m *Mem) Flush() error { return nil }
func (m *Mem) Close() error { return nil }
