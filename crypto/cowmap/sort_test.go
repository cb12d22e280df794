package cowmap

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// sortChunks agrees with slices.Sort on dense key sets (the bitmap) and
// sparse ones (comparison), at the edges of both.
func TestSortChunks(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	distinct := func(n int, span uint64, base uint64) []uint64 {
		seen := make(map[uint64]bool)
		var ks []uint64
		for len(ks) < n {
			k := base + rng.Uint64N(span)
			if !seen[k] {
				seen[k] = true
				ks = append(ks, k)
			}
		}
		return ks
	}
	for _, tc := range []struct {
		name       string
		n          int
		span, base uint64
	}{
		{"few", 10, 100, 0},
		{"just below the bitmap", 255, 300, 7},
		{"dense run", 4096, 4096, 1 << 20},
		{"dense with gaps", 1000, 5000, 3},
		{"span exactly 64 per key", 256, 256 * 64, 0},
		{"sparse", 1000, 1 << 40, 0},
		{"top of the range", 500, 600, ^uint64(0) - 700},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ks := distinct(tc.n, tc.span, tc.base)
			want := slices.Sorted(slices.Values(ks))
			sortChunks(ks)
			if !slices.Equal(ks, want) {
				t.Fatalf("sortChunks differs from slices.Sort (first %v, want %v)", ks[:min(8, len(ks))], want[:min(8, len(want))])
			}
		})
	}
}
