package e2e

import (
	"bytes"
	"compress/gzip"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// A real guest: Debian's kernel (from the linux-image-amd64 package) with
// a busybox initramfs boots under QEMU (TCG: no KVM here) with its virtio
// disk on an encrypted Goldilocks volume over NBD with TLS and a client
// certificate the policy names. The first boot writes files with
// checksums on ext4, syncs and powers off; the gateway restarts; a second
// boot checks every checksum; no plaintext is in the backing store. Then
// a guest writing in a loop is killed (QEMU SIGKILL): the filesystem then
// mounts in a new boot (its journal replayed) and `e2fsck -fn` of the
// exported volume finds it clean.
func TestGuestOnEncryptedVolume(t *testing.T) {
	need(t, "qemu-system-x86_64", "busybox", "apt-get", "dpkg", "mkfs.ext4", "e2fsck")
	kit := guestKit(t)
	p := newPKI(t)
	dir := t.TempDir()
	ext4Volume(t, dir, "vm-a-disk")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, tlsPolicy+"  - identity: vm-a\n    volumes: [\"vm-a-*\"]\n    access: read-write\n")
	flags := append(p.serverFlags(), "--policy", pol, "--tls-required")
	g := startGateway(t, dir, flags...)

	boot := func(mode string, kill time.Duration) string {
		t.Helper()
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer cancel()
		host, port, _ := strings.Cut(g.addr, ":")
		cmd := exec.CommandContext(ctx, "qemu-system-x86_64", "-machine", "q35,accel=tcg", "-cpu", "max", "-m", "512",
			"-nographic", "-no-reboot", "-kernel", filepath.Join(kit, "kernel"), "-initrd", filepath.Join(kit, "initrd.gz"),
			"-append", "console=ttyS0 quiet panic=-1 gl="+mode,
			"-object", "tls-creds-x509,id=tls0,dir="+p.clients["vm-a"]+",endpoint=client",
			"-blockdev", "driver=nbd,node-name=n0,server.type=inet,server.host="+host+",server.port="+port+",export=vm-a-disk,tls-creds=tls0",
			"-device", "virtio-blk-pci,drive=n0")
		var out lockedBuffer // read while QEMU writes it
		cmd.Stdout, cmd.Stderr = &out, &out
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		if kill > 0 {
			for deadline := time.Now().Add(2 * time.Minute); !strings.Contains(out.String(), "GL-LOOP-START"); time.Sleep(100 * time.Millisecond) {
				if time.Now().After(deadline) {
					cmd.Process.Kill()
					cmd.Wait()
					t.Fatalf("the guest did not start writing:\n%s", out.String())
				}
			}
			time.Sleep(kill)
			cmd.Process.Signal(syscall.SIGKILL)
		}
		cmd.Wait()
		return out.String()
	}

	t0 := time.Now()
	if out := boot("write", 0); !strings.Contains(out, "GL-WRITE-DONE") {
		t.Fatalf("first boot did not write its files:\n%s\ngateway:\n%s", out, g.logText())
	}
	t.Logf("boot 1 (write files, sync, power off): %v", time.Since(t0).Round(time.Second))
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	g = startGateway(t, dir, flags...)
	t0 = time.Now()
	if out := boot("verify", 0); !strings.Contains(out, "GL-VERIFY-OK") {
		t.Fatalf("second boot: checksums do not match:\n%s", out)
	}
	t.Logf("boot 2 (after a gateway restart, every checksum matches): %v", time.Since(t0).Round(time.Second))
	store, _ := os.ReadFile(filepath.Join(dir, "volumes", "vm-a-disk.img"))
	if len(store) == 0 || bytes.Contains(store, []byte("GOLDILOCKS-GUEST-PLAINTEXT-MARKER")) {
		t.Fatalf("the backing store (%d bytes) holds the guest's plaintext", len(store))
	}

	// A guest killed mid-write; then a boot that mounts (journal replay)
	// and a check of the exported filesystem.
	boot("loop", 4*time.Second)
	if out := boot("mount", 0); !strings.Contains(out, "GL-MOUNT-OK") {
		t.Fatalf("after the guest was killed mid-write, its filesystem does not mount:\n%s", out)
	}
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	back := filepath.Join(t.TempDir(), "back.raw")
	goldilocks(t, dir, "volume", "export", "vm-a-disk", "--to", back)
	if out, err := runErr("e2fsck", "-fn", back); err != nil {
		t.Fatalf("e2fsck of the volume after the killed guest: %v\n%s", err, out)
	}
}

// ext4Volume makes an encrypted 64 MiB volume holding an empty ext4
// file system (label "guest") for a guest to mount.
func ext4Volume(t *testing.T, dir, name string) {
	t.Helper()
	raw := filepath.Join(t.TempDir(), "fs.raw")
	if err := os.WriteFile(raw, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	os.Truncate(raw, 64<<20)
	run(t, "mkfs.ext4", "-q", "-F", "-L", "guest", raw)
	goldilocks(t, dir, "volume", "create", name, "--size", "64M")
	goldilocks(t, dir, "volume", "import", name, "--from", raw)
}

// guestKit builds (once, cached in ~/.cache/goldilocks) Debian's kernel
// and an initramfs: busybox, the virtio and ext4 modules, and an init
// that does what the kernel command line's gl= says (write, verify, loop,
// mount, rounds) and prints the outcome on the serial console.
func guestKit(t *testing.T) string {
	t.Helper()
	out, err := exec.Command("apt-cache", "depends", "linux-image-amd64").Output()
	if err != nil {
		t.Fatalf("apt-cache depends linux-image-amd64: %v", err)
	}
	var pkg string
	for _, l := range strings.Split(string(out), "\n") {
		if f := strings.Fields(l); len(f) == 2 && f[0] == "Depends:" && strings.HasPrefix(f[1], "linux-image-") {
			pkg = f[1]
			break
		}
	}
	if pkg == "" {
		t.Fatalf("no kernel package in: %s", out)
	}
	home, _ := os.UserHomeDir()
	kit := filepath.Join(home, ".cache", "goldilocks", "guest-"+pkg+"-2") // -2: the init knows gl=rounds
	if _, err := os.Stat(filepath.Join(kit, "initrd.gz")); err == nil {
		return kit
	}
	work := t.TempDir()
	dl := exec.Command("apt-get", "download", pkg)
	dl.Dir = work
	if out, err := dl.CombinedOutput(); err != nil {
		t.Fatalf("apt-get download %s: %v\n%s", pkg, err, out)
	}
	debs, _ := filepath.Glob(filepath.Join(work, "*.deb"))
	if len(debs) != 1 {
		t.Fatalf("apt-get download %s: %v", pkg, debs)
	}
	x := filepath.Join(work, "x")
	run(t, "dpkg", "-x", debs[0], x)
	kernels, _ := filepath.Glob(filepath.Join(x, "boot", "vmlinuz-*"))
	if len(kernels) != 1 {
		t.Fatalf("no kernel in %s", debs[0])
	}
	files := map[string][]byte{}
	bb, err := os.ReadFile("/bin/busybox")
	if err != nil {
		t.Fatal(err)
	}
	files["bin/busybox"] = bb
	files["init"] = []byte(guestInit)
	for _, m := range guestModules {
		found, _ := exec.Command("find", filepath.Join(x, "lib", "modules"), "-name", m+".ko").Output()
		path := strings.TrimSpace(string(found))
		b, err := os.ReadFile(path)
		if err != nil || path == "" {
			t.Fatalf("module %s not in %s", m, pkg)
		}
		files["lib/modules/"+m+".ko"] = b
	}
	var cpio bytes.Buffer
	writeCPIO(&cpio, files, []string{"bin", "dev", "lib", "lib/modules", "mnt", "proc", "sys"})
	var gz bytes.Buffer
	zw := gzip.NewWriter(&gz)
	zw.Write(cpio.Bytes())
	zw.Close()
	tmp := kit + ".tmp"
	os.RemoveAll(tmp)
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		t.Fatal(err)
	}
	kb, _ := os.ReadFile(kernels[0])
	if err := os.WriteFile(filepath.Join(tmp, "kernel"), kb, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "initrd.gz"), gz.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	os.RemoveAll(kit)
	if err := os.Rename(tmp, kit); err != nil {
		t.Fatal(err)
	}
	return kit
}

// guestModules, in load order (PEERS.md).
var guestModules = []string{"virtio_ring", "virtio", "virtio_pci_modern_dev", "virtio_pci_legacy_dev", "virtio_pci", "virtio_blk",
	"crc16", "mbcache", "jbd2", "crc32c_generic", "ext4"}

const guestInit = `#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in virtio_ring virtio virtio_pci_modern_dev virtio_pci_legacy_dev virtio_pci virtio_blk crc16 mbcache jbd2 crc32c_generic ext4; do
	insmod /lib/modules/$m.ko
done
mode=$(sed -n 's/.*gl=\([a-z]*\).*/\1/p' /proc/cmdline)
i=0
while [ ! -b /dev/vda ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i+1)); done
if ! mount -t ext4 /dev/vda /mnt; then echo GL-FAIL-MOUNT; poweroff -f; fi
case $mode in
write)
	for i in 1 2 3 4 5 6 7 8; do
		dd if=/dev/urandom of=/mnt/f$i bs=64k count=$((i*4)) 2>/dev/null
		echo "GOLDILOCKS-GUEST-PLAINTEXT-MARKER-$i" >> /mnt/f$i
	done
	(cd /mnt && sha256sum f* > SUMS)
	sync
	umount /mnt && echo GL-WRITE-DONE
	;;
verify)
	if (cd /mnt && sha256sum -c SUMS); then echo GL-VERIFY-OK; else echo GL-VERIFY-FAIL; fi
	umount /mnt
	;;
loop)
	echo GL-LOOP-START
	i=0
	while true; do
		dd if=/dev/urandom of=/mnt/loop$((i % 16)) bs=64k count=8 2>/dev/null
		i=$((i+1))
		[ $((i % 4)) = 0 ] && sync
	done
	;;
mount)
	ls /mnt > /dev/null && umount /mnt && echo GL-MOUNT-OK
	;;
rounds)
	# Write, sync, drop the page cache, read back and check: 40 s of
	# rounds, each named on the console.
	echo GL-LOOP-START
	end=$(( $(date +%s) + 40 )); i=0; ok=1
	while [ $(date +%s) -lt $end ]; do
		dd if=/dev/urandom of=/rr bs=64k count=4 2>/dev/null
		cp /rr /mnt/r$((i % 8)) && sync && echo 3 > /proc/sys/vm/drop_caches
		if ! cmp -s /rr /mnt/r$((i % 8)); then echo GL-ROUND-FAIL $i; ok=0; break; fi
		echo GL-ROUND $i
		i=$((i+1))
	done
	umount /mnt || ok=0
	[ $ok = 1 ] && echo GL-ROUNDS-OK $i
	;;
esac
poweroff -f
`

// writeCPIO writes an initramfs: dirs, then files (mode 0755), in the
// "newc" format the kernel unpacks.
func writeCPIO(w *bytes.Buffer, files map[string][]byte, dirs []string) {
	ino := 1
	entry := func(name string, mode int, data []byte) {
		fmt.Fprintf(w, "070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X", ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name)+1, 0)
		ino++
		w.WriteString(name)
		w.WriteByte(0)
		for w.Len()%4 != 0 {
			w.WriteByte(0)
		}
		w.Write(data)
		for w.Len()%4 != 0 {
			w.WriteByte(0)
		}
	}
	for _, d := range dirs {
		entry(d, 0o040755, nil)
	}
	for name, data := range files {
		entry(name, 0o100755, data)
	}
	entry("TRAILER!!!", 0, nil)
}

// lockedBuffer is a bytes.Buffer that one goroutine may read while
// another writes (a child process's output, watched as it comes).
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
