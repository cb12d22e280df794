package cowmap

import (
	"math/bits"
	"slices"
)

// entries maps chunk numbers to entries: the dirty, committing and logged
// sets of a Map. Chunks are kept in groups of 64 neighbours, each a bitmap
// of the chunks it holds and their entries in chunk order, so that setting
// a sequential write's 256 entries costs four hash lookups, not 256, and a
// commit sorts groups rather than chunks (a lookup, Get, is still one per
// chunk). Heap per entry, 65,536 entries measured with runtime.MemStats:
// 65 bytes in one run, 132 at random chunks, 160 in a map[uint64]Entry.
//
// A nil *entries is empty for reading (Len, Get); Set needs a made one.
// Callers serialize access (Map.mu).
type entries struct {
	groups map[uint64]*group // by chunk / groupSize
	n      int
	free   []*group // emptied by Clear, for reuse (at most keepGroups)
}

const (
	groupShift = 6
	groupSize  = 1 << groupShift
	keepGroups = 64 // a cleared small set keeps this many groups' memory
)

type group struct {
	bits uint64  // bit i: chunk (key << groupShift) + i is present
	e    []Entry // the present chunks' entries, in chunk order
}

// newEntries makes a set sized for about hint entries: hint/8 groups, a
// guess between random writes (one entry a group) and runs (64).
func newEntries(hint int) *entries {
	return &entries{groups: make(map[uint64]*group, hint/8)}
}

// Len is the number of entries.
func (s *entries) Len() int {
	if s == nil {
		return 0
	}
	return s.n
}

// Get returns chunk c's entry.
func (s *entries) Get(c uint64) (Entry, bool) {
	if s == nil {
		return Entry{}, false
	}
	g := s.groups[c>>groupShift]
	if g == nil {
		return Entry{}, false
	}
	bit := uint64(1) << (c & (groupSize - 1))
	if g.bits&bit == 0 {
		return Entry{}, false
	}
	return g.e[bits.OnesCount64(g.bits&(bit-1))], true
}

// Has reports whether chunk c has an entry.
func (s *entries) Has(c uint64) bool {
	if s == nil {
		return false
	}
	g := s.groups[c>>groupShift]
	return g != nil && g.bits&(1<<(c&(groupSize-1))) != 0
}

// Set sets chunk c's entry.
func (s *entries) Set(c uint64, e Entry) {
	s.SetRange(c, []Entry{e})
}

// SetRange sets the entries of chunks first..first+len(es)-1.
func (s *entries) SetRange(first uint64, es []Entry) {
	for len(es) > 0 {
		key, lo := first>>groupShift, first&(groupSize-1)
		k := min(uint64(len(es)), groupSize-lo) // chunks in this group
		g := s.groups[key]
		if g == nil {
			g = s.newGroup(int(k))
			s.groups[key] = g
		}
		mask := (^uint64(0) >> (groupSize - k)) << lo
		switch {
		case g.bits&mask == mask: // all present: overwrite
			copy(g.e[bits.OnesCount64(g.bits&(1<<lo-1)):], es[:k])
		case g.bits>>lo == 0: // nothing at or above lo: append
			g.e = append(g.e, es[:k]...)
			g.bits |= mask
			s.n += int(k)
		default:
			for i := uint64(0); i < k; i++ {
				bit := uint64(1) << (lo + i)
				at := bits.OnesCount64(g.bits & (bit - 1))
				if g.bits&bit != 0 {
					g.e[at] = es[i]
					continue
				}
				g.e = slices.Insert(g.e, at, es[i])
				g.bits |= bit
				s.n++
			}
		}
		first += k
		es = es[k:]
	}
}

// newGroup returns an empty group with room for at least k entries.
func (s *entries) newGroup(k int) *group {
	if n := len(s.free); n > 0 {
		g := s.free[n-1]
		s.free = s.free[:n-1]
		return g
	}
	if k > 1 {
		k = groupSize // a range: the rest of the group likely follows
	}
	return &group{e: make([]Entry, 0, k)}
}

// Clear empties the set, keeping a few groups' memory for reuse.
func (s *entries) Clear() {
	for k, g := range s.groups {
		if len(s.free) < keepGroups {
			g.bits, g.e = 0, g.e[:0]
			s.free = append(s.free, g)
		}
		delete(s.groups, k)
	}
	s.n = 0
}

// sorted appends s's entries to out as records in chunk order, with those
// of extra (sorted, one per chunk) in place of s's for the same chunk, and
// returns it with keys, the group keys it sorted (appended to keys).
func (s *entries) sorted(extra []record, keys []uint64, out []record) ([]record, []uint64) {
	start := len(keys)
	if s != nil {
		for k := range s.groups {
			keys = append(keys, k)
		}
	}
	sortChunks(keys[start:])
	out = slices.Grow(out, s.Len()+len(extra))
	for _, k := range keys[start:] {
		g := s.groups[k]
		b, i := g.bits, 0
		for b != 0 {
			c := k<<groupShift + uint64(bits.TrailingZeros64(b))
			for len(extra) > 0 && extra[0].chunk < c {
				out = append(out, extra[0])
				extra = extra[1:]
			}
			if len(extra) == 0 || extra[0].chunk != c { // else extra's, appended next, is newer
				out = append(out, record{c, g.e[i]})
			}
			i++
			b &= b - 1
		}
	}
	return append(out, extra...), keys
}

// within yields the entries of chunks in [from, to), in no order.
func (s *entries) within(from, to uint64) func(yield func(uint64, Entry) bool) {
	return func(yield func(uint64, Entry) bool) {
		if s == nil || from >= to {
			return
		}
		lo, hi := from>>groupShift, (to-1)>>groupShift
		for k, g := range s.groups {
			if k < lo || k > hi {
				continue
			}
			b, i := g.bits, 0
			for b != 0 {
				c := k<<groupShift + uint64(bits.TrailingZeros64(b))
				if c >= from && c < to && !yield(c, g.e[i]) {
					return
				}
				i++
				b &= b - 1
			}
		}
	}
}
