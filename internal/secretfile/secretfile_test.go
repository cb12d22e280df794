package secretfile

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestRead(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		mode os.FileMode
		ok   bool
	}{
		{0o600, true}, {0o400, true}, {0o700, true},
		{0o640, false}, {0o604, false}, {0o620, false}, {0o602, false}, {0o644, false}, {0o660, false},
	} {
		p := filepath.Join(dir, tc.mode.String())
		if err := os.WriteFile(p, []byte("s3cret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(p, tc.mode); err != nil {
			t.Fatal(err)
		}
		b, err := Read(p)
		cerr := Check(p)
		if tc.ok && (err != nil || string(b) != "s3cret" || cerr != nil) {
			t.Errorf("mode %04o: %q %v %v", tc.mode, b, err, cerr)
		}
		if !tc.ok && (!errors.Is(err, ErrLoose) || !errors.Is(cerr, ErrLoose) || b != nil) {
			t.Errorf("mode %04o accepted: %q %v %v", tc.mode, b, err, cerr)
		}
	}
	if _, err := Read(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing file: %v", err)
	}
	if _, err := Read(dir); err == nil {
		t.Error("a directory was read as a secret file")
	}
}
