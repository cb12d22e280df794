package crypto

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/block"
)

// submitStore is a store that completes reads itself, each on a goroutine
// (block.Submitter), as RBD's aio does: full declines every request, and
// reads at failAt fail with EIO.
type submitStore struct {
	*countDev
	full      atomic.Bool
	failAt    atomic.Int64
	submitted atomic.Int32
}

func (d *submitStore) Caps() block.Caps { return block.CanSubmit }

func (d *submitStore) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	if d.full.Load() {
		return false
	}
	d.submitted.Add(1)
	go func() {
		var b block.Batch
		var err error
		if off == d.failAt.Load() {
			err = syscall.EIO
		} else {
			_, err = d.ReadAt(p, off)
		}
		done(err, &b)
		b.Run()
	}()
	return true
}

func (d *submitStore) SubmitWriteAt([]byte, int64, bool, func(error, *block.Batch)) bool {
	return false
}
func (d *submitStore) Push() {}

// formatOn formats a volume of size bytes on dev and opens it, closed at
// the test's end.
func formatOn(tb testing.TB, dev block.Device, size uint64) *Volume {
	tb.Helper()
	kek := NewLocalKEK(tb.TempDir(), nil)
	id := [16]byte{9}
	if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
		tb.Fatal(err)
	}
	v, err := Open(context.Background(), dev, "sub", id, kek, quietLog(), Options{})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { v.Close() })
	return v
}

// submitRead runs v.SubmitReadAt and waits for its result; ok false if
// it was declined.
func submitRead(v *Volume, p []byte, off int64) (ok bool, err error) {
	errc := make(chan error, 1)
	if !v.SubmitReadAt(p, off, func(err error, _ *block.Batch) { errc <- err }) {
		return false, nil
	}
	return true, <-errc
}

// Reads submitted to a store that completes them itself return what was
// written (zeros where nothing was), chunks in either home, over runs of
// one or several requests; a store with no room makes them here; a
// failed store read and a tampered chunk are errors; what SubmitReadAt
// cannot do alone (a partial chunk) it declines.
func TestSubmitReadAt(t *testing.T) {
	const size = 4 << 20
	dev := &submitStore{countDev: &countDev{size: int64(LayoutFor(size).End)}}
	dev.failAt.Store(-1)
	v := formatOn(t, dev, size)
	if block.OptionalOf(v).Submitter == nil {
		t.Fatal("a volume on a store that submits does not declare CanSubmit")
	}
	rng := rand.New(rand.NewPCG(1, 2))
	want := make([]byte, size/2) // the second half stays unwritten: zeros
	for i := range want {
		want[i] = byte(rng.IntN(256))
	}
	if _, err := v.WriteAt(want, 0); err != nil || v.Flush() != nil {
		t.Fatal(err)
	}
	for range 200 { // single chunks rewritten: their other home
		c := rng.IntN(len(want) / ChunkSize)
		for i := c * ChunkSize; i < (c+1)*ChunkSize; i++ {
			want[i] = byte(rng.IntN(256))
		}
		if _, err := v.WriteAt(want[c*ChunkSize:(c+1)*ChunkSize], int64(c*ChunkSize)); err != nil {
			t.Fatal(err)
		}
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	expect := func(off, n int) []byte {
		e := make([]byte, n)
		if off < len(want) {
			copy(e, want[off:])
		}
		return e
	}
	accepted := 0
	for i := range 400 {
		n := (1 + rng.IntN(8)) * ChunkSize
		off := rng.IntN(size/ChunkSize-n/ChunkSize+1) * ChunkSize
		dev.full.Store(i%10 == 9) // every tenth: no room at the store
		got := make([]byte, n)
		ok, err := submitRead(v, got, int64(off))
		if !ok {
			if _, err := v.ReadAt(got, int64(off)); err != nil {
				t.Fatal(err)
			}
		} else {
			accepted++
		}
		if err != nil {
			t.Fatalf("read of %d bytes at %d: %v", n, off, err)
		}
		if !bytes.Equal(got, expect(off, n)) {
			t.Fatalf("read of %d bytes at %d (submitted: %v): other bytes than written", n, off, ok)
		}
	}
	dev.full.Store(false)
	if accepted < 100 || dev.submitted.Load() == 0 {
		t.Fatalf("%d of 400 reads submitted, %d store requests: the path is not taken", accepted, dev.submitted.Load())
	}

	// Declined: a partial chunk.
	if ok, _ := submitRead(v, make([]byte, 512), 0); ok {
		t.Error("a partial chunk was submitted")
	}

	// A failed store read, and a tampered chunk.
	e, err := v.m.Lookup(3)
	if err != nil {
		t.Fatal(err)
	}
	at := int64(v.geo.DataBlock(3, e.Loc()) * ChunkSize)
	dev.failAt.Store(at)
	if ok, err := submitRead(v, make([]byte, ChunkSize), 3*ChunkSize); !ok || !errors.Is(err, syscall.EIO) {
		t.Errorf("a failed store read: submitted %v, %v; want EIO", ok, err)
	}
	dev.failAt.Store(-1)
	dev.mu.Lock()
	dev.blocks[at/ChunkSize][100] ^= 1
	dev.mu.Unlock()
	if ok, err := submitRead(v, make([]byte, 2*ChunkSize), 2*ChunkSize); !ok || !errors.Is(err, ErrChunkAuth) {
		t.Errorf("a tampered chunk: submitted %v, %v; want ErrChunkAuth", ok, err)
	}
	// The chunks' locks were released: a write to them goes through.
	if _, err := v.WriteAt(make([]byte, 2*ChunkSize), 2*ChunkSize); err != nil {
		t.Fatal(err)
	}
}

// inlineStore completes each submitted read at once, on the caller's
// goroutine: what the volume itself costs per submitted read.
type inlineStore struct{ *countDev }

func (d inlineStore) Caps() block.Caps { return block.CanSubmit }
func (d inlineStore) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	_, err := d.ReadAt(p, off)
	done(err, nil)
	return true
}
func (d inlineStore) SubmitWriteAt([]byte, int64, bool, func(error, *block.Batch)) bool { return false }
func (d inlineStore) Push()                                                             {}

// A submitted 4 KiB read allocates nothing: the read's state, its map
// entries and locks come from pools, its completion is bound once.
func BenchmarkSubmitRead4K(b *testing.B) {
	const size = 64 << 20
	v := formatOn(b, inlineStore{&countDev{size: int64(LayoutFor(size).End)}}, size)
	if _, err := v.WriteAt(make([]byte, 1<<20), 0); err != nil || v.Flush() != nil {
		b.Fatal(err)
	}
	p := make([]byte, ChunkSize)
	var failed error
	done := func(err error, _ *block.Batch) { failed = err }
	b.ReportAllocs()
	b.SetBytes(ChunkSize)
	for i := 0; b.Loop(); i++ {
		if !v.SubmitReadAt(p, int64(i%256)*ChunkSize, done) {
			b.Fatal("declined")
		}
		if failed != nil {
			b.Fatal(failed)
		}
	}
}

// heldStore holds submitted reads until Push, as RBD's submission queue
// and an upstream device's send buffer do.
type heldStore struct {
	*countDev
	mu   sync.Mutex
	held []func()
}

func (d *heldStore) Caps() block.Caps { return block.CanSubmit }

func (d *heldStore) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	d.mu.Lock()
	d.held = append(d.held, func() { _, err := d.ReadAt(p, off); done(err, nil) })
	d.mu.Unlock()
	return true
}

func (d *heldStore) SubmitWriteAt([]byte, int64, bool, func(error, *block.Batch)) bool {
	return false
}

func (d *heldStore) Push() {
	d.mu.Lock()
	held := d.held
	d.held = nil
	d.mu.Unlock()
	for _, f := range held {
		go f()
	}
}

// A reader that submitted a read of chunk X, not yet pushed, and then
// submits one of a chunk that shares X's lock while a writer waits for
// X: the writer waits on the first read, which the store starts only at
// Push, so the second submission must push before it waits for the lock
// (it waited for good).
func TestSubmitReadAtPushesBeforeWaiting(t *testing.T) {
	const size = 8 << 20
	dev := &heldStore{countDev: &countDev{size: int64(LayoutFor(size).End)}}
	v := formatOn(t, dev, size)
	old := make([]byte, size)
	for i := range old {
		old[i] = byte(i / ChunkSize)
	}
	if _, err := v.WriteAt(old, 0); err != nil || v.Flush() != nil {
		t.Fatal(err)
	}
	x := uint64(5)
	y := x + uint64(len(v.locks)) // the same lock as x
	errs := make(chan error, 3)
	px := make([]byte, ChunkSize)
	if !v.SubmitReadAt(px, int64(x*ChunkSize), func(err error, _ *block.Batch) { errs <- err }) {
		t.Fatal("the read of chunk x was declined")
	}
	go func() { // the writer: waits for x's lock, held by the read
		_, err := v.WriteAt(bytes.Repeat([]byte{0xee}, ChunkSize), int64(x*ChunkSize))
		errs <- err
	}()
	time.Sleep(100 * time.Millisecond) // the writer is waiting for the lock by now
	py := make([]byte, ChunkSize)
	submitted := make(chan bool, 1)
	go func() {
		submitted <- v.SubmitReadAt(py, int64(y*ChunkSize), func(err error, _ *block.Batch) { errs <- err })
	}()
	select {
	case ok := <-submitted:
		if !ok {
			t.Fatal("the read of chunk y was declined")
		}
	case <-time.After(10 * time.Second):
		dev.Push() // (lets the test end)
		t.Fatal("the read of chunk y waited for its lock without pushing the read the writer waits on: deadlock")
	}
	v.Push()
	for range 3 {
		select {
		case err := <-errs:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("a request did not complete")
		}
	}
	if !bytes.Equal(px, old[x*ChunkSize:(x+1)*ChunkSize]) || !bytes.Equal(py, old[y*ChunkSize:(y+1)*ChunkSize]) {
		t.Error("the reads returned other bytes than were written before them")
	}
}
