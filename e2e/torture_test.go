package e2e

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Crash torture through the real binary. A client does an fsx-style
// workload over NBD (writes of random sizes and offsets, FLUSH, FUA
// writes, TRIM, WRITE_ZEROES, reads checked against a model) while the
// gateway is killed with SIGKILL at a random moment; the gateway starts
// again and every byte of the volume must hold a value it may legally
// hold: what the last FLUSH (or FUA) made durable, or a value written
// since. No request may fail with an error while the gateway lives.
//
// The power-cut variant puts the volume on an upstream NBD server,
// nbdkit's file plugin behind its cache filter in writeback mode (which
// keeps writes in a cache that is written to the file only on a FLUSH),
// and kills nbdkit and the gateway together: every write not flushed is
// lost, as in a power cut, and every flushed one must be there.
//
// GOLDILOCKS_TORTURE_ROUNDS sets the rounds per variant (default 6: make
// test; make torture runs 1,000), GOLDILOCKS_TORTURE_SEED the seed.

const tortureSector = 512

// tortureModel knows, for every sector, which values it may hold: value
// ids name writes (0: zeros). A TRIM may leave the old bytes (NBD lets a
// server ignore it), so a sector can have several values it may read as.
type tortureModel struct {
	events  []tortureEvent // what was done, for the report of a failure
	round   int
	durable [][]uint64 // made durable by a FLUSH or FUA: one of these
	pending [][]uint64 // written since: each may have reached the disk
	latest  [][]uint64 // what a read may return now
}

// tortureEvent is one request the workload made.
type tortureEvent struct {
	round, first, n int
	op              string
	val             uint64
	acked           bool
}

// history lists the events that touched sector s.
func (m *tortureModel) history(s int) string {
	var b strings.Builder
	for _, e := range m.events {
		if e.op == "flush" || e.op == "restart" || (s >= e.first && s < e.first+e.n) {
			fmt.Fprintf(&b, "  round %d: %s [%d,+%d) value %d acked %v\n", e.round, e.op, e.first, e.n, e.val, e.acked)
		}
	}
	return b.String()
}

func (m *tortureModel) note(op string, first, n int, val uint64, acked bool) {
	if len(m.events) < 1<<20 {
		m.events = append(m.events, tortureEvent{m.round, first, n, op, val, acked})
	}
}

func newTortureModel(sectors int) *tortureModel {
	m := &tortureModel{durable: make([][]uint64, sectors), pending: make([][]uint64, sectors), latest: make([][]uint64, sectors)}
	for i := range m.durable {
		m.durable[i], m.latest[i] = []uint64{0}, []uint64{0}
	}
	return m
}

// write records a request that sets sectors [first, first+n) to val (a
// TRIM: to zeros or not at all): issued (it may have landed), and if
// acked, what reads may return now; with FUA, durable too.
func (m *tortureModel) write(op string, first, n int, val uint64, acked, fua, trim bool) {
	m.note(op, first, n, val, acked)
	for s := first; s < first+n; s++ {
		m.pending[s] = append(m.pending[s], val)
		if !acked {
			continue
		}
		if trim {
			if !slices.Contains(m.latest[s], 0) {
				m.latest[s] = append(m.latest[s], 0)
			}
		} else {
			m.latest[s] = append(m.latest[s][:0], val)
		}
		if fua {
			m.durable[s] = append(m.durable[s][:0], m.latest[s]...)
			m.pending[s] = m.pending[s][:0]
		}
	}
}

// flushed records an acked FLUSH: what reads return is durable. (One
// request at a time: nothing was in flight beside it.)
func (m *tortureModel) flushed() {
	m.note("flush", 0, 0, 0, true)
	for s := range m.latest {
		if len(m.pending[s]) == 0 {
			continue
		}
		m.durable[s] = append(m.durable[s][:0], m.latest[s]...)
		m.pending[s] = m.pending[s][:0]
	}
}

// legal reports whether v is a value sector s may hold after a crash.
func (m *tortureModel) legal(s int, v uint64) bool {
	return slices.Contains(m.durable[s], v) || slices.Contains(m.pending[s], v)
}

// settle makes what the disk holds after a restart the model's state
// (the client flushes it first).
func (m *tortureModel) settle(vals []uint64) {
	m.note("restart", 0, 0, 0, true)
	m.round++
	for s, v := range vals {
		m.durable[s], m.latest[s], m.pending[s] = append(m.durable[s][:0], v), append(m.latest[s][:0], v), m.pending[s][:0]
	}
}

// fill writes value id w into sector s's 512 bytes: (w, s) repeated.
func fill(b []byte, w uint64, s int) {
	if w == 0 {
		clear(b[:tortureSector])
		return
	}
	for i := 0; i < tortureSector; i += 16 {
		binary.LittleEndian.PutUint64(b[i:], w)
		binary.LittleEndian.PutUint64(b[i+8:], uint64(s))
	}
}

// decode reads the value id in sector s's bytes (ok false: bytes no
// write of this test wrote there: foreign or torn data).
func decode(b []byte, s int) (uint64, bool) {
	w := binary.LittleEndian.Uint64(b)
	if w == 0 && binary.LittleEndian.Uint64(b[8:]) == 0 {
		return 0, bytes.Equal(b[:tortureSector], make([]byte, tortureSector))
	}
	var want [tortureSector]byte
	fill(want[:], w, s)
	return w, bytes.Equal(b[:tortureSector], want[:])
}

// tortureTarget is a volume and how to crash and restart what serves it.
type tortureTarget struct {
	t       *testing.T
	dir     string
	volume  string
	g       *gw
	nbdkit  *exec.Cmd // power cut: the upstream server, killed too
	restart func()    // starts nbdkit again (power cut)
	kills   int
}

func (tt *tortureTarget) start() {
	if tt.restart != nil && tt.nbdkit == nil {
		tt.restart()
	}
	tt.g = startGateway(tt.t, tt.dir)
}

func (tt *tortureTarget) crash() {
	if tt.nbdkit != nil {
		tt.nbdkit.Process.Kill()
		tt.nbdkit.Wait()
		tt.nbdkit = nil
	}
	tt.g.stop(syscall.SIGKILL)
	tt.kills++
}

// torture runs rounds of workload and crash against tt.
func torture(t *testing.T, tt *tortureTarget, rounds int, rng *rand.Rand, keyOps bool) (ops int) {
	tt.start()
	cl, err := dialNBD(tt.g.sock, tt.volume)
	if err != nil {
		t.Fatal(err)
	}
	size := cl.size
	cl.close()
	sectors := int(size / tortureSector)
	m := newTortureModel(sectors)
	buf := make([]byte, 256<<10)
	var nextID uint64 = 1
	for round := 0; ; round++ { // a check after each crash, the last one too
		cl, err := dialNBD(tt.g.sock, tt.volume)
		if err != nil {
			t.Fatalf("round %d: attach after restart: %v\n%s", round, err, tt.g.logText())
		}
		// What the restart left: every sector a legal value.
		vals := make([]uint64, sectors)
		for off := int64(0); off < size; off += int64(len(buf)) {
			n := min(int64(len(buf)), size-off)
			if err := cl.do(nbdCmdRead, 0, off, int(n), nil, buf); err != nil {
				t.Fatalf("round %d: read after restart: %v", round, err)
			}
			for i := 0; i < int(n); i += tortureSector {
				s := int(off)/tortureSector + i/tortureSector
				v, ok := decode(buf[i:], s)
				if !ok || !m.legal(s, v) {
					t.Fatalf("round %d (kill %d): sector %d holds %s; durable %d, written since %v; its history:\n%s", round, tt.kills, s,
						map[bool]string{true: "value " + strconv.FormatUint(v, 10), false: "bytes no write of this test put there"}[ok], m.durable[s], m.pending[s], m.history(s))
				}
				vals[s] = v
			}
		}
		if err := cl.do(nbdCmdFlush, 0, 0, 0, nil, nil); err != nil {
			t.Fatalf("round %d: flush after restart: %v", round, err)
		}
		m.settle(vals)
		if round == rounds {
			cl.close()
			return ops
		}

		var keyCmd *exec.Cmd
		if keyOps && rng.IntN(3) == 0 { // a rotation or a rekey under the workload
			args := []string{"key", "rekey", tt.volume, "--rate", "16MiB"}
			if rng.IntN(2) == 0 {
				args = []string{"key", "rotate", "--all"}
			}
			// If the kill comes first, the command finds no gateway and
			// works offline, holding the volume's lock: the restart waits
			// for it, as an operator's would.
			keyCmd = exec.Command(goldilocksBin, append(args, "--data-dir", tt.dir)...)
			if keyCmd.Start() != nil {
				keyCmd = nil
			}
		}
		crashed := make(chan struct{})
		kill := time.AfterFunc(time.Duration(5+rng.IntN(300))*time.Millisecond, func() { tt.crash(); close(crashed) })
		for {
			op := rng.IntN(100)
			var err error
			switch {
			case op < 45: // write, some with FUA
				first := rng.IntN(sectors)
				n := min(1+rng.IntN(len(buf)/tortureSector), sectors-first)
				if rng.IntN(4) == 0 {
					n = min(1+rng.IntN(16), sectors-first)
				}
				w := nextID
				nextID++
				for i := range n {
					fill(buf[i*tortureSector:], w, first+i)
				}
				fua := rng.IntN(6) == 0
				flags := uint16(0)
				if fua {
					flags = nbdFlagFUA
				}
				err = cl.do(nbdCmdWrite, flags, int64(first)*tortureSector, n*tortureSector, buf[:n*tortureSector], nil)
				m.write(map[bool]string{true: "write+fua", false: "write"}[fua], first, n, w, err == nil, fua, false)
			case op < 55:
				err = cl.do(nbdCmdFlush, 0, 0, 0, nil, nil)
				if err == nil {
					m.flushed()
				}
			case op < 62: // trim, whole 4 KiB blocks
				first := rng.IntN(sectors/8) * 8
				n := min((1+rng.IntN(64))*8, sectors-first)
				err = cl.do(nbdCmdTrim, 0, int64(first)*tortureSector, n*tortureSector, nil, nil)
				m.write("trim", first, n, 0, err == nil, false, true)
			case op < 72: // write zeroes, any range
				first := rng.IntN(sectors)
				n := min(1+rng.IntN(512), sectors-first)
				flags := uint16(0)
				if rng.IntN(2) == 0 {
					flags = nbdFlagNoHole
				}
				err = cl.do(nbdCmdWriteZeroes, flags, int64(first)*tortureSector, n*tortureSector, nil, nil)
				m.write("zero", first, n, 0, err == nil, false, false)
			default: // read, checked exactly
				first := rng.IntN(sectors)
				n := min(1+rng.IntN(len(buf)/tortureSector), sectors-first)
				err = cl.do(nbdCmdRead, 0, int64(first)*tortureSector, n*tortureSector, nil, buf)
				if err == nil {
					for i := range n {
						s := first + i
						v, ok := decode(buf[i*tortureSector:], s)
						if !ok || !slices.Contains(m.latest[s], v) {
							t.Fatalf("round %d: read of sector %d: %v (ok %v), want one of %v; its history:\n%s", round, s, v, ok, m.latest[s], m.history(s))
						}
					}
				}
			}
			if err != nil {
				if errors.Is(err, errNBD) {
					kill.Stop()
					t.Fatalf("round %d: the gateway answered an error: %v\n%s", round, err, tt.g.logText())
				}
				if kill.Stop() {
					t.Fatalf("round %d: the connection died before the kill: %v\n%s", round, err, tt.g.logText())
				}
				break // the kill
			}
			ops++
		}
		<-crashed
		cl.close()
		if keyCmd != nil {
			keyCmd.Wait()
		}
		tt.start()
	}
}

func tortureRounds(t *testing.T) int {
	if s := os.Getenv("GOLDILOCKS_TORTURE_ROUNDS"); s != "" {
		n, err := strconv.Atoi(s)
		if err != nil || n < 1 {
			t.Fatalf("GOLDILOCKS_TORTURE_ROUNDS=%q", s)
		}
		return n
	}
	return 6
}

func tortureRand(t *testing.T) *rand.Rand {
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("GOLDILOCKS_TORTURE_SEED"); s != "" {
		seed, _ = strconv.ParseUint(s, 10, 64)
	}
	t.Logf("seed %d (GOLDILOCKS_TORTURE_SEED=%d repeats this run)", seed, seed)
	return rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
}

// SIGKILL of the gateway: plain and encrypted volumes on local files,
// key rotations and rekeys started at random under the encrypted one.
func TestTortureKill(t *testing.T) {
	rounds, rng := tortureRounds(t), tortureRand(t)
	for _, v := range []struct {
		name string
		args []string
	}{
		{"plain", []string{"--plain", "--size", "8M"}},
		{"encrypted", []string{"--size", "8M"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			dir := t.TempDir()
			goldilocks(t, dir, append([]string{"volume", "create", "tv"}, v.args...)...)
			tt := &tortureTarget{t: t, dir: dir, volume: "tv"}
			ops := torture(t, tt, rounds, rng, v.name == "encrypted")
			t.Logf("%s: %d kills, %d requests answered, every byte legal after each", v.name, tt.kills, ops)
		})
	}
}

// Power cuts: the volume on nbdkit (file plugin, cache filter in
// writeback mode), both processes killed at once.
func TestTorturePowerCut(t *testing.T) {
	need(t, "nbdkit")
	rounds, rng := tortureRounds(t), tortureRand(t)
	for _, v := range []struct {
		name string
		args []string
	}{
		{"plain", []string{"--plain"}},
		{"encrypted", []string{"--size", "8M"}},
	} {
		t.Run(v.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "backing.img")
			if err := os.WriteFile(img, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(img, 24<<20); err != nil {
				t.Fatal(err)
			}
			sock := filepath.Join(dir, "nbdkit.sock")
			tt := &tortureTarget{t: t, dir: dir, volume: "tv"}
			tt.restart = func() {
				tt.nbdkit = runNbdkit(t, sock, "--filter=cache", "file", img, "cache=writeback")
			}
			tt.restart()
			args := append([]string{"volume", "create", "tv", "--backing", "nbd+unix:///?socket=" + sock}, v.args...)
			if v.name == "plain" {
				args = append(args, "--size", "8M")
			}
			goldilocks(t, dir, args...)
			ops := torture(t, tt, rounds, rng, false)
			t.Logf("%s: %d power cuts, %d requests answered, no flushed write lost", v.name, tt.kills, ops)
		})
	}
}
