package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	"github.com/google/uuid"
	"golang.org/x/sys/unix"

	"goldilocks/crypto"
	"goldilocks/internal/volume"
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
		{[]string{"volume", "frobnicate"}, 2, `unknown command "frobnicate" for "goldilocks volume"`},
		{[]string{"key", "frobnicate"}, 2, `unknown command "frobnicate" for "goldilocks key"`},
	} {
		code, _, stderr := runCLI(t, append(tc.args, "--data-dir", dir)...)
		if code != tc.code || !strings.Contains(stderr, tc.errPart) {
			t.Errorf("%v: exit %d stderr %q; want exit %d mentioning %q", tc.args, code, stderr, tc.code, tc.errPart)
		}
		if code != 0 && strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("%v: error is not one line: %q", tc.args, stderr)
		}
	}
	typo := filepath.Join(dir, "typo")
	for _, args := range [][]string{{"volume", "list"}, {"volume", "info", "a"}, {"volume", "delete", "a", "--yes"}, {"key", "status"}} {
		code, _, stderr := runCLI(t, append(args, "--data-dir", typo)...)
		if code != 1 || !strings.Contains(stderr, "typo does not exist") {
			t.Errorf("%v on a missing data dir: exit %d, %q", args, code, stderr)
		}
	}
	if _, err := os.Stat(typo); !os.IsNotExist(err) {
		t.Errorf("a command on a missing data dir created it: %v", err)
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
	// --json on failure too: every problem, with its line.
	code, out, _ := runCLI(t, "policy", "check", bad, "--json")
	var doc struct {
		Valid  bool `json:"valid"`
		Errors []struct {
			Line    int    `json:"line"`
			Message string `json:"message"`
		} `json:"errors"`
	}
	if err := json.Unmarshal([]byte(out), &doc); code != 1 || err != nil || doc.Valid || len(doc.Errors) != 2 || doc.Errors[0].Line != 2 || doc.Errors[1].Line != 3 {
		t.Errorf("check --json of a bad file: %d %v %s", code, err, out)
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
		{[]string{"--identity", "vm-a", "--volume", "plain1"}, 1, "deny: no rule grants identity vm-a volume plain1 (default deny)"},
		{[]string{"--identity", "vm-a", "--volume", "plain1", "--json"}, 1, `"allow": false`},
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

// openPTY opens a pseudo-terminal: master (what a user types into) and
// slave (the command's stdin).
func openPTY(t *testing.T) (master, slave *os.File) {
	t.Helper()
	m, err := os.OpenFile("/dev/ptmx", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("no pseudo-terminal: %v", err)
	}
	t.Cleanup(func() { m.Close() })
	if err := unix.IoctlSetPointerInt(int(m.Fd()), unix.TIOCSPTLCK, 0); err != nil {
		t.Skipf("unlockpt: %v", err)
	}
	n, err := unix.IoctlGetInt(int(m.Fd()), unix.TIOCGPTN)
	if err != nil {
		t.Skipf("ptsname: %v", err)
	}
	s, err := os.OpenFile(fmt.Sprintf("/dev/pts/%d", n), os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		t.Skipf("open pts: %v", err)
	}
	t.Cleanup(func() { s.Close() })
	return m, s
}

func TestVolumeShredConfirm(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"v1", "v2"} {
		if code, _, stderr := runCLI(t, "volume", "create", n, "--size", "1M", "--data-dir", dir); code != 0 {
			t.Fatalf("create %s: %s", n, stderr)
		}
	}
	ks := filepath.Join(dir, "keystore.json")
	uuidOf := func(name string) string {
		code, out, _ := runCLI(t, "volume", "info", name, "--json", "--data-dir", dir)
		var v struct{ UUID string }
		if err := json.Unmarshal([]byte(out), &v); code != 0 || err != nil {
			t.Fatalf("info %s: %d %v", name, code, err)
		}
		return v.UUID
	}
	u1, u2 := uuidOf("v1"), uuidOf("v2")
	if b, _ := os.ReadFile(ks); !strings.Contains(string(b), u1) || !strings.Contains(string(b), u2) {
		t.Fatalf("the keystore holds no DEK secret for the volumes:\n%s", b)
	}
	// No terminal, no --yes: a usage error, nothing done.
	code, _, stderr := runCLI(t, "volume", "shred", "v1", "--data-dir", dir)
	if code != 2 || !strings.Contains(stderr, "--yes") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Errorf("shred without a terminal: %d %q", code, stderr)
	}
	if code, _, _ := runCLI(t, "volume", "info", "v1", "--data-dir", dir); code != 0 {
		t.Error("a refused shred removed the volume")
	}
	// On a terminal: the wrong name is no, the right one is yes.
	for _, tc := range []struct {
		typed string
		code  int
	}{
		{"v2\n", 1},
		{"yes\n", 1},
		{"v1\n", 0},
	} {
		m, s := openPTY(t)
		if _, err := m.WriteString(tc.typed); err != nil {
			t.Fatal(err)
		}
		var o, e bytes.Buffer
		code := run(&app{stdin: s, stdout: &o, stderr: &e}, []string{"volume", "shred", "v1", "--data-dir", dir})
		if code != tc.code || !strings.Contains(e.String(), "Type the volume name to confirm") {
			t.Errorf("typed %q: exit %d, stderr %q", tc.typed, code, e.String())
		}
	}
	if code, _, _ := runCLI(t, "volume", "info", "v1", "--data-dir", dir); code != 1 {
		t.Error("v1 is still listed after a confirmed shred")
	}
	// The storage tier keeps a copy of v2's header, then blanks the
	// header's magic (or relabels its version) so that a shred cannot
	// read which keys to destroy.
	backing := filepath.Join(dir, "volumes", "v2.img")
	img, err := os.ReadFile(backing)
	if err != nil {
		t.Fatal(err)
	}
	backup := filepath.Join(t.TempDir(), "header-copy")
	if err := os.WriteFile(backup, img[:2*crypto.HeaderBlockSize], 0o600); err != nil {
		t.Fatal(err)
	}
	h, err := volume.ReadHeaderFile(backup)
	if err != nil {
		t.Fatal(err)
	}
	id := [16]byte(uuid.MustParse(u2))
	kek := crypto.NewLocalKEK(dir, nil)
	if _, err := kek.Unwrap(context.Background(), h.KEK, id, h.DEK[h.Active]); err != nil {
		t.Fatalf("the header copy does not open before the shred: %v", err)
	}
	f, err := os.OpenFile(backing, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(make([]byte, 16), 0)
	f.WriteAt(make([]byte, 16), crypto.HeaderBlockSize)
	f.Close()
	// --yes needs no terminal.
	code, out, stderr := runCLI(t, "volume", "shred", "v2", "--yes", "--json", "--data-dir", dir)
	var res map[string]any
	if err := json.Unmarshal([]byte(out), &res); code != 0 || err != nil || res["shredded"] != true {
		t.Errorf("shred --yes --json: %d %q %q", code, out, stderr)
	}
	// The DEK secrets are gone from the keystore: a copy of a header
	// opens no more.
	if b, _ := os.ReadFile(ks); strings.Contains(string(b), u1) || strings.Contains(string(b), u2) {
		t.Errorf("the keystore still holds a shredded volume's DEK secret:\n%s", b)
	}
	if _, err := kek.Unwrap(context.Background(), h.KEK, id, h.DEK[h.Active]); !errors.Is(err, crypto.ErrKeyDestroyed) {
		t.Errorf("the header copy kept from before the shred: %v; want ErrKeyDestroyed", err)
	}
}

func TestUnsealedKeystoreWarnings(t *testing.T) {
	dir := t.TempDir()
	outside := filepath.Join(t.TempDir(), "ext.img")
	if err := os.WriteFile(outside, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(outside, 16<<20); err != nil {
		t.Fatal(err)
	}
	const warn = "the local keystore is not sealed and sits in the data dir"
	for _, tc := range []struct {
		name string
		args []string
		warn bool
	}{
		{"enc", nil, true},
		{"plain", []string{"--plain"}, false},
		{"ext", []string{"--backing", outside}, false},
	} {
		code, out, stderr := runCLI(t, append([]string{"volume", "create", tc.name, "--size", "1M", "--json", "--data-dir", dir}, tc.args...)...)
		if code != 0 || !json.Valid([]byte(out)) {
			t.Fatalf("create %s: %d %q %q", tc.name, code, out, stderr)
		}
		if strings.Contains(stderr, warn) != tc.warn || tc.warn && strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
			t.Errorf("create %s: stderr %q; want the warning: %v, on one line", tc.name, stderr, tc.warn)
		}
		code, out, _ = runCLI(t, "volume", "info", tc.name, "--json", "--data-dir", dir)
		var j struct{ Warnings []string }
		if err := json.Unmarshal([]byte(out), &j); code != 0 || err != nil {
			t.Fatalf("info %s --json: %d %v %s", tc.name, code, err, out)
		}
		if got := len(j.Warnings) == 1 && strings.Contains(j.Warnings[0], warn); got != tc.warn || !tc.warn && len(j.Warnings) != 0 {
			t.Errorf("info %s --json warnings: %q", tc.name, j.Warnings)
		}
		code, out, _ = runCLI(t, "volume", "info", tc.name, "--data-dir", dir)
		if code != 0 || strings.Contains(out, "warning:") != tc.warn {
			t.Errorf("info %s: %s", tc.name, out)
		}
	}
	// serve's start: one line naming the volumes.
	reg, err := volume.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	vols, _ := reg.List()
	var buf bytes.Buffer
	warnKeystore(reg, slog.New(slog.NewTextHandler(&buf, nil)), vols)
	if s := buf.String(); strings.Count(s, "\n") != 1 || !strings.Contains(s, warn) || !strings.HasSuffix(s, " volumes=enc\n") {
		t.Errorf("serve warning: %q", s)
	}
	// A passphrase against this unsealed keystore: refused, and said.
	t.Setenv("GOLDILOCKS_KEYSTORE_PASSPHRASE", "pw")
	code, _, stderr := runCLI(t, "volume", "create", "enc2", "--size", "1M", "--data-dir", dir)
	if code != 1 || !strings.Contains(stderr, "keystore.json is not sealed, but a passphrase is set") {
		t.Errorf("create with a passphrase against an unsealed keystore: %d %q", code, stderr)
	}
	code, out, _ := runCLI(t, "volume", "info", "enc", "--data-dir", dir)
	if code != 0 || !strings.Contains(out, "warning:") || !strings.Contains(out, "is not sealed, but a passphrase is set") {
		t.Errorf("info with a passphrase against an unsealed keystore: %d %s", code, out)
	}
	// A sealed keystore: no warning.
	sealed := t.TempDir()
	code, _, stderr = runCLI(t, "volume", "create", "s", "--size", "1M", "--data-dir", sealed)
	if code != 0 || strings.Contains(stderr, warn) {
		t.Errorf("create with a sealed keystore: %d %q", code, stderr)
	}
	if code, out, _ := runCLI(t, "volume", "info", "s", "--json", "--data-dir", sealed); code != 0 || strings.Contains(out, "warnings") {
		t.Errorf("info with a sealed keystore: %d %s", code, out)
	}
}

// TestVolumeExportTargets: export writes a sparse regular file, standard
// output ("-") and a character device (/dev/null), each with the
// volume's plaintext.
func TestVolumeExportTargets(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "in.raw")
	want := bytes.Repeat([]byte("goldilocks export "), 1<<16) // 1.1 MiB, not a chunk multiple
	want = append(want, make([]byte, 4<<20-len(want))...)     // then zeros to 4 MiB
	if err := os.WriteFile(raw, want, 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "volume", "import", "v", "--from", raw, "--data-dir", dir); code != 0 {
		t.Fatalf("import: %q", stderr)
	}
	out := filepath.Join(dir, "out.raw")
	for _, to := range []string{out, "-", os.DevNull} {
		code, stdout, stderr := runCLI(t, "volume", "export", "v", "--to", to, "--data-dir", dir)
		if code != 0 {
			t.Fatalf("export --to %s: %d %q", to, code, stderr)
		}
		got := []byte(stdout)
		switch to {
		case out:
			var err error
			if got, err = os.ReadFile(out); err != nil {
				t.Fatal(err)
			}
		case os.DevNull:
			continue
		}
		if !bytes.Equal(got, want) {
			t.Errorf("export --to %s: %d bytes, not the imported %d", to, len(got), len(want))
		}
	}
}

func TestVersion(t *testing.T) {
	for _, args := range [][]string{{"version"}, {"--version"}} {
		code, out, stderr := runCLI(t, args...)
		// A test binary has no -X version: the version comes from the
		// build info Go recorded (or "dev" when it recorded none).
		if code != 0 || !strings.HasPrefix(out, "goldilocks ") || strings.TrimSpace(strings.TrimPrefix(out, "goldilocks ")) == "" {
			t.Errorf("%v: exit %d stdout %q stderr %q", args, code, out, stderr)
		}
	}
}

func TestVolumeDeleteResizeLabel(t *testing.T) {
	dir := t.TempDir()
	cli := func(args ...string) (int, string, string) {
		return runCLI(t, append(args, "--data-dir", dir)...)
	}
	for _, args := range [][]string{
		{"volume", "create", "p", "--size", "1M", "--plain"},
		{"volume", "create", "q", "--size", "1.5M", "--plain"},
		{"volume", "create", "e", "--size", "1M"},
	} {
		if code, _, stderr := cli(args...); code != 0 {
			t.Fatalf("%v: %s", args, stderr)
		}
	}
	backing := filepath.Join(dir, "volumes", "p.img")
	if err := os.WriteFile(backing, bytes.Repeat([]byte{0xab}, 1<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		args    []string
		code    int
		outPart string // stdout, or stderr on failure
	}{
		// Destructive commands without a terminal need --yes.
		{[]string{"volume", "delete", "p"}, 2, "refusing without a terminal"},
		{[]string{"volume", "delete", "nope", "--yes"}, 1, "no such volume"},
		// Labels.
		{[]string{"volume", "label", "set", "p", "tier=gold", "os=debian"}, 0, "labels: os=debian,tier=gold"},
		{[]string{"volume", "label", "set", "p", "novalue"}, 2, "want KEY=VALUE"},
		{[]string{"volume", "label", "rm", "p", "os"}, 0, "labels: tier=gold"},
		{[]string{"volume", "info", "p"}, 0, "tier=gold"},
		{[]string{"volume", "list"}, 0, "tier=gold"},
		// Resize: grow, shrink refused, shrink allowed, encrypted refused.
		{[]string{"volume", "resize", "p", "--size", "2M"}, 0, "1 MiB to 2 MiB"},
		{[]string{"volume", "resize", "p", "--size", "1M"}, 1, "--allow-shrink"},
		{[]string{"volume", "resize", "p", "--size", "1M", "--allow-shrink"}, 0, "2 MiB to 1 MiB"},
		{[]string{"volume", "resize", "p", "--size", "1000"}, 1, "multiple of 4096"},
		{[]string{"volume", "resize", "e", "--size", "2M"}, 1, "size is fixed by its format"},
		{[]string{"volume", "info", "q"}, 0, "1.5 MiB (1572864 bytes)"},
		// Delete: plain keeps its backing file; encrypted is shredded.
		{[]string{"volume", "delete", "p", "--yes"}, 0, "backing store stays"},
		{[]string{"volume", "delete", "q", "--yes", "--shred"}, 0, "overwritten with zeros"},
		{[]string{"volume", "delete", "e", "--yes"}, 0, "data key is destroyed"},
	} {
		code, stdout, stderr := cli(tc.args...)
		got := stdout
		if code != 0 {
			got = stderr
		}
		if code != tc.code || !strings.Contains(got, tc.outPart) {
			t.Errorf("%v: exit %d, stdout %q stderr %q; want exit %d with %q", tc.args, code, stdout, stderr, tc.code, tc.outPart)
		}
	}
	if b, err := os.ReadFile(backing); err != nil || len(b) != 1<<20 || b[0] != 0xab {
		t.Errorf("volume delete of a plain volume touched its backing file: %d bytes, %v", len(b), err)
	}
	if _, err := os.Stat(filepath.Join(dir, "volumes", "q.img")); !os.IsNotExist(err) {
		t.Errorf("volume delete --shred left q's backing file: %v", err)
	}
	if _, out, _ := cli("volume", "list", "--json"); strings.TrimSpace(out) != "[]" {
		t.Errorf("volumes left after delete: %s", out)
	}
	// Each change is on the audit trail, with who did it.
	_, out, _ := cli("audit", "export")
	for _, ev := range []string{`"volume_label"`, `"volume_resize"`, `"volume_delete"`} {
		if !strings.Contains(out, ev) {
			t.Errorf("audit trail lacks %s", ev)
		}
	}
}

// Every setting: flag > environment > config file > default, for every
// command, and config show says which.
func TestConfigPrecedence(t *testing.T) {
	dirFile, dirEnv, dirFlag := t.TempDir(), t.TempDir(), t.TempDir()
	for _, d := range []string{dirFile, dirEnv, dirFlag} {
		if code, _, stderr := runCLI(t, "volume", "create", "in-"+filepath.Base(d), "--size", "1M", "--plain", "--data-dir", d); code != 0 {
			t.Fatal(stderr)
		}
	}
	cfg := filepath.Join(t.TempDir(), "goldilocks.yaml")
	os.WriteFile(cfg, []byte("data_dir: "+dirFile+"\nlisten: 127.0.0.1:10999\naudit:\n  on_failure: continue\nmap_cache: 64MiB\n"), 0o600)
	list := func(args ...string) string {
		t.Helper()
		code, out, stderr := runCLI(t, append([]string{"volume", "list", "--json"}, args...)...)
		if code != 0 {
			t.Fatalf("volume list %v: %s", args, stderr)
		}
		return out
	}
	// The file alone (volume list used to ignore it).
	if out := list("--config", cfg); !strings.Contains(out, "in-"+filepath.Base(dirFile)) {
		t.Errorf("volume list --config: the file's data_dir not used:\n%s", out)
	}
	// GOLDILOCKS_CONFIG names the file too.
	t.Setenv("GOLDILOCKS_CONFIG", cfg)
	if out := list(); !strings.Contains(out, "in-"+filepath.Base(dirFile)) {
		t.Errorf("GOLDILOCKS_CONFIG: the file's data_dir not used:\n%s", out)
	}
	// The environment beats the file (the file's data_dir used to win).
	t.Setenv("GOLDILOCKS_DATA_DIR", dirEnv)
	if out := list(); !strings.Contains(out, "in-"+filepath.Base(dirEnv)) {
		t.Errorf("GOLDILOCKS_DATA_DIR lost to the file:\n%s", out)
	}
	// The flag beats both.
	if out := list("--data-dir", dirFlag); !strings.Contains(out, "in-"+filepath.Base(dirFlag)) {
		t.Errorf("--data-dir lost:\n%s", out)
	}
	// config show names each source; GOLDILOCKS_POLICY reaches serve.
	t.Setenv("GOLDILOCKS_POLICY", "/etc/goldilocks/policy.yaml")
	t.Setenv("GOLDILOCKS_MAP_CACHE", "48MiB")
	code, out, _ := runCLI(t, "config", "show", "--json", "--listen", "127.0.0.1:1")
	if code != 2 {
		t.Fatalf("config show accepted a flag of serve as its own: %d %s", code, out)
	}
	code, out, stderr := runCLI(t, "config", "show", "--json")
	if code != 0 {
		t.Fatalf("config show: %s", stderr)
	}
	var doc struct {
		Command  string    `json:"command"`
		Settings []setting `json:"settings"`
	}
	if err := json.Unmarshal([]byte(out), &doc); err != nil {
		t.Fatal(err)
	}
	got := map[string]setting{}
	for _, s := range doc.Settings {
		got[s.Name] = s
	}
	for name, want := range map[string]setting{
		"policy":           {Value: "/etc/goldilocks/policy.yaml", Source: fromEnv, Origin: "GOLDILOCKS_POLICY"},
		"data-dir":         {Value: dirEnv, Source: fromEnv, Origin: "GOLDILOCKS_DATA_DIR"},
		"map-cache":        {Value: "48MiB", Source: fromEnv, Origin: "GOLDILOCKS_MAP_CACHE"},
		"listen":           {Value: "127.0.0.1:10999", Source: fromFile, Origin: cfg},
		"audit-on-failure": {Value: "continue", Source: fromFile, Origin: cfg},
		"config":           {Value: cfg, Source: fromEnv, Origin: "GOLDILOCKS_CONFIG"},
		"max-inflight":     {Value: "32", Source: fromDefault},
	} {
		want.Name = name
		if got[name] != want {
			t.Errorf("config show %s = %+v, want %+v", name, got[name], want)
		}
	}
	if doc.Command != "goldilocks serve" {
		t.Errorf("config show describes %q", doc.Command)
	}
	// A flag given to config show counts as given.
	_, out, _ = runCLI(t, "config", "show", "--data-dir", dirFlag)
	if !regexp.MustCompile(`data-dir +` + regexp.QuoteMeta(dirFlag) + ` +flag`).MatchString(out) {
		t.Errorf("config show --data-dir: %s", out)
	}
	// A bad value names where it came from.
	t.Setenv("GOLDILOCKS_MAX_INFLIGHT", "many")
	code, _, stderr = runCLI(t, "serve")
	if code != 2 || !strings.Contains(stderr, "GOLDILOCKS_MAX_INFLIGHT") {
		t.Errorf("bad GOLDILOCKS_MAX_INFLIGHT: exit %d %s", code, stderr)
	}
}

func TestShellCompletion(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"vm-root", "vm-data", "other"} {
		if code, _, stderr := runCLI(t, "volume", "create", n, "--size", "1M", "--plain", "--data-dir", dir); code != 0 {
			t.Fatal(stderr)
		}
	}
	for _, tc := range []struct {
		args []string
		want []string
		not  []string
	}{
		{[]string{"volume", "info", "--data-dir", dir, "vm-"}, []string{"vm-root", "vm-data"}, []string{"other"}},
		{[]string{"volume", "delete", "--data-dir", dir, ""}, []string{"vm-root", "other"}, nil},
		{[]string{"volume", "info", "--data-dir", dir, "vm-root", ""}, nil, []string{"vm-data"}}, // one name only
		{[]string{"serve", "--log-format", ""}, []string{"text", "json"}, nil},
		{[]string{"volume", "create", "x", "--cipher", ""}, []string{"aes-256-gcm", "chacha20-poly1305"}, nil},
	} {
		code, out, stderr := runCLI(t, append([]string{"__complete"}, tc.args...)...)
		if code != 0 {
			t.Fatalf("complete %v: %s", tc.args, stderr)
		}
		lines := strings.Split(out, "\n")
		for _, w := range tc.want {
			if !slices.Contains(lines, w) {
				t.Errorf("complete %v: no %q in %q", tc.args, w, out)
			}
		}
		for _, w := range tc.not {
			if slices.Contains(lines, w) {
				t.Errorf("complete %v: %q offered in %q", tc.args, w, out)
			}
		}
	}
	if code, out, _ := runCLI(t, "completion", "bash"); code != 0 || !strings.Contains(out, "__start_goldilocks") {
		t.Errorf("completion bash: %d", code)
	}
}

// TestVolumeCreateOverHeld: creating a volume over a backing store that
// already holds one (another data dir's, as another gateway's on shared
// storage) destroys it, so the CLI refuses without a terminal unless
// --yes, naming adopt, and asks on one.
func TestVolumeCreateOverHeld(t *testing.T) {
	back := filepath.Join(t.TempDir(), "shared.img")
	if err := os.WriteFile(back, make([]byte, 8<<20), 0o600); err != nil {
		t.Fatal(err)
	}
	if code, _, stderr := runCLI(t, "volume", "create", "vm", "--size", "2M", "--backing", back, "--data-dir", t.TempDir()); code != 0 {
		t.Fatalf("create: %s", stderr)
	}
	orig, _ := os.ReadFile(back)
	dir := t.TempDir()
	code, _, stderr := runCLI(t, "volume", "create", "vm", "--size", "2M", "--backing", back, "--data-dir", dir)
	if code != 1 || !strings.Contains(stderr, "already holds an encrypted volume") || !strings.Contains(stderr, "volume adopt vm --backing") ||
		!strings.Contains(stderr, "--yes") || strings.Count(strings.TrimSpace(stderr), "\n") != 0 {
		t.Errorf("create over a held store without a terminal: %d %q", code, stderr)
	}
	for _, tc := range []struct {
		typed string
		code  int
	}{
		{"other\n", 1},
		{"vm\n", 0},
	} {
		m, s := openPTY(t)
		if _, err := m.WriteString(tc.typed); err != nil {
			t.Fatal(err)
		}
		var o, e bytes.Buffer
		code := run(&app{stdin: s, stdout: &o, stderr: &e}, []string{"volume", "create", "vm", "--size", "2M", "--backing", back, "--data-dir", dir})
		if code != tc.code || !strings.Contains(e.String(), "data is lost for good. Type vm to confirm") {
			t.Errorf("typed %q: exit %d, stderr %q", tc.typed, code, e.String())
		}
		now, _ := os.ReadFile(back)
		if changed := !bytes.Equal(now, orig); changed != (tc.code == 0) {
			t.Errorf("typed %q: the store changed: %v", tc.typed, changed)
		}
	}
	// --yes needs no terminal (the store now holds this dir's volume).
	if code, _, stderr := runCLI(t, "volume", "create", "vm2", "--size", "2M", "--backing", back, "--yes", "--data-dir", t.TempDir()); code != 0 {
		t.Errorf("create --yes over a held store: %d %q", code, stderr)
	}
}
