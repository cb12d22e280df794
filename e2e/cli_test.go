package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// A plain `go build` (no Makefile, no -ldflags) still knows its version:
// the VCS revision Go records in the binary.
func TestVersionOfPlainGoBuild(t *testing.T) {
	need(t, "git")
	rev, err := exec.Command("git", "rev-parse", "HEAD").Output()
	if err != nil {
		t.Skipf("not a git checkout: %v", err)
	}
	bin := filepath.Join(t.TempDir(), "goldilocks")
	build := exec.Command("go", "build", "-o", bin, "goldilocks/cmd/goldilocks")
	// Go's default; this machine's go env sets -buildvcs=false.
	build.Env = append(os.Environ(), "GOFLAGS=-buildvcs=auto")
	if out, err := build.CombinedOutput(); err != nil {
		t.Fatalf("go build: %v\n%s", err, out)
	}
	out, err := exec.Command(bin, "version").Output()
	if err != nil {
		t.Fatal(err)
	}
	want := "goldilocks " + string(rev[:12])
	if !strings.HasPrefix(string(out), want) {
		t.Fatalf("version of a plain go build: %q, want it to start with %q", out, want)
	}
	out, _ = exec.Command(bin, "--version").Output()
	if !strings.HasPrefix(string(out), want) {
		t.Fatalf("--version of a plain go build: %q, want it to start with %q", out, want)
	}
}
