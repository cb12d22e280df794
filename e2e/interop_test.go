package e2e

import (
	"encoding/json"
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

func TestQemuImgInfoConvertCompare(t *testing.T) {
	need(t, "qemu-img")
	dir := newDataDir(t, "disk:64M")
	g := startGateway(t, dir)

	info := run(t, "qemu-img", "info", "--output=json", g.uri("disk"))
	var ii struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	if err := json.Unmarshal([]byte(info), &ii); err != nil {
		t.Fatalf("qemu-img info: %v\n%s", err, info)
	}
	if ii.VirtualSize != 64<<20 {
		t.Fatalf("virtual size %d, want %d", ii.VirtualSize, 64<<20)
	}

	src := randomFile(t, 64<<20)
	run(t, "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", src, g.uri("disk"))
	run(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, g.uri("disk"))
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", g.unixURI("disk"), out)
	filesEqual(t, src, out)
	// The backing file holds the bytes (plain volume).
	filesEqual(t, src, filepath.Join(dir, "volumes", "disk.img"))

	// A changed byte makes compare fail: the check can fail.
	f, _ := os.OpenFile(src, os.O_WRONLY, 0)
	f.WriteAt([]byte{0xff, 0x00, 0xff}, 12345)
	f.Close()
	if _, err := runErr("qemu-img", "compare", "-f", "raw", "-F", "raw", src, g.uri("disk")); err == nil {
		t.Fatal("qemu-img compare found no difference after a byte changed")
	}
}

func TestQemuIoUnalignedAndBursts(t *testing.T) {
	need(t, "qemu-io")
	dir := newDataDir(t, "disk:16M")
	g := startGateway(t, dir)
	// Unaligned offsets and sizes, each checked by a read of the pattern,
	// and the bytes around it left alone.
	cases := []struct{ off, len int }{
		{0, 1}, {1, 511}, {513, 4095}, {4095, 2}, {8191, 65537}, {1<<20 - 3, 1<<20 + 7}, {16<<20 - 5, 5},
	}
	for i, c := range cases {
		pat := 0x11 + i
		out := run(t, "qemu-io", "-f", "raw",
			"-c", fmt.Sprintf("write -P %#x %d %d", pat, c.off, c.len),
			"-c", fmt.Sprintf("read -P %#x %d %d", pat, c.off, c.len),
			g.uri("disk"))
		if strings.Contains(out, "Pattern verification failed") || strings.Contains(out, "error") {
			t.Fatalf("case %d: %s", i, out)
		}
	}
	// A wrong pattern is reported: the check can fail.
	out, _ := runErr("qemu-io", "-f", "raw", "-c", "read -P 0x77 1 511", g.uri("disk"))
	if !strings.Contains(out, "Pattern verification failed") {
		t.Fatalf("qemu-io did not notice a wrong pattern: %s", out)
	}

	// A burst of 64 asynchronous writes (QEMU keeps many in flight on one
	// connection), then each read back over the Unix socket.
	var w, r []string
	for i := 0; i < 64; i++ {
		w = append(w, "-c", fmt.Sprintf("aio_write -P %#x %d 12k", i+1, 2<<20+i*12288))
		r = append(r, "-c", fmt.Sprintf("read -P %#x %d 12k", i+1, 2<<20+i*12288))
	}
	w = append(w, "-c", "aio_flush")
	run(t, "qemu-io", append(append([]string{"-f", "raw"}, w...), g.uri("disk"))...)
	out = run(t, "qemu-io", append(append([]string{"-f", "raw"}, r...), g.unixURI("disk"))...)
	if strings.Contains(out, "failed") {
		t.Fatalf("read back after burst: %s", out)
	}

	// Zeroing and discard through qemu-io.
	out = run(t, "qemu-io", "-f", "raw",
		"-c", "write -P 0x33 0 1M", "-c", "write -z 4096 8192", "-c", "read -P 0 4096 8192",
		"-c", "write -z -u 65536 65536", "-c", "read -P 0 65536 65536",
		"-c", "discard 131072 131072", "-c", "read -P 0x33 0 4096", g.uri("disk"))
	if strings.Contains(out, "failed") || strings.Contains(out, "error") {
		t.Fatalf("zero/discard: %s", out)
	}
}

func TestNbdinfoJSON(t *testing.T) {
	need(t, "nbdinfo")
	dir := newDataDir(t, "disk:10M", "disk-ro:4M")
	g := startGateway(t, dir)
	var doc struct {
		Structured bool `json:"structured"`
		Exports    []map[string]any
	}
	out := run(t, "nbdinfo", "--json", g.uri("disk"))
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	if !doc.Structured || len(doc.Exports) != 1 {
		t.Fatalf("nbdinfo: %s", out)
	}
	e := doc.Exports[0]
	want := map[string]any{
		"export-size": 10.0 * (1 << 20), "is_read_only": false,
		"can_flush": true, "can_fua": true, "can_trim": true, "can_zero": true,
		"can_fast_zero": true, "can_multi_conn": true, "can_cache": true, "can_df": true,
		"block_size_minimum": 1.0, "block_size_preferred": 4096.0, "block_size_maximum": 32.0 * (1 << 20),
	}
	for k, v := range want {
		if e[k] != v {
			t.Errorf("%s = %v, want %v", k, e[k], v)
		}
	}
	out = run(t, "nbdinfo", "--json", g.unixURI("disk-ro"))
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	e = doc.Exports[0]
	for k, v := range map[string]any{"is_read_only": true, "can_trim": false, "can_zero": false, "can_fua": false, "export-size": 4.0 * (1 << 20)} {
		if e[k] != v {
			t.Errorf("read-only export: %s = %v, want %v", k, e[k], v)
		}
	}
	// LIST names every volume.
	out = run(t, "nbdinfo", "--list", "--json", "nbd://"+g.addr)
	for _, name := range []string{`"disk"`, `"disk-ro"`} {
		if !strings.Contains(out, name) {
			t.Errorf("nbdinfo --list lacks %s: %s", name, out)
		}
	}
	// An unknown export is refused with a message naming it.
	out, err := runErr("nbdinfo", g.uri("nope"))
	if err == nil || !strings.Contains(out, "nope") {
		t.Errorf("unknown export: err=%v out=%s", err, out)
	}
}

func TestBlockStatusMap(t *testing.T) {
	need(t, "nbdinfo", "qemu-io")
	dir := newDataDir(t, "disk:8M")
	g := startGateway(t, dir)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 1M 1M", g.uri("disk"))
	out := run(t, "nbdinfo", "--map", "--json", g.uri("disk"))
	var m []struct {
		Offset, Length int64
		Type           int
	}
	if err := json.Unmarshal([]byte(out), &m); err != nil {
		t.Fatalf("%v: %s", err, out)
	}
	var data int64
	for _, e := range m {
		if e.Type&1 == 0 {
			data += e.Length
		}
	}
	// Exactly the written MiB is data; the rest is hole (ext4 allocates in
	// 4 KiB blocks).
	if data != 1<<20 {
		t.Fatalf("allocated bytes %d, want %d: %s", data, 1<<20, out)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "discard 1M 1M", g.uri("disk"))
	out = run(t, "nbdinfo", "--map", "--totals", g.uri("disk"))
	if !strings.Contains(out, "100.0%") {
		t.Fatalf("after discard the whole disk should be a hole: %s", out)
	}
}

func TestNbdcopyRoundTrip(t *testing.T) {
	need(t, "nbdcopy")
	const size = 256 << 20
	dir := newDataDir(t, "disk:256M")
	g := startGateway(t, dir)
	src := randomFile(t, size)
	run(t, "nbdcopy", src, g.uri("disk"))
	out := filepath.Join(t.TempDir(), "out.raw")
	run(t, "nbdcopy", g.unixURI("disk"), out)
	filesEqual(t, src, out)
}

// nbdsh runs a Python snippet in nbdsh against uri, with libnbd's client
// checks off so that the server sees the bad request itself.
func nbdsh(t *testing.T, uri, script string) string {
	t.Helper()
	full := "h.set_strict_mode(0)\n" + script
	return run(t, "nbdsh", "-u", uri, "-c", full)
}

func TestBadRequestsKeepConnection(t *testing.T) {
	need(t, "nbdsh")
	dir := newDataDir(t, "disk:1M", "disk-ro:1M")
	g := startGateway(t, dir)
	script := `
import errno
def expect(fn, want):
    try:
        fn()
    except nbd.Error as e:
        assert e.errno == errno.errorcode[want], "got %s (%s), want %s" % (e.errno, e, errno.errorcode[want])
        print("refused", errno.errorcode[want])
        return
    raise AssertionError("request succeeded")
size = h.get_size()
expect(lambda: h.pread(4096, size - 1024), errno.EINVAL)          # read past the end
expect(lambda: h.pread(1, size), errno.EINVAL)                    # read at the end
expect(lambda: h.pwrite(b"x" * 4096, size - 1), errno.ENOSPC)     # write past the end
expect(lambda: h.pread(64 << 20, 0), errno.EINVAL)                # length over the maximum
expect(lambda: h.pwrite(b"y" * (33 << 20), 0), errno.EINVAL)      # write over the maximum
assert len(h.pread(4096, 0, nbd.CMD_FLAG_FUA)) == 4096           # FUA on a read: accepted (proto.md)
h.flush(nbd.CMD_FLAG_FUA)                                          # ...and on a flush
expect(lambda: h.trim(4096, 0, nbd.CMD_FLAG_NO_HOLE), errno.EINVAL)
expect(lambda: h.block_status(4096, size, lambda *a: 0), errno.EINVAL)
# The connection still works.
h.pwrite(b"z" * 4096, 8192)
assert h.pread(4096, 8192) == b"z" * 4096
print("still-serving")
`
	out := nbdsh(t, g.uri("disk"), script)
	if strings.Count(out, "refused") != 7 || !strings.Contains(out, "still-serving") {
		t.Fatalf("nbdsh: %s", out)
	}
	ro := `
import errno
for fn in (lambda: h.pwrite(b"x" * 512, 0), lambda: h.trim(4096, 0), lambda: h.zero(4096, 0)):
    try:
        fn()
        raise AssertionError("write to a read-only export succeeded")
    except nbd.Error as e:
        assert e.errno == "EPERM", e
print("eperm-ok", len(h.pread(512, 0)))
`
	out = nbdsh(t, g.uri("disk-ro"), ro)
	if !strings.Contains(out, "eperm-ok 512") {
		t.Fatalf("read-only export: %s", out)
	}
	if !strings.Contains(g.logText(), "request refused") {
		t.Fatal("refused requests are not logged")
	}
}

func TestEightConcurrentClients(t *testing.T) {
	need(t, "qemu-io")
	dir := newDataDir(t, "disk:64M")
	g := startGateway(t, dir)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for i := 0; i < 8; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			uri := g.uri("disk")
			if i%2 == 1 {
				uri = g.unixURI("disk")
			}
			base := i * 8 << 20
			var args []string
			for k := 0; k < 16; k++ {
				args = append(args, "-c", fmt.Sprintf("aio_write -P %#x %d 512k", i*16+k+1, base+k*512<<10))
			}
			args = append(args, "-c", "aio_flush")
			for k := 0; k < 16; k++ {
				args = append(args, "-c", fmt.Sprintf("read -P %#x %d 512k", i*16+k+1, base+k*512<<10))
			}
			out, err := runErr("qemu-io", append(append([]string{"-f", "raw"}, args...), uri)...)
			if err != nil || strings.Contains(out, "failed") {
				errs <- fmt.Errorf("client %d: %v %s", i, err, out)
			}
		}(i)
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

func TestClientKilledMidRequest(t *testing.T) {
	need(t, "nbdsh", "qemu-io")
	dir := newDataDir(t, "disk:64M")
	g := startGateway(t, dir)
	// A client that dies in the middle of sending a 32 MiB write, and one
	// that dies with 32 MiB reads in flight.
	for _, script := range []string{
		"import os, signal\nbuf = nbd.Buffer(32 << 20)\nh.aio_pwrite(buf, 0)\nh.poll(0)\nos.kill(os.getpid(), signal.SIGKILL)\n",
		"import os, signal\nfor i in range(16):\n    h.aio_pread(nbd.Buffer(1 << 20), i << 20)\nh.poll(0)\nos.kill(os.getpid(), signal.SIGKILL)\n",
	} {
		cmd := exec.Command("nbdsh", "-u", g.uri("disk"), "-c", script)
		cmd.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
		out, err := cmd.CombinedOutput()
		if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
			t.Fatalf("client was not killed: %v %s", err, out)
		}
	}
	// The gateway serves on, and nothing half-written is visible.
	out := run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x42 0 1M", "-c", "read -P 0x42 0 1M", g.uri("disk"))
	if strings.Contains(out, "failed") {
		t.Fatal(out)
	}
	deadline := time.Now().Add(5 * time.Second)
	for !strings.Contains(g.logText(), "connection lost mid-request") {
		if time.Now().After(deadline) {
			t.Fatalf("the cut connection was not logged:\n%s", g.logText())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func TestGracefulShutdown(t *testing.T) {
	need(t, "qemu-io")
	dir := newDataDir(t, "disk:16M")
	g := startGateway(t, dir)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4M", g.uri("disk"))
	// A client attached and idle while the gateway stops.
	idle := exec.Command("nbdsh", "-u", g.uri("disk"), "-c", "import time\ntime.sleep(30)")
	idle.Env = append(os.Environ(), "PATH=/usr/bin:"+os.Getenv("PATH"))
	if err := idle.Start(); err == nil {
		defer idle.Process.Kill()
		time.Sleep(500 * time.Millisecond)
	}
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatalf("SIGTERM: exit %v\n%s", err, g.logText())
	}
	if !strings.Contains(g.logText(), "msg=stopped") {
		t.Fatalf("no clean stop logged:\n%s", g.logText())
	}
	if _, err := os.Stat(filepath.Join(dir, "nbd.sock")); !os.IsNotExist(err) {
		t.Errorf("socket left behind: %v", err)
	}
	b, err := os.ReadFile(filepath.Join(dir, "volumes", "disk.img"))
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i < 4<<20; i++ {
		if b[i] != 0x5a {
			t.Fatalf("byte %d is %#x after stop", i, b[i])
		}
	}
}

func TestMetricsEndpoint(t *testing.T) {
	need(t, "qemu-io", "nbdinfo")
	dir := newDataDir(t, "disk:4M", "other:4M")
	g := startGateway(t, dir, "--metrics", "127.0.0.1:0")
	addr := metricsAddr(t, g)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", "-c", "write -P 2 64k 4k", "-c", "read -P 1 0 64k", g.uri("disk"))
	run(t, "qemu-io", "-f", "raw", "-c", "read 0 8k", g.uri("other"))
	runErr("nbdinfo", g.uri("nosuch")) // refused: unknown export
	var body string
	for deadline := time.Now().Add(5 * time.Second); ; { // the connections close
		code, b := httpGet(t, "http://"+addr+"/metrics")
		if code != 200 {
			t.Fatalf("/metrics: %d", code)
		}
		body = b
		if strings.Contains(body, "goldilocks_nbd_connections 0") || time.Now().After(deadline) {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	// Counters equal what the clients did, per volume (no policy: identity "-").
	for _, want := range []string{
		`goldilocks_nbd_requests_total{command="write",identity="-",volume="disk"} 2`,
		`goldilocks_nbd_bytes_total{command="write",identity="-",volume="disk"} 69632`,
		`goldilocks_nbd_requests_total{command="read",identity="-",volume="disk"} 1`,
		`goldilocks_nbd_bytes_total{command="read",identity="-",volume="disk"} 65536`,
		`goldilocks_nbd_bytes_total{command="read",identity="-",volume="other"} 8192`,
		`goldilocks_nbd_request_duration_seconds_count{command="write",identity="-",volume="disk"} 2`,
		`goldilocks_nbd_errors_total{command="write",identity="-",volume="disk"} 0`,
		`goldilocks_nbd_requests_in_flight{identity="-",volume="disk"} 0`,
		`goldilocks_attaches_refused_total{reason="unknown_export"} 1`,
		`goldilocks_attaches_refused_total{reason="policy"} 0`,
		`goldilocks_audit_records_total{type="attach"} 2`,
		`goldilocks_audit_write_failures_total 0`,
		`goldilocks_build_info{goversion="go`,
		`goldilocks_nbd_connections 0`,
	} {
		if !strings.Contains(body, want) {
			t.Errorf("/metrics lacks %q", want)
		}
	}
	if t.Failed() {
		t.Logf("/metrics:\n%s", grepLines(body, "goldilocks_"))
	}
	if code, _ := httpGet(t, "http://"+addr+"/healthz"); code != 200 {
		t.Errorf("/healthz: %d", code)
	}
	waitReady(t, addr, 200, "ready")
}

// grepLines returns the lines of s that contain sub.
func grepLines(s, sub string) string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if strings.Contains(l, sub) && !strings.HasPrefix(l, "#") {
			out = append(out, l)
		}
	}
	return strings.Join(out, "\n")
}

func TestVolumeCreatedWhileServing(t *testing.T) {
	need(t, "nbdinfo")
	dir := newDataDir(t, "first:1M")
	g := startGateway(t, dir)
	if _, err := runErr("nbdinfo", g.uri("later")); err == nil {
		t.Fatal("a volume that does not exist yet attached")
	}
	goldilocks(t, dir, "volume", "create", "later", "--size", "2M", "--plain")
	out := run(t, "nbdinfo", "--size", g.uri("later"))
	if strings.TrimSpace(out) != "2097152" {
		t.Fatalf("new volume size %q", out)
	}
}
