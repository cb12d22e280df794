package e2e

import (
	"bufio"
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
)

// An upgrade in place (SIGUSR2) under 32 running clients that do not
// reconnect: 16 qemu-io (QEMU's NBD client without reconnect-delay: a
// dropped connection is an I/O error) and 16 nbdsh (libnbd), one of each
// on each of 16 volumes (half plain, half encrypted), over TCP and the
// Unix socket, each writing, flushing and reading back what it wrote,
// while the gateway is upgraded three times. No client sees an error,
// every read matches, and the audit trail holds the three upgrades.
func TestUpgradeUnderLoad(t *testing.T) {
	need(t, "qemu-io", "nbdsh")
	dir := t.TempDir()
	createHalfPlain(t, dir, 16, "64M")
	g, pidFile := startUpgradable(t, dir, copyBinary(t))
	first := readPID(t, pidFile)

	stop := filepath.Join(t.TempDir(), "stop")
	var clients []*loadClient
	for i := range 16 {
		v := fmt.Sprintf("v%d", i)
		tcp, unix := g.uri(v), g.unixURI(v)
		if i%4 >= 2 {
			tcp, unix = unix, tcp
		}
		clients = append(clients, startQemuIOLoad(t, unix, i), startNbdshLoad(t, tcp, stop, i))
	}
	for _, c := range clients {
		c.waitProgress(t, 5)
	}
	pid := first
	for i := range 3 {
		pid = upgrade(t, g, pidFile, pid)
		for _, c := range clients {
			c.waitProgress(t, 5) // goes on through the new gateway
		}
		t.Logf("upgrade %d: pid %d", i+1, pid)
	}
	os.WriteFile(stop, nil, 0o600)
	for _, c := range clients {
		c.end() // all at once: each has its queued commands to run first
	}
	for _, c := range clients {
		c.finish(t)
	}
	stalls := regexp.MustCompile(`stall_ms=(\d+)`).FindAllStringSubmatch(g.logText(), -1)
	if len(stalls) != 3 {
		t.Fatalf("%d upgrades logged with their stall, want 3\n%s", len(stalls), g.logText())
	}
	var ms []string
	for _, s := range stalls {
		ms = append(ms, s[1])
	}
	t.Logf("stall per upgrade (ms): %s", strings.Join(ms, ", "))
	audit := goldilocks(t, dir, "audit", "export")
	if n := strings.Count(audit, `"gateway_upgrade"`); n != 3 || strings.Count(audit, `"connections":32`) != 3 {
		t.Fatalf("%d gateway_upgrade records, want 3 with 32 connections each:\n%s", n, audit)
	}
	// A new client sees what the last writes left: the load's own
	// read-backs checked every write; here the gateway still serves.
	run(t, "qemu-io", "-f", "raw", "-c", "read 0 64k", g.unixURI("v1"))
}

// A new gateway that cannot take over leaves the old one serving, its
// clients unaware: one that exits at once, one that never answers (past
// --upgrade-timeout), and one that starts but cannot open a volume once
// the connections were stopped for it (Vault unreachable to it), which
// rolls back after the handover began.
func TestUpgradeRollback(t *testing.T) {
	need(t, "qemu-io", "nbdsh")
	r := startRollbackRig(t)
	dir, bin, real, g, pidFile, pid, stop, clients := r.dir, r.bin, r.real, r.g, r.pidFile, r.pid, r.stop, r.clients
	for i, tc := range []struct {
		name, script, logged string
	}{
		{"exits at once", "#!/bin/sh\necho 'new build: broken' >&2\nexit 3\n", "the new gateway did not start"},
		{"never answers", "#!/bin/sh\nexec sleep 60\n", "no answer within the upgrade timeout"},
		// A keystore passphrase where the keystore is not sealed: the
		// new gateway starts, but the encrypted volume's key does not
		// unwrap there (ErrKeystoreUnsealed).
		{"cannot open a volume", "#!/bin/sh\nGOLDILOCKS_KEYSTORE_PASSPHRASE=wrong exec " + real + " \"$@\"\n", "did not take the connections"},
	} {
		replaceBinary(t, bin, tc.script)
		before := strings.Count(g.logText(), "upgrade failed")
		syscall.Kill(pid, syscall.SIGUSR2)
		if tc.name == "never answers" {
			// One upgrade at a time: a second SIGUSR2 meanwhile is refused.
			waitLog(t, g, "upgrade: starting the new gateway", i+1)
			syscall.Kill(pid, syscall.SIGUSR2)
			waitLog(t, g, "an upgrade is already running", 1)
		}
		deadline := time.Now().Add(30 * time.Second)
		for strings.Count(g.logText(), "upgrade failed") == before && time.Now().Before(deadline) {
			time.Sleep(50 * time.Millisecond)
		}
		log := g.logText()
		if strings.Count(log, "upgrade failed") == before || !strings.Contains(log, tc.logged) {
			t.Fatalf("%s: no rollback logged (want %q)\n%s", tc.name, tc.logged, log)
		}
		if p := readPID(t, pidFile); p != pid {
			t.Fatalf("%s: the PID file names %d, want the old gateway %d", tc.name, p, pid)
		}
		for _, c := range clients {
			c.waitProgress(t, 5)
		}
		t.Logf("rollback %d (%s) logged", i+1, tc.name)
	}
	os.WriteFile(stop, nil, 0o600)
	for _, c := range clients {
		c.end() // all at once: each has its queued commands to run first
	}
	for _, c := range clients {
		c.finish(t)
	}
	if n := strings.Count(g.logText(), "upgrade: starting the new gateway"); n != 3 {
		t.Fatalf("%d new gateways started for 4 SIGUSR2, want 3 (one refused while another ran)", n)
	}
	audit := goldilocks(t, dir, "audit", "export")
	if n := strings.Count(audit, `"gateway_upgrade_failed"`); n != 3 {
		t.Fatalf("%d gateway_upgrade_failed records, want 3:\n%s", n, audit)
	}
}

// createHalfPlain creates volumes v0 … v(n-1) of size, the even ones
// plain, the odd ones encrypted.
func createHalfPlain(t *testing.T, dir string, n int, size string) {
	t.Helper()
	for i := range n {
		args := []string{"volume", "create", fmt.Sprintf("v%d", i), "--size", size}
		if i%2 == 0 {
			args = append(args, "--plain")
		}
		goldilocks(t, dir, args...)
	}
}

// rollbackRig is a gateway that can be upgraded, from a binary at bin
// (replaced by the tests; the real one stays at real), upgrades time out
// after 3 s, serving volume "plain" and the encrypted "enc" (created
// with encArgs), each under a client (qemu-io and nbdsh) that is making
// progress.
type rollbackRig struct {
	dir, bin, real, pidFile, stop string
	g                             *gw
	pid                           int
	clients                       []*loadClient
}

func startRollbackRig(t *testing.T, encArgs ...string) *rollbackRig {
	t.Helper()
	r := &rollbackRig{dir: t.TempDir()}
	goldilocks(t, r.dir, "volume", "create", "plain", "--size", "64M", "--plain")
	goldilocks(t, r.dir, append([]string{"volume", "create", "enc", "--size", "64M"}, encArgs...)...)
	r.bin = copyBinary(t)
	r.real = r.bin + ".real"
	if err := os.Link(r.bin, r.real); err != nil {
		t.Fatal(err)
	}
	r.g, r.pidFile = startUpgradable(t, r.dir, r.bin, "--upgrade-timeout", "3s")
	r.pid = readPID(t, r.pidFile)
	r.stop = filepath.Join(t.TempDir(), "stop")
	r.clients = []*loadClient{startQemuIOLoad(t, r.g.unixURI("plain"), 0), startNbdshLoad(t, r.g.uri("enc"), r.stop, 1)}
	for _, c := range r.clients {
		c.waitProgress(t, 5)
	}
	return r
}

// copyBinary copies the gateway to a path of the test's own, which an
// upgrade test replaces as an install would.
func copyBinary(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(goldilocksBin)
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "goldilocks")
	if err := os.WriteFile(p, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return p
}

// replaceBinary puts a new file at path (rename over it, as install does).
func replaceBinary(t *testing.T, path, content string) {
	t.Helper()
	tmp := path + ".new"
	if err := os.WriteFile(tmp, []byte(content), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// startUpgradable starts bin serving dir with a PID file; at cleanup it
// also stops whichever gateway the PID file names by then.
func startUpgradable(t *testing.T, dir, bin string, extra ...string) (*gw, string) {
	t.Helper()
	pidFile := filepath.Join(t.TempDir(), "pid")
	g := startGatewayBin(t, bin, dir, append([]string{"--pid-file", pidFile}, extra...)...)
	t.Cleanup(func() {
		if b, err := os.ReadFile(pidFile); err == nil {
			if p, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil {
				syscall.Kill(p, syscall.SIGKILL)
			}
		}
	})
	return g, pidFile
}

func readPID(t *testing.T, pidFile string) int {
	t.Helper()
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	p, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("PID file: %v", err)
	}
	return p
}

// upgrade sends SIGUSR2 to the gateway pid and waits until a new one
// serves (the PID file names it) and the old one has exited.
func upgrade(t *testing.T, g *gw, pidFile string, pid int) int {
	t.Helper()
	before := strings.Count(g.logText(), "handed over; this gateway exits")
	failed := strings.Count(g.logText(), "upgrade failed")
	if err := syscall.Kill(pid, syscall.SIGUSR2); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for time.Now().Before(deadline) {
		if strings.Count(g.logText(), "handed over; this gateway exits") > before && !alive(pid) {
			if p := readPID(t, pidFile); p != pid {
				return p
			}
		}
		if strings.Count(g.logText(), "upgrade failed") > failed {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("no upgrade of pid %d\n%s", pid, g.logText())
	return 0
}

// alive reports whether pid runs (a zombie, exited but not yet reaped
// by its parent, does not).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	_, rest, ok := strings.Cut(string(b), ") ")
	return ok && !strings.HasPrefix(rest, "Z")
}

// loadClient is a real NBD client writing, flushing and reading back in
// a loop; progress counts its verified rounds.
type loadClient struct {
	name  string
	out   *lockedBuffer
	done  chan error
	quit  chan struct{}
	once  sync.Once // closes quit
	count func() int
}

// end tells the client to stop (finish waits for it).
func (c *loadClient) end() { c.once.Do(func() { close(c.quit) }) }

// startQemuIOLoad feeds qemu-io commands on its standard input: 64 KiB
// writes of a pattern, a flush, and reads that check the pattern, each
// round at the next offset in the volume's first 32 MiB (an nbdsh load
// on the same volume keeps above).
func startQemuIOLoad(t *testing.T, uri string, seed int) *loadClient {
	t.Helper()
	c := &loadClient{name: "qemu-io " + uri, quit: make(chan struct{})}
	cmd := exec.Command("qemu-io", "-f", "raw", uri)
	in, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.out, c.done = startWatched(t, cmd)
	go func() {
		w := bufio.NewWriter(in)
		for i := 0; ; i++ {
			select {
			case <-c.quit:
				w.WriteString("quit\n")
				w.Flush()
				in.Close()
				return
			default:
			}
			off := (i*977 + seed*131) % 500 * 65536 // the first 32 MiB: nbdsh writes the rest
			p := (i + seed*50) % 255
			fmt.Fprintf(w, "write -P %d %d 64k\nflush\nread -P %d %d 64k\n", p, off, p, off)
			if w.Flush() != nil {
				return
			}
		}
	}()
	c.count = func() int { return strings.Count(c.out.String(), "read 65536/65536") }
	return c
}

// startNbdshLoad runs a libnbd script that writes, flushes and reads
// back until the stop file exists, printing a line per round.
func startNbdshLoad(t *testing.T, uri, stop string, seed int) *loadClient {
	t.Helper()
	script := fmt.Sprintf(`
import os, sys
h.connect_uri(%q)
i = 0
while not os.path.exists(%q):
    off = (512 + (i * 613 + %d * 97) %% 500) * 65536  # above 32 MiB: qemu-io writes below
    data = bytes([(i + %d) %% 256]) * 65536
    h.pwrite(data, off)
    h.flush()
    if h.pread(65536, off) != data:
        print("MISMATCH at", off, flush=True)
        sys.exit(1)
    print("round", i, flush=True)
    i += 1
`, uri, stop, seed, seed)
	c := &loadClient{name: "nbdsh " + uri, quit: make(chan struct{})}
	cmd := exec.Command("nbdsh", "-c", script)
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH")) // Debian's python3 (runErr)
	c.out, c.done = startWatched(t, cmd)
	c.count = func() int { return strings.Count(c.out.String(), "round ") }
	return c
}

// startWatched starts cmd with its output gathered in out (readable while
// it runs); done gets its exit. It is killed at the test's end.
func startWatched(t *testing.T, cmd *exec.Cmd) (out *lockedBuffer, done chan error) {
	t.Helper()
	out, done = &lockedBuffer{}, make(chan error, 1)
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	t.Cleanup(func() { cmd.Process.Kill() })
	return out, done
}

// waitProgress waits until the client made n more verified rounds.
func (c *loadClient) waitProgress(t *testing.T, n int) {
	t.Helper()
	want := c.count() + n
	deadline := time.Now().Add(30 * time.Second)
	for c.count() < want {
		select {
		case err := <-c.done:
			t.Fatalf("%s ended: %v\n%s", c.name, err, c.tail())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s made no progress\n%s", c.name, c.tail())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// finish ends the client and checks that it saw no error.
func (c *loadClient) finish(t *testing.T) {
	t.Helper()
	c.end()
	select {
	case err := <-c.done:
		out := c.out.String()
		if err != nil || strings.Contains(out, "error") || strings.Contains(out, "failed") || strings.Contains(out, "MISMATCH") {
			t.Fatalf("%s: %v\n%s", c.name, err, c.tail())
		}
		t.Logf("%s: %d verified rounds", c.name, c.count())
	case <-time.After(30 * time.Second):
		t.Fatalf("%s did not end\n%s", c.name, c.tail())
	}
}

func (c *loadClient) tail() string {
	s := c.out.String()
	if len(s) > 3000 {
		s = "…" + s[len(s)-3000:]
	}
	return s
}

// 32 clients, one per volume (half encrypted): fio's nbd engine writing
// random 4k blocks with a checksum in each (verify=crc32c), a FLUSH
// every 16 writes, and reading every block back to check it, while the
// gateway is upgraded twice. No job sees an error or a bad block.
func TestUpgrade32Clients(t *testing.T) {
	need(t, "fio")
	dir := t.TempDir()
	var jobs strings.Builder
	jobs.WriteString("[global]\nioengine=nbd\nrw=randwrite\nbs=4k\niodepth=4\nsize=8m\nloops=4\nverify=crc32c\nverify_backlog=64\nverify_state_save=0\nfsync=16\nthread=1\n")
	createHalfPlain(t, dir, 32, "8M")
	g, pidFile := startUpgradable(t, dir, copyBinary(t))
	for i := range 32 {
		fmt.Fprintf(&jobs, "[v%d]\nuri=%s\n", i, g.unixURI(fmt.Sprintf("v%d", i)))
	}
	jobFile := filepath.Join(t.TempDir(), "jobs.fio")
	write(t, jobFile, []byte(jobs.String()))
	cmd := exec.Command("fio", "--output-format=json", jobFile)
	cmd.Dir = t.TempDir() // fio's own files (verify state) go there, not into the source tree
	out, done := startWatched(t, cmd)
	// Upgrade once every 32 jobs are attached, and again a second later.
	for deadline := time.Now().Add(30 * time.Second); strings.Count(g.logText(), "msg=attached") < 32; time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the 32 fio jobs did not attach\n%s", out.String())
		}
	}
	pid := readPID(t, pidFile)
	for i := range 2 {
		time.Sleep(time.Second)
		select {
		case err := <-done:
			t.Fatalf("fio ended before upgrade %d (make its job longer): %v", i+1, err)
		default:
		}
		pid = upgrade(t, g, pidFile, pid)
	}
	select {
	case err := <-done:
		s := out.String()
		if err != nil || strings.Contains(s, "verify") && strings.Contains(s, "bad") || !strings.Contains(s, `"error" : 0`) || strings.Contains(s, `"error" : 5`) {
			t.Fatalf("fio across the upgrades: %v\n%s", err, s)
		}
		if n := strings.Count(s, `"error" : 0`); n != 32 {
			t.Fatalf("%d of 32 fio jobs ended without error\n%s", n, s)
		}
	case <-time.After(3 * time.Minute):
		t.Fatalf("fio did not finish\n%s", out.String())
	}
	stalls := regexp.MustCompile(`connections=32 .*?stall_ms=(\d+)`).FindAllStringSubmatch(g.logText(), -1)
	if len(stalls) != 2 {
		t.Fatalf("%d upgrades handed over 32 connections, want 2\n%s", len(stalls), g.logText())
	}
	t.Logf("32 fio clients, 2 upgrades: stall %s and %s ms", stalls[0][1], stalls[1][1])
}

// A TLS connection cannot be handed over (Go's TLS state stays in the old
// process): it is stopped as at a SIGTERM and closed. QEMU's client with
// reconnect-delay reconnects to the new gateway and goes on: what it
// wrote and flushed before is there, what it writes after too.
func TestUpgradeTLSClientReconnects(t *testing.T) {
	need(t, "qemu-io")
	p := newPKI(t)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "vm", "--size", "16M", "--plain")
	g, pidFile := startUpgradable(t, dir, copyBinary(t), p.serverFlags()...)
	host, port, _ := strings.Cut(g.addr, ":")
	cmd := exec.Command("qemu-io", "--object", "tls-creds-x509,id=tls0,endpoint=client,dir="+p.clients["vm-a"],
		"--image-opts", fmt.Sprintf("driver=nbd,server.type=inet,server.host=%s,server.port=%s,export=vm,tls-creds=tls0,reconnect-delay=20", host, port),
		"-c", "write -P 0x11 0 1M", "-c", "flush", "-c", "sleep 3000",
		"-c", "write -P 0x22 1M 1M", "-c", "read -P 0x11 0 1M", "-c", "read -P 0x22 1M 1M", "-c", "flush")
	out, done := startWatched(t, cmd)
	// qemu-io's output comes at its exit: the gateway's log says when it
	// attached; the write and flush take far less than the 500 ms here.
	for deadline := time.Now().Add(20 * time.Second); !strings.Contains(g.logText(), "tls=true"); time.Sleep(20 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io did not attach over TLS:\n%s\n%s", out.String(), g.logText())
		}
	}
	time.Sleep(500 * time.Millisecond)
	upgrade(t, g, pidFile, readPID(t, pidFile)) // during the client's 3 s sleep
	if !regexp.MustCompile(`event=gateway_upgrade .*connections=0 `).MatchString(g.logText()) {
		t.Fatalf("the TLS connection was handed over, or no upgrade logged:\n%s", g.logText())
	}
	select {
	case err := <-done:
		s := out.String()
		if err != nil || strings.Contains(s, "error") || strings.Contains(s, "failed") ||
			strings.Count(s, "wrote 1048576/1048576") != 2 || strings.Count(s, "read 1048576/1048576") != 2 {
			t.Fatalf("qemu-io over TLS across the upgrade: %v\n%s\ngateway:\n%s", err, s, g.logText())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("qemu-io hung across the upgrade:\n%s", out.String())
	}
	if n := strings.Count(g.logText(), "tls=true"); n < 2 {
		t.Fatalf("%d TLS attaches logged, want the first and the reconnect:\n%s", n, g.logText())
	}
}

// An upgrade in the middle of `key rekey` on a volume that a client is
// writing: the rekey stops in the old gateway at a point it resumes
// from, the command calls again and the new gateway resumes it; the
// command ends with success, the volume is rekeyed, the client saw no
// error and the data it did not touch is intact.
func TestUpgradeMidRekey(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "enc", "--size", "128M")
	g, pidFile := startUpgradable(t, dir, copyBinary(t))
	src := randomFile(t, 128<<20)
	run(t, "nbdcopy", src, g.uri("enc"))
	load := startQemuIOLoad(t, g.unixURI("enc"), 0) // the first 32 MiB
	load.waitProgress(t, 5)

	rekey := exec.Command(goldilocksBin, "key", "rekey", "enc", "--rate", "16MiB", "--data-dir", dir)
	out, done := startWatched(t, rekey)
	for deadline := time.Now().Add(30 * time.Second); !status(t, dir, "enc").Rekeying; time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("the rekey did not start\n%s", out.String())
		}
	}
	time.Sleep(time.Second) // some 16 MiB re-sealed, of 128
	upgrade(t, g, pidFile, readPID(t, pidFile))
	if !strings.Contains(g.logText(), "rekeys_resumed=1") {
		t.Fatalf("the upgrade did not stop the rekey for the new gateway:\n%s", g.logText())
	}
	load.waitProgress(t, 5)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("key rekey across the upgrade: %v\n%s\ngateway:\n%s", err, out.String(), g.logText())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("key rekey did not finish\n%s", out.String())
	}
	if st := status(t, dir, "enc"); st.Rekeying {
		t.Fatalf("after the rekey: %+v", st)
	}
	load.finish(t)
	audit := goldilocks(t, dir, "audit", "export")
	if !strings.Contains(audit, `"resume":false`) || !strings.Contains(audit, `"resume":true`) || strings.Count(audit, `"rekey_finish"`) != 1 {
		t.Fatalf("want a rekey requested, a rekey resumed and one rekey_finish:\n%s", audit)
	}
	// Above the client's 32 MiB, the volume holds what was copied in.
	got := filepath.Join(t.TempDir(), "got.raw")
	run(t, "nbdcopy", g.uri("enc"), got)
	a, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(got)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(a[32<<20:], b[32<<20:]) {
		t.Fatal("the rekeyed volume differs from what was written, above 32 MiB")
	}
}

// A Vault that hangs for the new gateway (it accepts and never answers)
// while the old one reaches it: the new gateway opens the plain volume,
// then waits on Vault for the encrypted one past --upgrade-timeout. The
// old gateway kills it first, which frees the plain volume, and then
// resumes its connections; their clients see a pause, no error. The next
// upgrade, with Vault reachable, goes through.
func TestUpgradeRollbackVaultHangs(t *testing.T) {
	need(t, "qemu-io", "nbdsh")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	hang, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer hang.Close()
	go func() {
		var held []net.Conn // read nothing, answer nothing
		defer func() {
			for _, c := range held {
				c.Close()
			}
		}()
		for {
			c, err := hang.Accept()
			if err != nil {
				return
			}
			held = append(held, c)
		}
	}()
	r := startRollbackRig(t, "--kek", "vault:vms")
	bin, real, g, pidFile, pid, stop, clients := r.bin, r.real, r.g, r.pidFile, r.pid, r.stop, r.clients
	replaceBinary(t, bin, "#!/bin/sh\nVAULT_ADDR=http://"+hang.Addr().String()+" exec "+real+" \"$@\"\n")
	syscall.Kill(pid, syscall.SIGUSR2)
	for deadline := time.Now().Add(30 * time.Second); !strings.Contains(g.logText(), "upgrade failed"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no rollback logged\n%s", g.logText())
		}
	}
	if log := g.logText(); !strings.Contains(log, "did not take the connections") || !strings.Contains(log, "volume open for a handed connection\" volume=plain") {
		t.Fatalf("want a rollback after the new gateway opened the plain volume:\n%s", log)
	}
	for _, c := range clients {
		c.waitProgress(t, 5)
	}
	replaceBinary(t, bin, "#!/bin/sh\nexec "+real+" \"$@\"\n")
	if p := upgrade(t, g, pidFile, pid); p == pid {
		t.Fatal("the second upgrade left the old gateway")
	}
	for _, c := range clients {
		c.waitProgress(t, 5)
	}
	os.WriteFile(stop, nil, 0o600)
	for _, c := range clients {
		c.finish(t)
	}
}
