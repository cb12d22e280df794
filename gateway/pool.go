package gateway

import (
	"math/bits"
	"sync"
	"unsafe"
)

// Buffers for request and reply payloads come from a pool of size classes,
// powers of two from 4 KiB to the maximum request size. Every buffer is
// aligned to 4 KiB so that O_DIRECT backends can use it as is.
const (
	bufAlign    = 4096
	minBufShift = 12 // 4 KiB
	maxBufShift = 25 // 32 MiB, the maximum request
	numClasses  = maxBufShift - minBufShift + 1
)

// buffer is a pooled, aligned byte slice. The pool stores *buffer so that
// Put does not allocate.
type buffer struct {
	b     []byte // len == capacity of the class, 4 KiB aligned
	class int
}

// bufferPool hands out aligned buffers by size class.
type bufferPool struct {
	classes [numClasses]sync.Pool
}

func newBufferPool() *bufferPool {
	p := &bufferPool{}
	for i := range p.classes {
		size := 1 << (minBufShift + i)
		class := i
		p.classes[i].New = func() any {
			raw := make([]byte, size+bufAlign)
			off := int(-uintptr(unsafe.Pointer(&raw[0])) & (bufAlign - 1))
			return &buffer{b: raw[off : off+size : off+size], class: class}
		}
	}
	return p
}

// get returns a buffer of at least n bytes (n ≤ 32 MiB).
func (p *bufferPool) get(n int) *buffer {
	c := 0
	if n > 1<<minBufShift {
		c = bits.Len(uint(n-1)) - minBufShift
	}
	return p.classes[c].Get().(*buffer)
}

// put returns b to its class. Buffers carry plaintext of the volume, so a
// later issue's encrypted path clears them here; plain buffers hold only
// what the client may read anyway.
func (p *bufferPool) put(b *buffer) {
	p.classes[b.class].Put(b)
}
