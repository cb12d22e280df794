package cowmap

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"hash"
)

// Locations of a chunk or node (FORMAT.md, "Map entry").
const (
	Unmapped uint64 = 0
	HomeA    uint64 = 1
	HomeB    uint64 = 2
)

// A location with InLogBit set is "in the log" (FORMAT.md, "Map entry"):
// bit 62 names the home the data moves to at the next checkpoint, bits
// 0..61 the ring position of its ciphertext.
const (
	InLogBit  uint64 = 1 << 63
	logHomeB  uint64 = 1 << 62
	logPosMax uint64 = logHomeB - 1
)

// InLog returns the location of data at ring position pos that moves to
// home at the next checkpoint.
func InLog(pos, home uint64) uint64 {
	l := InLogBit | pos
	if home == HomeB {
		l |= logHomeB
	}
	return l
}

// IsInLog reports whether loc is in the log.
func IsInLog(loc uint64) bool { return loc&InLogBit != 0 }

// LogPos is the ring position of a location in the log.
func LogPos(loc uint64) uint64 { return loc & logPosMax }

// HomeOf is the home loc is, or for a location in the log the home its
// data moves to; Unmapped stays Unmapped.
func HomeOf(loc uint64) uint64 {
	if !IsInLog(loc) {
		return loc
	}
	if loc&logHomeB != 0 {
		return HomeB
	}
	return HomeA
}

// Other is the home that loc is not (or, in the log, does not move to);
// for Unmapped, home A.
func Other(loc uint64) uint64 {
	if HomeOf(loc) == HomeA {
		return HomeB
	}
	return HomeA
}

// Entry is a chunk's 64-byte map entry (format). Its zero value is an
// unmapped chunk.
type Entry [EntrySize]byte

// Entry accessors, in the manner of sio's headerV20.
func (e *Entry) Loc() uint64        { return binary.LittleEndian.Uint64(e[0:]) }
func (e *Entry) Gen() uint64        { return binary.LittleEndian.Uint64(e[8:]) }
func (e *Entry) Epoch() uint32      { return binary.LittleEndian.Uint32(e[16:]) }
func (e *Entry) KeySlot() uint8     { return e[20] }
func (e *Entry) DAREHeader() []byte { return e[24:40] }
func (e *Entry) Tag() []byte        { return e[40:56] }
func (e *Entry) Mapped() bool       { return e.Loc() != Unmapped }

// SetLoc and the setters below fill an entry.
func (e *Entry) SetLoc(l uint64)    { binary.LittleEndian.PutUint64(e[0:], l) }
func (e *Entry) SetGen(g uint64)    { binary.LittleEndian.PutUint64(e[8:], g) }
func (e *Entry) SetEpoch(x uint32)  { binary.LittleEndian.PutUint32(e[16:], x) }
func (e *Entry) SetKeySlot(k uint8) { e[20] = k }

// valid reports whether the reserved bytes are zero and the location a
// home or unmapped (a node's entry).
func (e *Entry) valid() bool { return e.Loc() <= HomeB && e.validRest() }

// validLogged is valid for a log record, whose entry may also be in the
// log at a ring position below logBlocks.
func (e *Entry) validLogged(logBlocks uint64) bool {
	l := e.Loc()
	return (l <= HomeB || IsInLog(l) && LogPos(l) < logBlocks) && e.validRest()
}

func (e *Entry) validRest() bool {
	if e[21]|e[22]|e[23] != 0 || e.KeySlot() > 1 {
		return false
	}
	for _, b := range e[56:] {
		if b != 0 {
			return false
		}
	}
	return true
}

// Ref is a 48-byte reference to a node (format): location, SHA-256 of the
// node, maximum generation below it.
type Ref struct {
	Loc    uint64
	Hash   [32]byte
	MaxGen uint64
}

// Absent reports whether nothing was ever written under the reference.
func (r Ref) Absent() bool { return r.Loc == Unmapped }

// Marshal writes r into b (48 bytes).
func (r Ref) Marshal(b []byte) {
	binary.LittleEndian.PutUint64(b[0:], r.Loc)
	copy(b[8:40], r.Hash[:])
	binary.LittleEndian.PutUint64(b[40:], r.MaxGen)
}

// ParseRef reads a reference.
func ParseRef(b []byte) Ref {
	r := Ref{Loc: binary.LittleEndian.Uint64(b[0:]), MaxGen: binary.LittleEndian.Uint64(b[40:])}
	copy(r.Hash[:], b[8:40])
	return r
}

// node is one 4096-byte map node.
type node [BlockSize]byte

const nodeMagic = "GLMN"

func newNode(level int, index, seq uint64, uuid [16]byte) *node {
	n := new(node)
	copy(n[0:4], nodeMagic)
	n[4] = byte(level)
	binary.LittleEndian.PutUint64(n[8:], index)
	binary.LittleEndian.PutUint64(n[16:], seq)
	copy(n[24:40], uuid[:])
	return n
}

func (n *node) level() int      { return int(n[4]) }
func (n *node) index() uint64   { return binary.LittleEndian.Uint64(n[8:]) }
func (n *node) setSeq(s uint64) { binary.LittleEndian.PutUint64(n[16:], s) }

func (n *node) entry(i int) *Entry {
	return (*Entry)(n[nodeHdr+i*EntrySize:][:EntrySize])
}

func (n *node) ref(i int) Ref { return ParseRef(n[nodeHdr+i*RefSize:][:RefSize]) }

func (n *node) setRef(i int, r Ref) { r.Marshal(n[nodeHdr+i*RefSize:][:RefSize]) }

// errNodeForm: a node whose hash matched but whose fields do not fit its
// place. Only a bug or a SHA-256 collision gets here.
var errNodeForm = errors.New("node does not fit its place")

// check verifies a node's fixed fields against its place.
func (n *node) check(level int, index uint64, uuid [16]byte) error {
	if string(n[0:4]) != nodeMagic || n.level() != level || n.index() != index || [16]byte(n[24:40]) != uuid {
		return errNodeForm
	}
	return nil
}

// maxGen is the maximum generation of a node's entries or references.
func (n *node) maxGen() uint64 {
	var m uint64
	if n.level() == 0 {
		for i := 0; i < LeafFanout; i++ {
			m = max(m, n.entry(i).Gen())
		}
		return m
	}
	for i := 0; i < InteriorFanout; i++ {
		m = max(m, n.ref(i).MaxGen)
	}
	return m
}

func (n *node) hash() [32]byte { return sha256.Sum256(n[:]) }

// Log block (format).
const (
	logMagic   = "GLML"
	flagCommit = 1
)

// record is one log record: a chunk and its new entry.
type record struct {
	chunk uint64
	e     Entry
}

// maxLogData bounds a log block's data blocks (FORMAT.md, "Log block").
const maxLogData = 64

// sealLogBlock fills b (4096 bytes) and returns its MAC; data is how many
// ring positions after it hold chunk data of its commit.
func sealLogBlock(b []byte, key []byte, uuid [16]byte, recs []record, commit bool, seq, pos uint64, data uint32, prev [32]byte) [32]byte {
	fillLogBlock(b, recs, commit, seq, pos, data, prev)
	mac := logMAC(key, uuid, b)
	copy(b[logMACOff:], mac[:])
	return mac
}

// fillLogBlock is sealLogBlock without the MAC.
func fillLogBlock(b []byte, recs []record, commit bool, seq, pos uint64, data uint32, prev [32]byte) {
	clear(b)
	copy(b[0:4], logMagic)
	binary.LittleEndian.PutUint16(b[4:], uint16(len(recs)))
	if commit {
		b[6] = flagCommit
	}
	binary.LittleEndian.PutUint64(b[8:], seq)
	binary.LittleEndian.PutUint64(b[16:], pos)
	binary.LittleEndian.PutUint32(b[24:], data)
	copy(b[32:64], prev[:])
	for i, r := range recs {
		o := b[logHdr+i*logRecord:]
		binary.LittleEndian.PutUint64(o, r.chunk)
		copy(o[8:8+EntrySize], r.e[:])
	}
}

// logMACer computes log block MACs with one HMAC, reset for each block:
// no allocation per block. Not safe for concurrent use.
type logMACer struct {
	h   hash.Hash
	sum [32]byte
}

func newLogMACer(key []byte) *logMACer { return &logMACer{h: hmac.New(sha256.New, key)} }

// seal puts the MAC of a filled block b (with uuid) into it and returns it.
func (l *logMACer) seal(b []byte, uuid [16]byte) [32]byte {
	l.h.Reset()
	l.h.Write(b[:logMACOff])
	l.h.Write(uuid[:])
	l.h.Sum(l.sum[:0])
	copy(b[logMACOff:], l.sum[:])
	return l.sum
}

func logMAC(key []byte, uuid [16]byte, b []byte) [32]byte {
	m := hmac.New(sha256.New, key)
	m.Write(b[:logMACOff])
	m.Write(uuid[:])
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// openLogBlock checks a log block read at ring position pos that must
// chain to prev with commit sequence seq; it returns its records, whether
// it ends a commit, how many data blocks follow it, and its MAC.
func openLogBlock(b []byte, key []byte, uuid [16]byte, seq, pos uint64, prev [32]byte, alt *[32]byte) (recs []record, commit bool, data uint32, mac [32]byte, ok bool) {
	if string(b[0:4]) != logMagic || binary.LittleEndian.Uint64(b[8:]) != seq ||
		binary.LittleEndian.Uint64(b[16:]) != pos {
		return nil, false, 0, mac, false
	}
	if chain := [32]byte(b[32:64]); chain != prev && (alt == nil || chain != *alt) {
		return nil, false, 0, mac, false
	}
	mac = logMAC(key, uuid, b)
	if !hmac.Equal(mac[:], b[logMACOff:]) {
		return nil, false, 0, mac, false
	}
	n := int(binary.LittleEndian.Uint16(b[4:]))
	data = binary.LittleEndian.Uint32(b[24:])
	if n > LogPerBlock || b[6]&^flagCommit != 0 || data > maxLogData || b[7]|b[28]|b[29]|b[30]|b[31] != 0 {
		return nil, false, 0, mac, false
	}
	recs = make([]record, n)
	for i := range recs {
		o := b[logHdr+i*logRecord:]
		recs[i].chunk = binary.LittleEndian.Uint64(o)
		copy(recs[i].e[:], o[8:8+EntrySize])
	}
	return recs, b[6]&flagCommit != 0, data, mac, true
}

// Reseed is what the first block of commit seq+1, at ring position pos,
// chains to when a checkpoint of commit seq began there (FORMAT.md, "Log
// block"). It depends on nothing the checkpoint computes, so commits go on
// while the checkpoint writes the tree.
func Reseed(key []byte, seq, pos uint64) [32]byte {
	m := hmac.New(sha256.New, key)
	var b [16]byte
	binary.LittleEndian.PutUint64(b[0:], seq)
	binary.LittleEndian.PutUint64(b[8:], pos)
	m.Write([]byte("reseed"))
	m.Write(b[:])
	var out [32]byte
	m.Sum(out[:0])
	return out
}

// Seed is the MAC chain's seed at the log start of a header written
// before reseeds (FORMAT.md, "Log block"); recovery still accepts it there.
func Seed(key []byte, seq uint64, root Ref, logStart uint64) [32]byte {
	m := hmac.New(sha256.New, key)
	var b [8 + RefSize + 8]byte
	binary.LittleEndian.PutUint64(b[0:], seq)
	root.Marshal(b[8:])
	binary.LittleEndian.PutUint64(b[8+RefSize:], logStart)
	m.Write([]byte("seed"))
	m.Write(b[:])
	var out [32]byte
	m.Sum(out[:0])
	return out
}
