package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
)

// Several gateways, one upstream export: an encrypted volume on a file
// that qemu-nbd serves (-e 8: its connection limit is not what keeps the
// gateways apart), its key in Vault, made by gateway A and adopted by
// gateway B, both with a 2 s lease TTL. The lease in Vault is what keeps
// them apart (crypto/FORMAT.md, "Lease in Vault"): B cannot attach while
// A has it open; `volume release` on A hands it over under a running
// client, which goes on with every flushed write on B; B killed with
// SIGKILL is taken over by A once its lease has stood for its TTL and a
// quarter; and `volume break-lease` on B fences A while A's client
// writes: A's client gets I/O errors, A logs and audits lease_lost, and B
// then serves the volume whole.
func TestUpstreamHandOver(t *testing.T) {
	need(t, "qemu-nbd", "nbdsh", "qemu-io")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	img := filepath.Join(t.TempDir(), "upstream.raw")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "up.sock")
	qn := exec.Command("qemu-nbd", "-f", "raw", "-k", sock, "-x", "disk", "-t", "-e", "8", "--cache=none", "--aio=native", img)
	if err := qn.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { qn.Process.Kill(); qn.Wait() })
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("qemu-nbd did not start")
		}
	}
	backing := "nbd+unix:///disk?socket=" + sock
	dirA, dirB := t.TempDir(), t.TempDir()
	goldilocks(t, dirA, "volume", "create", "vm", "--size", "24M", "--kek", "vault:fleet", "--backing", backing)
	goldilocks(t, dirB, "volume", "adopt", "vm", "--backing", backing)

	ga := startGateway(t, dirA, "--lease-ttl", "2s")
	gb := startGateway(t, dirB, "--lease-ttl", "2s")
	// The client: 4 KiB writes to 64 blocks, each flushed and read back;
	// on an error it connects to the other gateway (waiting while the
	// volume is still leased) and does the operation again.
	const seconds = 10
	script := fmt.Sprintf(`
import nbd, time
uris = [%q, %q]
def connect(u, within):
    deadline = time.time() + within
    while True:
        try:
            c = nbd.NBD()
            c.connect_uri(u)
            return c
        except nbd.Error:
            if time.time() > deadline:
                raise
            time.sleep(0.05)
h = connect(uris[0], 10)
cur, i, switches, end, took = 0, 0, 0, time.time() + %d, 0
while time.time() < end:
    buf = bytes([i %% 251]) * 4096
    off = (i %% 64) * 4096
    while True:
        try:
            h.pwrite(buf, off)
            h.flush()
            assert h.pread(4096, off) == buf, "read back %%d" %% i
            break
        except nbd.Error:
            cur, switches = 1 - cur, switches + 1
            t0 = time.time()
            h = connect(uris[cur], 30)
            took = max(took, time.time() - t0)
    i += 1
print("ops", i, "switches", switches, "took %%.3f" %% took)
`, ga.unixURI("vm"), gb.unixURI("vm"), seconds)
	done := make(chan string, 1)
	go func() {
		out, err := runErr("nbdsh", "-c", script)
		if err != nil {
			out += "\nnbdsh: " + err.Error()
		}
		done <- out
	}()
	waitLog(t, ga, "msg=attached", 1)

	// While A holds it, B refuses, and says why: not the upstream's
	// connection limit (8), the lease.
	out, err := runErr("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", gb.unixURI("vm"))
	if err == nil || !strings.Contains(out, "in use by another gateway") {
		t.Fatalf("B attached a volume A holds: %v\n%s", err, out)
	}
	waitLog(t, gb, "leased by another gateway", 1)
	if log := gb.logText(); !strings.Contains(log, dirA) {
		t.Errorf("B's log does not name the holder:\n%s", log)
	}

	time.Sleep(2 * time.Second)
	rel := goldilocks(t, dirA, "volume", "release", "vm")
	if !strings.Contains(rel, "1 session(s) ended") {
		t.Errorf("release: %s", rel)
	}
	res := <-done
	m := regexp.MustCompile(`ops (\d+) switches (\d+) took ([0-9.]+)`).FindStringSubmatch(res)
	if m == nil || m[2] != "1" {
		t.Fatalf("client across the hand-over: %s\nB's log:\n%s", res, gb.logText())
	}
	ops, _ := strconv.Atoi(m[1])
	t.Logf("hand-over under load: %d flushed writes, one switch of gateway, attached on B in %s s", ops, m[3])
	// A released lease is taken at once; one left held would be taken
	// over only after its TTL and a quarter (2.5 s).
	if took, _ := strconv.ParseFloat(m[3], 64); took >= 2 {
		t.Errorf("the client attached on B %s s after the release: the lease was not released", m[3])
	}
	want := func(blk int) int { // the last flushed write to blk
		last := ops - 1 - ((ops-1-blk)%64+64)%64
		return last % 251
	}
	verify := func(g *gw, what string) {
		t.Helper()
		args := []string{"-f", "raw", "-r"}
		for blk := range 64 {
			args = append(args, "-c", fmt.Sprintf("read -P %d %d 4k", want(blk), blk*4096))
		}
		out, err := runErr("qemu-io", append(args, g.unixURI("vm"))...)
		if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "verification") {
			t.Fatalf("%s: a flushed write is missing: %v\n%s", what, err, out)
		}
	}
	verify(gb, "B after the hand-over")

	// B dies holding the volume (a client attached): A takes it back
	// without a break, once B's lease has stood for 2 s and a quarter.
	live := startLoop(t, gb.unixURI("vm"), 60)
	waitLog(t, gb, "msg=attached", 3)
	time.Sleep(500 * time.Millisecond)
	if err := gb.stop(syscall.SIGKILL); err != nil {
		t.Logf("B killed: %v", err)
	}
	live.wait()
	goldilocks(t, dirA, "volume", "adopt", "vm", "--backing", backing)
	t0 := time.Now()
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 64k", ga.unixURI("vm")); err != nil {
		t.Fatalf("A after B died: %v\n%s", err, out)
	}
	if took := time.Since(t0); took < 2*time.Second {
		t.Errorf("A attached %v after B died holding the lease, before B's TTL could have fenced it", took)
	} else {
		t.Logf("A took the dead B's lease over at attach in %v", took.Round(time.Millisecond))
	}

	// A serves a writing client; B, started again, breaks A's lease: A's
	// next renewal fails and it fences itself.
	live = startLoop(t, ga.unixURI("vm"), 60)
	waitLog(t, ga, "msg=attached", 3)
	gb = startGateway(t, dirB, "--lease-ttl", "2s")
	brk := goldilocks(t, dirB, "volume", "break-lease", "vm", "--yes")
	if !strings.Contains(brk, "broke the lease (host=") || !strings.Contains(brk, dirA) || !strings.Contains(brk, "fences itself") {
		t.Fatalf("break-lease: %s", brk)
	}
	lerr := make(chan error, 1)
	go func() { lerr <- live.wait() }()
	select {
	case err := <-lerr:
		if err == nil {
			t.Fatal("A's client never saw the fence")
		}
	case <-time.After(15 * time.Second):
		t.Fatal("A's client was still writing 15 s after its lease was broken")
	}
	waitLog(t, ga, "event=lease_lost", 1)
	// B takes the broken lease over and reads the whole volume: nothing
	// A sent after its fence broke what B found.
	out, err = runErr("qemu-io", "-f", "raw", "-c", "read 0 24M", "-c", "write -P 7 0 4k", "-c", "flush", "-c", "read -P 7 0 4k", gb.unixURI("vm"))
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("B after breaking A's lease: %v\n%s\nA's log:\n%s", err, out, ga.logText())
	}
	if err := ga.stop(syscall.SIGTERM); err != nil {
		t.Logf("A stopped: %v", err)
	}
	auditA := goldilocks(t, dirA, "audit", "export", "--volume", "vm")
	if !strings.Contains(auditA, `"type":"lease_lost"`) {
		t.Errorf("A's audit trail lacks lease_lost")
	}
	auditB := goldilocks(t, dirB, "audit", "export", "--volume", "vm")
	if !strings.Contains(auditB, `"type":"lease_broken"`) {
		t.Errorf("B's audit trail lacks lease_broken")
	}
}
