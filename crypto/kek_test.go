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
	l := NewLocalKEK(dir, nil)
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
	got, err := NewLocalKEK(dir, nil).Unwrap(ctx, KeyRef{"local", "default", 1}, vol, w)
	if err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap: %v", err)
	}
	if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 1}, other, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("unwrapped under another volume: %v", err)
	}
	if v2, err := l.Rotate(ctx, "default"); err != nil || v2 != 2 {
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

func TestSealedKeystore(t *testing.T) {
	dir := t.TempDir()
	ctx := context.Background()
	vol := [16]byte{9}
	dek := bytes.Repeat([]byte{0x5e}, 32)
	l := NewLocalKEK(dir, []byte("correct horse"))
	w, v, err := l.Wrap(ctx, "default", vol, dek)
	if err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
	if !bytes.Contains(raw, []byte(`"kdf": "argon2id"`)) {
		t.Fatalf("keystore is not sealed: %s", raw)
	}
	ref := KeyRef{"local", "default", v}
	if got, err := NewLocalKEK(dir, []byte("correct horse")).Unwrap(ctx, ref, vol, w); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap with the passphrase: %v", err)
	}
	for _, pass := range [][]byte{nil, []byte("wrong horse")} {
		if _, err := NewLocalKEK(dir, pass).Unwrap(ctx, ref, vol, w); !errors.Is(err, ErrKeystoreSealed) {
			t.Fatalf("unwrap with passphrase %q: %v", pass, err)
		}
	}
	// The plain keystore of another dir is not sealed by a passphrase given later.
	plain := t.TempDir()
	if _, _, err := NewLocalKEK(plain, nil).Wrap(ctx, "default", vol, dek); err != nil {
		t.Fatal(err)
	}
	if raw, _ := os.ReadFile(filepath.Join(plain, KeystoreFile)); bytes.Contains(raw, []byte("argon2id")) {
		t.Fatal("a keystore made without a passphrase is sealed")
	}
}
