package gateway

import (
	"fmt"
	"strings"

	"github.com/pojntfx/go-nbd/pkg/protocol"
)

// NBD protocol constants (doc/proto.md of the NBD project). Those go-nbd
// defines are taken from it; the rest go-nbd lacks.
const (
	nbdMagic        = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	optMagic        = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	optReplyMagic   = protocol.NEGOTIATION_MAGIC_REPLY
	requestMagic    = protocol.TRANSMISSION_MAGIC_REQUEST
	simpleMagic     = protocol.TRANSMISSION_MAGIC_REPLY
	structuredMagic = uint32(0x668e33ef)
	extRequestMagic = uint32(0x21e41c71) // extended headers
	extReplyMagic   = uint32(0x6e8a278c)

	// Handshake flags (server) and client flags.
	flagFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	flagNoZeroes      = uint16(1 << 1)
	clientFixed       = uint32(1 << 0)
	clientNoZeroes    = uint32(1 << 1)

	// Options.
	optExportName      = uint32(1)
	optAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	optList            = protocol.NEGOTIATION_ID_OPTION_LIST
	optStartTLS        = uint32(5)
	optInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	optGo              = protocol.NEGOTIATION_ID_OPTION_GO
	optStructuredReply = uint32(8)
	optListMetaContext = uint32(9)
	optSetMetaContext  = uint32(10)
	optExtendedHeaders = uint32(11)

	// Option replies.
	repAck         = protocol.NEGOTIATION_TYPE_REPLY_ACK
	repServer      = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	repInfo        = protocol.NEGOTIATION_TYPE_REPLY_INFO
	repMetaContext = uint32(4)
	repErrUnsup    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	repErrInvalid  = uint32(3 | 1<<31)
	repErrPlatform = uint32(4 | 1<<31)
	repErrTLSReqd  = uint32(5 | 1<<31)
	repErrUnknown  = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	repErrShutdown = uint32(7 | 1<<31)
	repErrTooBig   = uint32(9 | 1<<31)

	// Info types.
	infoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	infoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	infoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	infoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	// Transmission flags.
	tfHasFlags     = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	tfReadOnly     = uint16(1 << 1)
	tfSendFlush    = uint16(1 << 2)
	tfSendFUA      = uint16(1 << 3)
	tfSendTrim     = uint16(1 << 5)
	tfSendZeroes   = uint16(1 << 6)
	tfSendDF       = uint16(1 << 7)
	tfCanMultiConn = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	tfSendCache    = uint16(1 << 10)
	tfSendFastZero = uint16(1 << 11)

	// Commands.
	cmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	cmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	cmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	cmdFlush       = uint16(3)
	cmdTrim        = uint16(4)
	cmdCache       = uint16(5)
	cmdWriteZeroes = uint16(6)
	cmdBlockStatus = uint16(7)
	numCommands    = 8

	// Command flags.
	cmdFlagFUA        = uint16(1 << 0)
	cmdFlagNoHole     = uint16(1 << 1)
	cmdFlagDF         = uint16(1 << 2)
	cmdFlagReqOne     = uint16(1 << 3)
	cmdFlagFastZero   = uint16(1 << 4)
	cmdFlagPayloadLen = uint16(1 << 5) // extended headers: length is the payload's

	// Structured reply types and flags.
	replyFlagDone       = uint16(1 << 0)
	replyNone           = uint16(0)
	replyOffsetData     = uint16(1)
	replyOffsetHole     = uint16(2)
	replyBlockStatus    = uint16(5)
	replyBlockStatusExt = uint16(6)
	replyError          = uint16(1<<15 + 1)
	replyErrorOffset    = uint16(1<<15 + 2)

	// Error values (they are Linux errno values, fixed by the protocol).
	errPerm     = protocol.TRANSMISSION_ERROR_EPERM
	errIO       = uint32(5)
	errNoMem    = uint32(12)
	errInval    = protocol.TRANSMISSION_ERROR_EINVAL
	errNoSpc    = uint32(28)
	errOverflow = uint32(75)
	errNotSup   = uint32(95)

	// Sizes.
	requestSize        = 28
	extRequestSize     = 32
	extHdrSize         = 32
	simpleReplySize    = 16
	structuredHdrSize  = 20
	maxOptionLength    = 64 << 10 // longer options are refused with ERR_TOO_BIG
	maxStringLength    = 4096     // NBD strings (names, queries)
	metaBaseAllocation = "base:allocation"
	metaBaseAllocID    = uint32(1)
)

// commandName names a command for logs and metric labels.
func commandName(t uint16) string {
	switch t {
	case cmdRead:
		return "read"
	case cmdWrite:
		return "write"
	case cmdDisc:
		return "disc"
	case cmdFlush:
		return "flush"
	case cmdTrim:
		return "trim"
	case cmdCache:
		return "cache"
	case cmdWriteZeroes:
		return "write_zeroes"
	case cmdBlockStatus:
		return "block_status"
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
