package block

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func newFile(t *testing.T, size int64, ro bool) *File {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(p, size)
	d, err := OpenFile(p, ro)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

func TestFileRanges(t *testing.T) {
	d := newFile(t, 1<<20, false)
	for _, tc := range []struct {
		off  int64
		n    int
		want error
	}{
		{0, 1, nil}, {1<<20 - 1, 1, nil}, {0, 1 << 20, nil},
		{1 << 20, 1, ErrOutOfRange}, {1<<20 - 1, 2, ErrOutOfRange}, {-1, 1, ErrOutOfRange},
		{1<<62 + 1<<61, 1 << 10, ErrOutOfRange},
	} {
		p := bytes.Repeat([]byte{0xab}, tc.n)
		if _, err := d.WriteAt(p, tc.off); !errors.Is(err, tc.want) {
			t.Errorf("WriteAt(%d, %d) = %v, want %v", tc.off, tc.n, err, tc.want)
		}
		q := make([]byte, tc.n)
		if _, err := d.ReadAt(q, tc.off); !errors.Is(err, tc.want) {
			t.Errorf("ReadAt(%d, %d) = %v, want %v", tc.off, tc.n, err, tc.want)
		}
		if tc.want == nil && !bytes.Equal(p, q) {
			t.Errorf("ReadAt(%d, %d) read other bytes", tc.off, tc.n)
		}
	}
}

func TestFileTrimZeroExtents(t *testing.T) {
	const mib = 1 << 20
	d := newFile(t, 4*mib, false)
	fill := bytes.Repeat([]byte{7}, 2*mib)
	if _, err := d.WriteAt(fill, mib); err != nil {
		t.Fatal(err)
	}
	ext, err := d.Extents(nil, 0, 4*mib, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := []Extent{{mib, ExtentHole | ExtentZero}, {2 * mib, 0}, {mib, ExtentHole | ExtentZero}}
	if !equalExtents(ext, want) {
		t.Fatalf("extents %v, want %v", ext, want)
	}
	if ext, _ := d.Extents(nil, 0, 4*mib, 1); len(ext) != 1 || ext[0] != want[0] {
		t.Fatalf("max 1: %v", ext)
	}
	if err := d.Trim(mib, 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(2*mib, 64<<10, false, false); err != nil {
		t.Fatal(err)
	}
	if err := d.Zero(2*mib+128<<10, 4096, true, true); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 2*mib)
	d.ReadAt(got, mib)
	for i, b := range got {
		trimmed := i < 64<<10 || (i >= mib && i < mib+64<<10) || (i >= mib+128<<10 && i < mib+128<<10+4096)
		if trimmed && b != 0 || !trimmed && b != 7 {
			t.Fatalf("byte %d = %d after trim/zero", mib+i, b)
		}
	}
	ext, _ = d.Extents(nil, mib, 128<<10, 100)
	if len(ext) == 0 || ext[0].Flags&ExtentHole == 0 || ext[0].Length != 64<<10 {
		t.Fatalf("trimmed range is not a hole: %v", ext)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
}

func TestFileReadOnlyAndLimit(t *testing.T) {
	d := newFile(t, 1<<20, true)
	for name, err := range map[string]error{
		"write": func() error { _, err := d.WriteAt([]byte{1}, 0); return err }(),
		"trim":  d.Trim(0, 4096),
		"zero":  d.Zero(0, 4096, true, false),
	} {
		if !errors.Is(err, ErrReadOnly) {
			t.Errorf("%s on read-only: %v", name, err)
		}
	}
	d.Limit(8192)
	if d.Size() != 8192 {
		t.Fatalf("size %d after Limit", d.Size())
	}
	if _, err := d.ReadAt(make([]byte, 1), 8192); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("read past limit: %v", err)
	}
	if _, err := OpenFile(t.TempDir(), false); err == nil {
		t.Fatal("a directory opened as a device")
	}
}

func equalExtents(a, b []Extent) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func TestFileTryReadAt(t *testing.T) {
	d := newFile(t, 1<<20, false)
	want := bytes.Repeat([]byte("goldilocks"), 1000)
	if _, err := d.WriteAt(want, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(want))
	switch _, err := d.TryReadAt(got, 4096); {
	case errors.Is(err, ErrWouldBlock):
		t.Log("RWF_NOWAIT reads are not available on this filesystem")
	case err != nil:
		t.Fatal(err)
	case !bytes.Equal(got, want):
		t.Fatal("TryReadAt read other bytes")
	}
	if _, err := d.TryReadAt(got, 1<<20-10); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("TryReadAt past the end: %v", err)
	}
}

func TestMem(t *testing.T) {
	m := NewMem(8192)
	if _, err := m.WriteAt([]byte("goldilocks"), 4090); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 10)
	if _, err := m.ReadAt(got, 4090); err != nil || string(got) != "goldilocks" {
		t.Fatalf("read %q, %v", got, err)
	}
	if err := m.Zero(4092, 4, true, false); err != nil {
		t.Fatal(err)
	}
	m.ReadAt(got, 4090)
	if string(got) != "go\x00\x00\x00\x00ocks" {
		t.Fatalf("after Zero: %q", got)
	}
	for _, off := range []int64{8190, -1, 8192} {
		if _, err := m.WriteAt(got, off); !errors.Is(err, ErrOutOfRange) {
			t.Fatalf("write at %d: %v", off, err)
		}
	}
}

// A file that shrinks under an open device (an operator, a storage
// tool): what is gone reads as an error, never as zeros, through ReadAt,
// TryReadAt and Extents (a hole would let a read be answered as zeros).
func TestFileShrunk(t *testing.T) {
	d := newFile(t, 1<<20, false)
	if _, err := d.WriteAt(bytes.Repeat([]byte{7}, 1<<20), 0); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(d.f.Name(), 256<<10); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4096)
	if _, err := d.ReadAt(buf, 512<<10); err == nil {
		t.Error("ReadAt past the new end succeeded")
	}
	if _, err := d.TryReadAt(buf, 512<<10); err == nil {
		t.Error("TryReadAt past the new end succeeded")
	}
	// The mapping still spans 1 MiB: its pages past the end fault
	// (SIGBUS), which must come back as EIO, not kill the test binary.
	for _, off := range []int64{512 << 10, 200 << 10} { // past the end; across it
		if p, err := d.Mapped(off, 128<<10); !errors.Is(err, syscall.EIO) || p != nil {
			t.Errorf("Mapped(%d) past the new end: %d bytes, %v; want EIO", off, len(p), err)
		}
	}
	if p, err := d.Mapped(0, 256<<10); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{7}, 256<<10)) {
		t.Errorf("Mapped within the file: %v", err)
	}
	for _, off := range []int64{512 << 10, 128 << 10} { // past the end; across it
		if es, err := d.Extents(nil, off, 512<<10, 8); err == nil {
			t.Errorf("Extents(%d) past the new end: %+v, no error", off, es)
		}
	}
	if es, err := d.Extents(nil, 0, 256<<10, 8); err != nil || len(es) != 1 || es[0].Flags != 0 {
		t.Errorf("Extents within the file: %+v %v", es, err)
	}
}

// Mapped lends the file's bytes, unaligned ranges included, sees writes
// made after the mapping, and refuses ranges outside the device.
func TestFileMapped(t *testing.T) {
	d := newFile(t, 1<<20, false)
	want := make([]byte, 1<<20) // the file's bytes: the first half written
	rand.NewChaCha8([32]byte{1}).Read(want[:512<<10])
	if _, err := d.WriteAt(want[:512<<10], 0); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		off, n int64
		err    error
	}{
		{0, 4096, nil}, {1, 1, nil}, {4095, 2, nil}, {12345, 300 << 10, nil}, {0, 1 << 20, nil},
		{1<<20 - 1, 1, nil}, {1 << 20, 0, nil},
		{1<<20 - 1, 2, ErrOutOfRange}, {-1, 1, ErrOutOfRange}, {1 << 62, 1, ErrOutOfRange},
	} {
		p, err := d.Mapped(tc.off, tc.n)
		if !errors.Is(err, tc.err) {
			t.Errorf("Mapped(%d, %d): %v, want %v", tc.off, tc.n, err, tc.err)
			continue
		}
		if err == nil && !bytes.Equal(p, want[tc.off:tc.off+tc.n]) {
			t.Errorf("Mapped(%d, %d): other bytes than the file's", tc.off, tc.n)
		}
	}
	// A write after the mapping was made, and a trim, show through it.
	rand.NewChaCha8([32]byte{2}).Read(want[512<<10:])
	if _, err := d.WriteAt(want[512<<10:], 512<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.Trim(0, 64<<10); err != nil {
		t.Fatal(err)
	}
	clear(want[:64<<10])
	if p, err := d.Mapped(0, 1<<20); err != nil || !bytes.Equal(p, want) {
		t.Errorf("Mapped after a write and a trim: %v, or other bytes", err)
	}
}

// Written tells a written block from a hole, also one that a trim made.
func TestFileWritten(t *testing.T) {
	d := newFile(t, 1<<20, false)
	if d.Written(64 << 10) {
		t.Fatal("a block of a new sparse file reads as written")
	}
	if _, err := d.WriteAt(make([]byte, 4096), 64<<10); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if !d.Written(64 << 10) {
		t.Fatal("a written block reads as a hole")
	}
	if d.Written(512 << 10) {
		t.Fatal("a block far from the written one reads as written")
	}
	if err := d.Trim(0, 1<<20); err != nil {
		t.Fatal(err)
	}
	if d.Written(64 << 10) {
		t.Fatal("a trimmed block reads as written")
	}
}

// WriteAtFUA writes like WriteAt (RWF_DSYNC makes it durable; a power
// cut is the torture tests' business) and honours read-only and range.
func TestFileWriteAtFUA(t *testing.T) {
	d := newFile(t, 1<<20, false)
	p := bytes.Repeat([]byte{0x5f}, 8192)
	if n, err := d.WriteAtFUA(p, 4096); err != nil || n != len(p) {
		t.Fatalf("WriteAtFUA: %d, %v", n, err)
	}
	got := make([]byte, len(p))
	if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
	if _, err := d.WriteAtFUA(p, 1<<20-4096); !errors.Is(err, ErrOutOfRange) {
		t.Fatalf("beyond the end: %v", err)
	}
	ro := newFile(t, 1<<20, true)
	if _, err := ro.WriteAtFUA(p, 0); !errors.Is(err, ErrReadOnly) {
		t.Fatalf("read-only: %v", err)
	}
}
