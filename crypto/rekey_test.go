package crypto

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// A rekey under concurrent writers and readers: every byte reads as
// written, at the end one DEK remains (a new one) in both header copies,
// and the volume reopens with it alone.
func TestRekeyOnline(t *testing.T) {
	const chunks = 3000
	v, dev, kek := openTestVolume(t, chunks*ChunkSize)
	ctx := context.Background()
	model := make([]byte, chunks*ChunkSize)
	rng := rand.New(rand.NewPCG(1, 2))
	for i := range model[:chunks*ChunkSize/2] { // half the volume mapped
		model[i] = byte(rng.Uint32())
	}
	if _, err := v.WriteAt(model[:chunks*ChunkSize/2], 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Flush(); err != nil {
		t.Fatal(err)
	}
	before := v.Header()

	var (
		stop    atomic.Bool
		wg      sync.WaitGroup
		modelMu sync.Mutex
	)
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(w), 9))
			buf := make([]byte, 3*ChunkSize)
			for i := 0; !stop.Load(); i++ {
				n := 1 + rng.IntN(len(buf))
				off := int64(rng.IntN(chunks*ChunkSize - n))
				if w%2 == 0 { // a writer owns the chunks ≡ w/2 mod 2 of a stripe
					off = off / (8 * ChunkSize) * (8 * ChunkSize)
					off += int64(w/2) * 4 * ChunkSize
					n = min(n, 4*ChunkSize)
					if off+int64(n) > chunks*ChunkSize {
						continue
					}
					for j := range buf[:n] {
						buf[j] = byte(rng.Uint32())
					}
					modelMu.Lock()
					_, err := v.WriteAt(buf[:n], off)
					copy(model[off:], buf[:n])
					modelMu.Unlock()
					if err != nil {
						t.Error(err)
						return
					}
					continue
				}
				if _, err := v.ReadAt(buf[:n], off); err != nil {
					t.Error(err)
					return
				}
			}
		}(w)
	}
	var calls int
	err := v.Rekey(ctx, kek, RekeyOptions{every: 700, Progress: func(done, total uint64) { calls++ }})
	stop.Store(true)
	wg.Wait()
	if err != nil {
		t.Fatal(err)
	}
	if calls == 0 {
		t.Error("no progress reported")
	}
	got := make([]byte, len(model))
	if _, err := v.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("contents differ after an online rekey")
	}
	after := v.Header()
	if after.Rekeying() || after.RekeyCursor != 0 || after.Active == before.Active {
		t.Fatalf("header after rekey: active %d (was %d), cursor %d, rekeying %v", after.Active, before.Active, after.RekeyCursor, after.Rekeying())
	}
	for c := 0; c < 2; c++ { // neither copy keeps the old wrapped DEK
		var b [HeaderBlockSize]byte
		dev.ReadAt(b[:], int64(c)*HeaderBlockSize)
		if bytes.Contains(b[:], before.DEK[before.Active]) {
			t.Fatalf("header copy %c still holds the old wrapped DEK", "AB"[c])
		}
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	v2, err := Open(ctx, dev, "t", [16]byte{0xab}, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := v2.ReadAt(got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("after reopen: %v, equal %v", err, bytes.Equal(got, model))
	}
	// The old DEK can no longer open what the volume holds: its chunks are
	// all under the new key (a chunk's entry names its slot).
	for c := uint64(0); c < chunks; c++ {
		e, err := v2.m.Lookup(c)
		if err != nil {
			t.Fatal(err)
		}
		if e.Mapped() && e.KeySlot() != after.Active {
			t.Fatalf("chunk %d still names the old DEK slot", c)
		}
	}
}

// An interrupted rekey (cancelled half-way, then the volume closed) reads
// correctly when reopened, and a second Rekey resumes at the cursor.
func TestRekeyResume(t *testing.T) {
	const chunks = 500
	v, dev, kek := openTestVolume(t, chunks*ChunkSize)
	ctx := context.Background()
	data := bytes.Repeat([]byte("resume!!"), chunks*ChunkSize/8)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	err := v.Rekey(ctx, kek, RekeyOptions{every: 64, stopAt: 300})
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("stopped rekey: %v", err)
	}
	if r, cur, _ := v.RekeyState(); !r || cur != 256 {
		t.Fatalf("rekey state after stop: rekeying %v cursor %d, want true 256", r, cur)
	}
	v.Close()
	v2, err := Open(ctx, dev, "t", [16]byte{0xab}, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	if _, err := v2.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("mid-rekey read: %v", err)
	}
	var first uint64 = 1 << 62
	err = v2.Rekey(ctx, kek, RekeyOptions{every: 64, Progress: func(d, _ uint64) { first = min(first, d) }})
	if err != nil {
		t.Fatal(err)
	}
	if first != 256 {
		t.Errorf("resumed at chunk %d, want the cursor 256", first)
	}
	if _, err := v2.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("after resume: %v", err)
	}
}

// Rotation rewraps the DEK under a new KEK version, through an open volume
// and through a HeaderFile, and the old version is then not needed.
func TestRotateSetWrapped(t *testing.T) {
	const chunks = 64
	v, dev, kek := openTestVolume(t, chunks*ChunkSize)
	ctx := context.Background()
	if _, err := v.WriteAt(bytes.Repeat([]byte{7}, ChunkSize), 0); err != nil {
		t.Fatal(err)
	}
	for _, viaFile := range []bool{false, true} {
		var kh KeyHeader = v
		if viaFile {
			v.Close()
			f, err := OpenHeader(ctx, dev, "t", [16]byte{0xab}, kek, quietLog())
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			kh = f
		}
		ver, err := kek.Rotate(ctx, "default")
		if err != nil {
			t.Fatal(err)
		}
		h := kh.Header()
		ks := []WrappedKey{{Volume: h.UUID, Version: h.KEK.Version, Wrapped: h.DEK[h.Active]}}
		if err := kek.Rewrap(ctx, "default", 0, ks); err != nil || ks[0].Err != nil || ks[0].Version != ver {
			t.Fatalf("rewrap: %v %v v%d", err, ks[0].Err, ks[0].Version)
		}
		var deks [2][]byte
		deks[h.Active] = ks[0].Wrapped
		stale := h
		stale.DEK[h.Active] = []byte("other")
		if err := kh.SetWrapped(&stale, ver, deks); !errors.Is(err, ErrKeysChanged) {
			t.Fatalf("SetWrapped with a stale header: %v", err)
		}
		if err := kh.SetWrapped(&h, ver, deks); err != nil {
			t.Fatal(err)
		}
		if got := kh.Header().KEK.Version; got != ver {
			t.Fatalf("header KEK version %d, want %d", got, ver)
		}
	}
	v2, err := Open(ctx, dev, "t", [16]byte{0xab}, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer v2.Close()
	got := make([]byte, ChunkSize)
	if _, err := v2.ReadAt(got, 0); err != nil || got[0] != 7 {
		t.Fatalf("read after rotations: %v", err)
	}
}

// An open volume's data key sits in locked memory (VmLck counts it), and
// the lock is gone once the volume is closed.
func TestDEKLocked(t *testing.T) {
	vmlck := func() int {
		b, err := os.ReadFile("/proc/self/status")
		if err != nil {
			t.Skip("no /proc/self/status")
		}
		for _, l := range strings.Split(string(b), "\n") {
			if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmLck:" {
				n, _ := strconv.Atoi(f[1])
				return n
			}
		}
		return 0
	}
	var lim unix.Rlimit
	if unix.Getrlimit(unix.RLIMIT_MEMLOCK, &lim) != nil || lim.Cur < 1<<20 {
		t.Skip("RLIMIT_MEMLOCK too small to lock keys here")
	}
	before := vmlck()
	v, _, _ := openTestVolume(t, 64*ChunkSize)
	if got := vmlck(); got < before+4 {
		t.Fatalf("VmLck %d kB with a volume open, %d kB before: the DEK is not locked", got, before)
	}
	v.Close()
	if got := vmlck(); got != before {
		t.Fatalf("VmLck %d kB after close, %d kB before", got, before)
	}
}
