package cowmap

import (
	"math/rand/v2"
	"slices"
	"testing"
)

// entries agrees with a Go map under random single sets, ranges across
// group edges, overwrites, clears and reuse, and lists its entries in
// chunk order, merged with extra records.
func TestEntriesModel(t *testing.T) {
	for _, tc := range []struct {
		name string
		span uint64 // chunks drawn from [base, base+span)
		base uint64
		maxN int // longest range
	}{
		{"dense, short ranges", 300, 0, 5},
		{"dense, long ranges", 2000, 64*7 + 3, 300},
		{"sparse", 1 << 40, 0, 3},
		{"top of the range", 1000, ^uint64(0) - 1200, 70},
	} {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(7, tc.span))
			s, want := newEntries(0), map[uint64]Entry{}
			var seq uint64
			for step := range 4000 {
				switch op := rng.IntN(100); {
				case op < 2: // clear, then go on with reused groups
					s.Clear()
					clear(want)
				case op < 50:
					first := tc.base + rng.Uint64N(tc.span)
					n := 1 + rng.IntN(tc.maxN)
					if first+uint64(n)-1 < first || first+uint64(n) > tc.base+tc.span {
						n = 1
					}
					es := make([]Entry, n)
					for i := range es {
						seq++
						es[i].SetGen(seq)
						want[first+uint64(i)] = es[i]
					}
					s.SetRange(first, es)
				default:
					c := tc.base + rng.Uint64N(tc.span)
					e, ok := s.Get(c)
					w, wok := want[c]
					if ok != wok || e != w || s.Has(c) != wok {
						t.Fatalf("step %d: Get(%d) = gen %d, %v; want gen %d, %v", step, c, e.Gen(), ok, w.Gen(), wok)
					}
				}
				if s.Len() != len(want) {
					t.Fatalf("step %d: Len %d, want %d", step, s.Len(), len(want))
				}
			}
			// sorted, with extra records replacing some and adding others.
			var extra []record
			for c := range want {
				if rng.IntN(4) == 0 {
					extra = append(extra, record{c, Entry{1}})
				}
			}
			for range 20 {
				extra = append(extra, record{tc.base + rng.Uint64N(tc.span), Entry{2}})
			}
			slices.SortFunc(extra, func(a, b record) int { return cmpU64(a.chunk, b.chunk) })
			extra = slices.CompactFunc(extra, func(a, b record) bool { return a.chunk == b.chunk })
			merged := maps2records(want, extra)
			got, _ := s.sorted(extra, nil, nil)
			if !slices.Equal(got, merged) {
				t.Fatalf("sorted: %d records, want %d (or other order)", len(got), len(merged))
			}
			// Keys already in the buffer are the caller's: kept, not read.
			got, ks := s.sorted(extra, []uint64{^uint64(0)}, nil)
			if !slices.Equal(got, merged) || ks[0] != ^uint64(0) {
				t.Fatalf("sorted after a used key buffer: %d records, keys[0] %#x", len(got), ks[0])
			}
		})
	}
}

// maps2records is the reference for sorted: want's entries, extra's
// in place of them, in chunk order.
func maps2records(want map[uint64]Entry, extra []record) []record {
	m := map[uint64]Entry{}
	for c, e := range want {
		m[c] = e
	}
	for _, r := range extra {
		m[r.chunk] = r.e
	}
	var out []record
	for _, c := range slices.Sorted(func(yield func(uint64) bool) {
		for c := range m {
			if !yield(c) {
				return
			}
		}
	}) {
		out = append(out, record{c, m[c]})
	}
	return out
}

// A nil set reads as empty, as a nil map does.
func TestEntriesNil(t *testing.T) {
	var s *entries
	if _, ok := s.Get(5); ok || s.Has(5) || s.Len() != 0 {
		t.Fatal("a nil set is not empty")
	}
	if got, _ := s.sorted([]record{{3, Entry{}}}, nil, nil); len(got) != 1 {
		t.Fatalf("sorted of a nil set with one extra: %d records", len(got))
	}
}
