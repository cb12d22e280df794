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
	"goldilocks/internal/nbdproto"
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
		{"read", rw, nbdproto.CmdRead, 0, 0, 4096, 0},
		{"read to the end", rw, nbdproto.CmdRead, 0, size - 1, 1, 0},
		{"read past the end", rw, nbdproto.CmdRead, 0, size - 1, 2, nbdproto.ErrnoInval},
		{"read at the end", rw, nbdproto.CmdRead, 0, size, 1, nbdproto.ErrnoInval},
		{"offset overflow", rw, nbdproto.CmdRead, 0, ^uint64(0), 2, nbdproto.ErrnoInval},
		{"read of 0 bytes", rw, nbdproto.CmdRead, 0, 0, 0, nbdproto.ErrnoInval},
		{"read over 32 MiB", rw, nbdproto.CmdRead, 0, 0, MaxRequestSize + 1, nbdproto.ErrnoInval},
		{"read with DF", rw, nbdproto.CmdRead, nbdproto.CmdFlagDF, 0, 4096, 0},
		{"DF without structured replies", ro, nbdproto.CmdRead, nbdproto.CmdFlagDF, 0, 4096, nbdproto.ErrnoInval},
		{"FUA on read", rw, nbdproto.CmdRead, nbdproto.CmdFlagFUA, 0, 4096, 0},
		{"FUA on cache", rw, nbdproto.CmdCache, nbdproto.CmdFlagFUA, 0, 4096, 0},
		{"FUA on block status", rw, nbdproto.CmdBlockStatus, nbdproto.CmdFlagFUA, 0, 4096, 0},
		{"FUA on read-only (not advertised)", ro, nbdproto.CmdRead, nbdproto.CmdFlagFUA, 0, 4096, nbdproto.ErrnoInval},
		{"unknown flag", rw, nbdproto.CmdRead, 1 << 7, 0, 4096, nbdproto.ErrnoInval},
		{"write FUA", rw, nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 0, 4096, 0},
		{"write past the end", rw, nbdproto.CmdWrite, 0, size - 1, 2, nbdproto.ErrnoNoSpc},
		{"write zeroes past the end", rw, nbdproto.CmdWriteZeroes, 0, size, 1, nbdproto.ErrnoNoSpc},
		{"trim past the end", rw, nbdproto.CmdTrim, 0, size, 1, nbdproto.ErrnoInval},
		{"write read-only", ro, nbdproto.CmdWrite, 0, 0, 1, nbdproto.ErrnoPerm},
		{"write read-only with FUA", ro, nbdproto.CmdWrite, nbdproto.CmdFlagFUA, 0, 1, nbdproto.ErrnoPerm},
		{"trim read-only", ro, nbdproto.CmdTrim, 0, 0, 1, nbdproto.ErrnoPerm},
		{"zero read-only", ro, nbdproto.CmdWriteZeroes, 0, 0, 1, nbdproto.ErrnoPerm},
		{"NO_HOLE on zero", rw, nbdproto.CmdWriteZeroes, nbdproto.CmdFlagNoHole | nbdproto.CmdFlagFastZero, 0, 4096, 0},
		{"NO_HOLE on trim", rw, nbdproto.CmdTrim, nbdproto.CmdFlagNoHole, 0, 4096, nbdproto.ErrnoInval},
		{"FAST_ZERO on write", rw, nbdproto.CmdWrite, nbdproto.CmdFlagFastZero, 0, 4096, nbdproto.ErrnoInval},
		{"REQ_ONE on block status", rw, nbdproto.CmdBlockStatus, nbdproto.CmdFlagReqOne, 0, 4096, 0},
		{"REQ_ONE on read", rw, nbdproto.CmdRead, nbdproto.CmdFlagReqOne, 0, 4096, nbdproto.ErrnoInval},
		{"block status without a context", ro, nbdproto.CmdBlockStatus, 0, 0, 4096, nbdproto.ErrnoInval},
		{"flush", rw, nbdproto.CmdFlush, 0, 0, 0, 0},
		{"flush with FUA", rw, nbdproto.CmdFlush, nbdproto.CmdFlagFUA, 0, 0, 0},
		{"flush with NO_HOLE", rw, nbdproto.CmdFlush, nbdproto.CmdFlagNoHole, 0, 0, nbdproto.ErrnoInval},
		{"flush with a range", rw, nbdproto.CmdFlush, 0, 0, 4096, nbdproto.ErrnoInval},
		{"trim not advertised", bare, nbdproto.CmdTrim, 0, 0, 4096, nbdproto.ErrnoInval},
		{"zero not advertised", bare, nbdproto.CmdWriteZeroes, 0, 0, 4096, nbdproto.ErrnoInval},
		{"cache not advertised", bare, nbdproto.CmdCache, 0, 0, 4096, nbdproto.ErrnoInval},
		{"FAST_ZERO not advertised", bare, nbdproto.CmdWriteZeroes, nbdproto.CmdFlagFastZero, 0, 4096, nbdproto.ErrnoInval},
		{"cache", rw, nbdproto.CmdCache, 0, 0, 4096, 0},
		{"unknown command", rw, 42, 0, 0, 4096, nbdproto.ErrnoInval},
		{"resize (unsupported)", rw, 8, 0, 0, 4096, nbdproto.ErrnoInval},
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
		{syscall.ENOSPC, nbdproto.ErrnoNoSpc},
		{syscall.EFBIG, nbdproto.ErrnoNoSpc},
		{syscall.EDQUOT, nbdproto.ErrnoNoSpc},
		{fmt.Errorf("volume v: %w", syscall.EROFS), nbdproto.ErrnoPerm},
		{block.ErrOutOfRange, nbdproto.ErrnoInval},
		{errors.New("anything else"), nbdproto.ErrnoIO},
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

// clip(s, n) shortens s to at most n bytes of valid UTF-8, marked "...".
func TestClip(t *testing.T) {
	for _, tc := range []struct {
		s, want string
		n       int
	}{
		{"short", "short", 64},
		{"abcdefghij", "abcde...", 8},
		{"ab€€", "ab...", 7}, // € is 3 bytes: never cut inside one
		{"€€€€", "€...", 7},
	} {
		got := clip(tc.s, tc.n)
		if got != tc.want || len(got) > tc.n || !utf8.ValidString(got) {
			t.Errorf("clip(%q, %d) = %q, want %q", tc.s, tc.n, got, tc.want)
		}
	}
}

// Every command has its own name in logs and metric labels; an unknown
// one is "unknown".
func TestCommandName(t *testing.T) {
	seen := map[string]uint16{}
	for c := range uint16(nbdproto.NumCommands) {
		n := commandName(c)
		if n == "" || n == "unknown" {
			t.Errorf("command %d: name %q", c, n)
		}
		if o, dup := seen[n]; dup {
			t.Errorf("commands %d and %d both named %q", o, c, n)
		}
		seen[n] = c
	}
	for _, c := range []uint16{nbdproto.NumCommands, 0xffff} {
		if n := commandName(c); n != "unknown" {
			t.Errorf("command %d: name %q, want unknown", c, n)
		}
	}
	if commandName(nbdproto.CmdWriteZeroes) != "write_zeroes" || commandName(nbdproto.CmdBlockStatus) != "block_status" {
		t.Error("metric labels changed")
	}
}
