package v1

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"sync"
	"testing"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/internal/block"
)

// The format-1 data dir made by the format-1 release (its README.md).
const (
	dataDir  = "../../internal/volume/testdata/v1-datadir"
	volUUID  = "0e936870-30c1-40c0-b683-b80df2de8125"
	volName  = "v1vol"
	volSize  = 64 << 10
	volChunk = 16
)

func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, 32) }

// memDev is an in-memory block.Device.
type memDev struct {
	mu     sync.Mutex
	b      []byte
	closed bool
}

func (d *memDev) Size() int64 { return int64(len(d.b)) }
func (d *memDev) ReadAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !block.CheckRange(int64(len(d.b)), off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	return copy(p, d.b[off:]), nil
}
func (d *memDev) WriteAt(p []byte, off int64) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if !block.CheckRange(int64(len(d.b)), off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	return copy(d.b[off:], p), nil
}
func (d *memDev) Flush() error { return nil }
func (d *memDev) Close() error { d.closed = true; return nil }

// fixture is the format-1 store in memory and its keystore in a temp dir.
type fixture struct {
	img  []byte
	kek  *crypto.LocalKEK
	uuid [16]byte
	want string // SHA-256 of the plaintext, hex
}

func loadFixture(t testing.TB) *fixture {
	t.Helper()
	dir := t.TempDir()
	ks, err := os.ReadFile(filepath.Join(dataDir, "keystore.json"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "keystore.json"), ks, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(filepath.Join(dataDir, "v1vol.img.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	img, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(filepath.Join(dataDir, "plaintext.sha256"))
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{img: img, kek: crypto.NewLocalKEK(dir, nil), uuid: uuid.MustParse(volUUID), want: strings.Fields(string(sum))[0]}
}

func (fx *fixture) dev() *memDev { return &memDev{b: bytes.Clone(fx.img)} }

func (fx *fixture) open(t testing.TB, d block.Device) (*Volume, error) {
	t.Helper()
	return Open(context.Background(), d, volName, fx.uuid, fx.kek, nil)
}

// readAll reads the whole volume and returns its SHA-256 in hex.
func readAll(t testing.TB, v *Volume) string {
	t.Helper()
	buf := make([]byte, v.Size())
	if _, err := v.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(buf)
	return hex.EncodeToString(s[:])
}

// The real format-1 store opens and reads back the imported image (the
// import wrote it in one 1 MiB block: every chunk is mapped).
func TestOpenFormat1DataDir(t *testing.T) {
	fx := loadFixture(t)
	d := fx.dev()
	v, err := fx.open(t, d)
	if err != nil {
		t.Fatal(err)
	}
	if got := readAll(t, v); got != fx.want {
		t.Fatalf("plaintext SHA-256 %s, want %s", got, fx.want)
	}
	if v.Size() != volSize || v.Chunks() != volChunk || v.MappedChunks() != volChunk {
		t.Fatalf("size %d chunks %d mapped %d", v.Size(), v.Chunks(), v.MappedChunks())
	}
	for c := uint64(0); c < volChunk+2; c++ {
		if want := c < volChunk; v.Mapped(c) != want {
			t.Errorf("Mapped(%d) = %v, want %v", c, v.Mapped(c), want)
		}
	}
	h := v.Header()
	if h.UUID != fx.uuid || h.Size != volSize || h.Suite != crypto.AES256GCM || h.Rekeying() ||
		h.KEK != (crypto.KeyRef{Provider: "local", Name: "default", Version: 1}) {
		t.Fatalf("header %+v", h)
	}
	// Unaligned reads across chunk boundaries agree with the image.
	full := make([]byte, volSize)
	v.ReadAt(full, 0)
	for c := 0; c < volChunk; c++ {
		want := byte(0)
		if c%3 == 0 {
			want = byte(c + 1)
		}
		if full[c*4096] != want || full[c*4096+4095] != want {
			t.Fatalf("chunk %d reads %d, want %d", c, full[c*4096], want)
		}
	}
	for _, r := range [][2]int64{{1, 1}, {4095, 2}, {12287, 4099}, {100, 20000}, {volSize - 1, 1}} {
		p := make([]byte, r[1])
		if _, err := v.ReadAt(p, r[0]); err != nil || !bytes.Equal(p, full[r[0]:r[0]+r[1]]) {
			t.Fatalf("ReadAt(%d, %d): %v", r[0], r[1], err)
		}
	}
	if _, err := v.ReadAt(make([]byte, 2), volSize-1); !errors.Is(err, block.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
	if _, err := v.WriteAt(make([]byte, 4096), 0); !errors.Is(err, block.ErrReadOnly) {
		t.Fatalf("write: %v", err)
	}
	if !bytes.Equal(d.b, fx.img) {
		t.Fatal("the reader changed the store")
	}
	if err := v.Close(); err != nil || !d.closed {
		t.Fatalf("close: %v %v", err, d.closed)
	}
	if _, err := v.ReadAt(make([]byte, 4096), 0); !errors.Is(err, block.ErrClosed) {
		t.Fatalf("read after close: %v", err)
	}
}

// current returns which header copy (0 A, 1 B) is current and the map
// layout of the fixture.
func (fx *fixture) current(t testing.TB) (int, layout) {
	t.Helper()
	h, which, err := PickHeader(fx.img[:4096], fx.img[4096:8192])
	if err != nil {
		t.Fatal(err)
	}
	l, err := layoutOf(h)
	if err != nil {
		t.Fatal(err)
	}
	return which, l
}

func TestTamper(t *testing.T) {
	fx := loadFixture(t)
	which, l := fx.current(t)
	v, _ := fx.open(t, fx.dev())
	slot3 := v.cur[3].slot - 1
	v.Close()

	t.Run("chunk ciphertext", func(t *testing.T) {
		d := fx.dev()
		d.b[l.slotAt(slot3)+100] ^= 1
		v, err := fx.open(t, d)
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		p := make([]byte, 4096)
		_, err = v.ReadAt(p, 3*4096+10)
		if !errors.Is(err, crypto.ErrChunkAuth) || !strings.Contains(err.Error(), "volume v1vol chunk 3") {
			t.Fatalf("tampered chunk 3: %v", err)
		}
		if _, err := v.ReadAt(p, 6*4096); err != nil || p[0] != 7 {
			t.Fatalf("chunk 6 beside it: %v %d", err, p[0])
		}
	})
	t.Run("chunk moved", func(t *testing.T) {
		// Chunk 6's ciphertext and entry put where chunk 3's are: the
		// sequence number (the chunk index) no longer matches.
		d := fx.dev()
		v, _ := fx.open(t, d)
		e3, e6 := v.cur[3], v.cur[6]
		v.Close()
		copy(d.b[l.slotAt(e3.slot-1):][:4096], fx.img[l.slotAt(e6.slot-1):][:4096])
		v, _ = fx.open(t, d)
		v.cur[3].meta = e6.meta // as if the map page said so
		defer v.Close()
		if _, err := v.ReadAt(make([]byte, 4096), 3*4096); !errors.Is(err, crypto.ErrChunkAuth) {
			t.Fatalf("moved chunk: %v", err)
		}
	})
	t.Run("zero chunks unmapped", func(t *testing.T) {
		// A newer map page copy without the entries of the chunks that
		// hold zeros: they are unmapped and read as zeros.
		d := fx.dev()
		unmapZeroChunks(t, d.b, l)
		v, err := fx.open(t, d)
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		for c := uint64(0); c < volChunk; c++ {
			if v.Mapped(c) != (c%3 == 0) {
				t.Fatalf("Mapped(%d) = %v", c, v.Mapped(c))
			}
		}
		if v.MappedChunks() != 6 || readAll(t, v) != fx.want {
			t.Fatalf("%d mapped, or other data", v.MappedChunks())
		}
	})
	t.Run("header MAC", func(t *testing.T) {
		d := fx.dev()
		hb := d.b[which*4096:][:4096]
		hb[80] ^= 1 // the nonce reservation, CRC fixed: only the MAC tells
		n := int(binary.LittleEndian.Uint16(hb[10:]))
		binary.LittleEndian.PutUint32(hb[n-36:], crc32.Checksum(hb[:n-36], castagnoli))
		if _, err := fx.open(t, d); !errors.Is(err, crypto.ErrHeaderAuth) {
			t.Fatalf("header with a bad MAC: %v", err)
		}
	})
	t.Run("one header copy torn", func(t *testing.T) {
		d := fx.dev()
		d.b[which*4096+30] ^= 1
		v, err := fx.open(t, d)
		if err != nil {
			t.Fatal(err)
		}
		defer v.Close()
		if got := readAll(t, v); got != fx.want {
			t.Fatal("the older header copy reads other data")
		}
	})
	t.Run("both header copies torn", func(t *testing.T) {
		d := fx.dev()
		d.b[30] ^= 1
		d.b[4096+30] ^= 1
		if _, err := fx.open(t, d); !errors.Is(err, crypto.ErrHeaderCorrupt) {
			t.Fatalf("both copies torn: %v", err)
		}
	})
	t.Run("both map page copies torn", func(t *testing.T) {
		d := fx.dev()
		d.b[l.pageAt(0, 0)+200] ^= 1
		d.b[l.pageAt(0, 1)+200] ^= 1
		if _, err := fx.open(t, d); !errors.Is(err, ErrMapCorrupt) {
			t.Fatalf("both map copies torn: %v", err)
		}
	})
	t.Run("store truncated", func(t *testing.T) {
		d := fx.dev()
		d.b = d.b[:len(d.b)-4096]
		if _, err := fx.open(t, d); !errors.Is(err, crypto.ErrStoreTooSmall) {
			t.Fatalf("truncated: %v", err)
		}
	})
	t.Run("another volume's UUID", func(t *testing.T) {
		_, err := Open(context.Background(), fx.dev(), volName, [16]byte{1}, fx.kek, nil)
		if !errors.Is(err, crypto.ErrWrongVolume) {
			t.Fatalf("wrong uuid: %v", err)
		}
	})
	t.Run("another keystore", func(t *testing.T) {
		other := crypto.NewLocalKEK(t.TempDir(), nil)
		if _, _, err := other.Wrap(context.Background(), "default", fx.uuid, testKey(1)); err != nil {
			t.Fatal(err)
		}
		_, err := Open(context.Background(), fx.dev(), volName, fx.uuid, other, nil)
		if !errors.Is(err, crypto.ErrUnwrap) {
			t.Fatalf("another keystore's key: %v", err)
		}
	})
	t.Run("format 2", func(t *testing.T) {
		d := &memDev{b: make([]byte, crypto.LayoutFor(volSize).End)}
		if err := crypto.Format(context.Background(), d, fx.uuid, volSize, crypto.AES256GCM, fx.kek, "default"); err != nil {
			t.Fatal(err)
		}
		if _, err := fx.open(t, d); !errors.Is(err, crypto.ErrUnsupportedVersion) {
			t.Fatalf("a format-2 store: %v", err)
		}
		if _, err := fx.open(t, &memDev{b: make([]byte, 1<<20)}); !errors.Is(err, crypto.ErrBadMagic) {
			t.Fatalf("a blank store: %v", err)
		}
	})
}

// A rekey interrupted in format 1 (both DEK slots full, some chunks under
// the new key) opens with both keys.
func TestInterruptedRekey(t *testing.T) {
	fx := loadFixture(t)
	ctx := context.Background()
	which, l := fx.current(t)
	d := fx.dev()
	v, err := fx.open(t, d)
	if err != nil {
		t.Fatal(err)
	}
	h := v.Header()
	v.Close()
	old, err := fx.kek.Unwrap(ctx, h.KEK, fx.uuid, h.DEK[h.Active])
	if err != nil {
		t.Fatal(err)
	}
	next := make([]byte, 32)
	rand.Read(next)
	wrapped, _, err := fx.kek.Wrap(ctx, h.KEK.Name, fx.uuid, next)
	if err != nil {
		t.Fatal(err)
	}
	// Header: the new DEK in slot 1, cursor part-way, to the older copy.
	h.DEK[1-h.Active] = wrapped
	h.RekeyCursor, h.Generation = 7, h.Generation+1
	mac, _ := HeaderMACKey(old, fx.uuid)
	hb, err := marshalHeader(&h, mac)
	if err != nil {
		t.Fatal(err)
	}
	copy(d.b[(1-which)*4096:], hb)
	// Chunk 6 re-sealed under the new key into the last slot, its entry
	// naming DEK slot 1, written to the older map page copy.
	s, _ := crypto.NewSealer(next, h.Suite)
	pt := bytes.Repeat([]byte{7}, 4096)
	pkg, err := s.Seal(nil, 6, pt)
	if err != nil {
		t.Fatal(err)
	}
	slot := uint32(l.slots - 1)
	copy(d.b[l.slotAt(slot):], pkg[crypto.HeaderSize:crypto.HeaderSize+crypto.ChunkSize])
	ga, _ := parseMapPage(d.b[l.pageAt(0, 0):][:4096], 0)
	gb, _ := parseMapPage(d.b[l.pageAt(0, 1):][:4096], 0)
	cur, older := 0, 1
	if gb > ga {
		cur, older = 1, 0
	}
	pg := bytes.Clone(d.b[l.pageAt(0, cur):][:4096])
	e := pg[mapPageHdr+6*mapEntrySize:][:mapEntrySize]
	binary.LittleEndian.PutUint32(e, slot+1)
	e[4] = 1 - h.Active
	copy(e[8:24], pkg[:crypto.HeaderSize])
	copy(e[24:40], pkg[crypto.HeaderSize+crypto.ChunkSize:])
	binary.LittleEndian.PutUint64(pg, max(ga, gb)+1)
	binary.LittleEndian.PutUint32(pg[12:], mapPageCRC(pg))
	copy(d.b[l.pageAt(0, older):], pg)

	v, err = fx.open(t, d)
	if err != nil {
		t.Fatal(err)
	}
	if g := v.Header(); !g.Rekeying() || g.RekeyCursor != 7 || v.cur[6].key != 1-h.Active {
		t.Fatalf("header %+v entry %+v", g, v.cur[6])
	}
	if got := readAll(t, v); got != fx.want {
		t.Fatal("a volume in the middle of a rekey reads other data")
	}
	v.Close()

	// The same map under a header without the new key: the entry names
	// an empty DEK slot.
	h.DEK[1-h.Active], h.Generation = nil, h.Generation+1
	hb, _ = marshalHeader(&h, mac)
	copy(d.b[which*4096:], hb)
	if _, err := fx.open(t, d); !errors.Is(err, ErrMapCorrupt) {
		t.Fatalf("entry naming an empty DEK slot: %v", err)
	}
}

// unmapZeroChunks writes a newer copy of map page 0 in which only the
// chunks divisible by 3 (the ones holding data) are mapped.
func unmapZeroChunks(t testing.TB, img []byte, l layout) {
	t.Helper()
	ga, okA := parseMapPage(img[l.pageAt(0, 0):][:4096], 0)
	gb, okB := parseMapPage(img[l.pageAt(0, 1):][:4096], 0)
	if !okA || !okB {
		t.Fatal("map page copies damaged")
	}
	cur := 0
	if gb > ga {
		cur = 1
	}
	pg := bytes.Clone(img[l.pageAt(0, cur):][:4096])
	for c := 0; c < volChunk; c++ {
		if c%3 != 0 {
			clear(pg[mapPageHdr+c*mapEntrySize:][:mapEntrySize])
		}
	}
	binary.LittleEndian.PutUint64(pg, max(ga, gb)+1)
	binary.LittleEndian.PutUint32(pg[12:], mapPageCRC(pg))
	copy(img[l.pageAt(0, 1-cur):], pg)
}

// The format-1 release's header vectors parse to the headers that made
// them, and their MACs verify.
func TestHeaderVectors(t *testing.T) {
	sample := &Header{
		Generation: 3, UUID: [16]byte{0x3f, 0x2c, 15: 0x90}, Size: 1 << 30, ChunkSize: crypto.ChunkSize,
		Suite: crypto.AES256GCM, Slots: 1<<18 + 8192, MapOffset: 8192, SlotOffset: 8192 + 2*4096*2571,
		NonceReserved: 1 << 20, KEK: crypto.KeyRef{Provider: "local", Name: "default", Version: 2},
		DEK: [2][]byte{bytes.Repeat([]byte{0xdd}, 60)},
	}
	rekeying := sample.Clone()
	rekeying.Active, rekeying.RekeyCursor = 1, 12345
	rekeying.DEK = [2][]byte{bytes.Repeat([]byte{0xee}, 90), bytes.Repeat([]byte{0xdd}, 60)}
	for _, tc := range []struct {
		h    *Header
		path string
	}{
		{sample, "testdata/header-v1.hex"},
		{rekeying, "testdata/header-v1-rekeying.hex"},
	} {
		raw, err := os.ReadFile(tc.path)
		if err != nil {
			t.Fatal(err)
		}
		b, _ := hex.DecodeString(strings.TrimSpace(string(raw)))
		got, err := ParseHeader(b)
		if err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		if !reflect.DeepEqual(got, tc.h) {
			t.Fatalf("%s:\n got %+v\nwant %+v", tc.path, got, tc.h)
		}
		mac, _ := HeaderMACKey(testKey(9), tc.h.UUID)
		if err := VerifyHeaderMAC(b, mac); err != nil {
			t.Fatalf("%s: %v", tc.path, err)
		}
		other, _ := HeaderMACKey(testKey(8), tc.h.UUID)
		if err := VerifyHeaderMAC(b, other); !errors.Is(err, crypto.ErrHeaderAuth) {
			t.Fatalf("%s: MAC with another key: %v", tc.path, err)
		}
		// The test encoder below is the format-1 encoder.
		if again, err := marshalHeader(tc.h, mac); err != nil || !bytes.Equal(again, b) {
			t.Fatalf("%s: the test encoder differs from the vector: %v", tc.path, err)
		}
		for i := 0; i < int(binary.LittleEndian.Uint16(b[10:])); i++ {
			bad := bytes.Clone(b)
			bad[i] ^= 0x10
			if _, err := ParseHeader(bad); err == nil && VerifyHeaderMAC(bad, mac) == nil {
				t.Fatalf("%s: flip at byte %d went unnoticed", tc.path, i)
			}
		}
	}
	v2, err := os.ReadFile("../testdata/header-v2.hex")
	if err != nil {
		t.Fatal(err)
	}
	b, _ := hex.DecodeString(strings.TrimSpace(string(v2)))
	if _, err := ParseHeader(b); !errors.Is(err, crypto.ErrUnsupportedVersion) {
		t.Fatalf("format-2 header: %v", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	for _, p := range []string{"testdata/header-v1.hex", "testdata/header-v1-rekeying.hex"} {
		raw, _ := os.ReadFile(p)
		b, _ := hex.DecodeString(strings.TrimSpace(string(raw)))
		f.Add(b)
		f.Add(b[:200])
	}
	f.Add(make([]byte, 4096))
	mac := testKey(3)
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		again, err := marshalHeader(h, mac)
		if err != nil {
			t.Fatalf("parsed header does not encode: %v", err)
		}
		h2, err := ParseHeader(again)
		if err != nil || !reflect.DeepEqual(h, h2) {
			t.Fatalf("re-encoding changed the header: %v", err)
		}
	})
}

// marshalHeader is the format-1 release's header encoder (Header.Marshal
// at 522f70a), for tests only: this package never writes a store.
func marshalHeader(h *Header, macKey []byte) ([]byte, error) {
	le := binary.LittleEndian
	b := make([]byte, headerFixedSize, crypto.HeaderBlockSize)
	copy(b[0:8], crypto.HeaderMagic)
	le.PutUint16(b[8:], Version)
	le.PutUint64(b[12:], h.Generation)
	copy(b[20:36], h.UUID[:])
	le.PutUint64(b[36:], h.Size)
	le.PutUint32(b[44:], h.ChunkSize)
	b[48] = h.Suite
	b[49] = h.Active
	le.PutUint64(b[56:], h.Slots)
	le.PutUint64(b[64:], h.MapOffset)
	le.PutUint64(b[72:], h.SlotOffset)
	le.PutUint64(b[80:], h.NonceReserved)
	le.PutUint64(b[88:], h.RekeyCursor)
	for _, f := range [][]byte{[]byte(h.KEK.Provider), []byte(h.KEK.Name)} {
		b = le.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	b = le.AppendUint32(b, h.KEK.Version)
	if h.Active > 1 || len(h.DEK[h.Active]) == 0 {
		return nil, fmt.Errorf("active DEK slot %d is empty", h.Active)
	}
	for _, f := range h.DEK {
		b = le.AppendUint16(b, uint16(len(f)))
		b = append(b, f...)
	}
	n := len(b) + headerTrailer
	le.PutUint16(b[10:], uint16(n))
	b = le.AppendUint32(b, crc32.Checksum(b, castagnoli))
	b = append(b, make([]byte, 32)...)
	m := hmacSum(macKey, b[:n-32])
	copy(b[n-32:], m)
	return b[:crypto.HeaderBlockSize], nil
}

func hmacSum(key, b []byte) []byte {
	m := hmac.New(sha256.New, key)
	m.Write(b)
	return m.Sum(nil)
}
