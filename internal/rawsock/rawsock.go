// Package rawsock reads and writes a connected socket with raw system
// calls, for the request paths of the NBD server and the upstream NBD
// client.
//
// Why: every system call made through package syscall enters the Go
// runtime (entersyscall), and the first one after the process was idle
// wakes the runtime's sysmon thread, which then polls every 20 µs for
// about a millisecond before it backs off. A server that goes idle and
// busy thousands of times a second (a client at queue depth 32 sends
// bursts) pays those wake-ups and polls on every burst. A read or write of
// a non-blocking socket cannot block, so it needs none of what
// entersyscall provides; made raw, it wakes nobody.
//
// The socket stays Go's: syscall.RawConn parks a goroutine on the
// netpoller when the socket is not ready (EAGAIN), and read and write
// deadlines, Close and SetReadDeadline-to-interrupt work as with net.Conn.
//
// It owns the system calls only: it does not buffer (bufio does), and it
// is not for TLS (crypto/tls owns those bytes). One goroutine may read
// while another writes; two reads, or two writes, at once are the caller's
// to prevent.
package rawsock

import (
	"errors"
	"io"
	"syscall"
	"unsafe"
)

// maxIov bounds the iovecs of one writev (the kernel's UIO_MAXIOV is 1024).
const maxIov = 1024

// Conn is a socket read and written with raw system calls.
type Conn struct {
	rc syscall.RawConn

	// The read in progress (Read).
	rp   []byte
	rn   int
	rerr error
	rfn  func(fd uintptr) bool

	// The write in progress (Write, Writev): bufs from index wi, the
	// first of them from byte woff.
	bufs [][]byte
	one  [1][]byte // Write's single buffer, so that Write allocates nothing
	wi   int
	woff int
	wn   int64
	werr error
	wfn  func(fd uintptr) bool
	iov  []syscall.Iovec
}

// ErrNotSocket is returned by New for a connection without a file
// descriptor (TLS, a net.Pipe).
var ErrNotSocket = errors.New("rawsock: not a socket")

// New wraps c, which must be a *net.TCPConn, *net.UnixConn or another
// syscall.Conn whose descriptor is a non-blocking stream socket.
func New(c any) (*Conn, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, ErrNotSocket
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		return nil, err
	}
	s := &Conn{rc: rc, iov: make([]syscall.Iovec, 0, 64)}
	s.rfn, s.wfn = s.read, s.write
	return s, nil
}

// Read reads up to len(p) bytes; at the end of the stream it returns
// io.EOF.
func (s *Conn) Read(p []byte) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	s.rp, s.rn, s.rerr = p, 0, nil
	err := s.rc.Read(s.rfn)
	s.rp = nil
	switch {
	case err != nil:
		return 0, err
	case s.rerr != nil:
		return 0, s.rerr
	case s.rn == 0:
		return 0, io.EOF
	}
	return s.rn, nil
}

// read is the RawConn.Read callback: false means "not ready, wait".
func (s *Conn) read(fd uintptr) bool {
	for {
		n, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&s.rp[0])), uintptr(len(s.rp)))
		switch e {
		case 0:
			s.rn = int(n)
			return true
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			s.rerr = e
			return true
		}
	}
}

// Write writes all of p (for bufio.Writer).
func (s *Conn) Write(p []byte) (int, error) {
	s.one[0] = p
	n, err := s.Writev(s.one[:])
	s.one[0] = nil
	return int(n), err
}

// Writev writes all of bufs, in as few writev calls as the socket
// allows. It does not modify bufs.
func (s *Conn) Writev(bufs [][]byte) (int64, error) {
	s.bufs, s.wi, s.woff, s.wn, s.werr = bufs, 0, 0, 0, nil
	err := s.rc.Write(s.wfn)
	s.bufs = nil
	if err == nil {
		err = s.werr
	}
	return s.wn, err
}

// write is the RawConn.Write callback.
func (s *Conn) write(fd uintptr) bool {
	for {
		s.iov = s.iov[:0]
		off := s.woff
		for _, b := range s.bufs[s.wi:] {
			if b = b[off:]; len(b) > 0 {
				v := syscall.Iovec{Base: &b[0]}
				v.SetLen(len(b))
				if s.iov = append(s.iov, v); len(s.iov) == maxIov {
					break
				}
			}
			off = 0
		}
		if len(s.iov) == 0 {
			return true // all written
		}
		n, _, e := syscall.RawSyscall(syscall.SYS_WRITEV, fd, uintptr(unsafe.Pointer(&s.iov[0])), uintptr(len(s.iov)))
		switch e {
		case 0:
		case syscall.EINTR:
			continue
		case syscall.EAGAIN:
			return false
		default:
			s.werr = e
			return true
		}
		s.wn += int64(n)
		s.advance(int(n))
	}
}

// advance moves the write position n bytes on.
func (s *Conn) advance(n int) {
	for n > 0 && s.wi < len(s.bufs) {
		rest := len(s.bufs[s.wi]) - s.woff
		if n < rest {
			s.woff += n
			return
		}
		n -= rest
		s.wi++
		s.woff = 0
	}
}
