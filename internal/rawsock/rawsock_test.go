package rawsock

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"
)

// pair returns the two ends of a connected socket of the network: "unix"
// or "tcp".
func pair(t *testing.T, network string) (a, b net.Conn) {
	t.Helper()
	addr := "127.0.0.1:0"
	if network == "unix" {
		addr = filepath.Join(t.TempDir(), "s")
	}
	ln, err := net.Listen(network, addr)
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	got := make(chan net.Conn, 1)
	go func() {
		c, err := ln.Accept()
		if err != nil {
			t.Error(err)
		}
		got <- c
	}()
	a, err = net.Dial(network, ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	b = <-got
	t.Cleanup(func() { a.Close(); b.Close() })
	return a, b
}

func wrap(t *testing.T, c net.Conn) *Conn {
	t.Helper()
	s, err := New(c)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// Writev of many buffers, far more bytes than the socket buffers hold
// and more buffers than one writev takes, arrives whole and in order
// while the other end reads in odd sizes with Read.
func TestWritevRead(t *testing.T) {
	for _, network := range []string{"unix", "tcp"} {
		t.Run(network, func(t *testing.T) {
			a, b := pair(t, network)
			w, r := wrap(t, a), wrap(t, b)
			rng := rand.New(rand.NewPCG(1, 2))
			var bufs [][]byte
			var want []byte
			for range 3000 { // > maxIov buffers, some empty
				p := make([]byte, rng.IntN(9000))
				for i := range p {
					p[i] = byte(rng.Uint32())
				}
				bufs = append(bufs, p)
				want = append(want, p...)
			}
			keep := make([][]byte, len(bufs))
			copy(keep, bufs)
			errc := make(chan error, 1)
			go func() {
				n, err := w.Writev(bufs)
				if err == nil && n != int64(len(want)) {
					err = errors.New("short count")
				}
				errc <- err
				a.Close()
			}()
			var got []byte
			p := make([]byte, 7777)
			for {
				n, err := r.Read(p[:1+rng.IntN(len(p)-1)])
				got = append(got, p[:n]...)
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("got %d bytes, want %d, not equal", len(got), len(want))
			}
			for i := range bufs {
				if len(bufs[i]) != len(keep[i]) || len(bufs[i]) > 0 && &bufs[i][0] != &keep[i][0] {
					t.Fatalf("Writev modified buffer %d", i)
				}
			}
		})
	}
}

// A read deadline in the past interrupts a Read that waits (as the
// server's graceful stop does), and a Read of a closed Conn fails with
// net.ErrClosed; a write to a peer that went away fails.
func TestDeadlineCloseReset(t *testing.T) {
	a, b := pair(t, "unix")
	r := wrap(t, b)
	go func() {
		time.Sleep(50 * time.Millisecond)
		b.SetReadDeadline(time.Now())
	}()
	if _, err := r.Read(make([]byte, 10)); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("Read past its deadline: %v, want a deadline error", err)
	}
	b.SetReadDeadline(time.Time{})
	a.Write([]byte("xy"))
	p := make([]byte, 10)
	if n, err := r.Read(p); err != nil || string(p[:n]) != "xy" {
		t.Fatalf("Read after the deadline was lifted: %q, %v", p[:n], err)
	}
	b.Close()
	if _, err := r.Read(p); !errors.Is(err, net.ErrClosed) {
		t.Fatalf("Read of a closed conn: %v, want net.ErrClosed", err)
	}

	c, d := pair(t, "unix")
	w := wrap(t, c)
	d.Close()
	var err error
	for range 100 { // the first write may still land in the buffer
		if _, err = w.Write(make([]byte, 1<<16)); err != nil {
			break
		}
	}
	if !errors.Is(err, syscall.EPIPE) && !errors.Is(err, syscall.ECONNRESET) {
		t.Fatalf("write to a closed peer: %v, want EPIPE or ECONNRESET", err)
	}
}

func TestNotSocket(t *testing.T) {
	a, _ := net.Pipe()
	defer a.Close()
	if _, err := New(a); !errors.Is(err, ErrNotSocket) {
		t.Fatalf("New(net.Pipe): %v, want ErrNotSocket", err)
	}
}

// Read and Writev allocate nothing once warm: they are on every request.
func TestNoAllocs(t *testing.T) {
	a, b := pair(t, "unix")
	w, r := wrap(t, a), wrap(t, b)
	hdr, data, p := make([]byte, 16), make([]byte, 4096), make([]byte, 4112)
	bufs := [][]byte{hdr, data}
	allocs := testing.AllocsPerRun(200, func() {
		if _, err := w.Writev(bufs); err != nil {
			t.Fatal(err)
		}
		if _, err := io.ReadFull(r, p); err != nil {
			t.Fatal(err)
		}
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per Writev and Read, want 0", allocs)
	}
}

func BenchmarkWritevRead(b *testing.B) {
	a, c := pairB(b)
	w, r := mustNew(b, a), mustNew(b, c)
	bufs := [][]byte{make([]byte, 16), make([]byte, 4096)}
	p := make([]byte, 4112)
	b.ReportAllocs()
	b.SetBytes(4112)
	for b.Loop() {
		w.Writev(bufs)
		io.ReadFull(r, p)
	}
}

func pairB(b *testing.B) (net.Conn, net.Conn) {
	ln, err := net.Listen("unix", filepath.Join(b.TempDir(), "s"))
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	got := make(chan net.Conn, 1)
	go func() { c, _ := ln.Accept(); got <- c }()
	a, err := net.Dial("unix", ln.Addr().String())
	if err != nil {
		b.Fatal(err)
	}
	c := <-got
	b.Cleanup(func() { a.Close(); c.Close() })
	return a, c
}

func mustNew(b *testing.B, c net.Conn) *Conn {
	s, err := New(c)
	if err != nil {
		b.Fatal(err)
	}
	return s
}
