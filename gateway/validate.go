package gateway

import (
	"errors"
	"os"
	"strconv"
	"syscall"

	"goldilocks/internal/block"
	"goldilocks/internal/nbdproto"
)

// validate is the one place that checks a request's command, flags and
// range before any backend sees it (nbdkit's validate_request), against
// what the handshake advertised (c.flags). It returns 0 or the NBD error
// to reply with. The grant's later refusals are admit's (access.go).
func (c *conn) validate(r *request) uint32 {
	size := uint64(c.exp.Device.Size())
	known := nbdproto.CmdFlagFUA | nbdproto.CmdFlagNoHole | nbdproto.CmdFlagDF | nbdproto.CmdFlagReqOne | nbdproto.CmdFlagFastZero
	if c.extended {
		known |= nbdproto.CmdFlagPayloadLen
	}
	if r.flags&^known != 0 {
		return nbdproto.ErrnoInval
	}
	// With extended headers a WRITE, and only a WRITE, carries a payload
	// (BLOCK_STATUS payloads are not offered); the payload is consumed
	// either way (receivePayload).
	if c.extended && (r.typ == nbdproto.CmdWrite) != (r.flags&nbdproto.CmdFlagPayloadLen != 0) {
		return nbdproto.ErrnoInval
	}
	switch r.typ {
	case nbdproto.CmdRead, nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes, nbdproto.CmdCache, nbdproto.CmdBlockStatus, nbdproto.CmdFlush:
	default:
		return nbdproto.ErrnoInval
	}
	// Writes to a read-only export are EPERM whatever else is wrong.
	switch r.typ {
	case nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes:
		if c.flags&nbdproto.FlagReadOnly != 0 {
			return nbdproto.ErrnoPerm
		}
	}
	// Flags only where the protocol allows them. FUA, once advertised, is
	// accepted on every command (and means nothing where nothing is
	// written).
	if r.flags&nbdproto.CmdFlagFUA != 0 && c.flags&nbdproto.FlagSendFUA == 0 {
		return nbdproto.ErrnoInval
	}
	if r.flags&nbdproto.CmdFlagNoHole != 0 && r.typ != nbdproto.CmdWriteZeroes {
		return nbdproto.ErrnoInval
	}
	if r.flags&nbdproto.CmdFlagFastZero != 0 && (r.typ != nbdproto.CmdWriteZeroes || c.flags&nbdproto.FlagSendFastZero == 0) {
		return nbdproto.ErrnoInval
	}
	if r.flags&nbdproto.CmdFlagDF != 0 && (r.typ != nbdproto.CmdRead || c.flags&nbdproto.FlagSendDF == 0) {
		return nbdproto.ErrnoInval
	}
	if r.flags&nbdproto.CmdFlagReqOne != 0 && r.typ != nbdproto.CmdBlockStatus {
		return nbdproto.ErrnoInval
	}
	if r.typ == nbdproto.CmdFlush {
		if r.off != 0 || r.length != 0 {
			return nbdproto.ErrnoInval
		}
		return 0
	}
	// Commands the handshake did not advertise (the device cannot, or the
	// grant withholds them) are EINVAL, as the spec asks.
	switch {
	case r.typ == nbdproto.CmdTrim && c.flags&nbdproto.FlagSendTrim == 0,
		r.typ == nbdproto.CmdWriteZeroes && c.flags&nbdproto.FlagSendZeroes == 0,
		r.typ == nbdproto.CmdCache && c.flags&nbdproto.FlagSendCache == 0,
		r.typ == nbdproto.CmdBlockStatus && !c.metaAlloc && c.metaSince == "":
		return nbdproto.ErrnoInval
	}
	// Lengths.
	if r.length == 0 {
		return nbdproto.ErrnoInval
	}
	if (r.typ == nbdproto.CmdRead || r.typ == nbdproto.CmdWrite) && r.length > MaxRequestSize {
		return nbdproto.ErrnoInval
	}
	// Range.
	if r.off > size || uint64(r.length) > size-r.off {
		if r.typ == nbdproto.CmdWrite || r.typ == nbdproto.CmdWriteZeroes {
			return nbdproto.ErrnoNoSpc
		}
		return nbdproto.ErrnoInval
	}
	return 0
}

// errnoOf is the one place that maps internal errors to NBD errors.
func errnoOf(err error) uint32 {
	var en syscall.Errno
	switch {
	case errors.Is(err, block.ErrOutOfRange):
		return nbdproto.ErrnoInval
	case errors.Is(err, block.ErrReadOnly):
		return nbdproto.ErrnoPerm
	case errors.Is(err, block.ErrNotSupported):
		return nbdproto.ErrnoNotSup
	case errors.Is(err, os.ErrPermission):
		return nbdproto.ErrnoPerm
	case errors.As(err, &en):
		switch en {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return nbdproto.ErrnoNoSpc
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return nbdproto.ErrnoPerm
		case syscall.EOVERFLOW:
			return nbdproto.ErrnoOverflow
		case syscall.ENOMEM:
			return nbdproto.ErrnoNoMem
		case syscall.EOPNOTSUPP:
			return nbdproto.ErrnoNotSup
		case syscall.EINVAL:
			return nbdproto.ErrnoInval
		}
	}
	return nbdproto.ErrnoIO
}

// errnoName names an NBD error for logs and the audit trail.
func errnoName(e uint32) string {
	switch e {
	case nbdproto.ErrnoPerm:
		return "EPERM"
	case nbdproto.ErrnoIO:
		return "EIO"
	case nbdproto.ErrnoNoMem:
		return "ENOMEM"
	case nbdproto.ErrnoInval:
		return "EINVAL"
	case nbdproto.ErrnoNoSpc:
		return "ENOSPC"
	case nbdproto.ErrnoOverflow:
		return "EOVERFLOW"
	case nbdproto.ErrnoNotSup:
		return "ENOTSUP"
	}
	return "errno " + strconv.FormatUint(uint64(e), 10)
}
