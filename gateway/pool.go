package gateway

import (
	"math/bits"
	"sync"
	"unsafe"
)

// Buffers for request and reply payloads come from bounded free lists by
// size class, powers of two from 4 KiB to the maximum request size, in the
// manner of wireguard-go's device/pools.go. Unlike sync.Pool the lists
// survive garbage collection, so a steady workload allocates nothing; and
// they are stacks, so the buffer reused is the one used last, still warm
// in the CPU cache.
// Every buffer is aligned to 4 KiB so that O_DIRECT backends can use it.
const (
	bufAlign    = 4096
	minBufShift = 12 // 4 KiB
	maxBufShift = 25 // 32 MiB, the maximum request
	numClasses  = maxBufShift - minBufShift + 1
	classBudget = 32 << 20 // bytes kept idle per class, at least minPerClass buffers
	minPerClass = 2
	maxPerClass = 1024
)

// buffer is a pooled, aligned byte slice.
type buffer struct {
	b     []byte // len == the class's size, 4 KiB aligned
	class int
}

// bufferPool hands out aligned buffers by size class.
type bufferPool struct {
	classes [numClasses]bufferStack
}

// bufferStack is a bounded LIFO of idle buffers of one class.
type bufferStack struct {
	mu   sync.Mutex
	idle []*buffer // cap is the class's bound
}

func newBufferPool() *bufferPool {
	p := &bufferPool{}
	for i := range p.classes {
		n := min(max(classBudget>>(minBufShift+i), minPerClass), maxPerClass)
		p.classes[i].idle = make([]*buffer, 0, n)
	}
	return p
}

// get returns a buffer of at least n bytes (0 < n ≤ 32 MiB).
func (p *bufferPool) get(n int) *buffer {
	c := 0
	if n > 1<<minBufShift {
		c = bits.Len(uint(n-1)) - minBufShift
	}
	st := &p.classes[c]
	st.mu.Lock()
	if n := len(st.idle); n > 0 {
		b := st.idle[n-1]
		st.idle = st.idle[:n-1]
		st.mu.Unlock()
		return b
	}
	st.mu.Unlock()
	size := 1 << (minBufShift + c)
	raw := make([]byte, size+bufAlign)
	off := int(-uintptr(unsafe.Pointer(&raw[0])) & (bufAlign - 1))
	return &buffer{b: raw[off : off+size : off+size], class: c}
}

// put returns b to its class, or drops it when the class is full. Plain
// buffers hold only what the client may read anyway; the encrypted path
// clears its plaintext before it puts.
func (p *bufferPool) put(b *buffer) {
	st := &p.classes[b.class]
	st.mu.Lock()
	if len(st.idle) < cap(st.idle) {
		st.idle = append(st.idle, b)
	}
	st.mu.Unlock()
}
