package e2e

import (
	"fmt"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
)

// Several gateways, one storage: an encrypted volume on a Ceph RBD image,
// its key in Vault, made by gateway A and adopted by gateway B (each its
// own data dir, as on two hosts). The image's exclusive lock is the
// lease: B cannot attach while A has it open; `volume release` on A hands
// it over under a running client, which reconnects to B and goes on with
// every flushed write there; B killed with SIGKILL leaves a lease that A
// breaks (B is blocklisted); and a gateway that never saw the volume
// refuses the image rolled back to a snapshot, by the anchor in Vault.
func TestRBDHandOver(t *testing.T) {
	need(t, "nbdsh", "qemu-io")
	conf := cephCluster(t, "ho", "64M")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	backing := "rbd:rbd/ho:conf=" + conf
	dirA, dirB := t.TempDir(), t.TempDir()
	out, err := runGoldilocks(dirA, "volume", "create", "vm", "--size", "24M", "--kek", "vault:fleet", "--backing", backing)
	if err != nil && strings.Contains(out, "without Ceph") {
		missing(t, "a goldilocks built with Ceph RBD support (make build with librbd-dev)")
	}
	if err != nil {
		t.Fatalf("volume create: %v\n%s", err, out)
	}
	cephCmd(t, conf, "rbd", "snap", "create", "rbd/ho@empty") // for the rollback at the end

	// Adopt: --plain refused on an encrypted store; the header gives the
	// UUID, size and key, which must unwrap here.
	if out, err := runGoldilocks(dirB, "volume", "adopt", "vm", "--backing", backing, "--plain"); err == nil || !strings.Contains(out, "holds an encrypted volume") {
		t.Fatalf("adopt --plain of an encrypted store: %v\n%s", err, out)
	}
	if out, err := runGoldilocks(dirB, "volume", "create", "vm", "--plain", "--backing", backing); err == nil || !strings.Contains(out, "already holds an encrypted volume") {
		t.Fatalf("volume create over an RBD image holding a volume: %v\n%s", err, out)
	}
	goldilocks(t, dirB, "volume", "adopt", "vm", "--backing", backing)
	infoA, infoB := goldilocks(t, dirA, "volume", "info", "vm", "--json"), goldilocks(t, dirB, "volume", "info", "vm", "--json")
	uuidRE := regexp.MustCompile(`"uuid":\s*"([0-9a-f-]+)"`)
	if a, b := uuidRE.FindStringSubmatch(infoA), uuidRE.FindStringSubmatch(infoB); a == nil || b == nil || a[1] != b[1] {
		t.Fatalf("adopted volume's UUID differs:\nA %s\nB %s", infoA, infoB)
	}

	ga, gb := startGateway(t, dirA), startGateway(t, dirB)
	done := startHandOverClient(ga.unixURI("vm"), gb.unixURI("vm"), 14)
	waitLog(t, ga, "msg=attached", 1)

	// While A holds it, B refuses, and says why.
	out, err = runErr("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", gb.unixURI("vm"))
	if err == nil || !strings.Contains(out, "in use by another gateway") {
		t.Fatalf("B attached a volume A holds: %v\n%s", err, out)
	}
	// (The refusal may reach qemu-io before the line reaches B's log.)
	waitLog(t, gb, "leased by another gateway (held by host=", 1)
	if log := gb.logText(); !strings.Contains(log, dirA) {
		t.Errorf("B's log does not name the holder:\n%s", log)
	}

	time.Sleep(3 * time.Second)
	rel := goldilocks(t, dirA, "volume", "release", "vm")
	if !strings.Contains(rel, "1 session(s) ended") {
		t.Errorf("release: %s", rel)
	}
	if out, err := runErr("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", ga.unixURI("vm")); err == nil {
		t.Errorf("A still serves the released volume:\n%s", out)
	}
	res := <-done
	if res.switches != 1 {
		t.Fatalf("client across the hand-over: %s", res.out)
	}
	t.Logf("hand-over under load: %d flushed writes, one switch of gateway", res.ops)
	if log := gb.logText(); !strings.Contains(log, "msg=attached") {
		t.Fatalf("the client never attached on B:\n%s", log)
	}
	verifyHandOver(t, gb.unixURI("vm"), res.ops, "B after the hand-over")

	// B dies holding the volume (a client attached): its lease stays. A
	// takes the volume back and breaks the lease; B's Ceph client is
	// blocklisted.
	startLoop(t, gb.unixURI("vm"), 60)
	waitLog(t, gb, "msg=attached", 2)
	if err := gb.stop(syscall.SIGKILL); err == nil {
		t.Log("B killed")
	}
	goldilocks(t, dirA, "volume", "adopt", "vm", "--backing", backing)
	if out, err := runGoldilocks(dirA, "volume", "break-lease", "vm"); err == nil {
		t.Fatalf("break-lease without a terminal or --yes went ahead:\n%s", out)
	}
	brk := goldilocks(t, dirA, "volume", "break-lease", "vm", "--yes")
	if !strings.Contains(brk, "broke the lease (held by host=") || !strings.Contains(brk, dirB) {
		t.Fatalf("break-lease: %s", brk)
	}
	bl := string(cephCmd(t, conf, "ceph", "osd", "blocklist", "ls"))
	if !strings.Contains(bl, "127.0.0.1:0/") {
		t.Errorf("B's client is not on the blocklist:\n%s", bl)
	}
	// The loop on B ran until SIGKILL and may have written more than
	// `ops` blocks; its writes after the hand-over are B's and A checks
	// only that the volume opens and reads: the data checks are above.
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 64k", ga.unixURI("vm")); err != nil {
		t.Fatalf("A after breaking B's lease: %v\n%s", err, out)
	}
	audit := goldilocks(t, dirA, "audit", "export", "--volume", "vm")
	for _, ev := range []string{`"type":"volume_release"`, `"type":"volume_adopt"`, `"type":"lease_broken"`} {
		if !strings.Contains(audit, ev) {
			t.Errorf("A's audit trail lacks %s", ev)
		}
	}
	if !strings.Contains(audit, `"holder":"held by host=`) {
		t.Errorf("the lease_broken record does not name the holder:\n%s", audit)
	}

	// The image rolled back to its first snapshot (taken right after
	// create): a gateway that never saw the volume adopts it (the old
	// header is genuine) but refuses to attach it, by the anchor in Vault.
	if err := ga.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	cephCmd(t, conf, "rbd", "snap", "rollback", "rbd/ho@empty")
	dirC := t.TempDir()
	goldilocks(t, dirC, "volume", "adopt", "vm", "--backing", backing)
	gc := startGateway(t, dirC)
	out, err = runErr("qemu-io", "-f", "raw", "-r", "-c", "read 0 4k", gc.unixURI("vm"))
	if err == nil || !strings.Contains(out, "older than its rollback anchor") {
		t.Fatalf("a new gateway attached a rolled-back image: %v\n%s", err, out)
	}
}

// handOver is what a hand-over client did: flushed writes, switches of
// gateway, the longest switch in seconds, and its output.
type handOver struct {
	ops, switches int
	took          float64
	out           string
}

// startHandOverClient runs an nbdsh client for seconds: 4 KiB writes to
// 64 blocks, each flushed and read back; on an error it connects to the
// other gateway (waiting up to 30 s while the volume is still leased) and
// does the operation again. The channel gets what it did.
func startHandOverClient(uriA, uriB string, seconds int) <-chan handOver {
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
`, uriA, uriB, seconds)
	done := make(chan handOver, 1)
	go func() {
		out, err := runErr("nbdsh", "-c", script)
		if err != nil {
			out += "\nnbdsh: " + err.Error()
		}
		r := handOver{switches: -1, out: out}
		if m := regexp.MustCompile(`ops (\d+) switches (\d+) took ([0-9.]+)`).FindStringSubmatch(out); m != nil {
			r.ops, _ = strconv.Atoi(m[1])
			r.switches, _ = strconv.Atoi(m[2])
			r.took, _ = strconv.ParseFloat(m[3], 64)
		}
		done <- r
	}()
	return done
}

// verifyHandOver reads every block back from uri: each must hold the last
// of a hand-over client's ops flushed writes to it.
func verifyHandOver(t *testing.T, uri string, ops int, what string) {
	t.Helper()
	args := []string{"-f", "raw", "-r"}
	for blk := range 64 {
		last := ops - 1 - ((ops-1-blk)%64+64)%64
		args = append(args, "-c", fmt.Sprintf("read -P %d %d 4k", last%251, blk*4096))
	}
	out, err := runErr("qemu-io", append(args, uri)...)
	if err != nil || strings.Contains(out, "failed") || strings.Contains(out, "verification") {
		t.Fatalf("%s: a flushed write is missing: %v\n%s", what, err, out)
	}
}
