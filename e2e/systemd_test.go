package e2e

import (
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Running under a service manager, as systemd would run the gateway:
// readiness and stopping on NOTIFY_SOCKET (read here by the test, as
// systemd reads it), the watchdog, socket activation through
// systemd-socket-activate, the PID file, the data dir lock, who may reach
// the Unix socket, and the unit files under systemd-analyze verify.

// syncBuffer collects a child's output while the test reads it.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// notifySocket listens where a service manager would (NOTIFY_SOCKET) and
// returns its path and the messages sent to it.
func notifySocket(t *testing.T) (string, <-chan string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify.sock")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	msgs := make(chan string, 64)
	go func() {
		b := make([]byte, 4096)
		for {
			n, err := c.Read(b)
			if err != nil {
				close(msgs)
				return
			}
			msgs <- string(b[:n])
		}
	}()
	return path, msgs
}

// waitMsg waits for a notification containing want and returns it.
func waitMsg(t *testing.T, msgs <-chan string, want string) string {
	t.Helper()
	deadline := time.After(15 * time.Second)
	for {
		select {
		case m, ok := <-msgs:
			if !ok {
				t.Fatalf("notify socket closed before %q", want)
			}
			if strings.Contains(m, want) {
				return m
			}
		case <-deadline:
			t.Fatalf("no %q on NOTIFY_SOCKET within 15 s", want)
		}
	}
}

func TestNotifyReadyWatchdogPIDFile(t *testing.T) {
	need(t, "qemu-img")
	dir := newDataDir(t, "sd:8M")
	nsock, msgs := notifySocket(t)
	pidFile := filepath.Join(t.TempDir(), "goldilocks.pid")
	sock := filepath.Join(t.TempDir(), "nbd.sock")
	cmd := exec.Command(goldilocksBin, "serve", "--data-dir", dir, "--listen", "", "--unix", sock, "--metrics", "", "--pid-file", pidFile)
	cmd.Env = append(os.Environ(), "NOTIFY_SOCKET="+nsock, "WATCHDOG_USEC=400000")
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("gateway log:\n%s", log.String())
		}
	}()
	m := waitMsg(t, msgs, "READY=1")
	// READY=1 means a volume can be attached now, without a retry.
	out := run(t, "qemu-img", "info", "--output=json", "nbd+unix:///sd?socket="+sock)
	if !strings.Contains(out, `"virtual-size": 8388608`) {
		t.Fatalf("attach right after READY=1:\n%s", out)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil || strings.TrimSpace(string(b)) != strconv.Itoa(cmd.Process.Pid) {
		t.Fatalf("pid file holds %q (%v), want %d", b, err, cmd.Process.Pid)
	}
	t.Logf("ready message: %q", m)
	waitMsg(t, msgs, "WATCHDOG=1") // every 200 ms (half of WATCHDOG_USEC)
	cmd.Process.Signal(syscall.SIGTERM)
	waitMsg(t, msgs, "STOPPING=1")
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	if _, err := os.Stat(pidFile); !os.IsNotExist(err) {
		t.Errorf("pid file left behind at exit: %v", err)
	}
}

func TestSocketActivation(t *testing.T) {
	need(t, "systemd-socket-activate", "qemu-img", "nbdinfo")
	dir := newDataDir(t, "act:8M")
	nsock, msgs := notifySocket(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	sock := filepath.Join(t.TempDir(), "activated.sock")
	// systemd-socket-activate listens, and on the first connection starts
	// the gateway with both sockets as LISTEN_FDS (as a .socket unit does).
	cmd := exec.Command("systemd-socket-activate", "-l", addr, "-l", sock,
		"-E", "NOTIFY_SOCKET="+nsock,
		goldilocksBin, "serve", "--data-dir", dir, "--metrics", "", "--listen", "127.0.0.1:1", "--unix", "none")
	var log syncBuffer
	cmd.Stderr = &log
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	defer func() {
		cmd.Process.Kill()
		if t.Failed() {
			t.Logf("log:\n%s", log.String())
		}
	}()
	deadline := time.Now().Add(10 * time.Second)
	for { // the activator's sockets exist once it runs
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("systemd-socket-activate did not create its socket")
		}
		time.Sleep(20 * time.Millisecond)
	}
	out := run(t, "qemu-img", "info", "--output=json", "nbd://"+addr+"/act")
	if !strings.Contains(out, `"virtual-size": 8388608`) {
		t.Fatalf("qemu-img over the activated TCP socket:\n%s", out)
	}
	waitMsg(t, msgs, "READY=1")
	if out := run(t, "nbdinfo", "--size", "nbd+unix:///act?socket="+sock); strings.TrimSpace(out) != "8388608" {
		t.Fatalf("nbdinfo over the activated Unix socket: %q", out)
	}
	if !strings.Contains(log.String(), "socket activation") {
		t.Error("the log does not say that the listeners came from socket activation")
	}
	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("exit after SIGTERM: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("no exit after SIGTERM")
	}
	// The socket belongs to the service manager: the gateway leaves it.
	if _, err := os.Stat(sock); err != nil {
		t.Errorf("the activated socket was removed by the gateway: %v", err)
	}
}

func TestSecondServeRefused(t *testing.T) {
	need(t, "qemu-img")
	dir := newDataDir(t, "one:8M")
	g := startGateway(t, dir)
	out, err := runGoldilocks(dir, "serve", "--listen", "127.0.0.1:0", "--metrics", "")
	if err == nil {
		t.Fatal("a second serve on the same data dir started")
	}
	want := "already served by another goldilocks serve (pid " + strconv.Itoa(g.cmd.Process.Pid) + ")"
	if !strings.Contains(out, want) {
		t.Fatalf("second serve: want %q in:\n%s", want, out)
	}
	// The first gateway's sockets are untouched.
	run(t, "qemu-img", "info", g.unixURI("one"))
	run(t, "qemu-img", "info", g.uri("one"))
}

func TestUnixSocketGroup(t *testing.T) {
	need(t, "qemu-io", "setpriv")
	dir := newDataDir(t, "g-disk:8M")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, `
identities:
  - name: qemu
    unix: {uid: 4301}
rules:
  - identity: qemu
    volumes: ["g-*"]
    access: read-write
`)
	// A socket directory that others can search (as /run/goldilocks is).
	sockDir := t.TempDir()
	os.Chmod(filepath.Dir(sockDir), 0o755)
	os.Chmod(sockDir, 0o755)
	sock := filepath.Join(sockDir, "run", "nbd.sock") // run/ is created
	g := startGateway(t, dir, "--policy", pol, "--unix", sock, "--unix-group", "4300")
	st, err := os.Stat(sock)
	if err != nil {
		t.Fatal(err)
	}
	if st.Mode().Perm() != 0o660 || st.Sys().(*syscall.Stat_t).Gid != 4300 {
		t.Fatalf("socket mode %v gid %d, want 0660 and 4300", st.Mode().Perm(), st.Sys().(*syscall.Stat_t).Gid)
	}
	as := func(uid, gid string, cmd ...string) (string, error) {
		args := append([]string{"--reuid=" + uid, "--regid=" + uid, "--groups=" + gid}, cmd...)
		return runErr("setpriv", args...)
	}
	// libvirt's QEMU: a non-root uid in the socket's group, named by the policy.
	if out, err := as("4301", "4300", "qemu-io", "-f", "raw", "-c", "write -P 0x21 0 4k", "-c", "read -P 0x21 0 4k", g.unixURI("g-disk")); err != nil {
		t.Fatalf("uid 4301 in group 4300: %v\n%s", err, out)
	}
	// Not in the group: the socket's mode keeps it out.
	out, err := as("4301", "4399", "qemu-io", "-f", "raw", "-c", "read 0 4k", g.unixURI("g-disk"))
	if err == nil || !strings.Contains(out, "ermission denied") {
		t.Fatalf("uid 4301 outside the group: %v\n%s", err, out)
	}
	// In the group but not named by the policy: SO_PEERCRED and the policy refuse.
	out, err = as("4302", "4300", "qemu-io", "-f", "raw", "-c", "read 0 4k", g.unixURI("g-disk"))
	if err == nil || !strings.Contains(out, "no rule grants") {
		t.Fatalf("uid 4302 in the group, not in the policy: %v\n%s", err, out)
	}
}

func TestDemoVolumeOnlyWithFlag(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "data")
	g := startGateway(t, dir)
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if out := goldilocks(t, dir, "volume", "list", "--json"); strings.Contains(out, "demo") {
		t.Fatalf("serve without --demo created a volume:\n%s", out)
	}
	if !strings.Contains(g.logText(), "no volume yet") {
		t.Errorf("the banner does not say how to create a volume:\n%s", g.logText())
	}
	g = startGateway(t, dir, "--demo")
	run(t, "qemu-img", "info", g.uri("demo"))
}

// TestUnitFilesVerify checks contrib/systemd with systemd-analyze verify,
// its ExecStart pointed at the binary under test (verify wants it to exist).
func TestUnitFilesVerify(t *testing.T) {
	need(t, "systemd-analyze")
	dir := t.TempDir()
	for _, name := range []string{"goldilocks.service", "goldilocks.socket"} {
		b, err := os.ReadFile(filepath.Join("..", "contrib", "systemd", name))
		if err != nil {
			t.Fatal(err)
		}
		text := strings.ReplaceAll(string(b), "/usr/local/bin/goldilocks", goldilocksBin)
		write(t, filepath.Join(dir, name), []byte(text))
	}
	cmd := exec.Command("systemd-analyze", "verify", "--man=no", "--generators=no",
		filepath.Join(dir, "goldilocks.service"), filepath.Join(dir, "goldilocks.socket"))
	cmd.Env = append(os.Environ(), "SYSTEMD_LOG_LEVEL=notice")
	out, err := cmd.CombinedOutput()
	if err != nil || len(strings.TrimSpace(string(out))) > 0 {
		t.Fatalf("systemd-analyze verify: %v\n%s", err, out)
	}
	// The hardening the unit promises is there.
	b, _ := os.ReadFile(filepath.Join(dir, "goldilocks.service"))
	for _, opt := range []string{"Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes", "CapabilityBoundingSet=", "ReadWritePaths=/var/lib/goldilocks", "WatchdogSec="} {
		if !strings.Contains(string(b), opt) {
			t.Errorf("goldilocks.service lacks %s", opt)
		}
	}
}

// The start banner's commands work as printed with the configuration the
// gateway runs with: plain, and TLS-only (with the client's certificate
// directory put in); with --log-format json every stderr line is JSON and
// the banner is one of them, and nothing goes to stdout.
func TestStartBannerCommandsWork(t *testing.T) {
	need(t, "qemu-img")
	banner := func(log string) []string {
		var cmds []string
		for _, l := range strings.Split(log, "\n") {
			if l = strings.TrimSpace(l); strings.HasPrefix(l, "qemu-img info ") {
				cmds = append(cmds, l)
			}
		}
		return cmds
	}
	dir := newDataDir(t, "bn:8M")
	g := startGateway(t, dir)
	waitLog(t, g, "Stop with Ctrl-C", 1)
	cmds := banner(g.logText())
	if len(cmds) != 1 {
		t.Fatalf("banner qemu-img commands: %q", cmds)
	}
	if out, err := runErr("sh", "-c", cmds[0]); err != nil {
		t.Fatalf("%s: %v\n%s", cmds[0], err, out)
	}
	g.stop(syscall.SIGTERM)

	p := newPKI(t)
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, tlsPolicy)
	tdir := newDataDir(t, "a-root:8M")
	g = startGateway(t, tdir, append(p.serverFlags(), "--policy", pol, "--tls-required")...)
	waitLog(t, g, "Stop with Ctrl-C", 1)
	cmds = banner(g.logText())
	if len(cmds) != 1 || !strings.Contains(cmds[0], "tls-creds") {
		t.Fatalf("TLS banner qemu-img commands: %q", cmds)
	}
	cmd := strings.ReplaceAll(cmds[0], "CLIENT_CERT_DIR", p.clients["vm-a"])
	if out, err := runErr("sh", "-c", cmd); err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	g.stop(syscall.SIGTERM)

	c := exec.Command(goldilocksBin, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0", "--metrics", "", "--log-format", "json")
	var stdout, stderr syncBuffer
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !strings.Contains(stderr.String(), `"msg":"serving"`) && time.Now().Before(deadline) {
		time.Sleep(50 * time.Millisecond)
	}
	c.Process.Signal(syscall.SIGTERM)
	c.Wait()
	if stdout.String() != "" {
		t.Errorf("stdout in --log-format json: %q", stdout.String())
	}
	var found bool
	for _, l := range strings.Split(strings.TrimSpace(stderr.String()), "\n") {
		var rec map[string]any
		if err := json.Unmarshal([]byte(l), &rec); err != nil {
			t.Errorf("a stderr line is not JSON: %q", l)
			continue
		}
		if rec["msg"] == "serving" {
			found = true
			if cmds, _ := rec["attach_with"].([]any); len(cmds) == 0 {
				t.Errorf("the banner record has no commands: %q", l)
			}
		}
	}
	if !found {
		t.Errorf("no banner record in --log-format json:\n%s", stderr.String())
	}
}
