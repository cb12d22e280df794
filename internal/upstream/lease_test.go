package upstream

import (
	"bytes"
	"context"
	"errors"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// testLease is a lease whose loss the test decides (the lease's own
// protocol is crypto's, tested against Vault there).
type testLease struct {
	mu                  sync.Mutex
	lost                error
	released, abandoned int
}

var errTestLost = errors.New("test: lease lost")

func (l *testLease) Check() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.lost
}

func (l *testLease) Release() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.released++
	return nil
}

func (l *testLease) Abandon() {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.abandoned++
}

func (l *testLease) lose() {
	l.mu.Lock()
	l.lost = errTestLost
	l.mu.Unlock()
}

// syncBuffer is a log destination for concurrent writers.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// A lease lost fences the device: every kind of request fails with EIO
// (naming the lease) and reaches no server; the loss is logged once as
// lease_lost; requests that waited in an outage are failed, not sent
// again, when the server comes back after the loss; Close releases the
// lease once.
func TestLeaseFence(t *testing.T) {
	needTool(t, "nbdkit")
	sock := filepath.Join(t.TempDir(), "k.sock")
	img := filepath.Join(t.TempDir(), "disk.raw")
	os.WriteFile(img, make([]byte, 8<<20), 0o600)
	stop := startFileServer(t, sock, img)
	var logs syncBuffer
	open := func() (*Device, *testLease) {
		lease := &testLease{}
		d, err := Dial(context.Background(), "nbd+unix:///disk?socket="+sock, Options{
			Lease: lease, Log: slog.New(slog.NewTextHandler(&logs, nil)), OutageLimit: time.Minute,
		})
		if err != nil {
			t.Fatal(err)
		}
		return d, lease
	}

	// Connected: the lease lost, every request fails.
	d, lease := open()
	if _, err := d.WriteAt([]byte("held"), 0); err != nil {
		t.Fatalf("write while the lease is held: %v", err)
	}
	if err := d.Flush(); err != nil {
		t.Fatal(err)
	}
	lease.lose()
	fenced := []struct {
		name string
		do   func() error
	}{
		{"write", func() error { _, err := d.WriteAt([]byte("fenced"), 4096); return err }},
		{"write FUA", func() error { _, err := d.WriteAtFUA([]byte("fenced"), 8192); return err }},
		{"submitted write", func() error { _, err := (submitted{d}).WriteAt([]byte("fenced"), 12288); return err }},
		{"read", func() error { _, err := d.ReadAt(make([]byte, 4096), 0); return err }},
		{"submitted read", func() error { _, err := (submitted{d}).ReadAt(make([]byte, 4096), 0); return err }},
		{"flush", d.Flush},
		{"trim", func() error { return d.Trim(0, 4096) }},
		{"zero", func() error { return d.Zero(0, 4096, false, false) }},
	}
	for _, f := range fenced {
		if err := f.do(); !errors.Is(err, syscall.EIO) || !errors.Is(err, errTestLost) {
			t.Errorf("%s with the lease lost: %v, want EIO and the lease's error", f.name, err)
		}
	}
	if err := d.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
	if lease.released != 1 || lease.abandoned != 0 {
		t.Errorf("every request answered or refused before it was sent: released %d times, abandoned %d at Close, want released once", lease.released, lease.abandoned)
	}

	// The server goes away with a write waiting; the lease is lost
	// during the outage; the server comes back: the write fails.
	d, lease = open()
	stop()
	werr := make(chan error, 1)
	go func() { _, err := d.WriteAt([]byte("in the outage"), 1<<20); werr <- err }()
	time.Sleep(300 * time.Millisecond)
	select {
	case err := <-werr:
		t.Fatalf("a write in an outage within its limit returned: %v", err)
	default:
	}
	lease.lose()
	startFileServer(t, sock, img)
	select {
	case err := <-werr:
		if !errors.Is(err, syscall.EIO) || !errors.Is(err, errTestLost) {
			t.Fatalf("a write waiting when the lease was lost: %v, want EIO and the lease's error", err)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("a write waiting when the lease was lost never completed")
	}
	// That write failed unanswered: the lease is left to run out, not
	// handed on (the server might still have it).
	d.Close()
	if lease.released != 0 || lease.abandoned != 1 {
		t.Errorf("a request failed unanswered: released %d times, abandoned %d at Close, want abandoned once", lease.released, lease.abandoned)
	}

	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b[:4], []byte("held")) {
		t.Errorf("the write made while the lease was held is not in the store")
	}
	for _, off := range []int{4096, 8192, 12288, 1 << 20} {
		if !bytes.Equal(b[off:off+16], make([]byte, 16)) {
			t.Errorf("the store holds a write fenced off at %d: %q", off, b[off:off+16])
		}
	}
	if n := strings.Count(logs.String(), "event=lease_lost"); n != 2 {
		t.Errorf("lease_lost logged %d times by two devices, want once each:\n%s", n, logs.String())
	}
}

// Options.UserTimeout is set as TCP_USER_TIMEOUT on every TCP link.
func TestUserTimeout(t *testing.T) {
	needTool(t, "nbdkit")
	addr, port := freeTCPAddr(t)
	cmd := exec.Command("nbdkit", "-f", "-i", "127.0.0.1", "-p", port, "memory", "16M")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	waitSocket(t, "tcp", addr)
	d, err := Dial(context.Background(), "nbd://"+addr+"/disk", Options{UserTimeout: 2500 * time.Millisecond, Conns: 2})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	waitConns(t, d, 2)
	d.mu.Lock()
	links := slices.Clone(d.links)
	d.mu.Unlock()
	for i, l := range links {
		if got := sockopt(t, l.nc, unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT); got != 2500 {
			t.Errorf("link %d: TCP_USER_TIMEOUT %d ms, want 2500", i, got)
		}
	}
}
