package gateway_test

import (
	"bytes"
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// BenchmarkServer drives the whole server loop (socket read, validate,
// worker, backend, reply) over a Unix socket with a pipelined raw client
// that allocates nothing itself, so allocs/op is the server's.
func BenchmarkServer(b *testing.B) {
	type benchCase struct {
		name       string
		cmd        uint16 // 0 READ, 1 WRITE
		size       int
		structured bool // structured replies negotiated
	}
	for _, bc := range []benchCase{
		{"read-4k", 0, 4 << 10, false},
		{"read-1m", 0, 1 << 20, false},
		{"read-4k-structured", 0, 4 << 10, true},
		{"read-1m-structured", 0, 1 << 20, true},
		{"write-4k", 1, 4 << 10, false},
		{"write-1m", 1, 1 << 20, false},
	} {
		b.Run(bc.name, func(b *testing.B) {
			const devSize = 64 << 20
			const depth = 8
			dev := newFileDevice(b, devSize)
			fill := bytes.Repeat([]byte{0x5a}, 1<<20) // data, not holes (a hole is a 32-byte reply)
			for off := int64(0); off < devSize; off += int64(len(fill)) {
				if _, err := dev.WriteAt(fill, off); err != nil {
					b.Fatal(err)
				}
			}
			dial := startServer(b, dev)
			cl := newClient(b, dial(b))
			cl.attach("disk", bc.structured)
			c := cl.c.(*net.UnixConn)
			c.SetDeadline(time.Time{})
			slots := devSize / bc.size

			reqs := make([]byte, depth*28)
			payload := make([]byte, bc.size)
			reply := make([]byte, 48+bc.size)
			hdrLen := 16
			if bc.structured && bc.cmd == 0 {
				hdrLen = 28
			}
			replyLen := hdrLen
			if bc.cmd == 0 {
				replyLen += bc.size
			}
			// Over the Unix socket reads are copied (sendfile is for TCP):
			// one chunk per reply, no trailing NONE chunk.
			var seq uint64
			round := func() {
				for i := 0; i < depth; i++ {
					r := reqs[i*28 : i*28+28]
					binary.BigEndian.PutUint32(r[0:], 0x25609513)
					binary.BigEndian.PutUint16(r[4:], 0)
					binary.BigEndian.PutUint16(r[6:], bc.cmd)
					binary.BigEndian.PutUint64(r[8:], seq)
					binary.BigEndian.PutUint64(r[16:], uint64(int(seq)%slots*bc.size))
					binary.BigEndian.PutUint32(r[24:], uint32(bc.size))
					seq++
					if _, err := c.Write(r); err != nil {
						b.Fatal(err)
					}
					if bc.cmd == 1 {
						if _, err := c.Write(payload); err != nil {
							b.Fatal(err)
						}
					}
				}
				for i := 0; i < depth; i++ {
					if _, err := io.ReadFull(c, reply[:replyLen]); err != nil {
						b.Fatal(err)
					}
					if !bc.structured && binary.BigEndian.Uint32(reply[4:]) != 0 {
						b.Fatalf("errno %d", binary.BigEndian.Uint32(reply[4:]))
					}
				}
			}
			for i := 0; i < 64; i++ { // warm the buffer pools and slots
				round()
			}
			b.SetBytes(int64(bc.size))
			b.ReportAllocs()
			b.ResetTimer()
			for i := 0; i < b.N; i += depth {
				round()
			}
		})
	}
}

// BenchmarkFlushQD1 is a client at queue depth one sending FLUSH after
// FLUSH (fio --fsync=1's pattern): each runs on the reader goroutine (the
// connection is idle), which looks at the socket once after it. No
// allocations.
func BenchmarkFlushQD1(b *testing.B) {
	dev := newFileDevice(b, 1<<20)
	dial := startServer(b, dev)
	cl := newClient(b, dial(b))
	cl.attach("disk", false)
	c := cl.c.(*net.UnixConn)
	c.SetDeadline(time.Time{})
	req := make([]byte, 28)
	reply := make([]byte, 16)
	binary.BigEndian.PutUint32(req[0:], 0x25609513)
	binary.BigEndian.PutUint16(req[6:], 3) // NBD_CMD_FLUSH
	flush := func(i int) {
		binary.BigEndian.PutUint64(req[8:], uint64(i))
		if _, err := c.Write(req); err != nil {
			b.Fatal(err)
		}
		if _, err := io.ReadFull(c, reply); err != nil {
			b.Fatal(err)
		}
		if e := binary.BigEndian.Uint32(reply[4:]); e != 0 {
			b.Fatalf("errno %d", e)
		}
	}
	for i := range 64 {
		flush(i)
	}
	b.ReportAllocs()
	b.ResetTimer()
	for i := range b.N {
		flush(i)
	}
}
