package e2e

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"time"
)

// nbdClient is the smallest NBD client the torture tool needs: fixed
// newstyle, NBD_OPT_GO, simple replies, one request at a time, so that
// which requests were answered is never in doubt. (The gateway is also
// tested with QEMU's and libnbd's clients; this one is ours so that the
// model knows exactly which request a kill interrupted.)
type nbdClient struct {
	c      net.Conn
	r      *bufio.Reader
	size   int64
	cookie uint64
}

// NBD protocol values (doc/proto.md).
const (
	nbdCmdRead        = 0
	nbdCmdWrite       = 1
	nbdCmdFlush       = 3
	nbdCmdTrim        = 4
	nbdCmdWriteZeroes = 6
	nbdFlagFUA        = 1 << 0
	nbdFlagNoHole     = 1 << 1
)

// errNBD is a request the server answered with an error.
var errNBD = errors.New("nbd: server error")

// dialNBD connects to export on the Unix socket sock.
func dialNBD(sock, export string) (*nbdClient, error) { return dialNBDOn("unix", sock, export) }

// dialNBDOn connects to export at addr on network (unix, tcp).
func dialNBDOn(network, addr, export string) (*nbdClient, error) {
	c, err := net.DialTimeout(network, addr, 5*time.Second)
	if err != nil {
		return nil, err
	}
	c.SetDeadline(time.Now().Add(30 * time.Second))
	cl := &nbdClient{c: c, r: bufio.NewReader(c)}
	if err := cl.handshake(export); err != nil {
		c.Close()
		return nil, err
	}
	c.SetDeadline(time.Time{})
	return cl, nil
}

func (cl *nbdClient) handshake(export string) error {
	var hs [18]byte
	if _, err := io.ReadFull(cl.r, hs[:]); err != nil {
		return err
	}
	if string(hs[:8]) != "NBDMAGIC" || binary.BigEndian.Uint64(hs[8:]) != 0x49484156454F5054 {
		return fmt.Errorf("nbd: not a newstyle server")
	}
	opt := make([]byte, 0, 64)
	opt = binary.BigEndian.AppendUint32(opt, 3) // FIXED_NEWSTYLE | NO_ZEROES
	opt = binary.BigEndian.AppendUint64(opt, 0x49484156454F5054)
	opt = binary.BigEndian.AppendUint32(opt, 7) // NBD_OPT_GO
	opt = binary.BigEndian.AppendUint32(opt, uint32(4+len(export)+2))
	opt = binary.BigEndian.AppendUint32(opt, uint32(len(export)))
	opt = append(opt, export...)
	opt = binary.BigEndian.AppendUint16(opt, 0)
	if _, err := cl.c.Write(opt); err != nil {
		return err
	}
	for {
		var h [20]byte
		if _, err := io.ReadFull(cl.r, h[:]); err != nil {
			return err
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		data := make([]byte, n)
		if _, err := io.ReadFull(cl.r, data); err != nil {
			return err
		}
		switch {
		case typ == 1: // ACK
			if cl.size == 0 {
				return fmt.Errorf("nbd: no export size")
			}
			return nil
		case typ == 3 && n >= 12 && binary.BigEndian.Uint16(data) == 0: // INFO_EXPORT
			cl.size = int64(binary.BigEndian.Uint64(data[2:]))
		case typ&(1<<31) != 0:
			return fmt.Errorf("nbd: export %q refused: %s", export, data)
		}
	}
}

// do sends one request and waits for its reply; into receives a READ's
// data.
func (cl *nbdClient) do(typ, flags uint16, off int64, length int, payload, into []byte) error {
	cl.cookie++
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], 0x25609513)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cl.cookie)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], uint32(length))
	if _, err := (&net.Buffers{h[:], payload}).WriteTo(cl.c); err != nil {
		return err
	}
	var r [16]byte
	if _, err := io.ReadFull(cl.r, r[:]); err != nil {
		return err
	}
	if binary.BigEndian.Uint32(r[0:]) != 0x67446698 || binary.BigEndian.Uint64(r[8:]) != cl.cookie {
		return fmt.Errorf("nbd: bad reply %x", r)
	}
	if e := binary.BigEndian.Uint32(r[4:]); e != 0 {
		return fmt.Errorf("%w: errno %d (%s %d+%d)", errNBD, e, [...]string{"read", "write", "", "flush", "trim", "", "write_zeroes"}[typ], off, length)
	}
	if typ == nbdCmdRead {
		_, err := io.ReadFull(cl.r, into[:length])
		return err
	}
	return nil
}

func (cl *nbdClient) close() { cl.c.Close() }
