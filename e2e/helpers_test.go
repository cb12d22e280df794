package e2e

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// The integration tests start the real goldilocks binary and drive it with
// real NBD clients: qemu-img, qemu-io, nbdinfo, nbdsh, nbdcopy.

var goldilocksBin string

func TestMain(m *testing.M) {
	goldilocksBin = os.Getenv("GOLDILOCKS_BIN")
	cleanup := func() {}
	if goldilocksBin == "" {
		dir, err := os.MkdirTemp("", "goldilocks-bin")
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		cleanup = func() { os.RemoveAll(dir) }
		goldilocksBin = filepath.Join(dir, "goldilocks")
		cmd := exec.Command("go", "build", "-o", goldilocksBin, "goldilocks/cmd/goldilocks")
		cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
		if err := cmd.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "building goldilocks:", err)
			os.Exit(1)
		}
	}
	code := m.Run()
	cleanup()
	os.Exit(code)
}

// need skips the test when a peer tool is missing, except in CI, which
// installs them all and must never skip.
func need(t *testing.T, tools ...string) {
	t.Helper()
	for _, tool := range tools {
		if tool == "nbdsh" {
			if exec.Command("/usr/bin/python3", "-c", "import nbd").Run() != nil {
				missing(t, "nbdsh (python3-libnbd)")
			}
			continue
		}
		if _, err := exec.LookPath(tool); err != nil {
			missing(t, tool)
		}
	}
}

func missing(t *testing.T, tool string) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf("%s is not installed; CI must install it (make deps)", tool)
	}
	t.Skipf("%s is not installed (apt-get install qemu-utils libnbd-bin python3-libnbd nbdkit fio, or make deps)", tool)
}

// gw is a running gateway process.
type gw struct {
	t       *testing.T
	dataDir string
	addr    string // host:port
	sock    string
	cmd     *exec.Cmd
	logMu   sync.Mutex
	log     bytes.Buffer
	exited  chan struct{}
	exitErr error
}

// goldilocks runs the CLI against dataDir and returns stdout.
func goldilocks(t *testing.T, dataDir string, args ...string) string {
	t.Helper()
	out, err := runGoldilocks(dataDir, args...)
	if err != nil {
		t.Fatalf("goldilocks %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return out
}

func runGoldilocks(dataDir string, args ...string) (string, error) {
	cmd := exec.Command(goldilocksBin, append(args, "--data-dir", dataDir)...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		return stdout.String() + stderr.String(), err
	}
	return stdout.String(), nil
}

var listenRE = regexp.MustCompile(`msg=listening addr=(\S+) network=(tcp|unix)`)

// startGateway starts `goldilocks serve` on a free loopback port and its
// Unix socket, with the volumes of dataDir.
func startGateway(t *testing.T, dataDir string, extra ...string) *gw {
	t.Helper()
	return startGatewayBin(t, goldilocksBin, dataDir, extra...)
}

// startGatewayBin is startGateway with the binary at bin.
func startGatewayBin(t *testing.T, bin, dataDir string, extra ...string) *gw {
	t.Helper()
	g := &gw{t: t, dataDir: dataDir, exited: make(chan struct{})}
	args := append([]string{"serve", "--data-dir", dataDir, "--listen", "127.0.0.1:0", "--metrics", ""}, extra...)
	g.cmd = exec.Command(bin, args...)
	stderr, err := g.cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := g.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	found := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		var tcp, unix bool
		for sc.Scan() {
			line := sc.Text()
			g.logMu.Lock()
			g.log.WriteString(line + "\n")
			if m := listenRE.FindStringSubmatch(line); m != nil && !(tcp && unix) { // (a gateway upgraded in place says it again)
				if m[2] == "tcp" {
					g.addr, tcp = m[1], true
				} else {
					g.sock, unix = m[1], true
				}
				if tcp && unix {
					close(found)
				}
			}
			g.logMu.Unlock()
		}
		g.exitErr = g.cmd.Wait()
		close(g.exited)
	}()
	t.Cleanup(func() {
		g.cmd.Process.Kill()
		<-g.exited
		if t.Failed() {
			t.Logf("gateway log:\n%s", g.logText())
		}
		if strings.Contains(g.logText(), "panic") {
			t.Errorf("gateway panicked:\n%s", g.logText())
		}
	})
	select {
	case <-found:
	case <-g.exited:
		t.Fatalf("gateway exited at start: %v\n%s", g.exitErr, g.logText())
	case <-time.After(10 * time.Second):
		t.Fatalf("gateway did not start listening\n%s", g.logText())
	}
	return g
}

func (g *gw) logText() string {
	g.logMu.Lock()
	defer g.logMu.Unlock()
	return g.log.String()
}

// uri returns the TCP NBD URI of an export.
func (g *gw) uri(export string) string { return "nbd://" + g.addr + "/" + export }

// unixURI returns the Unix-socket NBD URI of an export.
func (g *gw) unixURI(export string) string {
	return "nbd+unix:///" + export + "?socket=" + g.sock
}

// stop sends sig and waits for the exit.
func (g *gw) stop(sig syscall.Signal) error {
	g.cmd.Process.Signal(sig)
	select {
	case <-g.exited:
		return g.exitErr
	case <-time.After(30 * time.Second):
		g.t.Fatalf("gateway did not stop on %v", sig)
		return nil
	}
}

// run runs a client tool with a deadline and returns its combined output.
func run(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := runErr(name, args...)
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return out
}

func runErr(name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, name, args...)
	// nbdsh is `python3 -mnbd`: it needs Debian's python3, not a pyenv one.
	cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// newDataDir returns a data dir holding the named plain volumes.
func newDataDir(t *testing.T, vols ...string) string {
	t.Helper()
	dir := t.TempDir()
	for _, v := range vols {
		name, size, _ := strings.Cut(v, ":")
		args := []string{"volume", "create", name, "--size", size, "--plain"}
		if strings.HasSuffix(name, "-ro") {
			args = append(args, "--read-only")
		}
		goldilocks(t, dir, args...)
	}
	return dir
}

// randomFile writes n random bytes to a new file.
func randomFile(t *testing.T, n int64) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "random.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := io.CopyN(f, newPRNG(uint64(n)), n); err != nil {
		t.Fatal(err)
	}
	return p
}

// prng is a fast deterministic byte stream (xorshift), so tests do not
// depend on crypto/rand throughput.
type prng struct{ s uint64 }

func newPRNG(seed uint64) *prng { return &prng{s: seed*0x9e3779b97f4a7c15 | 1} }

func (p *prng) Read(b []byte) (int, error) {
	for i := range b {
		if i%8 == 0 {
			p.s ^= p.s << 13
			p.s ^= p.s >> 7
			p.s ^= p.s << 17
		}
		b[i] = byte(p.s >> (8 * (i % 8)))
	}
	return len(b), nil
}

func filesEqual(t *testing.T, a, b string) {
	t.Helper()
	out, err := runErr("cmp", a, b)
	if err != nil {
		t.Fatalf("cmp %s %s: %v %s", a, b, err, out)
	}
}
