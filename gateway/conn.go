package gateway

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"goldilocks/internal/block"
	"goldilocks/internal/nbdproto"
	"goldilocks/internal/rawsock"
	"goldilocks/policy"
)

// conn is one client connection. The reader goroutine (serve) reads
// requests, runs small ones that cannot block itself, and hands the rest
// to a fixed set of workers. Replies go out through send (reply.go) as
// soon as they are ready.
type conn struct {
	sm   *sessionMetrics // the attached session's series; nil before attach
	srv  *Server
	nc   net.Conn
	rd   *bufio.Reader
	log  *slog.Logger
	addr string // the peer's address, for logs

	// Negotiated in the handshake; read-only in transmission.
	noZeroes   bool
	tls        bool
	structured bool   // structured replies (also true with extended headers)
	extended   bool   // extended headers: 32-byte requests and reply chunks
	metaAlloc  bool   // base:allocation selected
	metaExport string // export named in SET_META_CONTEXT
	metaSince  string // the snapshot of the selected changed-block context; "" none
	exp        *Export
	release    func()
	flags      uint16 // transmission flags sent to the client
	offer      *grant // the grant exp was opened under (flags follow it)

	// Access (access.go). peer is set at accept and after STARTTLS; grant
	// is the live grant (nil: no policy), replaced by Reauthorize.
	peer      policy.Peer
	grant     atomic.Pointer[grant]
	counted   string      // identity counted against max_connections...
	isCounted bool        // ...while this is true
	recorded  bool        // the attach is on the audit trail: a detach must follow
	readOnly  bool        // the export, or the grant it was opened under, is read-only
	attached  atomic.Bool // in transmission
	cutState
	stats sessionStats

	// Optional capabilities of exp.Device, found once.
	trimmer       block.Trimmer
	zeroer        block.Zeroer
	extenter      block.Extenter
	changes       block.ChangeTracker
	prober        block.Prober // the device tells cheaply whether a block holds data; or nil
	cacher        block.Cacher
	tryRead       block.TryReader
	submitter     block.Submitter // the device completes requests itself: no worker waits
	async         sync.WaitGroup  // submitted requests not yet completed
	fastWrite     bool            // the device's writes are memory-speed: small ones run inline
	raw           syscall.RawConn // the socket, when it is one (not TLS)
	sendFD        int             // the file of a plain device (splice, sendfile), or -1
	sendfileReads bool            // large plain reads go by sendfile (TCP, Config.SendfileReads)
	splice        *splicer        // large plain writes, socket to file; or nil
	mapper        block.Mapper    // large reads lent from the file's mapping (Config.MapReads); or nil

	// Owned by the reader goroutine. writePause pauses inline writes
	// after one was slow (the backend blocked) while other requests
	// waited behind it; deferred holds the replies of requests it ran,
	// until flushDeferred.
	writePause pause
	deferred   []*request
	// A FLUSH on an idle connection runs on the reader too (a client at
	// queue depth one, as fio --fsync=1 or a guest's lone fsync, waits
	// for it anyway); flushPause pauses that once a request arrived
	// while one ran. sock and peekFn look at the socket for that.
	flushPause pause
	sock       syscall.RawConn // the socket when it is one (TLS: nil)
	rs         *rawsock.Conn   // the same, read and written with raw system calls; or nil
	peekFn     func(fd uintptr)
	peeked     bool // what peekFn found: bytes are waiting
	peekBuf    [1]byte

	stopping atomic.Bool
	shakeKey string // counted in srv.peerShakes until handshakeDone

	// A handover (handover.go). hmu orders the reader's wait for a
	// request (idle) with beginHandover's deadline; handing is hand != nil,
	// for the reader's check between requests.
	hmu            sync.Mutex
	idle           bool      // the reader waits for a request header
	hand           *handSlot // set by beginHandover; cleared when reported
	ended          bool      // the session is over (leaveHandover)
	handing        atomic.Bool
	handStopped    bool   // the reader stopped for a handover (reader, then serve)
	pending        []byte // bytes handed over with an adopted connection, read first
	adopted        bool   // taken over from another process (Server.Adopt): no handshake
	refusedAtAdopt string // the policy refuses an adopted connection: why
	volume         string // the attached export's name, kept while it is closed for a handover

	errMu         sync.Mutex // guards errAudited, errSuppressed
	errAudited    time.Time  // the last io_error on the audit trail
	errSuppressed int        // failed requests since, only logged

	wmu     sync.Mutex // guards queue, spare and writing
	queue   []*request // replies waiting for the writer, cap MaxInflight
	spare   []*request // the other half of the queue's double buffer
	writing bool       // a goroutine is sending replies

	// Owned by the goroutine that is sending replies (writing == true).
	broken bool        // a reply was cut short: the stream is unusable
	iovArr [][]byte    // backing array for iov, cap 2*MaxInflight
	iov    net.Buffers // the batch being sent

	free chan *request // idle request slots
	work chan *request // requests for workers
	// running counts requests handed to workers whose replies are not
	// yet queued: while it is 0 no request is at the device. (A slot
	// comes back to free only after its reply is written, and a client
	// at queue depth one often sends its next request before then.)
	running atomic.Int32
	wrote   atomic.Bool // any write-type command ran since the last flush
}

func (s *Server) newConn(nc net.Conn) *conn {
	if tc, ok := nc.(*net.TCPConn); ok {
		tc.SetNoDelay(true)
	}
	peer := nc.RemoteAddr().String()
	if peer == "" || peer == "@" {
		peer = "unix:" + nc.LocalAddr().String()
	}
	c := &conn{
		srv:    s,
		nc:     nc,
		addr:   peer,
		log:    s.log.With("peer", peer),
		sendFD: -1,
	}
	c.rd = bufio.NewReaderSize(source{c}, 64<<10)
	c.cut = make(chan struct{})
	if uc, ok := nc.(*net.UnixConn); ok {
		if cred, err := peerCred(uc); err == nil {
			c.peer.Unix = true
			c.peer.UID, c.peer.GID, c.peer.PID = int64(cred.Uid), int64(cred.Gid), int64(cred.Pid)
			c.log = c.log.With("uid", cred.Uid, "pid", cred.Pid)
		} else {
			c.log.Warn("no SO_PEERCRED on a Unix-socket connection", "err", err)
		}
	}
	return c
}

// stop asks the connection to finish: no new requests are read.
func (c *conn) stop() {
	c.stopping.Store(true)
	c.nc.SetReadDeadline(time.Now())
}

func (c *conn) serve() {
	defer c.nc.Close()
	defer c.recoverPanic()
	m := c.srv.cfg.Metrics
	m.note(connOpened)
	defer m.note(connClosed)
	if c.adopted {
		c.serveAdopted()
		return
	}
	err := c.handshake()
	c.handshakeDone()
	if err != nil {
		// A GO or EXPORT_NAME whose reply could not be sent was counted
		// and recorded: undo both, as for any detach.
		c.recordDetach()
		c.detach()
		c.closeExport()
		var pe *protocolError
		switch {
		case errors.Is(err, errHandshakeDone), errors.Is(err, io.EOF), c.stopping.Load():
			c.log.Debug("handshake ended", "err", err)
		case errors.As(err, &pe):
			c.log.Warn("closing connection", "err", err)
		default:
			c.log.Info("handshake failed", "err", err)
		}
		return
	}
	c.stats.start = time.Now()
	c.session("attached")
}

// session serves an attached connection until it ends, or until it is
// handed to another process (handover.go). how says how it came (the
// log line that opens it).
func (c *conn) session(how string) {
	defer c.leaveHandover()
	defer c.closeExport()
	defer c.detach()
	defer c.recordDetach()
	c.attached.Store(true)
	c.volume = c.exp.Name
	c.log = c.log.With("volume", c.exp.Name) // every request's log line names the volume
	if g := c.grant.Load(); g != nil {
		c.log = c.log.With("identity", g.identity)
	}
	c.log.Info(how, "structured", c.structured, "tls", c.tls, "flags", transmissionFlagNames(c.flags))
	for {
		c.transmit()
		if !c.handStopped {
			break
		}
		c.handStopped = false
		name, g, flags := c.exp.Name, c.offer, c.flags
		c.closeExport() // the volume is released for the new process
		if c.handOff() {
			c.recorded = false // the session goes on there: no detach record
			return
		}
		if err := c.openExport(name, g); err != nil {
			c.log.Error("handover aborted, but the export does not open again: closing the connection", "err", err)
			return
		}
		c.flags = flags // what the client was sent
	}
	c.log.Info("detached")
}

// openExport opens export name for this connection under grant g (nil:
// no policy), which may make it read-only and withhold commands.
func (c *conn) openExport(name string, g *grant) error {
	c.closeExport()
	exp, release, err := c.srv.cfg.Exports.Open(name)
	if err != nil {
		return err
	}
	c.exp, c.release, c.offer = exp, release, g
	c.readOnly = exp.ReadOnly || g.permits(nbdproto.CmdWrite) != 0
	c.flags = c.transmissionFlags()
	return nil
}

func (c *conn) closeExport() {
	if c.release != nil {
		c.release()
	}
	c.exp, c.release = nil, nil
}

// transmissionFlags advertises exactly what the export can do.
func (c *conn) transmissionFlags() uint16 {
	dev := c.exp.Device
	f := nbdproto.FlagHasFlags | nbdproto.FlagSendFlush
	if c.structured {
		f |= nbdproto.FlagSendDF
	}
	// Advertised: what the device declares and the grant permits.
	o := block.OptionalOf(dev)
	can := func(cmd uint16, ok bool) bool { return ok && c.offer.permits(cmd) == 0 }
	if can(nbdproto.CmdCache, o.Cacher != nil) {
		f |= nbdproto.FlagSendCache
	}
	if c.exp.MultiConn {
		f |= nbdproto.FlagCanMultiConn
	}
	if c.readOnly {
		return f | nbdproto.FlagReadOnly
	}
	f |= nbdproto.FlagSendFUA
	if can(nbdproto.CmdTrim, o.Trimmer != nil) {
		f |= nbdproto.FlagSendTrim
	}
	if can(nbdproto.CmdWriteZeroes, o.Zeroer != nil) {
		f |= nbdproto.FlagSendZeroes | nbdproto.FlagSendFastZero
	}
	return f
}

// request is a reusable slot for one request in flight. Its function
// fields are bound once so that the hot path allocates nothing.
type request struct {
	c      *conn
	typ    uint16
	flags  uint16
	cookie uint64
	off    uint64
	length uint64  // payload (WRITE) or effect length; 32 bits unless extended
	buf    *buffer // payload (WRITE in, READ out)
	start  time.Time

	hdr      [nbdproto.ExtHdrSize + 16]byte // request in; reply header (and its fixed payload) out
	vec      [2][]byte                      // the reply: header and payload (or nil)
	zeroCopy bool                           // the payload goes by sendfile
	mapped   bool                           // the payload is lent from the file's mapping: reading it may fault
	deferred bool                           // run on the reader: reply batched by flushDeferred
	batch    *block.Batch                   // completed in a device's batch: the reply waits for its end
	trailer  [nbdproto.ExtHdrSize + 14]byte // a zero-copy read's last chunk
	extents  []block.Extent
	bsReply  []byte

	// sendfile state, used by the reply writer through sendfn.
	sfHdr    []byte
	sfOff    int64
	sfRemain int
	sfErr    error
	sendfn   func(fd uintptr) bool

	// completions of submitted requests (block.Submitter), bound once.
	readDone, writeDone func(error, *block.Batch)
}

func (c *conn) transmit() {
	dev := c.exp.Device
	o := block.OptionalOf(dev) // what the device declares (block.Caps)
	c.trimmer, c.zeroer, c.extenter, c.cacher, c.tryRead = o.Trimmer, o.Zeroer, o.Extenter, o.Cacher, o.TryReader
	c.changes = o.Changes
	c.submitter = o.Submitter
	if c.srv.cfg.MapReads {
		c.mapper = o.Mapper
	}
	c.fastWrite = o.FastWrite
	if sc, ok := c.nc.(syscall.Conn); ok && !c.tls {
		if raw, err := sc.SyscallConn(); err == nil {
			c.sock = raw
			c.peekFn = c.peek
			if rs, err := rawsock.New(c.nc); err == nil {
				c.rs = rs
			}
		}
	}
	c.prober, _ = dev.(block.Prober)
	if f := o.Filer; f != nil && !c.tls {
		if sc, ok := c.nc.(syscall.Conn); ok {
			if raw, err := sc.SyscallConn(); err == nil {
				c.raw, c.sendFD = raw, int(f.File().Fd())
				// sendfile only to TCP, when asked: to a Unix socket it
				// copies anyway, and measured slower than pread + writev
				// (bench/README.md); to TCP too, where both were measured.
				_, tcp := c.nc.(*net.TCPConn)
				c.sendfileReads = tcp && c.srv.cfg.SendfileReads
				if !c.readOnly {
					if sp, err := newSplicer(c.sendFD); err == nil {
						c.splice = sp
						defer sp.close()
					} else {
						c.log.Warn("no splice for large writes", "err", err)
					}
				}
			}
		}
	}

	n := c.srv.cfg.MaxInflight
	slots := make([]request, n)
	c.free = make(chan *request, n)
	c.work = make(chan *request, n)
	c.queue = make([]*request, 0, n)
	c.spare = make([]*request, 0, n)
	c.deferred = make([]*request, 0, n)
	c.iovArr = make([][]byte, 0, 2*n)
	for i := range slots {
		r := &slots[i]
		r.c = c
		r.sendfn = r.sendfile
		r.readDone, r.writeDone = r.completeRead, r.completeWrite
		c.free <- r
	}
	var workers sync.WaitGroup
	workers.Add(n)
	for range n {
		go func() {
			defer workers.Done()
			for r := range c.work {
				c.handleSafely(r) // the reply writer releases r
			}
		}()
	}

	c.readLoop()

	close(c.work)
	workers.Wait()
	c.async.Wait()
	if c.handStopped && !c.drainReplies(n) {
		c.log.Error("a reply is stuck: the connection is not handed over")
		c.handStopped = false // ends as a stopped connection
	}
	// A client that leaves flushes first if it wants durability (as with
	// nbdkit and qemu-nbd); a server that stops flushes for its clients.
	// A handover does not: the device's Close (when its last connection
	// releases it) leaves what was written readable by the next process
	// (the page cache is shared; an encrypted volume commits its map),
	// and the client's own next FLUSH, served there, makes it durable.
	if c.stopping.Load() && !c.readOnly && c.wrote.Load() {
		if err := dev.Flush(); err != nil {
			c.log.Error("flush at stop failed", "err", err)
		}
	}
}

// handleSafely runs a request; a panic (a bug, never a client's doing)
// costs this connection, not the process.
func (c *conn) handleSafely(r *request) {
	defer c.recoverPanic()
	c.handle(r)
}

func (c *conn) recoverPanic() {
	if p := recover(); p != nil {
		c.log.Error("BUG: panic serving connection; closing it", "panic", p, "stack", string(debug.Stack()))
		c.nc.Close()
	}
}

// The request path. One reader goroutine per connection takes each
// request through these stages, top to bottom (serveRequest):
//
//	readRequest     the 28-byte header off the socket, magic checked
//	validate        command, flags and range against what the handshake
//	                advertised (validate.go): 0 or the NBD error
//	admit           the grant: read-only, commands, rate limits, which
//	                may wait (access.go)
//	receivePayload  a WRITE's data: spliced to the file (and done), read
//	                into a pooled buffer, or skipped after a refusal
//	dispatch        a refusal is answered at once; small requests that
//	                cannot block run here (inline), or are submitted to
//	                a device that answers them itself (block.Submitter:
//	                its goroutine sends the reply); the rest go to a
//	                worker (handle)
//	reply           queued to the connection's combining writer (reply.go),
//	                which sends it and returns the slot to c.free
//
// Requests run on the reader reply through c.deferred (onReader), sent in
// one batch before the reader could block.

// errDisconnect ends the loop on NBD_CMD_DISC.
var errDisconnect = errors.New("client sent NBD_CMD_DISC")

// readLoop serves requests until the client disconnects, violates the
// protocol, or the server stops.
func (c *conn) readLoop() {
	defer c.flushDeferred()
	for {
		// Replies of requests run here go out in one batch once the
		// requests already received are done: before we could block.
		if len(c.free) == 0 || c.rd.Buffered() < nbdproto.RequestSize {
			c.flushDeferred()
		}
		r := <-c.free
		if err := c.serveRequest(r); err != nil {
			c.free <- r
			c.handStopped = errors.Is(err, errHandover)
			c.readEnded(err)
			return
		}
	}
}

// serveRequest takes r through the stages. An error ends the connection;
// r then still belongs to the caller.
func (c *conn) serveRequest(r *request) error {
	if err := c.readRequest(r); err != nil {
		return err
	}
	r.start = time.Now()
	c.sm.inFlight(1)
	errno := c.validate(r)
	if errno == 0 {
		errno = c.admit(r) // may wait
	}
	done, err := c.receivePayload(r, errno)
	if err != nil {
		c.sm.inFlight(-1) // the connection ends unanswered
		return err
	}
	if done {
		return nil
	}
	c.dispatch(r, errno)
	return nil
}

// readRequest reads and parses one request header: 28 bytes, or 32 with
// extended headers (a 64-bit length).
func (c *conn) readRequest(r *request) error {
	size, magic := nbdproto.RequestSize, nbdproto.RequestMagic
	if c.extended {
		size, magic = nbdproto.ExtRequestSize, nbdproto.ExtRequestMagic
	}
	if c.handing.Load() {
		return errHandover // at a request boundary: c.rd keeps what follows
	}
	if c.rd.Buffered() >= size {
		io.ReadFull(c.rd, r.hdr[:size]) // cannot fail: the bytes are here
	} else if err := c.waitRequest(r.hdr[:size]); err != nil {
		return err
	}
	h := r.hdr[:]
	if m := binary.BigEndian.Uint32(h[0:]); m != magic {
		return violation("bad request magic %#x", m)
	}
	r.flags = binary.BigEndian.Uint16(h[4:])
	r.typ = binary.BigEndian.Uint16(h[6:])
	r.cookie = binary.BigEndian.Uint64(h[8:])
	r.off = binary.BigEndian.Uint64(h[16:])
	if c.extended {
		r.length = binary.BigEndian.Uint64(h[24:])
	} else {
		r.length = uint64(binary.BigEndian.Uint32(h[24:]))
	}
	if r.typ == nbdproto.CmdDisc {
		return errDisconnect
	}
	return nil
}

// waitRequest reads a request header that is not buffered yet: the
// reader may wait here, so a handover may wake it (beginHandover). A
// header that had begun to arrive is read whole.
func (c *conn) waitRequest(hdr []byte) error {
	c.hmu.Lock()
	if c.hand != nil {
		c.hmu.Unlock()
		return errHandover
	}
	c.idle = true
	c.hmu.Unlock()
	n, err := io.ReadFull(c.rd, hdr)
	c.hmu.Lock()
	c.idle = false
	handing := c.hand != nil
	if handing {
		c.nc.SetReadDeadline(time.Time{}) // what follows this header must not time out
	}
	c.hmu.Unlock()
	switch {
	case err == nil:
		return nil
	case !handing || !isTimeout(err):
		return err
	case n == 0:
		return errHandover
	}
	_, err = io.ReadFull(c.rd, hdr[n:])
	return err
}

// receivePayload reads a WRITE's payload. A large accepted write is
// spliced straight to the file and answered (done).
func (c *conn) receivePayload(r *request, errno uint32) (done bool, err error) {
	if !c.hasPayload(r) {
		return false, nil
	}
	if c.extended && r.length > MaxRequestSize {
		// A payload beyond what NBD_INFO_BLOCK_SIZE allows: the extension
		// says hang up rather than read it. (A compact WRITE of at most
		// 4 GiB is skipped below and refused with EINVAL.)
		return false, violation("request payload of %d bytes", r.length)
	}
	if c.rd.Buffered() < int(r.length) {
		c.flushDeferred() // the socket read below may block
	}
	switch {
	case errno != 0 || r.typ != nbdproto.CmdWrite: // only a WRITE has a use for one
		_, err = c.rd.Discard(int(r.length))
		return false, err
	case c.splice != nil && r.length >= spliceMin:
		return true, c.writeSpliced(r)
	}
	r.buf = c.srv.pool.get(int(r.length))
	if err := c.readPayload(r.buf.b[:r.length]); err != nil {
		c.srv.pool.put(r.buf)
		r.buf = nil
		return false, err
	}
	return false, nil
}

// hasPayload reports whether data follows r's header: a WRITE's, or with
// extended headers any request flagged PAYLOAD_LEN.
func (c *conn) hasPayload(r *request) bool {
	if c.extended {
		return r.flags&nbdproto.CmdFlagPayloadLen != 0
	}
	return r.typ == nbdproto.CmdWrite
}

// dispatch answers a refused request, or runs r here or on a worker.
func (c *conn) dispatch(r *request, errno uint32) {
	switch {
	case errno != 0:
		c.log.Warn("request refused", "cmd", commandName(r.typ), "offset", r.off, "length", r.length, "flags", flagNames(r.flags), "errno", errno)
		c.count(r, 0, true)
		c.onReader(r)
		c.replyError(r, errno)
	case c.inline(r):
	default:
		c.running.Add(1)
		c.work <- r
	}
}

// onReader marks r as run on the reader goroutine: its reply waits in
// c.deferred for the next flushDeferred.
func (c *conn) onReader(r *request) { r.deferred = true }

// Small requests that will not block run on the reader goroutine itself:
// a hop to a worker costs more than the I/O. On a device that completes
// requests itself (block.Submitter) small reads and writes are submitted
// from the reader instead. Everything else, and anything that might wait
// for a disk, goes to the workers.
const (
	inlineMax  = 64 << 10
	inlineSlow = time.Millisecond // an inline write this slow pauses inline writes
)

// A pause of inline runs lasts pauseMin, and twice as long as the last
// (up to pauseMax) when the first run after it was slow again: a store
// that stays slow keeps its requests on the workers, and a lone stall (a
// checkpoint's flush, a preempted vCPU) costs 20 ms of hops, not a second
// of them. Under fio randwrite 4k at queue depth 32 on an encrypted
// volume, a fixed pause of a second after each of the 7 stalls of 2 to
// 17 ms in 8 s kept most writes on the workers, where they contended for
// the file's lock: 23–47 µs of gateway CPU a write, against 17–23 µs
// without any pause (bench/README.md, "Map cache during checkpoints").
const (
	pauseMin = 20 * time.Millisecond
	pauseMax = time.Second
)

// pause is when inline runs of one kind may resume, and how long the
// last pause was.
type pause struct {
	until time.Time
	last  time.Duration
}

// start pauses from now: twice as long as the last pause if it ended at
// most that long ago, else pauseMin.
func (p *pause) start(now time.Time) {
	if p.last > 0 && now.Sub(p.until) <= p.last {
		p.last = min(2*p.last, pauseMax)
	} else {
		p.last = pauseMin
	}
	p.until = now.Add(p.last)
}

// inline runs r on the reader goroutine if it is cheap, or submits it,
// and reports whether it did.
func (c *conn) inline(r *request) bool {
	if r.length > inlineMax {
		return false
	}
	switch r.typ {
	case nbdproto.CmdRead:
		if c.submitter != nil && r.length < holeCheckMin {
			return c.submitRead(r)
		}
		if c.tryRead == nil {
			return false
		}
		r.buf = c.srv.pool.get(int(r.length))
		data := r.buf.b[:r.length]
		if _, err := c.tryRead.TryReadAt(data, int64(r.off)); err != nil {
			c.srv.pool.put(r.buf) // not cached (or an error): a worker reads it
			r.buf = nil
			return false
		}
		c.onReader(r)
		c.count(r, int64(r.length), false)
		c.sendRead(r, data)
		return true
	case nbdproto.CmdWrite:
		if c.submitter != nil {
			return c.submitWrite(r)
		}
		if r.flags&nbdproto.CmdFlagFUA != 0 || !c.fastWrite {
			return false
		}
		// A slow write held up only the requests that arrived meanwhile:
		// with none (queue depth one, a GC pause, a busy CPU) running it
		// here cost nothing, and a hop to a worker would.
		return c.runInline(r, &c.writePause, inlineSlow)
	case nbdproto.CmdFlush:
		// Only when nothing else is in flight, held back or received:
		// then the client waits for this reply before it sends more
		// (queue depth one), and a hop to a worker is pure latency.
		if c.sock == nil || c.rd.Buffered() > 0 || len(c.deferred) > 0 || c.running.Load() != 0 {
			return false
		}
		// If the client did not wait after all, workers overlap the next.
		return c.runInline(r, &c.flushPause, -1)
	}
	return false
}

// runInline runs r on the reader, unless p pauses inline runs since an
// earlier one held up other requests: a run that took longer than slow
// (-1: any) while others waited starts a pause.
func (c *conn) runInline(r *request, p *pause, slow time.Duration) bool {
	now := time.Now()
	if now.Before(p.until) {
		return false
	}
	c.onReader(r)
	c.handle(r)
	if end := time.Now(); end.Sub(now) > slow && c.othersWaiting() {
		p.start(end)
	}
	return true
}

// submitRead starts r on a device that completes requests itself
// (block.Submitter): the reader goes on at once, and the device's
// goroutine sends the reply (completeRead), as a worker would. It reports
// whether the device took r.
func (c *conn) submitRead(r *request) bool {
	r.buf = c.srv.pool.get(int(r.length))
	c.running.Add(1)
	c.async.Add(1)
	if !c.submitter.SubmitReadAt(r.buf.b[:r.length], int64(r.off), r.readDone) {
		c.running.Add(-1)
		c.async.Done()
		c.srv.pool.put(r.buf)
		r.buf = nil
		return false
	}
	return true
}

// submitWrite is submitRead for a WRITE, its payload in r.buf.
func (c *conn) submitWrite(r *request) bool {
	c.wrote.Store(true)
	c.running.Add(1)
	c.async.Add(1)
	if !c.submitter.SubmitWriteAt(r.buf.b[:r.length], int64(r.off), r.flags&nbdproto.CmdFlagFUA != 0, r.writeDone) {
		c.running.Add(-1)
		c.async.Done()
		return false
	}
	return true
}

// completeRead answers a submitted READ (readDone), on the device's
// goroutine: a panic closes this connection, as on a worker, and the
// request still counts as done.
func (r *request) completeRead(err error, b *block.Batch) {
	c := r.c
	defer c.async.Done()
	defer c.recoverPanic()
	r.batch = b
	c.answerRead(r, r.buf.b[:r.length], err)
}

// completeWrite answers a submitted WRITE (writeDone), as completeRead.
func (r *request) completeWrite(err error, b *block.Batch) {
	c := r.c
	defer c.async.Done()
	defer c.recoverPanic()
	r.batch = b
	c.finish(r, int64(r.length), err)
}

// othersWaiting reports whether requests arrived while the reader ran
// one: bytes in the read buffer or on the socket (behind TLS: assumed).
func (c *conn) othersWaiting() bool {
	return c.sock == nil || c.rd.Buffered() > 0 || c.waiting()
}

// waiting reports whether the client has sent bytes not yet read.
func (c *conn) waiting() bool {
	c.peeked = false
	c.sock.Control(c.peekFn)
	return c.peeked
}

// peek is peekFn: a non-blocking MSG_PEEK of one byte, a raw system
// call as in package rawsock.
func (c *conn) peek(fd uintptr) {
	n, _, e := syscall.RawSyscall6(syscall.SYS_RECVFROM, fd, uintptr(unsafe.Pointer(&c.peekBuf[0])), 1, syscall.MSG_PEEK|syscall.MSG_DONTWAIT, 0, 0)
	c.peeked = e == 0 && n > 0
}

// source is what c.rd reads: the socket through package rawsock once in
// transmission without TLS, else c.nc (the handshake, TLS).
type source struct{ c *conn }

func (s source) Read(p []byte) (int, error) {
	if len(s.c.pending) > 0 { // an adopted connection's first bytes
		n := copy(p, s.c.pending)
		s.c.pending = s.c.pending[n:]
		return n, nil
	}
	if s.c.rs != nil {
		return s.c.rs.Read(p)
	}
	return s.c.nc.Read(p)
}

// readPayload fills p: what the read buffer already holds is copied, the
// rest is read from the socket straight into p.
func (c *conn) readPayload(p []byte) error {
	n := 0
	if b := c.rd.Buffered(); b > 0 {
		n, _ = c.rd.Read(p[:min(b, len(p))])
	}
	if n == len(p) {
		return nil
	}
	_, err := io.ReadFull(source{c}, p[n:])
	return err
}

func (c *conn) readEnded(err error) {
	var pe *protocolError
	switch {
	case errors.Is(err, errDisconnect):
		c.log.Debug("client sent NBD_CMD_DISC")
	case errors.Is(err, errHandover):
		c.log.Debug("stopped at a request boundary for a handover")
	case errors.As(err, &pe):
		c.log.Warn("closing connection", "err", err)
	case c.stopping.Load():
		c.log.Info("server stopping: no new requests read")
	case errors.Is(err, io.EOF):
		c.log.Info("client closed the connection without NBD_CMD_DISC")
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, net.ErrClosed), errors.Is(err, syscall.ECONNRESET):
		c.log.Warn("connection lost mid-request", "err", err)
	default:
		c.log.Warn("read failed", "err", err)
	}
}

// done returns r to the free slots. The reply writer calls it once r's
// reply is out; nobody touches r after send.
func (c *conn) done(r *request) {
	r.batch = nil
	if r.buf != nil {
		c.srv.pool.put(r.buf)
		r.buf = nil
	}
	c.free <- r
}

// handle runs one validated request and sends its reply.
func (c *conn) handle(r *request) {
	dev := c.exp.Device
	off, n := int64(r.off), int64(r.length)
	var err error
	switch r.typ {
	case nbdproto.CmdRead:
		c.read(r)
		return
	case nbdproto.CmdWrite:
		c.wrote.Store(true)
		if fw, ok := dev.(block.FUAWriter); ok && r.flags&nbdproto.CmdFlagFUA != 0 {
			_, err = fw.WriteAtFUA(r.buf.b[:n], off) // durable in one request
		} else if _, err = dev.WriteAt(r.buf.b[:n], off); err == nil && r.flags&nbdproto.CmdFlagFUA != 0 {
			err = dev.Flush()
		}
	case nbdproto.CmdFlush:
		c.wrote.Store(false)
		err = dev.Flush()
	case nbdproto.CmdTrim:
		c.wrote.Store(true)
		if err = c.trimmer.Trim(off, n); err == nil && r.flags&nbdproto.CmdFlagFUA != 0 {
			err = dev.Flush()
		}
	case nbdproto.CmdWriteZeroes:
		c.wrote.Store(true)
		err = c.zeroer.Zero(off, n, r.flags&nbdproto.CmdFlagNoHole == 0, r.flags&nbdproto.CmdFlagFastZero != 0)
		if err == nil && r.flags&nbdproto.CmdFlagFUA != 0 {
			err = dev.Flush()
		}
	case nbdproto.CmdCache:
		err = c.cacher.Cache(off, n)
	case nbdproto.CmdBlockStatus:
		c.blockStatus(r)
		return
	}
	c.finish(r, n, err)
}

// finish logs a failed request and sends the simple reply.
func (c *conn) finish(r *request, n int64, err error) {
	errno := uint32(0)
	if err != nil {
		errno = errnoOf(err)
		if !(r.typ == nbdproto.CmdWriteZeroes && errno == nbdproto.ErrnoNotSup) { // FAST_ZERO refusal is routine
			c.requestFailed(r, errno, err)
		}
	}
	c.count(r, n, err != nil)
	c.replySimple(r, errno, nil)
}

// Reads of at least zeroCopyMin bytes go by sendfile when the server is
// configured for it (Config.SendfileReads) and the path allows, or are
// lent from the file's mapping (Config.MapReads); smaller ones are read
// into a buffer, most of them on the reader (TryReadAt), which a
// mapping's page faults could block.
const zeroCopyMin = 64 << 10

// Reads of at least holeCheckMin bytes with structured replies first ask
// the device whether the range reads as zeros: if it does, the reply is
// one OFFSET_HOLE chunk and nothing is read (as qemu-nbd does).
const holeCheckMin = 64 << 10

func (c *conn) read(r *request) {
	if c.structured && r.flags&nbdproto.CmdFlagDF == 0 && c.extenter != nil && r.length >= holeCheckMin && c.readHole(r) {
		return
	}
	if c.sendfileReads && r.length >= zeroCopyMin {
		c.count(r, int64(r.length), false)
		r.zeroCopy = true
		c.sendRead(r, nil)
		return
	}
	if c.mapper != nil && r.length >= zeroCopyMin {
		data, err := c.mapper.Mapped(int64(r.off), int64(r.length))
		if !errors.Is(err, block.ErrNotMapped) {
			r.mapped = true
			c.answerRead(r, data, err)
			return
		}
	}
	r.buf = c.srv.pool.get(int(r.length))
	data := r.buf.b[:r.length]
	_, err := c.exp.Device.ReadAt(data, int64(r.off))
	c.answerRead(r, data, err)
}

// answerRead answers a READ whose data (in r.buf) was read, or not.
func (c *conn) answerRead(r *request, data []byte, err error) {
	if err != nil {
		errno := errnoOf(err)
		c.requestFailed(r, errno, err)
		c.count(r, 0, true)
		c.replyError(r, errno)
		return
	}
	c.count(r, int64(r.length), false)
	c.sendRead(r, data)
}

// readHole answers a read of a range that reads as zeros throughout with
// one OFFSET_HOLE chunk, and reports whether it did.
func (c *conn) readHole(r *request) bool {
	// Data at the start ends the probe: a file tells with one SEEK_DATA,
	// where Extents would go on to SEEK_HOLE for the data's end, which
	// walks the file's extents (perf trace under 1 MiB plain reads: 8 %
	// of the time in pread, writev, read and lseek). Prober is not a
	// declared capability (block.Caps): a wrong "written" only sends the
	// zeros as data, never a hole where data is.
	if c.prober != nil && c.prober.Written(int64(r.off)) {
		return false
	}
	es, err := c.extenter.Extents(r.extents[:0], int64(r.off), int64(r.length), 1)
	r.extents = es
	if err != nil || len(es) != 1 || es[0].Flags&block.ExtentZero == 0 || es[0].Length < int64(r.length) {
		return false
	}
	c.count(r, int64(r.length), false)
	h := c.chunkHeader(r.hdr[:], r, nbdproto.ReplyFlagDone, nbdproto.ReplyOffsetHole, 12)
	b := binary.BigEndian.AppendUint64(h, r.off)
	b = binary.BigEndian.AppendUint32(b, uint32(r.length))
	c.send(r, b, nil)
	return true
}

// sendRead sends a successful read's data: one structured OFFSET_DATA
// chunk, or a simple reply. A zero-copy chunk is not the last: its data
// is read while it is sent, so the reply ends with a chunk of its own
// (sendfileReply): NONE, or an error at the offset where the read failed.
func (c *conn) sendRead(r *request, data []byte) {
	if c.structured {
		flags := nbdproto.ReplyFlagDone
		if r.zeroCopy {
			flags = 0
		}
		h := c.chunkHeader(r.hdr[:], r, flags, nbdproto.ReplyOffsetData, 8+r.length)
		c.send(r, binary.BigEndian.AppendUint64(h, r.off), data)
		return
	}
	c.replySimple(r, 0, data)
}

// blockStatus answers BLOCK_STATUS with a chunk for each selected
// context, base:allocation first, sent together (one reply).
func (c *conn) blockStatus(r *request) {
	off, n := int64(r.off), int64(r.length)
	max := 1024
	if r.flags&nbdproto.CmdFlagReqOne != 0 {
		max = 1
	}
	out := r.bsReply[:0]
	var err error
	if c.metaAlloc {
		r.extents = r.extents[:0]
		if c.extenter != nil {
			r.extents, err = c.extenter.Extents(r.extents, off, n, max)
		} else {
			r.extents = append(r.extents, block.Extent{Length: n})
		}
		r.extents = tidyExtents(r.extents, n)
		out = c.appendStatusChunk(out, r, metaBaseAllocID, c.metaSince == "")
	}
	if err == nil && c.metaSince != "" {
		r.extents = r.extents[:0]
		if c.changes == nil {
			err = fmt.Errorf("export %s: %w", c.metaExport, block.ErrNotSupported)
		} else {
			r.extents, err = c.changes.ChangedExtents(c.metaSince, r.extents, off, n, max)
		}
		r.extents = tidyExtents(r.extents, n)
		out = c.appendStatusChunk(out, r, metaChangedID, true)
	}
	r.bsReply = out
	if err != nil {
		c.requestFailed(r, errnoOf(err), err)
		c.count(r, 0, true)
		c.replyError(r, errnoOf(err))
		return
	}
	c.count(r, 0, false)
	c.send(r, out, nil)
}

// appendStatusChunk appends r.extents to b as one BLOCK_STATUS chunk,
// header included, of context id.
func (c *conn) appendStatusChunk(b []byte, r *request, id uint32, done bool) []byte {
	typ, size := nbdproto.ReplyBlockStatus, 4+8*len(r.extents)
	if c.extended { // 64-bit descriptors, after their count
		typ, size = nbdproto.ReplyBlockStatusExt, 8+16*len(r.extents)
	}
	var flags uint16
	if done {
		flags = nbdproto.ReplyFlagDone
	}
	b = append(b, c.chunkHeader(r.hdr[:], r, flags, typ, uint64(size))...)
	b = binary.BigEndian.AppendUint32(b, id)
	if c.extended {
		b = binary.BigEndian.AppendUint32(b, uint32(len(r.extents)))
	}
	for _, e := range r.extents {
		if c.extended {
			b = binary.BigEndian.AppendUint64(b, uint64(e.Length))
			b = binary.BigEndian.AppendUint64(b, uint64(e.Flags))
			continue
		}
		b = binary.BigEndian.AppendUint32(b, uint32(e.Length))
		b = binary.BigEndian.AppendUint32(b, e.Flags)
	}
	return b
}

// tidyExtents drops the zero-length extents a backend may return (a
// racing trim), which clients take for a protocol error, and merges
// neighbours of one kind. With none left it reports the whole range as
// data, which is always true enough.
func tidyExtents(es []block.Extent, n int64) []block.Extent {
	out := es[:0]
	for _, e := range es {
		switch {
		case e.Length <= 0:
		case len(out) > 0 && out[len(out)-1].Flags == e.Flags:
			out[len(out)-1].Length += e.Length
		default:
			out = append(out, e)
		}
	}
	if len(out) == 0 {
		out = append(out, block.Extent{Length: n})
	}
	return out
}

// chunkHeader writes the header of one reply chunk for r into b (a
// structured header, or an extended one with r's offset) and returns it,
// for the caller to append the chunk's fixed payload fields to.
func (c *conn) chunkHeader(b []byte, r *request, flags, typ uint16, length uint64) []byte {
	if c.extended {
		b = b[:nbdproto.ExtHdrSize]
		binary.BigEndian.PutUint32(b[0:], nbdproto.ExtReplyMagic)
		binary.BigEndian.PutUint16(b[4:], flags)
		binary.BigEndian.PutUint16(b[6:], typ)
		binary.BigEndian.PutUint64(b[8:], r.cookie)
		binary.BigEndian.PutUint64(b[16:], r.off)
		binary.BigEndian.PutUint64(b[24:], length)
		return b
	}
	b = b[:nbdproto.StructuredHdrSize]
	binary.BigEndian.PutUint32(b[0:], nbdproto.StructuredReplyMagic)
	binary.BigEndian.PutUint16(b[4:], flags)
	binary.BigEndian.PutUint16(b[6:], typ)
	binary.BigEndian.PutUint64(b[8:], r.cookie)
	binary.BigEndian.PutUint32(b[16:], uint32(length))
	return b
}

// replySimple sends a reply without payload: a simple reply, or with
// extended headers (which have none) a NONE chunk or an error chunk.
func (c *conn) replySimple(r *request, errno uint32, data []byte) {
	if c.extended {
		if errno != 0 {
			c.replyErrorChunk(r, errno)
			return
		}
		c.send(r, c.chunkHeader(r.hdr[:], r, nbdproto.ReplyFlagDone, nbdproto.ReplyNone, 0), nil)
		return
	}
	h := r.hdr[:nbdproto.SimpleReplySize]
	binary.BigEndian.PutUint32(h[0:], nbdproto.SimpleReplyMagic)
	binary.BigEndian.PutUint32(h[4:], errno)
	binary.BigEndian.PutUint64(h[8:], r.cookie)
	c.send(r, h, data)
}

// replyErrorChunk sends one ERROR chunk (no message) that ends the reply.
func (c *conn) replyErrorChunk(r *request, errno uint32) {
	h := c.chunkHeader(r.hdr[:], r, nbdproto.ReplyFlagDone, nbdproto.ReplyError, 6)
	b := binary.BigEndian.AppendUint32(h, errno)
	c.send(r, binary.BigEndian.AppendUint16(b, 0), nil)
}

// nbdproto.ReplyError answers with an error: an error chunk where the command's
// success reply would be structured (or always, with extended headers),
// else a simple reply.
func (c *conn) replyError(r *request, errno uint32) {
	if c.extended || c.structured && (r.typ == nbdproto.CmdRead || r.typ == nbdproto.CmdBlockStatus) {
		c.replyErrorChunk(r, errno)
		return
	}
	c.replySimple(r, errno, nil)
}
