package e2e

import (
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
)

// Key rotation and rekey through the real binary, with a real Vault and
// real NBD clients.

type keyStatus struct {
	Volume      string `json:"volume"`
	Provider    string `json:"provider"`
	Key         string `json:"key"`
	Version     uint32 `json:"version"`
	Rekeying    bool   `json:"rekeying"`
	RekeyCursor uint64 `json:"rekey_cursor"`
}

func status(t *testing.T, dir, vol string) keyStatus {
	t.Helper()
	var st []keyStatus
	if err := json.Unmarshal([]byte(goldilocks(t, dir, "key", "status", vol, "--json")), &st); err != nil || len(st) != 1 {
		t.Fatalf("key status %s: %v %v", vol, st, err)
	}
	return st[0]
}

// qemuWrites is a qemu-io command list writing pattern p+i to the i-th MiB
// of the first n MiB, and the matching read checks.
func qemuWrites(n int, p byte) (writes, reads []string) {
	for i := 0; i < n; i++ {
		writes = append(writes, "-c", fmt.Sprintf("write -P 0x%02x %dM 1M", p+byte(i), i))
		reads = append(reads, "-c", fmt.Sprintf("read -P 0x%02x %dM 1M", p+byte(i), i))
	}
	return writes, reads
}

func checkRead(t *testing.T, out string) {
	t.Helper()
	if strings.Contains(out, "failed") || strings.Contains(out, "Pattern verification") {
		t.Fatalf("read check: %s", out)
	}
}

// A Vault KEK: create, attach, read, write; `key rotate` while qemu-io
// writes; then every byte checks, Vault's min_decryption_version disables
// the old versions, and the volumes still attach in a new gateway.
func TestVaultRotateUnderWrites(t *testing.T) {
	need(t, "qemu-io")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	dir := t.TempDir()
	for _, n := range []string{"va", "vb", "vc"} {
		goldilocks(t, dir, "volume", "create", n, "--size", "32M", "--kek", "vault:vms")
	}
	goldilocks(t, dir, "volume", "create", "loc", "--size", "8M")
	if st := status(t, dir, "va"); st.Provider != "vault" || st.Key != "vms" || st.Version != 1 {
		t.Fatalf("status after create: %+v", st)
	}
	g := startGateway(t, dir)

	writes, reads := qemuWrites(32, 0x10)
	done := make(chan string, 1)
	go func() {
		out, err := runErr("qemu-io", append(append([]string{"-f", "raw"}, writes...), g.uri("va"))...)
		if err != nil {
			out += err.Error() + "failed"
		}
		done <- out
	}()
	rotations := 0
	var qout string
loop:
	for {
		goldilocks(t, dir, "key", "rotate", "vault:vms")
		rotations++
		select {
		case qout = <-done:
			break loop
		default:
		}
	}
	if strings.Contains(qout, "failed") {
		t.Fatalf("qemu-io writes during rotation: %s", qout)
	}
	t.Logf("%d rotations while qemu-io wrote", rotations)
	newest := uint32(1 + rotations)
	for _, n := range []string{"va", "vb", "vc"} {
		if st := status(t, dir, n); st.Version != newest {
			t.Fatalf("%s after %d rotations: %+v", n, rotations, st)
		}
	}
	if st := status(t, dir, "loc"); st.Version != 1 {
		t.Fatalf("rotating vault:vms touched a local volume: %+v", st)
	}
	checkRead(t, run(t, "qemu-io", append(append([]string{"-f", "raw"}, reads...), g.uri("va"))...))

	// Disable every older version in Vault; the volumes still attach.
	if _, err := v.Client().Logical().Write("transit/keys/vms/config", map[string]any{"min_decryption_version": newest}); err != nil {
		t.Fatal(err)
	}
	out := goldilocks(t, dir, "key", "rotate", "vms", "--rewrap-only", "--min-version", fmt.Sprint(newest), "--json")
	if !strings.Contains(out, fmt.Sprintf(`"to_version": %d`, newest)) {
		t.Fatalf("rewrap-only: %s", out)
	}
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g2 := startGateway(t, dir)
	checkRead(t, run(t, "qemu-io", append(append([]string{"-f", "raw"}, reads...), g2.uri("va"))...))
	run(t, "qemu-io", "-f", "raw", "-c", "read 0 1M", g2.uri("vc"))

	// --min-version beyond what exists fails, naming the volumes.
	out, err := runGoldilocks(dir, "key", "rotate", "vms", "--rewrap-only", "--min-version", fmt.Sprint(newest+5))
	if err == nil || !strings.Contains(out, "below --min-version") || !strings.Contains(out, "va") {
		t.Fatalf("rotate --min-version beyond the newest: %v %s", err, out)
	}
	// --all rotates the local key too; JSON lists every volume.
	out = goldilocks(t, dir, "key", "rotate", "--all", "--json")
	var res struct {
		Volumes []struct {
			Volume string `json:"volume"`
			To     uint32 `json:"to_version"`
		} `json:"volumes"`
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || len(res.Volumes) != 4 {
		t.Fatalf("rotate --all: %v %s", err, out)
	}
}

// `key rekey` while nbdcopy writes: afterwards every byte is the one
// written, and the data key changed (the header's active slot flipped).
func TestRekeyUnderNbdcopy(t *testing.T) {
	need(t, "nbdcopy")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "rk", "--size", "128M", "--kek", "vault:vms")
	g := startGateway(t, dir)
	src := randomFile(t, 128<<20)
	// A first half written before, so the rekey has data to walk from the
	// start; nbdcopy then rewrites all of it while the rekey runs.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64M", g.uri("rk"))
	copied := make(chan error, 1)
	go func() {
		out, err := runErr("nbdcopy", src, g.uri("rk"))
		if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		copied <- err
	}()
	goldilocks(t, dir, "key", "rekey", "rk", "--rate", "64MiB")
	if err := <-copied; err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(g.logText(), "event=rekey_finish") {
		t.Fatal("no rekey_finish in the gateway log")
	}
	if st := status(t, dir, "rk"); st.Rekeying {
		t.Fatalf("still rekeying: %+v", st)
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "nbdcopy", g.uri("rk"), out)
	filesEqual(t, src, out)
	// And again from a fresh gateway, which must open it with the new key.
	g.stop(syscall.SIGTERM)
	g2 := startGateway(t, dir)
	run(t, "nbdcopy", g2.uri("rk"), out)
	filesEqual(t, src, out)
}

// kill -9 of the gateway in the middle of a rekey: the volume serves its
// data mid-rekey, and `key rekey` resumes at the cursor and finishes.
func TestRekeyKillResume(t *testing.T) {
	need(t, "nbdcopy")
	dir := newEncryptedDataDir(t, "kr:256M")
	g := startGateway(t, dir)
	src := randomFile(t, 256<<20)
	run(t, "nbdcopy", src, g.uri("kr"))
	rekey := exec.Command(goldilocksBin, "key", "rekey", "kr", "--rate", "40MiB", "--data-dir", dir)
	rekey.Stderr = os.Stderr
	if err := rekey.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		if st := status(t, dir, "kr"); st.Rekeying && st.RekeyCursor > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the rekey cursor never moved")
		}
		time.Sleep(100 * time.Millisecond)
	}
	g.cmd.Process.Signal(syscall.SIGKILL)
	<-g.exited
	if err := rekey.Wait(); err == nil {
		t.Fatal("key rekey succeeded although its gateway was killed")
	}
	st := status(t, dir, "kr")
	if !st.Rekeying || st.RekeyCursor == 0 || st.RekeyCursor >= 65536 {
		t.Fatalf("after kill -9: %+v, want a rekey in progress", st)
	}
	g2 := startGateway(t, dir)
	if !strings.Contains(g2.logText(), "interrupted rekey") {
		t.Error("gateway does not warn about the interrupted rekey")
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "nbdcopy", g2.uri("kr"), out)
	filesEqual(t, src, out)
	goldilocks(t, dir, "key", "rekey", "kr")
	if st := status(t, dir, "kr"); st.Rekeying {
		t.Fatalf("after resume: %+v", st)
	}
	run(t, "nbdcopy", g2.uri("kr"), out)
	filesEqual(t, src, out)
	// Offline too: with no gateway, the command opens the volume itself.
	g2.stop(syscall.SIGTERM)
	goldilocks(t, dir, "key", "rekey", "kr")
	g3 := startGateway(t, dir)
	run(t, "nbdcopy", g3.uri("kr"), out)
	filesEqual(t, src, out)
}

// Vault stopped and restarted under a running workload: the attached
// volume keeps serving, a new attach fails naming Vault, and attaches work
// again once Vault is back, with no restart of the gateway.
func TestVaultOutage(t *testing.T) {
	need(t, "nbdsh", "qemu-img")
	v := vaulttest.Start(t, vaulttest.Options{Persistent: true})
	v.Setenv(t)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "vo", "--size", "64M", "--kek", "vault:vms")
	goldilocks(t, dir, "volume", "create", "vo2", "--size", "8M", "--kek", "vault:vms")
	g := startGateway(t, dir)

	// A workload on one long connection: write, read back, compare, for
	// 12 seconds.
	script := `
import os, time
deadline = time.time() + 12
i = 0
while time.time() < deadline:
    off = (i * 65536) % (64 << 20)
    buf = bytes([i % 251]) * 65536
    h.pwrite(buf, off)
    if i % 16 == 0:
        h.flush()
    assert h.pread(65536, off) == buf, "mismatch at %d" % off
    i += 1
print("ops", i)
`
	work := exec.Command("nbdsh", "-u", g.uri("vo"), "-c", script)
	work.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	var wout strings.Builder
	work.Stdout, work.Stderr = &wout, &wout
	if err := work.Start(); err != nil {
		t.Fatal(err)
	}
	// Vault goes only once the workload is attached (its key unwrapped):
	// on a busy machine nbdsh can take longer than any fixed wait.
	waitLog(t, g, "msg=attached", 1)
	time.Sleep(500 * time.Millisecond)
	v.Stop()
	out, err := runErr("qemu-img", "info", g.uri("vo2"))
	if err == nil {
		t.Fatalf("attach with Vault down succeeded: %s", out)
	}
	t.Logf("attach with Vault down: %s", out)
	if !strings.Contains(strings.ToLower(out), "vault") {
		t.Errorf("the refused attach does not name Vault: %s", out)
	}
	if !strings.Contains(g.logText(), "event=vault_unreachable") {
		t.Error("no vault_unreachable event in the gateway log")
	}
	v.Restart()
	run(t, "qemu-img", "info", g.uri("vo2"))
	if !strings.Contains(g.logText(), "event=vault_back") {
		t.Error("no vault_back event in the gateway log")
	}
	if err := work.Wait(); err != nil {
		t.Fatalf("the workload failed during the outage: %v\n%s", err, wout.String())
	}
	if !strings.Contains(wout.String(), "ops ") {
		t.Fatalf("workload: %s", wout.String())
	}
}
