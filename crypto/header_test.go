package crypto

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"reflect"
	"testing"

	"goldilocks/crypto/cowmap"
)

func sampleHeader() *Header {
	return &Header{
		Generation: 3, UUID: [16]byte{0x3f, 0x2c, 15: 0x90}, Size: 1 << 30, ChunkSize: ChunkSize,
		Suite: AES256GCM, Open: true, Seq: 77, LogBlocks: 4096, LogStart: 1234, Epoch: 5, EpochSeals: 99,
		Root: cowmap.Ref{Loc: cowmap.HomeB, Hash: [32]byte{0xaa, 31: 0xbb}, MaxGen: 77},
		KEK:  KeyRef{Provider: "local", Name: "default", Version: 2},
		DEK:  [2][]byte{bytes.Repeat([]byte{0xdd}, 93)},
	}
}

// rekeyingHeader is a header in the middle of a rekey: slot 1 active, the
// new DEK in slot 0, the cursor part-way (FORMAT.md, "Rekey").
func rekeyingHeader() *Header {
	h := sampleHeader()
	h.Active, h.RekeyCursor = 1, 12345
	h.DEK = [2][]byte{bytes.Repeat([]byte{0xee}, 93), bytes.Repeat([]byte{0xdd}, 93)}
	return h
}

func TestHeaderRoundTripAndVector(t *testing.T) {
	for _, tc := range []struct {
		h    *Header
		path string
	}{
		{sampleHeader(), "testdata/header-v2.hex"},
		{rekeyingHeader(), "testdata/header-v2-rekeying.hex"},
	} {
		t.Run(tc.path, func(t *testing.T) { headerVector(t, tc.h, tc.path) })
	}
}

func headerVector(t *testing.T, h *Header, path string) {
	mac, err := HeaderMACKey(testKey(9), h.UUID)
	if err != nil {
		t.Fatal(err)
	}
	b, err := h.Marshal(mac)
	if err != nil || len(b) != HeaderBlockSize {
		t.Fatalf("marshal: %d bytes, %v", len(b), err)
	}
	got, err := ParseHeader(b)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, h) {
		t.Fatalf("round trip:\n got %+v\nwant %+v", got, h)
	}
	if err := VerifyHeaderMAC(b, mac); err != nil {
		t.Fatal(err)
	}
	other, _ := HeaderMACKey(testKey(8), h.UUID)
	if err := VerifyHeaderMAC(b, other); !errors.Is(err, ErrHeaderAuth) {
		t.Fatalf("MAC with another key: %v", err)
	}
	vectorFile(t, b, path)
}

// A header whose active slot is empty, or out of range, is corrupt.
func TestHeaderActiveSlot(t *testing.T) {
	mac, _ := HeaderMACKey(testKey(9), [16]byte{})
	h := sampleHeader()
	h.Active = 1 // slot 1 is empty
	if _, err := h.Marshal(mac); err == nil {
		t.Fatal("marshalled a header whose active slot is empty")
	}
	b, _ := sampleHeader().Marshal(mac)
	for _, active := range []byte{1, 2} {
		c := bytes.Clone(b)
		c[49] = active
		n := int(c[10]) | int(c[11])<<8
		binary.LittleEndian.PutUint32(c[n-36:], crc32.Checksum(c[:n-36], castagnoli))
		if _, err := ParseHeader(c); !errors.Is(err, ErrHeaderCorrupt) {
			t.Errorf("active slot %d: %v", active, err)
		}
	}
}

func TestHeaderDamage(t *testing.T) {
	h := sampleHeader()
	mac, _ := HeaderMACKey(testKey(9), h.UUID)
	good, _ := h.Marshal(mac)
	n := int(good[10]) | int(good[11])<<8
	// Any flipped bit inside the used part is caught by the CRC (or, for
	// the CRC and MAC bytes themselves, by the CRC or the MAC).
	for i := 0; i < n; i++ {
		bad := bytes.Clone(good)
		bad[i] ^= 0x10
		if _, err := ParseHeader(bad); err == nil {
			if VerifyHeaderMAC(bad, mac) == nil {
				t.Fatalf("flip at byte %d went unnoticed", i)
			}
		}
	}
	// Two copies: the newer valid one wins; a torn newer copy loses.
	h.Generation = 4
	newer, _ := h.Marshal(mac)
	if got, which, err := PickHeader(good, newer); err != nil || which != 1 || got.Generation != 4 {
		t.Fatalf("pick: %v %d %v", got, which, err)
	}
	torn := bytes.Clone(newer)
	copy(torn[100:], make([]byte, 20))
	if got, which, err := PickHeader(good, torn); err != nil || which != 0 || got.Generation != 3 {
		t.Fatalf("pick with torn B: %v %d %v", got, which, err)
	}
	if _, _, err := PickHeader(make([]byte, 4096), make([]byte, 4096)); !errors.Is(err, ErrBadMagic) {
		t.Fatalf("blank store: %v", err)
	}
	if _, _, err := PickHeader(torn, torn); !errors.Is(err, ErrHeaderCorrupt) {
		t.Fatalf("both torn: %v", err)
	}
	future := bytes.Clone(good)
	future[8] = 3
	if _, err := ParseHeader(future); !errors.Is(err, ErrUnsupportedVersion) {
		t.Fatalf("version 3: %v", err)
	}
	past := bytes.Clone(good)
	past[8] = 1
	if _, err := ParseHeader(past); !errors.Is(err, ErrNeedsUpgrade) {
		t.Fatalf("version 1: %v", err)
	}
}

func FuzzParseHeader(f *testing.F) {
	mac, _ := HeaderMACKey(testKey(9), sampleHeader().UUID)
	good, _ := sampleHeader().Marshal(mac)
	f.Add(good)
	f.Add(good[:200])
	f.Add(make([]byte, 4096))
	f.Fuzz(func(t *testing.T, b []byte) {
		h, err := ParseHeader(b)
		if err != nil {
			return
		}
		// Whatever parses re-encodes to a block that parses the same.
		again, err := h.Marshal(mac)
		if err != nil {
			t.Fatalf("parsed header does not marshal: %v", err)
		}
		h2, err := ParseHeader(again)
		if err != nil || !reflect.DeepEqual(h, h2) {
			t.Fatalf("re-encoding changed the header: %v", err)
		}
	})
}
