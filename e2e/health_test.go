package e2e

import (
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
)

// /healthz is liveness; /readyz fails, saying why, while a new attach
// would be refused: the audit trail unwritable, the policy file
// unloadable, Vault down for a volume whose key it holds. Each is
// flipped and flipped back.

func metricsAddr(t *testing.T, g *gw) string {
	t.Helper()
	m := regexp.MustCompile(`msg="metrics listening" addr=(\S+)`).FindStringSubmatch(g.logText())
	if m == nil {
		t.Fatalf("no metrics address logged:\n%s", g.logText())
	}
	return m[1]
}

func httpGet(t *testing.T, url string) (int, string) {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// waitReady polls /readyz until its status is want and its body holds
// substr, and returns the body.
func waitReady(t *testing.T, addr string, want int, substr string) string {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, body := httpGet(t, "http://"+addr+"/readyz")
		if code == want && strings.Contains(body, substr) {
			return body
		}
		if time.Now().After(deadline) {
			t.Fatalf("/readyz: %d %q, want %d with %q", code, body, want, substr)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func TestReadyzAuditAndPolicy(t *testing.T) {
	need(t, "qemu-img")
	dir := newDataDir(t, "r-disk:8M")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	good := `
identities:
  - name: root-local
    unix: {uid: 0}
rules:
  - identity: root-local
    volumes: ["r-*"]
    access: read-write
`
	writePolicy(t, pol, good)
	g := startGateway(t, dir, "--metrics", "127.0.0.1:0", "--policy", pol)
	addr := metricsAddr(t, g)
	waitReady(t, addr, 200, "ready")

	// The audit trail cannot be written: not ready, and indeed refused.
	cur := filepath.Join(dir, "audit", "current.jsonl")
	if err := os.Rename(cur, cur+".aside"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/full", cur); err != nil {
		t.Fatal(err)
	}
	body := waitReady(t, addr, 503, "audit")
	t.Logf("/readyz with the audit log on /dev/full: %q", body)
	if code, _ := httpGet(t, "http://"+addr+"/healthz"); code != 200 {
		t.Errorf("/healthz %d while not ready: liveness must not follow readiness", code)
	}
	time.Sleep(1100 * time.Millisecond) // the log looks at its path once a second
	if out, err := runErr("qemu-img", "info", g.unixURI("r-disk")); err == nil {
		t.Fatalf("attach while /readyz says not ready: %s", out)
	}
	os.Remove(cur)
	os.Rename(cur+".aside", cur)
	run(t, "qemu-img", "info", g.unixURI("r-disk")) // an append succeeds again
	waitReady(t, addr, 200, "ready")

	// The policy file does not load.
	writePolicy(t, pol, "rules: [\n")
	body = waitReady(t, addr, 503, "does not load")
	if !strings.Contains(body, pol) {
		t.Errorf("/readyz does not name the policy file: %q", body)
	}
	writePolicy(t, pol, good)
	waitReady(t, addr, 200, "ready")
}

func TestReadyzVault(t *testing.T) {
	v := vaulttest.Start(t, vaulttest.Options{Persistent: true})
	v.Setenv(t)
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "rv", "--size", "8M", "--kek", "vault:vms")
	g := startGateway(t, dir, "--metrics", "127.0.0.1:0")
	addr := metricsAddr(t, g)
	waitReady(t, addr, 200, "ready")
	v.Stop()
	body := waitReady(t, addr, 503, "volume rv needs Vault")
	t.Logf("/readyz with Vault down: %q", body)
	v.Restart()
	waitReady(t, addr, 200, "ready")
}
