package gateway

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"syscall"
	"time"

	"goldilocks/internal/nbdproto"
)

// Replies leave through one combining writer per connection. A goroutine
// with a reply queues it; if no goroutine is writing, it becomes the
// writer and sends everything queued, batching the replies that queued
// meanwhile into one writev. So a reply never waits for company that has
// not come yet (QEMU's client stalls against servers that hold replies
// back), yet under load
// many replies share one system call. A reply completed in a device's
// batch (block.Batch: an upstream server's replies read together, one
// read of librbd's completions) does not become the writer: it waits in
// the queue for the batch's end (FlushBatch), unless a writer at work
// takes it first. The writer releases each request slot once its reply
// is out.

// send queues r's reply: header, then payload (nil for none; ignored when
// r.zeroCopy, whose payload is sent from the backing file). r belongs to
// the reply writer from here on. A request the reader ran itself
// (r.deferred) waits in c.deferred for flushDeferred instead.
func (c *conn) send(r *request, hdr, data []byte) {
	r.vec[0], r.vec[1] = hdr, data
	if r.deferred {
		c.deferred = append(c.deferred, r) // never grows: at most MaxInflight slots
		return
	}
	c.running.Add(-1) // a worker's request: done at the device
	c.wmu.Lock()
	c.queue = append(c.queue, r) // never grows: at most MaxInflight slots exist
	if b := r.batch; b != nil {
		// Completed by a device with more completions at hand: the
		// replies go out together once it has run them (FlushBatch),
		// unless a writer at work takes them first. (A hand-over waits
		// for every slot to come back, so for these too: drainReplies.)
		r.batch = nil
		c.wmu.Unlock()
		b.Defer(c)
		return
	}
	c.writeQueueLocked()
}

// FlushBatch sends the replies queued by completions of a device's
// batch (block.Batch), at its end.
func (c *conn) FlushBatch() {
	c.wmu.Lock()
	c.writeQueueLocked()
}

// flushDeferred sends the replies the reader held back, and pushes the
// requests it submitted (block.Submitter). The reader calls it before
// anything that could block it.
func (c *conn) flushDeferred() {
	if c.submitter != nil {
		c.submitter.Push() // requests submitted meanwhile go out together
	}
	if len(c.deferred) == 0 {
		return
	}
	c.wmu.Lock()
	c.queue = append(c.queue, c.deferred...)
	c.deferred = c.deferred[:0]
	c.writeQueueLocked()
}

// writeQueueLocked is called with wmu held and releases it. Unless
// another goroutine is writing, it sends everything queued, including
// what others queue meanwhile.
func (c *conn) writeQueueLocked() {
	if c.writing {
		c.wmu.Unlock()
		return
	}
	c.writing = true
	for len(c.queue) > 0 {
		batch := c.queue
		c.queue = c.spare[:0]
		c.wmu.Unlock()
		if t := c.srv.cfg.ReplyTimeout; t > 0 { // a client that does not read
			c.nc.SetWriteDeadline(time.Now().Add(t))
		}
		c.writeBatch(batch)
		c.wmu.Lock()
		c.spare = batch[:0]
	}
	c.writing = false
	c.wmu.Unlock()
}

// writeBatch sends the replies of batch in order and releases them.
func (c *conn) writeBatch(batch []*request) {
	iov := c.iovArr[:0]
	mayFault := false
	for _, r := range batch {
		if r.zeroCopy {
			c.writeIov(iov, mayFault)
			iov, mayFault = c.iovArr[:0], false
			c.sendfileReply(r)
			continue
		}
		iov = append(iov, r.vec[0])
		if r.vec[1] != nil {
			iov = append(iov, r.vec[1])
		}
		mayFault = mayFault || r.mapped
	}
	c.writeIov(iov, mayFault)
	for _, r := range batch {
		r.vec[0], r.vec[1], r.zeroCopy, r.mapped, r.deferred = nil, nil, false, false, false
		c.done(r)
	}
}

// writeIov sends iov: with a raw writev (package rawsock) unless a buffer
// is lent from a file's mapping (mayFault), whose page faults read the
// disk inside the system call, which the Go runtime must then know is
// under way.
func (c *conn) writeIov(iov [][]byte, mayFault bool) {
	if len(iov) == 0 || c.broken {
		return
	}
	if c.rs != nil && !mayFault {
		if _, err := c.rs.Writev(iov); err != nil {
			c.fail("reply failed; closing connection", err)
		}
		return
	}
	c.iov = iov
	if _, err := c.iov.WriteTo(c.nc); err != nil {
		c.fail("reply failed; closing connection", err)
	}
}

// fail marks the stream unusable after a reply was cut short.
func (c *conn) fail(msg string, err error) {
	c.broken = true
	if !errors.Is(err, net.ErrClosed) {
		c.log.Warn(msg, "err", err)
	}
	c.nc.Close()
}

// sendfileReply sends a plain read straight from the page cache: the reply
// header with MSG_MORE, then sendfile. With structured replies a failure
// of the file after the header is reported in-band: the rest of the data
// chunk is padded with zeros and an ERROR_OFFSET chunk ends the reply
// (proto.md, structured replies); else the reply ends with a NONE chunk.
// A simple reply cannot report it: the connection ends.
func (c *conn) sendfileReply(r *request) {
	if c.broken {
		return
	}
	r.sfHdr, r.sfOff, r.sfRemain, r.sfErr = r.vec[0], int64(r.off), int(r.length), nil
	err := c.raw.Write(r.sendfn)
	if err == nil {
		err = r.sfErr
	}
	if err != nil && (!c.structured || len(r.sfHdr) > 0 || socketError(err)) {
		c.log.Error("zero-copy read failed", "offset", r.off, "length", r.length, "err", err)
		c.fail("closing connection", err)
		return
	}
	if !c.structured {
		return
	}
	t := c.chunkHeader(r.trailer[:], r, nbdproto.ReplyFlagDone, nbdproto.ReplyNone, 0)
	if err != nil {
		at := r.off + r.length - uint64(r.sfRemain)
		c.requestFailed(r, errnoOf(err), fmt.Errorf("at offset %d: %w", at, err))
		c.stats.errors.Add(1)
		if !c.pad(r.sfRemain) {
			return
		}
		t = c.chunkHeader(r.trailer[:], r, nbdproto.ReplyFlagDone, nbdproto.ReplyErrorOffset, 14)
		t = binary.BigEndian.AppendUint32(t, errnoOf(err))
		t = binary.BigEndian.AppendUint16(t, 0) // no message
		t = binary.BigEndian.AppendUint64(t, at)
	}
	if _, err := c.nc.Write(t); err != nil {
		c.fail("reply failed; closing connection", err)
	}
}

// pad sends n zero bytes: the rest of a data chunk whose data failed.
func (c *conn) pad(n int) bool {
	var zeros [4096]byte
	for n > 0 {
		k := min(n, len(zeros))
		if _, err := c.nc.Write(zeros[:k]); err != nil {
			c.fail("reply failed; closing connection", err)
			return false
		}
		n -= k
	}
	return true
}

// socketError reports errors of the socket rather than of the file.
func socketError(err error) bool {
	return errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) ||
		errors.Is(err, syscall.ENOTCONN) || errors.Is(err, net.ErrClosed)
}

// sendfile is called by RawConn.Write with the socket; false means "wait
// until writable and call again".
func (r *request) sendfile(fd uintptr) bool {
	sock := int(fd)
	for len(r.sfHdr) > 0 {
		n, err := sendMore(sock, r.sfHdr)
		if err == nil {
			r.sfHdr = r.sfHdr[n:]
		}
		if wait, stop := r.step(err); wait || stop {
			return stop
		}
	}
	for r.sfRemain > 0 {
		n, err := syscall.Sendfile(sock, r.c.sendFD, &r.sfOff, r.sfRemain)
		if n > 0 {
			r.sfRemain -= n
		}
		if err == nil && n == 0 {
			r.sfErr = io.ErrUnexpectedEOF // the file shrank under us
			return true
		}
		if wait, stop := r.step(err); wait || stop {
			return stop
		}
	}
	return true
}

// step sorts a non-blocking send's error: go on (none, EINTR), wait for
// the socket (EAGAIN), or stop with it (in r.sfErr).
func (r *request) step(err error) (wait, stop bool) {
	switch err {
	case nil, syscall.EINTR:
		return false, false
	case syscall.EAGAIN:
		return true, false
	}
	r.sfErr = err
	return false, true
}
