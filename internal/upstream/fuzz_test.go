package upstream

import (
	"context"
	"encoding/binary"
	"errors"
	"net"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/block"
)

// What an upstream server sends is hostile until parsed, as a client's
// bytes are to the gateway: the handshake replies, then the replies to a
// READ, a WRITE and a FLUSH. Whatever arrives, the client fails cleanly
// (an error, never a panic or a hang) and never hands back more bytes
// than it asked for.

// fuzzServer answers one connection with script: the greeting and option
// replies, then (after the client's first request) the rest.
func fuzzServer(t *testing.T, hello, replies []byte) string {
	sock := t.TempDir() + "/s"
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				c.SetDeadline(time.Now().Add(2 * time.Second))
				c.Write(hello)
				buf := make([]byte, 64<<10)
				c.Read(buf) // the client's options
				c.Write(replies)
				for {
					if _, err := c.Read(buf); err != nil {
						return
					}
				}
			}()
		}
	}()
	return "nbd+unix:///disk?socket=" + sock
}

// optRep appends an option reply to b.
func optRep(b []byte, opt, typ uint32, data []byte) []byte {
	b = binary.BigEndian.AppendUint64(b, 0x3e889045565a9)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, typ)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

// goodHello is a fixed newstyle greeting and the option replies of a
// server without structured replies (NBD_REP_ERR_UNSUP) that serves a
// 1 MiB export (NBD_OPT_GO).
func goodHello() (hello, replies []byte) {
	hello = binary.BigEndian.AppendUint64(nil, 0x4e42444d41474943)
	hello = binary.BigEndian.AppendUint64(hello, 0x49484156454F5054)
	hello = binary.BigEndian.AppendUint16(hello, 3)
	replies = optRep(nil, 8, 1<<31|1, nil)
	return hello, goReplies(replies)
}

func goReplies(b []byte) []byte {
	info := binary.BigEndian.AppendUint16(nil, 0)
	info = binary.BigEndian.AppendUint64(info, 1<<20)
	info = binary.BigEndian.AppendUint16(info, 1|4|32)
	b = optRep(b, 7, 3, info)
	return optRep(b, 7, 1, nil)
}

// structuredHello is goodHello for a server with structured replies and
// base:allocation (context id 7).
func structuredHello() (hello, replies []byte) { return structuredHelloID(7) }

// structuredHelloID is structuredHello with another context id (qemu-nbd
// gives base:allocation the id 0).
func structuredHelloID(id byte) (hello, replies []byte) {
	hello, _ = goodHello()
	replies = optRep(nil, 8, 1, nil)
	replies = optRep(replies, 10, 4, append([]byte{0, 0, 0, id}, "base:allocation"...))
	replies = optRep(replies, 10, 1, nil)
	return hello, goReplies(replies)
}

// chunkRep is a structured reply chunk.
func chunkRep(flags, typ uint16, cookie uint64, payload []byte) []byte {
	b := binary.BigEndian.AppendUint32(nil, 0x668e33ef)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint32(b, uint32(len(payload)))
	return append(b, payload...)
}

func FuzzHandshakeReplies(f *testing.F) {
	hello, good := goodHello()
	f.Add(hello, good)
	f.Add(hello, good[:len(good)-3])
	f.Add(hello[:10], []byte{})
	bad := append([]byte(nil), good...)
	binary.BigEndian.PutUint32(bad[16:], 0xffffffff) // a huge reply length
	f.Add(hello, bad)
	f.Fuzz(func(t *testing.T, hello, replies []byte) {
		uri := fuzzServer(t, hello, replies)
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		d, err := Dial(ctx, uri, Options{DialTimeout: time.Second, OutageLimit: 10 * time.Millisecond, ReplyTimeout: 50 * time.Millisecond})
		if err == nil {
			if d.Size() < 0 {
				t.Errorf("negative size %d", d.Size())
			}
			d.Close()
		}
	})
}

func FuzzTransmissionReplies(f *testing.F) {
	reply := func(errno uint32, cookie uint64, data []byte) []byte {
		b := binary.BigEndian.AppendUint32(nil, 0x67446698)
		b = binary.BigEndian.AppendUint32(b, errno)
		b = binary.BigEndian.AppendUint64(b, cookie)
		return append(b, data...)
	}
	f.Add(reply(0, 1, make([]byte, 4096)), false)
	f.Add(reply(5, 1, nil), false)
	f.Add(reply(0, 99, make([]byte, 4096)), false)
	f.Add(append(reply(0, 1, make([]byte, 4096)), reply(0, 1, nil)...), false)
	f.Add([]byte{0x67, 0x44}, false)
	at := func(off uint64, rest ...byte) []byte { return append(binary.BigEndian.AppendUint64(nil, off), rest...) }
	f.Add(chunkRep(1, 1, 1, at(0, make([]byte, 4096)...)), true)
	f.Add(append(chunkRep(0, 1, 1, at(0, make([]byte, 1024)...)), chunkRep(1, 2, 1, at(1024, 0, 0, 12, 0))...), true)
	f.Add(chunkRep(1, 1<<15+1, 1, []byte{0, 0, 0, 5, 0, 2, 'n', 'o'}), true)
	f.Add(append(chunkRep(1, 1, 1, at(0, make([]byte, 4096)...)), reply(0, 2, nil)...), true)
	f.Add(append(append(append(chunkRep(1, 1, 1, at(0, make([]byte, 4096)...)), reply(0, 2, nil)...), reply(0, 3, nil)...),
		chunkRep(1, 5, 4, []byte{0, 0, 0, 7, 0, 0, 16, 0, 0, 0, 0, 3})...), true)
	f.Add(chunkRep(1, 0, 1, nil), true)
	helloS, goodS := structuredHello()
	hello, good := goodHello()
	f.Fuzz(func(t *testing.T, replies []byte, structured bool) {
		// The option replies, then the fuzzed transmission replies.
		h, opts := hello, good
		if structured {
			h, opts = helloS, goodS
		}
		uri := fuzzServer(t, h, append(append([]byte(nil), opts...), replies...))
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		// Short limits: a mutated input mostly leaves requests half
		// answered, and each then costs the reply timeout, the outage
		// limit and the first retry (with 50 ms, 10 ms and 50 ms the
		// fuzzing engine ran about one input a second).
		d, err := Dial(ctx, uri, Options{DialTimeout: time.Second, OutageLimit: 5 * time.Millisecond,
			ReplyTimeout: 5 * time.Millisecond, retry: time.Millisecond})
		if err != nil {
			return
		}
		// A server that breaks every connection keeps the requests
		// waiting up to the outage limit and its backoff: give each input
		// 200 ms, then Close fails what still waits.
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 4096)
			d.ReadAt(buf, 0)
			d.WriteAt(buf, 4096)
			d.Flush()
			if ext, err := d.Extents(nil, 0, 1<<20, 4); err == nil {
				var sum int64
				for _, e := range ext {
					sum += e.Length
					if e.Length <= 0 {
						t.Errorf("extent of length %d", e.Length)
					}
				}
				if len(ext) > 4 || sum > 1<<20 {
					t.Errorf("%d extents, %d bytes, for 4 extents of at most 1 MiB", len(ext), sum)
				}
			}
		}()
		select {
		case <-done:
		case <-time.After(200 * time.Millisecond):
		}
		d.Close()
		<-done
	})
}

// The fuzz targets' seed server is a working one: a fuzzer that never got
// past the handshake would test nothing.
func TestFuzzServerWorks(t *testing.T) {
	hello, good := goodHello()
	data := make([]byte, 4096)
	data[7] = 42
	r := binary.BigEndian.AppendUint32(nil, 0x67446698)
	r = binary.BigEndian.AppendUint32(r, 0)
	r = binary.BigEndian.AppendUint64(r, 1)
	r = append(r, data...)
	d, err := Dial(context.Background(), fuzzServer(t, hello, append(good, r...)), Options{OutageLimit: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if d.Size() != 1<<20 {
		t.Fatalf("size %d", d.Size())
	}
	buf := make([]byte, 4096)
	if _, err := d.ReadAt(buf, 0); err != nil || buf[7] != 42 {
		t.Fatalf("read: %v %d", err, buf[7])
	}
}

// The structured seed server works too: a READ answered by a data chunk
// and a hole chunk; block status through base:allocation.
func TestFuzzServerWorksStructured(t *testing.T) {
	hello, good := structuredHello()
	dial := func(r []byte) *Device {
		t.Helper()
		d, err := Dial(context.Background(), fuzzServer(t, hello, append(append([]byte(nil), good...), r...)), Options{OutageLimit: 10 * time.Millisecond})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		if d.Caps()&block.CanExtents == 0 {
			t.Fatal("no block status although the server offered base:allocation")
		}
		return d
	}
	data := make([]byte, 1024)
	data[7] = 42
	r := chunkRep(0, 1, 1, append(binary.BigEndian.AppendUint64(nil, 0), data...))
	r = append(r, chunkRep(1, 2, 1, []byte{0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 12, 0})...) // hole at 1024, 3072 bytes
	buf := make([]byte, 4096)
	for i := range buf {
		buf[i] = 0xee // the hole must clear what was there
	}
	if _, err := dial(r).ReadAt(buf, 0); err != nil || buf[7] != 42 || buf[2000] != 0 {
		t.Fatalf("read: %v %d %d", err, buf[7], buf[2000])
	}
	// Out of order (the hole first) is as good; a chunk over bytes
	// already sent is not (the outage limit then fails the read).
	r = chunkRep(0, 2, 1, []byte{0, 0, 0, 0, 0, 0, 4, 0, 0, 0, 12, 0})
	r = append(r, chunkRep(1, 1, 1, append(binary.BigEndian.AppendUint64(nil, 0), data...))...)
	clear(buf)
	if _, err := dial(r).ReadAt(buf, 0); err != nil || buf[7] != 42 {
		t.Fatalf("read out of order: %v %d", err, buf[7])
	}
	r = chunkRep(0, 1, 1, append(binary.BigEndian.AppendUint64(nil, 0), data...))
	r = append(r, chunkRep(1, 2, 1, []byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 16, 0})...) // a hole over all 4096
	if _, err := dial(r).ReadAt(buf, 0); err == nil {
		t.Fatal("a read whose chunks overlap succeeded")
	}
	r = chunkRep(1, 5, 1, []byte{0, 0, 0, 7, 0, 0, 16, 0, 0, 0, 0, 3, 0, 16, 0, 0, 0, 0, 0, 0})
	ext, err := dial(r).Extents(nil, 0, 1<<20, 8)
	if err != nil || len(ext) != 2 || ext[0] != (block.Extent{Length: 4096, Flags: 3}) || ext[1].Length != 1<<20-4096 || ext[1].Flags != 0 {
		t.Fatalf("extents %v, %v", ext, err)
	}
	// Context id 0 (qemu-nbd's) is a context like any other.
	hello, good = structuredHelloID(0)
	r = chunkRep(1, 5, 1, []byte{0, 0, 0, 0, 0, 16, 0, 0, 0, 0, 0, 3})
	if ext, err = dial(r).Extents(nil, 0, 1<<20, 8); err != nil || len(ext) != 1 || ext[0] != (block.Extent{Length: 1 << 20, Flags: 3}) {
		t.Fatalf("extents with context id 0: %v, %v", ext, err)
	}
}

// A server that takes requests and never answers (the connection stays
// up) does not hold them forever: after the reply timeout the connection
// counts as lost, the request is sent again, and past the outage limit
// the caller gets EIO.
func TestSilentServer(t *testing.T) {
	hello, good := goodHello()
	d, err := Dial(context.Background(), fuzzServer(t, hello, good),
		Options{OutageLimit: 100 * time.Millisecond, ReplyTimeout: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	done := make(chan error, 1)
	go func() {
		_, err := d.ReadAt(make([]byte, 4096), 0)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("read from a silent server: %v, want EIO", err)
		}
	case <-time.After(1500 * time.Millisecond): // (the test server itself hangs up after 2 s)
		t.Fatal("a read from a server that never answers still waits after 1.5 s")
	}
}
