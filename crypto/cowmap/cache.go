package cowmap

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// Cache holds verified map nodes of any number of maps, least recently
// used first out, within a byte budget. It is safe for concurrent use:
// keys are spread over shards, each with its own lock and LRU list.
type Cache struct {
	shards [cacheShards]cacheShard
	next   atomic.Uint64 // owner ids

	hits, misses atomic.Uint64
}

const cacheShards = 16

type cacheShard struct {
	mu    sync.Mutex
	max   int // nodes
	lru   *list.List
	items map[cacheKey]*list.Element
	_     [40]byte // keep shards on separate cache lines
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
		c.shards[i] = cacheShard{max: per, lru: list.New(), items: make(map[cacheKey]*list.Element)}
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
	el, ok := s.items[k]
	if !ok || el.Value.(*cacheItem).hash != h {
		s.mu.Unlock()
		return nil
	}
	s.lru.MoveToFront(el)
	n := el.Value.(*cacheItem).n
	s.mu.Unlock()
	c.hits.Add(1)
	return n
}

// put caches n (never modified afterwards) under k.
func (c *Cache) put(k cacheKey, n *node, h [32]byte) {
	s := &c.shards[k.shard()]
	s.mu.Lock()
	defer s.mu.Unlock()
	if el, ok := s.items[k]; ok {
		it := el.Value.(*cacheItem)
		it.n, it.hash = n, h
		s.lru.MoveToFront(el)
		return
	}
	s.items[k] = s.lru.PushFront(&cacheItem{key: k, n: n, hash: h})
	for s.lru.Len() > s.max {
		el := s.lru.Back()
		s.lru.Remove(el)
		delete(s.items, el.Value.(*cacheItem).key)
	}
}

// drop forgets every node of owner (a map that closes).
func (c *Cache) drop(owner uint64) {
	for i := range c.shards {
		s := &c.shards[i]
		s.mu.Lock()
		for k, el := range s.items {
			if k.owner == owner {
				s.lru.Remove(el)
				delete(s.items, k)
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
		nodes += s.lru.Len()
		s.mu.Unlock()
	}
	return nodes, c.hits.Load(), c.misses.Load()
}
