package gateway_test

// A raw NBD client for the tests, and the in-process servers it talks to:
// the client writes the protocol's bytes by hand and reads the server's
// replies field by field, so a test can send what no real client would.

import (
	"bufio"
	"encoding/binary"
	"goldilocks/gateway"
	"goldilocks/internal/block"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// client is a minimal raw NBD client, for requests no real client sends.
type client struct {
	tb testing.TB
	c  net.Conn
	r  *bufio.Reader
}

func newClient(tb testing.TB, c net.Conn) *client {
	c.SetDeadline(time.Now().Add(20 * time.Second))
	cl := &client{tb: tb, c: c, r: bufio.NewReader(c)}
	var hello [18]byte
	cl.read(hello[:])
	if binary.BigEndian.Uint64(hello[:]) != 0x4e42444d41474943 || binary.BigEndian.Uint64(hello[8:]) != 0x49484156454F5054 {
		tb.Fatalf("bad greeting % x", hello)
	}
	cl.write(binary.BigEndian.AppendUint32(nil, 3)) // fixed newstyle, no zeroes
	return cl
}

func (cl *client) read(b []byte) {
	cl.tb.Helper()
	if _, err := io.ReadFull(cl.r, b); err != nil {
		cl.tb.Fatalf("read: %v", err)
	}
}

func (cl *client) write(b []byte) {
	cl.tb.Helper()
	if _, err := cl.c.Write(b); err != nil {
		cl.tb.Fatalf("write: %v", err)
	}
}

func (cl *client) option(opt uint32, data []byte) {
	b := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
	b = binary.BigEndian.AppendUint32(b, opt)
	b = binary.BigEndian.AppendUint32(b, uint32(len(data)))
	cl.write(append(b, data...))
}

// optReply reads one option reply.
func (cl *client) optReply() (opt, typ uint32, data []byte) {
	cl.tb.Helper()
	var h [20]byte
	cl.read(h[:])
	if binary.BigEndian.Uint64(h[:]) != 0x3e889045565a9 {
		cl.tb.Fatalf("bad option reply magic % x", h)
	}
	data = make([]byte, binary.BigEndian.Uint32(h[16:]))
	cl.read(data)
	return binary.BigEndian.Uint32(h[8:]), binary.BigEndian.Uint32(h[12:]), data
}

func goData(name string, infos ...uint16) []byte {
	b := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
	b = append(b, name...)
	b = binary.BigEndian.AppendUint16(b, uint16(len(infos)))
	for _, i := range infos {
		b = binary.BigEndian.AppendUint16(b, i)
	}
	return b
}

// attach negotiates structured replies (optional) and GO.
func (cl *client) attach(name string, structured bool) (size uint64, flags uint16) {
	cl.tb.Helper()
	if structured {
		cl.option(8, nil)
		if _, typ, _ := cl.optReply(); typ != 1 {
			cl.tb.Fatalf("structured reply refused: %d", typ)
		}
		q := binary.BigEndian.AppendUint32(nil, uint32(len(name)))
		q = append(q, name...)
		q = binary.BigEndian.AppendUint32(q, 1)
		q = binary.BigEndian.AppendUint32(q, uint32(len("base:allocation")))
		q = append(q, "base:allocation"...)
		cl.option(10, q)
		for {
			_, typ, _ := cl.optReply()
			if typ == 1 {
				break
			}
		}
	}
	cl.option(7, goData(name))
	for {
		_, typ, data := cl.optReply()
		switch {
		case typ == 1:
			return size, flags
		case typ == 3 && binary.BigEndian.Uint16(data) == 0:
			size, flags = binary.BigEndian.Uint64(data[2:]), binary.BigEndian.Uint16(data[10:])
		case typ&(1<<31) != 0:
			cl.tb.Fatalf("GO refused: %#x %s", typ, data[:])
		}
	}
}

func (cl *client) request(flags, typ uint16, cookie, off uint64, length uint32, payload []byte) {
	cl.write(append(reqHeader(false, flags, typ, cookie, off, uint64(length)), payload...))
}

// simpleReply reads a simple reply and returns its error and cookie.
func (cl *client) simpleReply(data []byte) (errno uint32, cookie uint64) {
	cl.tb.Helper()
	var h [16]byte
	cl.read(h[:])
	if m := binary.BigEndian.Uint32(h[:]); m != 0x67446698 {
		cl.tb.Fatalf("reply magic %#x, want simple", m)
	}
	errno, cookie = binary.BigEndian.Uint32(h[4:]), binary.BigEndian.Uint64(h[8:])
	if errno == 0 && data != nil {
		cl.read(data)
	}
	return errno, cookie
}

// metaReplies reads replies up to the ACK (or an error) and returns the
// contexts (id and name) and the final reply type.
func (cl *client) metaReplies() (ids []uint32, names []string, last uint32) {
	cl.tb.Helper()
	for {
		_, typ, data := cl.optReply()
		if typ != 4 {
			return ids, names, typ
		}
		ids = append(ids, binary.BigEndian.Uint32(data))
		names = append(names, string(data[4:]))
	}
}

// structuredChunk reads one structured reply chunk.
func (cl *client) structuredChunk() (flags, typ uint16, cookie uint64, payload []byte) {
	cl.tb.Helper()
	var h [20]byte
	cl.read(h[:])
	if m := binary.BigEndian.Uint32(h[:]); m != 0x668e33ef {
		cl.tb.Fatalf("chunk magic %#x, want structured", m)
	}
	payload = make([]byte, binary.BigEndian.Uint32(h[16:]))
	cl.read(payload)
	return binary.BigEndian.Uint16(h[4:]), binary.BigEndian.Uint16(h[6:]), binary.BigEndian.Uint64(h[8:]), payload
}

// structuredOrSimple reads a simple reply's errno (structured flag 1).
func (cl *client) structuredOrSimple() (uint16, uint16, uint64, uint32) {
	cl.tb.Helper()
	e, ck := cl.simpleReply(nil)
	return 1, 0, ck, e
}

// structuredChunkOrSimple reads one reply chunk of either kind: a simple
// reply is its own last chunk (type 0xffff if it carries an error).
func (cl *client) structuredChunkOrSimple() (flags, typ uint16, cookie uint64, payload []byte) {
	cl.tb.Helper()
	var m [4]byte
	b, err := cl.r.Peek(4)
	if err != nil {
		cl.tb.Fatal(err)
	}
	copy(m[:], b)
	if binary.BigEndian.Uint32(m[:]) == 0x67446698 {
		e, ck := cl.simpleReply(nil)
		if e != 0 {
			return 1, 0xffff, ck, []byte{}
		}
		return 1, 0, ck, nil
	}
	return cl.structuredChunk()
}

// errnoOfReply reads a reply of either kind and returns its error.
func (cl *client) errnoOfReply() (uint32, uint64) {
	cl.tb.Helper()
	b, err := cl.r.Peek(4)
	if err != nil {
		cl.tb.Fatal(err)
	}
	if binary.BigEndian.Uint32(b) == 0x67446698 {
		return cl.simpleReply(nil)
	}
	for {
		fl, typ, ck, pl := cl.structuredChunk()
		if typ >= 1<<15 {
			return binary.BigEndian.Uint32(pl), ck
		}
		if fl&1 != 0 {
			return 0, ck
		}
	}
}

// extRequest sends an extended (32-byte) request header and its payload.
func (cl *client) extRequest(flags, typ uint16, cookie, off, length uint64, payload []byte) {
	cl.write(append(reqHeader(true, flags, typ, cookie, off, length), payload...))
}

// extReply reads one extended reply chunk.
func (cl *client) extReply() extChunk {
	cl.tb.Helper()
	var h [32]byte
	cl.read(h[:])
	if m := binary.BigEndian.Uint32(h[:]); m != 0x6e8a278c {
		cl.tb.Fatalf("reply magic %#x, want the extended one", m)
	}
	c := extChunk{flags: binary.BigEndian.Uint16(h[4:]), typ: binary.BigEndian.Uint16(h[6:]),
		cookie: binary.BigEndian.Uint64(h[8:]), off: binary.BigEndian.Uint64(h[16:]), length: binary.BigEndian.Uint64(h[24:])}
	if c.length > 64<<20 {
		cl.tb.Fatalf("chunk of %d bytes", c.length)
	}
	c.payload = make([]byte, c.length)
	cl.read(c.payload)
	return c
}

// fileExports serves temp files as exports, in process.
type fileExports struct {
	devs map[string]*gateway.Export
}

func (f *fileExports) Open(name string) (*gateway.Export, func(), error) {
	e, ok := f.devs[name]
	if !ok {
		return nil, nil, gateway.ErrUnknownExport
	}
	return e, func() {}, nil
}

func (f *fileExports) List() ([]gateway.ExportInfo, error) {
	var out []gateway.ExportInfo
	for n := range f.devs {
		out = append(out, gateway.ExportInfo{Name: n})
	}
	return out, nil
}

func newFileDevice(tb testing.TB, size int64) *block.File {
	tb.Helper()
	p := filepath.Join(tb.TempDir(), "dev.img")
	if err := os.WriteFile(p, nil, 0o600); err != nil {
		tb.Fatal(err)
	}
	if err := os.Truncate(p, size); err != nil {
		tb.Fatal(err)
	}
	d, err := block.OpenFile(p, false)
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { d.Close() })
	return d
}

// startServer serves dev as export "disk" (and read-only as "ro") on a
// Unix socket and returns a dialer.
func startServer(tb testing.TB, dev block.Device) (dial func(testing.TB) net.Conn) {
	tb.Helper()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	if testing.Verbose() {
		log = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return (&specServer{log: &logSink{}}).start(tb, dev, "", log).dial
}
