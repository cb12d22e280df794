package cowmap

import (
	"container/list"
	"sync"
	"sync/atomic"
)

// Cache holds verified map nodes of any number of maps, least recently
// used first out, within a byte budget. It is safe for concurrent use.
type Cache struct {
	mu    sync.Mutex
	max   int // nodes
	lru   *list.List
	items map[cacheKey]*list.Element
	next  atomic.Uint64 // owner ids

	hits, misses atomic.Uint64
}

type cacheKey struct {
	owner uint64
	level int
	index uint64
	loc   uint64
}

type cacheItem struct {
	key  cacheKey
	n    *node
	hash [32]byte
}

// DefaultCacheBytes is the default node cache of a gateway: 32 MiB.
const DefaultCacheBytes = 32 << 20

// NewCache returns a cache of at most bytes bytes of nodes (at least 16
// nodes).
func NewCache(bytes int) *Cache {
	return &Cache{max: max(16, bytes/BlockSize), lru: list.New(), items: make(map[cacheKey]*list.Element)}
}

func (c *Cache) owner() uint64 { return c.next.Add(1) }

// get returns the node cached under k if its hash is h.
func (c *Cache) get(k cacheKey, h [32]byte) *node {
	c.mu.Lock()
	defer c.mu.Unlock()
	el, ok := c.items[k]
	if !ok || el.Value.(*cacheItem).hash != h {
		c.misses.Add(1)
		return nil
	}
	c.lru.MoveToFront(el)
	c.hits.Add(1)
	return el.Value.(*cacheItem).n
}

// put caches n (never modified afterwards) under k.
func (c *Cache) put(k cacheKey, n *node, h [32]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if el, ok := c.items[k]; ok {
		it := el.Value.(*cacheItem)
		it.n, it.hash = n, h
		c.lru.MoveToFront(el)
		return
	}
	c.items[k] = c.lru.PushFront(&cacheItem{key: k, n: n, hash: h})
	for c.lru.Len() > c.max {
		el := c.lru.Back()
		c.lru.Remove(el)
		delete(c.items, el.Value.(*cacheItem).key)
	}
}

// drop forgets every node of owner (a map that closes).
func (c *Cache) drop(owner uint64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for k, el := range c.items {
		if k.owner == owner {
			c.lru.Remove(el)
			delete(c.items, k)
		}
	}
}

// Stats reports cached nodes, hits and misses.
func (c *Cache) Stats() (nodes int, hits, misses uint64) {
	c.mu.Lock()
	n := c.lru.Len()
	c.mu.Unlock()
	return n, c.hits.Load(), c.misses.Load()
}
