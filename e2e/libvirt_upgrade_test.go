package e2e

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"
)

// A TCG guest booted by a real libvirt 9.0 (libvirtd started here, as
// ../shared/LIBVIRT.md describes: no systemd, QEMU as root, stdio to
// files) with a plain libvirt NBD network disk on the gateway's Unix
// socket (libvirt 9.0 cannot set reconnect-delay: a closed connection is
// an I/O error in the guest) on an encrypted volume. The guest writes,
// syncs, drops its page cache and reads back files for 40 s while the
// gateway is upgraded three times: no I/O error, every file intact.
func TestLibvirtGuestAcrossUpgrades(t *testing.T) {
	need(t, "libvirtd", "virsh", "qemu-system-x86_64", "busybox", "apt-get", "dpkg", "mkfs.ext4")
	kit := guestKit(t)
	virsh := startLibvirtd(t)
	dir := t.TempDir()
	ext4Volume(t, dir, "vm")
	g, pidFile := startUpgradable(t, dir, copyBinary(t))

	console := filepath.Join(t.TempDir(), "console.log")
	name := fmt.Sprintf("gl-upgrade-%d", os.Getpid())
	xml := fmt.Sprintf(`<domain type='qemu'><name>%s</name><memory unit='MiB'>512</memory><vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><kernel>%s</kernel><initrd>%s</initrd>
    <cmdline>console=ttyS0 quiet panic=-1 gl=rounds</cmdline></os>
  <features><acpi/><apic/></features><cpu mode='maximum'/>
  <on_poweroff>destroy</on_poweroff><on_reboot>destroy</on_reboot><on_crash>destroy</on_crash>
  <devices>
    <disk type='network' device='disk'><driver name='qemu' type='raw' cache='none'/>
      <source protocol='nbd' name='vm'><host transport='unix' socket='%s'/></source>
      <target dev='vda' bus='virtio'/></disk>
    <serial type='file'><source path='%s'/><target port='0'/></serial>
    <console type='pty'><target type='serial' port='0'/></console><memballoon model='none'/>
  </devices></domain>
`, name, filepath.Join(kit, "kernel"), filepath.Join(kit, "initrd.gz"), g.sock, console)
	dom := filepath.Join(t.TempDir(), "dom.xml")
	write(t, dom, []byte(xml))
	if out, err := virsh("create", dom); err != nil {
		t.Fatalf("virsh create: %v\n%s", err, out)
	}
	t.Cleanup(func() { virsh("destroy", name) })
	out := func() string { b, _ := os.ReadFile(console); return string(b) }
	rounds := func() int { return strings.Count(out(), "GL-ROUND ") }
	waitRounds := func(n int) {
		t.Helper()
		want := rounds() + n
		for deadline := time.Now().Add(2 * time.Minute); rounds() < want; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) || strings.Contains(out(), "GL-ROUND-FAIL") {
				t.Fatalf("the guest made no progress:\n%s\ngateway:\n%s", out(), g.logText())
			}
		}
	}
	waitRounds(2)
	pid := readPID(t, pidFile)
	for i := range 3 {
		pid = upgrade(t, g, pidFile, pid)
		waitRounds(2)
		t.Logf("upgrade %d under the libvirt guest: pid %d, %d rounds so far", i+1, pid, rounds())
	}
	// The domain ends itself (on_poweroff destroy) after its 40 s.
	for deadline := time.Now().Add(3 * time.Minute); ; time.Sleep(200 * time.Millisecond) {
		if o, err := virsh("domstate", name); err != nil || !strings.Contains(o, "running") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the guest did not finish:\n%s", out())
		}
	}
	c := out()
	for _, bad := range []string{"I/O error", "GL-ROUND-FAIL", "EXT4-fs error", "Buffer I/O"} {
		if strings.Contains(c, bad) {
			t.Fatalf("the guest saw %q across the upgrades:\n%s", bad, c)
		}
	}
	if !strings.Contains(c, "GL-ROUNDS-OK") {
		t.Fatalf("the guest did not end its rounds cleanly:\n%s", c)
	}
	t.Logf("libvirt guest: %d rounds of write, sync, drop caches, read back, across 3 upgrades", rounds())
}

// startLibvirtd starts libvirtd as ../shared/LIBVIRT.md describes (the
// libvirt-qemu account Debian's build expects, qemu.conf with QEMU as
// root and stdio to files) and returns a virsh runner for it; cleanup
// stops it.
func startLibvirtd(t *testing.T) func(args ...string) (string, error) {
	t.Helper()
	if exec.Command("getent", "group", "libvirt-qemu").Run() != nil {
		run(t, "groupadd", "-r", "libvirt-qemu")
	}
	if exec.Command("getent", "passwd", "libvirt-qemu").Run() != nil {
		run(t, "useradd", "-r", "-g", "libvirt-qemu", "-d", "/var/lib/libvirt", "-M", "-s", "/usr/sbin/nologin", "libvirt-qemu")
	}
	// Read only from here, only at daemon start.
	const qemuConf = "user = \"root\"\ngroup = \"root\"\nstdio_handler = \"file\"\n"
	if b, err := os.ReadFile("/etc/libvirt/qemu.conf"); string(b) != qemuConf {
		write(t, "/etc/libvirt/qemu.conf", []byte(qemuConf))
		t.Cleanup(func() { // put the machine's own back
			if err == nil {
				os.WriteFile("/etc/libvirt/qemu.conf", b, 0o600)
			} else {
				os.Remove("/etc/libvirt/qemu.conf")
			}
		})
	}
	work := t.TempDir()
	conf := filepath.Join(work, "libvirtd.conf")
	write(t, conf, []byte(fmt.Sprintf("log_outputs = \"3:file:%s\"\n", filepath.Join(work, "libvirtd.log"))))
	pidFile := filepath.Join(work, "libvirtd.pid")
	cmd := exec.Command("libvirtd", "--config", conf, "--pid-file", pidFile)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	virsh := func(args ...string) (string, error) {
		return runErr("virsh", append([]string{"-q", "-c", "qemu:///system"}, args...)...)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-exited:
		case <-time.After(20 * time.Second):
			cmd.Process.Kill()
			<-exited
		}
		cg, _ := filepath.Glob("/sys/fs/cgroup/*/machine") // made by libvirt (cgroup v1)
		for _, d := range cg {
			os.Remove(d)
		}
		if t.Failed() {
			b, _ := os.ReadFile(filepath.Join(work, "libvirtd.log"))
			if len(b) > 4000 {
				b = b[len(b)-4000:]
			}
			t.Logf("libvirtd log (tail):\n%s", b)
		}
	})
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if _, err := virsh("version"); err == nil {
			return virsh
		}
		select {
		case <-exited:
			t.Fatalf("libvirtd exited at start")
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("libvirtd did not answer within 60 s")
		}
	}
}
