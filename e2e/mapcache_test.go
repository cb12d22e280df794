package e2e

import (
	"bytes"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"syscall"
	"testing"
)

// The map cache of the encrypted volumes is visible on /metrics, so an
// operator can tell whether serve --map-cache is large enough: its
// capacity follows the flag, it never holds more, it holds the nodes of
// an attached volume, and reads of an encrypted volume by a real client
// move its hit and miss counters.
func TestMapCacheMetrics(t *testing.T) {
	need(t, "nbdcopy")
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "enc", "--size", "16M")
	goldilocks(t, dir, "volume", "create", "big", "--size", "80M") // 326 leaves
	src := randomFile(t, 16<<20)
	// Written and checkpointed (the gateway stops) first: reads of a
	// volume just written find their entries in memory, not in the tree.
	g := startGateway(t, dir)
	run(t, "nbdcopy", src, g.uri("enc"))
	run(t, "nbdcopy", randomFile(t, 80<<20), g.uri("big"))
	if err := g.stop(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		flag     []string
		capacity int
	}{
		{nil, 8192},                               // 32 MiB of 4 KiB nodes
		{[]string{"--map-cache", "1MiB"}, 256},    // 16 shards of at least 16 nodes
		{[]string{"--map-cache", "64MiB"}, 16384}, // as the flag says
	} {
		g = startGateway(t, dir, append([]string{"--metrics", "127.0.0.1:0"}, tc.flag...)...)
		addr := metricsAddr(t, g)
		scrape := func() map[string]float64 {
			_, body := httpGet(t, "http://"+addr+"/metrics")
			m := map[string]float64{}
			for _, name := range []string{"nodes", "capacity_nodes", "hits_total", "misses_total"} {
				re := regexp.MustCompile(`(?m)^goldilocks_map_cache_` + name + ` (\S+)$`)
				v := re.FindStringSubmatch(body)
				if v == nil {
					t.Fatalf("%v: no goldilocks_map_cache_%s on /metrics", tc.flag, name)
				}
				f, err := strconv.ParseFloat(v[1], 64)
				if err != nil {
					t.Fatal(err)
				}
				m[name] = f
			}
			return m
		}
		// A session held open keeps the volume open (a running VM): the
		// nodes of a volume that closes leave the cache with it.
		hold, err := dialNBD(g.sock, "enc")
		if err != nil {
			t.Fatal(err)
		}
		before := scrape()
		if int(before["capacity_nodes"]) != tc.capacity {
			t.Errorf("%v: capacity %v nodes, want %d", tc.flag, before["capacity_nodes"], tc.capacity)
		}
		out := filepath.Join(t.TempDir(), "out.raw")
		run(t, "nbdcopy", g.uri("enc"), out)
		first := scrape()
		run(t, "nbdcopy", g.uri("enc"), out)
		second := scrape()
		if !bytes.Equal(mustRead(t, out), mustRead(t, src)) {
			t.Fatalf("%v: the volume did not read back what was written", tc.flag)
		}
		// 16 MiB is 66 leaves: the first pass reads each from the store.
		if first["misses_total"]-before["misses_total"] < 66 {
			t.Errorf("%v: misses %v → %v over the first full read of a freshly attached volume", tc.flag, before["misses_total"], first["misses_total"])
		}
		// The leaves fit every size above: a second pass finds them in the
		// cache.
		if second["hits_total"]-first["hits_total"] < 66 || second["misses_total"] != first["misses_total"] {
			t.Errorf("%v: hits %v → %v and misses %v → %v over a second full read", tc.flag,
				first["hits_total"], second["hits_total"], first["misses_total"], second["misses_total"])
		}
		if n := second["nodes"]; n <= 0 || n > second["capacity_nodes"] {
			t.Errorf("%v: %v nodes cached, capacity %v", tc.flag, n, second["capacity_nodes"])
		}
		if tc.capacity == 256 {
			// More leaves than the cache holds: it stays within its bound
			// (big held open, or its nodes would leave as it closes).
			holdBig, err := dialNBD(g.sock, "big")
			if err != nil {
				t.Fatal(err)
			}
			run(t, "nbdcopy", g.uri("big"), "null:")
			third := scrape()
			holdBig.close()
			if third["misses_total"]-second["misses_total"] < 326 || third["nodes"] > 256 {
				t.Errorf("%v: reading 326 leaves took %v misses and left %v nodes cached, capacity 256", tc.flag,
					third["misses_total"]-second["misses_total"], third["nodes"])
			}
		}
		hold.close()
		if err := g.stop(syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
	}
}

func mustRead(t *testing.T, p string) []byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
