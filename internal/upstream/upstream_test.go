package upstream

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/block"
)

// The client against real NBD servers: nbdkit (memory plugin, with the
// error and blocksize-policy filters) and qemu-nbd.

func needTool(t *testing.T, tool string) {
	t.Helper()
	if _, err := exec.LookPath(tool); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not installed; CI must install it (make deps)", tool)
		}
		t.Skipf("%s is not installed (apt-get install nbdkit qemu-utils)", tool)
	}
}

// nbdkit starts nbdkit on a Unix socket with args and returns the URI of
// its export (nbdkit serves any export name).
func nbdkit(t *testing.T, args ...string) (uri string, stop func()) {
	t.Helper()
	needTool(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	cmd := exec.Command("nbdkit", append([]string{"-f", "-U", sock}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	stop = func() { cmd.Process.Kill(); cmd.Wait() }
	t.Cleanup(stop)
	waitSocket(t, "unix", sock)
	return "nbd+unix:///disk?socket=" + sock, stop
}

func waitSocket(t *testing.T, network, addr string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; {
		if c, err := net.Dial(network, addr); err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("nothing listens on %s", addr)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func dial(t *testing.T, uri string) *Device {
	t.Helper()
	d, err := Dial(context.Background(), uri, Options{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// waitConns waits until d has n connections up (widen adds them in the
// background) and checks that it does not go beyond n.
func waitConns(t *testing.T, d *Device, n int) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); d.conns() < n; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%d connections up after 10 s, want %d", d.conns(), n)
		}
	}
	time.Sleep(50 * time.Millisecond)
	if got := d.conns(); got != n {
		t.Fatalf("%d connections up, want %d", got, n)
	}
}

// rw is what the tests call: the Device itself (ReadAt, WriteAt: the
// caller waits), or submitted.
type rw interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
}

// submitted makes calls through SubmitReadAt and SubmitWriteAt (then
// Push), as the gateway does, and waits for done, which must run exactly
// once, and then for the end of its batch: the result is taken only when
// what done deferred runs (a reader that never ran its batch hangs here).
type submitted struct{ d *Device }

// deferred is what a done function leaves to its batch: the result.
type deferred struct {
	errc chan error
	err  error
}

func (f *deferred) FlushBatch() { f.errc <- f.err }

func (s submitted) wait(start func(done func(error, *block.Batch)) bool, n int) (int, error) {
	errc := make(chan error, 1)
	var once sync.Once
	done := func(err error, b *block.Batch) {
		ran := false
		once.Do(func() { ran = true; b.Defer(&deferred{errc, err}) })
		if !ran {
			panic("upstream: done ran twice")
		}
	}
	if !start(done) {
		return 0, errors.New("the device declined a request the server takes")
	}
	s.d.Push()
	if err := <-errc; err != nil {
		return 0, err
	}
	return n, nil
}

func (s submitted) ReadAt(p []byte, off int64) (int, error) {
	return s.wait(func(done func(error, *block.Batch)) bool { return s.d.SubmitReadAt(p, off, done) }, len(p))
}

func (s submitted) WriteAt(p []byte, off int64) (int, error) {
	return s.wait(func(done func(error, *block.Batch)) bool { return s.d.SubmitWriteAt(p, off, false, done) }, len(p))
}

// either is d for odd g, submitted{d} for even: half the goroutines of a
// test take each path.
func either(d *Device, g int) rw {
	if g%2 == 0 {
		return submitted{d}
	}
	return d
}

func TestParseURI(t *testing.T) {
	certs := t.TempDir()
	os.WriteFile(filepath.Join(certs, "ca-cert.pem"), []byte("not a certificate"), 0o600)
	for _, tc := range []struct {
		uri, network, addr, export string
		err                        error
	}{
		{"nbd://10.0.0.5/vm1", "tcp", "10.0.0.5:10809", "vm1", nil},
		{"nbd://[::1]:10900/", "tcp", "[::1]:10900", "", nil},
		{"nbd+unix:///vm1?socket=/run/x.sock", "unix", "/run/x.sock", "vm1", nil},
		{"nbd+unix:///vm1", "", "", "", ErrURI},
		{"nbd:///vm1", "", "", "", ErrURI},
		{"nbds://h/vm1", "", "", "", ErrURI}, // TLS without certificates
		{"/var/lib/disk.img", "", "", "", ErrURI},
	} {
		got, err := parse(tc.uri)
		if !errors.Is(err, tc.err) || got.network != tc.network || got.addr != tc.addr || got.export != tc.export {
			t.Errorf("parse(%q) = %+v %v", tc.uri, got, err)
		}
	}
	if _, err := parse("nbds://h/vm1?tls-certificates=" + certs); err == nil || !strings.Contains(err.Error(), "holds no certificate") {
		t.Errorf("a CA file without a certificate: %v", err)
	}
}

// TestReadWriteModel runs random reads, writes, trims and zeroes from
// many goroutines against nbdkit's memory plugin and checks every read
// against a model of the disk.
func TestReadWriteModel(t *testing.T) {
	const size = 16 << 20
	uri, _ := nbdkit(t, "memory", "16M")
	d := dial(t, uri)
	if d.Size() != size {
		t.Fatalf("size %d, want %d", d.Size(), size)
	}
	waitConns(t, d, 4) // nbdkit offers multi-conn: the requests below spread over 4
	var (
		mu    sync.Mutex
		model = make([]byte, size)
		locks [size / 65536]sync.Mutex // one region per goroutine at a time
	)
	var wg sync.WaitGroup
	errc := make(chan error, 16)
	for g := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 7))
			io := either(d, g)
			for range 200 {
				region := rng.IntN(len(locks))
				off := int64(region*65536 + rng.IntN(60000))
				n := 1 + rng.IntN(65536-int(off%65536))
				locks[region].Lock()
				var err error
				switch op := rng.IntN(10); {
				case op < 5:
					p := make([]byte, n)
					for i := range p {
						p[i] = byte(rng.Uint32())
					}
					if _, err = io.WriteAt(p, off); err == nil {
						mu.Lock()
						copy(model[off:], p)
						mu.Unlock()
					}
				case op < 8:
					p := make([]byte, n)
					if _, err = io.ReadAt(p, off); err == nil {
						mu.Lock()
						if !bytes.Equal(p, model[off:off+int64(n)]) {
							err = errors.New("read data differs from what was written")
						}
						mu.Unlock()
					}
				case op < 9:
					if err = d.Zero(off, int64(n), rng.IntN(2) == 0, false); err == nil {
						mu.Lock()
						clear(model[off : off+int64(n)])
						mu.Unlock()
					}
				default:
					err = d.Flush()
				}
				locks[region].Unlock()
				if err != nil {
					errc <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errc)
	for err := range errc {
		t.Fatal(err)
	}
	// All of it, once more, in large reads.
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("the disk differs from the model")
	}
	if _, err := d.ReadAt(make([]byte, 4096), size-2048); !errors.Is(err, block.ErrOutOfRange) {
		t.Fatalf("read past the end: %v", err)
	}
}

// Large writes leave with their header in one writev, after whatever
// submitted requests the link's buffer holds: a small write submitted
// (held), then a large one behind it, then the other way round, through
// qemu-nbd; every byte reads back.
func TestLargeWriteAfterHeld(t *testing.T) {
	needTool(t, "qemu-nbd")
	sock := filepath.Join(t.TempDir(), "q.sock")
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, make([]byte, 8<<20), 0o600)
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-k", sock, "-x", "disk", "-t", img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitSocket(t, "unix", sock)
	logf, err := os.Create(filepath.Join(t.TempDir(), "log"))
	if err != nil {
		t.Fatal(err)
	}
	d, err := Dial(context.Background(), "nbd+unix:///disk?socket="+sock,
		Options{Log: slog.New(slog.NewTextHandler(logf, nil))})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	random := func(n int) []byte {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(rng.Uint32())
		}
		return p
	}
	type w struct {
		off int64
		p   []byte
	}
	// 70 small writes fill the 256 KiB buffer past its end: it then holds
	// the tail of a request whose head has left.
	var many []w
	for i := range 70 {
		many = append(many, w{int64(i) * 4096, random(4096)})
	}
	many = append(many, w{1 << 20, random(1 << 20)})
	for _, ws := range [][]w{
		{{0, random(4096)}, {4096, random(1 << 20)}},
		{{2 << 20, random(directWrite)}, {1 << 20, random(512)}, {3 << 20, random(3 << 20)}},
		many,
	} {
		errc := make(chan error, len(ws))
		for _, x := range ws {
			if !d.SubmitWriteAt(x.p, x.off, false, func(err error, _ *block.Batch) { errc <- err }) {
				t.Fatal("a write was declined")
			}
		}
		d.Push()
		for range ws {
			if err := <-errc; err != nil {
				t.Fatal(err)
			}
		}
		for _, x := range ws {
			got := make([]byte, len(x.p))
			if _, err := d.ReadAt(got, x.off); err != nil || !bytes.Equal(got, x.p) {
				t.Fatalf("%d bytes at %d read back wrong (%v)", len(x.p), x.off, err)
			}
		}
	}
	if _, err := d.WriteAt(random(1<<20), 5<<20); err != nil { // the caller waits: same path
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(logf.Name()); bytes.Contains(b, []byte("unreachable")) { // the client recovers by sending again
		t.Fatalf("the server dropped the connection:\n%s", b)
	}
}

// Writing a request allocates nothing, small or large: the header is
// built in the link, and a large payload leaves with it in one writev
// whose slice the link keeps too. (Measured on link.write over a socket
// pair: the device's call pool drops items at random under the race
// detector.)
func TestLargeWriteAllocs(t *testing.T) {
	fds, err := syscall.Socketpair(syscall.AF_UNIX, syscall.SOCK_STREAM|syscall.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	conns := make([]net.Conn, 2)
	for i, fd := range fds {
		f := os.NewFile(uintptr(fd), "socketpair")
		if conns[i], err = net.FileConn(f); err != nil {
			t.Fatal(err)
		}
		f.Close()
		defer conns[i].Close()
	}
	go func() { // drain
		buf := make([]byte, 1<<20)
		for {
			if _, err := conns[1].Read(buf); err != nil {
				return
			}
		}
	}()
	l := &link{nc: conns[0], w: bufio.NewWriterSize(conns[0], 256<<10)}
	c := &call{typ: 1, length: 1 << 20, payload: make([]byte, 1<<20)}
	if err := l.write(1, c); err != nil {
		t.Fatal(err)
	}
	small := &call{typ: 1, length: 4096, payload: make([]byte, 4096)}
	for _, c := range []*call{c, small} {
		if n := testing.AllocsPerRun(50, func() {
			if err := l.write(2, c); err != nil {
				t.Fatal(err)
			}
		}); n != 0 {
			t.Fatalf("a write of %d bytes allocates %.1f times", len(c.payload), n)
		}
	}
}

// A server with a small maximum request: large requests are split.
func TestSplitsToServerMaximum(t *testing.T) {
	uri, _ := nbdkit(t, "--filter=blocksize-policy", "memory", "8M",
		"blocksize-maximum=64K", "blocksize-error-policy=error")
	d := dial(t, uri)
	if d.maxIO != 64<<10 {
		t.Fatalf("max request %d, want the server's 65536", d.maxIO)
	}
	p := bytes.Repeat([]byte("0123456789abcdef"), 3<<16) // 3 MiB
	if _, err := d.WriteAt(p, 4096); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(p))
	if _, err := d.ReadAt(got, 4096); err != nil || !bytes.Equal(got, p) {
		t.Fatalf("read back: %v", err)
	}
}

// The upstream's error reaches the caller as its errno; the connection
// stays usable.
func TestServerErrors(t *testing.T) {
	uri, _ := nbdkit(t, "--filter=error", "memory", "8M", "error-pwrite=ENOSPC", "error-pwrite-rate=100%")
	d := dial(t, uri)
	if _, err := d.WriteAt(make([]byte, 4096), 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write on a full upstream: %v, want ENOSPC", err)
	}
	if _, err := (submitted{d}).WriteAt(make([]byte, 4096), 0); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("submitted write on a full upstream: %v, want ENOSPC", err)
	}
	if _, err := d.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatalf("read after the error: %v", err)
	}
	// A failed read carries no data: the next replies still line up.
	uri, _ = nbdkit(t, "--filter=error", "memory", "8M", "error-pread=EIO", "error-pread-rate=100%")
	d = dial(t, uri)
	done := make(chan error, 1)
	go func() {
		_, rerr := d.ReadAt(make([]byte, 4096), 0)
		if !errors.Is(rerr, syscall.EIO) {
			done <- fmt.Errorf("read on a failing upstream: %v, want EIO", rerr)
			return
		}
		if _, rerr = (submitted{d}).ReadAt(make([]byte, 4096), 0); !errors.Is(rerr, syscall.EIO) {
			done <- fmt.Errorf("submitted read on a failing upstream: %v, want EIO", rerr)
			return
		}
		_, werr := d.WriteAt(make([]byte, 4096), 0)
		done <- werr
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the connection is out of step after a failed read")
	}
}

// A server gone for longer than the outage limit: the calls waiting
// fail with EIO when the limit passes (not at once, not never), later
// ones at once; when the server is back, calls work again.
func TestServerGoneBeyondLimit(t *testing.T) {
	needTool(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "k.sock")
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, make([]byte, 8<<20), 0o600)
	stop := startFileServer(t, sock, img)
	d, err := Dial(context.Background(), "nbd+unix:///disk?socket="+sock, Options{OutageLimit: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	stop()
	start := time.Now()
	serr := make(chan error, 1)
	go func() { _, err := (submitted{d}).ReadAt(make([]byte, 4096), 0); serr <- err }()
	_, err = d.ReadAt(make([]byte, 4096), 0)
	if !errors.Is(err, syscall.EIO) {
		t.Fatalf("read while the server is gone: %v, want EIO", err)
	}
	select {
	case err := <-serr:
		if !errors.Is(err, syscall.EIO) {
			t.Fatalf("submitted read while the server is gone: %v, want EIO", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a submitted read never completed after the outage limit")
	}
	if waited := time.Since(start); waited < 900*time.Millisecond || waited > 10*time.Second {
		t.Fatalf("the read failed after %v, want about the 1 s limit", waited)
	}
	t0 := time.Now()
	if _, err := d.WriteAt(make([]byte, 512), 0); !errors.Is(err, syscall.EIO) || time.Since(t0) > 500*time.Millisecond {
		t.Fatalf("write past the limit: %v after %v, want EIO at once", err, time.Since(t0))
	}
	startFileServer(t, sock, img)
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := d.WriteAt([]byte("back"), 0); err == nil {
			break
		} else if time.Now().After(deadline) {
			t.Fatalf("no recovery after the server came back: %v", err)
		}
	}
}

// startFileServer serves img with nbdkit's file plugin on sock (removed
// first) and returns a stop that kills it with SIGKILL.
func startFileServer(t *testing.T, sock, img string) (stop func()) {
	t.Helper()
	os.Remove(sock)
	cmd := exec.Command("nbdkit", "-f", "-U", sock, "file", img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	var once sync.Once
	stop = func() { once.Do(func() { cmd.Process.Kill(); cmd.Wait() }) }
	t.Cleanup(stop)
	waitSocket(t, "unix", sock)
	return stop
}

// The server killed (SIGKILL) and started again while clients write,
// flush and read: no call returns an error, every byte is as written.
func TestReconnectUnderLoad(t *testing.T) {
	needTool(t, "nbdkit")
	const size = 8 << 20
	sock := filepath.Join(t.TempDir(), "k.sock")
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, make([]byte, size), 0o600)
	stop := startFileServer(t, sock, img)
	d, err := Dial(context.Background(), "nbd+unix:///disk?socket="+sock, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	waitConns(t, d, 4) // a loss of any ends them all; all are back after
	model := make([]byte, size)
	var wg sync.WaitGroup
	errc := make(chan error, 8)
	quit := make(chan struct{})
	for g := range 8 { // each goroutine owns one 1 MiB region
		wg.Add(1)
		go func() {
			defer wg.Done()
			rng := rand.New(rand.NewPCG(uint64(g), 9))
			io := either(d, g)
			base := int64(g) << 20
			for i := 0; ; i++ {
				select {
				case <-quit:
					return
				default:
				}
				off := base + int64(rng.IntN(1<<20-65536))
				p := make([]byte, 1+rng.IntN(65536))
				for j := range p {
					p[j] = byte(rng.Uint32())
				}
				if _, err := io.WriteAt(p, off); err != nil {
					errc <- err
					return
				}
				copy(model[off:], p)
				if i%8 == 0 {
					if err := d.Flush(); err != nil {
						errc <- err
						return
					}
				}
				got := make([]byte, len(p))
				if _, err := io.ReadAt(got, off); err != nil || !bytes.Equal(got, p) {
					errc <- fmt.Errorf("read back at %d: %v", off, err)
					return
				}
			}
		}()
	}
	time.Sleep(500 * time.Millisecond)
	stop() // SIGKILL: its page cache keeps what it wrote
	time.Sleep(1500 * time.Millisecond)
	startFileServer(t, sock, img)
	time.Sleep(time.Second)
	close(quit)
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(30 * time.Second):
		t.Fatal("calls hang after the server came back")
	}
	close(errc)
	for err := range errc {
		t.Fatalf("a call failed across the server's restart: %v", err)
	}
	got := make([]byte, size)
	if _, err := d.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("after the restart the disk differs from what was written")
	}
	waitConns(t, d, 4)
}

// Where the server advertises multi-conn, requests go over several
// connections (nbdkit's log filter names the connection of each); where
// it does not (nbdkit's multi-conn filter hiding it), over one; a server
// at its connection limit (qemu-nbd -e 2) leaves fewer, without delaying
// the attach.
func TestMultiConn(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"offered", nil, 3},
		{"not offered", []string{"--filter=multi-conn", "multi-conn-mode=disable"}, 1}, // (a filter, then its parameter)
	} {
		t.Run(tc.name, func(t *testing.T) { multiConn(t, tc.args, tc.want) })
	}
	t.Run("qemu-nbd -e 2", func(t *testing.T) {
		needTool(t, "qemu-nbd")
		sock := filepath.Join(t.TempDir(), "q.sock")
		img := filepath.Join(t.TempDir(), "disk.raw")
		os.WriteFile(img, make([]byte, 1<<20), 0o600)
		cmd := exec.Command("qemu-nbd", "-f", "raw", "-k", sock, "-x", "disk", "-t", "-e", "2", img)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitSocket(t, "unix", sock)
		start := time.Now()
		d := dial(t, "nbd+unix:///disk?socket="+sock)
		if took := time.Since(start); took > time.Second {
			t.Errorf("the attach took %s", took)
		}
		waitConns(t, d, 2)
		if _, err := d.WriteAt([]byte("x"), 0); err != nil {
			t.Fatal(err)
		}
	})
}

// multiConn writes from several goroutines through a Device with Conns 3
// to nbdkit's memory plugin behind its log filter (and args), and checks
// how many connections the writes went over: with Spill 1, every link
// takes a share once another carries a request; with the default, six
// writers never fill the first. Every link's count of requests in flight
// is back at 0 after.
func multiConn(t *testing.T, args []string, want int) {
	logf := filepath.Join(t.TempDir(), "log")
	var filters, params []string
	for _, a := range args {
		if strings.HasPrefix(a, "--") {
			filters = append(filters, a)
		} else {
			params = append(params, a)
		}
	}
	uri, stop := nbdkit(t, slices.Concat([]string{"--filter=log"}, filters, []string{"memory", "16M", "logfile=" + logf}, params)...)
	for _, spill := range []int{1, 0} {
		multiConnRun(t, uri, logf, spill, want)
	}
	stop()
}

func multiConnRun(t *testing.T, uri, logf string, spill, want int) {
	t.Helper()
	if err := os.Truncate(logf, 0); err != nil {
		t.Fatal(err)
	}
	d, err := Dial(context.Background(), uri, Options{Conns: 3, Spill: spill})
	if err != nil {
		t.Fatal(err)
	}
	waitConns(t, d, want)
	if spill == 0 {
		want = 1
	}
	{
		var wg sync.WaitGroup
		for g := range 6 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				p := make([]byte, 4096)
				for i := range 20 {
					if _, err := either(d, g).WriteAt(p, int64(g*20+i)*4096); err != nil {
						t.Error(err)
						return
					}
				}
			}()
		}
		wg.Wait()
		d.mu.Lock()
		for i, l := range d.links {
			if l.inflight != 0 {
				t.Errorf("link %d: %d requests in flight after all replies", i, l.inflight)
			}
		}
		d.mu.Unlock()
		d.Close()
		b, err := os.ReadFile(logf)
		if err != nil {
			t.Fatal(err)
		}
		used := map[string]int{}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) > 3 && f[3] == "Write" {
				used[f[2]]++
			}
		}
		if len(used) != want {
			t.Fatalf("spill %d: the writes went over %d connections (%v), want %d", spill, len(used), used, want)
		}
	}
}

// qemu-nbd over TCP, with a named export: the right name attaches, a
// wrong one is refused with the name.
func TestQemuNbdTCP(t *testing.T) {
	needTool(t, "qemu-nbd")
	img := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(img, bytes.Repeat([]byte{0xab}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	addr, port := freeTCPAddr(t)
	cmd := exec.Command("qemu-nbd", "-f", "raw", "-b", "127.0.0.1", "-p", port, "-x", "vm1", "-t", "-e", "2", "--cache=none", img)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitSocket(t, "tcp", addr)
	d := dial(t, "nbd://"+addr+"/vm1")
	got := make([]byte, 8192)
	if _, err := d.ReadAt(got, 1<<19); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0xab}, 8192)) {
		t.Fatalf("read: %v", err)
	}
	if _, err := d.WriteAt([]byte("goldilocks"), 100); err != nil {
		t.Fatal(err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(img); !bytes.Equal(b[100:110], []byte("goldilocks")) {
		t.Fatal("the flushed write is not in qemu-nbd's file")
	}
	d.Close() // it holds both of the connections qemu-nbd -e 2 takes
	_, err := Dial(context.Background(), "nbd://"+addr+"/nope", Options{})
	if !errors.Is(err, ErrHandshake) || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("unknown export: %v", err)
	}
}

// TestUnixSendBuffer: every link to a Unix socket asks for a send buffer
// of unixSendBuffer, which the kernel grants up to net.core.wmem_max
// (and doubles).
func TestUnixSendBuffer(t *testing.T) {
	uri, _ := nbdkit(t, "memory", "64M")
	d := dial(t, uri)
	waitConns(t, d, 4) // the default Conns: nbdkit offers multi-conn
	b, err := os.ReadFile("/proc/sys/net/core/wmem_max")
	if err != nil {
		t.Skipf("no wmem_max to compare with: %v", err)
	}
	wmemMax, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatal(err)
	}
	want := 2 * min(unixSendBuffer, wmemMax)
	d.mu.Lock()
	links := slices.Clone(d.links)
	d.mu.Unlock()
	for i, l := range links {
		if got := sockopt(t, l.nc, syscall.SOL_SOCKET, syscall.SO_SNDBUF); got < want {
			t.Errorf("link %d: SO_SNDBUF %d, want at least %d", i, got, want)
		}
	}
}

// sockopt reads an integer socket option of a link's connection.
func sockopt(t *testing.T, nc net.Conn, level, opt int) int {
	t.Helper()
	sc, ok := nc.(syscall.Conn)
	if !ok {
		t.Fatalf("a %T has no socket", nc)
	}
	rc, err := sc.SyscallConn()
	if err != nil {
		t.Fatal(err)
	}
	var got int
	var serr error
	rc.Control(func(fd uintptr) { got, serr = syscall.GetsockoptInt(int(fd), level, opt) })
	if serr != nil {
		t.Fatal(serr)
	}
	return got
}

// freeTCPAddr is a loopback address nothing listens on (a server is
// started on it next), and its port.
func freeTCPAddr(t *testing.T) (addr, port string) {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr = l.Addr().String()
	l.Close()
	_, port, _ = net.SplitHostPort(addr)
	return addr, port
}
