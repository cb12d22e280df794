package e2e

import (
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// Abusive clients cost bounded memory and time, and others keep being
// served: connections that never finish the handshake, endless options,
// an attach flood, a client that never reads its replies.
func TestAbuseBounded(t *testing.T) {
	dir := newDataDir(t, "a:16M")
	g := startGateway(t, dir, "--max-handshakes", "64", "--max-peer-handshakes", "16", "--handshake-timeout", "3s",
		"--attach-rate", "5", "--attach-burst", "10", "--reply-timeout", "2s")
	legit := func(what string) {
		t.Helper()
		cl, err := dialNBD(g.sock, "a")
		if err != nil {
			t.Fatalf("%s: a client of another peer was refused: %v", what, err)
		}
		defer cl.close()
		buf := make([]byte, 4096)
		if err := cl.do(nbdCmdRead, 0, 0, 4096, nil, buf); err != nil {
			t.Fatalf("%s: a client of another peer could not read: %v", what, err)
		}
	}

	// 1. Forty TCP connections that never send a byte: sixteen are held
	// (the greeting sent, the handshake timing out after 3 s), the rest
	// closed at accept; a Unix client (another peer) is served meanwhile.
	var held, closed int
	conns := make([]net.Conn, 40)
	for i := range conns {
		c, err := net.Dial("tcp", g.addr)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		conns[i] = c
	}
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(time.Second))
		var hello [18]byte
		if _, err := io.ReadFull(c, hello[:]); err == nil {
			held++
		} else if errors.Is(err, io.EOF) || strings.Contains(err.Error(), "reset") {
			closed++
		}
	}
	if held != 16 || closed != 24 {
		t.Errorf("of 40 silent connections from one address %d were held and %d closed at accept, want 16 and 24", held, closed)
	}
	legit("during the silent connections")
	start := time.Now()
	for _, c := range conns {
		c.SetReadDeadline(time.Now().Add(10 * time.Second))
		io.Copy(io.Discard, c)
	}
	if d := time.Since(start); d > 6*time.Second {
		t.Errorf("silent connections were held %v, beyond the 3 s handshake timeout", d)
	}

	// 2. Endless options: the connection ends after 256.
	c, err := net.Dial("unix", g.sock)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(20 * time.Second))
	var hello [18]byte
	io.ReadFull(c, hello[:])
	c.Write([]byte{0, 0, 0, 3})
	answered := 0
	for i := 0; i < 1000; i++ {
		opt := binary.BigEndian.AppendUint64(nil, 0x49484156454F5054)
		opt = binary.BigEndian.AppendUint32(opt, 99) // an option nobody knows
		opt = binary.BigEndian.AppendUint32(opt, 0)
		if _, err := c.Write(opt); err != nil {
			break
		}
		var rep [20]byte
		if _, err := io.ReadFull(c, rep[:]); err != nil {
			break
		}
		if n := binary.BigEndian.Uint32(rep[16:]); n > 0 {
			io.CopyN(io.Discard, c, int64(n))
		}
		answered++
	}
	if answered != 256 {
		t.Errorf("%d options answered before the connection ended, want 256", answered)
	}

	// 3. An attach flood from one uid: the burst, then refusals at the
	// rate; a client at another address attaches meanwhile; the audit
	// trail holds the attaches and one record of the refusals, not one per
	// refusal.
	ok, refused := 0, 0
	for i := 0; i < 60; i++ {
		cl, err := dialNBD(g.sock, "a")
		if err != nil {
			if !strings.Contains(err.Error(), "too many attaches") {
				t.Fatalf("attach %d: %v", i, err)
			}
			refused++
			continue
		}
		cl.close()
		ok++
	}
	if ok < 10 || ok > 20 || refused < 40 {
		t.Errorf("attach flood: %d attached, %d refused (burst 10, 5/s)", ok, refused)
	}
	other, err := dialNBDOn("tcp", g.addr, "a")
	if err != nil {
		t.Fatalf("a client at another address was refused during the flood: %v", err)
	}
	other.close()
	time.Sleep(300 * time.Millisecond) // detaches reach the trail
	audit := goldilocks(t, dir, "audit", "export", "--volume", "a")
	if n := strings.Count(audit, `"reason":"attach rate limit"`); n < 1 || n > 2 {
		t.Errorf("%d audit records of rate-limited attaches for %d refusals, want 1 or 2", n, refused)
	}
	if !strings.Contains(audit, `"suppressed"`) {
		t.Error("the rate-limit record does not say how many it stands for")
	}

	// 4. A reader that never reads: 64 reads of 1 MiB sent, no reply
	// read. The gateway gives up on it after the 2 s reply timeout; it
	// gets far less than the 64 MiB it asked for; others are served.
	time.Sleep(2500 * time.Millisecond) // the attach rate refills
	slow, err := dialNBD(g.sock, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer slow.close()
	for i := 0; i < 64; i++ {
		var h [28]byte
		binary.BigEndian.PutUint32(h[0:], 0x25609513)
		binary.BigEndian.PutUint64(h[8:], uint64(i+1))
		binary.BigEndian.PutUint64(h[16:], uint64(i%16)<<20)
		binary.BigEndian.PutUint32(h[24:], 1<<20)
		if _, err := slow.c.Write(h[:]); err != nil {
			break
		}
	}
	time.Sleep(5 * time.Second)
	legit("while a client does not read")
	slow.c.SetReadDeadline(time.Now().Add(5 * time.Second))
	got, _ := io.Copy(io.Discard, slow.c)
	if got >= 32<<20 {
		t.Errorf("the client that did not read still got %d MiB of replies: the gateway waited on it", got>>20)
	}
	waitLog(t, g, "reply failed; closing connection", 1) // the gateway closed the slow reader
	if rss := processRSS(t, g.cmd.Process.Pid); rss > 300<<20 {
		t.Errorf("gateway RSS %d MiB after the abuse", rss>>20)
	}
	legit("after the abuse")
}

// processRSS is a process's resident set size in bytes.
func processRSS(t *testing.T, pid int) int64 {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/status")
	if err != nil {
		t.Fatal(err)
	}
	for _, l := range strings.Split(string(b), "\n") {
		if f := strings.Fields(l); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}
