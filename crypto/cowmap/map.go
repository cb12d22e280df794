package cowmap

import (
	"errors"
	"fmt"
	"math/bits"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"goldilocks/internal/block"
)

// Errors callers branch on.
var (
	// ErrMapAuth: a map node failed its hash against the reference that
	// names it, or a logged entry is malformed. The message names the node.
	ErrMapAuth = errors.New("map node failed authentication")
	// ErrFailed: a flush failed, so what the store holds is unknown; the
	// map refuses every later write and commit (FORMAT.md: "A failed
	// fdatasync fails the volume").
	ErrFailed = errors.New("a flush failed earlier; detach and attach the volume again")
	// ErrNotCached: TryLookupRange needs a map node that is not in
	// memory (it reads nothing).
	ErrNotCached = errors.New("map node not in memory")
)

// State is what the volume header keeps of the map: the checkpoint.
type State struct {
	Seq      uint64 // last commit in the tree
	Root     Ref
	LogStart uint64 // ring position of the first log block after it
}

// Config is how a Map reaches its store and its caller.
type Config struct {
	Dev    block.Device
	Geo    Geometry
	UUID   [16]byte
	LogKey []byte // MACs the log; the caller keeps it secret
	Cache  *Cache // shared; nil: a small private one
	// Verify, if set, reports at recovery whether a mapped entry's data is
	// on the store (its tag opens); the last commit in the log is dropped
	// when one of its entries does not (FORMAT.md, "Recovery").
	Verify func(c uint64, e *Entry) bool
	// WriteHeader makes a checkpoint durable: both header copies.
	WriteHeader func(State) error
	// MaxLogged is how many logged entries trigger a checkpoint (0: 16384).
	MaxLogged int
	// ParallelIO sends a checkpoint's node writes to Dev all at once (a
	// store with network latency: RBD, an upstream NBD server), instead
	// of one after another.
	ParallelIO bool
	// LogData lets small writes go into the log while the client flushes
	// often (FORMAT.md, "Small writes into the log"). The caller sets the
	// header's log-data flag before it turns this on.
	LogData bool
	// DeferCheckpoint runs the tree part of a checkpoint that a FLUSH
	// starts inside the next commit, after that commit is durable, instead
	// of beside it: one fixed interleaving of the two, for tests that cut
	// the power at every operation of a fixed workload.
	DeferCheckpoint bool
	// Written, if set, reports whether chunk c's block at home is already
	// written on the store; a small write then goes there, not into the
	// log: a write into a written block allocates nothing, and the
	// checkpoint would only have to move it.
	Written func(c, home uint64) bool
	// BeforeCommit, if set, runs in every commit that has entries, after
	// they are taken (writers stopped and released again) and before any
	// of them is written: what must be durable before them is made so
	// there (a snapshot's copies, crypto/SNAPSHOTS.md). It runs with this
	// map's commitMu held, so it must not commit this map. An error fails
	// the commit and the map, as a failed flush does.
	BeforeCommit func() error
}

// Small writes into the log (FORMAT.md): a commit of at most smallCommit
// entries turns it on for the next one; a write of at most smallWrite
// chunks goes there.
const (
	smallCommit = 8
	smallWrite  = 4
)

// Map is a volume's chunk map. Callers hold a lock per chunk around Home,
// Set and the write between them; Lookup needs the chunk's lock (read or
// write) for a stable answer.
type Map struct {
	cfg   Config
	owner uint64
	top   int

	commitMu sync.Mutex // one commit or checkpoint at a time
	logBuf   []byte     // one log block; guarded by commitMu
	// A small commit's sort buffers and its emptied map, kept for the
	// next one (a FLUSH after each write allocates nothing); guarded by
	// commitMu, spare by mu.
	keyBuf []uint64
	recBuf []record
	spare  *entries
	macer  *logMACer // MACs the log blocks a commit writes; guarded by commitMu
	// nodeWrites are a checkpoint's node writes (ParallelIO); guarded by
	// commitMu.
	nodeWrites []nodeWrite
	// fresh are the interior nodes a checkpoint wrote and the homes of its
	// leaves, cached when its header is durable: until then Homes walks the
	// old tree, and a new version cached in place of an old one would make
	// each walk a miss that reads and hashes the old node again. The new
	// leaves themselves go into the cache at once: they are many (a local
	// store's are written already, and holding them would add up to the
	// whole cache to a checkpoint's memory), and Homes needs only their
	// homes. Used by the checkpoint that runs, as nodeWrites.
	fresh []freshNode
	// riding: the checkpoint running beside commits lets their flushes
	// carry its writes, burst counts them (FORMAT.md, "Checkpoints beside
	// commits"); owned by the checkpoint.
	riding bool
	burst  int

	mu     sync.Mutex // guards the fields below
	cond   sync.Cond  // a commit or a checkpoint ended
	dirty  *entries   // nil until the first write after a large commit
	snap   *entries   // being committed; nil between commits
	logged *entries   // committed since the checkpoint (or since a running one began); nil until the first commit after one began
	// The sizes the next dirty and logged maps are made with: the last
	// ones' (large ones only), so that they do not grow entry by entry.
	// They are made at first use, so an idle volume keeps none.
	dirtyHint, loggedHint int
	ndirty                atomic.Int64 // len(dirty), for Dirty
	// ckpt holds the entries a checkpoint running in the background
	// writes into the tree, until its header is durable; bgDone is
	// closed when it ends. Both nil when none runs.
	ckpt     *entries
	bgDone   chan struct{}
	deferred func() // DeferCheckpoint: the running checkpoint's tree part
	moving   bool   // the running checkpoint still copies data in the log home
	failed   error
	seq      uint64 // last durable commit
	prev     [32]byte

	// Log positions, as counters whose remainder modulo the log length is
	// the ring position (FORMAT.md, "Log block"): base is the header's log
	// start; used ends the last durable commit; tail is the next free
	// position; slot, once reserved (slotSet), is the next commit's first
	// log block, and pend positions after it hold data of that commit.
	base, used, tail, slot uint64
	slotSet                bool
	pend                   uint32
	small                  bool // the last commit was small: small writes go into the log
	dropped                bool // recovery dropped a last commit whose data was missing

	replayed int    // commits recovery replayed
	maxEpoch uint32 // largest seal epoch among them

	treeMu sync.RWMutex // guards state against tree walks
	state  State

	homes homeBits // where the tree's entries live, per leaf
}

// Open recovers the map of a store whose header holds st: it replays the
// log from st.LogStart while its blocks verify and chain.
func Open(cfg Config, st State) (*Map, error) {
	if cfg.Cache == nil {
		cfg.Cache = NewCache(1 << 20)
	}
	if cfg.MaxLogged == 0 {
		cfg.MaxLogged = 65536
	}
	m := &Map{cfg: cfg, owner: cfg.Cache.owner(), top: cfg.Geo.Levels - 1,
		dirty: newEntries(0), logged: newEntries(0), state: st, seq: st.Seq}
	m.cond.L = &m.mu
	m.macer = newLogMACer(cfg.LogKey)
	m.homes.m = make(map[uint64]leafHomes)
	if st.Root.Loc > HomeB || st.LogStart >= cfg.Geo.LogBlocks {
		return nil, fmt.Errorf("%w: the header's map root is malformed", ErrMapAuth)
	}
	if err := m.replay(); err != nil {
		return nil, err
	}
	return m, nil
}

type commit struct {
	recs []record
	data [][2]uint64 // ranges of ring offsets [lo, hi) that hold its data
	next uint64      // ring offset after it
	end  [32]byte    // MAC of its last block: the next commit chains to it
}

// holds reports whether ring offset o is one of the commit's data blocks.
func (c *commit) holds(o uint64) bool {
	for _, r := range c.data {
		if o >= r[0] && o < r[1] {
			return true
		}
	}
	return false
}

func (m *Map) replay() error {
	g := &m.cfg.Geo
	start := m.state.LogStart
	prev := Seed(m.cfg.LogKey, m.state.Seq, m.state.Root, start)
	var (
		commits []commit
		cur     commit
		first   = true // the next block is a commit's first
		off     uint64 // ring offset of the next block from start
		b       = make([]byte, BlockSize)
	)
	for off+1 < g.LogBlocks {
		pos := (start + off) % g.LogBlocks
		if _, err := m.cfg.Dev.ReadAt(b, int64(g.logBlock(pos)*BlockSize)); err != nil {
			return fmt.Errorf("reading the map log: %w", err)
		}
		seq := m.seq + uint64(len(commits))
		var alt *[32]byte // a commit's first block may chain to a reseed
		if first && [32]byte(b[32:64]) != prev {
			r := Reseed(m.cfg.LogKey, seq, pos)
			alt = &r
		}
		recs, end, data, mac, ok := openLogBlock(b, m.cfg.LogKey, m.cfg.UUID, seq+1, pos, prev, alt)
		if !ok {
			break
		}
		if off+1+uint64(data) >= g.LogBlocks {
			return fmt.Errorf("%w: log block at %d names data beyond the log", ErrMapAuth, pos)
		}
		for _, r := range recs {
			if r.chunk >= g.Chunks || !r.e.validLogged(g.LogBlocks) {
				return fmt.Errorf("%w: log record for chunk %d is malformed", ErrMapAuth, r.chunk)
			}
		}
		cur.recs = append(cur.recs, recs...)
		if data > 0 {
			cur.data = append(cur.data, [2]uint64{off + 1, off + 1 + uint64(data)})
		}
		prev = mac
		off += 1 + uint64(data)
		first = end
		if end {
			for _, r := range cur.recs {
				if l := r.e.Loc(); IsInLog(l) && !cur.holds((LogPos(l)+g.LogBlocks-start)%g.LogBlocks) {
					return fmt.Errorf("%w: log record for chunk %d names ring position %d, not its commit's data", ErrMapAuth, r.chunk, LogPos(l))
				}
			}
			cur.end, cur.next = mac, off
			commits = append(commits, cur)
			cur = commit{}
		}
	}
	if n := len(commits); n > 0 && m.cfg.Verify != nil {
		last := commits[n-1]
		for _, r := range last.recs {
			if r.e.Mapped() && !m.cfg.Verify(r.chunk, &r.e) {
				commits = commits[:n-1] // never acknowledged: its fdatasync did not return
				m.dropped = true
				break
			}
		}
	}
	m.prev = Reseed(m.cfg.LogKey, m.state.Seq, start)
	m.replayed = len(commits)
	m.base, m.used = start, start
	for _, c := range commits {
		for _, r := range c.recs {
			m.logged.Set(r.chunk, r.e)
			m.maxEpoch = max(m.maxEpoch, r.e.Epoch())
		}
		m.used = start + c.next
		m.seq++
	}
	m.tail = m.used
	if n := len(commits); n > 0 { // the chain goes on from the last commit kept
		m.prev = commits[n-1].end
	}
	return nil
}

// Seq is the last durable commit.
func (m *Map) Seq() uint64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.seq
}

// Replayed is how many commits recovery replayed from the log.
func (m *Map) Replayed() int { return m.replayed }

// MaxLoggedEpoch is the largest seal epoch among the entries recovery
// replayed from the log.
func (m *Map) MaxLoggedEpoch() uint32 { return m.maxEpoch }

// DroppedLastCommit reports whether recovery dropped a last commit whose
// data had not reached the store (a crash inside a flush).
func (m *Map) DroppedLastCommit() bool { return m.dropped }

// Failed is the error that failed the map, or nil.
func (m *Map) Failed() error {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.failed
}

// Lookup returns chunk c's current entry.
func (m *Map) Lookup(c uint64) (Entry, error) {
	m.mu.Lock()
	if e, ok := m.dirty.Get(c); ok {
		m.mu.Unlock()
		return e, nil
	}
	if e, ok := m.snap.Get(c); ok {
		m.mu.Unlock()
		return e, nil
	}
	if e, ok := m.loggedLocked(c); ok {
		m.mu.Unlock()
		return e, nil
	}
	m.mu.Unlock()
	return m.treeLookup(c)
}

// LookupRange is Lookup for chunks first..first+len(out)-1. It allocates
// nothing and reads each leaf once.
func (m *Map) LookupRange(first uint64, out []Entry) error {
	return m.lookupRange(first, out, false)
}

// TryLookupRange is LookupRange from memory alone: ErrNotCached, at once,
// if a map node it needs is not in the cache.
func (m *Map) TryLookupRange(first uint64, out []Entry) error {
	return m.lookupRange(first, out, true)
}

func (m *Map) lookupRange(first uint64, out []Entry, cachedOnly bool) error {
	const inTree = ^uint64(0) // marks entries to take from the tree
	pending := false
	m.mu.Lock()
	for i := range out {
		c := first + uint64(i)
		if e, ok := m.dirty.Get(c); ok {
			out[i] = e
		} else if e, ok := m.snap.Get(c); ok {
			out[i] = e
		} else if e, ok := m.loggedLocked(c); ok {
			out[i] = e
		} else {
			out[i].SetLoc(inTree)
			pending = true
		}
	}
	m.mu.Unlock()
	if !pending {
		return nil
	}
	m.treeMu.RLock()
	defer m.treeMu.RUnlock()
	var (
		leaf    *node
		leafIdx = ^uint64(0)
	)
	for i := range out {
		if out[i].Loc() != inTree {
			continue
		}
		c := first + uint64(i)
		if li := c / LeafFanout; li != leafIdx {
			var err error
			if leaf, err = m.leafLocked(c, cachedOnly); err != nil {
				return err
			}
			leafIdx = li
		}
		if leaf == nil {
			out[i] = Entry{}
		} else {
			out[i] = *leaf.entry(int(c % LeafFanout))
		}
	}
	return nil
}

// leafLocked returns the leaf that holds chunk c, or nil if it was never
// written; with cachedOnly, ErrNotCached rather than read a node.
// Callers hold treeMu.
func (m *Map) leafLocked(c uint64, cachedOnly bool) (*node, error) {
	ref := m.state.Root
	for level := m.top; ; level-- {
		if ref.Absent() {
			return nil, nil
		}
		var n *node
		var err error
		if cachedOnly {
			if n = m.cfg.Cache.peek(cacheKey{m.owner, level, c / span(level)}, ref.Hash); n == nil {
				return nil, ErrNotCached
			}
		} else {
			n, err = m.load(level, c/span(level), ref)
		}
		if err != nil || level == 0 {
			return n, err
		}
		ref = n.ref(int((c / span(level-1)) % InteriorFanout))
	}
}

func (m *Map) treeLookup(c uint64) (Entry, error) {
	m.treeMu.RLock()
	defer m.treeMu.RUnlock()
	leaf, err := m.leafLocked(c, false)
	if leaf == nil || err != nil {
		return Entry{}, err
	}
	return *leaf.entry(int(c % LeafFanout)), nil
}

// load returns node (level, idx) that ref names, verified.
func (m *Map) load(level int, idx uint64, ref Ref) (*node, error) {
	if ref.Loc != HomeA && ref.Loc != HomeB {
		return nil, fmt.Errorf("%w: node %d/%d has location %d", ErrMapAuth, level, idx, ref.Loc)
	}
	k := cacheKey{m.owner, level, idx}
	if n := m.cfg.Cache.get(k, ref.Hash); n != nil {
		return n, nil
	}
	n := new(node)
	if _, err := m.cfg.Dev.ReadAt(n[:], int64(m.cfg.Geo.nodeBlock(level, idx, ref.Loc)*BlockSize)); err != nil {
		return nil, fmt.Errorf("reading map node %d/%d: %w", level, idx, err)
	}
	if n.hash() != ref.Hash {
		return nil, fmt.Errorf("%w: node %d/%d (level/index) does not match its parent's hash", ErrMapAuth, level, idx)
	}
	if err := n.check(level, idx, m.cfg.UUID); err != nil {
		return nil, fmt.Errorf("%w: node %d/%d: %v", ErrMapAuth, level, idx, err)
	}
	if level == 0 {
		for i := 0; i < LeafFanout; i++ {
			if !n.entry(i).valid() {
				return nil, fmt.Errorf("%w: node 0/%d entry %d is malformed", ErrMapAuth, idx, i)
			}
		}
	}
	m.cfg.Cache.put(k, n, ref.Hash)
	return n, nil
}

// Home returns where a write of chunk c goes: the home its durable entry
// does not name (or, in the log, does not move to), or the place it was
// written to since the last commit, or a position in the log (FORMAT.md,
// "Small writes into the log"). It waits while a commit that includes c
// is in progress, and while a checkpoint moves c's data out of the log to
// the home a write would take. The caller holds c's write lock until Set.
func (m *Map) Home(c uint64) (uint64, error) {
	var out [1]uint64
	err := m.Homes(c, out[:])
	return out[0], err
}

// Homes is Home for chunks first..first+len(out)-1, which the caller
// holds write-locked.
func (m *Map) Homes(first uint64, out []uint64) error {
	m.mu.Lock()
	for {
		if m.failed != nil {
			m.mu.Unlock()
			return ErrFailed
		}
		busy := false
		if m.snap.Len() > 0 {
			for i := range out {
				if m.snap.Has(first + uint64(i)) {
					busy = true
					break
				}
			}
		}
		if m.moving && !busy {
			for i := range out {
				if m.movingLocked(first + uint64(i)) {
					busy = true
					break
				}
			}
		}
		if !busy {
			break
		}
		m.cond.Wait()
	}
	const inTree = ^uint64(0)
	pending := false
	var fresh uint8 // bit i: out[i] is not a rewrite of a dirty entry (small writes only)
	for i := range out {
		c := first + uint64(i)
		if d, ok := m.dirty.Get(c); ok && d.Mapped() {
			out[i] = d.Loc()
			continue
		}
		if i < smallWrite {
			fresh |= 1 << i
		}
		if l, ok := m.loggedLocked(c); ok {
			out[i] = Other(l.Loc())
		} else {
			out[i] = inTree
			pending = true
		}
	}
	m.mu.Unlock()
	if err := m.treeHomes(first, out, pending); err != nil {
		return err
	}
	if fresh != 0 && len(out) <= smallWrite && m.cfg.LogData && m.logOpen() {
		if w := m.cfg.Written; w != nil { // a system call each: only when the log could take them
			for i := range out {
				if fresh&(1<<i) != 0 && w(first+uint64(i), out[i]) {
					fresh &^= 1 << i
				}
			}
		}
		m.intoLog(out, fresh)
	}
	return nil
}

// logOpen reports whether small writes may go into the log now: the
// client flushes often and the log has room (intoLog checks again).
func (m *Map) logOpen() bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.small && m.pend < maxLogData && m.tail-m.base+2 <= m.cfg.Geo.LogBlocks/2
}

// intoLog moves the small write's fresh places into the log while the
// client flushes often and the log has room.
func (m *Map) intoLog(out []uint64, fresh uint8) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if !m.small {
		return
	}
	for i := range out {
		if fresh&(1<<i) == 0 {
			continue
		}
		need := uint64(1)
		if !m.slotSet {
			need++
		}
		if m.pend >= maxLogData || m.tail-m.base+need > m.cfg.Geo.LogBlocks/2 {
			return
		}
		if !m.slotSet {
			m.slot, m.slotSet = m.tail, true
			m.tail++
		}
		out[i] = InLog(m.tail%m.cfg.Geo.LogBlocks, out[i])
		m.tail++
		m.pend++
	}
}

// treeHomes fills the places in out that Homes marked for the tree.
func (m *Map) treeHomes(first uint64, out []uint64, pending bool) error {
	const inTree = ^uint64(0)
	if !pending {
		return nil
	}
	m.treeMu.RLock()
	defer m.treeMu.RUnlock()
	var (
		h       leafHomes
		leafIdx = ^uint64(0)
	)
	for i := range out {
		if out[i] != inTree {
			continue
		}
		c := first + uint64(i)
		if li := c / LeafFanout; li != leafIdx {
			var err error
			if h, err = m.leafHomesLocked(li); err != nil {
				return err
			}
			leafIdx = li
		}
		out[i] = Other(h.loc(int(c % LeafFanout)))
	}
	return nil
}

// leafHomes says where a leaf's entries live: bit i of mapped is set if
// entry i is mapped, bit i of b if it is in home B.
type leafHomes struct {
	hash      [32]byte
	mapped, b uint64
}

func (h leafHomes) loc(i int) uint64 {
	switch {
	case h.mapped&(1<<i) == 0:
		return Unmapped
	case h.b&(1<<i) != 0:
		return HomeB
	}
	return HomeA
}

func homesOf(n *node, hash [32]byte) leafHomes {
	h := leafHomes{hash: hash}
	for i := 0; i < LeafFanout; i++ {
		switch n.entry(i).Loc() {
		case HomeA:
			h.mapped |= 1 << i
		case HomeB:
			h.mapped |= 1 << i
			h.b |= 1 << i
		}
	}
	return h
}

// homeBits caches leafHomes by leaf, each valid for the leaf content its
// hash names: a write needs to know only which home is durable, and 16
// bytes a leaf keep that for far more leaves than the node cache holds.
type homeBits struct {
	mu sync.Mutex
	m  map[uint64]leafHomes
}

const maxHomeLeaves = 1 << 16

// leafHomesLocked returns where the entries of leaf li live in the tree.
// Callers hold treeMu.
func (m *Map) leafHomesLocked(li uint64) (leafHomes, error) {
	ref := m.state.Root
	c := li * LeafFanout
	for level := m.top; level > 0; level-- {
		if ref.Absent() {
			return leafHomes{}, nil
		}
		n, err := m.load(level, c/span(level), ref)
		if err != nil {
			return leafHomes{}, err
		}
		ref = n.ref(int((c / span(level-1)) % InteriorFanout))
	}
	if ref.Absent() {
		return leafHomes{}, nil
	}
	m.homes.mu.Lock()
	h, ok := m.homes.m[li]
	m.homes.mu.Unlock()
	if ok && h.hash == ref.Hash {
		return h, nil
	}
	n, err := m.load(0, li, ref)
	if err != nil {
		return leafHomes{}, err
	}
	h = homesOf(n, ref.Hash)
	m.homes.put(li, h)
	return h, nil
}

func (b *homeBits) put(li uint64, h leafHomes) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if len(b.m) >= maxHomeLeaves {
		n := 0
		for k := range b.m { // drop an eighth, at random
			delete(b.m, k)
			if n++; n >= maxHomeLeaves/8 {
				break
			}
		}
	}
	b.m[li] = h
}

// SetRange is Set for chunks first..first+len(es)-1.
func (m *Map) SetRange(first uint64, es []Entry) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.makeDirtyLocked()
	m.dirty.SetRange(first, es)
	m.ndirty.Store(int64(m.dirty.Len()))
	return m.dirty.Len()
}

// Set records chunk c's new entry (written, not yet committed) and
// returns how many entries wait for a commit.
func (m *Map) Set(c uint64, e Entry) int {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.makeDirtyLocked()
	m.dirty.Set(c, e)
	m.ndirty.Store(int64(m.dirty.Len()))
	return m.dirty.Len()
}

// makeDirtyLocked makes the dirty map if a commit left none. Callers
// hold mu.
func (m *Map) makeDirtyLocked() {
	if m.dirty == nil {
		m.dirty = newEntries(m.dirtyHint)
	}
}

// Dirty is how many entries wait for a commit (without taking mu: every
// writer asks).
func (m *Map) Dirty() int { return int(m.ndirty.Load()) }

// Commit makes every entry Set so far durable with the data written
// before it: one log commit and one Flush of the store, or a checkpoint
// when the log has no room. quiesce must stop every writer between its
// write and its Set until the returned func is called (the caller's chunk
// locks), so that the commit never names a home being rewritten.
func (m *Map) Commit(quiesce func() func()) error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	release := quiesce()
	m.mu.Lock()
	if m.failed != nil {
		m.mu.Unlock()
		release()
		return ErrFailed
	}
	if m.dirty.Len() == 0 {
		m.mu.Unlock()
		release()
		return m.fail(m.cfg.Dev.Flush())
	}
	m.snap, m.dirty = m.dirty, m.spare
	m.spare = nil
	m.ndirty.Store(int64(m.dirty.Len()))
	m.dirtyHint = 0
	if m.snap.Len() > smallKeep {
		m.dirtyHint = min(m.snap.Len(), maxHint)
	}
	seq := m.seq + 1
	// The commit's first log block is its slot, followed by the data
	// written into the log since; its further blocks come after them.
	if !m.slotSet {
		m.slot = m.tail
		m.tail++
	}
	blocks := (uint64(m.snap.Len()) + LogPerBlock - 1) / LogPerBlock
	slot, data := m.slot, m.pend
	m.tail += blocks - 1
	end := m.tail
	room := end-m.base <= m.cfg.Geo.LogBlocks-1
	bgDone := m.bgDone
	m.slotSet, m.pend = false, 0
	m.small = m.snap.Len() <= smallCommit
	m.mu.Unlock()
	release()
	if m.cfg.BeforeCommit != nil {
		if err := m.cfg.BeforeCommit(); err != nil {
			return m.fail(err)
		}
	}

	recs, keys := m.snap.sorted(nil, m.keyBuf[:0], m.recBuf[:0])
	if len(recs) <= smallKeep { // a large commit's buffers are not kept
		m.keyBuf, m.recBuf = keys, recs
	}
	for i := range recs {
		recs[i].e.SetGen(seq)
	}
	var (
		err  error
		last [32]byte
	)
	if !room {
		if bgDone != nil { // the running checkpoint frees the log first
			m.waitCheckpoint()
			if m.Failed() != nil {
				return ErrFailed
			}
		}
		err = m.checkpointLocked(seq, recs)
		if err == nil {
			m.mu.Lock()
			m.endSnap()
			m.cond.Broadcast()
			m.mu.Unlock()
		}
		return m.fail(err)
	}
	last, err = m.writeLog(recs, seq, slot, data)
	if err == nil {
		err = m.cfg.Dev.Flush()
	}
	if err != nil {
		return m.fail(err)
	}
	m.mu.Lock()
	if m.logged == nil {
		m.logged = newEntries(max(m.loggedHint, len(recs)))
	}
	for _, r := range recs {
		m.logged.Set(r.chunk, r.e)
	}
	m.endSnap()
	m.seq = seq
	m.used = end
	m.prev = last
	full := m.bgDone == nil && (m.logged.Len() >= m.cfg.MaxLogged || m.used-m.base > m.cfg.Geo.LogBlocks/2)
	deferred := m.deferred != nil
	m.cond.Broadcast()
	m.mu.Unlock()
	if deferred { // DeferCheckpoint: its tree now, after this commit
		m.waitCheckpoint()
		if m.Failed() != nil {
			return ErrFailed
		}
		return nil
	}
	if full {
		return m.fail(m.startCheckpoint())
	}
	return nil
}

// movingLocked reports whether a write of chunk c must wait for the
// running checkpoint's moves: its data in the log moves to a home that a
// later commit made the one to write next (FORMAT.md, "Checkpoints beside
// commits"). Callers hold mu.
func (m *Map) movingLocked(c uint64) bool {
	e, ok := m.ckpt.Get(c)
	if !ok || !IsInLog(e.Loc()) {
		return false
	}
	return m.logged.Has(c)
}

// loggedLocked returns chunk c's entry in the log: committed since the
// checkpoint, or in the one running. Callers hold mu.
func (m *Map) loggedLocked(c uint64) (Entry, bool) {
	if e, ok := m.logged.Get(c); ok {
		return e, true
	}
	return m.ckpt.Get(c)
}

// startCheckpoint starts a checkpoint of every commit so far that runs
// beside later commits (FORMAT.md, "Checkpoints beside commits"). Callers
// hold commitMu; no checkpoint runs.
func (m *Map) startCheckpoint() error {
	m.mu.Lock()
	recs, _ := m.logged.sorted(nil, nil, nil)
	seq := m.seq
	head := m.reserveStart()
	m.ckpt, m.logged = m.logged, nil
	m.loggedHint = 0
	if m.ckpt.Len() > smallKeep {
		m.loggedHint = min(m.ckpt.Len(), maxHint)
	}
	done := make(chan struct{})
	m.bgDone = done
	m.moving = true
	m.prev = Reseed(m.cfg.LogKey, seq, head%m.cfg.Geo.LogBlocks)
	m.mu.Unlock()
	tree := func() {
		_, f := m.cfg.Dev.(*Flusher)
		m.riding, m.burst = f && !m.cfg.ParallelIO && !m.cfg.DeferCheckpoint, 0
		err := m.moveHome(recs)
		m.mu.Lock()
		m.moving = false
		m.cond.Broadcast()
		m.mu.Unlock()
		if err == nil {
			err = m.writeTree(recs, seq, head, true)
		}
		m.riding = false
		if err != nil {
			m.fail(err)
		}
		m.mu.Lock()
		m.bgDone = nil
		close(done)
		m.cond.Broadcast()
		m.mu.Unlock()
	}
	if m.cfg.DeferCheckpoint {
		m.mu.Lock()
		m.deferred = tree
		m.mu.Unlock()
	} else {
		go tree()
	}
	return nil
}

// A checkpoint beside commits writes its moves and nodes in bursts of
// rideBurst, each taken to the disk by the next commit's flush; when no
// commit flushes within rideWait, it writes the rest at once and flushes
// itself.
const (
	rideBurst = 64
	rideWait  = 20 * time.Millisecond
)

// paced is called after each write of a checkpoint: while it rides on
// the commits' flushes, every rideBurst writes wait for one.
func (m *Map) paced() error {
	if !m.riding {
		return nil
	}
	if m.burst++; m.burst < rideBurst {
		return nil
	}
	m.burst = 0
	f := m.cfg.Dev.(*Flusher)
	ok, err := f.Flushed(f.Mark(), rideWait)
	if err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	m.riding = ok
	return nil
}

// flushTree makes a checkpoint's writes durable: a commit's flush that
// began after them, or its own.
func (m *Map) flushTree() error {
	if m.riding {
		f := m.cfg.Dev.(*Flusher)
		ok, err := f.Flushed(f.Mark(), rideWait)
		if err != nil {
			return fmt.Errorf("checkpoint: %w", err)
		}
		if ok {
			return nil
		}
	}
	if err := m.cfg.Dev.Flush(); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	return nil
}

// reserveStart reserves the next commit's first log block, unless a write
// into the log did, and returns it: a checkpoint's log start. Callers
// hold mu.
func (m *Map) reserveStart() uint64 {
	if !m.slotSet {
		m.slot, m.slotSet = m.tail, true
		m.tail++
	}
	return m.slot
}

// waitCheckpoint waits for a checkpoint running in the background (or
// runs a deferred one).
func (m *Map) waitCheckpoint() {
	m.mu.Lock()
	done, tree := m.bgDone, m.deferred
	m.deferred = nil
	m.mu.Unlock()
	if tree != nil {
		tree()
	}
	if done != nil {
		<-done
	}
}

// smallKeep: a commit of at most this many entries leaves its buffers and
// its emptied map for the next one; a larger one's go to the collector.
const smallKeep = 64

// maxHint caps the size hint a dirty or logged set is made with (its
// group table then has 16,384 slots).
const maxHint = 1 << 17

// endSnap ends a commit's snapshot, keeping a small one's map emptied for
// the next commit. Callers hold mu.
func (m *Map) endSnap() {
	if m.snap.Len() <= smallKeep && m.spare == nil {
		m.snap.Clear()
		m.spare = m.snap
	}
	m.snap = nil
}

// Fail fails the map (a flush of the store failed elsewhere, such as in
// a header write): it refuses writes and commits from then on.
func (m *Map) Fail(err error) { m.fail(err) }

// fail records a failed flush: the map refuses writes from then on.
func (m *Map) fail(err error) error {
	if err == nil {
		return nil
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.failed == nil {
		m.failed = err
	}
	m.cond.Broadcast()
	return fmt.Errorf("%w: %v", ErrFailed, err)
}

func cmpU64(a, b uint64) int {
	switch {
	case a < b:
		return -1
	case a > b:
		return 1
	}
	return 0
}

// writeLog writes recs as one commit: its first block at ring offset
// slot, followed there by data blocks of chunk data, its other blocks
// after those.
func (m *Map) writeLog(recs []record, seq, slot uint64, data uint32) ([32]byte, error) {
	g := &m.cfg.Geo
	blocks := (uint64(len(recs)) + LogPerBlock - 1) / LogPerBlock
	// One block is kept (a FLUSH after each write needs no more); a larger
	// commit takes a buffer of up to logBufBlocks for its duration.
	buf := m.logBuf
	if buf == nil {
		m.logBuf = make([]byte, BlockSize)
		buf = m.logBuf
	}
	if blocks > 1 {
		buf = make([]byte, min(blocks, logBufBlocks)*BlockSize)
	}
	m.mu.Lock()
	prev := m.prev
	m.mu.Unlock()
	// Block i sits at counter slot (i = 0) or slot+data+i; written in
	// pieces of neighbouring blocks, at most logBufBlocks, never across
	// the ring's end.
	at := func(i uint64) uint64 {
		if i == 0 {
			return slot % g.LogBlocks
		}
		return (slot + uint64(data) + i) % g.LogBlocks
	}
	for i := uint64(0); i < blocks; {
		pos := at(i)
		n := uint64(1)
		for i+n < blocks && n < uint64(len(buf)/BlockSize) && at(i+n) == pos+n {
			n++
		}
		for j := uint64(0); j < n; j++ {
			lo := int(i+j) * LogPerBlock
			hi := min(lo+LogPerBlock, len(recs))
			d := uint32(0)
			if i+j == 0 {
				d = data
			}
			fillLogBlock(buf[j*BlockSize:][:BlockSize], recs[lo:hi], i+j == blocks-1, seq, pos+j, d, prev)
			prev = m.macer.seal(buf[j*BlockSize:][:BlockSize], m.cfg.UUID)
		}
		if _, err := m.cfg.Dev.WriteAt(buf[:n*BlockSize], int64(g.logBlock(pos)*BlockSize)); err != nil {
			return prev, fmt.Errorf("writing the map log: %w", err)
		}
		i += n
	}
	return prev, nil
}

// logBufBlocks is the size of a map's log write buffer (256 KiB).
const logBufBlocks = 64

// Checkpoint writes every logged entry into the tree and the new root to
// the header, emptying the log.
func (m *Map) Checkpoint() error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.waitCheckpoint()
	m.mu.Lock()
	failed, empty := m.failed, m.logged.Len() == 0 && m.used == m.base
	m.mu.Unlock()
	if failed != nil {
		return ErrFailed
	}
	if empty {
		return nil
	}
	return m.fail(m.checkpointLocked(0, nil))
}

// checkpointLocked writes the logged entries, and extra (commit seq,
// not yet durable: its data is synced here before the header names it),
// into the tree. Callers hold commitMu; no checkpoint runs in the
// background.
func (m *Map) checkpointLocked(seq uint64, extra []record) error {
	m.mu.Lock()
	recs, _ := m.logged.sorted(extra, nil, nil)
	newSeq := m.seq
	if extra != nil {
		newSeq = seq
	}
	// The log starts again at the next commit's first block: its slot,
	// reserved now if no write into the log has yet.
	head := m.reserveStart()
	m.mu.Unlock()
	// Data in the log moves to its home first (FORMAT.md, "Checkpoint").
	if err := m.moveHome(recs); err != nil {
		return err
	}
	if err := m.writeTree(recs, newSeq, head, false); err != nil {
		return err
	}
	m.mu.Lock()
	m.seq = newSeq
	m.prev = Reseed(m.cfg.LogKey, newSeq, head%m.cfg.Geo.LogBlocks)
	m.mu.Unlock()
	return nil
}

// writeTree writes recs (sorted: the entries up to commit seq, their data
// home) into the tree, flushes the store, writes the header naming the new
// root with the log starting at counter head, and then serves from it: bg
// says the entries were held in ckpt (a checkpoint in the background),
// else in logged. Callers own the checkpoint.
func (m *Map) writeTree(recs []record, seq, head uint64, bg bool) error {
	m.treeMu.RLock()
	old := m.state
	m.treeMu.RUnlock()
	root := old.Root
	m.fresh = m.fresh[:0]
	defer func() {
		clear(m.fresh) // drop the node references, on success or failure
		m.fresh = m.fresh[:0]
	}()
	if len(recs) > 0 {
		var err error
		m.nodeWrites = m.nodeWrites[:0]
		if root, err = m.update(m.top, 0, old.Root, recs, seq); err == nil {
			err = m.writeNodes()
		}
		if err != nil {
			return err
		}
	}
	if err := m.flushTree(); err != nil {
		return err
	}
	st := State{Seq: seq, Root: root, LogStart: head % m.cfg.Geo.LogBlocks}
	if err := m.cfg.WriteHeader(st); err != nil {
		return fmt.Errorf("checkpoint: %w", err)
	}
	m.mu.Lock()
	m.treeMu.Lock()
	m.state = st
	m.treeMu.Unlock()
	if bg {
		m.ckpt = nil
	} else {
		m.logged = newEntries(0)
	}
	m.base = head
	m.used = max(m.used, head)
	m.mu.Unlock()
	for _, f := range m.fresh { // in place of the old versions, now unreachable
		if f.level == 0 {
			m.homes.put(f.idx, f.homes)
		} else {
			m.cfg.Cache.put(cacheKey{m.owner, f.level, f.idx}, f.n, f.hash)
		}
	}
	return nil
}

// moveHome copies the data of recs that is in the log to its home and
// points their entries there. Callers own the checkpoint.
func (m *Map) moveHome(recs []record) error {
	var b []byte
	for i := range recs {
		l := recs[i].e.Loc()
		if !IsInLog(l) {
			continue
		}
		if b == nil {
			b = make([]byte, BlockSize)
		}
		c, home := recs[i].chunk, HomeOf(l)
		if _, err := m.cfg.Dev.ReadAt(b, int64(m.cfg.Geo.DataBlock(c, l)*BlockSize)); err != nil {
			return fmt.Errorf("checkpoint: reading chunk %d from the log: %w", c, err)
		}
		if _, err := m.cfg.Dev.WriteAt(b, int64(m.cfg.Geo.DataBlock(c, home)*BlockSize)); err != nil {
			return fmt.Errorf("checkpoint: moving chunk %d home: %w", c, err)
		}
		recs[i].e.SetLoc(home)
		if err := m.paced(); err != nil {
			return err
		}
	}
	return nil
}

// sortChunks sorts distinct chunk numbers. Dense ones (what sequential
// writes leave: a span at most 64 times their count) go through a bitmap
// in linear time; others are compared.
func sortChunks(keys []uint64) {
	if len(keys) < 256 {
		slices.Sort(keys)
		return
	}
	lo, hi := keys[0], keys[0]
	for _, k := range keys {
		lo, hi = min(lo, k), max(hi, k)
	}
	words := (hi-lo)/64 + 1
	if words > uint64(len(keys)) {
		slices.Sort(keys)
		return
	}
	set := make([]uint64, words)
	for _, k := range keys {
		set[(k-lo)/64] |= 1 << ((k - lo) % 64)
	}
	i := 0
	for w, b := range set {
		for b != 0 {
			keys[i] = lo + uint64(w)*64 + uint64(bits.TrailingZeros64(b))
			i++
			b &= b - 1
		}
	}
}

// update writes node (level, idx), now at ref, with recs (sorted, all
// under it) applied, to its other home and returns its new reference.
func (m *Map) update(level int, idx uint64, ref Ref, recs []record, seq uint64) (Ref, error) {
	var n *node
	if ref.Absent() {
		n = newNode(level, idx, seq, m.cfg.UUID)
	} else {
		old, err := m.load(level, idx, ref)
		if err != nil {
			return Ref{}, err
		}
		n = new(node)
		*n = *old
		n.setSeq(seq)
	}
	if level == 0 {
		for _, r := range recs {
			*n.entry(int(r.chunk % LeafFanout)) = r.e
		}
	} else {
		s := span(level - 1)
		for len(recs) > 0 {
			child := recs[0].chunk / s
			j := 1
			for j < len(recs) && recs[j].chunk/s == child {
				j++
			}
			i := int(child % InteriorFanout)
			nr, err := m.update(level-1, child, n.ref(i), recs[:j], seq)
			if err != nil {
				return Ref{}, err
			}
			n.setRef(i, nr)
			recs = recs[j:]
		}
	}
	loc := Other(ref.Loc)
	off := int64(m.cfg.Geo.nodeBlock(level, idx, loc) * BlockSize)
	if m.cfg.ParallelIO { // written by writeNodes, before the checkpoint's flush
		m.nodeWrites = append(m.nodeWrites, nodeWrite{n, off, level, idx})
	} else if _, err := m.cfg.Dev.WriteAt(n[:], off); err != nil {
		return Ref{}, fmt.Errorf("writing map node %d/%d: %w", level, idx, err)
	} else if err := m.paced(); err != nil {
		return Ref{}, err
	}
	h := n.hash()
	f := freshNode{level: level, idx: idx}
	if level == 0 {
		m.cfg.Cache.put(cacheKey{m.owner, level, idx}, n, h) // in place of the old version
		f.homes = homesOf(n, h)
	} else {
		f.n, f.hash = n, h
	}
	m.fresh = append(m.fresh, f) // cached by writeTree
	return Ref{Loc: loc, Hash: h, MaxGen: n.maxGen()}, nil
}

// Close waits for a checkpoint running in the background and forgets
// the map's cached nodes.
func (m *Map) Close() {
	m.waitCheckpoint()
	m.cfg.Cache.drop(m.owner)
}

// SwitchKey checkpoints the map (so that no log block MACed by the old
// key is needed again), has write record the checkpoint with the new key
// (the caller's header switch), and MACs the log with key from then on.
func (m *Map) SwitchKey(key []byte, write func(State) error) error {
	m.commitMu.Lock()
	defer m.commitMu.Unlock()
	m.waitCheckpoint()
	m.mu.Lock()
	failed, empty := m.failed, m.logged.Len() == 0 && m.used == m.base
	m.mu.Unlock()
	if failed != nil {
		return ErrFailed
	}
	if !empty {
		if err := m.checkpointLocked(0, nil); err != nil {
			return m.fail(err)
		}
	}
	m.treeMu.RLock()
	st := m.state
	m.treeMu.RUnlock()
	if err := write(st); err != nil {
		return m.fail(err)
	}
	m.mu.Lock()
	m.cfg.LogKey = key
	m.macer = newLogMACer(key) // commitMu is held
	m.prev = Reseed(key, st.Seq, st.LogStart)
	m.mu.Unlock()
	return nil
}

// nodeWrite is a checkpoint's write of a node, when they go out at once.
type nodeWrite struct {
	n     *node
	off   int64
	level int
	idx   uint64
}

// freshNode is an interior node a checkpoint wrote, with its hash, or the
// homes of a leaf it wrote (which hold the leaf's hash).
type freshNode struct {
	level int
	idx   uint64
	n     *node // level > 0
	hash  [32]byte
	homes leafHomes // level 0
}

// writeNodes writes the nodes update collected (ParallelIO), at most
// parallelNodeWrites at a time. Callers hold commitMu.
func (m *Map) writeNodes() error {
	ws := m.nodeWrites
	if len(ws) == 0 {
		return nil
	}
	var (
		wg    sync.WaitGroup
		mu    sync.Mutex
		first error
		next  = make(chan int)
	)
	for range min(parallelNodeWrites, len(ws)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				w := ws[i]
				if _, err := m.cfg.Dev.WriteAt(w.n[:], w.off); err != nil {
					mu.Lock()
					if first == nil {
						first = fmt.Errorf("writing map node %d/%d: %w", w.level, w.idx, err)
					}
					mu.Unlock()
				}
			}
		}()
	}
	for i := range ws {
		next <- i
	}
	close(next)
	wg.Wait()
	clear(m.nodeWrites) // drop the node references
	return first
}

// parallelNodeWrites bounds a checkpoint's node writes in flight.
const parallelNodeWrites = 32
