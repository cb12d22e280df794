package gateway

import (
	"fmt"
	"io"
	"syscall"

	"golang.org/x/sys/unix"

	"goldilocks/internal/nbdproto"
)

// Large plain writes are spliced: socket → pipe → backing file, so the
// payload never crosses into user space (one copy, into the page cache,
// instead of two). Only devices whose bytes are the file's (block.Filer)
// take this path; encryption must see the bytes, and TLS has no raw
// socket.

const (
	spliceMin  = 256 << 10 // smaller writes are cheaper read into a buffer
	pipeSize   = 1 << 20   // asked of F_SETPIPE_SZ; the kernel may give less
	spliceFlag = unix.SPLICE_F_MOVE
)

// splicer holds one connection's pipe and the state of the splice in
// progress; the reader goroutine owns it.
type splicer struct {
	pr, pw  int   // pipe ends
	size    int   // pipe capacity
	want    int   // bytes to move from the socket in this round
	got     int   // bytes moved into the pipe in this round
	err     error // socket-side error of this round
	readFn  func(fd uintptr) bool
	fileFD  int
	devNull int  // where a failed write's payload is drained
	sockErr bool // the socket failed: the connection is over
}

func newSplicer(fileFD int) (*splicer, error) {
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("pipe for splice: %w", err)
	}
	null, err := unix.Open("/dev/null", unix.O_WRONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, fmt.Errorf("splice: %w", err)
	}
	s := &splicer{pr: p[0], pw: p[1], fileFD: fileFD, devNull: null, size: 64 << 10}
	if n, err := unix.FcntlInt(uintptr(s.pw), unix.F_SETPIPE_SZ, pipeSize); err == nil {
		s.size = n
	}
	s.readFn = s.fromSocket
	return s, nil
}

func (s *splicer) close() {
	unix.Close(s.pr)
	unix.Close(s.pw)
	unix.Close(s.devNull)
}

// fromSocket is called by RawConn.Read with the socket: it moves up to
// s.want bytes into the pipe; false means "wait until readable".
func (s *splicer) fromSocket(fd uintptr) bool {
	for s.got < s.want {
		n, err := unix.Splice(int(fd), nil, s.pw, nil, s.want-s.got, spliceFlag|unix.SPLICE_F_NONBLOCK)
		switch {
		case err == syscall.EINTR:
			continue
		case err == syscall.EAGAIN:
			return s.got > 0 // move what we have to the file first
		case err != nil:
			s.err = err
			return true
		case n == 0:
			s.err = io.ErrUnexpectedEOF
			return true
		}
		s.got += int(n)
	}
	return true
}

// spliceWrite moves n payload bytes from the socket to the file at off.
// A socket error ends the connection (sockErr); a file error leaves the
// stream in sync (the rest of the payload is consumed) and is returned.
func (c *conn) spliceWrite(n int, off int64) error {
	s := c.splice
	var fileErr error
	for n > 0 {
		s.want, s.got, s.err = min(n, s.size), 0, nil
		if err := c.raw.Read(s.readFn); err != nil && s.err == nil {
			s.err = err
		}
		// Whatever reached the pipe goes to the file (or is drained).
		for left := s.got; left > 0; {
			var m int64
			var err error
			if fileErr == nil {
				m, err = unix.Splice(s.pr, nil, s.fileFD, &off, left, spliceFlag)
			} else {
				m, err = unix.Splice(s.pr, nil, s.devNull, nil, left, spliceFlag)
			}
			if err == nil && m == 0 {
				err = io.ErrShortWrite
			}
			switch {
			case err == syscall.EINTR:
				continue
			case err != nil && fileErr == nil:
				fileErr = err
				continue
			case err != nil:
				s.sockErr = true // cannot drain the pipe: give up the stream
				return err
			}
			left -= int(m)
		}
		n -= s.got
		if s.err != nil {
			s.sockErr = true
			return s.err
		}
	}
	return fileErr
}

// writeSpliced runs a large plain WRITE on the reader goroutine: the bytes
// already in the read buffer by pwrite, the rest by splice, then its
// reply. An error (of the socket) ends the connection.
func (c *conn) writeSpliced(r *request) error {
	dev := c.exp.Device
	off, n := int64(r.off), int(r.length)
	b := min(c.rd.Buffered(), n)
	var err error
	if b > 0 {
		p, _ := c.rd.Peek(b)
		_, err = dev.WriteAt(p, off)
		c.rd.Discard(b)
	}
	if err == nil {
		err = c.spliceWrite(n-b, off+int64(b))
	} else if _, derr := c.rd.Discard(n - b); derr != nil {
		return derr
	}
	if c.splice.sockErr { // the payload is not all read: the stream is lost
		if err == nil {
			err = io.ErrUnexpectedEOF
		}
		return err
	}
	c.wrote.Store(true)
	if err == nil && r.flags&nbdproto.CmdFlagFUA != 0 {
		err = dev.Flush()
	}
	c.onReader(r)
	c.finish(r, int64(n), err)
	return nil
}
