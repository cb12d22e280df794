package crypto

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// crashDev is a fault-injecting block device in the manner of Pebble's
// errorfs: writes stay volatile until Flush; crash drops every unflushed
// write, except that some reach the disk whole and some torn at a random
// byte offset, as a power cut leaves a disk. A Flush can fail as
// fdatasync fails on Linux: some of the volatile writes reached the disk,
// the others are gone (the page cache dropped them), and the error is
// reported once.
type crashDev struct {
	mu      sync.Mutex
	durable []byte
	pending []pendingWrite

	// The power is cut at the crashAt-th write or flush: image is the disk
	// as it was left then; the device goes on working for the test.
	// onImage runs then too (the test snapshots state kept outside the
	// store, such as the rollback anchor).
	rng     *rand.Rand
	ops     int
	crashAt int
	failAt  int // the failAt-th operation, if a flush, fails
	// failDrops: the failing flush drops every volatile write (else each
	// reaches the disk or not, at random).
	failDrops bool
	failed    int // flushes that failed
	image     *crashDev
	onImage   func()
	writes    int64 // bytes written
	flushes   int
	// flushHook, if set, runs at the start of every Flush, before the
	// volatile writes become durable (tests that act during a flush).
	flushHook func()
	// fast declares the device a fast local store (block.CanFastWrite),
	// on which small flushed writes go into the log; logLo..logHi is the
	// log's byte range, logData counts chunk data written there.
	fast         bool
	logLo, logHi int64
	logData      int
	// probe makes Written tell blocks ever written from holes (as a
	// sparse file's SEEK_DATA does); without it every block is a hole.
	probe   bool
	written map[int64]bool
}

// Written is block.Prober: whether the block at off was ever written.
func (d *crashDev) Written(off int64) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.probe && d.written[off/4096]
}

func (d *crashDev) Caps() block.Caps {
	if d.fast {
		return block.CanFastWrite
	}
	return 0
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
	d.writes += int64(len(p))
	if d.probe {
		if d.written == nil {
			d.written = make(map[int64]bool)
		}
		for b := off / 4096; b < (off+int64(len(p))+4095)/4096; b++ {
			d.written[b] = true
		}
	}
	if off >= d.logLo && off < d.logHi && !bytes.HasPrefix(p, []byte("GLML")) {
		d.logData++
	}
	d.tickLocked()
	return len(p), nil
}

// tickLocked counts an operation and takes the crash image at crashAt,
// after the operation has been issued but before it is known durable.
func (d *crashDev) tickLocked() {
	d.ops++
	if d.ops == d.crashAt && d.image == nil {
		d.image = d.crashLocked(d.rng)
		if d.onImage != nil {
			d.onImage()
		}
	}
}

var errInjected = errors.New("injected fdatasync failure")

func (d *crashDev) Flush() error {
	if d.flushHook != nil {
		d.flushHook()
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	d.tickLocked() // a cut during the flush: nothing of it is sure yet
	d.flushes++
	if d.ops == d.failAt {
		for _, w := range d.pending { // Linux: some pages written, the rest dropped
			if !d.failDrops && d.rng.IntN(2) == 0 {
				copy(d.durable[w.off:], w.data)
			}
		}
		d.pending = nil
		d.failed++
		return errInjected
	}
	for _, w := range d.pending {
		copy(d.durable[w.off:], w.data)
	}
	d.pending = nil
	return nil
}

func (d *crashDev) Close() error { return nil }

// cut returns the crash image, nil before the power was cut. A checkpoint
// running beside the commits may cut it from its own goroutine.
func (d *crashDev) cut() *crashDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.image
}

// failures is how many flushes failed.
func (d *crashDev) failures() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.failed
}

// cutNow cuts the power now unless it was cut already, and returns the
// image (onImage runs for a new one).
func (d *crashDev) cutNow(rng *rand.Rand) *crashDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.image == nil {
		d.image = d.crashLocked(rng)
		if d.onImage != nil {
			d.onImage()
		}
	}
	return d.image
}

// crash returns the disk as a power cut at this instant would leave it.
func (d *crashDev) crash(rng *rand.Rand) *crashDev {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.crashLocked(rng)
}

func (d *crashDev) crashLocked(rng *rand.Rand) *crashDev {
	after := &crashDev{durable: bytes.Clone(d.durable), fast: d.fast, probe: d.probe, written: maps.Clone(d.written)}
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

// memAnchor is a rollback anchor in memory whose state a crash image
// snapshots: the anchor lives outside the store and survives the crash as
// it was at that instant.
type memAnchor struct {
	mu sync.Mutex
	m  map[[16]byte]AnchorState
}

func newMemAnchor() *memAnchor { return &memAnchor{m: make(map[[16]byte]AnchorState)} }

func (a *memAnchor) Load(v [16]byte) (AnchorState, bool, error) {
	a.mu.Lock()
	defer a.mu.Unlock()
	s, ok := a.m[v]
	return s, ok, nil
}

func (a *memAnchor) Advance(v [16]byte, st AnchorState) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.m[v] = a.m[v].Merge(st)
	return nil
}

func (a *memAnchor) Remove(v [16]byte) error {
	a.mu.Lock()
	defer a.mu.Unlock()
	delete(a.m, v)
	return nil
}

func (a *memAnchor) clone() *memAnchor {
	a.mu.Lock()
	defer a.mu.Unlock()
	c := newMemAnchor()
	for k, v := range a.m {
		c.m[k] = v
	}
	return c
}

func quietLog() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// TestCrashModel runs random workloads against a model and cuts the power
// at a random device operation (inside a write, a commit, a checkpoint or
// a header update) or at the end; some seeds make one fdatasync fail, some
// run concurrent writers. Every chunk must then read, without error, as
// its last flushed value or a value written after that flush, and the
// reopened store must pass its rollback anchor.
func TestCrashModel(t *testing.T) {
	seeds := 300
	if s, err := strconv.Atoi(os.Getenv("GOLDILOCKS_CRASH_SEEDS")); err == nil && s > 0 {
		seeds = s // make torture
	}
	first := 0
	if s, err := strconv.Atoi(os.Getenv("GOLDILOCKS_CRASH_FIRST")); err == nil {
		first = s
	}
	var writes, flushes, failed, inLog, aligned int
	for seed := first; seed < first+seeds; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			st := crashOnce(t, uint64(seed))
			writes += st.writes
			flushes += st.flushes
			failed += st.failedFlushes
			inLog += st.inLog
			aligned += st.aligned
		})
	}
	t.Logf("%d seeds: %d chunk writes (%d into the log), %d flushes, %d failed fdatasyncs, %d chunks moved by home alignment", seeds, writes, inLog, flushes, failed, aligned)
	if writes < seeds*5 {
		t.Fatalf("the model wrote only %d chunks over %d seeds: its write branch does not run", writes, seeds)
	}
	if aligned < seeds {
		t.Fatalf("home alignment moved only %d chunks over %d seeds: that path is not exercised", aligned, seeds)
	}
	if inLog < seeds {
		t.Fatalf("only %d chunk writes went into the log over %d seeds: that path is not exercised", inLog, seeds)
	}
}

type crashStats struct{ writes, flushes, failedFlushes, inLog, aligned int }

// chunkModel is the set of values each chunk may legally hold after a
// crash: its value as of the last flush known complete, then every value
// written since.
type chunkModel struct {
	mu    sync.Mutex
	legal [][][]byte
}

func (m *chunkModel) cur(c int) []byte { return m.legal[c][len(m.legal[c])-1] }

func (m *chunkModel) write(off int64, p []byte, zero bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	n := int64(len(p))
	for c := off / ChunkSize; c <= (off+n-1)/ChunkSize; c++ {
		val := bytes.Clone(m.cur(int(c)))
		lo, hi := max(off, c*ChunkSize), min(off+n, (c+1)*ChunkSize)
		if zero {
			clear(val[lo-c*ChunkSize : hi-c*ChunkSize])
		} else {
			copy(val[lo-c*ChunkSize:], p[lo-off:hi-off])
		}
		m.legal[c] = append(m.legal[c], val)
	}
}

// flushed narrows the chunks in set (nil: all) to their current value.
func (m *chunkModel) flushed(set func(c int) bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	for c := range m.legal {
		if set == nil || set(c) {
			m.legal[c] = [][]byte{m.cur(c)}
		}
	}
}

func crashOnce(t *testing.T, seed uint64) crashStats {
	// A keystore of its own: every seed adds secrets, and a shared one
	// would make later seeds parse a file that grows without end.
	var kek KEKProvider = NewLocalKEK(t.TempDir(), nil)
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(seed, 0x60d1))
	const chunks = 200
	size := uint64(chunks * ChunkSize)
	logBlocks := 8 + uint64(rng.IntN(24))
	g, err := cowmap.NewGeometry(chunks, logBlocks)
	if err != nil {
		t.Fatal(err)
	}
	dev := newCrashDev(int64(g.End * ChunkSize))
	dev.fast = seed%4 != 3  // three seeds in four: small flushed writes go into the log,
	dev.probe = seed%2 == 0 // of which half only over holes
	dev.logLo, dev.logHi = int64(g.LogBase*ChunkSize), int64(g.NodeBase*ChunkSize)
	uuid := [16]byte{byte(seed), byte(seed >> 8), 7}
	if err := format(ctx, dev, uuid, size, byte(seed%2), kek, "default", logBlocks); err != nil {
		t.Fatal(err)
	}
	// What lives outside the store (the anchor, the keystore) is kept as
	// it was at the instant of the crash image.
	anchor := newMemAnchor()
	var (
		imageAnchor *memAnchor
		imageKEK    KEKProvider
	)
	keystoreAt := func() KEKProvider {
		dir := t.TempDir()
		b, err := os.ReadFile(kek.(*LocalKEK).path)
		if err != nil {
			t.Error(err)
		}
		os.WriteFile(filepath.Join(dir, KeystoreFile), b, 0o600)
		return NewLocalKEK(dir, nil)
	}
	dev.rng, dev.ops, dev.crashAt = rand.New(rand.NewPCG(seed, 0xc7)), 0, 1+rng.IntN(600) // its own: a checkpoint beside the commits may cut the power
	dev.onImage = func() { imageAnchor, imageKEK = anchor.clone(), keystoreAt() }
	v, err := Open(ctx, dev, "model", uuid, kek, quietLog(), Options{Anchor: anchor, AnchorEveryFlush: true, MaxLogged: 8 + rng.IntN(64)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(v.stopBackground) // also when the workload fails the test
	if seed%5 == 1 {
		dev.mu.Lock()
		dev.failAt = dev.ops + 1 + rng.IntN(400) // if this op is a flush, it fails
		dev.mu.Unlock()
	}
	v.epochLimit = uint64(4 + rng.IntN(64)) // walk through seal epochs
	m := &chunkModel{legal: make([][][]byte, chunks)}
	for c := range m.legal {
		m.legal[c] = [][]byte{make([]byte, ChunkSize)}
	}
	var st crashStats
	concurrent := seed%3 == 2
	if concurrent {
		st = crashWorkersConcurrent(t, v, dev, m, rng, size)
	} else {
		st = crashWorkload(t, v, dev, m, rng, size, kek)
	}
	dev.mu.Lock()
	st.inLog = dev.logData
	dev.mu.Unlock()
	if dev.failures() > 0 {
		st.failedFlushes++
		if _, err := v.WriteAt(make([]byte, ChunkSize), 0); !errors.Is(err, ErrVolumeFailed) {
			t.Fatalf("write after a failed fdatasync: %v, want ErrVolumeFailed", err)
		}
	}
	v.stopBackground() // the process died: the first volume is abandoned
	after := dev.cutNow(rng)
	kek = imageKEK
	v2, err := Open(ctx, after, "model", uuid, kek, quietLog(), Options{Anchor: imageAnchor})
	if err != nil {
		t.Fatalf("reopen after crash: %v", err)
	}
	got := make([]byte, ChunkSize)
	for c := 0; c < chunks; c++ {
		if _, err := v2.ReadAt(got, int64(c*ChunkSize)); err != nil {
			t.Fatalf("chunk %d after crash: %v", c, err)
		}
		ok := false
		for _, val := range m.legal[c] {
			ok = ok || bytes.Equal(got, val)
		}
		if !ok {
			t.Fatalf("chunk %d after crash holds a value it never legally held (%d legal)", c, len(m.legal[c]))
		}
	}
	// An interrupted rekey resumes (a finished one starts anew) and every
	// chunk keeps its value; then the volume keeps working and detaches
	// cleanly, and reattaches.
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
	if _, err := v2.WriteAt(bytes.Repeat([]byte{9}, ChunkSize), 0); err != nil {
		t.Fatal(err)
	}
	if err := v2.Close(); err != nil {
		t.Fatal(err)
	}
	v3, err := Open(ctx, after, "model", uuid, kek, quietLog(), Options{Anchor: imageAnchor})
	if err != nil {
		t.Fatalf("reattach after a clean detach: %v", err)
	}
	copy(vals, bytes.Repeat([]byte{9}, ChunkSize))
	if _, err := v3.ReadAt(after2, 0); err != nil || !bytes.Equal(after2, vals) {
		t.Fatalf("after a clean detach and reattach the contents differ (%v)", err)
	}
	v3.Close()
	return st
}

// crashWorkload is one writer: writes, zeroes, flushes and rekeys.
func crashWorkload(t *testing.T, v *Volume, dev *crashDev, m *chunkModel, rng *rand.Rand, size uint64, kek KEKProvider) crashStats {
	ctx := context.Background()
	var st crashStats
	ops := 20 + rng.IntN(160)
	for op := 0; op < ops && dev.cut() == nil && dev.failures() == 0; op++ {
		switch k := rng.IntN(20); {
		case k == 18: // align homes (what an idle volume does after large requests over scattered chunks)
			v.markScattered(0, int(size/ChunkSize), int(size/ChunkSize))
			moved, err := v.align(func() bool { return false })
			if dev.failures() > 0 {
				return st
			}
			if err != nil {
				t.Fatalf("op %d align: %v", op, err)
			}
			st.aligned += moved
			if moved > 0 && dev.cut() == nil { // its commit made every write durable
				m.flushed(nil)
			}
		case k == 19: // rekey, walked in small checkpoints, maybe stopped half-way
			opt := RekeyOptions{every: 1 + uint64(rng.IntN(16))}
			if rng.IntN(2) == 0 {
				opt.stopAt = uint64(1 + rng.IntN(int(size/ChunkSize)-1))
			}
			err := v.Rekey(ctx, kek, opt)
			if dev.failures() > 0 {
				return st
			}
			if err != nil && !(opt.stopAt != 0 && errors.Is(err, context.Canceled)) {
				t.Fatalf("op %d rekey: %v", op, err)
			}
			if err == nil && dev.cut() == nil { // it flushed everything
				m.flushed(nil)
			}
		case k < 10: // write, maybe unaligned, maybe over several chunks
			off := rng.Int64N(int64(size) - 1)
			n := 1 + rng.Int64N(min(5*ChunkSize, int64(size)-off))
			p := make([]byte, n)
			for i := range p {
				p[i] = byte(rng.Uint32())
			}
			if _, err := v.WriteAt(p, off); err != nil {
				if dev.failures() > 0 { // a background flush failed
					return st
				}
				t.Fatalf("op %d write: %v", op, err)
			}
			m.write(off, p, false)
			st.writes += int((off+n-1)/ChunkSize - off/ChunkSize + 1)
		case k < 13: // zero (unmap whole chunks)
			off := rng.Int64N(int64(size) - 1)
			n := 1 + rng.Int64N(min(6*ChunkSize, int64(size)-off))
			if err := v.Zero(off, n, true, false); err != nil {
				if dev.failures() > 0 {
					return st
				}
				t.Fatalf("op %d zero: %v", op, err)
			}
			m.write(off, make([]byte, n), true)
		default: // flush: only the latest value stays legal
			st.flushes++
			err := v.Flush()
			if dev.failures() > 0 {
				// A nil error is right when the flush that failed was a
				// checkpoint's, beside the commits, after this one's;
				// every later write must fail either way (checked after
				// the workload). cowmap's TestFailedFlushFailsTheMap holds a commit
				// to its own flush's error.
				return st
			}
			if err != nil {
				t.Fatalf("op %d flush: %v", op, err)
			}
			if dev.cut() != nil {
				break // cut inside the flush: older values stay legal
			}
			m.flushed(nil)
		}
		// The live volume always reads its latest values.
		if op%17 == 0 {
			got := make([]byte, size)
			if _, err := v.ReadAt(got, 0); err != nil {
				if dev.failures() > 0 && errors.Is(err, ErrVolumeFailed) {
					return st // a background flush failed and lost this chunk's data
				}
				t.Fatalf("op %d read: %v", op, err)
			}
			for c := range m.legal {
				if !bytes.Equal(got[c*ChunkSize:(c+1)*ChunkSize], m.cur(c)) {
					t.Fatalf("op %d: live chunk %d differs from the model", op, c)
				}
			}
		}
	}
	return st
}

// crashWorkersConcurrent runs three writers on disjoint chunks (chunk c
// belongs to writer c%3), each writing and flushing; a flush narrows only
// the chunks of its writer, whose writes all completed before it began.
func crashWorkersConcurrent(t *testing.T, v *Volume, dev *crashDev, m *chunkModel, rng *rand.Rand, size uint64) crashStats {
	const workers = 3
	chunks := int(size / ChunkSize)
	var (
		wg sync.WaitGroup
		mu sync.Mutex
		st crashStats
	)
	seeds := [workers]uint64{rng.Uint64(), rng.Uint64(), rng.Uint64()}
	stop := func() bool { return dev.cut() != nil || dev.failures() > 0 }
	// Beside the writers, home alignment passes over every leaf (they
	// change no value, so the model does not see them).
	alignDone := make(chan struct{})
	alignStopped := make(chan struct{})
	go func() {
		defer close(alignStopped)
		for {
			select {
			case <-alignDone:
				return
			default:
			}
			v.markScattered(0, chunks, chunks)
			moved, err := v.align(func() bool { return false })
			if stop() {
				return
			}
			if err != nil {
				t.Errorf("align: %v", err)
				return
			}
			mu.Lock()
			st.aligned += moved
			mu.Unlock()
			time.Sleep(100 * time.Microsecond)
		}
	}()
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(seeds[w], uint64(w)))
			mine := func(c int) bool { return c%workers == w }
			for op := 0; op < 40+rng.IntN(60) && !stop(); op++ {
				c := rng.IntN(chunks/workers)*workers + w
				switch k := rng.IntN(10); {
				case k < 6:
					in := rng.IntN(ChunkSize)
					n := 1 + rng.IntN(ChunkSize-in)
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					if _, err := v.WriteAt(p, int64(c*ChunkSize+in)); err != nil {
						if stop() {
							return
						}
						t.Errorf("writer %d: %v", w, err)
						return
					}
					m.write(int64(c*ChunkSize+in), p, false)
					mu.Lock()
					st.writes++
					mu.Unlock()
				case k < 7:
					if err := v.Zero(int64(c*ChunkSize), ChunkSize, true, false); err != nil {
						if stop() {
							return
						}
						t.Errorf("writer %d zero: %v", w, err)
						return
					}
					m.write(int64(c*ChunkSize), make([]byte, ChunkSize), true)
				default:
					err := v.Flush()
					mu.Lock()
					st.flushes++
					mu.Unlock()
					if stop() {
						return
					}
					if err != nil {
						t.Errorf("writer %d flush: %v", w, err)
						return
					}
					m.flushed(mine)
				}
			}
		}(w)
	}
	wg.Wait()
	close(alignDone)
	<-alignStopped
	if t.Failed() {
		t.FailNow()
	}
	return st
}

// TestReadAfterFailedFlush: a failed fdatasync may drop data the map in
// memory already names. Reading it then fails with ErrVolumeFailed (what
// happened, and what to do), not as tampering: no integrity alarm.
func TestReadAfterFailedFlush(t *testing.T) {
	ctx := context.Background()
	const size = 64 * ChunkSize
	kek := NewLocalKEK(t.TempDir(), nil)
	dev := newCrashDev(int64(LayoutFor(size).End))
	id := [16]byte{0xfa}
	if err := Format(ctx, dev, id, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	var logs atkLogBuf
	v, err := Open(ctx, dev, "ff", id, kek, slog.New(slog.NewTextHandler(&logs, nil)), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v.stopBackground()
	want := bytes.Repeat([]byte{0x5a}, 4*ChunkSize)
	if _, err := v.WriteAt(want, 8*ChunkSize); err != nil {
		t.Fatal(err)
	}
	dev.failDrops = true
	dev.flushHook = func() { // the next flush fails and drops the data
		dev.mu.Lock()
		defer dev.mu.Unlock()
		if dev.failed == 0 {
			dev.failAt = dev.ops + 1
		}
	}
	if err := v.Flush(); err == nil {
		t.Fatal("flush over a failing fdatasync succeeded")
	}
	got := make([]byte, len(want))
	_, err = v.ReadAt(got, 8*ChunkSize)
	if !errors.Is(err, ErrVolumeFailed) {
		t.Fatalf("read of data a failed flush dropped: %v, want ErrVolumeFailed", err)
	}
	if s := logs.String(); strings.Contains(s, "integrity failure") {
		t.Fatalf("a failed flush raised an integrity alarm:\n%s", s)
	}
}
