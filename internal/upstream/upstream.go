// Package upstream is the upstream-NBD backend: a block.Device whose bytes
// live on another NBD server (nbd://HOST:PORT/EXPORT or
// nbd+unix:///EXPORT?socket=PATH): a SAN gateway, nbdkit, qemu-nbd, or
// another Goldilocks. It is an NBD client: fixed newstyle handshake,
// structured replies and the base:allocation meta context where the
// server offers them (block status passed through), NBD_OPT_GO, many
// requests in flight, on several connections where the server advertises
// multi-conn.
//
// It owns the client side of the protocol and nothing else: it knows
// nothing of encryption, policy or the gateway that serves its bytes.
package upstream

import (
	"bufio"
	"cmp"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime"
	"slices"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/pojntfx/go-nbd/pkg/protocol"

	"goldilocks/audit"
	"goldilocks/internal/block"
	"goldilocks/internal/nbdproto"
	"goldilocks/internal/rawsock"
)

// Errors callers branch on.
var (
	ErrURI        = errors.New("upstream: not an NBD URI (nbd://HOST[:PORT]/EXPORT or nbd+unix:///EXPORT?socket=PATH)")
	ErrHandshake  = errors.New("upstream: NBD handshake failed")
	ErrDisconnect = errors.New("upstream: the connection to the NBD server is lost")
)

// Protocol values go-nbd's protocol package lacks (doc/proto.md).
const (
	defaultMaxIO = 32 << 20
	directWrite  = 64 << 10 // a write payload this large bypasses the link's buffer
)

// unixSendBuffer is asked of a Unix socket's SO_SNDBUF (the kernel caps
// it at net.core.wmem_max, then doubles it). With the default of 208 KiB
// a 1 MiB WRITE left in about eleven writev calls, each waiting for the
// server to read: fio write 1M qd8 through the gateway to qemu-nbd took
// 11.4 writes and 17 context switches per request; with this, 2.4 and
// 13, and 1,285–1,457 MB/s against 1,029–1,176 without (bench/README.md,
// "Upstream: a larger send buffer, and qemu-nbd's CPU"). A TCP socket's
// buffer is left to the kernel's autotuning, which setting it disables.
const unixSendBuffer = 4 << 20

// Options tune a connection.
type Options struct {
	// DialTimeout bounds one connection attempt and its handshake (0: 10 s).
	DialTimeout time.Duration
	// OutageLimit is how long requests wait while the server is
	// unreachable, reconnecting with backoff, before they fail with EIO
	// (0: 30 s). Within it a client sees latency, not errors.
	OutageLimit time.Duration
	// ReplyTimeout is how long a request waits for its reply on a
	// connection that is up before the connection counts as lost: a
	// server that holds requests without answering is then reconnected
	// and sent them again, and the outage limit applies (0: 2 min).
	ReplyTimeout time.Duration
	// Conns is how many connections a server that advertises multi-conn
	// (NBD_FLAG_CAN_MULTI_CONN: a FLUSH on one covers writes completed on
	// any) gets (0: 4, as nbdcopy opens). A server serves a connection's
	// requests a bounded number at a time (QEMU's, 16), so one connection
	// caps the requests in flight. The first connection is made at Dial
	// and after each outage; the others are added in the background, and
	// one that fails (a server at its connection limit) just leaves fewer.
	Conns int
	// Spill is how many requests in flight one connection carries before
	// the next takes some (0: 32, see spill).
	Spill int
	// Log receives outages and recoveries (event=backing_outage,
	// backing_restored: they reach the audit trail); nil: discarded.
	Log *slog.Logger
	// Lease, if set, is checked before every request is sent or sent
	// again after an outage, and released at Close, or abandoned if a
	// request failed unanswered (lease.go).
	Lease Lease
	// UserTimeout, if set, is TCP_USER_TIMEOUT on TCP connections: how
	// long sent data may stay unacknowledged before the connection counts
	// as lost (a leased export: shorter than the lease's margin).
	UserTimeout time.Duration
	// retry is the first wait between reconnection attempts, doubled up
	// to 2 s (0: 50 ms); the fuzz targets shorten it.
	retry time.Duration
}

// Device is an NBD export used as a block device. It is safe for
// concurrent use: requests from many goroutines share its connections
// (one, or Options.Conns where the server advertises multi-conn).
//
// When a connection is lost, all of them are dropped; requests in flight
// are kept and sent again, in order, on the first connection back (a
// write at a fixed offset is idempotent; a FLUSH goes after the writes
// sent before it), the others are added after, new requests wait, and
// the device reconnects with backoff; after Options.OutageLimit they all
// fail with EIO (ErrDisconnect), and later ones fail at once until a
// reconnection in the background succeeds.
type Device struct {
	uri   string
	t     target
	o     Options
	size  int64
	flags uint16
	maxIO int
	// blockStatus: the server answers NBD_CMD_BLOCK_STATUS for
	// base:allocation (structured replies negotiated). Set at Dial, then
	// read only; every later connection must offer it too.
	blockStatus bool
	calls       sync.Pool   // *call: a request allocates nothing once warm
	unpushed    atomic.Bool // a link may hold submitted requests (Push)
	fenced      atomic.Bool // the lease was found lost (logged once)

	mu sync.Mutex // guards the fields below
	// links are the connections up (nil while disconnected): the first
	// made, then those widen added. A loss of any ends them all (an
	// outage), and old keeps them until their readers have ended, which
	// reconnect waits for before it sends anything again.
	links   []*link
	old     []*link
	gen     uint64 // counts outages: widen adds a link only to the generation it dialled for
	next    uint64
	pending map[uint64]*call
	down    time.Time // when the current outage began; zero: connected
	failed  error     // set once an outage outlasts the limit
	closed  bool
	redial  bool // a reconnection loop runs
	// unanswered: a request was failed without its reply (failLocked),
	// so the server may still carry it out (Close: the lease).
	unanswered bool
}

// link is one connection to the server.
type link struct {
	nc         net.Conn
	rs         *rawsock.Conn // nc with raw system calls (no TLS); or nil
	wmu        sync.Mutex    // one request on the wire at a time
	w          *bufio.Writer
	held       bool          // w holds submitted requests not yet sent (Push); guarded by wmu
	iovArr     [2][]byte     // a large write's header and payload; guarded by wmu
	iov        net.Buffers   // over iovArr
	hdr        [28]byte      // the request header being written; guarded by wmu
	done       chan struct{} // the reader ended
	inflight   int           // requests sent on it whose reply has not come; guarded by the Device's mu
	structured bool          // structured replies negotiated on this connection
	hasMeta    bool          // base:allocation negotiated, with context id meta
	meta       uint32        // (qemu-nbd's id for it is 0)
}

// call is one request, kept until its reply so that it can be sent again.
type call struct {
	typ, flags uint16
	off        int64
	length     uint32
	payload    []byte // WRITE
	buf        []byte // READ: where the data goes
	errc       chan error
	// done, if set, takes the result instead of errc (Submit*): the call
	// goes back to the pool first.
	done func(error, *block.Batch)
	// Structured replies, reset at each send: the first error chunk's
	// errno, which parts of a READ's buffer the chunks filled, a block
	// status request's extents (at most max).
	serr    uint32
	got     int64      // a READ's buffer is filled from 0 to got...
	ranges  [][2]int64 // ...and in these ranges beyond (chunks out of order)
	status  bool       // a block status chunk came
	extents []block.Extent
	max     int
	// resending: how many reconnections are writing it on a new link
	// (two, when a link breaks while the last one still sends); guarded
	// by the Device's mu. A reply to it meanwhile is a protocol violation.
	resending int
	// senders counts the writes of it under way (send, reconnect): a
	// write on a link that broke may still read it after its reply came
	// on the next, so its result waits for them (settle) before the
	// caller takes back its buffer and the call goes back to the pool.
	senders atomic.Int32
	since   time.Time // when it was last (re)sent; guarded by mu
	on      *link     // the link it was last sent on (inflight); guarded by mu
	// reading: a reader is filling its reply (c.buf); guarded by mu.
	// failLocked leaves it to the reader, which completes it or, if the
	// connection breaks, gives it back first.
	reading bool
}

var (
	_ block.Device    = (*Device)(nil)
	_ block.Capable   = (*Device)(nil)
	_ block.Trimmer   = (*Device)(nil)
	_ block.Zeroer    = (*Device)(nil)
	_ block.Extenter  = (*Device)(nil)
	_ block.FUAWriter = (*Device)(nil)
	_ block.Submitter = (*Device)(nil)
)

// Caps: trim and zero, block status if the server offers base:allocation;
// not CanFastWrite (every write is a round trip).
func (d *Device) Caps() block.Caps {
	c := block.CanTrim | block.CanZero | block.CanSubmit
	if d.blockStatus {
		c |= block.CanExtents
	}
	return c
}

// Dial connects to the export uri names and negotiates it.
func Dial(ctx context.Context, uri string, o Options) (*Device, error) {
	t, err := parse(uri)
	if err != nil {
		return nil, err
	}
	if o.DialTimeout <= 0 {
		o.DialTimeout = 10 * time.Second
	}
	if o.OutageLimit <= 0 {
		o.OutageLimit = 30 * time.Second
	}
	if o.ReplyTimeout <= 0 {
		o.ReplyTimeout = 2 * time.Minute
	}
	if o.Log == nil {
		o.Log = slog.New(slog.NewTextHandler(io.Discard, nil))
	}
	if o.retry <= 0 {
		o.retry = 50 * time.Millisecond
	}
	d := &Device{uri: uri, t: t, o: o, maxIO: defaultMaxIO, pending: map[uint64]*call{}}
	d.calls.New = func() any { return &call{errc: make(chan error, 1)} }
	l, r, err := d.connect(ctx, true)
	if err != nil {
		return nil, fmt.Errorf("upstream %s: %w", uri, err)
	}
	d.links = []*link{l}
	go d.readReplies(l, r)
	go d.watchdog()
	go d.widen(0)
	return d, nil
}

// widen adds connections up to Options.Conns, one at a time, where the
// server advertises multi-conn, while the device stays in generation gen.
// A connection the server does not complete in time (qemu-nbd at its -e
// limit accepts and never answers) ends the widening: fewer links.
func (d *Device) widen(gen uint64) {
	want := d.o.Conns
	if want <= 0 {
		want = 4
	}
	if d.flags&nbdproto.FlagCanMultiConn == 0 {
		return
	}
	for {
		d.mu.Lock()
		n, stale := len(d.links), d.closed || d.gen != gen || d.links == nil
		d.mu.Unlock()
		if stale || n >= want {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), min(d.o.DialTimeout, 2*time.Second))
		l, r, err := d.connect(ctx, false)
		cancel()
		if err != nil {
			d.o.Log.Debug("backing store: no further connection", "backing", d.uri, "conns", n, "err", err)
			return
		}
		d.mu.Lock()
		if d.closed || d.gen != gen || d.links == nil {
			d.mu.Unlock()
			l.nc.Close()
			return
		}
		d.links = append(d.links[:len(d.links):len(d.links)], l) // a new array: Push may range over the old
		d.mu.Unlock()
		go d.readReplies(l, r)
	}
}

// conns is how many connections are up.
func (d *Device) conns() int {
	d.mu.Lock()
	defer d.mu.Unlock()
	return len(d.links)
}

// watchdog drops a connection on which a request has waited longer than
// the reply timeout (see Options.ReplyTimeout), until the device closes.
func (d *Device) watchdog() {
	tick := time.NewTicker(min(max(d.o.ReplyTimeout/4, time.Millisecond), time.Second))
	defer tick.Stop()
	for range tick.C {
		d.mu.Lock()
		if d.closed {
			d.mu.Unlock()
			return
		}
		links, stale := d.links, false
		if links != nil {
			for _, c := range d.pending {
				if c.resending == 0 && time.Since(c.since) > d.o.ReplyTimeout {
					stale = true
					break
				}
			}
		}
		d.mu.Unlock()
		if stale {
			d.o.Log.Warn("backing store holds a request without answering: reconnecting", "backing", d.uri,
				"reply_timeout", d.o.ReplyTimeout.String())
			links[0].nc.Close() // its reader sees it: an outage begins, the requests are sent again
		}
	}
}

// connect dials and negotiates one connection; first records the
// export's size and flags, a later one checks that the size is the same.
func (d *Device) connect(ctx context.Context, first bool) (*link, *bufio.Reader, error) {
	ctx, cancel := context.WithTimeout(ctx, d.o.DialTimeout)
	defer cancel()
	var dialer net.Dialer
	nc, err := dialer.DialContext(ctx, d.t.network, d.t.addr)
	if err != nil {
		return nil, nil, err
	}
	if err := setUserTimeout(nc, d.o.UserTimeout); err != nil {
		nc.Close()
		return nil, nil, fmt.Errorf("upstream %s: TCP_USER_TIMEOUT: %w", d.uri, err)
	}
	if dl, ok := ctx.Deadline(); ok {
		nc.SetDeadline(dl)
	}
	nc, r, neg, err := handshake(ctx, nc, d.t)
	size, flags, maxIO := neg.size, neg.flags, neg.maxIO
	// Coming back with another size is another disk: refused. Other flags
	// may change (a server that comes back read-only answers writes with
	// EPERM, which the client gets). Block status must stay as it was
	// (its context id is the new connection's).
	if err == nil && !first && size != d.size {
		err = fmt.Errorf("%w: the export changed while disconnected (size %d, was %d)", ErrHandshake, size, d.size)
	}
	if err == nil && !first && neg.hasMeta != d.blockStatus {
		err = fmt.Errorf("%w: the server no longer offers the same block status", ErrHandshake)
	}
	if err != nil {
		nc.Close()
		return nil, nil, err
	}
	if first {
		d.size, d.flags, d.maxIO, d.blockStatus = size, flags, maxIO, neg.hasMeta
	}
	nc.SetDeadline(time.Time{})
	l := &link{nc: nc, done: make(chan struct{}), structured: neg.structured, hasMeta: neg.hasMeta, meta: neg.meta}
	var w io.Writer = nc
	if uc, ok := nc.(*net.UnixConn); ok {
		if err := uc.SetWriteBuffer(unixSendBuffer); err != nil {
			d.o.Log.Warn("upstream send buffer not enlarged", "backing", d.uri, "err", err)
		}
	}
	// Without TLS, requests and replies go by raw system calls (package
	// rawsock). The handshake's reader holds nothing more: the server
	// says nothing until asked.
	if rs, err := rawsock.New(nc); err == nil && r.Buffered() == 0 {
		l.rs, w = rs, rs
		r.Reset(rs)
	}
	l.w = bufio.NewWriterSize(w, 256<<10)
	return l, r, nil
}

// readReplies reads replies on l, simple or structured, and wakes their
// callers, until the connection ends; then the outage begins (lost).
func (d *Device) readReplies(l *link, r *bufio.Reader) {
	defer close(l.done)
	var (
		// batch: what the completions of the replies read since the
		// reader last had to wait for the socket left to do (the
		// gateway's replies to its clients): run before any read that
		// the buffer cannot serve whole (ready).
		batch block.Batch
		h     [20]byte
		b     [16]byte // a chunk's fixed fields (chunk): here, once per reader, not once per chunk
		// owned: calls whose replies are being read (structured chunks of
		// several replies may interleave): failLocked leaves them.
		owned []*call
	)
	// drop ends the connection, giving back the calls being read.
	drop := func(err error) {
		batch.Run()
		d.mu.Lock()
		for _, c := range owned {
			c.reading = false
		}
		d.mu.Unlock()
		d.lost(l, err)
	}
	// ready runs the batch unless the next n bytes are buffered: reading
	// them may wait for the server.
	ready := func(n int) {
		if r.Buffered() < n {
			batch.Run()
		}
	}
	for {
		ready(16)
		if _, err := io.ReadFull(r, h[:16]); err != nil {
			drop(err)
			return
		}
		m := binary.BigEndian.Uint32(h[0:])
		structured := m == nbdproto.StructuredReplyMagic && l.structured
		if !structured && m != protocol.TRANSMISSION_MAGIC_REPLY {
			drop(fmt.Errorf("reply magic %#x", m))
			return
		}
		if structured {
			ready(4)
			if _, err := io.ReadFull(r, h[16:20]); err != nil {
				drop(err)
				return
			}
		}
		cookie := binary.BigEndian.Uint64(h[8:])
		d.mu.Lock()
		c := d.pending[cookie]
		early := c != nil && c.resending > 0
		if c != nil && !early && !c.reading {
			c.reading = true
			owned = append(owned, c)
		}
		d.mu.Unlock()
		if c == nil {
			drop(fmt.Errorf("a reply to request %d, which is not in flight", cookie))
			return
		}
		if early { // a hostile or broken server: c is still being sent
			drop(fmt.Errorf("a reply to request %d before it was sent again", cookie))
			return
		}
		var errno uint32
		if structured {
			ready(int(binary.BigEndian.Uint32(h[16:])))
			done, err := d.chunk(l, r, c, h[:], &b)
			if err != nil {
				drop(err) // c stays pending: it is sent again
				return
			}
			if !done {
				continue
			}
			errno = c.serr
		} else {
			errno = binary.BigEndian.Uint32(h[4:])
			if errno == 0 && c.buf != nil { // a READ's data follows
				ready(len(c.buf))
				if _, err := io.ReadFull(r, c.buf); err != nil {
					drop(err) // c stays pending: it is sent again
					return
				}
			}
			if errno == 0 && c.typ == nbdproto.CmdBlockStatus {
				drop(errors.New("a simple reply to a block status request"))
				return
			}
		}
		d.mu.Lock()
		delete(d.pending, cookie)
		c.sentOn(nil)
		c.reading = false
		owned = slices.DeleteFunc(owned, func(o *call) bool { return o == c })
		if slices.Contains(d.links, l) {
			d.down = time.Time{} // a whole, valid reply on a link up: any outage is over
		} // (one a lost link had buffered says nothing of the outage it began)
		d.mu.Unlock()
		d.complete(c, errnoError(errno), &batch)
	}
}

// complete hands c's result to its caller: a submitter's done function
// (the call goes back to the pool first), with the batch of the reader
// that runs it (nil: none), or the waiting caller.
func (d *Device) complete(c *call, err error, b *block.Batch) {
	c.settle()
	if done := c.done; done != nil {
		c.done, c.payload, c.buf = nil, nil, nil
		d.calls.Put(c)
		done(err, b)
		return
	}
	c.errc <- err
}

// settle waits until no write of c is under way. Only a write on a link
// that broke (its connection closed, so the write fails at once) can
// outlast c's reply: the race detector found one such, a reconnection's
// resend overtaken by the next reconnection's.
func (c *call) settle() {
	for c.senders.Load() != 0 {
		runtime.Gosched()
	}
}

// chunk reads the rest of one structured reply chunk for c (its 20-byte
// header in h; b is the reader's room for the chunk's fixed fields) and
// reports whether it was the last. A chunk that does not
// fit its request is a protocol violation: the connection ends, and c is
// sent again on the next (the outage goes on until a whole, valid reply).
func (d *Device) chunk(l *link, r *bufio.Reader, c *call, h []byte, b *[16]byte) (done bool, err error) {
	flags, typ, n := binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]), binary.BigEndian.Uint32(h[16:])
	done = flags&nbdproto.ReplyFlagDone != 0
	readN := func(k int) ([]byte, error) {
		if uint32(k) > n {
			return nil, fmt.Errorf("structured reply type %d of %d bytes, too short", typ, n)
		}
		_, err := io.ReadFull(r, b[:k])
		n -= uint32(k)
		return b[:k], err
	}
	switch {
	case typ == nbdproto.ReplyNone:
		if n != 0 || !done {
			return false, errors.New("a NONE chunk with a payload or without DONE")
		}
	case typ == nbdproto.ReplyOffsetData && c.buf != nil:
		p, err := readN(8)
		if err != nil {
			return false, err
		}
		at, size := int64(binary.BigEndian.Uint64(p))-c.off, int64(n)
		if err := c.cover(at, size); err != nil {
			return false, err
		}
		if _, err := io.ReadFull(r, c.buf[at:at+size]); err != nil {
			return false, err
		}
		n = 0
	case typ == nbdproto.ReplyOffsetHole && c.buf != nil:
		p, err := readN(12)
		if err != nil {
			return false, err
		}
		at, size := int64(binary.BigEndian.Uint64(p))-c.off, int64(binary.BigEndian.Uint32(p[8:]))
		if n != 0 {
			return false, errors.New("a hole chunk longer than 12 bytes")
		}
		if err := c.cover(at, size); err != nil {
			return false, err
		}
		clear(c.buf[at : at+size])
	case typ == nbdproto.ReplyBlockStatus && c.typ == nbdproto.CmdBlockStatus:
		p, err := readN(4)
		if err != nil {
			return false, err
		}
		if !l.hasMeta || binary.BigEndian.Uint32(p) != l.meta || n < 8 || n%8 != 0 || c.status {
			return false, errors.New("a block status chunk for another context, a second one, or malformed")
		}
		c.status = true
		for n > 0 {
			if p, err = readN(8); err != nil {
				return false, err
			}
			length, fl := int64(binary.BigEndian.Uint32(p)), binary.BigEndian.Uint32(p[4:])&(block.ExtentHole|block.ExtentZero)
			if length == 0 {
				return false, errors.New("a block status extent of length 0")
			}
			if len(c.extents) < c.max {
				c.extents = append(c.extents, block.Extent{Length: length, Flags: fl})
			}
		}
	case typ&nbdproto.ReplyErrBit != 0:
		p, err := readN(6)
		if err != nil {
			return false, err
		}
		if c.serr == 0 {
			c.serr = binary.BigEndian.Uint32(p)
			if c.serr == 0 {
				c.serr = 5 // an error chunk without an error: EIO
			}
		}
		msg := int(binary.BigEndian.Uint16(p[4:]))
		if uint32(msg) > n || typ == nbdproto.ReplyErrorOffset && n != uint32(msg)+8 {
			return false, fmt.Errorf("error chunk of %d bytes with a %d-byte message", n, msg)
		}
		if _, err := r.Discard(int(n)); err != nil {
			return false, err
		}
		n = 0
	default:
		return false, fmt.Errorf("structured reply type %d to a request of type %d", typ, c.typ)
	}
	if n != 0 {
		return false, fmt.Errorf("structured reply type %d longer than its content", typ)
	}
	if done && c.serr == 0 {
		// A READ's chunks must have filled it (so no byte of the buffer
		// is left as it was); a block status must say something.
		if c.buf != nil && (c.got != int64(len(c.buf)) || len(c.ranges) != 0) {
			return false, fmt.Errorf("a read of %d bytes answered with %d", len(c.buf), c.got)
		}
		if c.typ == nbdproto.CmdBlockStatus && len(c.extents) == 0 {
			return false, errors.New("a block status reply without extents")
		}
	}
	return done, nil
}

// maxRanges bounds the out-of-order pieces of one READ's reply.
const maxRanges = 256

// cover records that a READ chunk fills [at, at+size) of c's buffer: in
// range, not empty, and (before an error chunk) not over a part already
// filled. In order it only moves got; out of order it is kept in ranges
// until got reaches it.
func (c *call) cover(at, size int64) error {
	if at < 0 || size <= 0 || at+size > int64(len(c.buf)) {
		return fmt.Errorf("read chunk at %d+%d outside the request of %d bytes", at, size, len(c.buf))
	}
	if c.serr != 0 {
		return nil // after an error the reply fails anyway; its content must only stay in bounds
	}
	if at < c.got {
		return fmt.Errorf("read chunk at %d+%d over bytes already sent", at, size)
	}
	i, _ := slices.BinarySearchFunc(c.ranges, at, func(r [2]int64, at int64) int { return cmp.Compare(r[0], at) })
	if i > 0 && c.ranges[i-1][1] > at || i < len(c.ranges) && c.ranges[i][0] < at+size {
		return fmt.Errorf("read chunk at %d+%d over bytes already sent", at, size)
	}
	if at == c.got {
		c.got += size
		for len(c.ranges) > 0 && c.ranges[0][0] == c.got {
			c.got = c.ranges[0][1]
			c.ranges = c.ranges[1:]
		}
		return nil
	}
	if len(c.ranges) >= maxRanges {
		return errors.New("a read answered in too many pieces out of order")
	}
	c.ranges = slices.Insert(c.ranges, i, [2]int64{at, at + size})
	return nil
}

// lost handles the end of connection l: unless the device is closed, an
// outage begins (or goes on) and a reconnection loop starts.
func (d *Device) lost(l *link, cause error) {
	l.nc.Close()
	d.mu.Lock()
	defer d.mu.Unlock()
	if !slices.Contains(d.links, l) {
		return // a link of an outage already under way
	}
	for _, o := range d.links {
		o.nc.Close()
	}
	d.old = append(d.old, d.links...)
	d.links = nil
	d.gen++
	if d.closed {
		d.failLocked(fmt.Errorf("%w (%s): closed", ErrDisconnect, d.uri))
		return
	}
	if d.down.IsZero() {
		d.down = time.Now()
		if !d.fenced.Load() { // a link dropped by the fence is no outage (lease_lost says why)
			d.o.Log.Error("backing store unreachable: requests wait while reconnecting", "event", audit.EvBackingOutage,
				"backing", d.uri, "err", cause, "in_flight", len(d.pending), "limit", d.o.OutageLimit.String())
		}
	} else if d.failed != nil {
		d.failLocked(syscall.EIO) // what a reader or a resend held when the limit passed
	} else if time.Since(d.down) > d.o.OutageLimit {
		// Reconnections that succeed and break again before an answer:
		// the same outage, and it has lasted too long.
		d.failed = fmt.Errorf("%w (%s) for more than %s: %v", ErrDisconnect, d.uri, d.o.OutageLimit, cause)
		d.o.Log.Error("backing store unreachable beyond the outage limit: requests fail with EIO until it is back",
			"event", audit.EvBackingOutage, "backing", d.uri, "err", cause, "failed", len(d.pending))
		d.failLocked(syscall.EIO)
	}
	if !d.redial {
		d.redial = true
		go d.reconnect()
	}
}

// failLocked fails every request in flight with err.
// A call that reconnect is still sending stays: reconnect's loop goes on
// checking the limit and fails it once the send is over (its caller must
// not take it back to the pool while it is written).
func (d *Device) failLocked(err error) {
	if len(d.pending) > 0 {
		d.unanswered = true
	}
	for k, c := range d.pending {
		if c.resending > 0 || c.reading {
			continue
		}
		delete(d.pending, k)
		c.sentOn(nil)
		if c.done != nil {
			go d.complete(c, err, nil) // not under mu: done sends a reply
			continue
		}
		c.errc <- err
	}
}

// reconnect dials with backoff until it succeeds or the device closes;
// past the outage limit the requests waiting fail, and it keeps trying.
func (d *Device) reconnect() {
	// The readers of the links lost must end first: one may still be
	// reading a reply it had buffered, for a call sent again below.
	d.mu.Lock()
	old := d.old
	d.old = nil
	d.mu.Unlock()
	for _, o := range old {
		<-o.done
	}
	wait := d.o.retry
	for {
		l, r, err := d.connect(context.Background(), false)
		d.mu.Lock()
		if d.closed || d.fenceLocked() { // a lease lost: nothing is sent again
			d.redial = false
			d.mu.Unlock()
			if l != nil {
				l.nc.Close()
			}
			return
		}
		if err == nil {
			d.links, d.redial = []*link{l}, false
			gen := d.gen
			outage := time.Since(d.down)
			d.failed = nil
			if len(d.pending) == 0 {
				d.down = time.Time{}
			} // else the outage ends at the first reply on l (readReplies): a
			// server that accepts and then breaks every connection must not
			// keep requests waiting past the limit

			again := make([]*call, 0, len(d.pending))
			cookies := make([]uint64, 0, len(d.pending))
			for k := range d.pending {
				cookies = append(cookies, k)
			}
			slices.Sort(cookies) // in the order first sent: a FLUSH after its writes
			for _, k := range cookies {
				c := d.pending[k]
				c.resending++ // readReplies: no reply to it before it is sent
				c.senders.Add(1)
				c.sentOn(l)
				c.resetReply()
				again = append(again, c)
			}
			l.wmu.Lock() // new requests queue behind the ones sent again
			d.mu.Unlock()
			go d.readReplies(l, r)
			var werr error
			for i, c := range again {
				if werr == nil {
					if werr = d.fence(); werr == nil {
						werr = l.write(cookies[i], c)
					}
				}
				d.mu.Lock()
				c.resending--
				d.mu.Unlock()
				c.senders.Add(-1) // from here on this goroutine leaves c alone
			}
			if werr == nil {
				werr = l.w.Flush()
			}
			l.wmu.Unlock()
			if werr != nil {
				l.nc.Close() // the reader sees it: the outage goes on
			}
			d.mu.Lock() // what failLocked left while it was being sent
			if d.closed {
				d.failLocked(fmt.Errorf("%w (%s): closed", ErrDisconnect, d.uri))
			} else if d.failed != nil {
				d.failLocked(syscall.EIO)
			}
			d.mu.Unlock()
			d.o.Log.Info("backing store reachable again", "event", audit.EvBackingRestored, "backing", d.uri,
				"outage_seconds", outage.Round(time.Millisecond).Seconds(), "resent", len(again))
			d.widen(gen)
			return
		}
		if d.failed == nil && time.Since(d.down) > d.o.OutageLimit {
			d.failed = fmt.Errorf("%w (%s) for more than %s: %v", ErrDisconnect, d.uri, d.o.OutageLimit, err)
			d.o.Log.Error("backing store unreachable beyond the outage limit: requests fail with EIO until it is back",
				"event", audit.EvBackingOutage, "backing", d.uri, "err", err, "failed", len(d.pending))
			d.failLocked(syscall.EIO)
		}
		d.mu.Unlock()
		time.Sleep(wait)
		wait = min(2*wait, 2*time.Second)
	}
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

// resetReply clears what a reply to c fills, before it is sent (again);
// the caller holds d.mu and c is not visible to a reader meanwhile.
func (c *call) resetReply() {
	c.serr, c.got, c.status, c.extents, c.ranges = 0, 0, false, c.extents[:0], c.ranges[:0]
	c.since = time.Now()
}

// write puts c's request (and payload) in l's buffer; the caller holds
// l.wmu and flushes, and counts itself in c.senders: c's reply may come
// as soon as the header is out (a full buffer sends it), and its result
// waits for the count (settle).
func (l *link) write(cookie uint64, c *call) error {
	payload := c.payload
	h := &l.hdr // in the link: a local array would escape (bufio may hand it to the socket)
	binary.BigEndian.PutUint32(h[0:], protocol.TRANSMISSION_MAGIC_REQUEST)
	binary.BigEndian.PutUint16(h[4:], c.flags)
	binary.BigEndian.PutUint16(h[6:], c.typ)
	binary.BigEndian.PutUint64(h[8:], cookie)
	binary.BigEndian.PutUint64(h[16:], uint64(c.off))
	binary.BigEndian.PutUint32(h[24:], c.length)
	if len(payload) >= directWrite {
		// A large payload goes out with its header in one writev, not
		// partly copied through the buffer first (what the buffer holds
		// goes before it).
		if err := l.w.Flush(); err != nil {
			return err
		}
		l.iovArr = [2][]byte{h[:], payload}
		var err error
		if l.rs != nil {
			_, err = l.rs.Writev(l.iovArr[:])
		} else {
			l.iov = l.iovArr[:] // WriteTo consumes the slice, not the array
			_, err = l.iov.WriteTo(l.nc)
		}
		l.iovArr[1] = nil
		return err
	}
	if _, err := l.w.Write(h[:]); err != nil {
		return err
	}
	if payload != nil {
		_, err := l.w.Write(payload)
		return err
	}
	return nil
}

// do sends one request and waits for its reply, across reconnections.
func (d *Device) do(typ, flags uint16, off int64, length uint32, payload, into []byte) error {
	c := d.calls.Get().(*call)
	c.typ, c.flags, c.off, c.length, c.payload, c.buf = typ, flags, off, length, payload, into
	err := d.wait(c)
	c.payload, c.buf = nil, nil
	d.calls.Put(c) // no one holds c once its reply is taken
	return err
}

// wait registers c, sends it and waits for its reply.
func (d *Device) wait(c *call) error {
	if err := d.send(c, false); err != nil {
		return err
	}
	err := <-c.errc
	c.settle() // failLocked sends on errc without waiting
	return err
}

// send registers c and sends it, or with hold leaves it in the link's
// buffer for Push; its reply completes it (complete). An error means c was
// neither registered nor sent.
func (d *Device) send(c *call, hold bool) error {
	d.mu.Lock()
	switch {
	case d.closed:
		d.mu.Unlock()
		return fmt.Errorf("%w (%s): closed", ErrDisconnect, d.uri)
	case d.failed != nil:
		err := errors.Join(syscall.EIO, d.failed)
		d.mu.Unlock()
		return err
	}
	if err := d.fence(); err != nil {
		d.mu.Unlock()
		return err
	}
	d.next++
	cookie := d.next
	c.resetReply()
	d.pending[cookie] = c
	l := d.pick() // nil while reconnecting: the request is sent on reconnection
	if l != nil {
		c.sentOn(l)
		c.senders.Add(1) // before its reply can come
	}
	d.mu.Unlock()
	if l != nil {
		l.wmu.Lock()
		// Again at the wire: a wait for wmu has no bound. Fenced, the
		// link is dropped unwritten, and the outage that follows fails
		// c with the rest (reconnect sends nothing once fenced).
		err := d.fence()
		if err == nil {
			err = l.write(cookie, c)
		}
		c.senders.Add(-1)
		if err == nil {
			if hold {
				if l.held = l.w.Buffered() > 0; l.held {
					d.unpushed.Store(true)
				}
			} else {
				err = l.w.Flush()
				l.held = false
			}
		}
		l.wmu.Unlock()
		if err != nil {
			l.nc.Close() // the reader sees it; c is sent again on reconnection
		}
	}
	return nil
}

// spill is the default Options.Spill: how many requests a link carries
// before the next one takes some (multi-conn). QEMU's server works on 16
// of a connection's requests at a time, yet one link at fio's queue depth
// 32 served 4k random reads and writes faster than four sharing them
// (bench/README.md, "Storage backends: completions in batches"): the
// replies of one link come in larger batches, at fewer wake-ups, and each
// batch's answers to the gateway's clients leave in one system call
// (block.Batch).
const spill = 32

// pick is the link the next request goes to: the first that carries
// fewer than spill, else the least busy; nil while none is up. The
// caller holds mu.
func (d *Device) pick() *link {
	limit := d.o.Spill
	if limit <= 0 {
		limit = spill
	}
	var best *link
	for _, l := range d.links {
		if l.inflight < limit {
			return l
		}
		if best == nil || l.inflight < best.inflight {
			best = l
		}
	}
	return best
}

// sentOn records that c went out on l (nil: its reply came, or it
// failed), for its link's count. The caller holds mu.
func (c *call) sentOn(l *link) {
	if c.on != nil {
		c.on.inflight--
	}
	if c.on = l; l != nil {
		l.inflight++
	}
}

// Push sends the requests that Submit* left in the buffer.
func (d *Device) Push() {
	if !d.unpushed.Swap(false) {
		return
	}
	d.mu.Lock()
	links := d.links // nil while reconnecting: reconnect sends them
	d.mu.Unlock()
	for _, l := range links {
		l.wmu.Lock()
		var err error
		if l.held {
			if err = d.fence(); err == nil { // fenced: dropped unsent, as in send
				err = l.w.Flush()
			}
			l.held = false
		}
		l.wmu.Unlock()
		if err != nil {
			l.nc.Close()
		}
	}
}

// SubmitReadAt starts a read of len(p) bytes at off into p, which the
// caller leaves alone until done runs with the result: on the reader's
// goroutine, or at once on the caller's for a request that is refused
// before it is sent. It takes reads of at most the server's maximum
// request (false: use ReadAt).
func (d *Device) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	if len(p) > d.maxIO || len(p) == 0 {
		return false
	}
	return d.submit(protocol.TRANSMISSION_TYPE_REQUEST_READ, 0, off, nil, p, done)
}

// SubmitWriteAt is SubmitReadAt for a write of p at off; fua asks for a
// write that is durable when done runs (false where the server offers no
// FUA: use WriteAtFUA).
func (d *Device) SubmitWriteAt(p []byte, off int64, fua bool, done func(error, *block.Batch)) bool {
	if len(p) > d.maxIO || len(p) == 0 || fua && d.flags&nbdproto.FlagSendFUA == 0 {
		return false
	}
	if d.flags&nbdproto.FlagReadOnly != 0 {
		done(fmt.Errorf("upstream %s: %w", d.uri, syscall.EROFS), nil)
		return true
	}
	var flags uint16
	if fua {
		flags = nbdproto.CmdFlagFUA
	}
	return d.submit(protocol.TRANSMISSION_TYPE_REQUEST_WRITE, flags, off, p, nil, done)
}

func (d *Device) submit(typ, flags uint16, off int64, payload, into []byte, done func(error, *block.Batch)) bool {
	n := len(payload) + len(into)
	if err := d.check(off, int64(n)); err != nil {
		done(err, nil)
		return true
	}
	c := d.calls.Get().(*call)
	c.typ, c.flags, c.off, c.length, c.payload, c.buf, c.done = typ, flags, off, uint32(n), payload, into, done
	if err := d.send(c, true); err != nil {
		c.done, c.payload, c.buf = nil, nil, nil
		d.calls.Put(c)
		done(err, nil)
	}
	return true
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
	if d.flags&nbdproto.FlagReadOnly != 0 {
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

// Extents asks the server which parts of the range are holes and zeros
// (NBD_CMD_BLOCK_STATUS, base:allocation), where it offers that.
func (d *Device) Extents(dst []block.Extent, off, length int64, maxN int) ([]block.Extent, error) {
	if !d.blockStatus {
		return dst, block.ErrNotSupported
	}
	if err := d.check(off, length); err != nil {
		return dst, err
	}
	if length == 0 || maxN <= 0 {
		return dst, nil
	}
	length = min(length, 1<<31)
	c := d.calls.Get().(*call)
	c.typ, c.flags, c.off, c.length, c.payload, c.buf, c.max = nbdproto.CmdBlockStatus, 0, off, uint32(length), nil, nil, maxN
	err := d.wait(c)
	if err == nil {
		for _, e := range c.extents { // the last may reach past the range
			e.Length = min(e.Length, length)
			dst = append(dst, e)
			if length -= e.Length; length == 0 {
				break
			}
		}
	}
	d.calls.Put(c)
	if err != nil {
		return dst, fmt.Errorf("upstream %s: block status at %d: %w", d.uri, off, err)
	}
	return dst, nil
}

// WriteAtFUA writes p at off durably: NBD_CMD_FLAG_FUA on each write
// where the server takes it, else a write and a FLUSH.
func (d *Device) WriteAtFUA(p []byte, off int64) (int, error) {
	if d.flags&nbdproto.FlagSendFUA == 0 {
		if _, err := d.WriteAt(p, off); err != nil {
			return 0, err
		}
		return len(p), d.Flush()
	}
	if err := d.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.flags&nbdproto.FlagReadOnly != 0 {
		return 0, fmt.Errorf("upstream %s: %w", d.uri, syscall.EROFS)
	}
	err := d.chunks(off, len(p), func(o int64, lo, hi int) error {
		return d.do(protocol.TRANSMISSION_TYPE_REQUEST_WRITE, nbdproto.CmdFlagFUA, o, uint32(hi-lo), p[lo:hi], nil)
	})
	if err != nil {
		return 0, fmt.Errorf("upstream %s: write %d bytes at %d (FUA): %w", d.uri, len(p), off, err)
	}
	return len(p), nil
}

// Flush asks the server to make completed writes durable (NBD_CMD_FLUSH);
// a server that offers no flush has nothing volatile to flush.
func (d *Device) Flush() error {
	if d.flags&nbdproto.FlagSendFlush == 0 {
		return nil
	}
	if err := d.do(nbdproto.CmdFlush, 0, 0, 0, nil, nil); err != nil {
		return fmt.Errorf("upstream %s: flush: %w", d.uri, err)
	}
	return nil
}

// Trim discards a range (NBD_CMD_TRIM), if the server offers it.
func (d *Device) Trim(off, length int64) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	if d.flags&nbdproto.FlagSendTrim == 0 {
		return block.ErrNotSupported
	}
	return d.ranged("trim", nbdproto.CmdTrim, 0, off, length)
}

// Zero writes zeros over a range without sending them (WRITE_ZEROES),
// punching a hole where mayUnmap allows; fast refuses a slow zeroing.
func (d *Device) Zero(off, length int64, mayUnmap, fast bool) error {
	if err := d.check(off, length); err != nil {
		return err
	}
	if d.flags&nbdproto.FlagSendZeroes == 0 || fast && d.flags&nbdproto.FlagSendFastZero == 0 {
		return block.ErrNotSupported
	}
	var flags uint16
	if !mayUnmap {
		flags |= nbdproto.CmdFlagNoHole
	}
	if fast {
		flags |= nbdproto.CmdFlagFastZero
	}
	err := d.ranged("write_zeroes", nbdproto.CmdWriteZeroes, flags, off, length)
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
func (d *Device) ReadOnly() bool { return d.flags&nbdproto.FlagReadOnly != 0 }

// Close ends the connections (NBD_CMD_DISC); requests still in flight
// fail. Then the lease, if any, is released.
func (d *Device) Close() error {
	err := d.close()
	if d.o.Lease != nil {
		d.mu.Lock()
		unsure := d.unanswered
		d.mu.Unlock()
		if unsure {
			// A request failed unanswered (an outage past its limit, the
			// fence, a close with requests in flight): the server may
			// still carry it out, so the lease is left to run out, not
			// handed on at once.
			d.o.Lease.Abandon()
		} else if lerr := d.o.Lease.Release(); lerr != nil {
			err = errors.Join(err, fmt.Errorf("upstream %s: releasing its lease: %w", d.uri, lerr))
		}
	}
	return err
}

func (d *Device) close() error {
	d.mu.Lock()
	d.closed = true
	links := d.links
	d.mu.Unlock()
	if links == nil {
		d.mu.Lock()
		d.failLocked(fmt.Errorf("%w (%s): closed", ErrDisconnect, d.uri))
		d.mu.Unlock()
		return nil
	}
	var errs []error
	for _, l := range links {
		l.wmu.Lock()
		if d.fence() == nil { // fenced: what the buffer holds is not sent
			var h [28]byte
			binary.BigEndian.PutUint32(h[0:], protocol.TRANSMISSION_MAGIC_REQUEST)
			binary.BigEndian.PutUint16(h[6:], protocol.TRANSMISSION_TYPE_REQUEST_DISC)
			l.w.Write(h[:])
			l.w.Flush()
		}
		l.wmu.Unlock()
		if err := l.nc.Close(); !errors.Is(err, net.ErrClosed) {
			errs = append(errs, err) // (a reader that saw the first DISC answered may have closed the rest)
		}
	}
	for _, l := range links {
		<-l.done
	}
	return errors.Join(errs...)
}
