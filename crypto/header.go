package crypto

import (
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
)

// Volume header constants (FORMAT.md, "Volume header"). Part of the
// on-disk format.
const (
	HeaderMagic     = "GLDLVOL\x00"
	HeaderVersion   = 1
	HeaderBlockSize = 4096 // each of the two copies
	headerFixedSize = 96   // up to the variable-length fields
	headerTrailer   = 4 + 32
	maxFieldLen     = 1024
	macInfo         = "goldilocks header v1"
)

// Header errors callers branch on.
var (
	ErrBadMagic           = errors.New("crypto: not a Goldilocks volume (bad magic)")
	ErrUnsupportedVersion = errors.New("crypto: unsupported volume format version")
	ErrHeaderCorrupt      = errors.New("crypto: volume header is corrupt")
	ErrHeaderAuth         = errors.New("crypto: volume header failed authentication (wrong key or tampering)")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// KeyRef names the key-encryption key that wraps a data key.
type KeyRef struct {
	Provider string
	Name     string
	Version  uint32
}

// Header is the decoded volume header.
type Header struct {
	Generation    uint64
	UUID          [16]byte
	Size          uint64 // logical size in bytes
	ChunkSize     uint32
	Suite         byte
	Slots         uint64
	MapOffset     uint64
	SlotOffset    uint64
	NonceReserved uint64
	RekeyCursor   uint64
	KEK           KeyRef
	// Active is the DEK slot (0 or 1) whose DEK is the volume's key and
	// keys the header MAC; during a rekey the other slot holds the new DEK.
	Active byte
	DEK    [2][]byte // wrapped DEKs by slot; empty when unused
}

// Rekeying reports whether a rekey is in progress: both slots hold a DEK.
func (h *Header) Rekeying() bool { return len(h.DEK[0]) > 0 && len(h.DEK[1]) > 0 }

// Clone returns a deep copy.
func (h *Header) Clone() *Header {
	c := *h
	for i := range c.DEK {
		c.DEK[i] = append([]byte(nil), h.DEK[i]...)
	}
	return &c
}

// HeaderMACKey derives the header's MAC key from the volume's data key.
func HeaderMACKey(dek []byte, uuid [16]byte) ([]byte, error) {
	return hkdf.Key(sha256.New, dek, uuid[:], macInfo, 32)
}

// Marshal encodes h into one 4096-byte header block, MACed with macKey.
func (h *Header) Marshal(macKey []byte) ([]byte, error) {
	b := make([]byte, headerFixedSize, HeaderBlockSize)
	copy(b[0:8], HeaderMagic)
	binary.LittleEndian.PutUint16(b[8:], HeaderVersion)
	binary.LittleEndian.PutUint64(b[12:], h.Generation)
	copy(b[20:36], h.UUID[:])
	binary.LittleEndian.PutUint64(b[36:], h.Size)
	binary.LittleEndian.PutUint32(b[44:], h.ChunkSize)
	b[48] = h.Suite
	b[49] = h.Active
	binary.LittleEndian.PutUint64(b[56:], h.Slots)
	binary.LittleEndian.PutUint64(b[64:], h.MapOffset)
	binary.LittleEndian.PutUint64(b[72:], h.SlotOffset)
	binary.LittleEndian.PutUint64(b[80:], h.NonceReserved)
	binary.LittleEndian.PutUint64(b[88:], h.RekeyCursor)
	for _, f := range [][]byte{[]byte(h.KEK.Provider), []byte(h.KEK.Name)} {
		if len(f) > maxFieldLen {
			return nil, fmt.Errorf("crypto: header field of %d bytes is too long", len(f))
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	b = binary.LittleEndian.AppendUint32(b, h.KEK.Version)
	if h.Active > 1 || len(h.DEK[h.Active]) == 0 {
		return nil, fmt.Errorf("crypto: header's active DEK slot %d is empty", h.Active)
	}
	for _, f := range h.DEK {
		if len(f) > maxFieldLen {
			return nil, fmt.Errorf("crypto: wrapped key of %d bytes is too long", len(f))
		}
		b = binary.LittleEndian.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	n := len(b) + headerTrailer
	binary.LittleEndian.PutUint16(b[10:], uint16(n))
	b = binary.LittleEndian.AppendUint32(b, crc32.Checksum(b, castagnoli))
	m := hmac.New(sha256.New, macKey)
	m.Write(b)
	b = m.Sum(b)
	return b[:HeaderBlockSize], nil // zero padding to the block
}

// ParseHeader decodes a header block and checks its magic, version and
// checksum. It does not check the MAC, which needs the data key that the
// header itself carries wrapped: call VerifyHeaderMAC after unwrapping.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < headerFixedSize+headerTrailer {
		return nil, ErrHeaderCorrupt
	}
	if string(b[0:8]) != HeaderMagic {
		return nil, ErrBadMagic
	}
	if v := binary.LittleEndian.Uint16(b[8:]); v != HeaderVersion {
		return nil, fmt.Errorf("%w: %d (this build reads %d)", ErrUnsupportedVersion, v, HeaderVersion)
	}
	n := int(binary.LittleEndian.Uint16(b[10:]))
	if n < headerFixedSize+headerTrailer || n > len(b) || n > HeaderBlockSize {
		return nil, ErrHeaderCorrupt
	}
	body := b[:n-headerTrailer]
	if crc32.Checksum(body, castagnoli) != binary.LittleEndian.Uint32(b[n-headerTrailer:]) {
		return nil, ErrHeaderCorrupt
	}
	h := &Header{
		Generation:    binary.LittleEndian.Uint64(b[12:]),
		Size:          binary.LittleEndian.Uint64(b[36:]),
		ChunkSize:     binary.LittleEndian.Uint32(b[44:]),
		Suite:         b[48],
		Active:        b[49],
		Slots:         binary.LittleEndian.Uint64(b[56:]),
		MapOffset:     binary.LittleEndian.Uint64(b[64:]),
		SlotOffset:    binary.LittleEndian.Uint64(b[72:]),
		NonceReserved: binary.LittleEndian.Uint64(b[80:]),
		RekeyCursor:   binary.LittleEndian.Uint64(b[88:]),
	}
	copy(h.UUID[:], b[20:36])
	rest := body[headerFixedSize:]
	field := func() ([]byte, bool) {
		if len(rest) < 2 {
			return nil, false
		}
		l := int(binary.LittleEndian.Uint16(rest))
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
		return nil, ErrHeaderCorrupt
	}
	h.KEK = KeyRef{Provider: string(prov), Name: string(name), Version: binary.LittleEndian.Uint32(rest)}
	rest = rest[4:]
	for i := range h.DEK {
		f, ok := field()
		if !ok {
			return nil, ErrHeaderCorrupt
		}
		if len(f) > 0 {
			h.DEK[i] = append([]byte(nil), f...)
		}
	}
	if len(rest) != 0 || h.Active > 1 || len(h.DEK[h.Active]) == 0 {
		return nil, ErrHeaderCorrupt
	}
	for _, x := range b[50:56] {
		if x != 0 {
			return nil, ErrHeaderCorrupt
		}
	}
	if h.ChunkSize != ChunkSize || h.Suite > ChaCha20Poly1305 || h.Size == 0 || h.Size%ChunkSize != 0 || h.Size/ChunkSize > 1<<32 {
		return nil, ErrHeaderCorrupt
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
		return ErrHeaderAuth
	}
	return nil
}

// PickHeader chooses between the two header copies: the valid one with the
// higher generation. which is 0 for copy A, 1 for copy B; the next update
// goes to the other.
func PickHeader(a, b []byte) (h *Header, which int, err error) {
	ha, errA := ParseHeader(a)
	hb, errB := ParseHeader(b)
	switch {
	case errA != nil && errB != nil:
		if errors.Is(errA, ErrBadMagic) && errors.Is(errB, ErrBadMagic) {
			return nil, 0, ErrBadMagic
		}
		if errors.Is(errA, ErrUnsupportedVersion) {
			return nil, 0, errA
		}
		return nil, 0, fmt.Errorf("%w: neither copy is valid (A: %v; B: %v)", ErrHeaderCorrupt, errA, errB)
	case errB != nil || (errA == nil && ha.Generation >= hb.Generation):
		return ha, 0, nil
	default:
		return hb, 1, nil
	}
}
