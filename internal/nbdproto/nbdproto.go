// Package nbdproto names the numbers of the NBD protocol (doc/proto.md
// of the NBD project) that both ends here speak: the server (gateway) and
// the client of an upstream NBD store (internal/upstream). It owns wire
// values only: no I/O, no state, no behaviour. Those go-nbd's protocol
// package defines are taken from it; the rest go-nbd lacks.
package nbdproto

import "github.com/pojntfx/go-nbd/pkg/protocol"

const (
	NBDMagic             = protocol.NEGOTIATION_MAGIC_OLDSTYLE // "NBDMAGIC"
	OptMagic             = protocol.NEGOTIATION_MAGIC_OPTION   // "IHAVEOPT"
	OptReplyMagic        = protocol.NEGOTIATION_MAGIC_REPLY
	RequestMagic         = protocol.TRANSMISSION_MAGIC_REQUEST
	SimpleReplyMagic     = protocol.TRANSMISSION_MAGIC_REPLY
	StructuredReplyMagic = uint32(0x668e33ef)
	ExtRequestMagic      = uint32(0x21e41c71) // extended headers
	ExtReplyMagic        = uint32(0x6e8a278c)

	// Handshake flags (server) and client flags.
	HandshakeFixedNewstyle = protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE
	HandshakeNoZeroes      = uint16(1 << 1)
	ClientFixed            = uint32(1 << 0)
	ClientNoZeroes         = uint32(1 << 1)

	// Options.
	OptExportName      = uint32(1)
	OptAbort           = protocol.NEGOTIATION_ID_OPTION_ABORT
	OptList            = protocol.NEGOTIATION_ID_OPTION_LIST
	OptStartTLS        = uint32(5)
	OptInfo            = protocol.NEGOTIATION_ID_OPTION_INFO
	OptGo              = protocol.NEGOTIATION_ID_OPTION_GO
	OptStructuredReply = uint32(8)
	OptListMetaContext = uint32(9)
	OptSetMetaContext  = uint32(10)
	OptExtendedHeaders = uint32(11)

	// Option replies.
	RepAck         = protocol.NEGOTIATION_TYPE_REPLY_ACK
	RepServer      = protocol.NEGOTIATION_TYPE_REPLY_SERVER
	RepInfo        = protocol.NEGOTIATION_TYPE_REPLY_INFO
	RepMetaContext = uint32(4)
	RepErrUnsup    = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNSUPPORTED
	RepErrInvalid  = uint32(3 | 1<<31)
	RepErrPlatform = uint32(4 | 1<<31)
	RepErrTLSReqd  = uint32(5 | 1<<31)
	RepErrUnknown  = protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN
	RepErrShutdown = uint32(7 | 1<<31)
	RepErrTooBig   = uint32(9 | 1<<31)

	// Info types.
	InfoExport      = protocol.NEGOTIATION_TYPE_INFO_EXPORT
	InfoName        = protocol.NEGOTIATION_TYPE_INFO_NAME
	InfoDescription = protocol.NEGOTIATION_TYPE_INFO_DESCRIPTION
	InfoBlockSize   = protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE

	// Transmission flags.
	FlagHasFlags     = protocol.NEGOTIATION_REPLY_FLAGS_HAS_FLAGS
	FlagReadOnly     = uint16(1 << 1)
	FlagSendFlush    = uint16(1 << 2)
	FlagSendFUA      = uint16(1 << 3)
	FlagSendTrim     = uint16(1 << 5)
	FlagSendZeroes   = uint16(1 << 6)
	FlagSendDF       = uint16(1 << 7)
	FlagCanMultiConn = protocol.NEGOTIATION_REPLY_FLAGS_CAN_MULTI_CONN
	FlagSendCache    = uint16(1 << 10)
	FlagSendFastZero = uint16(1 << 11)

	// Commands.
	CmdRead        = protocol.TRANSMISSION_TYPE_REQUEST_READ
	CmdWrite       = protocol.TRANSMISSION_TYPE_REQUEST_WRITE
	CmdDisc        = protocol.TRANSMISSION_TYPE_REQUEST_DISC
	CmdFlush       = uint16(3)
	CmdTrim        = uint16(4)
	CmdCache       = uint16(5)
	CmdWriteZeroes = uint16(6)
	CmdBlockStatus = uint16(7)
	NumCommands    = 8

	// Command flags.
	CmdFlagFUA        = uint16(1 << 0)
	CmdFlagNoHole     = uint16(1 << 1)
	CmdFlagDF         = uint16(1 << 2)
	CmdFlagReqOne     = uint16(1 << 3)
	CmdFlagFastZero   = uint16(1 << 4)
	CmdFlagPayloadLen = uint16(1 << 5) // extended headers: length is the payload's

	// Structured reply types and flags.
	ReplyFlagDone       = uint16(1 << 0)
	ReplyNone           = uint16(0)
	ReplyOffsetData     = uint16(1)
	ReplyOffsetHole     = uint16(2)
	ReplyBlockStatus    = uint16(5)
	ReplyBlockStatusExt = uint16(6)
	ReplyError          = uint16(1<<15 + 1)
	ReplyErrorOffset    = uint16(1<<15 + 2)

	// Error values (they are Linux errno values, fixed by the protocol).
	ErrnoPerm     = protocol.TRANSMISSION_ERROR_EPERM
	ErrnoIO       = uint32(5)
	ErrnoNoMem    = uint32(12)
	ErrnoInval    = protocol.TRANSMISSION_ERROR_EINVAL
	ErrnoNoSpc    = uint32(28)
	ErrnoOverflow = uint32(75)
	ErrnoNotSup   = uint32(95)

	// Sizes.
	RequestSize        = 28
	ExtRequestSize     = 32
	ExtHdrSize         = 32
	SimpleReplySize    = 16
	StructuredHdrSize  = 20
	MaxStringLength    = 4096 // NBD strings (names, queries)
	MetaBaseAllocation = "base:allocation"
)

// Bits the protocol sets in a value to mark an error.
const (
	RepErrBit   = uint32(1 << 31) // an option reply type that is an error
	ReplyErrBit = uint16(1 << 15) // a structured reply chunk type that is an error
)
