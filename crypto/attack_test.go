package crypto

import (
	"bytes"
	"context"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"log/slog"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"goldilocks/crypto/cowmap"
)

// The attacker suite (FORMAT.md, "Threat model"): the adversary is the
// storage tier. It writes any byte of the backing store, keeps copies of
// it ("snapshots"), knows the format, and lacks the KEK and the data dir
// (keystore, rollback anchor). Every attack must end in an error (EIO for
// the reads it touches, or the attach refused) and an integrity_failure
// event; never is old or foreign data served as good. The one exception
// is the documented window: after a crash, commits newer than the anchor
// (at most a second of them) can be rolled back undetected; the cases in
// the "window" world assert exactly that, so that the suite tells the
// truth. A few edits are no attack on what is served (a header copy older
// than the other, an older header whose newer log still chains to the
// latest state): those cases assert that the latest data is served and
// that no alarm is raised.
//
// Every case starts from one of three worlds, built once by the same
// script (two attach sessions, six flushes, see atkBuildWorld):
//
//   - tree: the honest gateway detached cleanly (Close): the whole state is
//     in the tree, the log is empty, the anchor is the exact state.
//   - log: the gateway died after its last FLUSH (no clean detach): the
//     state is a checkpointed tree plus two log commits, and the anchor
//     was advanced at every FLUSH (Options.AnchorEveryFlush).
//   - window: as log, but with the default anchor that follows at most a
//     second behind; the process died within that second, so the anchor
//     is at the session's start (the documented window).

const (
	atkChunks    = 300 // 5 leaves and a root
	atkLog       = 8   // small: the ring wraps within the script
	atkMaxLogged = 128
	atkName      = "vol-atk"
)

var atkUUID = [16]byte{0xa7, 0x7a, 0xc4, 15: 0x01}

// atkVal is chunk c's contents written in round r: distinct per chunk and
// round, so that a chunk served from another place or time is told apart.
func atkVal(c, r int) []byte {
	b := make([]byte, ChunkSize)
	for i := 0; i < ChunkSize; i += 8 {
		binary.LittleEndian.PutUint64(b[i:], uint64(c)<<40|uint64(r)<<32|uint64(i))
	}
	return b
}

// atkWorld is a store after an honest gateway's work, with the
// adversary's snapshots of it taken along the way.
type atkWorld struct {
	kind   string
	kek    KEKProvider
	g      cowmap.Geometry
	anchor func(t *testing.T) Anchor // a fresh copy of the anchor as the gateway left it
	final  []byte                    // the store now
	snap   map[string][]byte         // the adversary's backups, by name
	at     map[string][][]byte       // each chunk's flushed contents at each snapshot
	latest [][]byte                  // each chunk's latest flushed contents
	other  []byte                    // another volume's store (same keystore, same layout)
}

// atkBuildWorld runs the honest gateway's script:
//
//	session 1: s1: write 0..299 (round 1), FLUSH (checkpointed: 300 logged ≥ MaxLogged)
//	           s2: write 0..99 (2), FLUSH      log pos 6-7
//	           s3: write 50..79 (3), FLUSH     log pos 0 (the ring wrapped)
//	           s4: write 200..219 (4), FLUSH   log pos 1
//	           c1: Close: checkpoint (seq 4), clean header, anchor 4
//	session 2: s5: write 0..9, 260..269 (5), FLUSH   log pos 2 (seq 5)
//	           s6: write 5..14 (6), FLUSH            log pos 3 (seq 6)
//	tree:      Close (checkpoint seq 6, anchor 6); log and window: the process dies.
func atkBuildWorld(t *testing.T, kek KEKProvider, kind string) *atkWorld {
	t.Helper()
	ctx := context.Background()
	g, err := cowmap.NewGeometry(atkChunks, atkLog)
	if err != nil {
		t.Fatal(err)
	}
	w := &atkWorld{kind: kind, kek: kek, g: g, snap: map[string][]byte{}, at: map[string][][]byte{}}
	dev := newCrashDev(int64(g.End * ChunkSize))
	if err := format(ctx, dev, atkUUID, atkChunks*ChunkSize, AES256GCM, kek, "default", atkLog); err != nil {
		t.Fatal(err)
	}
	var anchor Anchor
	if kind == "tree" { // the real anchor file in a data dir
		dir := t.TempDir()
		anchor = NewFileAnchor(dir)
		w.anchor = func(t *testing.T) Anchor {
			copyDir := t.TempDir()
			src := filepath.Join(dir, AnchorDir, atkUUIDString(atkUUID))
			b, err := os.ReadFile(src)
			if err != nil {
				t.Fatal(err)
			}
			os.MkdirAll(filepath.Join(copyDir, AnchorDir), 0o700)
			if err := os.WriteFile(filepath.Join(copyDir, AnchorDir, atkUUIDString(atkUUID)), b, 0o600); err != nil {
				t.Fatal(err)
			}
			return NewFileAnchor(copyDir)
		}
	} else {
		ma := newMemAnchor()
		anchor = ma
		w.anchor = func(*testing.T) Anchor { return ma.clone() }
	}
	cur := make([][]byte, atkChunks)
	for c := range cur {
		cur[c] = make([]byte, ChunkSize)
	}
	snapshot := func(name string) {
		if len(dev.pending) != 0 {
			t.Fatalf("snapshot %s: %d writes not yet durable", name, len(dev.pending))
		}
		w.snap[name] = bytes.Clone(dev.durable)
		w.at[name] = append([][]byte(nil), cur...)
	}
	open := func() *Volume {
		v, err := Open(ctx, dev, atkName, atkUUID, kek, quietLog(), Options{
			Anchor: anchor, MaxLogged: atkMaxLogged, AnchorEveryFlush: kind == "log",
			deferCheckpoint: true}) // an exact script: no checkpoint beside the commits
		if err != nil {
			t.Fatal(err)
		}
		// No background tick: the idle checkpoint and the anchor's
		// once-a-second advance never run, so the script is exact (the
		// window world is a crash within that second).
		v.stopBackground()
		return v
	}
	write := func(v *Volume, lo, hi, round int) {
		var buf []byte
		for c := lo; c < hi; c++ {
			cur[c] = atkVal(c, round)
			buf = append(buf, cur[c]...)
		}
		if _, err := v.WriteAt(buf, int64(lo)*ChunkSize); err != nil {
			t.Fatal(err)
		}
	}
	flush := func(v *Volume, name string) {
		if err := v.Flush(); err != nil {
			t.Fatal(err)
		}
		snapshot(name)
	}
	v := open()
	write(v, 0, 300, 1)
	flush(v, "s1")
	write(v, 0, 100, 2)
	flush(v, "s2")
	write(v, 50, 80, 3)
	flush(v, "s3")
	write(v, 200, 220, 4)
	flush(v, "s4")
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	snapshot("c1")
	v = open()
	write(v, 0, 10, 5)
	write(v, 260, 270, 5)
	flush(v, "s5")
	write(v, 5, 15, 6)
	flush(v, "s6")
	if kind == "tree" {
		if err := v.Close(); err != nil {
			t.Fatal(err)
		}
	} else {
		abandon(v)
	}
	w.final = bytes.Clone(dev.durable)
	w.latest = cur
	// The script put the state where the cases expect it.
	s := &atkStore{t: t, g: g, img: w.final}
	h := s.header()
	switch kind {
	case "tree":
		if h.Seq != 6 || h.Open || len(s.logChain()) != 0 {
			t.Fatalf("tree world: header seq %d open %v, %d log blocks", h.Seq, h.Open, len(s.logChain()))
		}
	default:
		if h.Seq != 4 || !h.Open || len(s.logChain()) != 2 || h.LogStart != 2 {
			t.Fatalf("%s world: header seq %d open %v log start %d, %d log blocks", kind, h.Seq, h.Open, h.LogStart, len(s.logChain()))
		}
	}
	a, _, _ := w.anchor(t).Load(atkUUID)
	if want := map[string]uint64{"tree": 6, "log": 6, "window": 4}[kind]; a.Seq != want {
		t.Fatalf("%s world: anchor at commit %d, want %d", kind, a.Seq, want)
	}
	return w
}

// abandon is the gateway process dying: the volume is abandoned as it is.
func abandon(v *Volume) {
	v.stopBackground()
	v.m.Close()
	v.keys.free()
}

func atkUUIDString(u [16]byte) string { return uuid.UUID(u).String() }

// atkStore is the adversary's view of a store image: everything the format
// lets it parse and recompute without keys (CRCs, node hashes).
type atkStore struct {
	t   testing.TB
	g   cowmap.Geometry
	img []byte
}

func (s *atkStore) blk(b uint64) []byte { return s.img[b*ChunkSize : (b+1)*ChunkSize] }

func (s *atkStore) header() *Header {
	h, _, err := PickHeader(s.blk(0), s.blk(1))
	if err != nil {
		s.t.Fatalf("adversary: no header: %v", err)
	}
	return h
}

func atkPow84(n int) uint64 {
	p := uint64(1)
	for ; n > 0; n-- {
		p *= cowmap.InteriorFanout
	}
	return p
}

func (s *atkStore) nodeBlock(level int, idx, loc uint64) uint64 {
	return s.g.NodeBase + 2*(s.g.LevelStart[level]+idx) + loc - 1
}

// nodeRef is the reference that names node (level, idx), following the
// tree from the header's root.
func (s *atkStore) nodeRef(level int, idx uint64) cowmap.Ref {
	ref := s.header().Root
	for l := s.g.Levels - 1; l > level; l-- {
		n := s.blk(s.nodeBlock(l, idx/atkPow84(l-level), ref.Loc))
		i := (idx / atkPow84(l-1-level)) % cowmap.InteriorFanout
		ref = cowmap.ParseRef(n[64+i*cowmap.RefSize:])
	}
	return ref
}

// node is the block that holds node (level, idx) now.
func (s *atkStore) node(level int, idx uint64) []byte {
	return s.blk(s.nodeBlock(level, idx, s.nodeRef(level, idx).Loc))
}

func (s *atkStore) root() []byte { return s.node(s.g.Levels-1, 0) }

// leafEntry is chunk c's entry in its leaf (the bytes, to edit).
func (s *atkStore) leafEntry(c uint64) []byte {
	return s.node(0, c/cowmap.LeafFanout)[64+(c%cowmap.LeafFanout)*cowmap.EntrySize:][:cowmap.EntrySize]
}

// fixUp puts node (level, idx)'s SHA-256 in its parent's reference, and so
// on up to the root node; toHeader also puts the root's in both header
// copies and fixes their CRC. The header's MAC it cannot fix.
func (s *atkStore) fixUp(level int, idx uint64, toHeader bool) {
	for l := level; l < s.g.Levels-1; l++ {
		h := sha256.Sum256(s.node(l, idx))
		p := s.node(l+1, idx/cowmap.InteriorFanout)
		ref := p[64+(idx%cowmap.InteriorFanout)*cowmap.RefSize:][:cowmap.RefSize]
		copy(ref[8:40], h[:])
		idx /= cowmap.InteriorFanout
	}
	if toHeader {
		h := sha256.Sum256(s.root())
		for c := uint64(0); c < 2; c++ {
			copy(s.blk(c)[104+8:104+40], h[:])
			atkFixHeaderCRC(s.blk(c))
		}
	}
}

func atkFixHeaderCRC(b []byte) {
	n := int(binary.LittleEndian.Uint16(b[10:]))
	binary.LittleEndian.PutUint32(b[n-headerTrailer:], crc32.Checksum(b[:n-headerTrailer], castagnoli))
}

// advLogBlock is a log block as the adversary parses it (no MAC check).
type advLogBlock struct {
	pos, seq uint64
	commit   bool
	b        []byte
}

func (l advLogBlock) records() map[uint64][]byte {
	out := map[uint64][]byte{}
	for i := 0; i < int(binary.LittleEndian.Uint16(l.b[4:])); i++ {
		r := l.b[64+i*72:]
		out[binary.LittleEndian.Uint64(r)] = r[8:72]
	}
	return out
}

// logChain is the log after the header's checkpoint: blocks at the next
// ring positions with the next sequence, each naming the one before.
func (s *atkStore) logChain() []advLogBlock {
	h := s.header()
	var out []advLogBlock
	pos, seq := h.LogStart, h.Seq+1
	var prev []byte
	for i := uint64(0); i+1 < s.g.LogBlocks; i++ {
		b := s.blk(s.g.LogBase + pos)
		if string(b[:4]) != "GLML" || binary.LittleEndian.Uint64(b[8:]) != seq ||
			binary.LittleEndian.Uint64(b[16:]) != pos || (prev != nil && !bytes.Equal(b[32:64], prev)) {
			break
		}
		out = append(out, advLogBlock{pos: pos, seq: seq, commit: b[6]&1 != 0, b: b})
		prev = b[cowmap.BlockSize-32:]
		if b[6]&1 != 0 {
			seq++
		}
		pos = (pos + 1) % s.g.LogBlocks
	}
	return out
}

// logRecord is chunk c's newest entry in the log (bytes to edit), or nil.
func (s *atkStore) logRecord(c uint64) []byte {
	var e []byte
	for _, l := range s.logChain() {
		if r, ok := l.records()[c]; ok {
			e = r
		}
	}
	return e
}

// entry is chunk c's current entry: the log's newest, else the leaf's.
func (s *atkStore) entry(c uint64) cowmap.Entry {
	var e cowmap.Entry
	if r := s.logRecord(c); r != nil {
		copy(e[:], r)
	} else {
		copy(e[:], s.leafEntry(c))
	}
	return e
}

// data is the block that holds chunk c's current ciphertext.
func (s *atkStore) data(c uint64) []byte {
	e := s.entry(c)
	if !e.Mapped() {
		s.t.Fatalf("adversary: chunk %d is unmapped", c)
	}
	return s.blk(s.g.DataBlock(c, e.Loc()))
}

// atkOutcome is what a case must end in.
type atkOutcome int

const (
	atkRefused  atkOutcome = iota // the attach fails with err, naming the volume
	atkEIO                        // reads of the chunks bad names fail; every other read serves the latest data
	atkHarmless                   // not an attack on what is served: every chunk reads its latest data, no alarm
	atkWindow                     // the documented window: the state of snapshot at is served, no error, no alarm
)

type atkCase struct {
	name   string
	world  string // tree, log, window
	attack func(t *testing.T, w *atkWorld, s *atkStore)
	out    atkOutcome
	err    error             // refused: the error; eio: what each failed read wraps (nil: ErrChunkAuth or ErrMapAuth)
	bad    func(uint64) bool // eio: exactly these chunks fail; window: these fail (their older home was reused), nil: none
	at     string            // window: the snapshot whose state is served
	warn   bool              // an integrity_warning must be logged
}

func atkOnly(cs ...uint64) func(uint64) bool {
	return func(c uint64) bool {
		for _, x := range cs {
			if x == c {
				return true
			}
		}
		return false
	}
}

func atkLeaf(i uint64) func(uint64) bool {
	return func(c uint64) bool { return c/cowmap.LeafFanout == i }
}

func atkAll(uint64) bool { return true }

// atkLogBuf is a log sink for one volume and its goroutines.
type atkLogBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (b *atkLogBuf) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.Write(p)
}

func (b *atkLogBuf) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.b.String()
}

// remacHeaders re-seals both header copies with the real header key:
// beyond the threat model (the adversary has no key), to show what the
// layer below the MAC catches on its own.
func (w *atkWorld) remacHeaders(t *testing.T, s *atkStore) {
	for c := uint64(0); c < 2; c++ {
		b := s.blk(c)
		atkFixHeaderCRC(b)
		key := w.headerKey(t, b)
		n := int(binary.LittleEndian.Uint16(b[10:]))
		m := hmac.New(sha256.New, key)
		m.Write(b[:n-32])
		copy(b[n-32:n], m.Sum(nil))
	}
}

// dekOf unwraps the active DEK a header block names (the test's key, not
// the adversary's).
func (w *atkWorld) dekOf(t *testing.T, b []byte) []byte {
	le := binary.LittleEndian
	// ParseHeader may refuse the edited block: read the key fields raw.
	rest := b[headerFixedSize:]
	field := func() []byte {
		l := int(le.Uint16(rest))
		f := rest[2 : 2+l]
		rest = rest[2+l:]
		return f
	}
	prov, name := field(), field()
	ver := le.Uint32(rest)
	rest = rest[4:]
	deks := [2][]byte{field(), field()}
	dek, err := w.kek.Unwrap(context.Background(), KeyRef{string(prov), string(name), ver}, atkUUID, deks[b[49]])
	if err != nil {
		t.Fatal(err)
	}
	return dek
}

func (w *atkWorld) headerKey(t *testing.T, b []byte) []byte {
	k, err := HeaderMACKey(w.dekOf(t, b), atkUUID)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// remacLog re-MACs the log chain from its first block with the real log
// key (beyond the threat model), so that edited records reach the map's
// own checks.
func (w *atkWorld) remacLog(t *testing.T, s *atkStore) {
	h := s.header()
	key, err := volumeKey(w.dekOf(t, s.blk(0)), atkUUID, infoLogMAC)
	if err != nil {
		t.Fatal(err)
	}
	prev := cowmap.Reseed(key, h.Seq, h.LogStart)
	for _, l := range s.logChain() {
		copy(l.b[32:64], prev[:])
		m := hmac.New(sha256.New, key)
		m.Write(l.b[:cowmap.BlockSize-32])
		m.Write(atkUUID[:])
		copy(l.b[cowmap.BlockSize-32:], m.Sum(nil))
		copy(prev[:], l.b[cowmap.BlockSize-32:])
	}
}

// atkOtherVolume formats and fills a second volume with the same keystore
// and layout: its header, nodes and ciphertexts are what a foreign copy
// looks like.
func atkOtherVolume(t *testing.T, kek KEKProvider) []byte {
	ctx := context.Background()
	g, _ := cowmap.NewGeometry(atkChunks, atkLog)
	dev := newCrashDev(int64(g.End * ChunkSize))
	other := [16]byte{0x07, 15: 0x02}
	if err := format(ctx, dev, other, atkChunks*ChunkSize, AES256GCM, kek, "default", atkLog); err != nil {
		t.Fatal(err)
	}
	v, err := Open(ctx, dev, "other", other, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	var buf []byte
	for c := 0; c < atkChunks; c++ {
		buf = append(buf, atkVal(c, 1)...)
	}
	if _, err := v.WriteAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	return dev.durable
}

func atkCases() []atkCase {
	flip := func(c uint64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) { s.data(c)[100] ^= 0x04 }
	}
	restore := func(snap string, blocks ...func(*atkStore) uint64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			old := &atkStore{t: t, g: s.g, img: w.snap[snap]}
			for _, b := range blocks {
				copy(s.blk(b(s)), old.blk(b(s)))
			}
		}
	}
	logPos := func(p uint64) func(*atkStore) uint64 { return func(s *atkStore) uint64 { return s.g.LogBase + p } }
	hdr := func(c uint64) func(*atkStore) uint64 { return func(*atkStore) uint64 { return c } }
	zeroLog := func(ps ...uint64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			for _, p := range ps {
				clear(s.blk(s.g.LogBase + p))
			}
		}
	}
	wholeStore := func(snap string) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) { copy(s.img, w.snap[snap]) }
	}
	// swapEntries swaps chunks a and b in their leaves (and their
	// ciphertexts), then fixes hashes as far as asked: 0 none, 1 the
	// parent, 2 also the header (CRC; the MAC it cannot).
	swapEntries := func(a, b uint64, fix int) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			atkSwap(s.data(a), s.data(b))
			atkSwap(s.leafEntry(a), s.leafEntry(b))
			if fix > 0 {
				s.fixUp(0, a/cowmap.LeafFanout, fix > 1)
				if b/cowmap.LeafFanout != a/cowmap.LeafFanout {
					s.fixUp(0, b/cowmap.LeafFanout, fix > 1)
				}
			}
		}
	}
	// unmapEntry clears chunk c's leaf entry (location 0, all zero but
	// its generation), fixing hashes as swapEntries does.
	unmapEntry := func(c uint64, fix int) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			e := s.leafEntry(c)
			gen := bytes.Clone(e[8:16])
			clear(e)
			copy(e[8:16], gen)
			if fix > 0 {
				s.fixUp(0, c/cowmap.LeafFanout, fix > 1)
			}
		}
	}
	editEntry := func(c uint64, edit func(e []byte), fix int) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			edit(s.leafEntry(c))
			if fix > 0 {
				s.fixUp(0, c/cowmap.LeafFanout, fix > 1)
			}
		}
	}
	// unmapNewest clears chunk 7's record in the newest log block (the
	// last one of the chain: no later block's chain link checks its MAC).
	unmapNewest := func(t *testing.T, w *atkWorld, s *atkStore) {
		l := s.logChain()
		e := l[len(l)-1].records()[7]
		gen := bytes.Clone(e[8:16])
		clear(e)
		copy(e[8:16], gen)
	}
	swapNewest := func(t *testing.T, w *atkWorld, s *atkStore) {
		l := s.logChain()
		r := l[len(l)-1].records()
		atkSwap(s.data(6), s.data(7))
		atkSwap(r[6], r[7])
	}
	loc3 := func(e []byte) { binary.LittleEndian.PutUint64(e, 3) }
	reserved := func(e []byte) { e[60] = 1 }
	then := func(fs ...func(*testing.T, *atkWorld, *atkStore)) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			for _, f := range fs {
				f(t, w, s)
			}
		}
	}
	remac := func(t *testing.T, w *atkWorld, s *atkStore) { w.remacHeaders(t, s) }
	// replayOld puts back, from snapshot snap, chunk c's old ciphertext
	// (into the home the current map names) and the old leaf (into the
	// current leaf's home); with root, the old root node too (into the
	// current root's home).
	replayOld := func(snap string, c uint64, root bool) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			old := &atkStore{t: t, g: s.g, img: w.snap[snap]}
			copy(s.data(c), old.data(c))
			oldLeaf := bytes.Clone(old.node(0, c/cowmap.LeafFanout))
			oldRoot := bytes.Clone(old.root())
			copy(s.node(0, c/cowmap.LeafFanout), oldLeaf)
			if root {
				copy(s.root(), oldRoot)
			}
		}
	}
	nodeRegion := func(s *atkStore) (lo, hi uint64) { return s.g.NodeBase, s.g.DataBase }
	copyRegion := func(snap string, region func(*atkStore) (uint64, uint64)) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			lo, hi := region(s)
			copy(s.img[lo*ChunkSize:hi*ChunkSize], w.snap[snap][lo*ChunkSize:hi*ChunkSize])
		}
	}
	logRegion := func(s *atkStore) (uint64, uint64) { return s.g.LogBase, s.g.NodeBase }
	headers := func(s *atkStore) (uint64, uint64) { return 0, 2 }
	truncate := func(blocks func(g cowmap.Geometry) int64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) { s.img = s.img[:blocks(s.g)] }
	}
	random := func(seed uint64) []byte {
		r := rand.New(rand.NewPCG(seed, 1))
		b := make([]byte, ChunkSize)
		for i := range b {
			b[i] = byte(r.Uint32())
		}
		return b
	}
	foreignHeader := func(copies ...uint64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			other := &atkStore{t: t, g: s.g, img: w.other}
			for _, c := range copies {
				copy(s.blk(c), other.blk(c))
			}
		}
	}
	// raiseGeneration makes header copy c claim a higher generation than
	// the other (CRC fixed): the copy a reader tries first.
	raiseGeneration := func(c uint64) func(*testing.T, *atkWorld, *atkStore) {
		return func(t *testing.T, w *atkWorld, s *atkStore) {
			binary.LittleEndian.PutUint64(s.blk(c)[12:], 1<<40)
			atkFixHeaderCRC(s.blk(c))
		}
	}
	leafOf := func(c uint64) uint64 { return c / cowmap.LeafFanout }
	// In the log and window worlds chunks 0..14 and 260..269 are served
	// from the log, so damage to the tree does not reach them.
	inLog := func(c uint64) bool { return c < 15 || (c >= 260 && c < 270) }
	// Rolled back two commits (to c1), chunks 5..9 name home B, which the
	// newest commit (seq 6) rewrote: their c1 contents are gone, and
	// their reads fail rather than serve anything else.
	reusedHome := func(c uint64) bool { return c >= 5 && c < 10 }
	notLogged := func(f func(uint64) bool) func(uint64) bool {
		return func(c uint64) bool { return f(c) && !inLog(c) }
	}

	return []atkCase{
		// 1. Bit flip in a chunk's ciphertext.
		{name: "1 bit flip in ciphertext/state in tree/EIO for that chunk only", world: "tree",
			attack: flip(150), out: atkEIO, err: ErrChunkAuth, bad: atkOnly(150)},
		{name: "1 bit flip in ciphertext of the last chunk written/state in tree/EIO for that chunk only", world: "tree",
			attack: flip(7), out: atkEIO, err: ErrChunkAuth, bad: atkOnly(7)},
		{name: "1 bit flip in ciphertext of a chunk served from the tree/state in log/EIO for that chunk only", world: "log",
			attack: flip(150), out: atkEIO, err: ErrChunkAuth, bad: atkOnly(150)},
		{name: "1 bit flip in ciphertext of a chunk of an older log commit/state in log/EIO for that chunk only", world: "log",
			attack: flip(262), out: atkEIO, err: ErrChunkAuth, bad: atkOnly(262)},
		{name: "1 bit flip in ciphertext of a chunk of the newest log commit/state in log/recovery drops the commit, attach refused ErrRollback", world: "log",
			attack: flip(7), out: atkRefused, err: ErrRollback},
		{name: "1 bit flip in ciphertext of a chunk of the newest log commit/window/DOCUMENTED WINDOW: the commit is dropped as unacknowledged, the previous flush is served", world: "window",
			attack: flip(7), out: atkWindow, at: "s5"},

		// 2. Chunks moved or swapped.
		{name: "2 two ciphertexts swapped in one leaf/state in tree/EIO for both", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { atkSwap(s.data(150), s.data(151)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(150, 151)},
		{name: "2 two ciphertexts swapped across leaves/state in tree/EIO for both", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { atkSwap(s.data(20), s.data(150)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(20, 150)},
		{name: "2 a ciphertext copied over another chunk's home/state in tree/EIO for the overwritten chunk", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { copy(s.data(151), s.data(150)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(151)},
		{name: "2 a ciphertext copied over its chunk's other home/state in tree/harmless: the map names one home", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				e := s.entry(20)
				copy(s.blk(s.g.DataBlock(20, cowmap.Other(e.Loc()))), s.data(20))
			},
			out: atkHarmless},
		{name: "2 two ciphertexts of the log swapped/state in log/EIO for both", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { atkSwap(s.data(2), s.data(3)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(2, 3)},
		{name: "2 entries and ciphertexts swapped, no hash fixed/state in tree/EIO for the leaf (ErrMapAuth)", world: "tree",
			attack: swapEntries(150, 151, 0), out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "2 entries and ciphertexts swapped, leaf hash fixed in the root node, header left/state in tree/EIO everywhere (root fails the header)", world: "tree",
			attack: swapEntries(150, 151, 1), out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "2 entries and ciphertexts swapped across leaves, hashes fixed to the root node/state in log/EIO for what the tree serves", world: "log",
			attack: swapEntries(20, 150, 1), out: atkEIO, err: ErrMapAuth, bad: notLogged(atkAll)},
		{name: "2 entries and ciphertexts swapped, hashes fixed into the header (CRC), MAC stale/state in tree/attach refused ErrHeaderAuth", world: "tree",
			attack: swapEntries(150, 151, 2), out: atkRefused, err: ErrHeaderAuth},
		{name: "2 entries and ciphertexts swapped, header re-MACed with the real key (beyond the threat model)/state in tree/EIO: the chunk index is the AEAD sequence number", world: "tree",
			attack: then(swapEntries(150, 151, 2), remac), out: atkEIO, err: ErrChunkAuth, bad: atkOnly(150, 151)},
		{name: "2 two records of a log block swapped with their ciphertexts/state in log/the MAC chain ends, attach refused ErrRollback", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				l := s.logChain()[0]
				r := l.records()
				atkSwap(s.data(2), s.data(3))
				atkSwap(r[2], r[3])
			},
			out: atkRefused, err: ErrRollback},

		// 3. Chunk zeroed, entry cleared.
		{name: "3 ciphertext zeroed/state in tree/EIO for that chunk", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { clear(s.data(150)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(150)},
		{name: "3 ciphertext zeroed/state in log/EIO for that chunk", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { clear(s.data(3)) },
			out:    atkEIO, err: ErrChunkAuth, bad: atkOnly(3)},
		{name: "3 leaf entry unmapped, no hash fixed/state in tree/EIO for the leaf", world: "tree",
			attack: unmapEntry(150, 0), out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "3 leaf entry unmapped, hash fixed in the root node/state in tree/EIO everywhere", world: "tree",
			attack: unmapEntry(150, 1), out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "3 leaf entry unmapped, hashes fixed into the header (CRC)/state in tree/attach refused ErrHeaderAuth", world: "tree",
			attack: unmapEntry(150, 2), out: atkRefused, err: ErrHeaderAuth},
		{name: "3 leaf entry unmapped, hash fixed in the root node/state in log/EIO for what the tree serves", world: "log",
			attack: unmapEntry(150, 1), out: atkEIO, err: ErrMapAuth, bad: notLogged(atkAll)},
		{name: "3 subtree made absent (root's reference to a leaf cleared)/state in tree/EIO everywhere", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				clear(s.root()[64+2*cowmap.RefSize:][:cowmap.RefSize])
			},
			out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "3 log record unmapped/state in log/the MAC chain ends, attach refused ErrRollback", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				e := s.logRecord(2)
				gen := bytes.Clone(e[8:16])
				clear(e)
				copy(e[8:16], gen)
			},
			out: atkRefused, err: ErrRollback},
		{name: "3 log record of the newest commit unmapped/state in log/its MAC fails, the log ends before it: attach refused ErrRollback", world: "log",
			attack: unmapNewest, out: atkRefused, err: ErrRollback},
		{name: "3 log record of the newest commit unmapped/window/DOCUMENTED WINDOW: the commit is dropped, the state of the flush before is served", world: "window",
			attack: unmapNewest, out: atkWindow, at: "s5"},
		{name: "2 two records of the newest log commit swapped with their ciphertexts/state in log/attach refused ErrRollback", world: "log",
			attack: swapNewest, out: atkRefused, err: ErrRollback},
		{name: "3 whole log block zeroed (the older commit)/state in log/attach refused ErrRollback", world: "log",
			attack: zeroLog(2), out: atkRefused, err: ErrRollback},

		// 4. An older version of one chunk with its old map entry.
		{name: "4 old ciphertext and old leaf of the last clean detach put in the current homes/state in tree/EIO for the leaf", world: "tree",
			attack: replayOld("c1", 0, false), out: atkEIO, err: ErrMapAuth, bad: atkLeaf(0)},
		{name: "4 old ciphertext, old leaf and old root put in the current homes/state in tree/EIO everywhere", world: "tree",
			attack: replayOld("c1", 0, true), out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "4 old ciphertext and old leaf from before the checkpoint/state in log/EIO for the leaf's chunks the tree serves", world: "log",
			attack: replayOld("s1", 20, false), out: atkEIO, err: ErrMapAuth, bad: notLogged(atkLeaf(0))},
		{name: "4 old ciphertext, nodes, log and headers of the last clean detach (the whole map)/state in tree/attach refused ErrRollback", world: "tree",
			attack: then(copyRegion("c1", nodeRegion), copyRegion("c1", logRegion), copyRegion("c1", headers),
				func(t *testing.T, w *atkWorld, s *atkStore) {
					old := &atkStore{t: t, g: s.g, img: w.snap["c1"]}
					copy(s.data(0), old.data(0))
				}),
			out: atkRefused, err: ErrRollback},
		{name: "4 old nodes and headers of the last clean detach, newer log left/state in tree/harmless: the log still chains to the latest state", world: "tree",
			attack: then(copyRegion("c1", nodeRegion), copyRegion("c1", headers)), out: atkHarmless},

		// 5. Older copy of a map node, older log block.
		{name: "5 older root node (first checkpoint) at its own home/state in tree/EIO everywhere", world: "tree",
			attack: restore("s1", func(s *atkStore) uint64 { return s.nodeBlock(1, 0, s.nodeRef(1, 0).Loc) }),
			out:    atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "5 older leaf (first checkpoint) at its own home/state in tree/EIO for the leaf", world: "tree",
			attack: restore("s1", func(s *atkStore) uint64 { return s.nodeBlock(0, 0, s.nodeRef(0, 0).Loc) }),
			out:    atkEIO, err: ErrMapAuth, bad: atkLeaf(0)},
		{name: "5 older (never written, zero) copy of a leaf home/state in tree/EIO for the leaf", world: "tree",
			attack: restore("s1", func(s *atkStore) uint64 { return s.nodeBlock(0, 4, s.nodeRef(0, 4).Loc) }),
			out:    atkEIO, err: ErrMapAuth, bad: atkLeaf(4)},
		{name: "5 older root node copied to the current root's home/state in log/EIO for what the tree serves", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				old := &atkStore{t: t, g: s.g, img: w.snap["s1"]}
				copy(s.root(), old.root())
			},
			out: atkEIO, err: ErrMapAuth, bad: notLogged(atkAll)},
		{name: "5 older log block (previous lap) at the older commit's ring position/state in log/attach refused ErrRollback", world: "log",
			attack: restore("s4", logPos(2)), out: atkRefused, err: ErrRollback},
		{name: "5 older log block (previous lap) at the newest commit's ring position, dropping a chunk's newest record/state in log/attach refused ErrRollback", world: "log",
			attack: restore("s4", logPos(3)), out: atkRefused, err: ErrRollback},
		{name: "5 older log block at the newest commit's ring position/window/DOCUMENTED WINDOW: the state of the flush before is served", world: "window",
			attack: restore("s4", logPos(3)), out: atkWindow, at: "s5"},
		{name: "5 older log block at the older commit's ring position/window/DOCUMENTED WINDOW: the state of the last clean detach is served, EIO where its homes were reused", world: "window",
			attack: restore("s4", logPos(2)), out: atkWindow, at: "c1", bad: reusedHome},
		{name: "5 foreign leaf (another volume, same keystore) at the leaf's home/state in tree/EIO for the leaf", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				other := &atkStore{t: t, g: s.g, img: w.other}
				copy(s.node(0, 2), other.node(0, 2))
			},
			out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "5 foreign ciphertext (another volume, same keystore, same chunk index)/state in tree/EIO for that chunk", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				other := &atkStore{t: t, g: s.g, img: w.other}
				copy(s.data(150), other.data(150))
			},
			out: atkEIO, err: ErrChunkAuth, bad: atkOnly(150)},

		// 6. Older header.
		{name: "6 both header copies from the first checkpoint/state in tree/attach refused ErrRollback", world: "tree",
			attack: restore("s1", hdr(0), hdr(1)), out: atkRefused, err: ErrRollback},
		{name: "6 both header copies from the first checkpoint/state in log/attach refused ErrRollback", world: "log",
			attack: restore("s1", hdr(0), hdr(1)), out: atkRefused, err: ErrRollback},
		{name: "6 header copy A from the first checkpoint/state in tree/harmless: the newer copy B wins", world: "tree",
			attack: restore("s1", hdr(0)), out: atkHarmless},
		{name: "6 header copy B from the first checkpoint/state in log/harmless: the newer copy A wins", world: "log",
			attack: restore("s1", hdr(1)), out: atkHarmless},
		{name: "6 both header copies from the last clean detach, log left/state in log/harmless: the log chains to the latest state", world: "log",
			attack: restore("c1", hdr(0), hdr(1)), out: atkHarmless},

		// 7. Header from another volume.
		{name: "7 both header copies from another volume (same keystore)/state in tree/attach refused ErrWrongVolume", world: "tree",
			attack: foreignHeader(0, 1), out: atkRefused, err: ErrWrongVolume},
		{name: "7 both header copies from another volume (same keystore)/state in log/attach refused ErrWrongVolume", world: "log",
			attack: foreignHeader(0, 1), out: atkRefused, err: ErrWrongVolume},
		{name: "7 header copy A from another volume/state in tree/harmless: the newer copy B wins", world: "tree",
			attack: foreignHeader(0), out: atkHarmless},

		// 8. Store truncated.
		{name: "8 store one block short/state in tree/attach refused ErrStoreTooSmall", world: "tree",
			attack: truncate(func(g cowmap.Geometry) int64 { return int64(g.End-1) * ChunkSize }), out: atkRefused, err: ErrStoreTooSmall},
		{name: "8 store one byte short/state in log/attach refused ErrStoreTooSmall", world: "log",
			attack: truncate(func(g cowmap.Geometry) int64 { return int64(g.End)*ChunkSize - 1 }), out: atkRefused, err: ErrStoreTooSmall},
		{name: "8 store cut after the header/state in tree/attach refused ErrStoreTooSmall", world: "tree",
			attack: truncate(func(g cowmap.Geometry) int64 { return 2 * HeaderBlockSize }), out: atkRefused, err: ErrStoreTooSmall},

		// 9. Whole store rolled back to an earlier consistent state.
		{name: "9 whole store rolled back to the last clean detach/state in tree/attach refused ErrRollback", world: "tree",
			attack: wholeStore("c1"), out: atkRefused, err: ErrRollback},
		{name: "9 whole store rolled back to the first checkpoint/state in tree/attach refused ErrRollback", world: "tree",
			attack: wholeStore("s1"), out: atkRefused, err: ErrRollback},
		{name: "9 whole store rolled back one flush/state in log/attach refused ErrRollback", world: "log",
			attack: wholeStore("s5"), out: atkRefused, err: ErrRollback},
		{name: "9 whole store rolled back to the last clean detach/state in log/attach refused ErrRollback", world: "log",
			attack: wholeStore("c1"), out: atkRefused, err: ErrRollback},
		{name: "9 whole store rolled back one flush/window/DOCUMENTED WINDOW: the older state is served", world: "window",
			attack: wholeStore("s5"), out: atkWindow, at: "s5"},
		{name: "9 whole store rolled back to the last clean detach/window/DOCUMENTED WINDOW: the older state is served", world: "window",
			attack: wholeStore("c1"), out: atkWindow, at: "c1"},
		{name: "9 whole store rolled back past the anchor/window/attach refused ErrRollback", world: "window",
			attack: wholeStore("s3"), out: atkRefused, err: ErrRollback},

		// 10. Log tail truncated or erased.
		{name: "10 newest log block erased/state in log/attach refused ErrRollback", world: "log",
			attack: zeroLog(3), out: atkRefused, err: ErrRollback},
		{name: "10 both log commits erased/state in log/attach refused ErrRollback", world: "log",
			attack: zeroLog(2, 3), out: atkRefused, err: ErrRollback},
		{name: "10 newest log block erased/window/DOCUMENTED WINDOW: the state of the flush before is served", world: "window",
			attack: zeroLog(3), out: atkWindow, at: "s5"},
		{name: "10 both log commits erased/window/DOCUMENTED WINDOW: the state of the last clean detach is served, EIO where its homes were reused", world: "window",
			attack: zeroLog(2, 3), out: atkWindow, at: "c1", bad: reusedHome},
		{name: "10 whole log region erased after a clean detach/state in tree/harmless: nothing is logged", world: "tree",
			attack: zeroLog(0, 1, 2, 3, 4, 5, 6, 7), out: atkHarmless},

		// 11. One header copy damaged.
		{name: "11 random bytes in header copy A/state in tree/opens with the latest data and an integrity_warning", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { copy(s.blk(0), random(1)) }, out: atkHarmless, warn: true},
		{name: "11 random bytes in header copy B/state in tree/opens with the latest data and an integrity_warning", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { copy(s.blk(1), random(2)) }, out: atkHarmless, warn: true},
		{name: "11 header copy A torn (second half zero)/state in log/opens with the latest data and an integrity_warning", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { clear(s.blk(0)[100:]) }, out: atkHarmless, warn: true},
		{name: "11 header copy B zeroed/state in log/opens with the latest data and an integrity_warning", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { clear(s.blk(1)) }, out: atkHarmless, warn: true},
		{name: "11 header copy A edited (CRC fixed, MAC stale)/state in tree/opens with the latest data and an integrity_warning", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				s.blk(0)[56]++ // Seq
				atkFixHeaderCRC(s.blk(0))
			},
			out: atkHarmless, warn: true},
		{name: "11 both header copies damaged/state in tree/attach refused ErrHeaderCorrupt", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) { copy(s.blk(0), random(3)); clear(s.blk(1)[100:]) },
			out:    atkRefused, err: ErrHeaderCorrupt},
		{name: "11 header copy A replaced by another volume's, generation raised (CRC fixed)/state in tree/opens from copy B with an integrity_warning", world: "tree",
			attack: then(foreignHeader(0), raiseGeneration(0)), out: atkHarmless, warn: true},
		{name: "11 header copy A with a garbage wrapped DEK, generation raised (CRC fixed)/state in tree/opens from copy B with an integrity_warning", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				b := s.blk(0)
				i := bytes.Index(b, w.dekBytes(t, b))
				b[i+40] ^= 1
				binary.LittleEndian.PutUint64(b[12:], 1<<40)
				atkFixHeaderCRC(b)
			},
			out: atkHarmless, warn: true},

		// 12. Reserved bytes, location ≥ 3.
		{name: "12 entry location 3, hashes fixed up to the root node/state in tree/EIO everywhere (ErrMapAuth)", world: "tree",
			attack: editEntry(150, loc3, 1), out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "12 entry reserved byte set, hashes fixed up to the root node/state in tree/EIO everywhere (ErrMapAuth)", world: "tree",
			attack: editEntry(150, reserved, 1), out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "12 leaf header reserved byte set, hashes fixed up to the root node/state in log/EIO for what the tree serves (ErrMapAuth)", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				s.node(0, leafOf(150))[6] = 1
				s.fixUp(0, leafOf(150), false)
			},
			out: atkEIO, err: ErrMapAuth, bad: notLogged(atkAll)},
		{name: "12 root's reference to a leaf with location 3, header left/state in tree/EIO everywhere (ErrMapAuth)", world: "tree",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				binary.LittleEndian.PutUint64(s.root()[64+2*cowmap.RefSize:], 3)
			},
			out: atkEIO, err: ErrMapAuth, bad: atkAll},
		{name: "12 entry location 3, hashes fixed into the header (CRC)/state in tree/attach refused ErrHeaderAuth", world: "tree",
			attack: editEntry(150, loc3, 2), out: atkRefused, err: ErrHeaderAuth},
		{name: "12 entry location 3, header re-MACed with the real key (beyond the threat model)/state in tree/EIO for the leaf: the entry check", world: "tree",
			attack: then(editEntry(150, loc3, 2), remac), out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "12 entry reserved byte set, header re-MACed with the real key (beyond the threat model)/state in tree/EIO for the leaf: the entry check", world: "tree",
			attack: then(editEntry(150, reserved, 2), remac), out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "12 root's reference with location 3, header re-MACed with the real key (beyond the threat model)/state in tree/EIO for the leaf: the reference check", world: "tree",
			attack: then(func(t *testing.T, w *atkWorld, s *atkStore) {
				binary.LittleEndian.PutUint64(s.root()[64+2*cowmap.RefSize:], 3)
				s.fixUp(1, 0, true)
			}, remac),
			out: atkEIO, err: ErrMapAuth, bad: atkLeaf(2)},
		{name: "12 header's root reference with location 3, re-MACed with the real key (beyond the threat model)/state in tree/attach refused ErrHeaderCorrupt", world: "tree",
			attack: then(func(t *testing.T, w *atkWorld, s *atkStore) {
				for c := uint64(0); c < 2; c++ {
					binary.LittleEndian.PutUint64(s.blk(c)[104:], 3)
				}
			}, remac),
			out: atkRefused, err: ErrHeaderCorrupt},
		{name: "12 log record with location 3, log re-MACed with the real key (beyond the threat model)/state in log/attach refused ErrMapAuth", world: "log",
			attack: func(t *testing.T, w *atkWorld, s *atkStore) {
				binary.LittleEndian.PutUint64(s.logRecord(2), 3)
				w.remacLog(t, s)
			},
			out: atkRefused, err: ErrMapAuth},
	}
}

// dekBytes is the active wrapped DEK inside header block b.
func (w *atkWorld) dekBytes(t *testing.T, b []byte) []byte {
	h, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	return h.DEK[h.Active]
}

// TestAttacks runs every case of the threat model's table against the
// worlds it applies to (the case name says the attack, the world and the
// outcome it asserts).
func TestAttacks(t *testing.T) {
	kek := NewLocalKEK(t.TempDir(), nil)
	other := atkOtherVolume(t, kek)
	worlds := map[string]*atkWorld{}
	for _, k := range []string{"tree", "log", "window"} {
		worlds[k] = atkBuildWorld(t, kek, k)
		worlds[k].other = other
	}
	for _, tc := range atkCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			atkRun(t, worlds[tc.world], tc)
		})
	}
}

func atkRun(t *testing.T, w *atkWorld, tc atkCase) {
	ctx := context.Background()
	s := &atkStore{t: t, g: w.g, img: bytes.Clone(w.final)}
	tc.attack(t, w, s)
	var logBuf atkLogBuf
	log := slog.New(slog.NewTextHandler(&logBuf, nil))
	v, err := Open(ctx, &crashDev{durable: s.img}, atkName, atkUUID, w.kek, log, Options{Anchor: w.anchor(t), MaxLogged: atkMaxLogged})
	failure := strings.Contains(logBuf.String(), "event=integrity_failure")
	if err != nil {
		if tc.out != atkRefused {
			t.Fatalf("attach refused (%v), want it to open", err)
		}
		if !errors.Is(err, tc.err) {
			t.Errorf("attach refused with %v, want %v", err, tc.err)
		}
		if !strings.Contains(err.Error(), "volume "+atkName) {
			t.Errorf("the refusal does not name the volume: %v", err)
		}
		if !failure {
			t.Errorf("attach refused (%v) but no event=integrity_failure was logged", err)
		}
		return
	}
	defer v.Close()
	if tc.out == atkRefused {
		t.Errorf("attach accepted, want it refused with %v", tc.err)
	}
	want := w.latest
	if tc.out == atkWindow {
		want = w.at[tc.at]
	}
	var bad []uint64
	got := make([]byte, ChunkSize)
	differs := false
	for c := uint64(0); c < atkChunks; c++ {
		_, err := v.ReadAt(got, int64(c)*ChunkSize)
		if err != nil {
			bad = append(bad, c)
			switch {
			case tc.out == atkWindow && tc.bad != nil && tc.bad(c):
				if !errors.Is(err, ErrChunkAuth) {
					t.Errorf("chunk %d: %v, want ErrChunkAuth", c, err)
				}
			case tc.out != atkEIO:
				t.Errorf("chunk %d: %v", c, err)
			case !errors.Is(err, tc.err):
				t.Errorf("chunk %d: %v, want %v", c, err, tc.err)
			}
			continue
		}
		if !bytes.Equal(got, want[c]) {
			t.Errorf("chunk %d: SERVED AS GOOD data that is not its latest flushed contents", c)
		}
		differs = differs || !bytes.Equal(got, w.latest[c])
	}
	// The other read paths agree: a partial read of every chunk (read,
	// then copy out) and one read of the whole volume (batched).
	for c := uint64(0); c < atkChunks; c++ {
		_, err := v.ReadAt(got[:512], int64(c)*ChunkSize+1000)
		if (err != nil) != atkHas(bad, c) {
			t.Errorf("chunk %d: a partial read says %v, the whole-chunk read failed: %v", c, err, atkHas(bad, c))
		}
		if err == nil && !bytes.Equal(got[:512], want[c][1000:1512]) {
			t.Errorf("chunk %d: a partial read SERVED AS GOOD data that is not its latest flushed contents", c)
		}
	}
	all := make([]byte, atkChunks*ChunkSize)
	n, err := v.ReadAt(all, 0)
	switch {
	case (err != nil) != (len(bad) > 0):
		t.Errorf("a read of the whole volume: %v, but %d chunks fail", err, len(bad))
	case err != nil && !errors.Is(err, ErrChunkAuth) && !errors.Is(err, ErrMapAuth):
		t.Errorf("a read of the whole volume: %v", err)
	case err != nil && uint64(n) > bad[0]*ChunkSize:
		t.Errorf("a read of the whole volume returned %d bytes, past the first failing chunk %d", n, bad[0])
	}
	for c := 0; c < n/ChunkSize; c++ {
		if !bytes.Equal(all[c*ChunkSize:(c+1)*ChunkSize], want[c]) {
			t.Errorf("chunk %d: a read of the whole volume SERVED AS GOOD data that is not its latest flushed contents", c)
			break
		}
	}
	failure = strings.Contains(logBuf.String(), "event=integrity_failure")
	warning := strings.Contains(logBuf.String(), "event=integrity_warning")
	switch tc.out {
	case atkRefused:
	case atkEIO:
		if len(bad) == 0 {
			t.Fatal("the attack went undetected: every read succeeded")
		}
		for c := uint64(0); c < atkChunks; c++ {
			if tc.bad(c) != (atkHas(bad, c)) {
				t.Errorf("chunk %d: read failed %v, want %v (failed: %v)", c, atkHas(bad, c), tc.bad(c), bad)
				break
			}
		}
		if !failure {
			t.Error("reads failed but no event=integrity_failure was logged")
		}
	case atkHarmless:
		if failure {
			t.Errorf("a false alarm: %s", logBuf.String())
		}
	case atkWindow:
		if !differs {
			t.Error("the window case serves the latest data: it rolled nothing back, fix the case")
		}
		if tc.bad == nil && failure {
			t.Errorf("the window is documented as undetected, but an integrity_failure was logged: %s", logBuf.String())
		}
		if tc.bad != nil {
			for c := uint64(0); c < atkChunks; c++ {
				if tc.bad(c) != atkHas(bad, c) {
					t.Errorf("chunk %d: read failed %v, want %v (failed: %v)", c, atkHas(bad, c), tc.bad(c), bad)
					break
				}
			}
		}
		t.Logf("documented window (FORMAT.md, \"The window\"): a rollback to snapshot %s went undetected after a crash; every chunk reads its contents as of that flush", tc.at)
	}
	if tc.warn && !warning {
		t.Error("no event=integrity_warning was logged")
	}
}

func atkHas(s []uint64, x uint64) bool {
	for _, y := range s {
		if y == x {
			return true
		}
	}
	return false
}

// An old header (with every KEK version in the keystore) cannot open the
// old data key once a rekey has finished: the local keystore destroyed
// its secret. After a shred-style destroy of the volume, nothing opens.
func TestAttackRekeyOldHeader(t *testing.T) {
	ctx := context.Background()
	const atkOnly = 64
	dir := t.TempDir()
	kek := NewLocalKEK(dir, nil)
	dev := newCrashDev(int64(LayoutFor(atkOnly * ChunkSize).End))
	id := [16]byte{0xfe, 0xed}
	if err := Format(ctx, dev, id, atkOnly*ChunkSize, AES256GCM, kek, "default"); err != nil {
		t.Fatal(err)
	}
	open := func(store *crashDev) (*Volume, error) {
		return Open(ctx, store, "rk", id, kek, quietLog(), Options{})
	}
	v, err := open(dev)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("rekeyed!"), atkOnly*ChunkSize/8)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(dev.durable)
	oldHdr, _, err := PickHeader(before[:HeaderBlockSize], before[HeaderBlockSize:2*HeaderBlockSize])
	if err != nil {
		t.Fatal(err)
	}
	// A second KEK version, so that "every KEK version" is more than one.
	if _, err := kek.Rotate(ctx, "default"); err != nil {
		t.Fatal(err)
	}
	if v, err = open(dev); err != nil {
		t.Fatal(err)
	}
	if err := v.Rekey(ctx, kek, RekeyOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	for ver := uint32(1); ver <= 2; ver++ {
		ref := oldHdr.KEK
		ref.Version = ver
		if dek, err := kek.Unwrap(ctx, ref, id, oldHdr.DEK[oldHdr.Active]); !errors.Is(err, ErrKeyDestroyed) || dek != nil {
			t.Errorf("old wrapped DEK under KEK version %d: %v, want ErrKeyDestroyed", ver, err)
		}
	}
	// The old header copies put back in the current store, and the whole
	// old store: neither opens.
	withOld := bytes.Clone(dev.durable)
	copy(withOld[:2*HeaderBlockSize], before[:2*HeaderBlockSize])
	for name, img := range map[string][]byte{"old header in the current store": withOld, "the whole store from before the rekey": before} {
		if _, err := open(&crashDev{durable: bytes.Clone(img)}); !errors.Is(err, ErrKeyDestroyed) {
			t.Errorf("%s: %v, want ErrKeyDestroyed", name, err)
		}
	}
	v, err = open(&crashDev{durable: bytes.Clone(dev.durable)})
	if err != nil {
		t.Fatalf("the rekeyed store: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the rekeyed store reads %v, equal %v", err, bytes.Equal(got, data))
	}
	v.Close()
	// Shred: every DEK secret of the volume destroyed.
	if n, err := kek.DestroyVolume(ctx, id); err != nil || n == 0 {
		t.Fatalf("DestroyVolume: %d, %v", n, err)
	}
	for name, img := range map[string][]byte{"current store": dev.durable, "old header in the current store": withOld, "store from before the rekey": before} {
		if _, err := open(&crashDev{durable: bytes.Clone(img)}); !errors.Is(err, ErrKeyDestroyed) {
			t.Errorf("after the destroy, %s: %v, want ErrKeyDestroyed", name, err)
		}
	}
}

// A clean detach writes the exact seal count, and after a crash the next
// attach starts a new seal epoch, so that no epoch's count is ever
// undercounted (FORMAT.md, "Nonces": "a header that says clean with a
// lower count than the truth would be an older header, which the anchor
// refuses"). The adversary keeps a header, lets the gateway seal more
// (flushed into the log, or written and never flushed before a power
// cut), then puts the older header back: the store still recovers to
// a state the anchor accepts, and the volume must not seal on in an
// epoch from a count it has already used.
func TestAttackOldHeaderRewindsSealEpoch(t *testing.T) {
	ctx := context.Background()
	const atkOnly = 64
	size := uint64(atkOnly * ChunkSize)
	id := [16]byte{0x5e, 0xa1}
	for _, tc := range []struct {
		name         string
		clean, flush bool // session 1 detached cleanly; session 2 flushed its seals
	}{
		{"older clean header, newer log", true, true},
		{"older header after a crash, newer log", false, true},
		{"older clean header, seals after it never flushed (power cut)", true, false},
		{"older header after a crash, seals after it never flushed (power cut)", false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			kek := NewLocalKEK(t.TempDir(), nil)
			anchor := newMemAnchor()
			dev := newCrashDev(int64(LayoutFor(size).End))
			if err := Format(ctx, dev, id, size, AES256GCM, kek, "default"); err != nil {
				t.Fatal(err)
			}
			open := func(store *crashDev) *Volume {
				v, err := Open(ctx, store, "ep", id, kek, quietLog(), Options{Anchor: anchor, AnchorEveryFlush: true})
				if err != nil {
					t.Fatal(err)
				}
				v.stopBackground()
				return v
			}
			want := make([]byte, size)
			session := func(store *crashDev, round byte, flush bool) *Volume {
				v := open(store)
				if _, err := v.WriteAt(bytes.Repeat([]byte{round}, 10*ChunkSize), int64(round)*ChunkSize); err != nil {
					t.Fatal(err)
				}
				if flush {
					if err := v.Flush(); err != nil {
						t.Fatal(err)
					}
					copy(want[int(round)*ChunkSize:], bytes.Repeat([]byte{round}, 10*ChunkSize))
				} else {
					store.mu.Lock()
					for _, w := range store.pending { // the ciphertexts reached the disk, the map never did
						copy(store.durable[w.off:], w.data)
					}
					store.pending = nil
					store.mu.Unlock()
				}
				return v
			}
			// Session 1, then the header the adversary keeps.
			v := session(dev, 1, true)
			if tc.clean {
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				abandon(v)
			}
			oldHeaders := bytes.Clone(dev.durable[:2*HeaderBlockSize])
			old, _, _ := PickHeader(oldHeaders[:HeaderBlockSize], oldHeaders[HeaderBlockSize:])
			// Session 2 seals more, in the epoch the next attach would
			// use with the older header; then it detaches (if it
			// flushed) or the power is cut.
			v = session(dev, 20, tc.flush)
			used := v.Header()
			if tc.clean && tc.flush {
				if err := v.Close(); err != nil {
					t.Fatal(err)
				}
			} else {
				abandon(v)
			}
			// The adversary puts the older header back.
			img := bytes.Clone(dev.durable)
			copy(img, oldHeaders)
			v = open(&crashDev{durable: img})
			defer abandon(v)
			got := make([]byte, size)
			if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, want) {
				t.Fatalf("older header with the newer store: %v, contents equal %v", err, bytes.Equal(got, want))
			}
			now := v.Header()
			t.Logf("old header: epoch %d, %d seals, open %v; session 2 sealed up to epoch %d seal %d; the attach now seals from epoch %d seal %d",
				old.Epoch, old.EpochSeals, old.Open, used.Epoch, used.EpochSeals, now.Epoch, now.EpochSeals)
			if now.Epoch < used.Epoch || now.Epoch == used.Epoch && now.EpochSeals < used.EpochSeals {
				t.Errorf("BUG: the volume seals on from epoch %d seal %d, but epoch %d has already sealed %d chunks: the epoch's count is undercounted (FORMAT.md, \"Nonces\")",
					now.Epoch, now.EpochSeals, used.Epoch, used.EpochSeals)
			}
		})
	}
}

func atkSwap(a, b []byte) {
	t := bytes.Clone(a)
	copy(a, b)
	copy(b, t)
}
