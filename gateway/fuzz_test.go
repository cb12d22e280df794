package gateway_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"
	"time"
)

// exchange sends raw bytes as a client, half-closes, and reads whatever
// the server answers until it hangs up. A panic in the server fails the
// fuzz target, since the server runs in this process.
func exchange(t *testing.T, dial func(testing.TB) net.Conn, in []byte) {
	c := dial(t).(*net.UnixConn)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	go func() {
		c.Write(in)
		c.CloseWrite()
	}()
	if _, err := io.Copy(io.Discard, c); err != nil {
		t.Fatalf("server did not hang up after the input ended: %v", err)
	}
}

func optBytes(opt uint32, data []byte) []byte {
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	return append(b, data...)
}

func reqBytes(flags, typ uint16, off uint64, length uint32) []byte {
	return reqHeader(false, flags, typ, 1, off, uint64(length))
}

// reqHeader is a request header: compact (28 bytes) or, with ext, the
// extended one (32 bytes, a 64-bit length).
func reqHeader(ext bool, flags, typ uint16, cookie, off, length uint64) []byte {
	magic := uint32(0x25609513)
	if ext {
		magic = 0x21e41c71
	}
	b := binary.BigEndian.AppendUint32(nil, magic)
	b = binary.BigEndian.AppendUint16(b, flags)
	b = binary.BigEndian.AppendUint16(b, typ)
	b = binary.BigEndian.AppendUint64(b, cookie)
	b = binary.BigEndian.AppendUint64(b, off)
	if ext {
		return binary.BigEndian.AppendUint64(b, length)
	}
	return binary.BigEndian.AppendUint32(b, uint32(length))
}

func metaBytes(name string, queries ...string) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint32(b, uint32(len(queries)))
	for _, q := range queries {
		b = binary.BigEndian.AppendUint32(b, uint32(len(q)))
		b = append(b, q...)
	}
	return b
}

// FuzzHandshake feeds arbitrary bytes after the client flags.
func FuzzHandshake(f *testing.F) {
	flags := []byte{0, 0, 0, 3}
	cat := func(parts ...[]byte) []byte {
		var b []byte
		for _, p := range parts {
			b = append(b, p...)
		}
		return b
	}
	f.Add(cat(flags, optBytes(3, nil), optBytes(2, nil)))
	f.Add(cat(flags, optBytes(8, nil), optBytes(10, metaBytes("disk", "base:allocation")), optBytes(7, goData("disk", 0, 1, 2, 3))))
	f.Add(cat(flags, optBytes(9, metaBytes("disk")), optBytes(6, goData("nope"))))
	f.Add(cat(flags, optBytes(1, []byte("disk"))))
	f.Add(cat(flags, optBytes(5, nil), optBytes(7, []byte{0xff, 0xff, 0xff, 0xff})))
	f.Add([]byte{0, 0, 0, 0})
	f.Add(cat(flags, optBytes(10, []byte{0, 0, 0, 4, 'd', 'i', 's', 'k', 0xff, 0xff, 0xff, 0xff})))
	// Extended headers, then 32-byte requests: a write with its payload, a
	// read, a block status with a 64-bit length.
	ext := func(flags, typ uint16, off, length uint64) []byte { return reqHeader(true, flags, typ, 1, off, length) }
	f.Add(cat(flags, optBytes(11, nil), optBytes(10, metaBytes("disk", "base:allocation")), optBytes(7, goData("disk")),
		ext(1<<5, 1, 0, 4), []byte("abcd"), ext(0, 0, 0, 4096), ext(0, 7, 0, 1<<40)))
	dial := startServer(f, newFileDevice(f, 1<<20))
	f.Fuzz(func(t *testing.T, in []byte) {
		exchange(t, dial, in)
	})
}

// FuzzTransmission attaches with structured replies and base:allocation,
// then feeds arbitrary request bytes.
func FuzzTransmission(f *testing.F) {
	var pre []byte
	pre = append(pre, 0, 0, 0, 3)
	pre = append(pre, optBytes(8, nil)...)
	pre = append(pre, optBytes(10, metaBytes("disk", "base:allocation"))...)
	pre = append(pre, optBytes(7, goData("disk"))...)

	f.Add(reqBytes(0, 0, 0, 4096))
	f.Add(append(reqBytes(1, 1, 4096, 4), 'a', 'b', 'c', 'd'))
	f.Add(reqBytes(0, 7, 0, 1<<20))
	f.Add(reqBytes(8, 7, 0, 1))
	f.Add(reqBytes(0, 3, 0, 0))
	f.Add(reqBytes(2, 6, 0, 65536))
	f.Add(reqBytes(16, 6, 512, 1))
	f.Add(reqBytes(0, 4, 1<<20-1, 2))
	f.Add(reqBytes(0, 5, 0, 4096))
	f.Add(reqBytes(4, 0, ^uint64(0), ^uint32(0)))
	f.Add(reqBytes(0, 99, 0, 0))
	f.Add(reqBytes(0, 2, 0, 0))
	dial := startServer(f, newFileDevice(f, 1<<20))
	f.Fuzz(func(t *testing.T, in []byte) {
		exchange(t, dial, append(append([]byte(nil), pre...), in...))
	})
}
