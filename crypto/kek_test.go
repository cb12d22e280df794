package crypto

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
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

// v1Vector is the format-1 wrapped DEK of testdata/wrapped-dek-v1.hex and
// the data dir holding testdata/keystore-v1.json as its keystore.
func v1Vector(t *testing.T) (dir string, ref KeyRef, volume [16]byte, wrapped []byte) {
	t.Helper()
	h, err := os.ReadFile("testdata/wrapped-dek-v1.hex")
	if err != nil {
		t.Fatal(err)
	}
	if wrapped, err = hex.DecodeString(strings.TrimSpace(string(h))); err != nil || len(wrapped) != 60 {
		t.Fatalf("wrapped-dek-v1.hex: %d bytes, %v", len(wrapped), err)
	}
	ks, err := os.ReadFile("testdata/keystore-v1.json")
	if err != nil {
		t.Fatal(err)
	}
	dir = t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, KeystoreFile), ks, 0o600); err != nil {
		t.Fatal(err)
	}
	u, _ := hex.DecodeString("0e93687030c140c0b683b80df2de8125")
	copy(volume[:], u)
	return dir, KeyRef{"local", "default", 1}, volume, wrapped
}

func TestLocalKEKFormat1WrappedDEK(t *testing.T) {
	ctx := context.Background()
	dir, ref, vol, w := v1Vector(t)
	l := NewLocalKEK(dir, nil)
	dek, err := l.Unwrap(ctx, ref, vol, w)
	if err != nil || len(dek) != 32 {
		t.Fatalf("format-1 wrapped DEK of the format-1 release: %d bytes, %v", len(dek), err)
	}
	if _, err := l.Unwrap(ctx, ref, [16]byte{1}, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("format-1 wrapped DEK under another volume: %v", err)
	}
	// Nothing to destroy: Destroy says nil, and the wrapping still opens.
	if err := l.Destroy(ctx, ref, vol, w); err != nil {
		t.Fatalf("destroy of a format-1 wrapped DEK: %v", err)
	}
	// A rotation gives it a secret: format 2, same DEK, destroyable.
	if _, err := l.Rotate(ctx, "default"); err != nil {
		t.Fatal(err)
	}
	keys := []WrappedKey{{Volume: vol, Version: 1, Wrapped: append([]byte(nil), w...)}}
	if err := l.Rewrap(ctx, "default", 0, keys); err != nil || keys[0].Err != nil {
		t.Fatalf("rewrap: %v %v", err, keys[0].Err)
	}
	if len(keys[0].Wrapped) != 77 || keys[0].Wrapped[0] != 0x02 || keys[0].Version != 2 {
		t.Fatalf("rewrapped format-1 DEK: v%d %x", keys[0].Version, keys[0].Wrapped)
	}
	ref2 := KeyRef{"local", "default", 2}
	if got, err := l.Unwrap(ctx, ref2, vol, keys[0].Wrapped); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap of the rewrapped format-1 DEK: %v", err)
	}
	if err := l.Destroy(ctx, ref2, vol, keys[0].Wrapped); err != nil {
		t.Fatal(err)
	}
	if _, err := l.Unwrap(ctx, ref2, vol, keys[0].Wrapped); !errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("destroyed: %v", err)
	}
	// The format-1 copy has no secret: it opens while its KEK exists.
	if got, err := l.Unwrap(ctx, ref, vol, w); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("format-1 copy after the change: %v", err)
	}
	// The keystore was written back as version 2, values tagged.
	raw, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
	if !bytes.Contains(raw, []byte(`"version": 2,`)) || !bytes.Contains(raw, []byte(`"key": "plain:K6oLJgz3rF0ss188OWyB6mwmqfhIxWKVpjHN0Sff+xk="`)) {
		t.Fatalf("keystore after a change:\n%s", raw)
	}
}

func TestLocalKEKDestroy(t *testing.T) {
	for _, tc := range []struct {
		name string
		pass []byte
	}{
		{"plain", nil},
		{"sealed", []byte("correct horse")},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			l := NewLocalKEK(dir, tc.pass)
			volA, volB := [16]byte{0xa}, [16]byte{0xb}
			dekA, dekB := bytes.Repeat([]byte{0xaa}, 32), bytes.Repeat([]byte{0xbb}, 32)
			wA, v1, err := l.Wrap(ctx, "default", volA, dekA)
			if err != nil {
				t.Fatal(err)
			}
			if len(wA) != 77 || wA[0] != 0x02 {
				t.Fatalf("wrapped DEK is not format 2: %x", wA)
			}
			backup := append([]byte(nil), wA...) // the storage tier's copy of the header
			wB, _, err := l.Wrap(ctx, "default", volB, dekB)
			if err != nil {
				t.Fatal(err)
			}
			v2, err := l.Rotate(ctx, "default")
			if err != nil {
				t.Fatal(err)
			}
			keys := []WrappedKey{{Volume: volA, Version: v1, Wrapped: wA}}
			if err := l.Rewrap(ctx, "default", 0, keys); err != nil || keys[0].Err != nil || keys[0].Version != v2 {
				t.Fatalf("rewrap: %v %v v%d", err, keys[0].Err, keys[0].Version)
			}
			rewrapped := keys[0].Wrapped
			if !bytes.Equal(rewrapped[1:17], backup[1:17]) {
				t.Fatal("rewrap changed the secret id of the same DEK")
			}
			// The old copy still opens under v1 before the destroy.
			if got, err := l.Unwrap(ctx, KeyRef{"local", "default", v1}, volA, backup); err != nil || !bytes.Equal(got, dekA) {
				t.Fatalf("backup before destroy: %v", err)
			}
			// Destroy refuses another volume's header.
			if err := l.Destroy(ctx, KeyRef{"local", "default", v2}, volB, rewrapped); !errors.Is(err, ErrUnwrap) {
				t.Fatalf("destroy of volume A's key in the name of B: %v", err)
			}
			if err := l.Destroy(ctx, KeyRef{"local", "default", v2}, volA, rewrapped); err != nil {
				t.Fatal(err)
			}
			if err := l.Destroy(ctx, KeyRef{"local", "default", v2}, volA, rewrapped); err != nil {
				t.Fatalf("second destroy: %v", err)
			}
			fresh := NewLocalKEK(dir, tc.pass) // another process
			for _, c := range []struct {
				what    string
				version uint32
				w       []byte
			}{
				{"backup under v1", v1, backup},
				{"backup under v2", v2, backup},
				{"backup under v3 (none)", 3, backup},
				{"rewrapped under v1", v1, rewrapped},
				{"rewrapped under v2", v2, rewrapped},
			} {
				for _, k := range []*LocalKEK{l, fresh} {
					if got, err := k.Unwrap(ctx, KeyRef{"local", "default", c.version}, volA, c.w); !errors.Is(err, ErrKeyDestroyed) || got != nil {
						t.Errorf("%s after destroy: %v", c.what, err)
					}
				}
			}
			keys = []WrappedKey{{Volume: volA, Version: v1, Wrapped: backup}}
			if err := l.Rewrap(ctx, "default", 0, keys); err != nil || !errors.Is(keys[0].Err, ErrKeyDestroyed) {
				t.Errorf("rewrap of a destroyed key: %v %v", err, keys[0].Err)
			}
			raw, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
			if bytes.Contains(raw, []byte(hex.EncodeToString(backup[1:17]))) {
				t.Error("the destroyed secret's id is still in keystore.json")
			}
			// Volume B's DEK, wrapped under v1, still opens.
			if got, err := fresh.Unwrap(ctx, KeyRef{"local", "default", v1}, volB, wB); err != nil || !bytes.Equal(got, dekB) {
				t.Errorf("another volume's DEK after the destroy: %v", err)
			}
		})
	}
}

func TestLocalKEKWrappedTamper(t *testing.T) {
	ctx := context.Background()
	l := NewLocalKEK(t.TempDir(), nil)
	vol := [16]byte{3}
	w, v, err := l.Wrap(ctx, "default", vol, bytes.Repeat([]byte{1}, 32))
	if err != nil {
		t.Fatal(err)
	}
	ref := KeyRef{"local", "default", v}
	for i := range w {
		for _, bit := range []byte{0x01, 0x80} {
			bad := append([]byte(nil), w...)
			bad[i] ^= bit
			_, err := l.Unwrap(ctx, ref, vol, bad)
			// A flipped secret id names a secret that does not exist.
			if !errors.Is(err, ErrUnwrap) && !(i >= 1 && i < 17 && errors.Is(err, ErrKeyDestroyed)) {
				t.Fatalf("byte %d bit %#x flipped: %v", i, bit, err)
			}
		}
	}
	for _, n := range []int{0, 1, 59, 61, 76, 78} {
		if _, err := l.Unwrap(ctx, ref, vol, make([]byte, n)); !errors.Is(err, ErrUnwrap) {
			t.Errorf("%d-byte wrapped DEK: %v", n, err)
		}
	}
	if _, _, err := l.Wrap(ctx, "default", vol, make([]byte, 16)); err == nil {
		t.Error("wrapped a 16-byte DEK")
	}
}

// editKeystore rewrites the keystore file of dir through edit.
func editKeystore(t *testing.T, dir string, edit func(doc map[string]any)) {
	t.Helper()
	p := filepath.Join(dir, KeystoreFile)
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	var doc map[string]any
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	edit(doc)
	if b, err = json.Marshal(doc); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// eachValue calls f on every key and DEK secret value of a keystore.
func eachValue(doc map[string]any, f func(v string) string) {
	for _, vs := range doc["keys"].(map[string]any) {
		for _, k := range vs.([]any) {
			k := k.(map[string]any)
			k["key"] = f(k["key"].(string))
		}
	}
	if s, ok := doc["dek_secrets"].(map[string]any); ok {
		for _, e := range s {
			e := e.(map[string]any)
			e["secret"] = f(e["secret"].(string))
		}
	}
}

func TestKeystoreEdited(t *testing.T) {
	ctx := context.Background()
	pass := []byte("correct horse")
	untag := func(v string) string { _, b, _ := strings.Cut(v, ":"); return b }
	plainKey := "plain:" + base64.StdEncoding.EncodeToString(bytes.Repeat([]byte{0x66}, 32))
	for _, tc := range []struct {
		name   string
		sealed bool // the keystore before the edit
		edit   func(doc map[string]any)
		pass   []byte
		want   string // in the error
		is     error
	}{
		{"sealed block removed", true, func(d map[string]any) { delete(d, "sealed") }, nil, "keys are sealed but the sealed block is missing (edited?)", nil},
		{"sealed block removed, passphrase set", true, func(d map[string]any) { delete(d, "sealed") }, pass, "keys are sealed but the sealed block is missing (edited?)", nil},
		{"sealed block removed, version 1, untagged", true, func(d map[string]any) {
			delete(d, "sealed")
			delete(d, "dek_secrets")
			d["version"] = 1
			eachValue(d, untag)
		}, nil, "keys are sealed but the sealed block is missing (edited?)", nil},
		{"sealed relabelled plain", true, func(d map[string]any) {
			eachValue(d, func(v string) string { return "plain:" + untag(v) })
		}, pass, "stored unsealed in a sealed keystore (edited?)", nil},
		{"sealed relabelled plain, sealed block removed", true, func(d map[string]any) {
			delete(d, "sealed")
			eachValue(d, func(v string) string { return "plain:" + untag(v) })
		}, nil, "60 bytes, want 32", nil},
		{"plain key put into a sealed keystore", true, func(d map[string]any) {
			eachValue(d, func(string) string { return plainKey })
		}, pass, "stored unsealed in a sealed keystore (edited?)", nil},
		{"plain keys put in place of a sealed keystore's", true, func(d map[string]any) {
			delete(d, "sealed")
			eachValue(d, func(string) string { return plainKey })
		}, pass, "", ErrKeystoreUnsealed},
		{"plain key relabelled sealed", false, func(d map[string]any) {
			eachValue(d, func(v string) string { return "sealed:" + untag(v) })
		}, nil, "sealed block is missing", nil},
		{"untagged value in version 2", false, func(d map[string]any) { eachValue(d, untag) }, nil, "no sealed: or plain: tag", nil},
		{"short key", false, func(d map[string]any) {
			eachValue(d, func(string) string { return "plain:" + base64.StdEncoding.EncodeToString(make([]byte, 31)) })
		}, nil, "31 bytes, want 32", nil},
		{"seal memory raised", true, func(d map[string]any) {
			d["sealed"].(map[string]any)["memory_kib"] = 1 << 30
		}, pass, "damaged seal parameters", nil},
		{"secret volume damaged", false, func(d map[string]any) {
			for _, e := range d["dek_secrets"].(map[string]any) {
				e.(map[string]any)["volume"] = "07"
			}
		}, nil, `volume "07" is damaged`, nil},
		{"key version renumbered", false, func(d map[string]any) {
			d["keys"].(map[string]any)["default"].([]any)[0].(map[string]any)["version"] = 2
		}, nil, "version 2 in place 1", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			var made []byte
			if tc.sealed {
				made = pass
			}
			vol := [16]byte{7}
			w, v, err := NewLocalKEK(dir, made).Wrap(ctx, "default", vol, bytes.Repeat([]byte{9}, 32))
			if err != nil {
				t.Fatal(err)
			}
			editKeystore(t, dir, tc.edit)
			before, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
			l := NewLocalKEK(dir, tc.pass)
			check := func(op string, err error) {
				t.Helper()
				if err == nil || tc.want != "" && !strings.Contains(err.Error(), tc.want) || tc.is != nil && !errors.Is(err, tc.is) {
					t.Errorf("%s: %v; want an error mentioning %q (%v)", op, err, tc.want, tc.is)
				}
			}
			dek, err := l.Unwrap(ctx, KeyRef{"local", "default", v}, vol, w)
			check("unwrap", err)
			if dek != nil {
				t.Errorf("unwrap returned a key")
			}
			_, _, err = l.Wrap(ctx, "default", vol, bytes.Repeat([]byte{9}, 32))
			check("wrap", err)
			_, err = l.Rotate(ctx, "default")
			check("rotate", err)
			check("destroy", l.Destroy(ctx, KeyRef{"local", "default", v}, vol, w))
			_, _, err = l.Sealed()
			check("sealed", err)
			if after, _ := os.ReadFile(filepath.Join(dir, KeystoreFile)); !bytes.Equal(before, after) {
				t.Error("the edited keystore was rewritten")
			}
		})
	}
}

func TestKeystorePassphraseOnUnsealed(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	vol := [16]byte{5}
	w, v, err := NewLocalKEK(dir, nil).Wrap(ctx, "default", vol, bytes.Repeat([]byte{5}, 32))
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
	l := NewLocalKEK(dir, []byte("a passphrase"))
	ref := KeyRef{"local", "default", v}
	_, err1 := l.Unwrap(ctx, ref, vol, w)
	_, _, err2 := l.Wrap(ctx, "default", vol, bytes.Repeat([]byte{5}, 32))
	_, err3 := l.Rotate(ctx, "default")
	err4 := l.Rewrap(ctx, "default", 0, []WrappedKey{{Volume: vol, Version: v, Wrapped: w}})
	err5 := l.Destroy(ctx, ref, vol, w)
	sealed, exists, err6 := l.Sealed()
	for i, err := range []error{err1, err2, err3, err4, err5, err6} {
		if !errors.Is(err, ErrKeystoreUnsealed) || !strings.Contains(err.Error(), "keystore.json is not sealed, but a passphrase is set") {
			t.Errorf("operation %d: %v", i+1, err)
		}
	}
	if sealed || !exists {
		t.Errorf("Sealed() = %v, %v", sealed, exists)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, KeystoreFile)); !bytes.Equal(before, after) {
		t.Error("the keystore changed")
	}
}

func TestKeystoreSealedState(t *testing.T) {
	ctx := context.Background()
	none, plain, sealed := t.TempDir(), t.TempDir(), t.TempDir()
	if _, _, err := NewLocalKEK(plain, nil).Wrap(ctx, "default", [16]byte{1}, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	if _, _, err := NewLocalKEK(sealed, []byte("pw")).Wrap(ctx, "default", [16]byte{1}, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dir                  string
		pass                 []byte
		wantSealed, wantFile bool
	}{
		{none, nil, false, false},
		{none, []byte("pw"), false, false},
		{plain, nil, false, true},
		{sealed, nil, true, true}, // no passphrase needed to ask
		{sealed, []byte("pw"), true, true},
	} {
		s, e, err := NewLocalKEK(tc.dir, tc.pass).Sealed()
		if s != tc.wantSealed || e != tc.wantFile || err != nil {
			t.Errorf("%s pass %q: sealed %v exists %v %v", tc.dir, tc.pass, s, e, err)
		}
	}
	// A sealed keystore's values are all tagged sealed, DEK secrets too.
	raw, _ := os.ReadFile(filepath.Join(sealed, KeystoreFile))
	if bytes.Contains(raw, []byte("plain:")) || !bytes.Contains(raw, []byte(`"dek_secrets"`)) || bytes.Count(raw, []byte(`"sealed:`)) != 2 {
		t.Errorf("sealed keystore:\n%s", raw)
	}
}

func TestKeystoreWrongPassphraseAddsNothing(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	if _, _, err := NewLocalKEK(dir, []byte("right")).Wrap(ctx, "default", [16]byte{1}, make([]byte, 32)); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
	wrong := NewLocalKEK(dir, []byte("wrong"))
	if _, err := wrong.Rotate(ctx, "default"); !errors.Is(err, ErrKeystoreSealed) {
		t.Errorf("rotate with a wrong passphrase: %v", err)
	}
	if _, _, err := wrong.Wrap(ctx, "other", [16]byte{1}, make([]byte, 32)); !errors.Is(err, ErrKeystoreSealed) {
		t.Errorf("wrap (new key) with a wrong passphrase: %v", err)
	}
	if after, _ := os.ReadFile(filepath.Join(dir, KeystoreFile)); !bytes.Equal(before, after) {
		t.Error("a wrong passphrase changed the keystore")
	}
}

// A version-1 sealed keystore (untagged values, as the format-1 release
// wrote) opens with its passphrase.
func TestKeystoreSealedVersion1(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	pass := []byte("correct horse")
	if _, err := NewLocalKEK(dir, pass).Rotate(ctx, "default"); err != nil {
		t.Fatal(err)
	}
	editKeystore(t, dir, func(d map[string]any) {
		d["version"] = 1
		eachValue(d, func(v string) string { _, b, _ := strings.Cut(v, ":"); return b })
	})
	// The format-1 code path, by hand: nonce ‖ GCM(KEK, nonce, DEK, ad v1).
	l := NewLocalKEK(dir, pass)
	var kek []byte
	if err := l.withStore(func(doc *keystoreDoc) (_ bool, err error) {
		kek, err = l.kekLocked(doc, "default", 1)
		return false, err
	}); err != nil {
		t.Fatal(err)
	}
	vol, dek := [16]byte{8}, bytes.Repeat([]byte{0x42}, 32)
	a, _ := gcm(kek)
	nonce := make([]byte, 12)
	w := a.Seal(nonce, nonce, dek, wrapAD("default", 1, vol))
	if got, err := NewLocalKEK(dir, pass).Unwrap(ctx, KeyRef{"local", "default", 1}, vol, w); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("version-1 sealed keystore: %v", err)
	}
	if s, _, err := l.Sealed(); !s || err != nil {
		t.Fatalf("Sealed() of a version-1 sealed keystore: %v %v", s, err)
	}
}

func TestLocalKEKDestroyVolume(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	l := NewLocalKEK(dir, nil)
	volA, volB := [16]byte{0xa, 1}, [16]byte{0xb, 2}
	dek := bytes.Repeat([]byte{0x33}, 32)
	var wA [][]byte
	for range 3 { // e.g. the two slots of a rekey, and an abandoned rekey start
		w, _, err := l.Wrap(ctx, "default", volA, dek)
		if err != nil {
			t.Fatal(err)
		}
		wA = append(wA, w)
	}
	wB, _, err := l.Wrap(ctx, "default", volB, dek)
	if err != nil {
		t.Fatal(err)
	}
	if n, err := l.DestroyVolume(ctx, volA); n != 3 || err != nil {
		t.Fatalf("DestroyVolume: %d %v", n, err)
	}
	if n, err := l.DestroyVolume(ctx, volA); n != 0 || err != nil {
		t.Fatalf("DestroyVolume again: %d %v", n, err)
	}
	for i, w := range wA {
		if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 1}, volA, w); !errors.Is(err, ErrKeyDestroyed) {
			t.Errorf("wrapping %d of the destroyed volume: %v", i, err)
		}
	}
	if _, err := l.Unwrap(ctx, KeyRef{"local", "default", 1}, volB, wB); err != nil {
		t.Errorf("another volume after DestroyVolume: %v", err)
	}
	raw, _ := os.ReadFile(filepath.Join(dir, KeystoreFile))
	if bytes.Contains(raw, []byte(formatUUID(volA))) || !bytes.Contains(raw, []byte(formatUUID(volB))) {
		t.Errorf("keystore after DestroyVolume:\n%s", raw)
	}
}

// A DEK secret moved to another volume in the file opens for neither.
func TestKeystoreSecretMoved(t *testing.T) {
	for _, pass := range [][]byte{nil, []byte("pw")} {
		ctx := context.Background()
		dir := t.TempDir()
		vol, other := [16]byte{1}, [16]byte{7}
		w, v, err := NewLocalKEK(dir, pass).Wrap(ctx, "default", vol, make([]byte, 32))
		if err != nil {
			t.Fatal(err)
		}
		editKeystore(t, dir, func(d map[string]any) {
			for _, e := range d["dek_secrets"].(map[string]any) {
				e.(map[string]any)["volume"] = formatUUID(other)
			}
		})
		l := NewLocalKEK(dir, pass)
		for _, u := range [][16]byte{vol, other} {
			if dek, err := l.Unwrap(ctx, KeyRef{"local", "default", v}, u, w); err == nil || dek != nil {
				t.Errorf("pass %q: a moved secret opens for volume %x", pass, u)
			}
		}
	}
}
