package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var o, e bytes.Buffer
	code = run(&app{stdout: &o, stderr: &e}, args)
	return code, o.String(), e.String()
}

func TestVolumeCommands(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		args    []string
		code    int
		errPart string
	}{
		{[]string{"volume", "create", "a", "--size", "64M", "--plain"}, 0, ""},
		{[]string{"volume", "create", "a", "--size", "64M", "--plain"}, 1, "already exists"},
		{[]string{"volume", "create", "b", "--size", "lots", "--plain"}, 2, "size"},
		{[]string{"volume", "create", "b", "--plain"}, 2, "--size is required"},
		{[]string{"volume", "create", "b", "--size", "1M", "--bogus"}, 2, "unknown flag"},
		{[]string{"volume", "create", "enc", "--size", "1M"}, 0, ""},
		{[]string{"volume", "create", "enc2", "--size", "1M", "--kek", "vault:k"}, 1, "vault"},
		{[]string{"volume", "create", "enc3", "--size", "1M", "--cipher", "rot13"}, 2, "--cipher"},
		{[]string{"volume", "create", "b/c", "--size", "1M", "--plain"}, 1, "invalid volume name"},
		{[]string{"volume", "info"}, 2, "accepts 1 arg"},
		{[]string{"volume", "info", "zzz"}, 1, "no such volume"},
		{[]string{"nonsense"}, 2, "unknown command"},
	} {
		code, _, stderr := runCLI(t, append(tc.args, "--data-dir", dir)...)
		if code != tc.code || !strings.Contains(stderr, tc.errPart) {
			t.Errorf("%v: exit %d stderr %q; want exit %d mentioning %q", tc.args, code, stderr, tc.code, tc.errPart)
		}
		if code != 0 && strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v: error is not one line: %q", tc.args, stderr)
		}
	}
	code, out, _ := runCLI(t, "volume", "info", "a", "--json", "--data-dir", dir)
	var v map[string]any
	if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil {
		t.Fatalf("info --json: %d %v %s", code, err, out)
	}
	for k, want := range map[string]any{"name": "a", "size": float64(64 << 20), "encrypted": false, "kek": nil} {
		if v[k] != want {
			t.Errorf("info %s = %v, want %v", k, v[k], want)
		}
	}
	if b, _ := v["backing"].(string); !strings.HasSuffix(b, "/volumes/a.img") {
		t.Errorf("backing = %v", v["backing"])
	}
	code, out, _ = runCLI(t, "volume", "info", "enc", "--json", "--data-dir", dir)
	v = nil
	if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil {
		t.Fatalf("info --json: %d %v %s", code, err, out)
	}
	kek, _ := v["kek"].(map[string]any)
	if v["encrypted"] != true || v["cipher"] != "aes-256-gcm" || kek["provider"] != "local" || kek["key"] != "default" {
		t.Errorf("encrypted volume info: %s", out)
	}
	// No key material: neither the KEK from the keystore nor a wrapped DEK.
	ks, err := os.ReadFile(filepath.Join(dir, "keystore.json"))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		Keys map[string][]struct{ Key string }
	}
	json.Unmarshal(ks, &doc)
	for _, k := range doc.Keys["default"] {
		if k.Key == "" || strings.Contains(out, k.Key) {
			t.Errorf("info shows key material (or the keystore has none): %s", out)
		}
	}
	if strings.Contains(strings.ToLower(out), "wrapped") {
		t.Errorf("info shows a wrapped key: %s", out)
	}
	code, out, _ = runCLI(t, "volume", "list", "--json", "--data-dir", dir)
	var l []map[string]any
	if err := json.Unmarshal([]byte(out), &l); code != 0 || err != nil || len(l) != 2 {
		t.Fatalf("list --json: %d %v %s", code, err, out)
	}
}

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"4096", 4096, true}, {"1K", 1024, true}, {"1KiB", 1024, true}, {"64M", 64 << 20, true},
		{"2G", 2 << 30, true}, {"1T", 1 << 40, true}, {"1g", 1 << 30, true},
		{"", 0, false}, {"0", 0, false}, {"-1", 0, false}, {"1X", 0, false}, {"99999999P", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v", tc.in, got, err)
		}
	}
}

func TestPolicyCommands(t *testing.T) {
	dir := t.TempDir()
	pol := filepath.Join(dir, "p.yaml")
	os.WriteFile(pol, []byte(`identities:
  - {name: vm-a, tls: {uri_san: "spiffe://lab/vm-a"}}
rules:
  - {identity: vm-a, volumes: ["*"], labels: {tier: gold}, access: read-write, iops: 100}
`), 0o600)
	bad := filepath.Join(dir, "bad.yaml")
	os.WriteFile(bad, []byte("rules:\n  - {identity: ghost, volumes: [x]}\n  - {identity: \"*\", volumes: [y], access: sometimes}\n"), 0o600)
	if code, out, _ := runCLI(t, "policy", "check", pol); code != 0 || !strings.Contains(out, "ok: 1 identities, 1 rules") {
		t.Errorf("check of a good file: %d %q", code, out)
	}
	code, _, stderr := runCLI(t, "policy", "check", bad)
	if code != 1 || !strings.Contains(stderr, "bad.yaml:2: rule names identity \"ghost\"") || !strings.Contains(stderr, "bad.yaml:3: access \"sometimes\"") {
		t.Errorf("check of a bad file: %d\n%s", code, stderr)
	}
	// Labels come from the registry.
	runCLI(t, "volume", "create", "gold1", "--size", "1M", "--plain", "--label", "tier=gold", "--data-dir", dir)
	runCLI(t, "volume", "create", "plain1", "--size", "1M", "--plain", "--data-dir", dir)
	for _, tc := range []struct {
		args []string
		code int
		out  string
	}{
		{[]string{"--identity", "vm-a", "--volume", "gold1"}, 0, "allow read-write: identity vm-a may attach gold1 read-write (rule at " + pol + ":4)"},
		{[]string{"--identity", "vm-a", "--volume", "plain1"}, 0, "deny: no rule grants identity vm-a volume plain1 (default deny)"},
		{[]string{"--identity", "vm-z", "--volume", "gold1"}, 1, ""},
		{[]string{"--identity", "vm-a"}, 2, ""},
	} {
		code, out, _ := runCLI(t, append([]string{"policy", "explain", "--policy", pol, "--data-dir", dir}, tc.args...)...)
		if code != tc.code || !strings.Contains(out, tc.out) {
			t.Errorf("explain %v: %d %q, want %d %q", tc.args, code, out, tc.code, tc.out)
		}
	}
}

func TestConfigFile(t *testing.T) {
	dir := t.TempDir()
	cfg := filepath.Join(dir, "gw.yaml")
	os.WriteFile(cfg, []byte("audit:\n  on_failure: sometimes\n"), 0o600)
	code, _, stderr := runCLI(t, "serve", "--config", cfg, "--data-dir", dir, "--listen", "", "--unix", "none")
	if code != 2 || !strings.Contains(stderr, `--audit-on-failure "sometimes"`) {
		t.Errorf("config audit.on_failure reached the flag? %d %s", code, stderr)
	}
	os.WriteFile(cfg, []byte("listne: 1.2.3.4:1\n"), 0o600)
	code, _, stderr = runCLI(t, "serve", "--config", cfg, "--data-dir", dir)
	if code != 2 || !strings.Contains(stderr, `unknown setting "listne"`) {
		t.Errorf("unknown config key: %d %s", code, stderr)
	}
}
