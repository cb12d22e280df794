package gateway

import (
	"fmt"
	"strings"

	"goldilocks/internal/nbdproto"
)

// Values of the gateway's own, beside the protocol's (internal/nbdproto).
const (
	maxOptionLength = 64 << 10 // longer options are refused with ERR_TOO_BIG
	metaBaseAllocID = uint32(1)
	metaChangedID   = uint32(2) // goldilocks:changed:SNAP or qemu:dirty-bitmap:SNAP
	// Changed-block contexts, with the snapshot's name after the prefix.
	metaChangedNS = "goldilocks:changed:"
	metaDirtyNS   = "qemu:dirty-bitmap:"
)

// commandName names a command for logs and metric labels.
func commandName(t uint16) string {
	names := [nbdproto.NumCommands]string{
		nbdproto.CmdRead: "read", nbdproto.CmdWrite: "write", nbdproto.CmdDisc: "disc",
		nbdproto.CmdFlush: "flush", nbdproto.CmdTrim: "trim", nbdproto.CmdCache: "cache",
		nbdproto.CmdWriteZeroes: "write_zeroes", nbdproto.CmdBlockStatus: "block_status",
	}
	if int(t) < len(names) {
		return names[t]
	}
	return "unknown"
}

// flagNames writes command flags for logs: "fua,df", "none", and the
// bits it does not know as hex ("0x40").
func flagNames(f uint16) string {
	return bitNames(f, []string{"fua", "no_hole", "df", "req_one", "fast_zero", "payload_len"})
}

// transmissionFlagNames writes the transmission flags sent to a client.
func transmissionFlagNames(f uint16) string {
	return bitNames(f, []string{"has_flags", "read_only", "send_flush", "send_fua", "rotational", "send_trim",
		"send_write_zeroes", "send_df", "can_multi_conn", "send_resize", "send_cache", "send_fast_zero", "block_status_payload"})
}

func bitNames(f uint16, names []string) string {
	var out []string
	for i, n := range names {
		if f&(1<<i) != 0 {
			out = append(out, n)
			f &^= 1 << i
		}
	}
	if f != 0 {
		out = append(out, fmt.Sprintf("%#x", f))
	}
	if len(out) == 0 {
		return "none"
	}
	return strings.Join(out, ",")
}
