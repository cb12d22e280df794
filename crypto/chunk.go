package crypto

import (
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"sync"

	"golang.org/x/crypto/chacha20poly1305"
)

// Constants of the chunk format (FORMAT.md, "Chunks are DARE 2.0
// packages"). Part of the on-disk format.
const (
	ChunkSize   = 4096
	HeaderSize  = 16 // DARE 2.0 package header
	TagSize     = 16 // AEAD tag
	PackageSize = HeaderSize + ChunkSize + TagSize

	dareVersion20 = 0x20
	finalFlag     = 0x80 // top bit of the nonce's first byte: last package of a stream
)

// Cipher suites, DARE's identifiers.
const (
	AES256GCM        byte = 0x00
	ChaCha20Poly1305 byte = 0x01
)

// ErrChunkAuth is returned when a chunk fails authentication: tampered,
// moved to another index, copied from another volume, or read with the
// wrong key. The output is zeroed, as crypto/cipher does.
var ErrChunkAuth = errors.New("crypto: chunk authentication failed")

// Sealer seals and opens chunks as DARE 2.0 streams of one final package
// whose sequence number is the chunk index, with a fresh random nonce per
// seal. It is safe for concurrent use and allocates nothing per call.
type Sealer struct {
	aead  cipher.AEAD
	suite byte
	// scratch holds *nonces: nonces passed to the AEAD interface escape,
	// so they live in pooled memory rather than on the stack.
	scratch sync.Pool
}

type nonces struct{ stream, aead [12]byte }

// NewSealer returns a Sealer for a 256-bit key and a cipher suite.
func NewSealer(key []byte, suite byte) (*Sealer, error) {
	if len(key) != 32 {
		return nil, fmt.Errorf("crypto: key is %d bytes, want 32", len(key))
	}
	var (
		aead cipher.AEAD
		err  error
	)
	switch suite {
	case AES256GCM:
		var b cipher.Block
		if b, err = aes.NewCipher(key); err == nil {
			aead, err = cipher.NewGCM(b)
		}
	case ChaCha20Poly1305:
		aead, err = chacha20poly1305.New(key)
	default:
		return nil, fmt.Errorf("crypto: unknown cipher suite %#x", suite)
	}
	if err != nil {
		return nil, err
	}
	return &Sealer{aead: aead, suite: suite, scratch: sync.Pool{New: func() any { return new(nonces) }}}, nil
}

// Seal appends the package of chunk idx holding plaintext (1 to 4096
// bytes; a chunk is 4096) to dst: header ‖ ciphertext ‖ tag.
func (s *Sealer) Seal(dst []byte, idx uint32, plaintext []byte) ([]byte, error) {
	n := s.scratch.Get().(*nonces)
	defer s.scratch.Put(n)
	if _, err := rand.Read(n.stream[:]); err != nil {
		return dst, fmt.Errorf("crypto: nonce: %w", err)
	}
	return s.seal(dst, idx, plaintext, n), nil
}

// sealWithNonce is Seal with a given nonce (test vectors; never reuse one).
func (s *Sealer) sealWithNonce(dst []byte, idx uint32, plaintext []byte, nonce [12]byte) []byte {
	return s.seal(dst, idx, plaintext, &nonces{stream: nonce})
}

func (s *Sealer) seal(dst []byte, idx uint32, plaintext []byte, n *nonces) []byte {
	if len(plaintext) == 0 || len(plaintext) > ChunkSize {
		panic("crypto: chunk plaintext must be 1 to 4096 bytes")
	}
	n.stream[0] |= finalFlag
	start := len(dst)
	dst = append(dst, dareVersion20, s.suite, 0, 0)
	binary.LittleEndian.PutUint16(dst[start+2:], uint16(len(plaintext)-1))
	dst = append(dst, n.stream[:]...)
	aeadNonce(&n.aead, &n.stream, idx)
	return s.aead.Seal(dst, n.aead[:], plaintext, dst[start:start+4])
}

// Open appends the plaintext of package pkg, which must be chunk idx, to
// dst. Any mismatch is ErrChunkAuth.
func (s *Sealer) Open(dst []byte, idx uint32, pkg []byte) ([]byte, error) {
	if len(pkg) <= HeaderSize+TagSize || len(pkg) > PackageSize {
		return dst, ErrChunkAuth
	}
	h := pkg[:HeaderSize]
	if h[0] != dareVersion20 || h[1] != s.suite || h[4]&finalFlag == 0 ||
		int(binary.LittleEndian.Uint16(h[2:]))+1 != len(pkg)-HeaderSize-TagSize {
		return dst, ErrChunkAuth
	}
	n := s.scratch.Get().(*nonces)
	defer s.scratch.Put(n)
	copy(n.stream[:], h[4:])
	aeadNonce(&n.aead, &n.stream, idx)
	out, err := s.aead.Open(dst, n.aead[:], pkg[HeaderSize:], h[:4])
	if err != nil {
		return dst, ErrChunkAuth
	}
	return out, nil
}

// OpenInPlace opens chunk idx where its ciphertext lies, in ct[:n], given
// its DARE header hdr and tag apart: the tag is put at ct[n:n+TagSize],
// which must be spare (the caller keeps what it held), and the plaintext
// replaces the ciphertext. No copy of the chunk is made. Any mismatch is
// ErrChunkAuth, and ct[:n] is then cleared.
func (s *Sealer) OpenInPlace(ct []byte, n int, idx uint32, hdr, tag []byte) error {
	if n <= 0 || n > ChunkSize || len(ct) < n+TagSize || len(hdr) != HeaderSize || len(tag) != TagSize {
		panic("crypto: OpenInPlace: bad sizes")
	}
	if hdr[0] != dareVersion20 || hdr[1] != s.suite || hdr[4]&finalFlag == 0 ||
		int(binary.LittleEndian.Uint16(hdr[2:]))+1 != n {
		clear(ct[:n])
		return ErrChunkAuth
	}
	copy(ct[n:], tag)
	nn := s.scratch.Get().(*nonces)
	defer s.scratch.Put(nn)
	copy(nn.stream[:], hdr[4:])
	aeadNonce(&nn.aead, &nn.stream, idx)
	if _, err := s.aead.Open(ct[:0], nn.aead[:], ct[:n+TagSize], hdr[:4]); err != nil {
		clear(ct[:n])
		return ErrChunkAuth
	}
	return nil
}

// aeadNonce is DARE 2.0's per-package nonce: the stream nonce with the
// sequence number XORed into its last four bytes.
func aeadNonce(out, stream *[12]byte, seq uint32) {
	*out = *stream
	binary.LittleEndian.PutUint32(out[8:], binary.LittleEndian.Uint32(out[8:])^seq)
}

// SealChunk seals pt (1 to 4096 bytes) as chunk idx with a fresh random
// nonce, the package split as it is stored: the DARE header into hdr, the
// ciphertext and then the tag into out, which must have room for
// len(pt)+TagSize bytes. It allocates nothing.
func (s *Sealer) SealChunk(out []byte, hdr *[HeaderSize]byte, idx uint32, pt []byte) error {
	if len(pt) == 0 || len(pt) > ChunkSize || cap(out) < len(pt)+TagSize {
		panic("crypto: SealChunk: bad sizes")
	}
	n := s.scratch.Get().(*nonces)
	defer s.scratch.Put(n)
	if _, err := rand.Read(n.stream[:]); err != nil {
		return fmt.Errorf("crypto: nonce: %w", err)
	}
	n.stream[0] |= finalFlag
	hdr[0], hdr[1] = dareVersion20, s.suite
	binary.LittleEndian.PutUint16(hdr[2:], uint16(len(pt)-1))
	copy(hdr[4:], n.stream[:])
	aeadNonce(&n.aead, &n.stream, idx)
	s.aead.Seal(out[:0], n.aead[:], pt, hdr[:4])
	return nil
}
