package e2e

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"syscall"
	"testing"
	"time"

	"goldilocks/crypto"
)

// Encrypted volumes through the real binary and real clients.

func newEncryptedDataDir(t *testing.T, vols ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, v := range vols {
		name, size, _ := strings.Cut(v, ":")
		goldilocks(t, dir, "volume", "create", name, "--size", size)
	}
	return dir
}

func TestEncryptedRoundTrip(t *testing.T) {
	need(t, "nbdcopy", "qemu-io")
	dir := newEncryptedDataDir(t, "enc:64M")
	g := startGateway(t, dir)
	src := randomFile(t, 64<<20)
	run(t, "nbdcopy", src, g.uri("enc"))
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "nbdcopy", g.unixURI("enc"), out)
	filesEqual(t, src, out)
	res := run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x3c 4095 8193", "-c", "read -P 0x3c 4095 8193",
		"-c", "write -z 65536 131072", "-c", "read -P 0 65536 131072", g.uri("enc"))
	if strings.Contains(res, "failed") {
		t.Fatal(res)
	}
}

// slotArea returns the backing file's bytes and the offset of its slots.
func slotArea(t *testing.T, path string, size uint64) ([]byte, int) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b, int(crypto.LayoutFor(size).DataBase * crypto.ChunkSize)
}

// usedSlots lists the offsets of the slots that hold something.
func usedSlots(b []byte, from int) []int {
	var offs []int
	zero := make([]byte, crypto.ChunkSize)
	for o := from; o+crypto.ChunkSize <= len(b); o += crypto.ChunkSize {
		if !bytes.Equal(b[o:o+crypto.ChunkSize], zero) {
			offs = append(offs, o)
		}
	}
	return offs
}

func TestEncryptedNoPlaintextAndTamper(t *testing.T) {
	need(t, "nbdsh")
	const size = 16 << 20
	dir := newEncryptedDataDir(t, "a:16M", "b:16M")
	g := startGateway(t, dir)
	secret := "GOLDILOCKS-SECRET-" + strings.Repeat("x", 46) // 64 bytes
	write := `h.pwrite(b"` + secret + `" * 64, 0)
h.pwrite(b"` + strings.ToUpper(secret[:8]) + `" * 512, 4096)
h.flush()
print("written")`
	for _, v := range []string{"a", "b"} {
		if out := nbdsh(t, g.uri(v), write); !strings.Contains(out, "written") {
			t.Fatal(out)
		}
	}
	pathA := filepath.Join(dir, "volumes", "a.img")
	pathB := filepath.Join(dir, "volumes", "b.img")
	a, slots := slotArea(t, pathA, size)
	if bytes.Contains(a, []byte("GOLDILOCKS-SECRET")) {
		t.Fatal("the backing file holds plaintext")
	}
	used := usedSlots(a, slots)
	if len(used) != 2 {
		t.Fatalf("%d slots in use after writing 2 chunks", len(used))
	}
	read := `
import errno
def check(off, want_ok):
    try:
        h.pread(4096, off)
        ok = True
    except nbd.Error as e:
        assert e.errno == "EIO", e
        ok = False
    print("chunk", off // 4096, "ok" if ok else "EIO")
check(0, True); check(4096, True); check(8192, True)
`
	tamper := func(name string, fn func(a, b []byte)) {
		t.Helper()
		orig, _ := os.ReadFile(pathA)
		other, _ := os.ReadFile(pathB)
		bad := bytes.Clone(orig)
		fn(bad, other)
		os.WriteFile(pathA, bad, 0o600)
		out := nbdsh(t, g.uri("a"), read)
		os.WriteFile(pathA, orig, 0o600)
		// The untouched, unmapped chunk 2 always serves.
		if !strings.Contains(out, "chunk 2 ok") {
			t.Fatalf("%s: chunk 2 did not serve: %s", name, out)
		}
		if !strings.Contains(out, "EIO") {
			t.Fatalf("%s went undetected: %s", name, out)
		}
	}
	tamper("a flipped bit in a slot", func(a, _ []byte) { a[used[0]+1234] ^= 0x04 })
	tamper("two chunks swapped", func(a, _ []byte) {
		x := bytes.Clone(a[used[0] : used[0]+4096])
		copy(a[used[0]:], a[used[1]:used[1]+4096])
		copy(a[used[1]:], x)
	})
	tamper("a chunk copied from another volume", func(a, b []byte) {
		bs := usedSlots(b, slots)
		copy(a[used[0]:used[0]+4096], b[bs[0]:bs[0]+4096])
		copy(a[used[1]:used[1]+4096], b[bs[1]:bs[1]+4096])
	})
	if !strings.Contains(g.logText(), "integrity failure") || !strings.Contains(g.logText(), "volume=a chunk=") {
		t.Fatalf("integrity failures not logged with volume and chunk:\n%s", g.logText())
	}
	// ...and on the audit trail, with the chunk.
	if out := goldilocks(t, dir, "audit", "export", "--volume", "a"); !strings.Contains(out, `"type":"integrity_failure","identity":"","volume":"a"`) || !strings.Contains(out, `"chunk":`) {
		t.Fatalf("no integrity_failure record for volume a on the audit trail:\n%s", out)
	}
	// Untampered again, everything reads.
	if out := nbdsh(t, g.uri("a"), read); strings.Contains(out, "EIO") {
		t.Fatalf("after restoring: %s", out)
	}
}

func TestEncryptedFlushedWritesSurviveKill9(t *testing.T) {
	need(t, "qemu-io")
	dir := newEncryptedDataDir(t, "enc:8M")
	g := startGateway(t, dir)
	// qemu-io flushes before it exits; the gateway is then killed outright.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x6b 12288 1M", "-c", "flush", g.uri("enc"))
	g.cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-g.exited:
	case <-time.After(10 * time.Second):
		t.Fatal("gateway did not die")
	}
	g2 := startGateway(t, dir)
	out := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x6b 12288 1M", "-c", "read -P 0 0 12288", g2.uri("enc"))
	if strings.Contains(out, "failed") {
		t.Fatalf("flushed write lost after kill -9: %s", out)
	}
}

func TestImportExportShred(t *testing.T) {
	need(t, "qemu-io")
	dir := t.TempDir()
	src := randomFile(t, 24<<20+12345) // not a multiple of 4 KiB
	f, _ := os.OpenFile(src, os.O_WRONLY|os.O_APPEND, 0)
	f.Write(make([]byte, 3<<20)) // a zero tail stays sparse
	f.Close()
	if out, err := runGoldilocks(dir, "volume", "import", "img", "--from", src); err != nil || out != "" {
		t.Fatalf("import: %v, stdout %q (quiet when piped)", err, out)
	}
	out := filepath.Join(t.TempDir(), "out.raw")
	goldilocks(t, dir, "volume", "export", "img", "--to", out)
	// The export is the image padded to whole 4 KiB chunks with zeros.
	want, _ := os.ReadFile(src)
	got, _ := os.ReadFile(out)
	if len(got) != (len(want)+4095)&^4095 || !bytes.Equal(got[:len(want)], want) || !bytes.Equal(got[len(want):], make([]byte, len(got)-len(want))) {
		t.Fatalf("export differs from the imported image (%d vs %d bytes)", len(got), len(want))
	}
	// While a gateway has it attached, export refuses rather than race it.
	g := startGateway(t, dir)
	idle := exec.Command("qemu-io", "-f", "raw", "-c", "sleep 3000", g.uri("img"))
	if err := idle.Start(); err != nil {
		t.Fatal(err)
	}
	defer idle.Process.Kill()
	attached := regexp.MustCompile(`msg=attached .*volume=img `)
	for deadline := time.Now().Add(10 * time.Second); !attached.MatchString(g.logText()); {
		if time.Now().After(deadline) {
			t.Fatalf("qemu-io did not attach:\n%s", g.logText())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if msg, err := runGoldilocks(dir, "volume", "export", "img", "--to", out); err == nil || !strings.Contains(msg, "in use") {
		t.Fatalf("export of an attached volume: %v %s", err, msg)
	}
	idle.Process.Kill()
	idle.Wait()
	// The gateway releases the volume once it has seen the client go.
	for deadline := time.Now().Add(10 * time.Second); strings.Count(g.logText(), "msg=attached") != strings.Count(g.logText(), "msg=detached"); {
		if time.Now().After(deadline) {
			t.Fatalf("the gateway never saw qemu-io go:\n%s", g.logText())
		}
		time.Sleep(20 * time.Millisecond)
	}
	backing := filepath.Join(dir, "volumes", "img.img")
	goldilocks(t, dir, "volume", "shred", "img", "--yes")
	if _, err := runGoldilocks(dir, "volume", "info", "img"); err == nil {
		t.Fatal("a shredded volume is still listed")
	}
	if _, err := os.Stat(backing); !os.IsNotExist(err) {
		t.Fatalf("backing file left after shred: %v", err)
	}
	// A volume on a backing store outside the data dir keeps its bytes
	// after a shred, but its key is gone: neither header copy parses.
	ext := filepath.Join(t.TempDir(), "ext.img")
	os.WriteFile(ext, nil, 0o600)
	os.Truncate(ext, 16<<20)
	goldilocks(t, dir, "volume", "create", "ext", "--size", "4M", "--backing", ext)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", g.uri("ext"))
	// The gateway closes the volume just after its last client leaves.
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out, err := runGoldilocks(dir, "volume", "shred", "ext", "--yes")
		if err == nil {
			break
		}
		if !strings.Contains(out, "in use") || time.Now().After(deadline) {
			t.Fatalf("shred: %v %s", err, out)
		}
	}
	b, _ := os.ReadFile(ext)
	for c := 0; c < 2; c++ {
		if _, err := crypto.ParseHeader(b[c*crypto.HeaderBlockSize : (c+1)*crypto.HeaderBlockSize]); err == nil {
			t.Fatalf("header copy %d survived the shred", c)
		}
	}
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 4k", g.uri("ext")); err == nil && !strings.Contains(out, "error") && !strings.Contains(out, "fail") {
		t.Fatalf("a shredded volume still serves: %s", out)
	}
}

// The storage tier rolls a volume back with nothing but cp: the whole
// backing file to a copy taken after an earlier detach, or single 4 KiB
// blocks of it. The gateway must never serve the old data as good: the
// attach is refused, or the reads that would be stale fail with EIO.
func TestEncryptedRollbackWithCp(t *testing.T) {
	need(t, "qemu-io")
	dir := newEncryptedDataDir(t, "enc:8M")
	g := startGateway(t, dir)
	backing := filepath.Join(dir, "volumes", "enc.img")
	// detached waits until the gateway has closed the volume (it lets go
	// of the backing file's lock after its clean detach).
	detached := func(int) {
		t.Helper()
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
			f, err := os.Open(backing)
			if err != nil {
				t.Fatal(err)
			}
			err = syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB)
			f.Close()
			if err == nil {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the gateway did not detach:\n%s", g.logText())
			}
		}
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "write -P 0x11 4M 64k", "-c", "flush", g.uri("enc"))
	detached(1)
	old, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 0 1M", "-c", "write -P 0x22 4M 64k", "-c", "flush", g.uri("enc"))
	detached(2)
	cur, _ := os.ReadFile(backing)
	// read checks that every byte reads as the new data or fails.
	read := func(what string) (failed bool) {
		out, err := runErr("qemu-io", "-f", "raw", "-c", "read -P 0x22 0 1M", "-c", "read -P 0x22 4M 64k", g.uri("enc"))
		if strings.Contains(out, "Pattern verification failed") {
			t.Fatalf("%s: stale data served as good:\n%s", what, out)
		}
		return err != nil || strings.Contains(out, "error") || strings.Contains(out, "failed")
	}
	os.WriteFile(backing, old, 0o600)
	if !read("whole file rolled back") {
		t.Fatal("whole file rolled back: the attach and the reads succeeded")
	}
	if !strings.Contains(g.logText(), "rollback anchor") {
		t.Fatalf("no rollback named in the log:\n%s", g.logText())
	}
	// Every block that differs, one at a time (a sample of the data).
	var diff []int
	for o := 0; o < len(cur); o += 4096 {
		if !bytes.Equal(cur[o:o+4096], old[o:o+4096]) {
			diff = append(diff, o)
		}
	}
	if len(diff) < 10 {
		t.Fatalf("only %d blocks differ between the two copies", len(diff))
	}
	data := int(crypto.LayoutFor(8<<20).DataBase * crypto.ChunkSize)
	tried, caught := 0, 0
	for i, o := range diff {
		if o >= data && i%8 != 0 { // every metadata block, one data block in 8
			continue
		}
		bad := bytes.Clone(cur)
		copy(bad[o:o+4096], old[o:o+4096])
		os.WriteFile(backing, bad, 0o600)
		tried++
		if read(fmt.Sprintf("block at %d rolled back", o)) {
			caught++
		}
	}
	os.WriteFile(backing, cur, 0o600)
	if read("restored") {
		t.Fatal("the untouched newest copy does not read back")
	}
	t.Logf("%d of %d blocks differ; %d tried one at a time, %d caught (the others did not change what reads return)", len(diff), len(cur)/4096, tried, caught)
	if out := goldilocks(t, dir, "audit", "export", "--volume", "enc"); !strings.Contains(out, `"type":"integrity_failure"`) {
		t.Fatalf("no integrity_failure on the audit trail:\n%s", out)
	}
}
