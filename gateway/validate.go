package gateway

import (
	"errors"
	"os"
	"strconv"
	"syscall"

	"goldilocks/internal/block"
)

// validate is the one place that checks a request's command, flags and
// range before any backend sees it (nbdkit's validate_request), against
// what the handshake advertised (c.flags). It returns 0 or the NBD error
// to reply with. The grant's later refusals are admit's (access.go).
func (c *conn) validate(r *request) uint32 {
	size := uint64(c.exp.Device.Size())
	known := cmdFlagFUA | cmdFlagNoHole | cmdFlagDF | cmdFlagReqOne | cmdFlagFastZero
	if c.extended {
		known |= cmdFlagPayloadLen
	}
	if r.flags&^known != 0 {
		return errInval
	}
	// With extended headers a WRITE, and only a WRITE, carries a payload
	// (BLOCK_STATUS payloads are not offered); the payload is consumed
	// either way (receivePayload).
	if c.extended && (r.typ == cmdWrite) != (r.flags&cmdFlagPayloadLen != 0) {
		return errInval
	}
	switch r.typ {
	case cmdRead, cmdWrite, cmdTrim, cmdWriteZeroes, cmdCache, cmdBlockStatus, cmdFlush:
	default:
		return errInval
	}
	// Writes to a read-only export are EPERM whatever else is wrong.
	switch r.typ {
	case cmdWrite, cmdTrim, cmdWriteZeroes:
		if c.flags&tfReadOnly != 0 {
			return errPerm
		}
	}
	// Flags only where the protocol allows them. FUA, once advertised, is
	// accepted on every command (and means nothing where nothing is
	// written).
	if r.flags&cmdFlagFUA != 0 && c.flags&tfSendFUA == 0 {
		return errInval
	}
	if r.flags&cmdFlagNoHole != 0 && r.typ != cmdWriteZeroes {
		return errInval
	}
	if r.flags&cmdFlagFastZero != 0 && (r.typ != cmdWriteZeroes || c.flags&tfSendFastZero == 0) {
		return errInval
	}
	if r.flags&cmdFlagDF != 0 && (r.typ != cmdRead || c.flags&tfSendDF == 0) {
		return errInval
	}
	if r.flags&cmdFlagReqOne != 0 && r.typ != cmdBlockStatus {
		return errInval
	}
	if r.typ == cmdFlush {
		if r.off != 0 || r.length != 0 {
			return errInval
		}
		return 0
	}
	// Commands the handshake did not advertise (the device cannot, or the
	// grant withholds them) are EINVAL, as the spec asks.
	switch {
	case r.typ == cmdTrim && c.flags&tfSendTrim == 0,
		r.typ == cmdWriteZeroes && c.flags&tfSendZeroes == 0,
		r.typ == cmdCache && c.flags&tfSendCache == 0,
		r.typ == cmdBlockStatus && !c.metaAlloc:
		return errInval
	}
	// Lengths.
	if r.length == 0 {
		return errInval
	}
	if (r.typ == cmdRead || r.typ == cmdWrite) && r.length > MaxRequestSize {
		return errInval
	}
	// Range.
	if r.off > size || uint64(r.length) > size-r.off {
		if r.typ == cmdWrite || r.typ == cmdWriteZeroes {
			return errNoSpc
		}
		return errInval
	}
	return 0
}

// errnoOf is the one place that maps internal errors to NBD errors.
func errnoOf(err error) uint32 {
	var en syscall.Errno
	switch {
	case errors.Is(err, block.ErrOutOfRange):
		return errInval
	case errors.Is(err, block.ErrReadOnly):
		return errPerm
	case errors.Is(err, block.ErrNotSupported):
		return errNotSup
	case errors.Is(err, os.ErrPermission):
		return errPerm
	case errors.As(err, &en):
		switch en {
		case syscall.ENOSPC, syscall.EDQUOT, syscall.EFBIG:
			return errNoSpc
		case syscall.EPERM, syscall.EACCES, syscall.EROFS:
			return errPerm
		case syscall.EOVERFLOW:
			return errOverflow
		case syscall.ENOMEM:
			return errNoMem
		case syscall.EOPNOTSUPP:
			return errNotSup
		case syscall.EINVAL:
			return errInval
		}
	}
	return errIO
}

// errnoName names an NBD error for logs and the audit trail.
func errnoName(e uint32) string {
	switch e {
	case errPerm:
		return "EPERM"
	case errIO:
		return "EIO"
	case errNoMem:
		return "ENOMEM"
	case errInval:
		return "EINVAL"
	case errNoSpc:
		return "ENOSPC"
	case errOverflow:
		return "EOVERFLOW"
	case errNotSup:
		return "ENOTSUP"
	}
	return "errno " + strconv.FormatUint(uint64(e), 10)
}
