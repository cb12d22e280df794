package crypto

import (
	"bytes"
	"encoding/hex"
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"

	"github.com/minio/sio"
)

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// TestSioCompatibility proves both ways that a chunk is a DARE 2.0 stream:
// what we seal, sio.DecryptBuffer opens; what sio seals with the same
// nonce is byte for byte what we seal, and we open it.
func TestSioCompatibility(t *testing.T) {
	for _, suite := range []byte{AES256GCM, ChaCha20Poly1305} {
		for _, size := range []int{1, 15, 16, 17, 4095, 4096} {
			for _, idx := range []uint32{0, 1, 0xfffffffe, 0xffffffff} {
				s, err := NewSealer(testKey(7), suite)
				if err != nil {
					t.Fatal(err)
				}
				pt := bytes.Repeat([]byte{byte(size), byte(idx)}, size)[:size]
				cfg := sio.Config{Key: testKey(7), MinVersion: sio.Version20, MaxVersion: sio.Version20,
					CipherSuites: []byte{suite}, SequenceNumber: idx}

				pkg, err := s.Seal(nil, idx, pt)
				if err != nil {
					t.Fatal(err)
				}
				if len(pkg) != HeaderSize+size+TagSize {
					t.Fatalf("package is %d bytes", len(pkg))
				}
				got, err := sio.DecryptBuffer(nil, pkg, cfg)
				if err != nil || !bytes.Equal(got, pt) {
					t.Fatalf("suite %d size %d idx %d: sio cannot open our chunk: %v", suite, size, idx, err)
				}

				nonce := [12]byte{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, byte(size)}
				cfg.Nonce = &nonce
				var enc bytes.Buffer
				if _, err := sio.Encrypt(&enc, bytes.NewReader(pt), cfg); err != nil {
					t.Fatal(err)
				}
				theirs := enc.Bytes()
				ours := s.sealWithNonce(nil, idx, pt, nonce)
				if !bytes.Equal(ours, theirs) {
					t.Fatalf("suite %d size %d idx %d: sio sealed other bytes", suite, size, idx)
				}
				opened, err := s.Open(nil, idx, theirs)
				if err != nil || !bytes.Equal(opened, pt) {
					t.Fatalf("cannot open sio's chunk: %v", err)
				}
			}
		}
	}
}

// vectorFile checks got against the hex test vector at path (written
// anew when GOLDILOCKS_UPDATE_VECTORS is set) and returns the vector.
func vectorFile(t *testing.T, got []byte, path string) []byte {
	t.Helper()
	if os.Getenv("GOLDILOCKS_UPDATE_VECTORS") != "" {
		if err := os.WriteFile(path, []byte(hex.EncodeToString(got)+"\n"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	want, err := hex.DecodeString(strings.TrimSpace(string(raw)))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: the encoding changed at byte %d: the format is fixed", path, firstDiff(got, want))
	}
	return want
}

// TestChunkVector pins the format with a fixed test vector.
func TestChunkVector(t *testing.T) {
	s, _ := NewSealer(testKey(0x42), AES256GCM)
	pt := bytes.Repeat([]byte("goldilocks chunk"), ChunkSize/16)
	pkg := s.sealWithNonce(nil, 7, pt, [12]byte{0: 0x01, 11: 0xff})
	want := vectorFile(t, pkg, "testdata/chunk-aes256gcm-idx7.hex")
	if got, err := s.Open(nil, 7, want); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("vector does not open: %v", err)
	}
}

// TestTamper flips every bit of a package, moves it to other indexes and
// opens it with another key: each must fail.
func TestTamper(t *testing.T) {
	s, _ := NewSealer(testKey(1), AES256GCM)
	other, _ := NewSealer(testKey(2), AES256GCM)
	pt := bytes.Repeat([]byte{0xa5}, ChunkSize)
	pkg, _ := s.Seal(nil, 100, pt)
	for i := range pkg {
		for bit := 0; bit < 8; bit++ {
			bad := bytes.Clone(pkg)
			bad[i] ^= 1 << bit
			if _, err := s.Open(nil, 100, bad); !errors.Is(err, ErrChunkAuth) {
				t.Fatalf("flipped bit %d of byte %d: %v", bit, i, err)
			}
		}
	}
	for _, idx := range []uint32{0, 99, 101, 100 | 1<<31} {
		if _, err := s.Open(nil, idx, pkg); !errors.Is(err, ErrChunkAuth) {
			t.Fatalf("chunk 100 opened as chunk %d: %v", idx, err)
		}
	}
	if _, err := other.Open(nil, 100, pkg); !errors.Is(err, ErrChunkAuth) {
		t.Fatalf("opened with another volume's key: %v", err)
	}
	if _, err := s.Open(nil, 100, pkg[:len(pkg)-1]); !errors.Is(err, ErrChunkAuth) {
		t.Fatalf("truncated package: %v", err)
	}
	a, _ := s.Seal(nil, 100, pt)
	if bytes.Equal(a[:HeaderSize], pkg[:HeaderSize]) {
		t.Fatal("two seals of one chunk used the same nonce")
	}
}

// TestOpenInPlace: the fixed vector opens where it lies, with its header
// and tag apart, as Open opens it whole; a flipped bit anywhere, another
// index or another key fails with ErrChunkAuth and clears the chunk.
func TestOpenInPlace(t *testing.T) {
	s, _ := NewSealer(testKey(0x42), AES256GCM)
	other, _ := NewSealer(testKey(2), AES256GCM)
	pt := bytes.Repeat([]byte("goldilocks chunk"), ChunkSize/16)
	b, err := os.ReadFile("testdata/chunk-aes256gcm-idx7.hex")
	if err != nil {
		t.Fatal(err)
	}
	pkg, err := hex.DecodeString(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	hdr, ct, tag := pkg[:HeaderSize], pkg[HeaderSize:HeaderSize+ChunkSize], pkg[HeaderSize+ChunkSize:]
	open := func(s *Sealer, ct, hdr, tag []byte, idx uint32) ([]byte, error) {
		buf := append(bytes.Clone(ct), make([]byte, TagSize)...)
		err := s.OpenInPlace(buf, ChunkSize, idx, hdr, tag)
		return buf[:ChunkSize], err
	}
	if got, err := open(s, ct, hdr, tag, 7); err != nil || !bytes.Equal(got, pt) {
		t.Fatalf("the vector does not open in place: %v", err)
	}
	fails := func(name string, got []byte, err error) {
		t.Helper()
		if !errors.Is(err, ErrChunkAuth) {
			t.Fatalf("%s: %v, want ErrChunkAuth", name, err)
		}
		if !bytes.Equal(got, make([]byte, ChunkSize)) {
			t.Fatalf("%s: the chunk was not cleared", name)
		}
	}
	for i := range pkg {
		bad := bytes.Clone(pkg)
		bad[i] ^= 1 << (i % 8)
		got, err := open(s, bad[HeaderSize:HeaderSize+ChunkSize], bad[:HeaderSize], bad[HeaderSize+ChunkSize:], 7)
		fails(fmt.Sprintf("byte %d flipped", i), got, err)
	}
	got, err := open(s, ct, hdr, tag, 8)
	fails("as chunk 8", got, err)
	got, err = open(other, ct, hdr, tag, 7)
	fails("another key", got, err)
}

func BenchmarkSeal4K(b *testing.B) {
	for _, suite := range []struct {
		name string
		id   byte
	}{{"aes256gcm", AES256GCM}, {"chacha20poly1305", ChaCha20Poly1305}} {
		s, _ := NewSealer(testKey(3), suite.id)
		pt := make([]byte, ChunkSize)
		dst := make([]byte, 0, PackageSize)
		pkg, _ := s.Seal(nil, 1, pt)
		out := make([]byte, 0, ChunkSize)
		b.Run("seal/"+suite.name, func(b *testing.B) {
			b.SetBytes(ChunkSize)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				dst, _ = s.Seal(dst[:0], uint32(i), pt)
			}
		})
		b.Run("open/"+suite.name, func(b *testing.B) {
			b.SetBytes(ChunkSize)
			b.ReportAllocs()
			for i := 0; i < b.N; i++ {
				if _, err := s.Open(out[:0], 1, pkg); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
