// Package upstream is the upstream-NBD backend: a block.Device whose bytes
// live on another NBD server (nbd://HOST:PORT/EXPORT or
// nbd+unix:///EXPORT?socket=PATH): a SAN gateway, nbdkit, qemu-nbd, or
// another Goldilocks. It is an NBD client: fixed newstyle handshake,
// NBD_OPT_GO, simple replies, many requests in flight on one connection.
//
// It owns the client side of the protocol and nothing else: it knows
// nothing of encryption, policy or the gateway that serves its bytes.
package upstream

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"net/url"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"

	"goldilocks/internal/block"
)

// Errors callers branch on.
var (
	ErrURI         = errors.New("upstream: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
	ErrHandshake   = errors.New("upstream: NBD handshake failed")
	ErrDisconnect  = errors.New("upstream: the connection to the NBD server is lost")
	ErrUnsupported = errors.New("upstream: the NBD server does not support this")
)

// Protocol values go-nbd's protocol package lacks (doc/proto.md).
const (
	hsNoZeroes       = uint16(1 << 1) // handshake flag, and the client's reply
	clientFixed      = uint32(1 << 0)
	clientNoZeroes   = uint32(1 << 1)
	flagReadOnly     = uint16(1 << 1)
	flagSendFlush    = uint16(1 << 2)
	flagSendTrim     = uint16(1 << 5)
	flagSendZeroes   = uint16(1 << 6)
	flagSendFastZero = uint16(1 << 11)
	opFlush          = uint16(3)
	opTrim           = uint16(4)
	opWriteZeroes    = uint16(6)
	reqNoHole        = uint16(1 << 1)
	reqFastZero      = uint16(1 << 4)
	repErrBit        = uint32(1 << 31)
	defaultMaxIO     = 32 << 20
)

// Options tune a connection.
type Options struct {
	// DialTimeout bounds the connection and the handshake (0: 10 s).
	DialTimeout time.Duration
}

// Device is an NBD export used as a block device. It is safe for
// concurrent use: requests from many goroutines share one connection.
type Device struct {
	uri   string
	nc    net.Conn
	size  int64
	flags uint16
	maxIO int

	wmu sync.Mutex // one request on the wire at a time
	w   *bufio.Writer

	mu      sync.Mutex // guards the fields below
	next    uint64
	pending map[uint64]*call
	err     error // set once the connection is lost
	done    chan struct{}
}

// call is one request waiting for its reply.
type call struct {
	buf  []byte // READ: where the data goes
	errc chan error
}

var (
	_ block.Device  = (*Device)(nil)
	_ block.Trimmer = (*Device)(nil)
	_ block.Zeroer  = (*Device)(nil)
)

// IsURI reports whether s names an upstream NBD export.
func IsURI(s string) bool {
	return strings.HasPrefix(s, "nbd://") || strings.HasPrefix(s, "nbd+unix://")
}

// parse returns the network, address and export name of an NBD URI.
func parse(uri string) (network, addr, export string, err error) {
	u, err := url.Parse(uri)
	if err != nil {
		return "", "", "", fmt.Errorf("%w: %v", ErrURI, err)
	}
	export = strings.TrimPrefix(u.Path, "/")
	switch u.Scheme {
	case "nbd":
		if u.Host == "" {
			return "", "", "", fmt.Errorf("%w: %q has no host", ErrURI, uri)
		}
		host, port := u.Hostname(), u.Port()
		if port == "" {
			port = "10809"
		}
		return "tcp", net.JoinHostPort(host, port), export, nil
	case "nbd+unix":
		sock := u.Query().Get("socket")
		if sock == "" || u.Host != "" {
			return "", "", "", fmt.Errorf("%w: %q needs ?socket=PATH and no host", ErrURI, uri)
		}
		return "unix", sock, export, nil
	case "nbds", "nbds+unix":
		return "", "", "", fmt.Errorf("%w: TLS to the upstream server (%s) is not supported yet", ErrUnsupported, u.Scheme)
	}
	return "", "", "", fmt.Errorf("%w: scheme %q", ErrURI, u.Scheme)
}

// Dial connects to the export uri names and negotiates it.
func Dial(ctx context.Context, uri string, o Options) (*Device, error) {
	network, addr, export, err := parse(uri)
	if err != nil {
		return nil, err
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, o.DialTimeout)
	defer cancel()
	var dialer net.Dialer
	nc, err := dialer.DialContext(ctx, network, addr)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", uri, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	d := &Device{uri: uri, nc: nc, w: bufio.NewWriterSize(nc, 256<<10), maxIO: defaultMaxIO,
		pending: map[uint64]*call{}, done: make(chan struct{})}
	r := bufio.NewReaderSize(nc, 256<<10)
	if err := d.handshake(r, export); err != nil {
		nc.Close()
		return nil, fmt.Errorf("upstream %s: %w", uri, err)
	}
	nc.SetDeadline(time.Time{})
	go d.readReplies(r)
	return d, nil
}

// handshake: fixed newstyle, NBD_OPT_GO with a block size request.
func (d *Device) handshake(r *bufio.Reader, export string) error {
	var hello [18]byte
	if _, err := io.ReadFull(r, hello[:]); err != nil {
		return fmt.Errorf("%w: reading the greeting: %v", ErrHandshake, err)
	}
	if binary.BigEndian.Uint64(hello[0:]) != protocol.NEGOTIATION_MAGIC_OLDSTYLE ||
		binary.BigEndian.Uint64(hello[8:]) != protocol.NEGOTIATION_MAGIC_OPTION {
		return fmt.Errorf("%w: not a newstyle NBD server", ErrHandshake)
	}
	hs := binary.BigEndian.Uint16(hello[16:])
	if hs&protocol.NEGOTIATION_HANDSHAKE_FLAG_FIXED_NEWSTYLE == 0 {
		return fmt.Errorf("%w: the server does not speak fixed newstyle", ErrHandshake)
	}
	cf := clientFixed
	noZeroes := hs&hsNoZeroes != 0
	if noZeroes {
		cf |= clientNoZeroes
	}
	// NBD_OPT_GO: name, then one information request (block size).
	data := binary.BigEndian.AppendUint32(nil, uint32(len(export)))
	data = append(data, export...)
	data = binary.BigEndian.AppendUint16(data, 1)
	data = binary.BigEndian.AppendUint16(data, protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE)
	msg := binary.BigEndian.AppendUint32(nil, cf)
	msg = binary.BigEndian.AppendUint64(msg, protocol.NEGOTIATION_MAGIC_OPTION)
	msg = binary.BigEndian.AppendUint32(msg, protocol.NEGOTIATION_ID_OPTION_GO)
	msg = binary.BigEndian.AppendUint32(msg, uint32(len(data)))
	msg = append(msg, data...)
	if _, err := d.nc.Write(msg); err != nil {
		return fmt.Errorf("%w: %v", ErrHandshake, err)
	}
	gotExport := false
	for {
		var h [20]byte
		if _, err := io.ReadFull(r, h[:]); err != nil {
			return fmt.Errorf("%w: reading an option reply: %v", ErrHandshake, err)
		}
		if binary.BigEndian.Uint64(h[0:]) != protocol.NEGOTIATION_MAGIC_REPLY {
			return fmt.Errorf("%w: bad option reply magic", ErrHandshake)
		}
		typ, n := binary.BigEndian.Uint32(h[12:]), binary.BigEndian.Uint32(h[16:])
		if n > 64<<10 {
			return fmt.Errorf("%w: option reply of %d bytes", ErrHandshake, n)
		}
		body := make([]byte, n)
		if _, err := io.ReadFull(r, body); err != nil {
			return fmt.Errorf("%w: %v", ErrHandshake, err)
		}
		switch {
		case typ == protocol.NEGOTIATION_TYPE_REPLY_ACK:
			if !gotExport {
				return fmt.Errorf("%w: the server sent no export size", ErrHandshake)
			}
			return nil
		case typ == protocol.NEGOTIATION_TYPE_REPLY_INFO && n >= 2:
			switch binary.BigEndian.Uint16(body) {
			case protocol.NEGOTIATION_TYPE_INFO_EXPORT:
				if n < 12 {
					return fmt.Errorf("%w: short export information", ErrHandshake)
				}
				d.size = int64(binary.BigEndian.Uint64(body[2:]))
				d.flags = binary.BigEndian.Uint16(body[10:])
				gotExport = true
			case protocol.NEGOTIATION_TYPE_INFO_BLOCKSIZE:
				if n >= 14 {
					if max := int(binary.BigEndian.Uint32(body[10:])); max >= 4096 && max < d.maxIO {
						d.maxIO = max
					}
				}
			}
		case typ&repErrBit != 0:
			text := string(body)
			if typ == protocol.NEGOTIATION_TYPE_REPLY_ERR_UNKNOWN {
				return fmt.Errorf("%w: no export %q (%s)", ErrHandshake, export, text)
			}
			return fmt.Errorf("%w: the server refused export %q: error %d: %s", ErrHandshake, export, typ&^repErrBit, text)
		}
	}
}

// readReplies reads simple replies and wakes their callers, until the
// connection ends; then every waiting call fails.
func (d *Device) readReplies(r *bufio.Reader) {
	err := func() error {
		var h [16]byte
		for {
			if _, err := io.ReadFull(r, h[:]); err != nil {
				return err
			}
			if m := binary.BigEndian.Uint32(h[0:]); m != protocol.TRANSMISSION_MAGIC_REPLY {
				return fmt.Errorf("reply magic %#x (a structured reply? none was asked for)", m)
			}
			errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
			d.mu.Lock()
			c := d.pending[cookie]
			delete(d.pending, cookie)
			d.mu.Unlock()
			if c == nil {
				return fmt.Errorf("a reply to request %d, which is not in flight", cookie)
			}
			if errno == 0 && c.buf != nil { // a READ's data follows
				if _, err := io.ReadFull(r, c.buf); err != nil {
					c.errc <- ErrDisconnect
					return err
				}
			}
			c.errc <- errnoError(errno)
		}
	}()
	d.mu.Lock()
	if d.err == nil {
		d.err = fmt.Errorf("%w (%s): %v", ErrDisconnect, d.uri, err)
	}
	for k, c := range d.pending {
		c.errc <- d.err
		delete(d.pending, k)
	}
	d.mu.Unlock()
	close(d.done)
}

// errnoError maps an NBD error to the errno it names, so that a client of
// the gateway sees the upstream's error (ENOSPC stays ENOSPC).
func errnoError(e uint32) error {
	switch e {
	case 0:
		return nil
	case 1:
		return syscall.EPERM
	case 5:
		return syscall.EIO
	case 12:
		return syscall.ENOMEM
	case 22:
		return syscall.EINVAL
	case 28:
		return syscall.ENOSPC
	case 75:
		return syscall.EOVERFLOW
	case 95:
		return syscall.EOPNOTSUPP
	case 108:
		return syscall.ESHUTDOWN
	}
	return syscall.EIO
}

// do sends one request and waits for its reply.
func (d *Device) do(typ, flags uint16, off int64, length uint32, payload, into []byte) error {
	c := &call{buf: into, errc: make(chan error, 1)}
	d.mu.Lock()
	if d.err != nil {
		d.mu.Unlock()
		return d.err
	}
	d.next++
	cookie := d.next
	d.pending[cookie] = c
	d.mu.Unlock()

	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], protocol.TRANSMISSION_MAGIC_REQUEST)
	binary.BigEndian.PutUint16(h[4:], flags)
	binary.BigEndian.PutUint16(h[6:], typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint64(h[16:], uint64(off))
	binary.BigEndian.PutUint32(h[24:], length)
	d.wmu.Lock()
	_, err := d.w.Write(h[:])
	if err == nil && payload != nil {
		_, err = d.w.Write(payload)
	}
	if err == nil {
		err = d.w.Flush()
	}
	d.wmu.Unlock()
	if err != nil {
		d.nc.Close() // the reader then fails every call, this one too
	}
	return <-c.errc
}

// chunks runs fn over [off, off+n) in pieces the server accepts.
func (d *Device) chunks(off int64, n int, fn func(off int64, lo, hi int) error) error {
	for lo := 0; lo < n; {
		hi := min(n, lo+d.maxIO)
		if err := fn(off+int64(lo), lo, hi); err != nil {
			return err
		}
		lo = hi
	}
	return nil
}

func (d *Device) check(off, n int64) error {
	if !block.CheckRange(d.size, off, n) {
		return block.ErrOutOfRange
	}
	return nil
}

// ReadAt reads len(p) bytes at off.
func (d *Device) ReadAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	err := d.chunks(off, len(p), func(o int64, lo, hi int) error {
		return d.do(protocol.TRANSMISSION_TYPE_REQUEST_READ, 0, o, uint32(hi-lo), nil, p[lo:hi])
	})
	if err != nil {
		return 0, fmt.Errorf("upstream %s: read %d bytes at %d: %w", d.uri, len(p), off, err)
	}
	return len(p), nil
}

// WriteAt writes p at off.
func (d *Device) WriteAt(p []byte, off int64) (int, error) {
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.flags&flagReadOnly != 0 {
		return 0, fmt.Errorf("upstream %s: %w", d.uri, syscall.EROFS)
	}
	err := d.chunks(off, len(p), func(o int64, lo, hi int) error {
		return d.do(protocol.TRANSMISSION_TYPE_REQUEST_WRITE, 0, o, uint32(hi-lo), p[lo:hi], nil)
	})
	if err != nil {
		return 0, fmt.Errorf("upstream %s: write %d bytes at %d: %w", d.uri, len(p), off, err)
	}
	return len(p), nil
}

// Flush asks the server to make completed writes durable (NBD_CMD_FLUSH);
// a server that offers no flush has nothing volatile to flush.
func (d *Device) Flush() error {
	if d.flags&flagSendFlush == 0 {
		return nil
	}
	if err := d.do(opFlush, 0, 0, 0, nil, nil); err != nil {
		return fmt.Errorf("upstream %s: flush: %w", d.uri, err)
	}
	return nil
}

// Trim discards a range (NBD_CMD_TRIM), if the server offers it.
func (d *Device) Trim(off, length int64) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	if d.flags&flagSendTrim == 0 {
		return block.ErrNotSupported
	}
	return d.ranged("trim", opTrim, 0, off, length)
}

// Zero writes zeros over a range without sending them (WRITE_ZEROES),
// punching a hole where mayUnmap allows; fast refuses a slow zeroing.
func (d *Device) Zero(off, length int64, mayUnmap, fast bool) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	if d.flags&flagSendZeroes == 0 || fast && d.flags&flagSendFastZero == 0 {
		return block.ErrNotSupported
	}
	var flags uint16
	if !mayUnmap {
		flags |= reqNoHole
	}
	if fast {
		flags |= reqFastZero
	}
	err := d.ranged("write_zeroes", opWriteZeroes, flags, off, length)
	if fast && errors.Is(err, syscall.EOPNOTSUPP) {
		return block.ErrNotSupported
	}
	return err
}

// ranged sends a request with no payload over a range, in pieces that
// fit the 32-bit length.
func (d *Device) ranged(what string, typ, flags uint16, off, length int64) error {
	for length > 0 {
		n := min(length, 1<<30)
		if err := d.do(typ, flags, off, uint32(n), nil, nil); err != nil {
			return fmt.Errorf("upstream %s: %s %d bytes at %d: %w", d.uri, what, n, off, err)
		}
		off, length = off+n, length-n
	}
	return nil
}

// Size is the export's size (or the Limit set).
func (d *Device) Size() int64 { return d.size }

// Limit serves only the first size bytes of a larger export.
func (d *Device) Limit(size int64) {
	if size >= 0 && size < d.size {
		d.size = size
	}
}

// ReadOnly reports whether the server serves the export read-only.
func (d *Device) ReadOnly() bool { return d.flags&flagReadOnly != 0 }

// Close ends the connection (NBD_CMD_DISC); requests still in flight fail.
func (d *Device) Close() error {
	d.wmu.Lock()
	var h [28]byte
	binary.BigEndian.PutUint32(h[0:], protocol.TRANSMISSION_MAGIC_REQUEST)
	binary.BigEndian.PutUint16(h[6:], protocol.TRANSMISSION_TYPE_REQUEST_DISC)
	d.w.Write(h[:])
	d.w.Flush()
	d.wmu.Unlock()
	err := d.nc.Close()
	<-d.done
	return err
}
