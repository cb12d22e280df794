package crypto

import (
	"bytes"
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"

	vault "github.com/hashicorp/vault/api"
)

// The Transit provider against a real Vault dev server.
func TestVaultKEK(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	srv.Setenv(t)
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	volA, volB := [16]byte{1, 2, 3}, [16]byte{9, 9, 9}
	dek := bytes.Repeat([]byte{0x5a}, 32)

	w, v, err := kek.Wrap(ctx, "vms", volA, dek)
	if err != nil || v != 1 || !strings.HasPrefix(string(w), "vault:v1:") {
		t.Fatalf("wrap: %q v%d %v", w, v, err)
	}
	// The key was created derived.
	s, err := srv.Client().Logical().Read("transit/keys/vms")
	if err != nil || s == nil || s.Data["derived"] != true {
		t.Fatalf("key vms: %v %v", s, err)
	}
	ref := KeyRef{Provider: "vault", Name: "vms", Version: 1}
	got, err := kek.Unwrap(ctx, ref, volA, w)
	if err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap: %v", err)
	}
	// Bound to its volume by derivation.
	if _, err := kek.Unwrap(ctx, ref, volB, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("unwrap for another volume: %v", err)
	}
	// A header that names another version than the ciphertext.
	if _, err := kek.Unwrap(ctx, KeyRef{"vault", "vms", 2}, volA, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("unwrap with a mismatched version: %v", err)
	}

	// Rotation, then a batch rewrap with one bad member.
	if v, err := kek.Rotate(ctx, "vms"); err != nil || v != 2 {
		t.Fatalf("rotate: v%d %v", v, err)
	}
	wB, _, err := kek.Wrap(ctx, "vms", volB, dek)
	if err != nil {
		t.Fatal(err)
	}
	keys := []WrappedKey{
		{Volume: volA, Version: 1, Wrapped: w},
		{Volume: volA, Version: 2, Wrapped: wB}, // wrong volume: fails alone
		{Volume: volB, Version: 2, Wrapped: wB},
	}
	if err := kek.Rewrap(ctx, "vms", 0, keys); err != nil {
		t.Fatal(err)
	}
	if keys[0].Err != nil || keys[0].Version != 2 || keys[2].Err != nil || keys[1].Err == nil {
		t.Fatalf("rewrap results: %v %v %v (v%d)", keys[0].Err, keys[1].Err, keys[2].Err, keys[0].Version)
	}
	// Old versions disabled in Vault: the rewrapped key still opens.
	if _, err := srv.Client().Logical().Write("transit/keys/vms/config", map[string]any{"min_decryption_version": 2}); err != nil {
		t.Fatal(err)
	}
	if got, err := kek.Unwrap(ctx, KeyRef{"vault", "vms", 2}, volA, keys[0].Wrapped); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap after min_decryption_version=2: %v", err)
	}
	if _, err := kek.Unwrap(ctx, ref, volA, w); err == nil {
		t.Fatal("a v1 wrapping opened after min_decryption_version=2")
	}

	// A key that is not derived is refused with a clear error.
	if _, err := srv.Client().Logical().Write("transit/keys/flat", map[string]any{"type": "aes256-gcm96"}); err != nil {
		t.Fatal(err)
	}
	if _, _, err := kek.Wrap(ctx, "flat", volA, dek); !errors.Is(err, ErrVaultKeyNotDerived) {
		t.Fatalf("wrap with a non-derived key: %v", err)
	}

	// A whole volume: format, write, rekey, reopen.
	dev := newCrashDev(int64(LayoutFor(256 * ChunkSize).End))
	if err := Format(ctx, dev, volA, 256*ChunkSize, AES256GCM, kek, "vms"); err != nil {
		t.Fatal(err)
	}
	vol, err := Open(ctx, dev, "va", volA, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("vault-kek"), 1000)
	if _, err := vol.WriteAt(data, 777); err != nil {
		t.Fatal(err)
	}
	if _, err := kek.Rotate(ctx, "vms"); err != nil { // v3: the rekey wraps under it
		t.Fatal(err)
	}
	if err := vol.Rekey(ctx, kek, RekeyOptions{}); err != nil {
		t.Fatal(err)
	}
	if h := vol.Header(); h.KEK.Version != 3 || !strings.HasPrefix(string(h.DEK[h.Active]), "vault:v3:") {
		t.Fatalf("after rekey: %+v", h.KEK)
	}
	vol.Close()
	vol, err = Open(ctx, dev, "va", volA, kek, quietLog(), Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer vol.Close()
	out := make([]byte, len(data))
	if _, err := vol.ReadAt(out, 777); err != nil || !bytes.Equal(out, data) {
		t.Fatalf("read after rekey and reopen: %v", err)
	}

	// Vault gone: a clear error that names it, and the open volume serves.
	srv.Stop()
	_, err = kek.Unwrap(ctx, KeyRef{"vault", "vms", 2}, volA, keys[0].Wrapped)
	if !errors.Is(err, ErrVaultUnavailable) || !strings.Contains(err.Error(), srv.Addr) {
		t.Fatalf("unwrap with vault down: %v", err)
	}
	if _, err := vol.ReadAt(out, 777); err != nil || !bytes.Equal(out, data) {
		t.Fatalf("read with vault down: %v", err)
	}
}

// AppRole login, as a production gateway would authenticate.
func TestVaultAppRole(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	c := srv.Client()
	if err := c.Sys().EnableAuthWithOptions("approle", &vault.EnableAuthOptions{Type: "approle"}); err != nil {
		t.Fatal(err)
	}
	policy := `path "transit/*" { capabilities = ["create", "read", "update"] }`
	if err := c.Sys().PutPolicy("goldilocks", policy); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Logical().Write("auth/approle/role/gw", map[string]any{"token_policies": "goldilocks", "token_ttl": "1h"}); err != nil {
		t.Fatal(err)
	}
	rid, err := c.Logical().Read("auth/approle/role/gw/role-id")
	if err != nil {
		t.Fatal(err)
	}
	sid, err := c.Logical().Write("auth/approle/role/gw/secret-id", nil)
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", srv.Addr)
	t.Setenv("VAULT_TOKEN", "")
	kek, err := NewVaultKEK(VaultConfig{RoleID: rid.Data["role_id"].(string), SecretID: sid.Data["secret_id"].(string), Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	w, v, err := kek.Wrap(ctx, "approle-key", [16]byte{4}, bytes.Repeat([]byte{1}, 32))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kek.Unwrap(ctx, KeyRef{"vault", "approle-key", v}, [16]byte{4}, w); err != nil {
		t.Fatal(err)
	}
	// Wrong credentials: refused, and not as "unavailable".
	bad, _ := NewVaultKEK(VaultConfig{RoleID: "nope", SecretID: "nope", Log: quietLog()})
	if _, _, err := bad.Wrap(ctx, "approle-key", [16]byte{4}, bytes.Repeat([]byte{1}, 32)); err == nil || errors.Is(err, ErrVaultUnavailable) {
		t.Fatalf("login with bad credentials: %v", err)
	}
}

// TLS to Vault: with VAULT_CACERT naming the server's CA it works; without
// it, the error says why (the certificate), and counts as unavailable.
func TestVaultTLS(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{TLS: true})
	srv.Setenv(t)
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	if _, _, err := kek.Wrap(ctx, "tls", [16]byte{1}, bytes.Repeat([]byte{2}, 32)); err != nil {
		t.Fatalf("wrap over TLS: %v", err)
	}
	t.Setenv("VAULT_CACERT", "")
	t.Setenv("VAULT_MAX_RETRIES", "0")
	untrusted, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = untrusted.Wrap(ctx, "tls", [16]byte{1}, bytes.Repeat([]byte{2}, 32))
	if err == nil || !strings.Contains(err.Error(), "certificate") {
		t.Fatalf("wrap without the CA: %v", err)
	}
}

// serve's renewal keeps a short-lived renewable token alive past its TTL.
func TestVaultTokenRenewal(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	tok, err := srv.Client().Auth().Token().Create(&vault.TokenCreateRequest{
		TTL: "3s", ExplicitMaxTTL: "1m", Policies: []string{"root"},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", srv.Addr)
	t.Setenv("VAULT_TOKEN", tok.Auth.ClientToken)
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	// The same kind of token, not renewed: expired by the time we check.
	tok2, err := srv.Client().Auth().Token().Create(&vault.TokenCreateRequest{TTL: "3s", Policies: []string{"root"}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go kek.Renew(ctx)
	time.Sleep(5 * time.Second)
	if _, _, err := kek.Wrap(ctx, "renewed", [16]byte{1}, bytes.Repeat([]byte{2}, 32)); err != nil {
		t.Fatalf("wrap 5 s into a 3 s token: %v", err)
	}
	c := srv.Client()
	c.SetToken(tok2.Auth.ClientToken)
	if _, err := c.Auth().Token().LookupSelf(); err == nil {
		t.Fatal("an unrenewed 3 s token still works after 5 s: the renewal check proves nothing")
	}
}
