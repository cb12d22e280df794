package crypto

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"

	"goldilocks/internal/block"
)

// crashDev is a fault-injecting block device in the manner of Pebble's
// errorfs: writes stay volatile until Flush; crash drops every unflushed
// write, except that some reach the disk whole and some torn at a random
// byte offset, as a power cut leaves a disk.
type crashDev struct {
	mu      sync.Mutex
	durable []byte
	pending []pendingWrite

	// The power is cut at the crashAt-th write or flush: image is the disk
	// as it was left then; the device goes on working for the test.
	rng     *rand.Rand
	ops     int
	crashAt int
	image   *crashDev
}

type pendingWrite struct {
	off  int64
	data []byte
}

func newCrashDev(size int64) *crashDev { return &crashDev{durable: make([]byte, size)} }

func (d *crashDev) Size() int64 { return int64(len(d.durable)) }

func (d *crashDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !block.CheckRange(d.Size(), off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	copy(p, d.durable[off:])
	for _, w := range d.pending { // the latest view: volatile writes on top
		lo, hi := max(off, w.off), min(off+int64(len(p)), w.off+int64(len(w.data)))
		if lo < hi {
			copy(p[lo-off:hi-off], w.data[lo-w.off:])
		}
	}
	return len(p), nil
}

func (d *crashDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !block.CheckRange(d.Size(), off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	d.pending = append(d.pending, pendingWrite{off, bytes.Clone(p)})
	d.tickLocked()
	return len(p), nil
}

// tickLocked counts an operation and takes the crash image at crashAt,
// after the operation has been issued but before it is known durable.
func (d *crashDev) tickLocked() {
	d.ops++
	if d.ops == d.crashAt && d.image == nil {
		d.image = d.crashLocked(d.rng)
	}
}

func (d *crashDev) Flush() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tickLocked() // a cut during the flush: nothing of it is sure yet
	for _, w := range d.pending {
		copy(d.durable[w.off:], w.data)
	}
	d.pending = nil
	return nil
}

func (d *crashDev) Close() error { return nil }

// crash returns the disk as a power cut at this instant would leave it.
func (d *crashDev) crash(rng *rand.Rand) *crashDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.crashLocked(rng)
}

func (d *crashDev) crashLocked(rng *rand.Rand) *crashDev {
	after := &crashDev{durable: bytes.Clone(d.durable)}
	for _, w := range d.pending {
		switch rng.IntN(3) {
		case 0: // lost
		case 1: // reached the disk
			copy(after.durable[w.off:], w.data)
		case 2: // torn at a random byte
			copy(after.durable[w.off:], w.data[:rng.IntN(len(w.data))])
		}
	}
	return after
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestCrashModel runs random workloads against a model and cuts the power
// at a random device operation (inside a write, a flush or a header
// update) or at the end: every chunk must then read, without error, as its
// last flushed value or a value written after that flush.
func TestCrashModel(t *testing.T) {
	seeds := 300
	if s, err := strconv.Atoi(os.Getenv("GOLDILOCKS_CRASH_SEEDS")); err == nil && s > 0 {
		seeds = s // make torture
	}
	kek := NewLocalKEK(t.TempDir(), nil)
	for seed := 0; seed < seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) { crashOnce(t, uint64(seed), kek) })
	}
}

func crashOnce(t *testing.T, seed uint64, kek KEKProvider) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0x60d1))
	const chunks = 48
	size := uint64(chunks * ChunkSize)
	dev := newCrashDev(int64(LayoutFor(size).End))
	uuid := [16]byte{byte(seed), byte(seed >> 8), 7}
	if err := Format(ctx, dev, uuid, size, byte(seed%2), kek, "default"); err != nil {
		t.Fatal(err)
	}
	dev.rng, dev.ops, dev.crashAt = rng, 0, 1+rng.IntN(300)
	v, err := Open(ctx, dev, "model", uuid, kek, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	// legal[c]: the values chunk c may hold after a crash.
	legal := make([][][]byte, chunks)
	for c := range legal {
		legal[c] = [][]byte{make([]byte, ChunkSize)}
	}
	cur := func(c int) []byte { return legal[c][len(legal[c])-1] }
	ops := 20 + rng.IntN(120)
	for op := 0; op < ops && dev.image == nil; op++ {
		switch k := rng.IntN(20); {
		case k == 19: // rekey, walked in small checkpoints, maybe stopped half-way
			opt := RekeyOptions{every: 1 + uint64(rng.IntN(16))}
			if rng.IntN(2) == 0 {
				opt.stopAt = uint64(1 + rng.IntN(chunks-1))
			}
			err := v.Rekey(ctx, kek, opt)
			if err != nil && !(opt.stopAt != 0 && errors.Is(err, context.Canceled)) {
				t.Fatalf("op %d rekey: %v", op, err)
			}
			if err == nil && dev.image == nil { // it flushed everything
				for c := range legal {
					legal[c] = [][]byte{cur(c)}
				}
			}
		case k < 12: // write, maybe unaligned, maybe over several chunks
		case k < 6: // write, maybe unaligned, maybe over several chunks
			off := rng.Int64N(int64(size) - 1)
			n := 1 + rng.Int64N(min(3*ChunkSize, int64(size)-off))
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if _, err := v.WriteAt(p, off); err != nil {
				t.Fatalf("op %d write: %v", op, err)
			}
			for c := off / ChunkSize; c <= (off+n-1)/ChunkSize; c++ {
				val := bytes.Clone(cur(int(c)))
				lo, hi := max(off, c*ChunkSize), min(off+n, (c+1)*ChunkSize)
				copy(val[lo-c*ChunkSize:], p[lo-off:hi-off])
				legal[c] = append(legal[c], val)
			}
		case k < 16: // zero (unmap whole chunks)
			off := rng.Int64N(int64(size) - 1)
			n := 1 + rng.Int64N(min(4*ChunkSize, int64(size)-off))
			if err := v.Zero(off, n, true, false); err != nil {
				t.Fatalf("op %d zero: %v", op, err)
			}
			for c := off / ChunkSize; c <= (off+n-1)/ChunkSize; c++ {
				val := bytes.Clone(cur(int(c)))
				lo, hi := max(off, c*ChunkSize), min(off+n, (c+1)*ChunkSize)
				clear(val[lo-c*ChunkSize : hi-c*ChunkSize])
				legal[c] = append(legal[c], val)
			}
		default: // flush: only the latest value stays legal
			if err := v.Flush(); err != nil {
				t.Fatalf("op %d flush: %v", op, err)
			}
			if dev.image != nil {
				break // cut inside the flush: older values stay legal
			}
			for c := range legal {
				legal[c] = [][]byte{cur(c)}
			}
		}
		// The live volume always reads its latest values.
		if op%17 == 0 {
			got := make([]byte, size)
			if _, err := v.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			for c := 0; c < chunks; c++ {
				if !bytes.Equal(got[c*ChunkSize:(c+1)*ChunkSize], cur(c)) {
					t.Fatalf("op %d: live chunk %d differs from the model", op, c)
				}
			}
		}
	}
	after := dev.image
	if after == nil {
		after = dev.crash(rng)
	}
	v2, err := Open(ctx, after, "model", uuid, kek, quietLog())
	if err != nil {
		t.Fatalf("reopen after crash: %v", err)
	}
	got := make([]byte, ChunkSize)
	for c := 0; c < chunks; c++ {
		if _, err := v2.ReadAt(got, int64(c*ChunkSize)); err != nil {
			t.Fatalf("chunk %d after crash: %v", c, err)
		}
		ok := false
		for _, val := range legal[c] {
			ok = ok || bytes.Equal(got, val)
		}
		if !ok {
			t.Fatalf("chunk %d after crash holds a value it never legally held (%d legal)", c, len(legal[c]))
		}
	}
	// An interrupted rekey resumes (a finished one starts anew) and every
	// chunk keeps its value.
	vals := make([]byte, size)
	if _, err := v2.ReadAt(vals, 0); err != nil {
		t.Fatal(err)
	}
	if err := v2.Rekey(ctx, kek, RekeyOptions{every: 5}); err != nil {
		t.Fatalf("rekey after crash: %v", err)
	}
	if h := v2.Header(); h.Rekeying() || h.RekeyCursor != 0 {
		t.Fatalf("after rekey: header still rekeying (cursor %d)", h.RekeyCursor)
	}
	after2 := make([]byte, size)
	if _, err := v2.ReadAt(after2, 0); err != nil {
		t.Fatalf("read after rekey: %v", err)
	}
	if !bytes.Equal(after2, vals) {
		t.Fatal("the rekey after the crash changed the volume's contents")
	}
	// And it keeps working: write, flush, read back.
	if _, err := v2.WriteAt(bytes.Repeat([]byte{9}, ChunkSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := v2.Flush(); err != nil {
		t.Fatal(err)
	}
}
