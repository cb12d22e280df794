package crypto

import (
	"bytes"
	"errors"
	"io"
	"strconv"
	"testing"
	"time"
)

// vectorBackup writes the stream of testdata/backup-v1-full.hex: a full
// backup of a 64 KiB volume, backup key 00 01 … 1f, the DARE nonce from a
// reader of bytes 0xa5, records data (8 KiB of 0x11), zero (48 KiB), data
// (8 KiB of 0x22).
func vectorBackup(t *testing.T) ([]byte, []byte) {
	t.Helper()
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i)
	}
	h := &BackupHeader{Kind: BackupFull, Suite: AES256GCM, Volume: [16]byte{1, 2, 3}, Size: 64 << 10,
		Snapshot: [16]byte{9, 8, 7}, Created: time.Unix(1764806400, 0), ID: [16]byte{0xbb, 1}, SnapName: "nightly",
		KEK: KeyRef{Provider: "local", Name: "default", Version: 3}, Wrapped: []byte("wrapped by the test")}
	var out bytes.Buffer
	w, err := NewBackupWriter(&out, h, key, bytes.NewReader(bytes.Repeat([]byte{0xa5}, 64)))
	if err != nil {
		t.Fatal(err)
	}
	for _, err := range []error{w.Data(0, bytes.Repeat([]byte{0x11}, 8<<10)), w.Zero(8<<10, 48<<10),
		w.Data(56<<10, bytes.Repeat([]byte{0x22}, 8<<10)), w.Close()} {
		if err != nil {
			t.Fatal(err)
		}
	}
	return out.Bytes(), key
}

func readAllBackup(b, key []byte) (*BackupHeader, []BackupRecord, error) {
	r, err := OpenBackup(bytes.NewReader(b), func(*BackupHeader) ([]byte, error) { return bytes.Clone(key), nil })
	if err != nil {
		return nil, nil, err
	}
	var recs []BackupRecord
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return r.Header(), recs, nil
		}
		if err != nil {
			return r.Header(), recs, err
		}
		rec.Data = bytes.Clone(rec.Data)
		recs = append(recs, rec)
	}
}

// TestBackupVector: the stream of the fixed input is byte for byte the
// vector, and the vector reads back as that input.
func TestBackupVector(t *testing.T) {
	got, key := vectorBackup(t)
	want := vectorFile(t, got, "testdata/backup-v1-full.hex")
	h, recs, err := readAllBackup(want, key)
	if err != nil {
		t.Fatal(err)
	}
	if h.Kind != BackupFull || h.Size != 64<<10 || h.SnapName != "nightly" || h.ID != [16]byte{0xbb, 1} || h.KEK.Version != 3 || string(h.Wrapped) != "wrapped by the test" ||
		!h.Created.Equal(time.Unix(1764806400, 0)) {
		t.Fatalf("header %+v", h)
	}
	if len(recs) != 3 || !bytes.Equal(recs[0].Data, bytes.Repeat([]byte{0x11}, 8<<10)) || recs[1].Data != nil ||
		recs[1].Off != 8<<10 || recs[1].Len != 48<<10 || !bytes.Equal(recs[2].Data, bytes.Repeat([]byte{0x22}, 8<<10)) {
		t.Fatalf("records %+v", recs)
	}
}

// TestBackupRefusesDamage: a flipped bit anywhere, a stream cut at any
// of a range of points, a header from another stream, the wrong key:
// each is refused with ErrBackupFormat or ErrBackupAuth, never read as
// good records to the end.
func TestBackupRefusesDamage(t *testing.T) {
	good, key := vectorBackup(t)
	other := bytes.Clone(good)
	other[33] ^= 1 // another volume size: another header
	check := func(name string, b []byte, k []byte) {
		t.Helper()
		_, _, err := readAllBackup(b, k)
		if !errors.Is(err, ErrBackupAuth) && !errors.Is(err, ErrBackupFormat) {
			t.Fatalf("%s: err %v, want a refusal", name, err)
		}
	}
	for i := 0; i < len(good); i += 97 {
		b := bytes.Clone(good)
		b[i] ^= 0x40
		check("bit flipped at "+strconv.Itoa(i), b, key)
	}
	for _, n := range []int{0, 50, 200, len(good) / 2, len(good) - 32, len(good) - 1} {
		check("cut at "+strconv.Itoa(n), good[:n], key)
	}
	// A header edited together with its checksum: the stream key changes.
	h, _, err := readBackupHeader(bytes.NewReader(good))
	if err != nil {
		t.Fatal(err)
	}
	h.SnapName = "other"
	hb, err := h.marshal()
	if err != nil {
		t.Fatal(err)
	}
	hl := len(good) - streamLen(t, good)
	check("header rewritten", append(hb, good[hl:]...), key)
	wrong := bytes.Clone(key)
	wrong[0] ^= 1
	check("wrong key", good, wrong)
	check("extra bytes", append(bytes.Clone(good), 0), key)
}

// streamLen is the length of the DARE stream after the header.
func streamLen(t *testing.T, b []byte) int {
	t.Helper()
	r := bytes.NewReader(b)
	if _, _, err := readBackupHeader(r); err != nil {
		t.Fatal(err)
	}
	return r.Len()
}
