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

	"goldilocks/crypto/cowmap"
)

// TestCrashEveryPoint cuts the power at every device operation of one
// fixed workload (writes, zeroes, flushes, checkpoints, seal epochs, a
// rekey, a clean detach), three ways each (which volatile writes reach
// the disk whole, torn, or not at all), and checks every chunk after each
// cut. Random seeds (TestCrashModel) may miss an ordering bug that needs
// the cut at one exact operation; this does not.
func TestCrashEveryPoint(t *testing.T) {
	ctx := context.Background()
	const chunks = 64
	size := uint64(chunks * ChunkSize)
	g, err := cowmap.NewGeometry(chunks, 8)
	if err != nil {
		t.Fatal(err)
	}
	keyDir := t.TempDir()
	kek := NewLocalKEK(keyDir, nil)
	uuid := [16]byte{0xec}
	base := newCrashDev(int64(g.End * ChunkSize))
	if err := format(ctx, base, uuid, size, AES256GCM, kek, "default", 8); err != nil {
		t.Fatal(err)
	}
	keystore, err := os.ReadFile(filepath.Join(keyDir, KeystoreFile))
	if err != nil {
		t.Fatal(err)
	}

	// run plays the workload on a copy of base, cutting the power at op
	// crashAt (0: never); it returns the model and the crash image.
	run := func(crashAt int, rng *rand.Rand) (*chunkModel, *crashDev, *memAnchor, KEKProvider, int) {
		dir := t.TempDir()
		os.WriteFile(filepath.Join(dir, KeystoreFile), keystore, 0o600)
		kek := NewLocalKEK(dir, nil)
		dev := &crashDev{durable: bytes.Clone(base.durable), rng: rng, crashAt: crashAt}
		anchor := newMemAnchor()
		var (
			imgAnchor *memAnchor
			imgKEK    KEKProvider
		)
		keystoreAt := func() KEKProvider {
			d := t.TempDir()
			b, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
			os.WriteFile(filepath.Join(d, KeystoreFile), b, 0o600)
			return NewLocalKEK(d, nil)
		}
		dev.onImage = func() { imgAnchor, imgKEK = anchor.clone(), keystoreAt() }
		m := &chunkModel{legal: make([][][]byte, chunks)}
		for c := range m.legal {
			m.legal[c] = [][]byte{make([]byte, ChunkSize)}
		}
		v, err := Open(ctx, dev, "every", uuid, kek, quietLog(), Options{Anchor: anchor, AnchorEveryFlush: true, MaxLogged: 6, deferCheckpoint: true})
		if err != nil {
			if dev.cut() != nil {
				return m, dev.cut(), imgAnchor, imgKEK, dev.ops
			}
			t.Fatal(err)
		}
		v.epochLimit = 5
		w := rand.New(rand.NewPCG(7, 7)) // the workload is the same every run
		step := func(i int) {
			switch i % 7 {
			case 0, 1, 3:
				off := w.Int64N(int64(size) - 1)
				n := 1 + w.Int64N(min(3*ChunkSize, int64(size)-off))
				p := make([]byte, n)
				for j := range p {
					p[j] = byte(w.Uint32())
				}
				if _, err := v.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
				m.write(off, p, false)
			case 2:
				off := w.Int64N(int64(size) - 1)
				n := 1 + w.Int64N(min(4*ChunkSize, int64(size)-off))
				if err := v.Zero(off, n, true, false); err != nil {
					t.Fatal(err)
				}
				m.write(off, make([]byte, n), true)
			default:
				if err := v.Flush(); err != nil {
					t.Fatal(err)
				}
				if dev.cut() == nil {
					m.flushed(nil)
				}
			}
		}
		for i := 0; i < 60 && dev.cut() == nil; i++ {
			step(i)
			if i == 30 && dev.cut() == nil {
				if err := v.Rekey(ctx, kek, RekeyOptions{every: 16}); err != nil {
					t.Fatal(err)
				}
				if dev.cut() == nil {
					m.flushed(nil)
				}
			}
		}
		if dev.cut() == nil {
			if err := v.Close(); err != nil {
				t.Fatal(err)
			}
			if dev.cut() == nil {
				m.flushed(nil)
			}
		} else {
			v.stopBackground()
		}
		if dev.cut() == nil {
			return m, dev, anchor, kek, dev.ops
		}
		return m, dev.cut(), imgAnchor, imgKEK, dev.ops
	}

	m0, _, _, _, total := run(0, rand.New(rand.NewPCG(0, 0)))
	_ = m0
	if total < 100 {
		t.Fatalf("the workload made only %d device operations", total)
	}
	points := 0
	for at := 1; at <= total; at++ {
		for way := uint64(0); way < 3; way++ {
			m, img, anchor, kek, _ := run(at, rand.New(rand.NewPCG(uint64(at), way)))
			v, err := Open(ctx, img, "every", uuid, kek, quietLog(), Options{Anchor: anchor})
			if err != nil {
				t.Fatalf("cut at op %d/%d (way %d): reopen: %v", at, total, way, err)
			}
			got := make([]byte, ChunkSize)
			for c := 0; c < chunks; c++ {
				if _, err := v.ReadAt(got, int64(c*ChunkSize)); err != nil {
					t.Fatalf("cut at op %d/%d (way %d): chunk %d: %v", at, total, way, c, err)
				}
				ok := false
				for _, val := range m.legal[c] {
					ok = ok || bytes.Equal(got, val)
				}
				if !ok {
					t.Fatalf("cut at op %d/%d (way %d): chunk %d holds a value it never legally held", at, total, way, c)
				}
			}
			v.stopBackground()
			points++
		}
	}
	t.Logf("%d device operations, %d crash points checked", total, points)
}

// A write to a chunk whose commit is in progress waits for the commit:
// it must not rewrite the home the commit is making durable.
func TestWriteDuringCommit(t *testing.T) {
	v, dev, kek := openTestVolume(t, 16*ChunkSize)
	one, two := bytes.Repeat([]byte{1}, ChunkSize), bytes.Repeat([]byte{2}, ChunkSize)
	if _, err := v.WriteAt(one, 5*ChunkSize); err != nil {
		t.Fatal(err)
	}
	entered, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	dev.flushHook = func() {
		once.Do(func() { close(entered); <-release })
	}
	flushed := make(chan error, 1)
	go func() { flushed <- v.Flush() }()
	<-entered // the commit of chunk 5 (value 1) is in its fdatasync
	wrote := make(chan error, 1)
	go func() { _, err := v.WriteAt(two, 5*ChunkSize); wrote <- err }()
	select {
	case err := <-wrote:
		t.Fatalf("the write finished (%v) while the commit of its chunk was in progress", err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	if err := <-flushed; err != nil {
		t.Fatal(err)
	}
	if err := <-wrote; err != nil {
		t.Fatal(err)
	}
	// Power cut now: value 2 was never flushed, so chunk 5 reads 1 or 2,
	// never an error.
	for way := uint64(0); way < 8; way++ {
		img := dev.crash(rand.New(rand.NewPCG(way, 1)))
		v2, err := Open(context.Background(), img, "t", [16]byte{0xab}, kek, quietLog(), Options{})
		if err != nil {
			t.Fatal(err)
		}
		got := make([]byte, ChunkSize)
		if _, err := v2.ReadAt(got, 5*ChunkSize); err != nil || !(bytes.Equal(got, one) || bytes.Equal(got, two)) {
			t.Fatalf("way %d: chunk 5 after the cut: %v", way, err)
		}
		v2.stopBackground()
	}
	v.stopBackground()
}

var _ = errors.Is
