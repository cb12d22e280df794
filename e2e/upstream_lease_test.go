package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
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
	// B creating a volume over the export instead of adopting it would
	// destroy A's: refused (no terminal, no --yes), naming adopt; the
	// adopt that follows finds A's header intact.
	if out, err := runGoldilocks(dirB, "volume", "create", "vm", "--size", "24M", "--kek", "vault:fleet", "--backing", backing); err == nil ||
		!strings.Contains(out, "already holds an encrypted volume") || !strings.Contains(out, "volume adopt vm --backing") {
		t.Fatalf("B's volume create over A's volume: %v\n%s", err, out)
	}
	goldilocks(t, dirB, "volume", "adopt", "vm", "--backing", backing)

	ga := startGateway(t, dirA, "--lease-ttl", "2s")
	gb := startGateway(t, dirB, "--lease-ttl", "2s")
	done := startHandOverClient(ga.unixURI("vm"), gb.unixURI("vm"), 10)
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
	if res.switches != 1 {
		t.Fatalf("client across the hand-over: %s\nB's log:\n%s", res.out, gb.logText())
	}
	t.Logf("hand-over under load: %d flushed writes, one switch of gateway, attached on B in %.3f s", res.ops, res.took)
	// A released lease is taken at once; one left held would be taken
	// over only after its TTL and a quarter (2.5 s).
	if res.took >= 2 {
		t.Errorf("the client attached on B %.3f s after the release: the lease was not released", res.took)
	}
	verifyHandOver(t, gb.unixURI("vm"), res.ops, "B after the hand-over")

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
	if took := time.Since(t0); took < 2500*time.Millisecond { // its TTL and a quarter, from A's first look
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
	// Broken again: said so, naming who broke it, and left as it stands.
	if brk := goldilocks(t, dirB, "volume", "break-lease", "vm", "--yes"); !strings.Contains(brk, "broken already by host=") || !strings.Contains(brk, dirB) || !strings.Contains(brk, "left as it stands") {
		t.Fatalf("a second break-lease: %s", brk)
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
	// Again after twice the margin: nothing of A's came in late.
	time.Sleep(time.Second)
	out, err = runErr("qemu-io", "-f", "raw", "-r", "-c", "read 0 24M", "-c", "read -P 7 0 4k", gb.unixURI("vm"))
	if err != nil || strings.Contains(out, "failed") {
		t.Fatalf("B a second later: %v\n%s", err, out)
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
