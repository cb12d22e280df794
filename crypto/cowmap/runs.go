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
	return m.runs(dst, from, to, maxRuns,
		func(e *Entry, _ bool) bool { return e.Mapped() },
		m.treeRun)
}

// Changed appends to dst at most maxRuns runs over chunks [from, to) in
// which Mapped reports whether the chunk **changed after commit since**:
// its committed entry's generation is newer (a write, TRIM or zeroing in
// a later commit), or a change is staged and not committed yet. Subtrees
// whose references' maximum generation is at most since are skipped
// without reading them (FORMAT.md, "Room for what comes next").
func (m *Map) Changed(dst []Run, from, to, since uint64, maxRuns int) ([]Run, error) {
	return m.runs(dst, from, to, maxRuns,
		func(e *Entry, staged bool) bool { return staged || e.Gen() > since },
		func(c, limit uint64) (uint64, bool, error) { return m.treeChanged(c, limit, since) })
}

// runs is Runs and Changed: prop gives a chunk's state from an entry of
// the in-memory sets (staged: a set not yet committed, whose generation
// is not stamped), tree a run of it from the tree.
func (m *Map) runs(dst []Run, from, to uint64, maxRuns int, prop func(e *Entry, staged bool) bool, tree func(c, limit uint64) (uint64, bool, error)) ([]Run, error) {
	type ov struct {
		c  uint64
		on bool
	}
	var over []ov
	m.mu.Lock()
	seen := make(map[uint64]bool)
	for i, mp := range []*entries{m.dirty, m.snap, m.logged, m.ckpt} { // newest first
		for c, e := range mp.within(from, to) {
			if !seen[c] {
				seen[c] = true
				over = append(over, ov{c, prop(&e, i < 2)})
			}
		}
	}
	m.mu.Unlock()
	slices.SortFunc(over, func(a, b ov) int { return cmpU64(a.c, b.c) })

	add := func(n uint64, on bool) {
		if k := len(dst); k > 0 && dst[k-1].Mapped == on {
			dst[k-1].Chunks += n
			return
		}
		dst = append(dst, Run{n, on})
	}
	c := from
	for c < to && len(dst) <= maxRuns { // at maxRuns only the last run may grow
		if len(over) > 0 && over[0].c == c {
			if len(dst) == maxRuns && dst[maxRuns-1].Mapped != over[0].on {
				break
			}
			add(1, over[0].on)
			over = over[1:]
			c++
			continue
		}
		limit := to
		if len(over) > 0 {
			limit = over[0].c
		}
		n, on, err := tree(c, limit)
		if err != nil {
			return dst, err
		}
		if len(dst) == maxRuns && dst[maxRuns-1].Mapped != on {
			break
		}
		add(n, on)
		c += n
	}
	return dst, nil
}

// treeRun returns how many chunks from c (below limit) share c's state in
// the tree.
func (m *Map) treeRun(c, limit uint64) (uint64, bool, error) {
	return m.treeWalk(c, limit, func(Ref) bool { return false }, (*Entry).Mapped)
}

// treeChanged returns how many chunks from c (below limit) share c's
// "changed after since" in the tree: a subtree whose maximum generation is
// at most since is unchanged as a whole, and is not read.
func (m *Map) treeChanged(c, limit, since uint64) (uint64, bool, error) {
	return m.treeWalk(c, limit, func(r Ref) bool { return r.MaxGen <= since },
		func(e *Entry) bool { return e.Gen() > since })
}

// treeWalk returns how many chunks from c (below limit) share prop's
// value in the tree. An absent subtree, and one that unchanged reports,
// is false as a whole and is not read.
func (m *Map) treeWalk(c, limit uint64, unchanged func(Ref) bool, prop func(*Entry) bool) (uint64, bool, error) {
	m.treeMu.RLock()
	defer m.treeMu.RUnlock()
	ref := m.state.Root
	for level := m.top; ; level-- {
		idx := c / span(level)
		if ref.Absent() || unchanged(ref) {
			end := min(limit, (idx+1)*span(level))
			return end - c, false, nil
		}
		n, err := m.load(level, idx, ref)
		if err != nil {
			return 0, false, err
		}
		if level == 0 {
			i := int(c % LeafFanout)
			on := prop(n.entry(i))
			k := uint64(1)
			for i+int(k) < LeafFanout && c+k < limit && prop(n.entry(i+int(k))) == on {
				k++
			}
			return k, on, nil
		}
		ref = n.ref(int((c / span(level-1)) % InteriorFanout))
	}
}
