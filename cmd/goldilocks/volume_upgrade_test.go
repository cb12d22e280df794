package main

import (
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"goldilocks/internal/block"
)

// v1DataDir copies the format-1 data dir made by the format-1 release
// (internal/volume/testdata/v1-datadir/README.md) into a temp dir and
// returns it with the SHA-256 of the volume's plaintext.
func v1DataDir(t *testing.T) (dir, want string) {
	t.Helper()
	src := filepath.Join("..", "..", "internal", "volume", "testdata", "v1-datadir")
	dir = t.TempDir()
	for _, f := range []string{"keystore.json", "volumes.json"} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	gz, err := os.Open(filepath.Join(src, "v1vol.img.gz"))
	if err != nil {
		t.Fatal(err)
	}
	defer gz.Close()
	zr, err := gzip.NewReader(gz)
	if err != nil {
		t.Fatal(err)
	}
	img, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "volumes"), 0o700)
	if err := os.WriteFile(filepath.Join(dir, "volumes", "v1vol.img"), img, 0o600); err != nil {
		t.Fatal(err)
	}
	sum, err := os.ReadFile(filepath.Join(src, "plaintext.sha256"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, strings.Fields(string(sum))[0]
}

func oneLine(s string) bool { return strings.Count(strings.TrimSpace(s), "\n") == 0 }

func TestVolumeUpgradeCommand(t *testing.T) {
	dir, want := v1DataDir(t)
	raw := filepath.Join(t.TempDir(), "raw")

	// Before: info says format 1; an attach (export) is refused, naming
	// the command to run.
	code, out, _ := runCLI(t, "volume", "info", "v1vol", "--json", "--data-dir", dir)
	var info struct {
		FormatVersion int `json:"format_version"`
	}
	if err := json.Unmarshal([]byte(out), &info); code != 0 || err != nil || info.FormatVersion != 1 {
		t.Fatalf("info before: %d %v %s", code, err, out)
	}
	code, _, stderr := runCLI(t, "volume", "export", "v1vol", "--to", raw, "--data-dir", dir)
	if code != 1 || !strings.Contains(stderr, "run goldilocks volume upgrade v1vol") || !oneLine(stderr) {
		t.Fatalf("export of a format-1 volume: %d %q", code, stderr)
	}

	code, out, stderr = runCLI(t, "volume", "upgrade", "v1vol", "--data-dir", dir)
	if code != 0 || stderr != "" {
		t.Fatalf("upgrade: %d %q %q", code, out, stderr)
	}
	for _, s := range []string{
		"upgraded volume v1vol from format 1 to format 2: 16 of 16 chunks copied (65536 bytes), a new data key under local:default version 1",
		"note: the format-1 data key cannot be destroyed at the keystore; its old ciphertext is gone with the old file, but a copy of the old file plus the KEK still opens it",
	} {
		if !strings.Contains(out, s) {
			t.Errorf("upgrade output %q lacks %q", out, s)
		}
	}

	// Again: nothing to do, exit 0; --json prints one document.
	code, out, _ = runCLI(t, "volume", "upgrade", "v1vol", "--data-dir", dir)
	if code != 0 || !strings.Contains(out, "volume v1vol is already format 2") {
		t.Errorf("second upgrade: %d %q", code, out)
	}
	code, out, _ = runCLI(t, "volume", "upgrade", "v1vol", "--json", "--data-dir", dir)
	var again map[string]any
	if err := json.Unmarshal([]byte(out), &again); code != 0 || err != nil || again["upgraded"] != false || again["format_version"] != float64(2) {
		t.Errorf("second upgrade --json: %d %v %q", code, err, out)
	}

	// After: the plaintext is the one imported into the format-1 volume.
	if code, _, stderr := runCLI(t, "volume", "export", "v1vol", "--to", raw, "--data-dir", dir); code != 0 {
		t.Fatalf("export after the upgrade: %q", stderr)
	}
	b, _ := os.ReadFile(raw)
	if s := sha256.Sum256(b); hex.EncodeToString(s[:]) != want {
		t.Fatalf("plaintext after the upgrade differs")
	}
	code, out, _ = runCLI(t, "volume", "info", "v1vol", "--json", "--data-dir", dir)
	if err := json.Unmarshal([]byte(out), &info); code != 0 || err != nil || info.FormatVersion != 2 {
		t.Fatalf("info after: %d %v %s", code, err, out)
	}
	code, out, _ = runCLI(t, "audit", "export", "--volume", "v1vol", "--data-dir", dir)
	if code != 0 || strings.Count(out, `"volume_upgrade"`) != 3 {
		t.Errorf("audit trail: %d %s", code, out)
	}

	// Failures: exit 1, one line naming the volume and why.
	code, _, stderr = runCLI(t, "volume", "upgrade", "nope", "--data-dir", dir)
	if code != 1 || !strings.Contains(stderr, "volume nope: no such volume") || !oneLine(stderr) {
		t.Errorf("unknown volume: %d %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "volume", "upgrade", "--data-dir", dir)
	if code != 2 {
		t.Errorf("no name: %d %q", code, stderr)
	}
	dir, _ = v1DataDir(t)
	f, err := block.OpenFile(filepath.Join(dir, "volumes", "v1vol.img"), false)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Lock(); err != nil {
		t.Fatal(err)
	}
	code, _, stderr = runCLI(t, "volume", "upgrade", "v1vol", "--data-dir", dir)
	f.Close()
	if code != 1 || !strings.Contains(stderr, "volume v1vol:") || !strings.Contains(stderr, "detach it first") || !oneLine(stderr) {
		t.Errorf("attached volume: %d %q", code, stderr)
	}

	// --json on a fresh one.
	code, out, _ = runCLI(t, "volume", "upgrade", "v1vol", "--json", "--data-dir", dir)
	var res struct {
		Volume     string `json:"volume"`
		Upgraded   bool   `json:"upgraded"`
		FromFormat int    `json:"from_format"`
		ToFormat   int    `json:"to_format"`
		Copied     uint64 `json:"copied"`
		Bytes      uint64 `json:"bytes"`
		Note       string `json:"note"`
		KEK        struct{ Provider, Key string }
	}
	if err := json.Unmarshal([]byte(out), &res); code != 0 || err != nil || !res.Upgraded || res.FromFormat != 1 ||
		res.ToFormat != 2 || res.Copied != 16 || res.Bytes != 65536 || res.KEK.Provider != "local" || !strings.Contains(res.Note, "cannot be destroyed") {
		t.Errorf("upgrade --json: %d %v %s", code, err, out)
	}
}
