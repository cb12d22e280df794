package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Volumes on an upstream NBD server (--backing nbd+unix://…): nbdkit's
// memory plugin stands for the SAN or the NBD service the gateway fronts.

// startNbdkit serves a memory disk of size with extra filter arguments
// on a Unix socket and returns the backing URI.
func startNbdkit(t *testing.T, size string, args ...string) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), "upstream.sock")
	argv := []string{}
	var params []string // key=value go after the plugin, filters before
	for _, a := range args {
		if strings.HasPrefix(a, "--") {
			argv = append(argv, a)
		} else {
			params = append(params, a)
		}
	}
	runNbdkit(t, sock, append(append(argv, "memory", size), params...)...)
	return "nbd+unix:///disk?socket=" + sock
}

// runNbdkit starts nbdkit -f -U sock with args (a stale socket file is
// removed first), stops it at the test's end, and returns once it
// listens.
func runNbdkit(t *testing.T, sock string, args ...string) *exec.Cmd {
	t.Helper()
	os.Remove(sock)
	cmd := exec.Command("nbdkit", append([]string{"-f", "-U", sock}, args...)...)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			return cmd
		}
		if time.Now().After(deadline) {
			t.Fatal("nbdkit did not start")
		}
	}
}

func TestUpstreamBackedVolumes(t *testing.T) {
	need(t, "nbdkit", "qemu-io", "nbdcopy")
	plain := startNbdkit(t, "64M")
	enc := startNbdkit(t, "40M")
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "up", "--plain", "--backing", plain)
	goldilocks(t, dir, "volume", "create", "upe", "--size", "16M", "--backing", enc)
	if out, err := runGoldilocks(dir, "volume", "create", "again", "--plain", "--backing", plain); err == nil || !strings.Contains(out, "already holds volume up") {
		t.Fatalf("a second volume on the same upstream export: %v %s", err, out)
	}
	g := startGateway(t, dir)
	secret := "GOLDILOCKS-UPSTREAM-SECRET"
	for _, v := range []string{"up", "upe"} {
		run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x21 2M 64k", "-c", "flush", g.unixURI(v))
	}
	nbdsh(t, g.unixURI("upe"), `h.pwrite(b"`+secret+`" * 100, 4 << 20); h.flush(); print("ok")`)
	// Plain: the bytes are on the upstream as written. Encrypted: no
	// plaintext reaches it.
	raw := func(uri string) []byte {
		out := filepath.Join(t.TempDir(), "copy.raw")
		run(t, "nbdcopy", uri, out)
		b, err := os.ReadFile(out)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if b := raw(plain); !bytes.Equal(b[2<<20:2<<20+65536], bytes.Repeat([]byte{0x21}, 65536)) {
		t.Fatal("the plain volume's write is not on the upstream export")
	}
	if b := raw(enc); bytes.Contains(b, []byte(secret)) || bytes.Contains(b, bytes.Repeat([]byte{0x5a}, 64)) {
		t.Fatal("plaintext of the encrypted volume reached the upstream export")
	}
	// A restart of the gateway: everything flushed is still there.
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g = startGateway(t, dir)
	for _, v := range []string{"up", "upe"} {
		run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", "-c", "read -P 0x21 2M 64k", g.unixURI(v))
	}
	if out := nbdsh(t, g.unixURI("upe"), `print(h.pread(26, 4 << 20).decode())`); !strings.Contains(out, secret) {
		t.Fatalf("encrypted volume after a restart: %q", out)
	}
	// Block status passes through (structured replies, base:allocation):
	// the plain volume's map is the upstream's own, 1 MiB + 64 KiB of data.
	dataOf := func(uri string) (ranges [][2]int64, total int64) {
		t.Helper()
		var m []struct {
			Offset, Length int64
			Type           int
		}
		out := run(t, "nbdinfo", "--map", "--json", uri)
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		for _, e := range m {
			if e.Type&1 == 0 {
				ranges = append(ranges, [2]int64{e.Offset, e.Offset + e.Length})
				total += e.Length
			}
		}
		return ranges, total
	}
	want, total := dataOf(plain)
	got, _ := dataOf(g.unixURI("up"))
	if total != 1<<20+64<<10 || fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("data through the gateway %v, on the upstream %v (%d bytes, want %d)", got, want, total, 1<<20+64<<10)
	}
}

// A client's FUA write reaches the upstream as one FUA write (no FLUSH
// after it), where the upstream takes FUA: nbdkit's log filter shows it.
func TestUpstreamFUA(t *testing.T) {
	need(t, "nbdkit", "nbdsh")
	logf := filepath.Join(t.TempDir(), "nbdkit.log")
	up := startNbdkit(t, "16M", "--filter=log", "logfile="+logf)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "up", "--plain", "--backing", up)
	g := startGateway(t, dir)
	nbdsh(t, g.unixURI("up"), `h.pwrite(b"F" * 4096, 8192, nbd.CMD_FLAG_FUA); h.pwrite(b"N" * 4096, 16384); print("ok")`)
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(logf)
	if err != nil {
		t.Fatal(err)
	}
	var ops []string
	for _, l := range strings.Split(string(b), "\n") {
		switch {
		case strings.Contains(l, " Write id=") && strings.Contains(l, "offset=0x2000"):
			ops = append(ops, "write fua="+strings.Fields(l[strings.Index(l, "fua="):])[0][4:])
		case strings.Contains(l, " Write id=") && strings.Contains(l, "offset=0x4000"):
			ops = append(ops, "write2 fua="+strings.Fields(l[strings.Index(l, "fua="):])[0][4:])
		case strings.Contains(l, " Flush id="):
			ops = append(ops, "flush")
		}
	}
	// The FUA write, then the plain one; the gateway's detach flushes.
	if len(ops) < 2 || ops[0] != "write fua=1" || ops[1] != "write2 fua=0" {
		t.Fatalf("upstream saw %v, want a FUA write, then a plain one (and no flush between)\n%s", ops, b)
	}
}

// The upstream's errors reach the client as such, and nothing written
// before is harmed: a full upstream (ENOSPC), then an upstream that is
// gone (the attach refused, naming it).
func TestUpstreamFaults(t *testing.T) {
	need(t, "nbdkit", "qemu-io")
	trigger := filepath.Join(t.TempDir(), "fail-writes")
	uri := startNbdkit(t, "32M", "--filter=error", "error-pwrite=ENOSPC", "error-pwrite-rate=100%", "error-file="+trigger)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "uf", "--plain", "--backing", uri)
	g := startGateway(t, dir)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 0 64k", "-c", "flush", g.unixURI("uf"))
	os.WriteFile(trigger, nil, 0o600) // the upstream is full from now on
	out, err := runErr("qemu-io", "-f", "raw", "-c", "write -P 0x45 64k 64k", g.unixURI("uf"))
	if err == nil && !strings.Contains(out, "No space left on device") {
		t.Fatalf("write to a full upstream: %v\n%s", err, out)
	}
	if !strings.Contains(out, "No space left on device") {
		t.Fatalf("the client did not see ENOSPC:\n%s", out)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x44 0 64k", g.unixURI("uf")) // reads still serve
	os.Remove(trigger)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x46 64k 64k", "-c", "read -P 0x46 64k 64k", "-c", "read -P 0x44 0 64k", g.unixURI("uf"))
	if !strings.Contains(g.logText(), "no space left on device") {
		t.Errorf("the gateway log does not name the upstream's error:\n%s", g.logText())
	}

	// The upstream gone: the attach is refused with a reason; the gateway
	// keeps serving.
	gone := startNbdkit(t, "8M")
	goldilocks(t, dir, "volume", "create", "ug", "--plain", "--backing", gone)
	os.Remove(strings.TrimPrefix(gone, "nbd+unix:///disk?socket="))
	out, err = runErr("qemu-io", "-f", "raw", "-c", "read 0 4k", g.unixURI("ug"))
	if err == nil || !strings.Contains(out, "unavailable") {
		t.Fatalf("attach of a volume whose upstream is gone: %v\n%s", err, out)
	}
	if !strings.Contains(g.logText(), "upstream") {
		t.Errorf("the gateway log does not say the upstream is unreachable:\n%s", g.logText())
	}
	run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x44 0 64k", g.unixURI("uf"))
}

// The upstream server killed and started again under a running client:
// the client sees latency, not errors; everything it wrote and read back
// is right; the outage is on the audit trail and in the metrics.
func TestUpstreamRestartUnderLoad(t *testing.T) {
	need(t, "nbdkit", "nbdsh")
	img := filepath.Join(t.TempDir(), "upstream.raw")
	os.WriteFile(img, make([]byte, 32<<20), 0o600)
	sock := filepath.Join(t.TempDir(), "up.sock")
	startFile := func() *exec.Cmd { return runNbdkit(t, sock, "file", img) }
	k := startFile()
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "ur", "--plain", "--backing", "nbd+unix:///disk?socket="+sock)
	g := startGateway(t, dir, "--metrics", "127.0.0.1:0")
	live := startLoop(t, g.unixURI("ur"), 8)
	waitLog(t, g, "msg=attached", 1)
	time.Sleep(time.Second)
	k.Process.Kill() // SIGKILL
	k.Wait()
	time.Sleep(2 * time.Second)
	startFile()
	if err := live.wait(); err != nil {
		t.Fatalf("the client saw the upstream's restart: %v", err)
	}
	waitLog(t, g, "event=backing_restored", 1)
	if !strings.Contains(g.logText(), "event=backing_outage") {
		t.Errorf("no backing_outage in the log:\n%s", g.logText())
	}
	_, body := httpGet(t, "http://"+metricsAddr(t, g)+"/metrics")
	if !strings.Contains(body, `goldilocks_backing_outages_total{volume="ur"} 1`) {
		t.Errorf("/metrics lacks the outage:\n%s", grepLines(body, "backing"))
	}
	g.stop(syscall.SIGTERM)
	out := goldilocks(t, dir, "audit", "export", "--volume", "ur")
	for _, ev := range []string{`"backing_outage"`, `"backing_restored"`} {
		if !strings.Contains(out, ev) {
			t.Errorf("the audit trail lacks %s", ev)
		}
	}
}

// TLS to the upstream: a second gateway puts a volume on an export of a
// first one that serves TLS only, with a client certificate the first
// one's policy names; a client certificate from another CA is refused.
func TestUpstreamTLS(t *testing.T) {
	need(t, "qemu-io")
	p := newPKI(t)
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, tlsPolicy)
	up := startGateway(t, newDataDir(t, "a-root:8M"), append(p.serverFlags(), "--policy", pol, "--tls-required")...)
	dir := t.TempDir()
	uri := "nbds://" + up.addr + "/a-root?tls-certificates=" + p.clients["vm-a"]
	goldilocks(t, dir, "volume", "create", "via-tls", "--plain", "--backing", uri)
	g := startGateway(t, dir)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", "-c", "flush", "-c", "read -P 0x77 0 64k", g.unixURI("via-tls"))
	// The bytes are on the TLS upstream, read there with vm-a's certificate.
	out, err := qemuTLS(up, p.clients["vm-a"], "a-root", "read -P 0x77 0 64k")
	if err != nil || strings.Contains(out, "fail") {
		t.Fatalf("reading the upstream over TLS: %v\n%s", err, out)
	}
	rogue := "nbds://" + up.addr + "/a-root?tls-certificates=" + p.clients["rogue"]
	if out, err := runGoldilocks(dir, "volume", "create", "rogue", "--plain", "--backing", rogue); err == nil || !strings.Contains(out, "TLS") {
		t.Fatalf("a client certificate from another CA: %v\n%s", err, out)
	}
	if out, err := runGoldilocks(dir, "volume", "create", "plain", "--plain", "--backing", "nbd://"+up.addr+"/a-root"); err == nil || !strings.Contains(strings.ToLower(out), "tls") {
		t.Fatalf("plaintext to a TLS-only upstream: %v\n%s", err, out)
	}
}
