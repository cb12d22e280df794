package crypto

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"goldilocks/internal/block"
)

func openTestVolume(t testing.TB, size uint64) (*Volume, *crashDev, KEKProvider) {
	t.Helper()
	kek := NewLocalKEK(t.TempDir(), nil)
	dev := newCrashDev(int64(LayoutFor(size).End))
	id := [16]byte{0xab}
	if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	v, err := Open(context.Background(), dev, "t", id, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	return v, dev, kek
}

// Two writers to disjoint bytes of one chunk never lose an update: the
// read-modify-write runs under the chunk's lock.
func TestConcurrentSubChunkWrites(t *testing.T) {
	v, _, _ := openTestVolume(t, 64*ChunkSize)
	const writers, rounds = 8, 200
	var wg sync.WaitGroup
	for w := 0; w < writers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				p := bytes.Repeat([]byte{byte(w*rounds + r)}, 512)
				if _, err := v.WriteAt(p, int64(ChunkSize+w*512)); err != nil {
					t.Error(err)
					return
				}
				if r%50 == 0 {
					if err := v.Flush(); err != nil {
						t.Error(err)
						return
					}
				}
			}
		}(w)
	}
	wg.Wait()
	got := make([]byte, ChunkSize)
	if _, err := v.ReadAt(got, ChunkSize); err != nil {
		t.Fatal(err)
	}
	for w := 0; w < writers; w++ {
		want := bytes.Repeat([]byte{byte(w*rounds + rounds - 1)}, 512)
		if !bytes.Equal(got[w*512:(w+1)*512], want) {
			t.Fatalf("writer %d's last update was lost", w)
		}
	}
}

// Seal epochs: past the limit a new epoch starts (header first), and
// chunks sealed under every epoch still open, also after a reopen.
func TestSealEpochs(t *testing.T) {
	v, dev, kek := openTestVolume(t, 16*ChunkSize)
	v.epochLimit = 3
	for i := 0; i < 20; i++ {
		if _, err := v.WriteAt(bytes.Repeat([]byte{byte(i)}, ChunkSize), int64(i%16)*ChunkSize); err != nil {
			t.Fatal(err)
		}
	}
	h := v.Header()
	if h.Epoch < 6 {
		t.Fatalf("20 seals at 3 per epoch reached epoch %d", h.Epoch)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(context.Background(), dev, "t", [16]byte{0xab}, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if got := v2.Header(); got.Epoch != h.Epoch || got.EpochSeals != h.EpochSeals {
		t.Fatalf("after a clean detach: epoch %d/%d seals, want %d/%d", got.Epoch, got.EpochSeals, h.Epoch, h.EpochSeals)
	}
	got := make([]byte, ChunkSize)
	for c := 0; c < 16; c++ {
		want := c + 16
		if c >= 4 {
			want = c
		}
		if _, err := v2.ReadAt(got, int64(c)*ChunkSize); err != nil || got[0] != byte(want) {
			t.Fatalf("chunk %d: %v, %d, want %d", c, err, got[0], want)
		}
	}
}

// 10,000 attach/detach cycles cost no seal epoch and no nonce: the exact
// count is written at every clean detach. A crash costs one epoch.
func TestAttachDetachCycles(t *testing.T) {
	kek := NewLocalKEK(t.TempDir(), nil)
	dev := newCrashDev(int64(LayoutFor(16 * ChunkSize).End))
	id := [16]byte{0xab}
	ctx := context.Background()
	if err := Format(ctx, dev, id, 16*ChunkSize, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	cycles := 10000
	if testing.Short() {
		cycles = 1000
	}
	for i := 0; i < cycles; i++ {
		v, err := Open(ctx, dev, "t", id, kek, quietLog(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		if i%1000 == 0 {
			if _, err := v.WriteAt(make([]byte, ChunkSize), 0); err != nil {
				t.Fatal(err)
			}
		}
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
	}
	v, err := Open(ctx, dev, "t", id, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if h := v.Header(); h.Epoch != 0 || h.EpochSeals != uint64(cycles/1000) {
		t.Fatalf("after %d cycles: epoch %d, %d seals; want epoch 0, %d seals", cycles, h.Epoch, h.EpochSeals, cycles/1000)
	}
	// A crash (no clean detach): the next attach starts a new epoch.
	after := dev.crash(rand.New(rand.NewPCG(1, 2)))
	v2, err := Open(ctx, after, "t", id, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if h := v2.Header(); h.Epoch != 1 || h.EpochSeals != 0 {
		t.Fatalf("after a crash: epoch %d, %d seals; want 1, 0", h.Epoch, h.EpochSeals)
	}
	v.Close()
}

func TestWrongKeyOrVolume(t *testing.T) {
	v, dev, kek := openTestVolume(t, 16*ChunkSize)
	v.WriteAt(make([]byte, ChunkSize), 0)
	v.Close()
	if _, err := Open(context.Background(), dev, "t", [16]byte{0xab}, NewLocalKEK(t.TempDir(), nil), quietLog(), Options{}); err == nil {
		t.Fatal("opened with another keystore")
	}
	if _, err := Open(context.Background(), dev, "t", [16]byte{0xcd}, kek, quietLog(), Options{}); !errors.Is(err, ErrWrongVolume) {
		t.Fatalf("opened as another volume: %v", err)
	}
}

// A new volume of any size writes a few KiB: the two header copies.
func TestFormatWritesLittle(t *testing.T) {
	kek := NewLocalKEK(t.TempDir(), nil)
	const size = 1 << 40
	dev := &countDev{size: int64(LayoutFor(size).End)}
	if err := Format(context.Background(), dev, [16]byte{1}, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	if dev.written > 8192 {
		t.Fatalf("formatting 1 TiB wrote %d bytes", dev.written)
	}
	if _, err := Open(context.Background(), dev, "t", [16]byte{1}, kek, quietLog(), Options{}); err != nil {
		t.Fatal(err)
	}
}

// countDev is a sparse device in memory that counts what is written.
type countDev struct {
	mu      sync.Mutex
	size    int64
	blocks  map[int64][]byte
	written int64
	flushes int
	reads   int // ReadAt calls
	writes  int // WriteAt calls
	// fast declares a fast local store (block.CanFastWrite) that tells
	// written blocks from holes (block.Prober), as a sparse file does.
	fast bool
}

func (d *countDev) Size() int64 { return d.size }

func (d *countDev) Caps() block.Caps {
	if d.fast {
		return block.CanFastWrite
	}
	return 0
}

func (d *countDev) Written(off int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	_, ok := d.blocks[off/ChunkSize]
	return ok
}
func (d *countDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.reads++
	for i := 0; i < len(p); i += ChunkSize {
		if b, ok := d.blocks[(off+int64(i))/ChunkSize]; ok {
			copy(p[i:], b)
		} else {
			clear(p[i:min(len(p), i+ChunkSize)])
		}
	}
	return len(p), nil
}
func (d *countDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.blocks == nil {
		d.blocks = make(map[int64][]byte)
	}
	for i := 0; i < len(p); i += ChunkSize {
		d.blocks[(off+int64(i))/ChunkSize] = bytes.Clone(p[i:min(len(p), i+ChunkSize)])
	}
	d.written += int64(len(p))
	d.writes++
	return len(p), nil
}
func (d *countDev) Flush() error {
	d.mu.Lock()
	d.flushes++
	d.mu.Unlock()
	return nil
}
func (d *countDev) Close() error { return nil }

// fileVolume is a volume on a real file (the page cache) for benchmarks.
func fileVolume(b testing.TB, size uint64) *Volume {
	v, _ := fileVolumeAt(b, size)
	return v
}

// fileVolumeAt is fileVolume, also returning the backing file's path.
func fileVolumeAt(b testing.TB, size uint64) (*Volume, string) {
	kek := NewLocalKEK(b.TempDir(), nil)
	path := filepath.Join(b.TempDir(), "vol.img")
	f, err := os.Create(path)
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(int64(LayoutFor(size).End))
	f.Close()
	dev, err := block.OpenFile(path, false)
	if err != nil {
		b.Fatal(err)
	}
	id := [16]byte{1}
	if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
		b.Fatal(err)
	}
	v, err := Open(context.Background(), dev, "b", id, kek, quietLog(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { v.Close() })
	return v, path
}

func BenchmarkVolume4K(b *testing.B) {
	const chunks = 16384
	v := fileVolume(b, 64<<20)
	p := make([]byte, ChunkSize)
	for i := 0; i < chunks; i++ {
		v.WriteAt(p, int64(i)*ChunkSize)
	}
	v.Flush()
	v.m.Checkpoint() // reads through the tree and its cache
	b.Run("read", func(b *testing.B) {
		b.SetBytes(ChunkSize)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.ReadAt(p, int64((i*7919)%chunks)*ChunkSize); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("write", func(b *testing.B) {
		b.SetBytes(ChunkSize)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.WriteAt(p, int64((i*7919)%chunks)*ChunkSize); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("write+flush", func(b *testing.B) {
		b.SetBytes(ChunkSize)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.WriteAt(p, int64((i*7919)%chunks)*ChunkSize); err != nil {
				b.Fatal(err)
			}
			if err := v.Flush(); err != nil {
				b.Fatal(err)
			}
		}
	})
}

func BenchmarkVolume1M(b *testing.B) {
	v := fileVolume(b, 256<<20)
	p := make([]byte, 1<<20)
	b.Run("write", func(b *testing.B) {
		b.SetBytes(1 << 20)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.WriteAt(p, int64(i%256)<<20); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("read", func(b *testing.B) {
		b.SetBytes(1 << 20)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.ReadAt(p, int64(i%256)<<20); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// A TRIM of a whole large volume (mkfs sends one) costs time in what is
// mapped, not in the volume's size (a bug that walks every chunk of
// 2^32 takes minutes, far past the bound).
func TestTrimHugeVolume(t *testing.T) {
	kek := NewLocalKEK(t.TempDir(), nil)
	const size = 1 << 44 // 16 TiB: a walk over every chunk would take minutes
	dev := &countDev{size: int64(LayoutFor(size).End)}
	ctx := context.Background()
	if err := Format(ctx, dev, [16]byte{1}, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	v, err := Open(ctx, dev, "t", [16]byte{1}, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{7}, ChunkSize)
	for _, off := range []int64{0, 1 << 30, size - ChunkSize} {
		if _, err := v.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- v.Trim(0, size) }()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("a TRIM of 16 TiB with 3 chunks mapped takes more than 30 s: it walks every chunk")
	}
	for _, off := range []int64{0, 1 << 30, size - ChunkSize} {
		got := make([]byte, ChunkSize)
		if _, err := v.ReadAt(got, off); err != nil || !bytes.Equal(got, make([]byte, ChunkSize)) {
			t.Fatalf("chunk at %d after the TRIM: %v", off, err)
		}
	}
	if ext, err := v.Extents(nil, 0, size, 16); err != nil || len(ext) != 1 || ext[0].Flags&block.ExtentZero == 0 {
		t.Fatalf("extents after the TRIM: %v %v", ext, err)
	}
}

// On a store with network latency (no CanFastWrite), a 1 MiB read over
// chunks whose homes alternate (what random 4 KiB writes leave) is two
// store reads, one per home, not one per run of chunks; and it returns
// the right bytes.
func TestFragmentedReadTwoSpans(t *testing.T) {
	const size = 4 << 20
	dev := &countDev{size: int64(LayoutFor(size).End)}
	kek := NewLocalKEK(t.TempDir(), nil)
	id := [16]byte{7}
	if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	v, err := Open(context.Background(), dev, "frag", id, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.Close()
	want := make([]byte, 1<<20)
	for i := range want {
		want[i] = byte(i * 7)
	}
	if _, err := v.WriteAt(want, 0); err != nil || v.Flush() != nil {
		t.Fatal(err)
	}
	for c := 0; c < 256; c += 2 { // every other chunk to its other home
		for i := c * ChunkSize; i < (c+1)*ChunkSize; i++ {
			want[i] ^= 0xff
		}
		if _, err := v.WriteAt(want[c*ChunkSize:(c+1)*ChunkSize], int64(c*ChunkSize)); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 1<<20)
	dev.mu.Lock()
	before := dev.reads
	dev.mu.Unlock()
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	dev.mu.Lock()
	reads := dev.reads - before
	dev.mu.Unlock()
	if !bytes.Equal(got, want) {
		t.Fatal("a read over alternating homes returned other bytes")
	}
	if reads > 2 {
		t.Errorf("a 1 MiB read over 256 alternating chunks took %d store reads, want 2", reads)
	}
}

// TryReadAt (the transport's inline read) serves only what it can from
// memory and only what authenticates: anything else is ErrWouldBlock,
// and ReadAt then reads it, or reports the damage.
func TestTryReadAt(t *testing.T) {
	v, path := fileVolumeAt(t, 4<<20)
	want := make([]byte, 8*ChunkSize)
	for i := range want {
		want[i] = byte(i*13 + i>>12)
	}
	if _, err := v.WriteAt(want, 0); err != nil || v.Flush() != nil || v.m.Checkpoint() != nil {
		t.Fatal("write, flush, checkpoint failed")
	}
	got := make([]byte, len(want))
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("ReadAt: %v (or other bytes)", err)
	}
	clear(got)
	if n, err := v.TryReadAt(got, 0); err != nil || n != len(want) || !bytes.Equal(got, want) {
		t.Fatalf("TryReadAt of written, cached chunks: n=%d err=%v (or other bytes)", n, err)
	}
	if v.Caps()&block.CanTryRead == 0 {
		t.Error("a volume on a file does not declare CanTryRead")
	}
	never := make([]byte, ChunkSize)
	never[0] = 1
	if _, err := v.TryReadAt(never, 100*ChunkSize); err == nil && !bytes.Equal(never, make([]byte, ChunkSize)) {
		t.Error("TryReadAt of a chunk never written: not zeros")
	}
	for _, c := range []struct {
		name string
		n    int
		off  int64
		err  error
	}{
		{"part of a chunk", 512, 0, block.ErrWouldBlock},
		{"unaligned", ChunkSize, 512, block.ErrWouldBlock},
		{"more than a batch", (batchChunks + 1) * ChunkSize, 0, block.ErrWouldBlock},
		{"beyond the end", ChunkSize, 4 << 20, block.ErrOutOfRange},
	} {
		if _, err := v.TryReadAt(make([]byte, c.n), c.off); !errors.Is(err, c.err) {
			t.Errorf("%s: %v, want %v", c.name, err, c.err)
		}
	}

	// A bit flipped in chunk 3 as it lies in the file (and so in the page
	// cache TryReadAt reads from): never served.
	e, err := v.m.Lookup(3)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	at := int64(v.geo.DataBlock(3, e.Loc())*ChunkSize) + 100
	var bt [1]byte
	if _, err := f.ReadAt(bt[:], at); err != nil {
		t.Fatal(err)
	}
	bt[0] ^= 0x04
	if _, err := f.WriteAt(bt[:], at); err != nil {
		t.Fatal(err)
	}
	if _, err := v.TryReadAt(got, 0); !errors.Is(err, block.ErrWouldBlock) {
		t.Fatalf("TryReadAt over a tampered chunk: %v, want ErrWouldBlock (ReadAt reports it)", err)
	}
	if _, err := v.TryReadAt(got[:ChunkSize], 3*ChunkSize); !errors.Is(err, block.ErrWouldBlock) {
		t.Fatalf("TryReadAt of the tampered chunk: %v, want ErrWouldBlock", err)
	}
	if _, err := v.ReadAt(got, 0); !errors.Is(err, ErrChunkAuth) {
		t.Fatalf("ReadAt over a tampered chunk: %v, want ErrChunkAuth", err)
	}

	// Chunks written and flushed since: in the log or at home, TryReadAt
	// gives the new bytes or ErrWouldBlock, never the old ones; once a
	// checkpoint moved them home, the new bytes.
	all := make([]byte, 32*ChunkSize)
	for c := 8; c < 40; c++ {
		p := bytes.Repeat([]byte{byte(c)}, ChunkSize)
		if _, err := v.WriteAt(p, int64(c)*ChunkSize); err != nil || v.Flush() != nil {
			t.Fatal("write or flush failed")
		}
		q := make([]byte, ChunkSize)
		if _, err := v.TryReadAt(q, int64(c)*ChunkSize); err == nil && !bytes.Equal(p, q) {
			t.Fatalf("chunk %d: TryReadAt returned bytes it was not written with", c)
		} else if err != nil && !errors.Is(err, block.ErrWouldBlock) {
			t.Fatalf("chunk %d: %v", c, err)
		}
		copy(all[(c-8)*ChunkSize:], p)
	}
	if err := v.m.Checkpoint(); err != nil {
		t.Fatal(err)
	}
	got = make([]byte, len(all))
	if _, err := v.ReadAt(got, 8*ChunkSize); err != nil { // the leaves into the cache
		t.Fatal(err)
	}
	clear(got)
	if _, err := v.TryReadAt(got, 8*ChunkSize); err != nil || !bytes.Equal(got, all) {
		t.Fatalf("TryReadAt after the checkpoint: %v (or other bytes)", err)
	}
}

// Handoff (an upgrade in place) commits what was written and writes
// nothing more: the next Open, on the store as it is or as a crash right
// after would leave it, reads every write back, and starts a new seal
// epoch as after a crash (the header was not marked clean).
func TestHandoff(t *testing.T) {
	v, dev, kek := openTestVolume(t, 64*ChunkSize)
	ctx := context.Background()
	want := make([]byte, 64*ChunkSize)
	for i := range 200 {
		c := (i * 37) % 64
		b := bytes.Repeat([]byte{byte(i + 1)}, ChunkSize)
		copy(want[c*ChunkSize:], b)
		if _, err := v.WriteAt(b, int64(c)*ChunkSize); err != nil {
			t.Fatal(err)
		}
		if i == 100 {
			if err := v.Flush(); err != nil {
				t.Fatal(err)
			}
		}
	}
	before := v.Header()
	if err := v.Handoff(); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil { // a no-op after Handoff
		t.Fatal(err)
	}
	for name, d := range map[string]*crashDev{"as left": dev, "after a crash": dev.crash(rand.New(rand.NewPCG(3, 4)))} {
		v2, err := Open(ctx, d, "t", [16]byte{0xab}, kek, quietLog(), Options{})
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		got := make([]byte, len(want))
		if _, err := v2.ReadAt(got, 0); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if !bytes.Equal(got, want) {
			t.Fatalf("%s: the handed-off writes do not read back", name)
		}
		if h := v2.Header(); h.Epoch <= before.Epoch || h.EpochSeals != 0 {
			t.Fatalf("%s: epoch %d with %d seals after a handoff from epoch %d; want a new epoch", name, h.Epoch, h.EpochSeals, before.Epoch)
		}
		v2.Close()
	}
}
