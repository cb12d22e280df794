package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// nbdkitFile serves a new sparse file of size bytes with nbdkit's file
// plugin on a Unix socket, through filters (--filter=NAME) with params
// (key=value); it returns the upstream URI.
func nbdkitFile(t *testing.T, size int64, filters []string, params ...string) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "backing.img")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, size); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "nbdkit.sock")
	runNbdkit(t, sock, append(append(filters, "file", img), params...)...)
	return "nbd+unix:///?socket=" + sock
}

// Bad storage: a backing store that runs out of space, returns EIO on
// reads, answers slowly, or is truncated under the gateway. Each ends in
// a clear error to the client, in the log and on the audit trail
// (io_error), and harms nothing: once the fault clears, everything
// flushed before it reads back. The faults come from nbdkit's error and
// delay filters behind the upstream-NBD backend, switched on and off by
// files the error filter looks for.
func TestBadStorage(t *testing.T) {
	need(t, "nbdkit", "qemu-io")
	dir := t.TempDir()
	faults := t.TempDir()
	enospc, eio := filepath.Join(faults, "enospc"), filepath.Join(faults, "eio")
	errFilter := []string{"--filter=error"}
	errParams := []string{"error-pwrite=ENOSPC", "error-pwrite-rate=100%", "error-pwrite-file=" + enospc,
		"error-pread=EIO", "error-pread-rate=100%", "error-pread-file=" + eio}
	goldilocks(t, dir, "volume", "create", "p", "--plain", "--size", "16M", "--backing", nbdkitFile(t, 16<<20, errFilter, errParams...))
	goldilocks(t, dir, "volume", "create", "e", "--size", "8M", "--backing", nbdkitFile(t, 24<<20, errFilter, errParams...))
	goldilocks(t, dir, "volume", "create", "slow", "--plain", "--size", "4M", "--backing",
		nbdkitFile(t, 4<<20, []string{"--filter=delay"}, "delay-read=300ms"))
	goldilocks(t, dir, "volume", "create", "t", "--plain", "--size", "8M")
	goldilocks(t, dir, "volume", "create", "te", "--size", "8M")
	g := startGateway(t, dir)
	qio := func(vol string, cmds ...string) (string, error) {
		args := []string{"-f", "raw"}
		for _, c := range cmds {
			args = append(args, "-c", c)
		}
		out, err := runErr("qemu-io", append(args, g.unixURI(vol))...)
		if err == nil && (strings.Contains(out, "failed") || strings.Contains(out, "verification")) {
			err = os.ErrInvalid
		}
		return out, err
	}
	for _, v := range []string{"p", "e", "t", "te"} {
		if out, err := qio(v, "write -P 0x11 0 4M", "flush"); err != nil {
			t.Fatalf("%s: %v\n%s", v, err, out)
		}
		// A session that stays attached keeps the volume open, as a
		// running VM does: the faults below hit an open volume. (A new
		// attach of a volume whose store fails is refused: the encrypted
		// header cannot be read or marked open.)
		hold, err := dialNBD(g.sock, v)
		if err != nil {
			t.Fatal(err)
		}
		defer hold.close()
	}

	for _, v := range []string{"p", "e"} {
		// Out of space: the write fails with ENOSPC, nothing written
		// before is harmed.
		os.WriteFile(enospc, nil, 0o600)
		out, err := qio(v, "write -P 0x22 0 1M")
		if err == nil || !strings.Contains(out, "No space left on device") {
			t.Errorf("%s: a write to a full store: %v\n%s", v, err, out)
		}
		os.Remove(enospc)
		if out, err := qio(v, "read -P 0x11 0 4M"); err != nil {
			t.Errorf("%s: after ENOSPC cleared, flushed data: %v\n%s", v, err, out)
		}
		// EIO on half the reads: the read fails with EIO, then reads
		// back once the fault clears.
		os.WriteFile(eio, nil, 0o600)
		out, err = qio(v, "read 0 4M")
		if err == nil || !strings.Contains(out, "Input/output error") {
			t.Errorf("%s: a read from a failing store: %v\n%s", v, err, out)
		}
		os.Remove(eio)
		if out, err := qio(v, "read -P 0x11 0 4M"); err != nil {
			t.Errorf("%s: after EIO cleared, flushed data: %v\n%s", v, err, out)
		}
	}

	// Read-only: the upstream server comes back read-only (nbdkit -r on
	// the same file): writes fail with EPERM, reads go on; back read-write,
	// writes work and nothing was lost.
	roImg := filepath.Join(t.TempDir(), "ro.img")
	os.WriteFile(roImg, nil, 0o600)
	os.Truncate(roImg, 8<<20)
	roSock := filepath.Join(t.TempDir(), "ro.sock")
	var roCmd *exec.Cmd
	startRO := func(readOnly bool) {
		t.Helper()
		if roCmd != nil {
			roCmd.Process.Kill()
			roCmd.Wait()
		}
		args := []string{"file", roImg}
		if readOnly {
			args = append([]string{"-r"}, args...)
		}
		roCmd = runNbdkit(t, roSock, args...)
	}
	startRO(false)
	goldilocks(t, dir, "volume", "create", "ro", "--plain", "--size", "8M", "--backing", "nbd+unix:///?socket="+roSock)
	roHold, err := dialNBD(g.sock, "ro")
	if err != nil {
		t.Fatal(err)
	}
	defer roHold.close()
	if out, err := qio("ro", "write -P 0x55 0 1M", "flush"); err != nil {
		t.Fatalf("ro: %v\n%s", err, out)
	}
	startRO(true)
	if out, err := qio("ro", "write -P 0x66 0 64k"); err == nil || !strings.Contains(out, "Operation not permitted") {
		t.Errorf("a write to a store that became read-only: %v\n%s", err, out)
	}
	if out, err := qio("ro", "read -P 0x55 0 1M"); err != nil {
		t.Errorf("reads of a store that became read-only: %v\n%s", err, out)
	}
	startRO(false)
	if out, err := qio("ro", "read -P 0x55 0 1M", "write -P 0x77 1M 64k", "read -P 0x77 1M 64k"); err != nil {
		t.Errorf("the store read-write again: %v\n%s", err, out)
	}

	// Slow: latency, no error.
	start := time.Now()
	if out, err := qio("slow", "write -P 0x44 0 64k", "read -P 0x44 0 64k"); err != nil {
		t.Errorf("slow store: %v\n%s", err, out)
	}
	if d := time.Since(start); d < 300*time.Millisecond {
		t.Errorf("the delay filter did not delay (%v): the test tests nothing", d)
	}

	// Truncated under the gateway: reads past the new end fail (no zeros
	// served as data); the store put back, everything reads back.
	reg := filepath.Join(dir, "volumes")
	for _, v := range []string{"t", "te"} {
		path := filepath.Join(reg, v+".img")
		saved, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(path, 1<<20); err != nil {
			t.Fatal(err)
		}
		out, err := qio(v, "read 2M 1M")
		if err == nil || !strings.Contains(out, "Input/output error") {
			t.Errorf("%s: a read past the truncated end: %v\n%s", v, err, out)
		}
		if err := os.WriteFile(path, saved, 0o600); err != nil {
			t.Fatal(err)
		}
		if out, err := qio(v, "read -P 0x11 0 4M"); err != nil {
			t.Errorf("%s: the store put back: %v\n%s", v, err, out)
		}
	}

	log := g.logText()
	for _, want := range []string{"errno=ENOSPC", "errno=EIO"} {
		if !strings.Contains(log, want) {
			t.Errorf("the log has no %s", want)
		}
	}
	audit := goldilocks(t, dir, "audit", "export")
	for _, v := range []string{"p", "e"} {
		for _, want := range []string{`"errno":"ENOSPC"`, `"errno":"EIO"`} {
			if !strings.Contains(audit, `"type":"io_error","identity":"","volume":"`+v+`"`) || !strings.Contains(audit, want) {
				t.Errorf("the audit trail has no io_error %s for %s", want, v)
			}
		}
	}
}
