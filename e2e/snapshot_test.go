package e2e

import (
	"bufio"
	"bytes"
	"encoding/binary"
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

// TestSnapshotUnderLoad takes a snapshot of an encrypted volume while a
// qemu-io client writes one half of it and an nbdsh client the other,
// one 64 KiB block at a time, each write flushed and logged with its
// start and end time. The snapshot export, read with nbdcopy, must hold
// every block as it was when create began (writes acknowledged before it
// are in, writes begun after it returned are not; one racing it may be
// either), and read the same after more writes, a restart and a kill -9.
// Then the changed-block context: nbdinfo and qemu-img (QEMU's nbd driver
// reading it as its dirty bitmap) must show exactly the ranges written
// since a second snapshot. Delete frees the export; the audit trail has
// both operations.
func TestSnapshotUnderLoad(t *testing.T) {
	need(t, "qemu-io", "nbdsh", "nbdcopy", "nbdinfo", "qemu-img")
	const size = 64 << 20
	const half = size / 2
	const blk = 64 << 10
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "vm", "--size", "64MiB")
	g := startGateway(t, dir)
	initial := randomFile(t, size)
	run(t, "nbdcopy", initial, g.uri("vm"))

	// The logged writer: block b of the first half gets its write number
	// i (8 bytes, repeated); a line "i b start end" (ns) per write.
	logPath := filepath.Join(t.TempDir(), "writes.log")
	writer := exec.Command("nbdsh", "-u", g.unixURI("vm"), "-c", fmt.Sprintf(`
import time
log = open(%q, "w")
print("ready", flush=True)
deadline = time.time() + 8
i = 1
while time.time() < deadline:
    b = (i * 7919) %% %d
    s = time.time_ns()
    h.pwrite(i.to_bytes(8, "little") * %d, b * %d)
    h.flush()
    log.write("%%d %%d %%d %%d\n" %% (i, b, s, time.time_ns()))
    i += 1
log.close()
print("wrote", i - 1)
`, logPath, half/blk, blk/8, blk))
	writer.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	var wout bytes.Buffer
	writer.Stdout, writer.Stderr = &wout, &wout
	if err := writer.Start(); err != nil {
		t.Fatal(err)
	}
	// Background load on the second half: qemu-io random writes.
	load := exec.Command("qemu-io", "-f", "raw", "-c", fmt.Sprintf("aio_write -P 0x5a %d 4M", half), "-c", "aio_flush",
		"-c", fmt.Sprintf("write -P 0x6b %d 8M", half+(8<<20)), "-c", "flush", "-c", fmt.Sprintf("write -P 0x7c %d 1M", half+(20<<20)), g.uri("vm"))
	var lout bytes.Buffer
	load.Stdout, load.Stderr = &lout, &lout
	time.Sleep(2 * time.Second) // the writer is well under way
	if err := load.Start(); err != nil {
		t.Fatal(err)
	}
	t0 := time.Now().UnixNano()
	out := goldilocks(t, dir, "volume", "snapshot", "create", "vm@s1")
	t1 := time.Now().UnixNano()
	if strings.TrimSpace(out) != "vm@s1" {
		t.Fatalf("snapshot create printed %q", out)
	}
	if err := load.Wait(); err != nil {
		t.Fatalf("qemu-io during the snapshot: %v\n%s", err, lout.String())
	}
	if err := writer.Wait(); err != nil {
		t.Fatalf("nbdsh writer: %v\n%s", err, wout.String())
	}
	snap := filepath.Join(t.TempDir(), "s1.raw")
	run(t, "nbdcopy", g.uri("vm@s1"), snap)

	// Legal contents of each block of the first half.
	init, err := os.ReadFile(initial)
	if err != nil {
		t.Fatal(err)
	}
	type w struct{ i, b, s, e int64 }
	var writes []w
	f, err := os.Open(logPath)
	if err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		var x w
		if _, err := fmt.Sscan(sc.Text(), &x.i, &x.b, &x.s, &x.e); err != nil {
			t.Fatal(err)
		}
		writes = append(writes, x)
	}
	f.Close()
	got, err := os.ReadFile(snap)
	if err != nil {
		t.Fatal(err)
	}
	racing, before := 0, 0
	for b := int64(0); b < half/blk; b++ {
		legal := map[uint64]bool{}
		var last uint64 // 0: the initial data
		for _, x := range writes {
			switch {
			case x.b != b:
			case x.e < t0:
				last = uint64(x.i)
			case x.s <= t1:
				legal[uint64(x.i)] = true
				racing++
			}
		}
		legal[last] = true
		if last != 0 {
			before++
		}
		blockData := got[b*blk : (b+1)*blk]
		v := binary.LittleEndian.Uint64(blockData)
		if bytes.Equal(blockData, init[b*blk:(b+1)*blk]) {
			v = 0
		} else if !bytes.Equal(blockData, bytes.Repeat(blockData[:8], blk/8)) {
			t.Fatalf("snapshot block %d holds neither the initial data nor one write", b)
		}
		if !legal[v] {
			t.Fatalf("snapshot block %d holds write %d; legal: last before create %d, racing %v", b, v, last, legal)
		}
	}
	t.Logf("%d logged writes; %d blocks written before the create, %d writes raced it", len(writes), before, racing)
	if before < 10 {
		t.Fatalf("only %d blocks were written before the snapshot: the check proves little", before)
	}

	// Writes after the snapshot do not reach it.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 16M", "-c", fmt.Sprintf("write -z %d 4M", half), g.uri("vm"))
	again := filepath.Join(t.TempDir(), "s1b.raw")
	run(t, "nbdcopy", g.uri("vm@s1"), again)
	filesEqual(t, snap, again)
	// The snapshot export is read-only.
	if out, err := runErr("qemu-io", "-f", "raw", "-c", "write -P 1 0 4k", g.uri("vm@s1")); err == nil && !strings.Contains(out, "failed") {
		t.Fatalf("a write to the snapshot export succeeded:\n%s", out)
	}

	// A graceful restart, then a kill -9: the snapshot reads the same.
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g = startGateway(t, dir)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x22 4M 4M", "-c", "flush", g.uri("vm"))
	g.stop(syscall.SIGKILL)
	g = startGateway(t, dir)
	run(t, "nbdcopy", g.uri("vm@s1"), again)
	filesEqual(t, snap, again)

	// Changed-block tracking since a second snapshot.
	goldilocks(t, dir, "volume", "snapshot", "create", "vm@s2")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x33 1M 64k", "-c", "write -P 0x33 40M 1M", "-c", "write -z 50M 64k", g.uri("vm"))
	m := run(t, "nbdinfo", "--map=goldilocks:changed:s2", g.uri("vm"))
	wantDirty := [][2]int64{{1 << 20, 64 << 10}, {40 << 20, 1 << 20}, {50 << 20, 64 << 10}}
	checkDirty(t, "nbdinfo --map=goldilocks:changed:s2", parseNbdinfoMap(t, m), wantDirty, size)
	m = run(t, "nbdinfo", "--map=qemu:dirty-bitmap:s2", g.uri("vm"))
	checkDirty(t, "nbdinfo --map=qemu:dirty-bitmap:s2", parseNbdinfoMap(t, m), wantDirty, size)
	// QEMU's nbd driver reads the context as its dirty bitmap: bit 0
	// (dirty) comes out as a hole, "data": false (qemu-img map).
	host, port, _ := strings.Cut(g.addr, ":")
	js := run(t, "qemu-img", "map", "--output=json", "--image-opts",
		"driver=nbd,server.type=inet,server.host="+host+",server.port="+port+",export=vm,x-dirty-bitmap=qemu:dirty-bitmap:s2")
	var ext []struct {
		Start  int64 `json:"start"`
		Length int64 `json:"length"`
		Data   bool  `json:"data"`
	}
	if err := json.Unmarshal([]byte(js), &ext); err != nil {
		t.Fatalf("qemu-img map: %v\n%s", err, js)
	}
	var dirty []extent
	for _, e := range ext {
		dirty = append(dirty, extent{e.Start, e.Length, !e.Data})
	}
	checkDirty(t, "qemu-img map x-dirty-bitmap", dirty, wantDirty, size)
	// The old snapshot sees those as changed too, and more.
	m = run(t, "nbdinfo", "--map=goldilocks:changed:s1", g.uri("vm"))
	if ex := parseNbdinfoMap(t, m); len(ex) < 3 {
		t.Fatalf("changed since s1: %v", ex)
	}

	// A key rotation rewraps the snapshots' data keys with the volume's,
	// online; key status lists them.
	goldilocks(t, dir, "key", "rotate", "--all", "--min-version", "2")
	var st []struct {
		Volume  string `json:"volume"`
		Version int    `json:"version"`
	}
	if err := json.Unmarshal([]byte(goldilocks(t, dir, "key", "status", "--json")), &st); err != nil {
		t.Fatal(err)
	}
	if len(st) != 3 {
		t.Fatalf("key status: %+v, want vm, vm@s1, vm@s2", st)
	}
	for _, s := range st {
		if s.Version < 2 {
			t.Fatalf("key status after the rotation: %+v", st)
		}
	}
	if err := g.stop(syscall.SIGTERM); err != nil { // the stores open under their new wrapping
		t.Fatal(err)
	}
	g = startGateway(t, dir)

	list := goldilocks(t, dir, "volume", "snapshot", "list", "vm")
	if !strings.Contains(list, "vm@s1") || !strings.Contains(list, "vm@s2") {
		t.Fatalf("snapshot list:\n%s", list)
	}
	goldilocks(t, dir, "volume", "snapshot", "delete", "vm@s1")
	if out, err := runErr("nbdinfo", g.uri("vm@s1")); err == nil {
		t.Fatalf("deleted snapshot still served:\n%s", out)
	}
	// s2 still reads as the volume did when it was taken: its view of
	// the bytes written since is the one before.
	s2 := filepath.Join(t.TempDir(), "s2.raw")
	run(t, "nbdcopy", g.uri("vm@s2"), s2)
	b2, err := os.ReadFile(s2)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b2[4<<20:8<<20], bytes.Repeat([]byte{0x22}, 4<<20)) || bytes.Contains(b2[1<<20:(1<<20)+(64<<10)], []byte{0x33}) {
		t.Fatal("snapshot s2 does not hold the volume as it was when taken")
	}
	matches, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*.img"))
	if len(matches) != 1 {
		t.Fatalf("snapshot stores left: %v, want one (s2)", matches)
	}
	audit := goldilocks(t, dir, "audit", "export", "--volume", "vm")
	if strings.Count(audit, `"type":"snapshot_create"`) != 2 || strings.Count(audit, `"type":"snapshot_delete"`) != 1 {
		t.Fatalf("audit trail lacks the snapshot records:\n%s", audit)
	}
}

type extent struct {
	off, length int64
	dirty       bool
}

// parseNbdinfoMap reads `nbdinfo --map` lines: offset, length, type.
func parseNbdinfoMap(t *testing.T, out string) []extent {
	t.Helper()
	var ex []extent
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		f := strings.Fields(l)
		if len(f) < 3 {
			t.Fatalf("nbdinfo --map line %q", l)
		}
		var e extent
		fmt.Sscan(f[0], &e.off)
		fmt.Sscan(f[1], &e.length)
		e.dirty = f[2] == "1"
		ex = append(ex, e)
	}
	return ex
}

// checkDirty compares extents with the dirty ranges want, covering size.
func checkDirty(t *testing.T, what string, got []extent, want [][2]int64, size int64) {
	t.Helper()
	var off int64
	var dirty [][2]int64
	for _, e := range got {
		if e.off != off {
			t.Fatalf("%s: extent at %d, want %d: %v", what, e.off, off, got)
		}
		if e.dirty {
			if n := len(dirty); n > 0 && dirty[n-1][0]+dirty[n-1][1] == e.off {
				dirty[n-1][1] += e.length
			} else {
				dirty = append(dirty, [2]int64{e.off, e.length})
			}
		}
		off += e.length
	}
	if off != size || fmt.Sprint(dirty) != fmt.Sprint(want) {
		t.Fatalf("%s: dirty %v (covering %d bytes), want %v (of %d)", what, dirty, off, want, size)
	}
}

// TestBackupChain: a full backup and three incrementals of a volume
// written between snapshots, made through the running gateway, restore
// into a new volume that reads exactly as the last snapshot; each
// incremental is a fraction of the full one; a tampered, truncated or
// misordered chain is refused and leaves no volume behind.
func TestBackupChain(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "vm", "--size", "64MiB")
	g := startGateway(t, dir)
	run(t, "nbdcopy", randomFile(t, 32<<20), g.uri("vm")) // half data, half never written
	bdir := t.TempDir()
	files := []string{filepath.Join(bdir, "full.glb")}
	goldilocks(t, dir, "volume", "snapshot", "create", "vm@b0")
	goldilocks(t, dir, "volume", "backup", "vm@b0", "--to", files[0])
	for i := 1; i <= 3; i++ {
		run(t, "qemu-io", "-f", "raw", "-c", fmt.Sprintf("write -P %d %dM 512k", 0x40+i, 3*i),
			"-c", fmt.Sprintf("write -z %dM 256k", 10+i), "-c", fmt.Sprintf("write -P %d %dM 64k", 0x50+i, 40+i), g.uri("vm"))
		snap := fmt.Sprintf("b%d", i)
		goldilocks(t, dir, "volume", "snapshot", "create", "vm@"+snap)
		f := filepath.Join(bdir, snap+".glb")
		goldilocks(t, dir, "volume", "backup", "vm@"+snap, "--since", fmt.Sprintf("b%d", i-1), "--to", f)
		files = append(files, f)
	}
	last := filepath.Join(t.TempDir(), "b3.raw")
	run(t, "nbdcopy", g.uri("vm@b3"), last)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", g.uri("vm")) // after the chain: not in it

	full, _ := os.Stat(files[0])
	for _, f := range files[1:] {
		st, _ := os.Stat(f)
		t.Logf("%s: %d bytes (full: %d)", filepath.Base(f), st.Size(), full.Size())
		if st.Size()*20 > full.Size() {
			t.Fatalf("incremental %s is %d bytes, the full one %d: not incremental", f, st.Size(), full.Size())
		}
	}
	args := []string{"volume", "restore", "r"}
	for _, f := range files {
		args = append(args, "--from", f)
	}
	goldilocks(t, dir, args...)
	restored := filepath.Join(t.TempDir(), "r.raw")
	run(t, "nbdcopy", g.uri("r"), restored)
	filesEqual(t, last, restored)

	// Damage: a flipped byte in the middle of an incremental, one cut
	// short, and a chain with a link missing.
	bad := filepath.Join(bdir, "bad.glb")
	b, err := os.ReadFile(files[2])
	if err != nil {
		t.Fatal(err)
	}
	flipped := bytes.Clone(b)
	flipped[len(b)/2] ^= 1
	cut := b[:len(b)-100]
	for _, tc := range []struct {
		name  string
		data  []byte
		chain []string
		want  string
	}{
		{"tampered", flipped, []string{files[0], files[1], bad}, "tampered"},
		{"truncated", cut, []string{files[0], files[1], bad}, "tampered"},
		{"gap", nil, []string{files[0], files[2]}, "chain"},
		{"no full", nil, []string{files[1]}, "chain"},
	} {
		if tc.data != nil {
			if err := os.WriteFile(bad, tc.data, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		args := []string{"volume", "restore", "r2"}
		for _, f := range tc.chain {
			args = append(args, "--from", f)
		}
		out, err := runGoldilocks(dir, args...)
		if err == nil || !strings.Contains(out, tc.want) {
			t.Fatalf("%s: restore %v, want an error saying %q:\n%s", tc.name, err, tc.want, out)
		}
		if list := goldilocks(t, dir, "volume", "list"); strings.Contains(list, "r2") {
			t.Fatalf("%s: a failed restore left volume r2:\n%s", tc.name, list)
		}
	}
	// A backup outlives its volume: with the volume and its snapshots
	// deleted (its keys destroyed), the chain still restores.
	for i := 0; i <= 3; i++ {
		goldilocks(t, dir, "volume", "snapshot", "delete", fmt.Sprintf("vm@b%d", i))
	}
	if err := g.stop(syscall.SIGTERM); err != nil { // vm must not be attached for its delete
		t.Fatal(err)
	}
	goldilocks(t, dir, "volume", "delete", "vm", "--yes")
	args[2] = "r3"
	goldilocks(t, dir, args...)
	g = startGateway(t, dir)
	run(t, "nbdcopy", g.uri("r3"), restored)
	filesEqual(t, last, restored)
	if m, _ := filepath.Glob(filepath.Join(dir, "snapshots", "*")); len(m) != 0 {
		t.Fatalf("snapshot stores left after every snapshot was deleted: %v", m)
	}

	audit := goldilocks(t, dir, "audit", "export")
	if strings.Count(audit, `"type":"volume_backup"`) < 4 || !strings.Contains(audit, `"type":"volume_restore"`) {
		t.Fatalf("audit trail lacks backup and restore records:\n%s", audit)
	}
}

// TestClone: a clone of a snapshot, made while the gateway serves its
// volume, reads as the snapshot (nbdcopy, cmp), takes writes that neither
// the snapshot nor the volume see, survives a restart, and keeps its base
// snapshot from being deleted until it is gone.
func TestClone(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "src", "--size", "16MiB")
	g := startGateway(t, dir)
	run(t, "nbdcopy", randomFile(t, 16<<20), g.uri("src"))
	goldilocks(t, dir, "volume", "snapshot", "create", "src@gold")
	snap := filepath.Join(t.TempDir(), "gold.raw")
	run(t, "nbdcopy", g.uri("src@gold"), snap)
	out := goldilocks(t, dir, "volume", "clone", "src@gold", "vm2")
	if !strings.Contains(out, "clone of src@gold") {
		t.Fatalf("volume clone printed %q", out)
	}
	got := filepath.Join(t.TempDir(), "vm2.raw")
	run(t, "nbdcopy", g.uri("vm2"), got)
	filesEqual(t, snap, got)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 1M 100k", "-c", "write -z 5M 1M", g.uri("vm2"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x62 8M 64k", g.uri("src"))
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g = startGateway(t, dir)
	res := run(t, "qemu-io", "-f", "raw", "-c", "read -P 0x61 1M 100k", "-c", "read -P 0 5M 1M", g.uri("vm2"))
	if strings.Contains(res, "Pattern verification failed") {
		t.Fatalf("the clone lost its writes:\n%s", res)
	}
	run(t, "nbdcopy", g.uri("vm2"), got)
	a, _ := os.ReadFile(snap)
	b, _ := os.ReadFile(got)
	if !bytes.Equal(a[8<<20:], b[8<<20:]) || !bytes.Equal(a[:1<<20], b[:1<<20]) {
		t.Fatal("the clone's unwritten ranges do not read as the snapshot")
	}
	run(t, "nbdcopy", g.uri("src@gold"), got)
	filesEqual(t, snap, got) // the snapshot saw neither write
	if out, err := runGoldilocks(dir, "volume", "snapshot", "delete", "src@gold"); err == nil || !strings.Contains(out, "vm2") {
		t.Fatalf("deleting a clone's base: %v\n%s", err, out)
	}
	if info := goldilocks(t, dir, "volume", "info", "vm2"); !strings.Contains(info, "clone of:") {
		t.Fatalf("volume info of a clone:\n%s", info)
	}
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	goldilocks(t, dir, "volume", "delete", "vm2", "--yes")
	goldilocks(t, dir, "volume", "snapshot", "delete", "src@gold")
}

// TestSnapshotsWithVault: the same operations on a volume whose key is in
// a real Vault's Transit engine: the snapshot stores', the backup
// stream's and the clone's data keys are wrapped there; the chain
// restores in a data dir that has never seen the volume (same Vault); a
// rotation with min_decryption_version raised leaves the snapshots and
// the clone readable (key rotate rewrapped their keys).
func TestSnapshotsWithVault(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "vv", "--size", "16M", "--kek", "vault:snaps")
	g := startGateway(t, dir)
	run(t, "nbdcopy", randomFile(t, 16<<20), g.uri("vv"))
	goldilocks(t, dir, "volume", "snapshot", "create", "vv@a")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x71 2M 1M", g.uri("vv"))
	goldilocks(t, dir, "volume", "snapshot", "create", "vv@b")
	snapA := filepath.Join(t.TempDir(), "a.raw")
	run(t, "nbdcopy", g.uri("vv@a"), snapA)
	bdir := t.TempDir()
	full, incr := filepath.Join(bdir, "a.glb"), filepath.Join(bdir, "b.glb")
	goldilocks(t, dir, "volume", "backup", "vv@a", "--to", full)
	goldilocks(t, dir, "volume", "backup", "vv@b", "--since", "a", "--to", incr)
	goldilocks(t, dir, "volume", "clone", "vv@a", "vc")
	snapB := filepath.Join(t.TempDir(), "b.raw")
	run(t, "nbdcopy", g.uri("vv@b"), snapB)

	other := t.TempDir() // another data dir, the same Vault
	goldilocks(t, other, "volume", "restore", "r", "--from", full, "--from", incr)
	g2 := startGateway(t, other)
	got := filepath.Join(t.TempDir(), "got.raw")
	run(t, "nbdcopy", g2.uri("r"), got)
	filesEqual(t, snapB, got)

	goldilocks(t, dir, "key", "rotate", "vault:snaps", "--min-version", "2")
	if _, err := v.Client().Logical().Write("transit/keys/snaps/config", map[string]any{"min_decryption_version": 2}); err != nil {
		t.Fatal(err)
	}
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g = startGateway(t, dir)
	run(t, "nbdcopy", g.uri("vv@a"), got)
	filesEqual(t, snapA, got)
	run(t, "nbdcopy", g.uri("vc"), got)
	filesEqual(t, snapA, got)
}
