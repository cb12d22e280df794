package crypto

import (
	"bytes"
	"context"
	"crypto/hkdf"
	"crypto/hmac"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"sync"

	"goldilocks/audit"
	"goldilocks/crypto/cowmap"
	"goldilocks/internal/block"
)

// Volume header constants (FORMAT.md, "Volume header"). Part of the
// on-disk format.
const (
	HeaderMagic     = "GLDLVOL\x00"
	HeaderVersion   = 2
	HeaderBlockSize = 4096 // each of the two copies
	headerFixedSize = 192  // up to the variable-length fields
	headerTrailer   = 4 + 32
	maxFieldLen     = 1024
	infoHeaderMAC   = "goldilocks header v2"
	infoLogMAC      = "goldilocks map log v2"
	flagOpen        = 1 << 0
	flagLogData     = 1 << 1
	flagReseed      = 1 << 2
)

// Header errors callers branch on.
var (
	ErrBadMagic           = errors.New("crypto: not a Goldilocks volume (bad magic)")
	ErrUnsupportedVersion = errors.New("crypto: unsupported volume format version")
	ErrHeaderCorrupt      = errors.New("crypto: volume header is corrupt")
	ErrHeaderAuth         = errors.New("crypto: volume header failed authentication (wrong key or tampering)")
	// ErrNeedsUpgrade: the store holds a format-1 volume, which this build
	// does not attach (its map is not authenticated): `volume upgrade`.
	ErrNeedsUpgrade = errors.New("crypto: volume is in format 1, which has no authenticated map: run goldilocks volume upgrade")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// KeyRef names the key-encryption key that wraps a data key.
type KeyRef struct {
	Provider string
	Name     string
	Version  uint32
}

// Header is the decoded volume header (format 2).
type Header struct {
	Generation  uint64
	UUID        [16]byte
	Size        uint64 // logical size in bytes
	ChunkSize   uint32
	Suite       byte
	Active      byte // DEK slot whose DEK keys the header MAC and the log
	Open        bool // attached and not cleanly detached
	LogData     bool // the log may hold chunk data (FORMAT.md, "Small writes into the log")
	Reseed      bool // a commit's first log block may chain to a reseed (FORMAT.md, "Log block")
	Seq         uint64
	LogBlocks   uint32
	LogStart    uint64
	RekeyCursor uint64
	Epoch       uint32 // seal epoch (FORMAT.md, "Nonces")
	EpochSeals  uint64 // seals in Epoch; exact when !Open
	Root        cowmap.Ref
	KEK         KeyRef
	DEK         [2][]byte // wrapped DEKs by slot; empty when unused
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

// MapState is the checkpoint the header holds.
func (h *Header) MapState() cowmap.State {
	return cowmap.State{Seq: h.Seq, Root: h.Root, LogStart: h.LogStart}
}

// Seals is an upper bound of the chunks sealed since the volume's first
// epoch: full epochs count 2^31 each.
func (h *Header) Seals() uint64 { return uint64(h.Epoch)*epochLimit + h.EpochSeals }

func volumeKey(dek []byte, uuid [16]byte, info string) ([]byte, error) {
	return hkdf.Key(sha256.New, dek, uuid[:], info, 32)
}

// HeaderMACKey derives the header's MAC key from the active data key.
func HeaderMACKey(dek []byte, uuid [16]byte) ([]byte, error) {
	return volumeKey(dek, uuid, infoHeaderMAC)
}

// Marshal encodes h into one 4096-byte header block, MACed with macKey.
func (h *Header) Marshal(macKey []byte) ([]byte, error) {
	b := make([]byte, headerFixedSize, HeaderBlockSize)
	le := binary.LittleEndian
	copy(b[0:8], HeaderMagic)
	le.PutUint16(b[8:], HeaderVersion)
	le.PutUint64(b[12:], h.Generation)
	copy(b[20:36], h.UUID[:])
	le.PutUint64(b[36:], h.Size)
	le.PutUint32(b[44:], h.ChunkSize)
	b[48] = h.Suite
	b[49] = h.Active
	if h.Open {
		b[50] |= flagOpen
	}
	if h.LogData {
		b[50] |= flagLogData
	}
	if h.Reseed {
		b[50] |= flagReseed
	}
	le.PutUint64(b[56:], h.Seq)
	le.PutUint32(b[64:], h.LogBlocks)
	le.PutUint64(b[72:], h.LogStart)
	le.PutUint64(b[80:], h.RekeyCursor)
	le.PutUint32(b[88:], h.Epoch)
	le.PutUint64(b[96:], h.EpochSeals)
	h.Root.Marshal(b[104:152])
	for _, f := range [][]byte{[]byte(h.KEK.Provider), []byte(h.KEK.Name)} {
		if len(f) > maxFieldLen {
			return nil, fmt.Errorf("crypto: header field of %d bytes is too long", len(f))
		}
		b = le.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	b = le.AppendUint32(b, h.KEK.Version)
	if h.Active > 1 || len(h.DEK[h.Active]) == 0 {
		return nil, fmt.Errorf("crypto: header's active DEK slot %d is empty", h.Active)
	}
	for _, f := range h.DEK {
		if len(f) > maxFieldLen {
			return nil, fmt.Errorf("crypto: wrapped key of %d bytes is too long", len(f))
		}
		b = le.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	n := len(b) + headerTrailer
	le.PutUint16(b[10:], uint16(n))
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))
	m := hmac.New(sha256.New, macKey)
	m.Write(b)
	b = m.Sum(b)
	return b[:HeaderBlockSize], nil // zero padding to the block
}

// HeaderFormat returns the format version a header block claims, after
// checking its magic.
func HeaderFormat(b []byte) (uint16, error) {
	if len(b) < 10 || string(b[0:8]) != HeaderMagic {
		return 0, ErrBadMagic
	}
	return binary.LittleEndian.Uint16(b[8:]), nil
}

// ParseHeader decodes a header block and checks its magic, version and
// checksum. It does not check the MAC, which needs the data key that the
// header itself carries wrapped: call VerifyHeaderMAC after unwrapping.
func ParseHeader(b []byte) (*Header, error) {
	if len(b) < headerFixedSize+headerTrailer {
		return nil, ErrHeaderCorrupt
	}
	v, err := HeaderFormat(b)
	if err != nil {
		return nil, err
	}
	switch {
	case v == 1:
		return nil, ErrNeedsUpgrade
	case v != HeaderVersion:
		return nil, fmt.Errorf("%w: %d (this build reads %d)", ErrUnsupportedVersion, v, HeaderVersion)
	}
	le := binary.LittleEndian
	n := int(le.Uint16(b[10:]))
	if n < headerFixedSize+headerTrailer || n > len(b) || n > HeaderBlockSize {
		return nil, ErrHeaderCorrupt
	}
	body := b[:n-headerTrailer]
	if crc32.Checksum(body, castagnoli) != le.Uint32(b[n-headerTrailer:]) {
		return nil, ErrHeaderCorrupt
	}
	h := &Header{
		Generation:  le.Uint64(b[12:]),
		Size:        le.Uint64(b[36:]),
		ChunkSize:   le.Uint32(b[44:]),
		Suite:       b[48],
		Active:      b[49],
		Open:        b[50]&flagOpen != 0,
		LogData:     b[50]&flagLogData != 0,
		Reseed:      b[50]&flagReseed != 0,
		Seq:         le.Uint64(b[56:]),
		LogBlocks:   le.Uint32(b[64:]),
		LogStart:    le.Uint64(b[72:]),
		RekeyCursor: le.Uint64(b[80:]),
		Epoch:       le.Uint32(b[88:]),
		EpochSeals:  le.Uint64(b[96:]),
		Root:        cowmap.ParseRef(b[104:152]),
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
		return nil, ErrHeaderCorrupt
	}
	h.KEK = KeyRef{Provider: string(prov), Name: string(name), Version: le.Uint32(rest)}
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
	if len(rest) != 0 || h.Active > 1 || len(h.DEK[h.Active]) == 0 || b[50]&^(flagOpen|flagLogData|flagReseed) != 0 {
		return nil, ErrHeaderCorrupt
	}
	for _, r := range [][]byte{b[51:56], b[68:72], b[92:96], b[152:192]} {
		for _, x := range r {
			if x != 0 {
				return nil, ErrHeaderCorrupt
			}
		}
	}
	if h.ChunkSize != ChunkSize || h.Suite > ChaCha20Poly1305 || h.Size == 0 || h.Size%ChunkSize != 0 ||
		h.Size/ChunkSize > cowmap.MaxChunks || h.LogBlocks < 4 || uint64(h.LogBlocks) <= h.LogStart || h.Root.Loc > cowmap.HomeB {
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

// PickHeader chooses, without keys, the copy to try first: the valid one
// with the higher generation. which is 0 for copy A, 1 for copy B.
func PickHeader(a, b []byte) (h *Header, which int, err error) {
	ha, errA := ParseHeader(a)
	hb, errB := ParseHeader(b)
	switch {
	case errA != nil && errB != nil:
		if errors.Is(errA, ErrBadMagic) && errors.Is(errB, ErrBadMagic) {
			return nil, 0, ErrBadMagic
		}
		for _, e := range []error{errA, errB} {
			if errors.Is(e, ErrNeedsUpgrade) || errors.Is(e, ErrUnsupportedVersion) {
				return nil, 0, e
			}
		}
		return nil, 0, fmt.Errorf("%w: neither copy is valid (A: %v; B: %v)", ErrHeaderCorrupt, errA, errB)
	case errB != nil || (errA == nil && ha.Generation >= hb.Generation):
		return ha, 0, nil
	default:
		return hb, 1, nil
	}
}

// headerOf reads the header, unwraps the active DEK and checks the MAC. A
// copy that fails to parse or to verify while the other one is good is an
// integrity warning (normal after a crash during an update).
func headerOf(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (*Header, []byte, error) {
	var ab [2 * HeaderBlockSize]byte
	if _, err := store.ReadAt(ab[:], 0); err != nil {
		return nil, nil, fmt.Errorf("volume %s: reading the header: %w", name, err)
	}
	copies := [2][]byte{ab[:HeaderBlockSize], ab[HeaderBlockSize:]}
	h, which, err := PickHeader(copies[0], copies[1])
	if errors.Is(err, ErrNeedsUpgrade) {
		return nil, nil, fmt.Errorf("volume %s: %w %s", name, err, name)
	}
	if err != nil {
		return nil, nil, fmt.Errorf("volume %s: %w", name, err)
	}
	var firstErr error
	for try := 0; try < 2; try++ {
		if try == 1 {
			which = 1 - which
			if h, err = ParseHeader(copies[which]); err != nil {
				break
			}
		}
		dek, err := openHeader(ctx, h, copies[which], name, uuid, kek)
		if err == nil {
			// The other copy is the same bytes, or an older valid header
			// (a crash between the two writes of an update); anything
			// else is damage.
			if other := copies[1-which]; !bytes.Equal(other, copies[which]) {
				oh, perr := ParseHeader(other)
				mac, merr := HeaderMACKey(dek, uuid)
				if perr != nil || merr != nil || VerifyHeaderMAC(other, mac) != nil || oh.Generation > h.Generation {
					log.Warn("integrity warning: a volume header copy is damaged or stale; using the other", "event", audit.EvIntegrityWarning,
						"volume", name, "copy", "AB"[1-which:2-which])
				}
			}
			return h, dek, nil
		}
		if firstErr == nil {
			firstErr = err
		}
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			break
		}
	}
	return nil, nil, firstErr
}

func openHeader(ctx context.Context, h *Header, raw []byte, name string, uuid [16]byte, kek KEKProvider) ([]byte, error) {
	if h.UUID != uuid {
		return nil, fmt.Errorf("volume %s: %w", name, ErrWrongVolume)
	}
	if h.KEK.Provider != kek.Name() {
		return nil, fmt.Errorf("volume %s: its key is in provider %q, not %q", name, h.KEK.Provider, kek.Name())
	}
	dek, err := kek.Unwrap(ctx, h.KEK, uuid, h.DEK[h.Active])
	if err != nil {
		return nil, fmt.Errorf("volume %s: unwrapping the data key (%s key %s v%d): %w", name, h.KEK.Provider, h.KEK.Name, h.KEK.Version, err)
	}
	mac, err := HeaderMACKey(dek, uuid)
	if err == nil {
		err = VerifyHeaderMAC(raw, mac)
	}
	if err != nil {
		clear(dek)
		return nil, fmt.Errorf("volume %s: %w", name, err)
	}
	return dek, nil
}

// headerState is a volume's current header.
type headerState struct {
	mu     sync.Mutex // guards the fields below; serialises header writes
	store  block.Device
	name   string
	hdr    *Header
	macKey []byte
	onFail func(error) // a flush failed: what the store holds is unknown
}

// writeLocked writes h to both header copies, each followed by a flush,
// so that neither copy is ever older than what the store's log and nodes
// still hold (FORMAT.md, "Volume header").
func (s *headerState) writeLocked(h *Header) error {
	h.Generation = s.hdr.Generation + 1
	b, err := h.Marshal(s.macKey)
	if err != nil {
		return err
	}
	for c := 0; c < 2; c++ {
		if _, err := s.store.WriteAt(b, int64(c)*HeaderBlockSize); err != nil {
			return fmt.Errorf("volume %s: writing the header: %w", s.name, err)
		}
		if err := s.store.Flush(); err != nil {
			if s.onFail != nil {
				s.onFail(err)
			}
			return fmt.Errorf("volume %s: syncing the header: %w: %w", s.name, ErrVolumeFailed, err)
		}
	}
	s.hdr = h
	return nil
}

// CheckKey reads the header of the volume in store, unwraps its data key
// through kek and checks the header's MAC: what `volume adopt` asks before
// a gateway takes a volume it did not create. It returns the header.
func CheckKey(ctx context.Context, store block.Device, name string, uuid [16]byte, kek KEKProvider, log *slog.Logger) (*Header, error) {
	h, dek, err := headerOf(ctx, store, name, uuid, kek, log)
	clear(dek)
	return h, err
}
