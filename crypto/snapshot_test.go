package crypto

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
	"sync"
	"testing"

	"goldilocks/internal/block"
)

// snapRig is a live volume and the stores of its snapshots, all on crash
// devices, with one KEK and one anchor.
type snapRig struct {
	t      testing.TB
	size   uint64
	kek    KEKProvider
	anchor *memAnchor
	live   *crashDev
	v      *Volume
	next   byte
	stores map[string]*storeDev // by snapshot name
}

type storeDev struct {
	id  [16]byte
	dev *crashDev
}

func newSnapRig(t testing.TB, size uint64) *snapRig {
	r := &snapRig{t: t, size: size, kek: NewLocalKEK(t.TempDir(), nil), anchor: newMemAnchor(),
		live: newCrashDev(int64(LayoutFor(size).End)), next: 1, stores: map[string]*storeDev{}}
	id := [16]byte{0xab}
	if err := Format(context.Background(), r.live, id, size, AES256GCM, r.kek, "default"); err != nil {
		t.Fatal(err)
	}
	r.v = r.openLive(r.live, r.anchor)
	return r
}

func (r *snapRig) openLive(dev *crashDev, anchor *memAnchor) *Volume {
	r.t.Helper()
	v, err := Open(context.Background(), dev, "live", [16]byte{0xab}, r.kek, quietLog(), Options{Anchor: anchor})
	if err != nil {
		r.t.Fatal(err)
	}
	return v
}

func (r *snapRig) openStore(name string, sd *storeDev) (*Volume, error) {
	return Open(context.Background(), sd.dev, "live@"+name, sd.id, r.kek, quietLog(), Options{Anchor: r.anchor, AnchorEveryFlush: true})
}

// create takes snapshot name of the rig's volume.
func (r *snapRig) create(name string) {
	r.t.Helper()
	sd := &storeDev{id: [16]byte{0x5e, r.next}, dev: newCrashDev(int64(LayoutFor(r.size).End))}
	r.next++
	if err := Format(context.Background(), sd.dev, sd.id, r.size, AES256GCM, r.kek, "default"); err != nil {
		r.t.Fatal(err)
	}
	st, err := r.openStore(name, sd)
	if err != nil {
		r.t.Fatal(err)
	}
	if _, err := r.v.CreateSnapshot(name, st, func(uint64) error { r.stores[name] = sd; return nil }); err != nil {
		r.t.Fatal(err)
	}
}

func (r *snapRig) read(d block.Device) []byte {
	r.t.Helper()
	b := make([]byte, r.size)
	if _, err := d.ReadAt(b, 0); err != nil {
		r.t.Fatal(err)
	}
	return b
}

func (r *snapRig) view(name string) []byte {
	r.t.Helper()
	w, err := r.v.SnapshotView(name)
	if err != nil {
		r.t.Fatal(err)
	}
	defer w.Close()
	return r.read(w)
}

// TestSnapshotModel runs random writes, partial and whole, zeroes, trims
// and flushes against a volume while snapshots are created and deleted
// (oldest, middle, newest), and checks after every step that each
// snapshot reads exactly as the volume did when it was taken, that the
// volume reads as the model, and that the changed extents since each
// snapshot are the chunks written since.
func TestSnapshotModel(t *testing.T) {
	const size = 256 * ChunkSize
	for seed := uint64(0); seed < 6; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 7))
			r := newSnapRig(t, size)
			defer r.v.Close()
			model := make([]byte, size)
			snaps := map[string][]byte{}
			written := map[string]map[uint64]bool{} // chunks written since each snapshot
			var order []string
			copies := 0
			for step := 0; step < 120; step++ {
				switch op := rng.IntN(20); {
				case op < 10: // write
					off := rng.Int64N(size - 1)
					n := 1 + rng.Int64N(min(size-off, 9*ChunkSize))
					if rng.IntN(2) == 0 { // whole chunks
						off = off / ChunkSize * ChunkSize
						n = (n + ChunkSize - 1) / ChunkSize * ChunkSize
						n = min(n, size-off)
					}
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.IntN(256)) | 1
					}
					if _, err := r.v.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
					for c := off / ChunkSize; c <= (off+n-1)/ChunkSize; c++ {
						for _, s := range order {
							written[s][uint64(c)] = true
						}
					}
				case op < 13: // zero or trim
					off := rng.Int64N(size - 1)
					n := 1 + rng.Int64N(min(size-off, 20*ChunkSize))
					var err error
					if op == 12 {
						err = r.v.Trim(off, n)
					} else {
						err = r.v.Zero(off, n, true, false)
					}
					if err != nil {
						t.Fatal(err)
					}
					for c := off / ChunkSize; c <= (off+n-1)/ChunkSize; c++ {
						// A chunk counts as written if its content could
						// change: a partial one is rewritten, a whole one
						// unmapped only if it was mapped. Conservatively,
						// the model marks it when its bytes were not all
						// zero already.
						lo, hi := max(off, c*ChunkSize), min(off+n, (c+1)*ChunkSize)
						whole := lo == c*ChunkSize && hi == (c+1)*ChunkSize
						if !whole || !allZero(model[c*ChunkSize:(c+1)*ChunkSize]) {
							for _, s := range order {
								written[s][uint64(c)] = true
							}
						}
					}
					clear(model[off : off+n])
				case op < 15:
					if err := r.v.Flush(); err != nil {
						t.Fatal(err)
					}
				case op < 18 && len(order) < 5:
					name := fmt.Sprintf("s%d", step)
					r.create(name)
					snaps[name] = bytes.Clone(model)
					written[name] = map[uint64]bool{}
					order = append(order, name)
				case len(order) > 0:
					i := rng.IntN(len(order))
					name := order[i]
					st, err := r.v.DeleteSnapshot(name, func() error { return nil })
					if err != nil {
						t.Fatal(err)
					}
					if st == nil {
						t.Fatal("no store returned")
					}
					order = append(order[:i], order[i+1:]...)
					delete(snaps, name)
					delete(written, name)
				}
				if !bytes.Equal(r.read(r.v), model) {
					t.Fatalf("step %d: the volume does not read as the model", step)
				}
				for _, s := range order {
					if got := r.view(s); !bytes.Equal(got, snaps[s]) {
						t.Fatalf("step %d: snapshot %s changed (first difference at byte %d)", step, s, firstDiff(got, snaps[s]))
					}
					// And a read that starts and ends inside chunks.
					w, err := r.v.SnapshotView(s)
					if err != nil {
						t.Fatal(err)
					}
					at := rng.Int64N(size - 1)
					part := make([]byte, 1+rng.Int64N(min(size-at, 40*ChunkSize)))
					_, err = w.ReadAt(part, at)
					w.Close()
					if err != nil || !bytes.Equal(part, snaps[s][at:at+int64(len(part))]) {
						t.Fatalf("step %d: snapshot %s: a read of %d bytes at %d: %v, or wrong bytes", step, s, len(part), at, err)
					}
					ext, err := r.v.ChangedExtents(s, nil, 0, size, 1<<20)
					if err != nil {
						t.Fatal(err)
					}
					var off int64
					for _, e := range ext {
						for c := off / ChunkSize; c < (off+e.Length)/ChunkSize; c++ {
							// The volume marks what it copied; the model
							// what may have changed: a whole-chunk zero of
							// a mapped chunk of zeros is a change to the
							// volume only.
							if got := e.Flags == 1; got != written[s][uint64(c)] && !(got && allZero(model[c*ChunkSize:(c+1)*ChunkSize])) {
								t.Fatalf("step %d: snapshot %s: chunk %d changed=%v, the model says %v", step, s, c, got, written[s][uint64(c)])
							}
						}
						off += e.Length
					}
					if off != size {
						t.Fatalf("changed extents cover %d bytes of %d", off, size)
					}
				}
			}
			for _, in := range r.v.Snapshots() {
				copies += int(in.Chunks)
			}
			t.Logf("%d snapshots left holding %d chunks", len(order), copies)
		})
	}
}

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// TestSnapshotRules: a snapshot name is unique, a snapshot being read is
// not deleted, a view is read-only, and a deleted snapshot is gone.
func TestSnapshotRules(t *testing.T) {
	r := newSnapRig(t, 16*ChunkSize)
	defer r.v.Close()
	r.create("a")
	sd := &storeDev{id: [16]byte{0x77}, dev: newCrashDev(int64(LayoutFor(r.size).End))}
	if err := Format(context.Background(), sd.dev, sd.id, r.size, AES256GCM, r.kek, "default"); err != nil {
		t.Fatal(err)
	}
	st, err := r.openStore("a", sd)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.v.CreateSnapshot("a", st, func(uint64) error { return nil }); !errors.Is(err, ErrSnapshotExists) {
		t.Fatalf("second snapshot named a: %v, want ErrSnapshotExists", err)
	}
	// A create whose record fails, with a write between its flush point
	// and the record (writes go on then): the older snapshot must still
	// read as when taken, and count the write as a change.
	before := r.view("a")
	committed := errors.New("registry full")
	if _, err := r.v.CreateSnapshot("b", st, func(uint64) error {
		if _, err := r.v.WriteAt(bytes.Repeat([]byte{0x5a}, ChunkSize), 5*ChunkSize); err != nil {
			t.Fatal(err)
		}
		return committed
	}); !errors.Is(err, committed) {
		t.Fatalf("create whose commit fails: %v", err)
	}
	if got := r.view("a"); !bytes.Equal(got, before) {
		t.Fatalf("snapshot a changed by a write during a failed create (byte %d)", firstDiff(got, before))
	}
	if ext, err := r.v.ChangedExtents("a", nil, 5*ChunkSize, ChunkSize, 1); err != nil || len(ext) != 1 || ext[0].Flags != block.ExtentDirty {
		t.Fatalf("changed since a after a write during a failed create: %v %v", ext, err)
	}
	st.Close()
	if got := len(r.v.Snapshots()); got != 1 {
		t.Fatalf("%d snapshots after a failed create, want 1", got)
	}
	// Writes after it neither reach its (closed) store nor fail.
	if _, err := r.v.WriteAt(make([]byte, 3*ChunkSize), ChunkSize); err != nil {
		t.Fatalf("a write after a failed create: %v", err)
	}
	if err := r.v.Flush(); err != nil {
		t.Fatalf("a flush after a failed create: %v", err)
	}
	w, err := r.v.SnapshotView("a")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.WriteAt(make([]byte, 10), 0); !errors.Is(err, block.ErrReadOnly) {
		t.Fatalf("write to a view: %v", err)
	}
	if _, err := r.v.DeleteSnapshot("a", func() error { return nil }); !errors.Is(err, ErrSnapshotBusy) {
		t.Fatalf("delete of a snapshot being read: %v, want ErrSnapshotBusy", err)
	}
	w.Close()
	if _, err := r.v.DeleteSnapshot("a", func() error { return nil }); err != nil {
		t.Fatal(err)
	}
	if _, err := r.v.SnapshotView("a"); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("view of a deleted snapshot: %v", err)
	}
	if _, err := r.v.ChangedExtents("a", nil, 0, 4096, 1); !errors.Is(err, ErrNoSnapshot) {
		t.Fatalf("changed extents of a deleted snapshot: %v", err)
	}
}

// TestSnapshotCrash cuts the power at a random operation of the volume's
// store or of a snapshot's store (both images taken at that instant)
// during writes, flushes, creates and deletes, then opens everything
// again: each snapshot that was created (its record committed) must read
// exactly as the volume did when it was taken, and every chunk of the
// volume as its last flushed value or one written after.
func TestSnapshotCrash(t *testing.T) {
	const size = 64 * ChunkSize
	cuts, seeds := 0, 40
	if s, err := strconv.Atoi(os.Getenv("GOLDILOCKS_CRASH_SEEDS")); err == nil && s > 0 {
		seeds = s // make torture
	}
	for seed := uint64(0); seed < uint64(seeds); seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			if snapCrashOnce(t, seed, size) {
				cuts++
			}
		})
	}
	if cuts < seeds/2 {
		t.Fatalf("the power was cut in only %d of %d runs", cuts, seeds)
	}
}

func snapCrashOnce(t *testing.T, seed uint64, size int64) bool {
	rng := rand.New(rand.NewPCG(seed, 11))
	r := newSnapRig(t, uint64(size))
	model := &chunkModel{legal: make([][][]byte, size/ChunkSize)}
	for c := range model.legal {
		model.legal[c] = [][]byte{make([]byte, ChunkSize)}
	}
	// The instant of the cut: images of every device and the anchor, and
	// the snapshots committed by then with their contents.
	type image struct {
		live   *crashDev
		stores map[string]*crashDev
		anchor *memAnchor
		snaps  map[string][]byte
		ids    map[string][16]byte
	}
	var (
		img       *image
		committed = map[string][]byte{}
		ids       = map[string][16]byte{}
	)
	var mu sync.Mutex // the cut may come from a volume's background flush
	cut := func() {
		if img != nil {
			return
		}
		img = &image{stores: map[string]*crashDev{}, anchor: r.anchor.clone(), snaps: map[string][]byte{}, ids: map[string][16]byte{}}
		img.live = r.live.crash(rng)
		for name, sd := range r.stores {
			if _, ok := committed[name]; ok {
				img.stores[name] = sd.dev.crash(rng)
				img.snaps[name] = committed[name]
				img.ids[name] = ids[name]
			}
		}
	}
	target := 1 + rng.IntN(150)
	ops := 0
	tick := func() {
		mu.Lock()
		defer mu.Unlock()
		ops++
		if ops == target {
			cut()
		}
	}
	cutDone := func() bool {
		mu.Lock()
		defer mu.Unlock()
		return img != nil
	}
	r.live.flushHook = tick
	cur := func() []byte {
		b := make([]byte, size)
		for c := range model.legal {
			copy(b[c*ChunkSize:], model.cur(c))
		}
		return b
	}
	n := 0
	for step := 0; step < 60 && !cutDone(); step++ {
		switch op := rng.IntN(12); {
		case op < 6:
			off := rng.Int64N(size - 1)
			l := 1 + rng.Int64N(min(size-off, 6*ChunkSize))
			p := make([]byte, l)
			for i := range p {
				p[i] = byte(rng.IntN(255)) + 1
			}
			if _, err := r.v.WriteAt(p, off); err != nil {
				t.Fatal(err)
			}
			model.write(off, p, false)
			tick()
		case op < 7:
			off := rng.Int64N(size - 1)
			l := 1 + rng.Int64N(min(size-off, 8*ChunkSize))
			if err := r.v.Trim(off, l); err != nil {
				t.Fatal(err)
			}
			model.write(off, make([]byte, l), true)
			tick()
		case op < 9:
			if err := r.v.Flush(); err != nil {
				t.Fatal(err)
			}
			if !cutDone() {
				model.flushed(nil)
			}
		case op < 11 && len(r.stores) < 4:
			name := fmt.Sprint("s", n)
			n++
			sd := &storeDev{id: [16]byte{0x5e, r.next}, dev: newCrashDev(int64(LayoutFor(r.size).End))}
			r.next++
			sd.dev.flushHook = tick
			if err := Format(context.Background(), sd.dev, sd.id, r.size, AES256GCM, r.kek, "default"); err != nil {
				t.Fatal(err)
			}
			st, err := r.openStore(name, sd)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := r.v.CreateSnapshot(name, st, func(uint64) error {
				mu.Lock()
				defer mu.Unlock()
				if img == nil { // the record is durable before the cut
					model.flushed(nil)
					committed[name] = cur()
					ids[name] = sd.id
				}
				r.stores[name] = sd
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		default:
			if len(r.stores) == 0 {
				continue
			}
			var names []string
			for name := range r.stores {
				names = append(names, name)
			}
			name := names[rng.IntN(len(names))]
			if _, err := r.v.DeleteSnapshot(name, func() error {
				mu.Lock()
				defer mu.Unlock()
				if img == nil {
					delete(committed, name)
				}
				delete(r.stores, name)
				return nil
			}); err != nil {
				t.Fatal(err)
			}
		}
	}
	cutHere := cutDone()
	mu.Lock()
	cut()
	mu.Unlock()
	r.v.Close()
	// Reopen what the cut left, snapshots oldest first (their names sort
	// in creation order: s0, s1, … below 10).
	v := r.openLive(img.live, img.anchor)
	defer v.Close()
	var loaded []Snapshot
	for i := 0; i < n; i++ {
		name := fmt.Sprint("s", i)
		dev, ok := img.stores[name]
		if !ok {
			continue
		}
		st, err := Open(context.Background(), dev, "live@"+name, img.ids[name], r.kek, quietLog(), Options{Anchor: img.anchor, AnchorEveryFlush: true})
		if err != nil {
			t.Fatalf("snapshot %s after the cut: %v", name, err)
		}
		loaded = append(loaded, Snapshot{Name: name, Store: st})
	}
	if err := v.LoadSnapshots(loaded); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, ChunkSize)
	for c := range model.legal {
		if _, err := v.ReadAt(got, int64(c)*ChunkSize); err != nil {
			t.Fatalf("chunk %d after the cut: %v", c, err)
		}
		ok := false
		for _, l := range model.legal[c] {
			ok = ok || bytes.Equal(l, got)
		}
		if !ok {
			t.Fatalf("chunk %d after the cut holds none of its %d legal values", c, len(model.legal[c]))
		}
	}
	for _, sn := range loaded {
		w, err := v.SnapshotView(sn.Name)
		if err != nil {
			t.Fatal(err)
		}
		b := make([]byte, size)
		_, err = w.ReadAt(b, 0)
		w.Close()
		if err != nil {
			t.Fatalf("snapshot %s after the cut: %v", sn.Name, err)
		}
		if !bytes.Equal(b, img.snaps[sn.Name]) {
			t.Fatalf("snapshot %s after the cut differs from the volume when it was taken (byte %d)", sn.Name, firstDiff(b, img.snaps[sn.Name]))
		}
	}
	return cutHere
}

// TestCloneModel: a clone of a snapshot reads as the snapshot until
// written; random writes, zeroes and trims of it match a model; writes to
// the source volume after the snapshot never show in it; it can have a
// snapshot of its own; its base stays busy (not deletable) while open.
func TestCloneModel(t *testing.T) {
	const size = 128 * ChunkSize
	for seed := uint64(0); seed < 4; seed++ {
		t.Run(fmt.Sprint(seed), func(t *testing.T) {
			rng := rand.New(rand.NewPCG(seed, 13))
			r := newSnapRig(t, size)
			defer r.v.Close()
			fill := make([]byte, size)
			for i := range fill {
				fill[i] = byte(rng.IntN(256))
			}
			clear(fill[64*ChunkSize : 80*ChunkSize]) // some never written
			if _, err := r.v.WriteAt(fill[:64*ChunkSize], 0); err != nil {
				t.Fatal(err)
			}
			if _, err := r.v.WriteAt(fill[80*ChunkSize:], 80*ChunkSize); err != nil {
				t.Fatal(err)
			}
			r.create("base")
			view, err := r.v.SnapshotView("base")
			if err != nil {
				t.Fatal(err)
			}
			cdev := newCrashDev(int64(LayoutFor(size).End))
			cid := [16]byte{0xc1}
			if err := Format(context.Background(), cdev, cid, size, AES256GCM, r.kek, "default"); err != nil {
				t.Fatal(err)
			}
			released := false
			clone, err := Open(context.Background(), cdev, "clone", cid, r.kek, quietLog(), Options{Base: view, Release: func() { view.Close(); released = true }})
			if err != nil {
				t.Fatal(err)
			}
			if _, err := r.v.DeleteSnapshot("base", func() error { return nil }); !errors.Is(err, ErrSnapshotBusy) {
				t.Fatalf("delete of a clone's base: %v, want ErrSnapshotBusy", err)
			}
			model := bytes.Clone(fill)
			live := make([]byte, size)
			for i := range live {
				live[i] = 0xee
			}
			if _, err := r.v.WriteAt(live, 0); err != nil { // the source moves on
				t.Fatal(err)
			}
			if err := clone.LoadSnapshots(nil); err != nil {
				t.Fatal(err)
			}
			var cs []byte // the clone's own snapshot, once taken
			for step := 0; step < 80; step++ {
				off := rng.Int64N(size - 1)
				n := 1 + rng.Int64N(min(size-off, 12*ChunkSize))
				switch op := rng.IntN(10); {
				case op < 6:
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.IntN(255)) + 1
					}
					if _, err := clone.WriteAt(p, off); err != nil {
						t.Fatal(err)
					}
					copy(model[off:], p)
				case op < 8:
					if err := clone.Zero(off, n, true, false); err != nil {
						t.Fatal(err)
					}
					clear(model[off : off+n])
				case op < 9:
					if err := clone.Flush(); err != nil {
						t.Fatal(err)
					}
				case cs == nil:
					sd := &storeDev{id: [16]byte{0xc2}, dev: newCrashDev(int64(LayoutFor(size).End))}
					if err := Format(context.Background(), sd.dev, sd.id, size, AES256GCM, r.kek, "default"); err != nil {
						t.Fatal(err)
					}
					st, err := r.openStore("cs", sd)
					if err != nil {
						t.Fatal(err)
					}
					if _, err := clone.CreateSnapshot("cs", st, func(uint64) error { return nil }); err != nil {
						t.Fatal(err)
					}
					cs = bytes.Clone(model)
				}
				if got := r.read(clone); !bytes.Equal(got, model) {
					t.Fatalf("step %d: the clone differs from the model at byte %d", step, firstDiff(got, model))
				}
				if cs != nil {
					w, err := clone.SnapshotView("cs")
					if err != nil {
						t.Fatal(err)
					}
					got := r.read(w)
					w.Close()
					if !bytes.Equal(got, cs) {
						t.Fatalf("step %d: the clone's snapshot changed at byte %d", step, firstDiff(got, cs))
					}
				}
			}
			if got := r.view("base"); !bytes.Equal(got, fill) {
				t.Fatalf("the base snapshot changed (byte %d)", firstDiff(got, fill))
			}
			if err := clone.Close(); err != nil || !released {
				t.Fatalf("clone close: %v, base released %v", err, released)
			}
			if _, err := r.v.DeleteSnapshot("base", func() error { return nil }); err != nil {
				t.Fatalf("delete of the base after its clone closed: %v", err)
			}
		})
	}
}
