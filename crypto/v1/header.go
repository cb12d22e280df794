// Package v1 reads encrypted volumes of format 1, the on-disk format of
// the previous release, for `goldilocks volume upgrade` and nothing else:
// it never writes a store, it is never attached to a gateway, and it is
// the only code in this build that parses a format-1 header or map.
//
// The format is the format-1 release's crypto/FORMAT.md (commit 522f70a:
// "Layout", "Volume header", "Chunks are DARE 2.0 packages", "The chunk
// map"); crypto/FORMAT.md's last section summarises it. What this package
// checks is what the format-1 release checked at attach: both header
// copies (CRC-32C), the chosen copy's HMAC under its active data key, the
// map pages (CRC-32C, the newer valid copy of each), and each chunk's DARE
// 2.0 tag when it is read. Format 1's map is not authenticated and it has
// no rollback protection; reading it here protects no more than the
// format-1 release did, and the upgrade's output is only as good as the
// store it reads (FORMAT.md, "Format 1").
//
// Chunk sealing is unchanged between the formats except for the key: a
// format-1 chunk is sealed with the data key itself, so crypto.NewSealer
// of the unwrapped DEK opens it.
package v1

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"

	"goldilocks/crypto"
)

// Format-1 header constants (the format-1 FORMAT.md, "Volume header").
// Part of the on-disk format.
const (
	// Version is the format version this package reads.
	Version         = 1
	headerFixedSize = 96 // up to the variable-length fields
	headerTrailer   = 4 + 32
	maxFieldLen     = 1024
	macInfo         = "goldilocks header v1"
)

// ErrMapCorrupt: both copies of a format-1 map page are damaged, or an
// entry names a slot or a DEK slot it cannot.
var ErrMapCorrupt = errors.New("crypto/v1: format-1 chunk map is corrupt")

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// Header is a decoded format-1 volume header.
type Header struct {
	Generation    uint64
	UUID          [16]byte
	Size          uint64 // logical size in bytes
	ChunkSize     uint32
	Suite         byte
	Slots         uint64 // N + spare slots
	MapOffset     uint64
	SlotOffset    uint64
	NonceReserved uint64
	RekeyCursor   uint64
	KEK           crypto.KeyRef
	// Active is the DEK slot whose DEK keys the header MAC; during a rekey
	// the other slot holds the new DEK.
	Active byte
	DEK    [2][]byte // wrapped DEKs by slot; empty when unused
}

// Rekeying reports whether a rekey was in progress: both slots hold a DEK.
func (h *Header) Rekeying() bool { return len(h.DEK[0]) > 0 && len(h.DEK[1]) > 0 }

// Clone returns a deep copy.
func (h *Header) Clone() *Header {
	c := *h
	for i := range c.DEK {
		c.DEK[i] = append([]byte(nil), h.DEK[i]...)
	}
	return &c
}

// HeaderMACKey derives a format-1 header's MAC key from the active data
// key: HKDF-SHA256(DEK, salt = UUID, info = "goldilocks header v1").
func HeaderMACKey(dek []byte, uuid [16]byte) ([]byte, error) {
	return hkdf.Key(sha256.New, dek, uuid[:], macInfo, 32)
}

// ParseHeader decodes a format-1 header block and checks its magic,
// version and checksum (not its MAC: see VerifyHeaderMAC). A header of
// another version is crypto.ErrUnsupportedVersion.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < headerFixedSize+headerTrailer {
		return nil, crypto.ErrHeaderCorrupt
	}
	v, err := crypto.HeaderFormat(b)
	if err != nil {
		return nil, err
	}
	if v != Version {
		return nil, fmt.Errorf("%w: %d (this reader reads format %d only)", crypto.ErrUnsupportedVersion, v, Version)
	}
	le := binary.LittleEndian
	n := int(le.Uint16(b[10:]))
	if n < headerFixedSize+headerTrailer || n > len(b) || n > crypto.HeaderBlockSize {
		return nil, crypto.ErrHeaderCorrupt
	}
	body := b[:n-headerTrailer]
	if crc32.Checksum(body, castagnoli) != le.Uint32(b[n-headerTrailer:]) {
		return nil, crypto.ErrHeaderCorrupt
	}
	h := &Header{
		Generation:    le.Uint64(b[12:]),
		Size:          le.Uint64(b[36:]),
		ChunkSize:     le.Uint32(b[44:]),
		Suite:         b[48],
		Active:        b[49],
		Slots:         le.Uint64(b[56:]),
		MapOffset:     le.Uint64(b[64:]),
		SlotOffset:    le.Uint64(b[72:]),
		NonceReserved: le.Uint64(b[80:]),
		RekeyCursor:   le.Uint64(b[88:]),
	}
	copy(h.UUID[:], b[20:36])
	rest := body[headerFixedSize:]
	field := func() ([]byte, bool) {
		if len(rest) < 2 {
			return nil, false
		}
		l := int(le.Uint16(rest))
		if l > maxFieldLen || len(rest) < 2+l {
			return nil, false
		}
		f := rest[2 : 2+l]
		rest = rest[2+l:]
		return f, true
	}
	prov, ok1 := field()
	name, ok2 := field()
	if !ok1 || !ok2 || len(rest) < 4 {
		return nil, crypto.ErrHeaderCorrupt
	}
	h.KEK = crypto.KeyRef{Provider: string(prov), Name: string(name), Version: le.Uint32(rest)}
	rest = rest[4:]
	for i := range h.DEK {
		f, ok := field()
		if !ok {
			return nil, crypto.ErrHeaderCorrupt
		}
		if len(f) > 0 {
			h.DEK[i] = append([]byte(nil), f...)
		}
	}
	if len(rest) != 0 || h.Active > 1 || len(h.DEK[h.Active]) == 0 {
		return nil, crypto.ErrHeaderCorrupt
	}
	for _, x := range b[50:56] {
		if x != 0 {
			return nil, crypto.ErrHeaderCorrupt
		}
	}
	if h.ChunkSize != crypto.ChunkSize || h.Suite > crypto.ChaCha20Poly1305 || h.Size == 0 ||
		h.Size%crypto.ChunkSize != 0 || h.Size/crypto.ChunkSize > 1<<32 {
		return nil, crypto.ErrHeaderCorrupt
	}
	return h, nil
}

// VerifyHeaderMAC checks the MAC of a header block that ParseHeader
// accepted.
func VerifyHeaderMAC(b, macKey []byte) error {
	n := int(binary.LittleEndian.Uint16(b[10:]))
	m := hmac.New(sha256.New, macKey)
	m.Write(b[:n-32])
	if !hmac.Equal(m.Sum(nil), b[n-32:n]) {
		return crypto.ErrHeaderAuth
	}
	return nil
}

// PickHeader chooses between the two header copies as the format-1
// release did: the valid one (magic, version, CRC) with the higher
// generation. which is 0 for copy A, 1 for copy B.
func PickHeader(a, b []byte) (h *Header, which int, err error) {
	ha, errA := ParseHeader(a)
	hb, errB := ParseHeader(b)
	switch {
	case errA != nil && errB != nil:
		if errors.Is(errA, crypto.ErrBadMagic) && errors.Is(errB, crypto.ErrBadMagic) {
			return nil, 0, crypto.ErrBadMagic
		}
		for _, e := range []error{errA, errB} {
			if errors.Is(e, crypto.ErrUnsupportedVersion) {
				return nil, 0, e
			}
		}
		return nil, 0, fmt.Errorf("%w: neither copy is valid (A: %v; B: %v)", crypto.ErrHeaderCorrupt, errA, errB)
	case errB != nil || (errA == nil && ha.Generation >= hb.Generation):
		return ha, 0, nil
	default:
		return hb, 1, nil
	}
}
