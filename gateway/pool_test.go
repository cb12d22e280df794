package gateway

import (
	"testing"
	"unsafe"
)

func TestBufferPoolClasses(t *testing.T) {
	p := newBufferPool()
	for _, tc := range []struct{ n, want int }{
		{1, 4096}, {4096, 4096}, {4097, 8192}, {65536, 65536}, {1<<20 + 1, 2 << 20}, {32 << 20, 32 << 20},
	} {
		b := p.get(tc.n)
		if len(b.b) != tc.want {
			t.Errorf("get(%d): %d bytes, want %d", tc.n, len(b.b), tc.want)
		}
		if addr := uintptr(unsafe.Pointer(&b.b[0])); addr%bufAlign != 0 {
			t.Errorf("get(%d): address %#x not %d-aligned", tc.n, addr, bufAlign)
		}
		p.put(b)
		if again := p.get(tc.n); again != b {
			t.Errorf("get(%d) after put did not reuse the buffer", tc.n)
		}
	}
}

func TestBufferPoolBounded(t *testing.T) {
	p := newBufferPool()
	var bs []*buffer
	for i := 0; i < 10; i++ {
		bs = append(bs, p.get(32<<20))
	}
	for _, b := range bs {
		p.put(b)
	}
	if n := len(p.classes[numClasses-1].idle); n != minPerClass {
		t.Fatalf("32 MiB class keeps %d idle buffers, want %d", n, minPerClass)
	}
}
