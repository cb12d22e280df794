package crypto

import (
	"golang.org/x/sys/unix"
)

// secret is key material held outside the Go heap: an anonymous mapping
// locked against swapping (mlock) and left out of core dumps where the
// kernel allows, zeroed and unmapped by free. If the mapping or the lock is
// refused (RLIMIT_MEMLOCK), the key still works from ordinary memory.
type secret struct {
	b []byte // the key
	m []byte // the whole mapping, or nil
}

// newSecret copies key into locked memory and zeroes key.
func newSecret(key []byte) *secret {
	defer clear(key)
	b, err := unix.Mmap(-1, 0, unix.Getpagesize(), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return &secret{b: append([]byte(nil), key...)}
	}
	_ = unix.Mlock(b)
	_ = unix.Madvise(b, unix.MADV_DONTDUMP)
	n := copy(b, key)
	return &secret{b: b[:n:n], m: b}
}

// bytes is the key; valid until free.
func (s *secret) bytes() []byte { return s.b }

// free zeroes the key and releases its memory.
func (s *secret) free() {
	if s == nil || s.b == nil {
		return
	}
	clear(s.b)
	if s.m != nil {
		_ = unix.Munmap(s.m)
	}
	s.b, s.m = nil, nil
}
