package gateway_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"math/rand/v2"
	"testing"
)

func TestRawProtocolErrors(t *testing.T) {
	dial := startServer(t, newFileDevice(t, 1<<20))

	t.Run("unknown command gets EINVAL and the connection lives", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.attach("disk", false)
		cl.request(0, 42, 7, 0, 4096, nil)
		if e, ck := cl.simpleReply(nil); e != 22 || ck != 7 {
			t.Fatalf("unknown command: errno %d cookie %d", e, ck)
		}
		cl.request(0, 1, 8, 4096, 4, []byte("abcd"))
		if e, _ := cl.simpleReply(nil); e != 0 {
			t.Fatalf("write after error: errno %d", e)
		}
		got := make([]byte, 4)
		cl.request(0, 0, 9, 4096, 4, nil)
		if e, _ := cl.simpleReply(got); e != 0 || string(got) != "abcd" {
			t.Fatalf("read back %q errno %d", got, e)
		}
	})
	t.Run("unknown flags", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.attach("disk", false)
		cl.request(1<<9, 0, 1, 0, 512, nil)
		if e, _ := cl.simpleReply(nil); e != 22 {
			t.Fatalf("errno %d", e)
		}
	})
	t.Run("oversized write is refused and its payload skipped", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.attach("disk", false)
		cl.request(0, 1, 1, 0, 2<<20, make([]byte, 2<<20)) // past the 1 MiB end
		if e, _ := cl.simpleReply(nil); e != 28 {
			t.Fatalf("write past end: errno %d, want ENOSPC", e)
		}
		cl.request(0, 3, 2, 0, 0, nil) // flush still works
		if e, ck := cl.simpleReply(nil); e != 0 || ck != 2 {
			t.Fatalf("flush: errno %d cookie %d", e, ck)
		}
	})
	t.Run("bad request magic ends the connection", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.attach("disk", false)
		cl.write(make([]byte, 28))
		if _, err := cl.r.ReadByte(); !errors.Is(err, io.EOF) {
			t.Fatalf("connection not closed: %v", err)
		}
	})
	t.Run("unknown option and malformed GO", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.option(99, []byte("xyz"))
		if _, typ, _ := cl.optReply(); typ != 1<<31|1 {
			t.Fatalf("unknown option: %#x", typ)
		}
		cl.option(7, []byte{0, 0, 0, 50, 'a'})
		if _, typ, _ := cl.optReply(); typ != 1<<31|3 {
			t.Fatalf("malformed GO: %#x", typ)
		}
		cl.option(7, goData("nope"))
		if _, typ, msg := cl.optReply(); typ != 1<<31|6 || !bytes.Contains(msg, []byte("nope")) {
			t.Fatalf("unknown export: %#x %s", typ, msg)
		}
		cl.option(5, nil) // STARTTLS without TLS configured
		if _, typ, _ := cl.optReply(); typ != 1<<31|1 {
			t.Fatalf("STARTTLS: %#x", typ)
		}
		cl.option(10, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0, 0, 0, 0}) // SET before STRUCTURED
		if _, typ, _ := cl.optReply(); typ != 1<<31|3 {
			t.Fatalf("SET_META_CONTEXT before structured: %#x", typ)
		}
		size, flags := cl.attach("disk", false)
		if size != 1<<20 || flags&1 == 0 {
			t.Fatalf("size %d flags %#x", size, flags)
		}
	})
	t.Run("EXPORT_NAME of an unknown export hangs up", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.option(1, []byte("nope"))
		if _, err := cl.r.ReadByte(); !errors.Is(err, io.EOF) {
			t.Fatalf("connection not closed: %v", err)
		}
	})
	t.Run("EXPORT_NAME attaches", func(t *testing.T) {
		cl := newClient(t, dial(t))
		cl.option(1, []byte("ro"))
		var b [10]byte
		cl.read(b[:])
		if size, fl := binary.BigEndian.Uint64(b[:]), binary.BigEndian.Uint16(b[8:]); size != 1<<20 || fl&3 != 3 {
			t.Fatalf("size %d flags %#x", size, fl)
		}
		cl.request(0, 1, 5, 0, 1, []byte{1})
		if e, _ := cl.simpleReply(nil); e != 1 {
			t.Fatalf("write to read-only: errno %d, want EPERM", e)
		}
	})
	t.Run("structured read, error chunk and block status", func(t *testing.T) {
		cl := newClient(t, startServer(t, newFileDevice(t, 1<<20))(t)) // a fresh, empty device
		_, flags := cl.attach("disk", true)
		if flags&(1<<7) == 0 {
			t.Fatalf("SEND_DF not advertised with structured replies: %#x", flags)
		}
		cl.request(0, 0, 11, 0, 8, nil)
		var h [20]byte
		cl.read(h[:])
		if m, fl, typ, ln := binary.BigEndian.Uint32(h[:]), binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]), binary.BigEndian.Uint32(h[16:]); m != 0x668e33ef || fl != 1 || typ != 1 || ln != 16 {
			t.Fatalf("read chunk header % x", h)
		}
		cl.read(make([]byte, 16))
		cl.request(0, 0, 12, 1<<20, 1, nil) // past the end: an error chunk
		cl.read(h[:])
		e := make([]byte, 6)
		cl.read(e)
		if typ := binary.BigEndian.Uint16(h[6:]); typ != 1<<15+1 || binary.BigEndian.Uint32(e) != 22 {
			t.Fatalf("error chunk % x % x", h, e)
		}
		cl.request(0, 7, 13, 0, 1<<20, nil)
		cl.read(h[:])
		body := make([]byte, binary.BigEndian.Uint32(h[16:]))
		cl.read(body)
		if typ := binary.BigEndian.Uint16(h[6:]); typ != 5 || len(body) != 12 ||
			binary.BigEndian.Uint32(body[4:]) != 1<<20 || binary.BigEndian.Uint32(body[8:]) != 3 {
			t.Fatalf("block status % x % x", h, body)
		}
	})
}

// TestLargeWritesSpliced sends plain writes big enough to be spliced from
// the socket to the file, at unaligned offsets and with part of each
// payload already buffered, and reads them back.
func TestLargeWritesSpliced(t *testing.T) {
	dev := newFileDevice(t, 8<<20)
	cl := newClient(t, startServer(t, dev)(t))
	cl.attach("disk", false)
	cases := []struct {
		off uint64
		n   int
	}{{0, 256 << 10}, {12345, 1<<20 + 17}, {3 << 20, 4 << 20}, {8<<20 - 300<<10, 300 << 10}}
	for i, c := range cases {
		p := make([]byte, c.n)
		rand.NewChaCha8([32]byte{byte(i)}).Read(p)
		// A small write first, so that the big header lands in the same
		// segment as part of its payload.
		cl.request(0, 1, 100, 0, 1, []byte{0xee})
		cl.request(0, 1, uint64(i), c.off, uint32(c.n), p)
		for k := 0; k < 2; k++ {
			if e, _ := cl.simpleReply(nil); e != 0 {
				t.Fatalf("case %d: write errno %d", i, e)
			}
		}
		got := make([]byte, c.n)
		if _, err := dev.ReadAt(got, int64(c.off)); err != nil {
			t.Fatal(err)
		}
		if c.off != 0 && !bytes.Equal(got, p) {
			t.Fatalf("case %d: the file holds other bytes", i)
		}
		if c.off == 0 && !bytes.Equal(got[1:], p[1:]) {
			t.Fatalf("case %d: the file holds other bytes", i)
		}
	}
}

// TestSplicedWritesPipelined sends large plain writes back to back before
// reading any reply, two of them in small pieces, which the splice from
// the socket then moves in many short rounds (strace of one run: 152
// rounds of 1,000 bytes, 240 of 4,096). Every byte must land where it
// was sent.
func TestSplicedWritesPipelined(t *testing.T) {
	const size = 16 << 20
	dev := newFileDevice(t, size)
	cl := newClient(t, startServer(t, dev)(t))
	cl.attach("disk", false)
	want := make([]byte, size)
	rand.NewChaCha8([32]byte{7}).Read(want)
	type wr struct {
		off, n int
		pieces int // the payload in pieces of this many bytes (0: one write)
	}
	writes := []wr{
		{0, 1 << 20, 0}, {1 << 20, 1 << 20, 0}, {2<<20 + 4096, 512 << 10, 1000},
		{3 << 20, 1<<20 - 512, 0}, {4<<20 + 100, 300 << 10, 0}, {5 << 20, 1 << 20, 0},
		{6 << 20, 1 << 20, 0}, {7 << 20, 1 << 20, 0}, {8 << 20, 3 << 20, 0}, {12 << 20, 1 << 20, 4096},
	}
	sent := make(chan error, 1)
	go func() { // the requests, while the replies are read below
		for i, w := range writes {
			p := want[w.off : w.off+w.n]
			hdr := reqHeader(false, 0, 1, uint64(i), uint64(w.off), uint64(w.n))
			msgs := [][]byte{append(hdr, p...)}
			if w.pieces > 0 {
				msgs = [][]byte{hdr}
				for ; len(p) > 0; p = p[min(w.pieces, len(p)):] {
					msgs = append(msgs, p[:min(w.pieces, len(p))])
				}
			}
			for _, m := range msgs {
				if _, err := cl.c.Write(m); err != nil {
					sent <- err
					return
				}
			}
		}
		sent <- nil
	}()
	for range writes {
		if e, ck := cl.simpleReply(nil); e != 0 {
			t.Errorf("write %d: errno %d", ck, e)
		}
	}
	if err := <-sent; err != nil {
		t.Fatal(err)
	}
	got := make([]byte, size)
	if _, err := dev.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	for i, w := range writes {
		if !bytes.Equal(got[w.off:w.off+w.n], want[w.off:w.off+w.n]) {
			t.Errorf("write %d (%d bytes at %d): the file holds other bytes", i, w.n, w.off)
		}
	}
}
