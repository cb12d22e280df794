package upstream

import (
	"context"
	"encoding/binary"
	"net"
	"testing"
	"time"
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

// goodHello is a fixed newstyle greeting and the replies to NBD_OPT_GO of
// a 1 MiB export.
func goodHello() (hello, goReplies []byte) {
	hello = binary.BigEndian.AppendUint64(nil, 0x4e42444d41474943)
	hello = binary.BigEndian.AppendUint64(hello, 0x49484156454F5054)
	hello = binary.BigEndian.AppendUint16(hello, 3)
	rep := func(b []byte, typ uint32, data []byte) []byte {
		b = binary.BigEndian.AppendUint64(b, 0x3e889045565a9)
		b = binary.BigEndian.AppendUint32(b, 7)
		b = binary.BigEndian.AppendUint32(b, typ)
		b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
		return append(b, data...)
	}
	info := binary.BigEndian.AppendUint16(nil, 0)
	info = binary.BigEndian.AppendUint64(info, 1<<20)
	info = binary.BigEndian.AppendUint16(info, 1|4|32)
	goReplies = rep(nil, 3, info)
	goReplies = rep(goReplies, 1, nil)
	return hello, goReplies
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
		d, err := Dial(ctx, uri, Options{DialTimeout: time.Second, OutageLimit: 10 * time.Millisecond})
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
	f.Add(reply(0, 1, make([]byte, 4096)))
	f.Add(reply(5, 1, nil))
	f.Add(reply(0, 99, make([]byte, 4096)))
	f.Add(append(reply(0, 1, make([]byte, 4096)), reply(0, 1, nil)...))
	f.Add([]byte{0x67, 0x44})
	hello, good := goodHello()
	f.Fuzz(func(t *testing.T, replies []byte) {
		// The option replies, then the fuzzed transmission replies.
		uri := fuzzServer(t, hello, append(append([]byte(nil), good...), replies...))
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		d, err := Dial(ctx, uri, Options{DialTimeout: time.Second, OutageLimit: 10 * time.Millisecond})
		if err != nil {
			return
		}
		// A server that breaks every connection keeps the requests
		// waiting up to the outage limit and its backoff: give each input
		// a second, then Close fails what still waits.
		done := make(chan struct{})
		go func() {
			defer close(done)
			buf := make([]byte, 4096)
			d.ReadAt(buf, 0)
			d.WriteAt(buf, 4096)
			d.Flush()
		}()
		select {
		case <-done:
		case <-time.After(time.Second):
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
