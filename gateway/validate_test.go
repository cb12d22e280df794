package gateway

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"unicode/utf8"

	"goldilocks/internal/block"
)

func TestValidate(t *testing.T) {
	p := filepath.Join(t.TempDir(), "d")
	os.WriteFile(p, nil, 0o600)
	os.Truncate(p, 1<<20)
	dev, err := block.OpenFile(p, false)
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	rw := &conn{exp: &Export{Device: dev}, structured: true, metaAlloc: true}
	rw.flags = rw.transmissionFlags()
	ro := &conn{exp: &Export{Device: dev, ReadOnly: true}, readOnly: true}
	ro.flags = ro.transmissionFlags()
	bare := &conn{exp: &Export{Device: plain{dev}}} // no trim, zero or cache
	bare.flags = bare.transmissionFlags()
	const size = 1 << 20
	for _, tc := range []struct {
		name   string
		c      *conn
		typ    uint16
		flags  uint16
		off    uint64
		length uint32
		want   uint32
	}{
		{"read", rw, cmdRead, 0, 0, 4096, 0},
		{"read to the end", rw, cmdRead, 0, size - 1, 1, 0},
		{"read past the end", rw, cmdRead, 0, size - 1, 2, errInval},
		{"read at the end", rw, cmdRead, 0, size, 1, errInval},
		{"offset overflow", rw, cmdRead, 0, ^uint64(0), 2, errInval},
		{"read of 0 bytes", rw, cmdRead, 0, 0, 0, errInval},
		{"read over 32 MiB", rw, cmdRead, 0, 0, MaxRequestSize + 1, errInval},
		{"read with DF", rw, cmdRead, cmdFlagDF, 0, 4096, 0},
		{"DF without structured replies", ro, cmdRead, cmdFlagDF, 0, 4096, errInval},
		{"FUA on read", rw, cmdRead, cmdFlagFUA, 0, 4096, 0},
		{"FUA on cache", rw, cmdCache, cmdFlagFUA, 0, 4096, 0},
		{"FUA on block status", rw, cmdBlockStatus, cmdFlagFUA, 0, 4096, 0},
		{"FUA on read-only (not advertised)", ro, cmdRead, cmdFlagFUA, 0, 4096, errInval},
		{"unknown flag", rw, cmdRead, 1 << 7, 0, 4096, errInval},
		{"write FUA", rw, cmdWrite, cmdFlagFUA, 0, 4096, 0},
		{"write past the end", rw, cmdWrite, 0, size - 1, 2, errNoSpc},
		{"write zeroes past the end", rw, cmdWriteZeroes, 0, size, 1, errNoSpc},
		{"trim past the end", rw, cmdTrim, 0, size, 1, errInval},
		{"write read-only", ro, cmdWrite, 0, 0, 1, errPerm},
		{"write read-only with FUA", ro, cmdWrite, cmdFlagFUA, 0, 1, errPerm},
		{"trim read-only", ro, cmdTrim, 0, 0, 1, errPerm},
		{"zero read-only", ro, cmdWriteZeroes, 0, 0, 1, errPerm},
		{"NO_HOLE on zero", rw, cmdWriteZeroes, cmdFlagNoHole | cmdFlagFastZero, 0, 4096, 0},
		{"NO_HOLE on trim", rw, cmdTrim, cmdFlagNoHole, 0, 4096, errInval},
		{"FAST_ZERO on write", rw, cmdWrite, cmdFlagFastZero, 0, 4096, errInval},
		{"REQ_ONE on block status", rw, cmdBlockStatus, cmdFlagReqOne, 0, 4096, 0},
		{"REQ_ONE on read", rw, cmdRead, cmdFlagReqOne, 0, 4096, errInval},
		{"block status without a context", ro, cmdBlockStatus, 0, 0, 4096, errInval},
		{"flush", rw, cmdFlush, 0, 0, 0, 0},
		{"flush with FUA", rw, cmdFlush, cmdFlagFUA, 0, 0, 0},
		{"flush with NO_HOLE", rw, cmdFlush, cmdFlagNoHole, 0, 0, errInval},
		{"flush with a range", rw, cmdFlush, 0, 0, 4096, errInval},
		{"trim not advertised", bare, cmdTrim, 0, 0, 4096, errInval},
		{"zero not advertised", bare, cmdWriteZeroes, 0, 0, 4096, errInval},
		{"cache not advertised", bare, cmdCache, 0, 0, 4096, errInval},
		{"FAST_ZERO not advertised", bare, cmdWriteZeroes, cmdFlagFastZero, 0, 4096, errInval},
		{"cache", rw, cmdCache, 0, 0, 4096, 0},
		{"unknown command", rw, 42, 0, 0, 4096, errInval},
		{"resize (unsupported)", rw, 8, 0, 0, 4096, errInval},
	} {
		r := &request{typ: tc.typ, flags: tc.flags, off: tc.off, length: uint64(tc.length)}
		if got := tc.c.validate(r); got != tc.want {
			t.Errorf("%s: errno %d, want %d", tc.name, got, tc.want)
		}
	}
}

// plain hides a device's optional interfaces.
type plain struct{ d block.Device }

func (p plain) ReadAt(b []byte, off int64) (int, error)  { return p.d.ReadAt(b, off) }
func (p plain) WriteAt(b []byte, off int64) (int, error) { return p.d.WriteAt(b, off) }
func (p plain) Size() int64                              { return p.d.Size() }
func (p plain) Flush() error                             { return p.d.Flush() }
func (p plain) Close() error                             { return nil }

func TestErrnoOf(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want uint32
	}{
		{syscall.ENOSPC, errNoSpc},
		{syscall.EFBIG, errNoSpc},
		{syscall.EDQUOT, errNoSpc},
		{fmt.Errorf("volume v: %w", syscall.EROFS), errPerm},
		{block.ErrOutOfRange, errInval},
		{errors.New("anything else"), errIO},
	} {
		if got := errnoOf(tc.err); got != tc.want {
			t.Errorf("errnoOf(%v) = %d, want %d", tc.err, got, tc.want)
		}
	}
}

func TestTidyExtents(t *testing.T) {
	got := tidyExtents([]block.Extent{{Length: 0}, {Length: 4096, Flags: 3}, {Length: 0, Flags: 3}, {Length: 4096, Flags: 3}, {Length: 512}}, 1<<20)
	want := []block.Extent{{Length: 8192, Flags: 3}, {Length: 512}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("tidyExtents: %v, want %v", got, want)
	}
	if got := tidyExtents(nil, 4096); len(got) != 1 || got[0].Length != 4096 || got[0].Flags != 0 {
		t.Fatalf("no extents: %v", got)
	}
}

func TestClip(t *testing.T) {
	for _, tc := range []struct {
		s    string
		n    int
		want string
	}{
		{"short", 64, "short"},
		{"abcdefghij", 8, "abcde..."},
		{"ab€€", 7, "ab..."}, // € is 3 bytes: never cut inside one
		{"€€€€", 7, "€..."},
	} {
		got := clip(tc.s, tc.n)
		if got != tc.want || len(got) > tc.n || !utf8.ValidString(got) {
			t.Errorf("clip(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}
