package cowmap

import "slices"

// Run is a range of chunks that are all mapped or all unmapped.
type Run struct {
	Chunks uint64
	Mapped bool
}

// Runs appends to dst at most maxRuns runs describing chunks [from, to),
// skipping subtrees that were never written without reading them.
func (m *Map) Runs(dst []Run, from, to uint64, maxRuns int) ([]Run, error) {
	type ov struct {
		c      uint64
		mapped bool
	}
	var over []ov
	m.mu.Lock()
	seen := make(map[uint64]bool)
	for _, mp := range []*entries{m.dirty, m.snap, m.logged, m.ckpt} { // newest first
		for c, e := range mp.within(from, to) {
			if !seen[c] {
				seen[c] = true
				over = append(over, ov{c, e.Mapped()})
			}
		}
	}
	m.mu.Unlock()
	slices.SortFunc(over, func(a, b ov) int { return cmpU64(a.c, b.c) })

	add := func(n uint64, mapped bool) {
		if k := len(dst); k > 0 && dst[k-1].Mapped == mapped {
			dst[k-1].Chunks += n
			return
		}
		dst = append(dst, Run{n, mapped})
	}
	c := from
	for c < to && len(dst) <= maxRuns { // at maxRuns only the last run may grow
		if len(over) > 0 && over[0].c == c {
			if len(dst) == maxRuns && dst[maxRuns-1].Mapped != over[0].mapped {
				break
			}
			add(1, over[0].mapped)
			over = over[1:]
			c++
			continue
		}
		limit := to
		if len(over) > 0 {
			limit = over[0].c
		}
		n, mapped, err := m.treeRun(c, limit)
		if err != nil {
			return dst, err
		}
		if len(dst) == maxRuns && dst[maxRuns-1].Mapped != mapped {
			break
		}
		add(n, mapped)
		c += n
	}
	return dst, nil
}

// treeRun returns how many chunks from c (below limit) share c's state in
// the tree.
func (m *Map) treeRun(c, limit uint64) (uint64, bool, error) {
	m.treeMu.RLock()
	defer m.treeMu.RUnlock()
	ref := m.state.Root
	for level := m.top; ; level-- {
		idx := c / span(level)
		if ref.Absent() {
			end := min(limit, (idx+1)*span(level))
			return end - c, false, nil
		}
		n, err := m.load(level, idx, ref)
		if err != nil {
			return 0, false, err
		}
		if level == 0 {
			i := int(c % LeafFanout)
			mapped := n.entry(i).Mapped()
			k := uint64(1)
			for i+int(k) < LeafFanout && c+k < limit && n.entry(i+int(k)).Mapped() == mapped {
				k++
			}
			return k, mapped, nil
		}
		ref = n.ref(int((c / span(level-1)) % InteriorFanout))
	}
}
