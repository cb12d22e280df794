package gateway

import (
	"os"
	"path/filepath"
	"testing"

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
	rw := &conn{exp: &Export{Device: dev}, structured: true, metaAlloc: true, trimmer: dev, zeroer: dev, cacher: dev}
	ro := &conn{exp: &Export{Device: dev, ReadOnly: true}, trimmer: dev, zeroer: dev, cacher: dev}
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
		{"FUA on read", rw, cmdRead, cmdFlagFUA, 0, 4096, errInval},
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
		{"flush with flags", rw, cmdFlush, cmdFlagFUA, 0, 0, errInval},
		{"cache", rw, cmdCache, 0, 0, 4096, 0},
		{"unknown command", rw, 42, 0, 0, 4096, errInval},
		{"resize (unsupported)", rw, 8, 0, 0, 4096, errInval},
	} {
		r := &request{typ: tc.typ, flags: tc.flags, off: tc.off, length: tc.length}
		if got := tc.c.validate(r); got != tc.want {
			t.Errorf("%s: errno %d, want %d", tc.name, got, tc.want)
		}
	}
}
