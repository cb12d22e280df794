package gateway

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"sync"
	"syscall"
	"time"

	"goldilocks/internal/nbdproto"
)

// Handing live connections to another process (an in-place upgrade).
//
// Handover stops every attached connection without TLS at a request
// boundary: no new request is read, the requests in flight are answered
// and their replies sent, and the export released (the caller makes that
// a handoff, block.Handoffer, not a close: the new process opens it next).
// Nothing is flushed for the client: its own next FLUSH, served by the
// new process, makes its writes durable. What the connection
// negotiated, and any bytes of the next requests already read from the
// socket, make its ConnState; a duplicate of its socket goes with it. The
// caller passes both to the new process, whose Adopt takes the
// connection up where it stopped: the client sees a pause, not an error.
// Commit ends the connections here without a word to the client; Abort
// resumes them (the export opened again), as if nothing had happened.
//
// A TLS connection cannot be handed over (crypto/tls's state stays in
// this process): it is stopped as by Shutdown, its in-flight requests
// answered, then closed; a client that reconnects (QEMU with
// reconnect-delay) resends what was not answered. So are connections
// still in the handshake.

// ConnState is what an attached connection carries to another process.
type ConnState struct {
	Export     string `json:"export"`
	Flags      uint16 `json:"flags"` // transmission flags the client was sent
	Structured bool   `json:"structured,omitempty"`
	Extended   bool   `json:"extended,omitempty"`
	MetaAlloc  bool   `json:"meta_alloc,omitempty"` // base:allocation selected
	MetaSince  string `json:"meta_since,omitempty"` // the changed-block context's snapshot
	ReadOnly   bool   `json:"read_only,omitempty"`
	Identity   string `json:"identity,omitempty"` // the policy identity it attached as
	Recorded   bool   `json:"recorded,omitempty"` // its attach is on the audit trail
	// Started is when the session attached; Ops, Bytes and Errors its
	// totals so far (indexed by command), for the detach record.
	Started time.Time `json:"started"`
	Ops     []uint64  `json:"ops,omitempty"`
	Bytes   []uint64  `json:"bytes,omitempty"`
	Errors  uint64    `json:"errors,omitempty"`
	// Pending holds bytes read from the socket that belong to requests
	// not yet served: the new process serves them first.
	Pending []byte `json:"pending,omitempty"`
}

// HandedConn is one connection stopped for a handover.
type HandedConn struct {
	State ConnState
	File  *os.File // a duplicate of the socket, for the new process
	c     *conn
}

// Handover is a handover in progress: Commit or Abort ends it.
type Handover struct {
	s     *Server
	Conns []*HandedConn
	slots []*handSlot
	once  sync.Once
}

// handSlot is one connection's part in a handover: it reports once
// (stopped and released, or gone) and then waits for the verdict.
type handSlot struct {
	report  chan *HandedConn // nil: the connection ended by itself
	verdict chan bool        // true: handed over; false: resume
}

// ErrHandover: a handover is already running, or cannot be made.
var ErrHandover = errors.New("gateway: handover")

// errHandover ends a connection's read loop at a request boundary.
var errHandover = errors.New("stopped for a handover")

// Handover stops every connection as described above and returns those
// to hand over, once all have stopped. The caller has stopped accepting
// (closed its listeners). If ctx ends first, the stopped connections
// resume and the error says how many did not stop.
func (s *Server) Handover(ctx context.Context) (*Handover, error) {
	s.mu.Lock()
	if s.handing {
		s.mu.Unlock()
		return nil, fmt.Errorf("%w: one is already running", ErrHandover)
	}
	s.handing = true
	h := &Handover{s: s}
	var stopped []*conn
	for c := range s.live {
		if !c.attached.Load() || c.tls {
			c.stop() // TLS or still negotiating: ends after its requests
			stopped = append(stopped, c)
			continue
		}
		sl := &handSlot{report: make(chan *HandedConn, 1), verdict: make(chan bool, 1)}
		h.slots = append(h.slots, sl)
		c.beginHandover(sl)
	}
	s.mu.Unlock()
	for i, sl := range h.slots {
		select {
		case hc := <-sl.report:
			if hc != nil {
				h.Conns = append(h.Conns, hc)
			}
		case <-ctx.Done():
			h.Abort()
			return nil, fmt.Errorf("%w: %d of %d connections had not stopped: %w", ErrHandover, len(h.slots)-i, len(h.slots), ctx.Err())
		}
	}
	// The stopped ones release their volumes too, which the new process
	// opens next: wait until they are gone.
	for _, c := range stopped {
		for {
			s.mu.Lock()
			_, live := s.live[c]
			s.mu.Unlock()
			if !live {
				break
			}
			select {
			case <-ctx.Done():
				h.Abort()
				return nil, fmt.Errorf("%w: a connection that cannot be handed over (TLS) had not ended: %w", ErrHandover, ctx.Err())
			case <-time.After(time.Millisecond):
			}
		}
	}
	return h, nil
}

// Commit ends the handed connections here (the new process serves them).
func (h *Handover) Commit() { h.end(true) }

// Abort resumes the handed connections here.
func (h *Handover) Abort() { h.end(false) }

func (h *Handover) end(handed bool) {
	h.once.Do(func() {
		for _, hc := range h.Conns {
			hc.File.Close()
		}
		for _, sl := range h.slots {
			sl.verdict <- handed // buffered: a slot that has not reported yet finds it
		}
		h.s.mu.Lock()
		h.s.handing = false
		h.s.mu.Unlock()
	})
}

// beginHandover asks the reader to stop at the next request boundary.
// The reader's own check (readRequest) and this one are ordered by hmu,
// so that a deadline set here never cuts a request it already began.
func (c *conn) beginHandover(sl *handSlot) {
	c.hmu.Lock()
	if c.ended {
		c.hmu.Unlock()
		sl.report <- nil // gone already
		return
	}
	c.hand = sl
	c.handing.Store(true)
	if c.idle {
		c.nc.SetReadDeadline(time.Now()) // wake a reader waiting for a request
	}
	c.hmu.Unlock()
}

// handOff is called by serve once transmit returned for a handover (the
// export is released): it reports the connection and waits for the
// verdict. True: the new process has it.
func (c *conn) handOff() bool {
	c.hmu.Lock()
	sl := c.hand
	c.hand = nil // reported here, not again by leaveHandover
	c.hmu.Unlock()
	reported := false
	defer func() {
		if !reported { // a panic below: the handover must not wait for us
			sl.report <- nil
		}
	}()
	hc, err := c.handed()
	if err != nil {
		c.log.Error("connection cannot be handed over; closing it", "err", err)
		reported = true
		sl.report <- nil
		<-sl.verdict
		return true // ends here, as a stopped connection would
	}
	reported = true
	sl.report <- hc
	if <-sl.verdict {
		c.log.Info("connection handed to the new process")
		return true
	}
	c.log.Info("handover aborted: the connection resumes here")
	c.handing.Store(false)
	c.nc.SetReadDeadline(time.Time{})
	return false
}

// leaveHandover is called when a session ends: a handover waiting for
// it hears that it is gone.
func (c *conn) leaveHandover() {
	c.hmu.Lock()
	sl := c.hand
	c.hand, c.ended = nil, true
	c.hmu.Unlock()
	if sl != nil {
		sl.report <- nil
	}
}

// drainReplies waits until every reply is on the socket (every request
// slot is back): from then on the socket can change hands. False: a
// reply is stuck (the connection is broken).
func (c *conn) drainReplies(slots int) bool {
	deadline := time.Now().Add(10 * time.Second)
	for len(c.free) < slots {
		if time.Now().After(deadline) {
			return false
		}
		time.Sleep(50 * time.Microsecond)
	}
	c.wmu.Lock()
	broken := c.broken
	c.wmu.Unlock()
	return !broken
}

// handed describes the stopped connection and duplicates its socket.
func (c *conn) handed() (*HandedConn, error) {
	sc, ok := c.nc.(interface{ File() (*os.File, error) })
	if !ok {
		return nil, fmt.Errorf("%w: %T has no file descriptor", ErrHandover, c.nc)
	}
	f, err := sc.File()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrHandover, err)
	}
	st := ConnState{
		Export: c.volume, Flags: c.flags, Structured: c.structured, Extended: c.extended,
		MetaAlloc: c.metaAlloc, MetaSince: c.metaSince, ReadOnly: c.readOnly, Recorded: c.recorded, Started: c.stats.start,
		Ops: make([]uint64, nbdproto.NumCommands), Bytes: make([]uint64, nbdproto.NumCommands),
		Errors: c.stats.errors.Load(),
	}
	if g := c.grant.Load(); g != nil {
		st.Identity = g.identity
	}
	for i := range st.Ops {
		st.Ops[i], st.Bytes[i] = c.stats.ops[i].Load(), c.stats.bytes[i].Load()
	}
	if n := c.rd.Buffered(); n > 0 {
		b, _ := c.rd.Peek(n)
		st.Pending = append([]byte(nil), b...)
	}
	// An adopted connection handed on before it read all it was handed
	// with: the rest follows what its reader holds (which came from it).
	st.Pending = append(st.Pending, c.pending...)
	return &HandedConn{State: st, File: f, c: c}, nil
}

// Adopted is a connection taken over from another process, its export
// open, not yet served: Start serves it, Close gives it up (the export
// released, the socket closed here, nothing sent to the client).
type Adopted struct {
	c     *conn
	start sync.Once
}

// Adopt takes up a connection handed over by another process: f is its
// socket (Adopt owns it from now on) and st what it negotiated. The
// policy in force decides again: a connection it no longer allows is
// adopted and then cut at Start, as a reload would cut it. An error (the
// export does not open) leaves nothing open.
func (s *Server) Adopt(f *os.File, st ConnState) (*Adopted, error) {
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("adopting a connection of %s: %w", st.Export, err)
	}
	c := s.newConn(nc)
	c.structured, c.extended, c.metaAlloc, c.metaSince = st.Structured, st.Extended, st.MetaAlloc, st.MetaSince
	if st.MetaAlloc || st.MetaSince != "" {
		c.metaExport = st.Export
	}
	d := c.decide(st.Export)
	if err := c.openExport(st.Export, d.g); err != nil {
		nc.Close()
		return nil, fmt.Errorf("adopting a connection of %s: %w", st.Export, err)
	}
	if c.flags != st.Flags {
		c.log.Warn("adopted connection keeps the flags it was sent, which differ from what this build offers", "volume", st.Export,
			"sent", transmissionFlagNames(st.Flags), "offered", transmissionFlagNames(c.flags))
	}
	c.flags = st.Flags
	c.readOnly = c.readOnly || st.ReadOnly
	if d.code == 0 {
		c.countAttach(d.g, false) // never refused: it is attached already
	}
	c.recorded = st.Recorded
	c.stats.start = st.Started
	for i := range min(len(st.Ops), len(st.Bytes), nbdproto.NumCommands) {
		c.stats.ops[i].Store(st.Ops[i])
		c.stats.bytes[i].Store(st.Bytes[i])
	}
	c.stats.errors.Store(st.Errors)
	c.pending, c.adopted = st.Pending, true
	if d.code != 0 {
		c.refusedAtAdopt = d.reason
	}
	identity := ""
	if d.g != nil {
		identity = d.g.identity
	}
	c.sm = s.cfg.Metrics.session(st.Export, identity)
	return &Adopted{c: c}, nil
}

// Start serves the adopted connection.
func (a *Adopted) Start() {
	a.start.Do(func() {
		c := a.c
		s := c.srv
		s.mu.Lock()
		if s.shutting.Load() {
			s.mu.Unlock()
			a.close()
			return
		}
		// Attached already: a handover that starts before its goroutine
		// runs must hand it on, not stop it as one still negotiating.
		c.attached.Store(true)
		s.goServe(c)
		s.mu.Unlock()
	})
}

// Close gives the adopted connection up unserved.
func (a *Adopted) Close() { a.start.Do(a.close) }

func (a *Adopted) close() {
	a.c.detach()
	a.c.closeExport()
	a.c.nc.Close()
}

// serveAdopted is serve's part for an adopted connection: its handshake
// was made with the other process.
func (c *conn) serveAdopted() {
	if c.refusedAtAdopt != "" {
		c.log.Warn("adopted connection no longer allowed by the policy; cutting it", "volume", c.exp.Name, "reason", c.refusedAtAdopt)
		c.revoke(c.refusedAtAdopt)
	}
	c.session("adopted from the previous process")
}

// isTimeout reports a read deadline's expiry.
func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) || errors.As(err, &ne) && ne.Timeout() || errors.Is(err, syscall.EAGAIN)
}
