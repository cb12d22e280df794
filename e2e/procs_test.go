package e2e

import (
	"os"
	"regexp"
	"runtime"
	"strconv"
	"testing"
)

// serve runs with twice the Go runtime's default GOMAXPROCS (large
// preads and writevs hold a P; bench/README.md), unless GOMAXPROCS is set,
// which it then obeys as every Go program does. go_sched_gomaxprocs_threads
// on /metrics is what an operator checks.
func TestServeGOMAXPROCS(t *testing.T) {
	def := runtime.GOMAXPROCS(0)         // this process's: the runtime's default...
	set := os.Getenv("GOMAXPROCS") != "" // ...unless set
	for _, tc := range []struct {
		env  string
		want int
	}{
		{"", 2 * def},
		{"3", 3},
	} {
		if tc.env == "" && set {
			t.Log("GOMAXPROCS is set for the tests: the default is not known here, not checked")
			continue
		}
		t.Setenv("GOMAXPROCS", tc.env)
		dir := t.TempDir()
		g := startGateway(t, dir, "--metrics", "127.0.0.1:0")
		if got := runtimeMetric(t, g, "go_sched_gomaxprocs_threads"); int(got) != tc.want {
			t.Errorf("GOMAXPROCS=%q: the gateway runs with %v Ps, want %d", tc.env, got, tc.want)
		}
	}
}

// serve collects garbage at GOGC 30 (its live heap is mostly the map's
// node cache; bench/scale.md), unless GOGC is set, which it obeys.
// go_gc_gogc_percent on /metrics is what an operator checks.
func TestServeGOGC(t *testing.T) {
	for _, tc := range []struct {
		env  string
		want int
	}{
		{"", 30},
		{"80", 80},
	} {
		t.Setenv("GOGC", tc.env)
		g := startGateway(t, t.TempDir(), "--metrics", "127.0.0.1:0")
		if got := runtimeMetric(t, g, "go_gc_gogc_percent"); int(got) != tc.want {
			t.Errorf("GOGC=%q: the gateway collects at %v %%, want %d", tc.env, got, tc.want)
		}
	}
}

// runtimeMetric is the value of an unlabelled metric on g's /metrics.
func runtimeMetric(t *testing.T, g *gw, name string) float64 {
	t.Helper()
	_, body := httpGet(t, "http://"+metricsAddr(t, g)+"/metrics")
	m := regexp.MustCompile(`(?m)^` + regexp.QuoteMeta(name) + ` (\S+)$`).FindStringSubmatch(body)
	if m == nil {
		t.Fatalf("no %s on /metrics", name)
	}
	v, err := strconv.ParseFloat(m[1], 64)
	if err != nil {
		t.Fatal(err)
	}
	return v
}
