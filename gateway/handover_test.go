package gateway_test

import (
	"bufio"
	"context"
	"encoding/binary"
	"fmt"
	"io"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"goldilocks/gateway"
	"goldilocks/internal/block"
)

// A connection handed from one server to another, and back, under a
// pipelined load loses no request and answers none twice: every reply
// comes once, every read sees a version of its block that was written,
// no older than what was acknowledged when it was sent, and at the end
// every block holds its last write. One handover is aborted: the
// connection resumes where it was.
func TestHandoverUnderLoad(t *testing.T) {
	for _, tcp := range []bool{false, true} {
		t.Run(map[bool]string{false: "unix", true: "tcp"}[tcp], func(t *testing.T) {
			dev := newFileDevice(t, 4<<20)
			servers := []*specServer{startSpecServerOn(t, tcp, dev, "", nil), startSpecServerOn(t, tcp, dev, "", nil)}
			t.Cleanup(func() {
				if t.Failed() {
					t.Logf("server 0:\n%s\nserver 1:\n%s", servers[0].log, servers[1].log)
				}
			})
			nc := servers[0].dial(t)
			cl := newClient(t, nc)
			cl.attach("disk", false)
			nc.SetDeadline(time.Now().Add(60 * time.Second))
			l := newHandoverLoad(nc, cl.r, 256)
			stop := make(chan struct{})
			go l.send(stop)
			go l.receive()

			on, pending := 0, 0
			for step, commit := range []bool{true, true, false, true, true} {
				l.await(t, int64(step+1)*250) // each server answers a share of the load: a count, not a time, so that a slow machine (-race, 2 cores) holds it too
				from, to := servers[on], servers[1-on]
				ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
				h, err := from.srv.Handover(ctx)
				cancel()
				if err != nil {
					t.Fatalf("step %d: %v\nserver log:\n%s", step, err, from.log)
				}
				if len(h.Conns) != 1 {
					t.Fatalf("step %d: %d connections to hand over, want 1", step, len(h.Conns))
				}
				if !commit {
					h.Abort()
					continue
				}
				hc := h.Conns[0]
				if len(hc.State.Pending) > 0 {
					pending++
				}
				a, err := to.srv.Adopt(hc.File, hc.State)
				if err != nil {
					t.Fatalf("step %d: adopt: %v", step, err)
				}
				h.Commit()
				a.Start()
				on = 1 - on
			}
			l.await(t, 1500)
			close(stop) // the load ran through every handover
			if err := l.wait(); err != nil {
				t.Fatal(err)
			}
			t.Logf("%d requests, %d handovers with bytes of unread requests", l.sent.Load(), pending)
			// Every block holds its last write.
			buf := make([]byte, 4096)
			for b := range l.blocks {
				if _, err := dev.ReadAt(buf, int64(b)*4096); err != nil {
					t.Fatal(err)
				}
				if v := l.version(buf, b); v != l.written[b] {
					t.Fatalf("block %d holds version %d, last written %d", b, v, l.written[b])
				}
			}
		})
	}
}

// handoverLoad pipelines 4 KiB writes and reads over a few blocks; each
// write stamps its block with (block, version) in every 16 bytes.
type handoverLoad struct {
	w      io.Writer
	r      *bufio.Reader
	blocks int

	mu      sync.Mutex
	written []uint64 // last version sent per block
	acked   []uint64 // last version acknowledged per block
	inAir   map[uint64]op
	errs    []error
	sent    atomic.Int64
	slots   chan struct{} // requests in flight, at most 64: more than the server runs at once (32), so that some wait in its read buffer
	done    chan struct{}
	total   int // requests sent, once the sender stopped; -1 before
	replies int
}

type op struct {
	read    bool
	block   int
	version uint64 // a write's; a read's lowest acceptable
	highest uint64 // a read's highest acceptable
}

func newHandoverLoad(w io.Writer, r *bufio.Reader, blocks int) *handoverLoad {
	return &handoverLoad{w: w, r: r, blocks: blocks, written: make([]uint64, blocks), acked: make([]uint64, blocks),
		inAir: map[uint64]op{}, slots: make(chan struct{}, 64), done: make(chan struct{}), total: -1}
}

// await returns once n requests have been sent; it fails the test at
// the load's first error, or after 30 s.
func (l *handoverLoad) await(t *testing.T, n int64) {
	t.Helper()
	waitFor(t, fmt.Sprintf("%d requests sent", n), func() bool {
		if errs := l.errors(); len(errs) > 0 {
			t.Fatalf("after %d requests: %v", l.sent.Load(), errs)
		}
		return l.sent.Load() >= n
	})
}

func (l *handoverLoad) errors() []error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.errs)
}

func (l *handoverLoad) fail(err error) {
	l.mu.Lock()
	l.errs = append(l.errs, err)
	l.mu.Unlock()
}

// send sends requests until stop is closed, then one last read, whose
// reply the receiver knows to be the last (total is set before it goes).
func (l *handoverLoad) send(stop chan struct{}) {
	payload := make([]byte, 4096)
	for i := 0; ; i++ {
		last := false
		select {
		case <-stop:
			last = true
			l.slots <- struct{}{}
		case l.slots <- struct{}{}:
		}
		cookie := uint64(i + 1)
		b := (i * 7919) % l.blocks
		var hdr []byte
		l.mu.Lock()
		if last {
			l.total = i + 1
		}
		if i%3 == 2 || last {
			l.inAir[cookie] = op{read: true, block: b, version: l.acked[b], highest: l.written[b]}
			hdr = reqHeader(false, 0, 0, cookie, uint64(b)*4096, 4096)
		} else {
			l.written[b]++
			l.inAir[cookie] = op{block: b, version: l.written[b]}
			for o := 0; o < len(payload); o += 16 {
				binary.BigEndian.PutUint64(payload[o:], uint64(b))
				binary.BigEndian.PutUint64(payload[o+8:], l.written[b])
			}
			hdr = append(reqHeader(false, 0, 1, cookie, uint64(b)*4096, 4096), payload...)
		}
		l.mu.Unlock()
		if _, err := l.w.Write(hdr); err != nil {
			l.fail(fmt.Errorf("request %d: %w", cookie, err))
			return
		}
		l.sent.Add(1)
		if last {
			return
		}
	}
}

func (l *handoverLoad) receive() {
	defer close(l.done)
	var h [16]byte
	data := make([]byte, 4096)
	for {
		l.mu.Lock()
		finished := l.total >= 0 && l.replies == l.total
		l.mu.Unlock()
		if finished {
			return
		}
		if _, err := io.ReadFull(l.r, h[:]); err != nil {
			l.fail(fmt.Errorf("reply after %d: %w", l.replies, err))
			return
		}
		if m := binary.BigEndian.Uint32(h[:]); m != 0x67446698 {
			l.fail(fmt.Errorf("reply magic %#x", m))
			return
		}
		errno, cookie := binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
		l.mu.Lock()
		o, ok := l.inAir[cookie]
		delete(l.inAir, cookie)
		l.replies++
		l.mu.Unlock()
		switch {
		case !ok:
			l.fail(fmt.Errorf("reply to cookie %d: not in flight (answered twice?)", cookie))
			return
		case errno != 0:
			l.fail(fmt.Errorf("cookie %d: errno %d", cookie, errno))
			return
		}
		if o.read {
			if _, err := io.ReadFull(l.r, data); err != nil {
				l.fail(fmt.Errorf("read payload of %d: %w", cookie, err))
				return
			}
			if v := l.version(data, o.block); v < o.version || v > o.highest {
				l.fail(fmt.Errorf("read %d of block %d saw version %d, want %d..%d", cookie, o.block, v, o.version, o.highest))
			}
		} else {
			l.mu.Lock()
			l.acked[o.block] = max(l.acked[o.block], o.version)
			l.mu.Unlock()
		}
		<-l.slots
	}
}

// version returns the version stamped in a block, or MaxUint64 when the
// stamps disagree or name another block (0 for a block never written).
func (l *handoverLoad) version(b []byte, block int) uint64 {
	v := binary.BigEndian.Uint64(b[8:])
	for o := 0; o < len(b); o += 16 {
		if binary.BigEndian.Uint64(b[o+8:]) != v || (v != 0 && binary.BigEndian.Uint64(b[o:]) != uint64(block)) {
			return 1<<64 - 1
		}
	}
	return v
}

// wait returns once every reply came, or the first error.
func (l *handoverLoad) wait() error {
	select {
	case <-l.done:
	case <-time.After(50 * time.Second):
		l.mu.Lock()
		defer l.mu.Unlock()
		return fmt.Errorf("replies stopped: %d of %d sent (%v)", l.replies, l.sent.Load(), l.errs)
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	if len(l.errs) > 0 {
		return l.errs[0]
	}
	if l.replies != l.total {
		return fmt.Errorf("%d replies to %d requests", l.replies, l.total)
	}
	return nil
}

// gatedDevice holds every read until gate is closed; waiting counts
// the reads held.
type gatedDevice struct {
	block.Device
	gate    chan struct{}
	waiting *atomic.Int32
}

func (g gatedDevice) ReadAt(b []byte, off int64) (int, error) {
	g.waiting.Add(1)
	<-g.gate
	return g.Device.ReadAt(b, off)
}

// waitFor polls cond every millisecond and fails the test after 30 s.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("waited 30 s for %s", what)
		}
		time.Sleep(time.Millisecond)
	}
}

// Requests the old server had read into its buffer but not begun go to
// the new one with the connection (ConnState.Pending) and are answered
// there: 40 reads sent at once, 32 (the server's MaxInflight) held at
// the device while the handover starts, the other 8 read from the
// socket but not yet served.
func TestHandoverCarriesReadBuffer(t *testing.T) {
	gated := gatedDevice{Device: block.NewMem(1 << 20), gate: make(chan struct{}), waiting: new(atomic.Int32)}
	from := startSpecServer(t, gated, "", nil)
	to := startSpecServer(t, block.NewMem(1<<20), "", nil)
	nc := from.dial(t)
	cl := newClient(t, nc)
	cl.attach("disk", false)
	var burst []byte
	for i := range 40 {
		burst = append(burst, reqHeader(false, 0, 0, uint64(i+1), uint64(i)*4096, 4096)...)
	}
	cl.write(burst)
	waitFor(t, "32 reads at the device", func() bool { return gated.waiting.Load() == 32 }) // the server read the burst, started 32 reads and waits for a slot
	type result struct {
		h   *gateway.Handover
		err error
	}
	got := make(chan result, 1)
	go func() {
		h, err := from.srv.Handover(t.Context())
		got <- result{h, err}
	}()
	waitFor(t, "the handover to begin", from.srv.HandingOver)
	close(gated.gate) // the 32 complete; the reader then stops at the next request
	r := <-got
	if r.err != nil {
		t.Fatal(r.err)
	}
	if len(r.h.Conns) != 1 {
		t.Fatalf("%d connections handed over, want 1", len(r.h.Conns))
	}
	st := r.h.Conns[0].State
	if len(st.Pending) != 8*28 {
		t.Fatalf("%d bytes of unread requests handed over, want %d", len(st.Pending), 8*28)
	}
	a, err := to.srv.Adopt(r.h.Conns[0].File, st)
	if err != nil {
		t.Fatal(err)
	}
	r.h.Commit()
	a.Start()
	seen := map[uint64]bool{}
	data := make([]byte, 4096)
	for range 40 {
		errno, cookie := cl.simpleReply(data)
		if errno != 0 || cookie < 1 || cookie > 40 || seen[cookie] {
			t.Fatalf("reply errno %d cookie %d (seen %v)", errno, cookie, seen[cookie])
		}
		seen[cookie] = true
	}
	// The connection goes on at the new server.
	cl.request(0, 0, 41, 0, 4096, nil)
	if errno, cookie := cl.simpleReply(data); errno != 0 || cookie != 41 {
		t.Fatalf("after the handover: errno %d cookie %d", errno, cookie)
	}
}
