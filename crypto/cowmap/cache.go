package cowmap

import (
	"sync"
	"sync/atomic"
)

// Cache holds verified map nodes of any number of maps within a byte
// budget. It is safe for concurrent use: keys are spread over shards, each
// with its own lock.
//
// Eviction is sampled LRU: of evictSamples nodes picked at random, the
// one used longest ago goes (as in Redis). Strict LRU misses every node of
// a loop over a few more nodes than it holds (repeated sequential reads of
// a volume a little larger than the cache covers: each node is evicted
// just before its turn comes again); sampling keeps most of such a loop
// (TestCacheLoopSlightlyLarger), and nodes in steady use still survive a
// long scan (TestCacheHotNodesSurviveScan).
type Cache struct {
	shards [cacheShards]cacheShard
	next   atomic.Uint64 // owner ids

	hits, misses atomic.Uint64
}

const (
	cacheShards  = 16
	evictSamples = 3
)

type cacheShard struct {
	mu    sync.Mutex
	max   int // nodes
	clock uint64
	rnd   uint64 // xorshift state
	items map[cacheKey]*cacheItem
	all   []*cacheItem // in no order; item.pos is its index
	_     [64]byte     // 128 bytes a shard: apart from its neighbours' lines
}

// cacheKey names a node of a map, not a version of it: a node written by
// a checkpoint takes its old version's place (keyed by home, both
// versions would stay, and a random write load would keep half a cache of
// dead nodes). The hash that get is given picks the version.
type cacheKey struct {
	owner uint64
	level int
	index uint64
}

func (k cacheKey) shard() int {
	h := k.owner*0x9e3779b97f4a7c15 ^ k.index*0xbf58476d1ce4e5b9 ^ uint64(k.level)<<7
	return int(h>>32) % cacheShards
}

type cacheItem struct {
	key  cacheKey
	n    *node
	hash [32]byte
	used uint64 // the shard's clock at the last get or put
	pos  int    // index in the shard's all
}

// DefaultCacheBytes is the default node cache of a gateway: 32 MiB, the
// leaves of about 2 GiB of volume (1.6 % of a volume is leaves); a random
// read that misses it reads and hashes a 4 KiB node (bench/README.md).
const DefaultCacheBytes = 32 << 20

// NewCache returns a cache of at most bytes bytes of nodes (at least 16
// nodes per shard).
func NewCache(bytes int) *Cache {
	c := &Cache{}
	per := max(16, bytes/BlockSize/cacheShards)
	for i := range c.shards {
		c.shards[i] = cacheShard{max: per, rnd: uint64(i)*0x9e3779b97f4a7c15 + 1, items: make(map[cacheKey]*cacheItem)}
	}
	return c
}

func (c *Cache) owner() uint64 { return c.next.Add(1) }

// get returns the node cached under k if its hash is h; nil is a miss,
// after which the caller reads the node.
func (c *Cache) get(k cacheKey, h [32]byte) *node {
	n := c.peek(k, h)
	if n == nil {
		c.misses.Add(1)
	}
	return n
}

// peek is get for a lookup that gives up rather than read the node
// (ErrNotCached): its miss is counted when the node is read.
func (c *Cache) peek(k cacheKey, h [32]byte) *node {
	s := &c.shards[k.shard()]
	s.mu.Lock()
	it, ok := s.items[k]
	if !ok || it.hash != h {
		s.mu.Unlock()
		return nil
	}
	s.clock++
	it.used = s.clock
	n := it.n
	s.mu.Unlock()
	c.hits.Add(1)
	return n
}

// put caches n (never modified afterwards) under k.
func (c *Cache) put(k cacheKey, n *node, h [32]byte) {
	s := &c.shards[k.shard()]
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clock++
	if it, ok := s.items[k]; ok {
		it.n, it.hash, it.used = n, h, s.clock
		return
	}
	for len(s.all) >= s.max {
		s.remove(s.victim())
	}
	it := &cacheItem{key: k, n: n, hash: h, used: s.clock, pos: len(s.all)}
	s.items[k] = it
	s.all = append(s.all, it)
}

// victim is the node used longest ago of evictSamples picked at random.
func (s *cacheShard) victim() *cacheItem {
	var v *cacheItem
	for range evictSamples {
		s.rnd ^= s.rnd << 13
		s.rnd ^= s.rnd >> 7
		s.rnd ^= s.rnd << 17
		it := s.all[s.rnd%uint64(len(s.all))]
		if v == nil || it.used < v.used {
			v = it
		}
	}
	return v
}

func (s *cacheShard) remove(it *cacheItem) {
	last := s.all[len(s.all)-1]
	s.all[it.pos] = last
	last.pos = it.pos
	s.all[len(s.all)-1] = nil
	s.all = s.all[:len(s.all)-1]
	delete(s.items, it.key)
}

// drop forgets every node of owner (a map that closes).
func (c *Cache) drop(owner uint64) {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		for k, it := range s.items {
			if k.owner == owner {
				s.remove(it)
			}
		}
		s.mu.Unlock()
	}
}

// Capacity is how many nodes the cache holds at most.
func (c *Cache) Capacity() int {
	n := 0
	for i := range c.shards {
		n += c.shards[i].max // fixed at NewCache
	}
	return n
}

// Stats reports cached nodes, hits and misses.
func (c *Cache) Stats() (nodes int, hits, misses uint64) {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		nodes += len(s.all)
		s.mu.Unlock()
	}
	return nodes, c.hits.Load(), c.misses.Load()
}
