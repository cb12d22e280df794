package e2e

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"strconv"
	"sync"
	"testing"
	"time"
)

// Load: 64 connections over 16 volumes (8 plain, 8 encrypted), each
// doing a mix of 4 KiB to 256 KiB writes, reads checked against what it
// wrote, flushes and trims in a region of its own, all at once. No request
// may fail and no read may return other bytes; the latency of each kind
// of request is reported (p50, p99). GOLDILOCKS_LOAD_SECONDS sets the
// duration (make test: 8 s; make bench: 60 s).
func TestLoad(t *testing.T) {
	seconds := 8
	if s := os.Getenv("GOLDILOCKS_LOAD_SECONDS"); s != "" {
		seconds, _ = strconv.Atoi(s)
	}
	const vols, perVol, region = 16, 4, 4 << 20
	dir := t.TempDir()
	for i := range vols {
		args := []string{"volume", "create", fmt.Sprintf("v%d", i), "--size", "16M"}
		if i%2 == 0 {
			args = append(args, "--plain")
		}
		goldilocks(t, dir, args...)
	}
	g := startGateway(t, dir)
	type sample struct {
		op string
		d  time.Duration
	}
	var (
		mu      sync.Mutex
		samples []sample
		failed  error
		wg      sync.WaitGroup
	)
	deadline := time.Now().Add(time.Duration(seconds) * time.Second)
	for c := range vols * perVol {
		wg.Add(1)
		go func() {
			defer wg.Done()
			vol, slot := c%vols, c/vols
			cl, err := dialNBD(g.sock, fmt.Sprintf("v%d", vol))
			if err != nil {
				mu.Lock()
				failed = err
				mu.Unlock()
				return
			}
			defer cl.close()
			rng := rand.New(rand.NewPCG(uint64(c), 7))
			base := int64(slot) * region
			model := make([]byte, region) // what this connection's region holds
			buf := make([]byte, 256<<10)
			var mine []sample
			for n := 0; time.Now().Before(deadline); n++ {
				off := int64(rng.IntN(region/4096)) * 4096
				ln := min(int64(4096*(1+rng.IntN(64))), region-off)
				var op string
				start := time.Now()
				switch k := rng.IntN(10); {
				case k < 4:
					op = "write"
					for i := int64(0); i < ln; i += 8 {
						binary.LittleEndian.PutUint64(buf[i:], uint64(c)<<40|uint64(n)<<16|uint64(i))
					}
					err = cl.do(nbdCmdWrite, 0, base+off, int(ln), buf[:ln], nil)
					copy(model[off:], buf[:ln])
				case k < 8:
					op = "read"
					if err = cl.do(nbdCmdRead, 0, base+off, int(ln), nil, buf); err == nil && !bytes.Equal(buf[:ln], model[off:off+ln]) {
						err = fmt.Errorf("connection %d: read %d+%d returned other bytes", c, base+off, ln)
					}
				case k < 9:
					op = "flush"
					err = cl.do(nbdCmdFlush, 0, 0, 0, nil, nil)
				default:
					op = "trim"
					if err = cl.do(nbdCmdWriteZeroes, 0, base+off, int(ln), nil, nil); err == nil {
						clear(model[off : off+ln])
					}
				}
				mine = append(mine, sample{op, time.Since(start)})
				if err != nil {
					mu.Lock()
					failed = fmt.Errorf("connection %d (volume v%d) %s: %w", c, vol, op, err)
					mu.Unlock()
					return
				}
			}
			mu.Lock()
			samples = append(samples, mine...)
			mu.Unlock()
		}()
	}
	wg.Wait()
	if failed != nil {
		t.Fatalf("under load: %v\n%s", failed, g.logText())
	}
	by := map[string][]time.Duration{}
	for _, s := range samples {
		by[s.op] = append(by[s.op], s.d)
	}
	t.Logf("%d connections over %d volumes (half encrypted) for %d s: %d requests, no errors", vols*perVol, vols, seconds, len(samples))
	for _, op := range []string{"read", "write", "flush", "trim"} {
		d := by[op]
		if len(d) == 0 {
			t.Errorf("no %s ran", op)
			continue
		}
		slices.Sort(d)
		t.Logf("  %-5s n=%d p50=%v p99=%v", op, len(d), d[len(d)/2].Round(time.Microsecond), d[len(d)*99/100].Round(time.Microsecond))
	}
	if rss := processRSS(t, g.cmd.Process.Pid); rss > 1<<30 {
		t.Errorf("gateway RSS %d MiB after the load", rss>>20)
	}
}
