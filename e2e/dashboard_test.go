package e2e

import (
	"encoding/json"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// contrib/grafana/goldilocks.json: every metric a panel (or a template
// variable) queries exists in a real scrape of a gateway that has done
// what the panels show — reads and writes under a policy with a rate
// limit, a tampered chunk, a rekey — and the alert rules pass promtool.
func TestGrafanaDashboardMetricsExist(t *testing.T) {
	need(t, "qemu-io", "nbdsh")
	dir := newEncryptedDataDir(t, "d:16M", "rk:8M")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, `
identities:
  - name: root-local
    unix: {uid: 0}
rules:
  - identity: root-local
    volumes: ["*"]
    access: read-write
    iops: 200
`)
	g := startGateway(t, dir, "--metrics", "127.0.0.1:0", "--policy", pol)
	addr := metricsAddr(t, g)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 7 0 64k", "-c", "read -P 7 0 64k", "-c", "flush", g.unixURI("d"))
	// 60 requests at 200 IOPS: the limit makes some wait.
	nbdsh(t, g.unixURI("d"), "for i in range(60): h.pread(4096, 0)\nprint('ok')")
	// A tampered chunk: an integrity failure.
	path := filepath.Join(dir, "volumes", "d.img")
	a, slots := slotArea(t, path, 16<<20)
	used := usedSlots(a, slots)
	orig, _ := os.ReadFile(path)
	bad := append([]byte{}, orig...)
	bad[used[0]+99] ^= 1
	os.WriteFile(path, bad, 0o600)
	nbdsh(t, g.unixURI("d"), "try:\n  h.pread(65536, 0)\nexcept nbd.Error as e:\n  print(e.errno)")
	os.WriteFile(path, orig, 0o600)
	// A rekey, through the gateway's control socket.
	goldilocks(t, dir, "key", "rekey", "rk")

	var body string
	deadline := time.Now().Add(10 * time.Second)
	for {
		_, body = httpGet(t, "http://"+addr+"/metrics")
		if strings.Contains(body, "goldilocks_rekey_total_bytes{") || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	have := map[string]bool{}
	for _, l := range strings.Split(body, "\n") {
		if l == "" || l[0] == '#' {
			continue
		}
		name := l[:strings.IndexAny(l, "{ ")]
		have[name] = true
	}

	b, err := os.ReadFile(filepath.Join("..", "contrib", "grafana", "goldilocks.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
		Templating struct {
			List []struct {
				Query any `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("goldilocks.json: %v", err)
	}
	if len(dash.Panels) < 10 {
		t.Fatalf("the dashboard has %d panels", len(dash.Panels))
	}
	metricRE := regexp.MustCompile(`\bgoldilocks_[a-z_]+`)
	check := func(where, expr string) {
		names := metricRE.FindAllString(expr, -1)
		if len(names) == 0 {
			t.Errorf("%s: %q queries no goldilocks metric", where, expr)
		}
		for _, n := range names {
			if !have[n] {
				t.Errorf("%s: %s is not in the scrape", where, n)
			}
		}
	}
	for _, p := range dash.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, tg := range p.Targets {
			check("panel "+p.Title, tg.Expr)
		}
	}
	for _, v := range dash.Templating.List {
		if q, ok := v.Query.(string); ok && strings.Contains(q, "goldilocks_") {
			check("variable", q)
		}
	}
	if t.Failed() {
		var names []string
		for n := range have {
			names = append(names, n)
		}
		sort.Strings(names)
		t.Logf("scraped: %s", strings.Join(names, " "))
	}
	// The alert rules parse and query metrics that exist.
	rules := filepath.Join("..", "contrib", "prometheus", "goldilocks-alerts.yml")
	rb, err := os.ReadFile(rules)
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(rb), "\n") {
		if e, ok := strings.CutPrefix(strings.TrimSpace(line), "expr:"); ok {
			check("alert rule", e)
		}
	}
	need(t, "promtool")
	if out, err := runErr("promtool", "check", "rules", rules); err != nil {
		t.Fatalf("promtool check rules: %v\n%s", err, out)
	}
	// The exposition itself passes promtool's lint.
	mf := filepath.Join(t.TempDir(), "metrics.txt")
	write(t, mf, []byte(body))
	if out, err := runErr("sh", "-c", "promtool check metrics < "+mf); err != nil {
		t.Fatalf("promtool check metrics: %v\n%s", err, out)
	}
}
