package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Volumes on Ceph RBD, through librbd, on a real single-node cluster
// that the test brings up (testdata/ceph-up.sh: one monitor, one
// BlueStore OSD on a sparse file, about 10 s) and tears down.

// cephCluster starts a cluster under a temporary directory with an image
// rbd/IMG of imgSize and returns its ceph.conf.
func cephCluster(t *testing.T, img, imgSize string) string {
	t.Helper()
	need(t, "ceph-mon", "ceph-osd", "rbd", "rados")
	base := filepath.Join(t.TempDir(), "ceph")
	port := func() string {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		return fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
	}
	osdMin := 47000 + (os.Getpid()%80)*100
	cmd := exec.Command("bash", "testdata/ceph-up.sh")
	cmd.Env = append(os.Environ(), "BASE="+base, "MON_V2="+port(), "MON_V1="+port(),
		fmt.Sprintf("OSD_PORT_MIN=%d", osdMin), fmt.Sprintf("OSD_PORT_MAX=%d", osdMin+99),
		"IMG="+img, "IMG_SIZE="+imgSize)
	out, err := cmd.CombinedOutput()
	t.Cleanup(func() {
		down := exec.Command("bash", "testdata/ceph-down.sh")
		down.Env = append(os.Environ(), "BASE="+base)
		if out, err := down.CombinedOutput(); err != nil {
			t.Logf("ceph-down: %v\n%s", err, out)
		}
	})
	if err != nil {
		t.Fatalf("ceph-up: %v\n%s", err, out)
	}
	t.Logf("ceph-up:\n%s", out)
	return filepath.Join(base, "ceph.conf")
}

func cephCmd(t *testing.T, conf string, name string, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "CEPH_CONF="+conf)
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	}
	return out
}

func TestRBDVolumes(t *testing.T) {
	need(t, "qemu-io", "nbdsh", "nbdcopy")
	conf := cephCluster(t, "plain", "64M")
	cephCmd(t, conf, "rbd", "create", "rbd/enc", "--size", "40M")
	dir := t.TempDir()
	out, err := runGoldilocks(dir, "volume", "create", "rp", "--plain", "--backing", "rbd:rbd/plain", "--ceph-conf", conf)
	if err != nil && strings.Contains(out, "without Ceph") {
		missing(t, "a goldilocks built with Ceph RBD support (make build with librbd-dev)")
	}
	if err != nil {
		t.Fatalf("volume create on RBD: %v\n%s", err, out)
	}
	goldilocks(t, dir, "volume", "create", "re", "--size", "16M", "--backing", "rbd:rbd/enc", "--ceph-conf", conf)
	g := startGateway(t, dir)
	secret := "GOLDILOCKS-RBD-SECRET"
	src := randomFile(t, 8<<20)
	for _, v := range []string{"rp", "re"} {
		run(t, "nbdcopy", src, g.unixURI(v))
		nbdsh(t, g.unixURI(v), `h.pwrite(b"`+secret+`" * 200, 12 << 20); h.flush(); print("ok")`)
	}
	// Block status of the plain volume comes from the image's object map
	// (4 MiB objects): objects 0 and 1 (the 8 MiB copied) and 3 (the
	// secret at 12 MiB) are data, object 2 and everything from 16 MiB
	// are holes; after a discard of object 3, it is a hole too.
	rbdMap := func() (data []int64) {
		t.Helper()
		var m []struct {
			Offset, Length int64
			Type           int
		}
		out := run(t, "nbdinfo", "--map", "--json", g.unixURI("rp"))
		if err := json.Unmarshal([]byte(out), &m); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		for _, e := range m {
			if e.Type&1 == 0 {
				for o := e.Offset; o < e.Offset+e.Length; o += 4 << 20 {
					data = append(data, o>>20)
				}
			}
		}
		return data
	}
	if got := fmt.Sprint(rbdMap()); got != "[0 4 12]" {
		t.Fatalf("data at MiB %s of the RBD volume, want [0 4 12] (its objects that exist)", got)
	}
	run(t, "qemu-io", "-f", "raw", "-c", "discard 12M 4M", g.unixURI("rp"))
	if got := fmt.Sprint(rbdMap()); got != "[0 4]" {
		t.Fatalf("after a discard of 12M..16M: data at MiB %s, want [0 4]", got)
	}
	nbdsh(t, g.unixURI("rp"), `h.pwrite(b"`+secret+`" * 200, 12 << 20); h.flush(); print("ok")`)
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	// A new gateway reads what the first wrote, from the cluster.
	g = startGateway(t, dir)
	for _, v := range []string{"rp", "re"} {
		back := filepath.Join(t.TempDir(), v+".raw")
		run(t, "nbdcopy", g.unixURI(v), back)
		b, _ := os.ReadFile(back)
		want, _ := os.ReadFile(src)
		if len(b) < len(want) || !bytes.Equal(b[:len(want)], want) {
			t.Fatalf("volume %s after a gateway restart differs from what was written", v)
		}
	}
	// The plain image holds the bytes; no object of the encrypted image
	// holds plaintext (rados get of each, searched).
	var info struct {
		Prefix string `json:"block_name_prefix"`
	}
	if err := json.Unmarshal(cephCmd(t, conf, "rbd", "info", "rbd/enc", "--format", "json"), &info); err != nil || info.Prefix == "" {
		t.Fatalf("rbd info: %v", err)
	}
	objs := 0
	for _, o := range strings.Fields(string(cephCmd(t, conf, "rados", "-p", "rbd", "ls"))) {
		if !strings.HasPrefix(o, info.Prefix) {
			continue
		}
		objs++
		f := filepath.Join(t.TempDir(), "obj")
		cephCmd(t, conf, "rados", "-p", "rbd", "get", o, f)
		b, _ := os.ReadFile(f)
		if bytes.Contains(b, []byte(secret)) {
			t.Fatalf("RADOS object %s of the encrypted volume holds plaintext", o)
		}
	}
	if objs == 0 {
		t.Fatal("the encrypted image has no objects: nothing was written to RBD")
	}
	plain := filepath.Join(t.TempDir(), "plain.raw")
	cephCmd(t, conf, "rbd", "export", "rbd/plain", plain)
	if b, _ := os.ReadFile(plain); !bytes.Contains(b, []byte(secret)) {
		t.Fatal("the plain volume's bytes are not on its RBD image")
	}
}

// The cluster's only OSD stopped and started again under a running
// client: librbd holds the requests while no OSD serves their placement
// group, so the client sees latency, not errors, and every byte it
// wrote and read back is right.
func TestRBDOSDRestartUnderLoad(t *testing.T) {
	need(t, "nbdsh")
	conf := cephCluster(t, "osd", "64M")
	dir := t.TempDir()
	out, err := runGoldilocks(dir, "volume", "create", "ro", "--plain", "--backing", "rbd:rbd/osd", "--ceph-conf", conf)
	if err != nil && strings.Contains(out, "without Ceph") {
		missing(t, "a goldilocks built with Ceph RBD support (make build with librbd-dev)")
	}
	if err != nil {
		t.Fatalf("volume create on RBD: %v\n%s", err, out)
	}
	g := startGateway(t, dir)
	live := startLoop(t, g.unixURI("ro"), 14)
	waitLog(t, g, "msg=attached", 1)
	time.Sleep(2 * time.Second)
	pids := filepath.Join(filepath.Dir(conf), "cluster", "run")
	pid, err := os.ReadFile(filepath.Join(pids, "osd.0.pid"))
	if err != nil {
		t.Fatal(err)
	}
	p, _ := strconv.Atoi(strings.TrimSpace(string(pid)))
	syscall.Kill(p, syscall.SIGTERM)
	for deadline := time.Now().Add(20 * time.Second); syscall.Kill(p, 0) == nil; time.Sleep(100 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the OSD did not stop")
		}
	}
	time.Sleep(2 * time.Second)
	osd := exec.Command("ceph-osd", "-i", "0")
	osd.Env = append(os.Environ(), "CEPH_CONF="+conf)
	if out, err := osd.CombinedOutput(); err != nil {
		t.Fatalf("ceph-osd start: %v\n%s", err, out)
	}
	if err := live.wait(); err != nil {
		t.Fatalf("the client saw the OSD restart: %v", err)
	}
}
