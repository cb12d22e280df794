package crypto

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
)

func TestLocalKEK(t *testing.T) {
	dir := t.TempDir()
	l := NewLocalKEK(dir)
	ctx := context.Background()
	vol, other := [16]byte{1}, [16]byte{2}
	dek := bytes.Repeat([]byte{0x77}, 32)
	w, v, err := l.Wrap(ctx, "default", vol, dek)
	if err != nil || v != 1 {
		t.Fatalf("wrap: v%d %v", v, err)
	}
	if bytes.Contains(w, dek) {
		t.Fatal("wrapped key contains the key")
	}
	st, err := os.Stat(filepath.Join(dir, KeystoreFile))
	if err != nil || st.Mode().Perm() != 0o600 {
		t.Fatalf("keystore mode %v %v", st.Mode(), err)
	}
	got, err := NewLocalKEK(dir).Unwrap(ctx, KeyRef{"local", "default", 1}, vol, w)
	if err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap: %v", err)
	}
	if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 1}, other, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("unwrapped under another volume: %v", err)
	}
	if v2, err := l.Rotate("default"); err != nil || v2 != 2 {
		t.Fatalf("rotate: %d %v", v2, err)
	}
	if _, v, _ := l.Wrap(ctx, "default", vol, dek); v != 2 {
		t.Fatalf("wrap after rotate used version %d", v)
	}
	// The old version still unwraps what it wrapped.
	if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 1}, vol, w); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 9}, vol, w); err == nil {
		t.Fatal("unknown version unwrapped")
	}
}
