package crypto

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"
)

func openTestVolume(t *testing.T, size uint64) (*Volume, *crashDev, KEKProvider) {
	t.Helper()
	kek := NewLocalKEK(t.TempDir(), nil)
	dev := newCrashDev(int64(LayoutFor(size).End))
	id := [16]byte{0xab}
	if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	v, err := Open(context.Background(), dev, "t", id, kek, quietLog())
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

// At the nonce budget writes are refused with a clear error, reads go on.
func TestNonceBudget(t *testing.T) {
	v, _, _ := openTestVolume(t, 16*ChunkSize)
	if _, err := v.WriteAt(make([]byte, ChunkSize), 0); err != nil {
		t.Fatal(err)
	}
	v.seals.Store(nonceLimit)
	if _, err := v.WriteAt(make([]byte, ChunkSize), 0); !errors.Is(err, ErrNonceBudget) {
		t.Fatalf("write past the budget: %v", err)
	}
	if _, err := v.ReadAt(make([]byte, ChunkSize), 0); err != nil {
		t.Fatalf("read at the budget: %v", err)
	}
}

// The nonce count is reserved in the header before use, so reopening
// never counts fewer seals than were made.
func TestNonceReservationSurvivesReopen(t *testing.T) {
	v, dev, kek := openTestVolume(t, 16*ChunkSize)
	for i := 0; i < 10; i++ {
		v.WriteAt(make([]byte, ChunkSize), int64(i%4)*ChunkSize)
	}
	used := v.Seals()
	after := dev.crash(rand.New(rand.NewPCG(1, 2))) // nothing flushed but the header
	v2, err := Open(context.Background(), after, "t", [16]byte{0xab}, kek, quietLog())
	if err != nil {
		t.Fatal(err)
	}
	if v2.Seals() < used {
		t.Fatalf("reopened volume counts %d seals, %d were made", v2.Seals(), used)
	}
	if _, err := Open(context.Background(), after, "t", [16]byte{0xab}, NewLocalKEK(t.TempDir(), nil), quietLog()); err == nil {
		t.Fatal("opened with another keystore")
	}
	if _, err := Open(context.Background(), after, "t", [16]byte{0xcd}, kek, quietLog()); !errors.Is(err, ErrWrongVolume) {
		t.Fatalf("opened as another volume: %v", err)
	}
}

func BenchmarkVolume4K(b *testing.B) {
	kek := NewLocalKEK(b.TempDir(), nil)
	const size = 64 << 20
	dev := newCrashDev(int64(LayoutFor(size).End))
	id := [16]byte{1}
	Format(context.Background(), dev, id, size, AES256GCM, kek, "default")
	dev.Flush()
	v, err := Open(context.Background(), dev, "b", id, kek, quietLog())
	if err != nil {
		b.Fatal(err)
	}
	p := make([]byte, ChunkSize)
	for i := 0; i < 1024; i++ { // map a few chunks
		v.WriteAt(p, int64(i)*ChunkSize)
	}
	v.Flush()
	dev.Flush()
	b.Run("read", func(b *testing.B) {
		b.SetBytes(ChunkSize)
		b.ReportAllocs()
		for i := 0; i < b.N; i++ {
			if _, err := v.ReadAt(p, int64(i%1024)*ChunkSize); err != nil {
				b.Fatal(err)
			}
		}
	})
}
