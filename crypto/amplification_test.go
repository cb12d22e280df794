package crypto

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"
)

// TestWriteAmplification measures bytes written to the store per byte the
// client wrote, checkpoints and the clean detach included, for the
// workloads FORMAT.md names, and holds each to the bound it states.
func TestWriteAmplification(t *testing.T) {
	const size = 256 << 20
	for _, tc := range []struct {
		name  string
		bound [2]float64            // on a sparse local file; on a store with latency
		run   func(v *Volume) int64 // returns bytes the client wrote
	}{
		{"sequential 1 MiB writes, one flush", [2]float64{1.05, 1.05}, func(v *Volume) int64 {
			p := make([]byte, 1<<20)
			for off := int64(0); off < 64<<20; off += 1 << 20 {
				v.WriteAt(p, off)
			}
			v.Flush()
			return 64 << 20
		}},
		{"sequential 4 KiB writes, flush after each", [2]float64{3.1, 2.1}, func(v *Volume) int64 {
			p := make([]byte, ChunkSize)
			for i := int64(0); i < 4096; i++ {
				v.WriteAt(p, i*ChunkSize)
				v.Flush()
			}
			return 4096 * ChunkSize
		}},
		{"random 4 KiB writes, flush after each", [2]float64{3.75, 2.5}, func(v *Volume) int64 {
			rng := rand.New(rand.NewPCG(1, 1))
			p := make([]byte, ChunkSize)
			for i := 0; i < 4096; i++ {
				v.WriteAt(p, rng.Int64N(size/ChunkSize)*ChunkSize)
				v.Flush()
			}
			return 4096 * ChunkSize
		}},
		{"random 4 KiB writes within 16 MiB, flush after each", [2]float64{2.6, 2.1}, func(v *Volume) int64 {
			rng := rand.New(rand.NewPCG(1, 1))
			p := make([]byte, ChunkSize)
			for i := 0; i < 16384; i++ {
				v.WriteAt(p, rng.Int64N(4096)*ChunkSize)
				v.Flush()
			}
			return 16384 * ChunkSize
		}},
		{"random 4 KiB writes, flush every 1000", [2]float64{1.1, 1.1}, func(v *Volume) int64 {
			rng := rand.New(rand.NewPCG(1, 1))
			p := make([]byte, ChunkSize)
			for i := 0; i < 16384; i++ {
				v.WriteAt(p, rng.Int64N(size/ChunkSize)*ChunkSize)
				if i%1000 == 999 {
					v.Flush()
				}
			}
			return 16384 * ChunkSize
		}},
	} {
		for _, fast := range []bool{true, false} {
			name := tc.name + ", store with latency"
			if fast {
				name = tc.name + ", sparse local file"
			}
			t.Run(name, func(t *testing.T) {
				kek := NewLocalKEK(t.TempDir(), nil)
				dev := &countDev{size: int64(LayoutFor(size).End), fast: fast}
				id := [16]byte{0xaa}
				if err := Format(context.Background(), dev, id, size, AES256GCM, kek, "default"); err != nil {
					t.Fatal(err)
				}
				v, err := Open(context.Background(), dev, "wa", id, kek, quietLog(), Options{})
				if err != nil {
					t.Fatal(err)
				}
				before := dev.written
				client := tc.run(v)
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
				wa := float64(dev.written-before) / float64(client)
				t.Logf("write amplification %.3f (%d bytes to the store for %d written, %d flushes of the store)", wa, dev.written-before, client, dev.flushes)
				bound := tc.bound[1]
				if fast {
					bound = tc.bound[0]
				}
				if wa > bound {
					t.Fatalf("write amplification %.3f above FORMAT.md's %.2f", wa, bound)
				}
			})
		}
	}
}

func BenchmarkAnchorAdvance(b *testing.B) {
	a := NewFileAnchor(b.TempDir())
	for i := 0; i < b.N; i++ {
		if err := a.Advance([16]byte{1}, AnchorState{Seq: uint64(i + 1)}); err != nil {
			b.Fatal(err)
		}
	}
}

var _ = fmt.Sprint
