package e2e

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	vault "github.com/hashicorp/vault/api"

	"goldilocks/internal/vaulttest"
)

// The audit trail through the real binary: what it records, that it never
// records secrets, that it fails closed, and verify/export end to end.

type auditRec struct {
	Seq      uint64         `json:"seq"`
	Type     string         `json:"type"`
	Identity string         `json:"identity"`
	Volume   string         `json:"volume"`
	Decision string         `json:"decision"`
	Reason   string         `json:"reason"`
	Details  map[string]any `json:"details"`
}

func auditRecords(t *testing.T, dir string) ([]auditRec, string) {
	t.Helper()
	out := goldilocks(t, dir, "audit", "export")
	var recs []auditRec
	for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
		var r auditRec
		if err := json.Unmarshal([]byte(l), &r); err != nil {
			t.Fatalf("export line %q: %v", l, err)
		}
		recs = append(recs, r)
	}
	return recs, out
}

func find(recs []auditRec, typ, volume string) *auditRec {
	for i := range recs {
		if recs[i].Type == typ && (volume == "" || recs[i].Volume == volume) {
			return &recs[i]
		}
	}
	return nil
}

func TestAuditTrail(t *testing.T) {
	need(t, "qemu-io", "nbdcopy")
	srv := vaulttest.Start(t, vaulttest.Options{})
	// A token and a passphrase distinctive enough to search for.
	const token = "goldilocks-audit-probe-token-8c1f"
	if _, err := srv.Client().Auth().Token().Create(&vault.TokenCreateRequest{ID: token, Policies: []string{"root"}}); err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", srv.Addr)
	t.Setenv("VAULT_TOKEN", token)
	const pass = "correct-horse-audit-probe-passphrase"
	t.Setenv("GOLDILOCKS_KEYSTORE_PASSPHRASE", pass)

	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "loc", "--size", "16M")
	goldilocks(t, dir, "volume", "create", "vlt", "--size", "16M", "--kek", "vault:audit")
	pol := filepath.Join(t.TempDir(), "policy.yaml")
	writePolicy(t, pol, `
identities:
  - {name: root-local, unix: {uid: 0}}
rules:
  - {identity: root-local, volumes: ["loc", "vlt"], access: read-write}
`)
	g := startGateway(t, dir, "--policy", pol)
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 0 1M", "-c", "read -P 0x44 0 512k", "-c", "flush", g.unixURI("loc"))
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x45 0 64k", g.unixURI("vlt"))
	if _, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 4k", g.uri("loc")); err == nil {
		t.Fatal("a TCP client with no identity attached")
	}
	goldilocks(t, dir, "key", "rotate", "--all")
	goldilocks(t, dir, "key", "rekey", "vlt")
	writePolicy(t, pol, "rules: [{identity: nobody, volumes: [x]}]\n") // broken: refs an undefined identity
	waitLog(t, g, "event=policy_reload_failed", 1)
	g.stop(syscall.SIGTERM)

	recs, raw := auditRecords(t, dir)
	for _, tc := range []struct{ typ, vol string }{
		{"volume_create", "loc"}, {"volume_create", "vlt"}, {"gateway_start", ""}, {"attach", "loc"}, {"detach", "loc"},
		{"attach_refused", "loc"}, {"key_rotate", ""}, {"rekey_start", "vlt"}, {"rekey_finish", "vlt"},
		{"policy_reload_failed", ""}, {"gateway_stop", ""}, {"checkpoint", ""},
	} {
		if find(recs, tc.typ, tc.vol) == nil {
			t.Errorf("no %s record for %q", tc.typ, tc.vol)
		}
	}
	if a := find(recs, "attach", "loc"); a != nil && (a.Identity != "root-local" || a.Decision != "allow" || !strings.Contains(a.Reason, "rule at")) {
		t.Errorf("attach record: %+v", a)
	}
	if d := find(recs, "detach", "loc"); d != nil {
		if d.Details["bytes_written"] != float64(1<<20) || d.Details["bytes_read"] != float64(512<<10) || d.Details["ops_flush"] == float64(0) {
			t.Errorf("detach totals: %v", d.Details)
		}
	}
	if r := find(recs, "attach_refused", "loc"); r != nil && !strings.Contains(r.Reason, "no rule grants") {
		t.Errorf("refusal record: %+v", r)
	}
	// No secret anywhere on the record: token, passphrase, keystore keys,
	// wrapped data keys.
	secrets := []string{token, pass}
	var ks struct {
		Keys map[string][]struct{ Key string }
	}
	b, _ := os.ReadFile(filepath.Join(dir, "keystore.json"))
	json.Unmarshal(b, &ks)
	for _, vs := range ks.Keys {
		for _, k := range vs {
			secrets = append(secrets, k.Key)
		}
	}
	for _, v := range []string{"loc", "vlt"} {
		img, _ := os.ReadFile(filepath.Join(dir, "volumes", v+".img"))
		if i := strings.Index(string(img[:8192]), "vault:v"); i >= 0 {
			secrets = append(secrets, string(img[i:i+40]))
		}
		secrets = append(secrets, base64.StdEncoding.EncodeToString(img[120:150]))
	}
	for _, s := range secrets {
		if s != "" && strings.Contains(raw, s) {
			t.Errorf("the audit log holds a secret: %.12q…", s)
		}
	}
	// The whole trail verifies, and so does an export of it.
	out := goldilocks(t, dir, "audit", "verify")
	if !strings.HasPrefix(out, "ok: ") {
		t.Fatalf("verify: %s", out)
	}
	exp := filepath.Join(t.TempDir(), "trail.jsonl.zst")
	goldilocks(t, dir, "audit", "export", "--zstd", "-o", exp)
	goldilocks(t, dir, "audit", "verify", exp, "--key", filepath.Join(dir, "audit", "signing.pub"))
	// A byte changed in the live log: named, exit 1.
	cur := filepath.Join(dir, "audit", "current.jsonl")
	cb, _ := os.ReadFile(cur)
	os.WriteFile(cur, []byte(strings.Replace(string(cb), `"volume":"loc"`, `"volume":"lod"`, 1)), 0o600)
	msg, err := runGoldilocks(dir, "audit", "verify")
	if err == nil || !strings.Contains(msg, "modified: record seq") {
		t.Fatalf("verify of an edited log: %v %s", err, msg)
	}
}

// Disk full: new attaches and key operations are refused with a clear
// error; an attached session keeps doing I/O; when the log is writable
// again, attaches work again.
func TestAuditFailClosed(t *testing.T) {
	need(t, "qemu-io", "nbdsh")
	dir := newEncryptedDataDir(t, "fc:16M")
	g := startGateway(t, dir)
	live := startLoop(t, g.unixURI("fc"), 6)
	waitLog(t, g, "msg=attached", 1)

	cur := filepath.Join(dir, "audit", "current.jsonl")
	if err := os.Rename(cur, cur+".aside"); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("/dev/full", cur); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // the log looks at its path once a second
	out, err := runErr("qemu-io", "-f", "raw", "-c", "read 0 4k", g.uri("fc"))
	if err == nil || !strings.Contains(out, "audit log cannot be written") {
		t.Fatalf("attach with the audit log full: %v\n%s", err, out)
	}
	out, err = runGoldilocks(dir, "key", "rotate", "--all")
	if err == nil || !strings.Contains(out, "audit") {
		t.Fatalf("key rotate with the audit log full: %v\n%s", err, out)
	}
	time.Sleep(500 * time.Millisecond)
	os.Remove(cur)
	os.Rename(cur+".aside", cur)
	run(t, "qemu-io", "-f", "raw", "-c", "read 0 4k", g.uri("fc"))
	if err := live.wait(); err != nil {
		t.Fatalf("the attached session during the audit outage: %v", err)
	}
	g.stop(syscall.SIGTERM)
	if out := goldilocks(t, dir, "audit", "verify"); !strings.HasPrefix(out, "ok: ") {
		t.Fatalf("verify after the outage: %s", out)
	}
}

// loop is a client doing write/read/verify on one connection for a while.
type loop struct {
	done chan error
}

func startLoop(t *testing.T, uri string, seconds int) *loop {
	t.Helper()
	l := &loop{done: make(chan error, 1)}
	script := `
import time
deadline = time.time() + ` + strconv.Itoa(seconds) + `
i = 0
while time.time() < deadline:
    buf = bytes([i % 251]) * 65536
    h.pwrite(buf, (i % 128) * 65536)
    assert h.pread(65536, (i % 128) * 65536) == buf
    i += 1
print("ops", i)
`
	go func() {
		out, err := runErr("nbdsh", "-u", uri, "-c", script)
		if err == nil && !strings.Contains(out, "ops ") {
			err = fmt.Errorf("no ops: %s", out)
		} else if err != nil {
			err = fmt.Errorf("%v: %s", err, out)
		}
		l.done <- err
	}()
	return l
}

func (l *loop) wait() error { return <-l.done }
