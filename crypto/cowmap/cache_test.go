package cowmap

import "testing"

// cacheRun touches keys in order, as load does (get, then put on a miss),
// and returns the hits among the touches that count (the i-th, key k).
func cacheRun(c *Cache, keys []cacheKey, counts func(i int, k cacheKey) bool) (hits, n int) {
	var h [32]byte
	for i, k := range keys {
		hit := c.get(k, h) != nil
		if !hit {
			c.put(k, &node{}, h)
		}
		if counts(i, k) {
			n++
			if hit {
				hits++
			}
		}
	}
	return hits, n
}

// A loop over a few more nodes than the cache holds (repeated sequential
// reads of a volume slightly larger than --map-cache covers) must keep
// most of the loop: strict LRU misses every node on every pass.
func TestCacheLoopSlightlyLarger(t *testing.T) {
	for _, tc := range []struct {
		over    float64 // loop length / capacity
		minHits float64 // of the passes after the first
	}{
		{1.02, 0.85},
		{1.1, 0.6},
		{1.5, 0.1},
	} {
		c := NewCache(16 * 64 * BlockSize)
		capacity := c.Capacity()
		n := int(float64(capacity) * tc.over)
		var keys []cacheKey
		for range 5 {
			for i := range n {
				keys = append(keys, cacheKey{owner: 1, index: uint64(i)})
			}
		}
		hits, total := cacheRun(c, keys, func(i int, _ cacheKey) bool { return i >= n })
		ratio := float64(hits) / float64(total)
		t.Logf("loop of %d nodes through %d: %.2f hit", n, capacity, ratio)
		if ratio < tc.minHits {
			t.Errorf("loop of %.2f× the capacity: %.2f of lookups hit after the first pass, want ≥ %.2f", tc.over, ratio, tc.minHits)
		}
		if nodes, _, _ := c.Stats(); nodes > capacity {
			t.Errorf("%d nodes cached, capacity %d", nodes, capacity)
		}
	}
}

// Nodes in use (a volume's inner nodes, a VM's working set) survive a
// scan of many times the cache through another map.
func TestCacheHotNodesSurviveScan(t *testing.T) {
	c := NewCache(16 * 64 * BlockSize)
	hot := make([]cacheKey, 32)
	for i := range hot {
		hot[i] = cacheKey{owner: 1, level: 1, index: uint64(i)}
	}
	var keys []cacheKey
	keys = append(keys, hot...)
	for i := range 4 * c.Capacity() {
		keys = append(keys, cacheKey{owner: 2, index: uint64(i)})
		keys = append(keys, hot[i%len(hot)])
	}
	hits, n := cacheRun(c, keys, func(i int, k cacheKey) bool { return i >= len(hot) && k.owner == 1 })
	if r := float64(hits) / float64(n); r < 0.98 {
		t.Errorf("hot nodes hit %.3f of the time during a scan of 4× the cache, want ≥ 0.98", r)
	}
}

// drop forgets one map's nodes and keeps the others' findable.
func TestCacheDrop(t *testing.T) {
	c := NewCache(16 * 16 * BlockSize)
	var h [32]byte
	for i := range 100 {
		c.put(cacheKey{owner: uint64(1 + i%2), index: uint64(i)}, &node{}, h)
	}
	c.drop(1)
	nodes, _, _ := c.Stats()
	if nodes != 50 {
		t.Fatalf("%d nodes after dropping owner 1 of 100 nodes, want 50", nodes)
	}
	for i := range 100 {
		got := c.peek(cacheKey{owner: uint64(1 + i%2), index: uint64(i)}, h) != nil
		if want := i%2 == 1; got != want {
			t.Errorf("node %d (owner %d) cached: %v, want %v", i, 1+i%2, got, want)
		}
	}
	// A stale version (another hash) is a miss.
	if c.peek(cacheKey{owner: 2, index: 1}, [32]byte{1}) != nil {
		t.Error("a node cached under one hash was returned for another")
	}
}
