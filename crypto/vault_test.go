package crypto

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"

	vault "github.com/hashicorp/vault/api"
)

// gl2Wrapping is the vault provider's wrapped DEK (FORMAT.md, "KEK providers").
var gl2Wrapping = regexp.MustCompile(`^gl2:[0-9a-f]{32}:vault:v[1-9][0-9]*:[A-Za-z0-9+/]+={0,2}$`)

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
	if err != nil || v != 1 || !gl2Wrapping.MatchString(string(w)) || !strings.Contains(string(w), ":vault:v1:") {
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
	if h := vol.Header(); h.KEK.Version != 3 || !strings.Contains(string(h.DEK[h.Active]), ":vault:v3:") || !gl2Wrapping.Match(h.DEK[h.Active]) {
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
	if err := c.Sys().PutPolicy("goldilocks", vaultPolicy); err != nil {
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

// vaultPolicy is the least a gateway's token needs (README, "Keys in
// Vault", checked by TestREADMEPolicy): Transit for the KEKs, KV version
// 2 for the DEK secrets, the anchors, and the leases (FORMAT.md, "Lease
// in Vault").
const vaultPolicy = `
path "transit/keys/*"    { capabilities = ["create", "read", "update"] }
path "transit/encrypt/*" { capabilities = ["update"] }
path "transit/decrypt/*" { capabilities = ["update"] }
path "transit/rewrap/*"  { capabilities = ["update"] }
path "secret/data/goldilocks/dek/*"     { capabilities = ["create", "read"] }
path "secret/metadata/goldilocks/dek/*" { capabilities = ["list", "delete"] }
path "secret/data/goldilocks/anchors/*"     { capabilities = ["create", "read", "update"] }
path "secret/metadata/goldilocks/anchors/*" { capabilities = ["delete"] }
path "secret/data/goldilocks/leases/*"      { capabilities = ["create", "read", "update"] }
path "secret/metadata/goldilocks/leases/*"  { capabilities = ["create", "update"] }
`

// gl2ID is the secret id of a gl2 wrapping.
func gl2ID(t *testing.T, w []byte) string {
	t.Helper()
	m := gl2Wrapping.FindString(string(w))
	if m == "" {
		t.Fatalf("not a gl2 wrapping: %q", w)
	}
	return m[4:36]
}

// A destroyed DEK does not open from any copy of its wrapping, under any
// Transit key version, and not after an undelete in KV either; other DEKs
// of the volume and of other volumes still open.
func TestVaultDestroy(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	srv.Setenv(t)
	c := srv.Client()
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	volA, volB := [16]byte{0xa1}, [16]byte{0xb2}
	dek1, dek2, dek3 := bytes.Repeat([]byte{1}, 32), bytes.Repeat([]byte{2}, 32), bytes.Repeat([]byte{3}, 32)
	w1, v1, err := kek.Wrap(ctx, "d", volA, dek1)
	if err != nil || v1 != 1 {
		t.Fatalf("wrap: v%d %v", v1, err)
	}
	backup := bytes.Clone(w1) // a header backup the storage tier kept
	w2, _, err := kek.Wrap(ctx, "d", volA, dek2)
	if err != nil {
		t.Fatal(err)
	}
	w3, _, err := kek.Wrap(ctx, "d", volB, dek3)
	if err != nil {
		t.Fatal(err)
	}
	id1 := gl2ID(t, w1)
	// The secret is in KV, as FORMAT.md says.
	s, err := c.Logical().Read("secret/data/goldilocks/dek/" + formatUUID(volA) + "/" + id1)
	if err != nil || s == nil {
		t.Fatalf("the KV secret: %v %v", s, err)
	}
	data := s.Data["data"].(map[string]any)
	if sec, _ := base64.StdEncoding.DecodeString(data["secret"].(string)); len(sec) != 32 || data["volume"] != formatUUID(volA) {
		t.Fatalf("the KV secret's data: %v", data)
	}
	// Transit alone is not enough: its plaintext is id ‖ the masked DEK.
	_, ct, _ := strings.Cut(string(w1[4:]), ":")
	s, err = c.Logical().Write("transit/decrypt/d", map[string]any{"ciphertext": ct, "context": vaultContext(volA)})
	if err != nil {
		t.Fatal(err)
	}
	pt, _ := base64.StdEncoding.DecodeString(s.Data["plaintext"].(string))
	if len(pt) != 48 || hex.EncodeToString(pt[:16]) != id1 || bytes.Contains(pt, dek1) {
		t.Fatalf("Transit's plaintext: %x", pt)
	}

	// Rotation and rewrap keep the secret.
	if v, err := kek.Rotate(ctx, "d"); err != nil || v != 2 {
		t.Fatalf("rotate: v%d %v", v, err)
	}
	keys := []WrappedKey{{Volume: volA, Version: 1, Wrapped: w1}}
	if err := kek.Rewrap(ctx, "d", 0, keys); err != nil || keys[0].Err != nil {
		t.Fatalf("rewrap: %v %v", err, keys[0].Err)
	}
	w1r := keys[0].Wrapped
	if keys[0].Version != 2 || gl2ID(t, w1r) != id1 || !strings.Contains(string(w1r), ":vault:v2:") {
		t.Fatalf("rewrapped: %q v%d", w1r, keys[0].Version)
	}
	for _, tc := range []struct {
		w []byte
		v uint32
	}{{backup, 1}, {w1r, 2}} {
		if got, err := kek.Unwrap(ctx, KeyRef{"vault", "d", tc.v}, volA, tc.w); err != nil || !bytes.Equal(got, dek1) {
			t.Fatalf("unwrap v%d before the destroy: %v", tc.v, err)
		}
	}

	// Refusals: another volume's wrapping (its secret is not under this
	// volume), and a wrapping whose id was swapped for another secret of
	// the volume, destroy nothing.
	if err := kek.Destroy(ctx, KeyRef{"vault", "d", 1}, volA, w3); err != nil {
		t.Fatalf("destroy of volume B's wrapping for volume A: %v", err)
	}
	forged := []byte("gl2:" + gl2ID(t, w2) + ":" + ct)
	if err := kek.Destroy(ctx, KeyRef{"vault", "d", 1}, volA, forged); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("destroy of a wrapping with a swapped secret id: %v", err)
	}
	if err := kek.Destroy(ctx, KeyRef{"vault", "d", 1}, volA, w1r); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("destroy with a header version that is not the wrapping's: %v", err)
	}
	if _, err := kek.Unwrap(ctx, KeyRef{"vault", "d", 1}, volA, forged); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("unwrap of a wrapping with a swapped secret id: %v", err)
	}
	for i, tc := range []struct {
		vol [16]byte
		w   []byte
		dek []byte
	}{{volA, w2, dek2}, {volB, w3, dek3}, {volA, w1r, dek1}} {
		if got, err := kek.Unwrap(ctx, KeyRef{"vault", "d", vaultVersion(t, tc.w)}, tc.vol, tc.w); err != nil || !bytes.Equal(got, tc.dek) {
			t.Fatalf("after the refused destroys, key %d: %v", i, err)
		}
	}

	// The destroy.
	if err := kek.Destroy(ctx, KeyRef{"vault", "d", 2}, volA, w1r); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	// Whoever holds Vault cannot bring it back: no version is left to
	// undelete or read.
	c.Logical().Write("secret/undelete/goldilocks/dek/"+formatUUID(volA)+"/"+id1, map[string]any{"versions": []int{1}})
	if s, err := c.Logical().ReadWithData("secret/data/goldilocks/dek/"+formatUUID(volA)+"/"+id1, map[string][]string{"version": {"1"}}); err != nil || s != nil && s.Data["data"] != nil {
		t.Fatalf("version 1 of the destroyed secret still reads: %v %v", s, err)
	}
	for _, tc := range []struct {
		w []byte
		v uint32
	}{{backup, 1}, {w1r, 2}} {
		for ver := uint32(1); ver <= 2; ver++ {
			if dek, err := kek.Unwrap(ctx, KeyRef{"vault", "d", ver}, volA, tc.w); !errors.Is(err, ErrKeyDestroyed) || dek != nil {
				t.Errorf("the v%d wrapping under header version %d after the destroy: %v, want ErrKeyDestroyed", tc.v, ver, err)
			}
		}
	}
	if err := kek.Destroy(ctx, KeyRef{"vault", "d", 1}, volA, backup); err != nil {
		t.Fatalf("destroying it again: %v", err)
	}
	for i, tc := range []struct {
		vol [16]byte
		w   []byte
		dek []byte
	}{{volA, w2, dek2}, {volB, w3, dek3}} {
		if got, err := kek.Unwrap(ctx, KeyRef{"vault", "d", 1}, tc.vol, tc.w); err != nil || !bytes.Equal(got, tc.dek) {
			t.Fatalf("another key (%d) after the destroy: %v", i, err)
		}
	}
}

func vaultVersion(t *testing.T, w []byte) uint32 {
	t.Helper()
	_, _, _, v, err := splitVaultWrapped(w)
	if err != nil {
		t.Fatal(err)
	}
	return v
}

// A wrapping made before gl2 (a bare Transit ciphertext of the DEK) still
// opens, stays bare through a rewrap, and Destroy and DestroyVolume leave
// it: it has no secret.
func TestVaultOldFormat(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	srv.Setenv(t)
	c := srv.Client()
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	vol := [16]byte{0x01, 0xd}
	dek := bytes.Repeat([]byte{0x0d}, 32)
	if _, err := c.Logical().Write("transit/keys/old", map[string]any{"type": "aes256-gcm96", "derived": true}); err != nil {
		t.Fatal(err)
	}
	s, err := c.Logical().Write("transit/encrypt/old", map[string]any{"plaintext": base64.StdEncoding.EncodeToString(dek), "context": vaultContext(vol)})
	if err != nil {
		t.Fatal(err)
	}
	w := []byte(s.Data["ciphertext"].(string))
	if got, err := kek.Unwrap(ctx, KeyRef{"vault", "old", 1}, vol, w); err != nil || !bytes.Equal(got, dek) {
		t.Fatalf("unwrap of a bare Transit ciphertext: %v", err)
	}
	if _, err := kek.Unwrap(ctx, KeyRef{"vault", "old", 1}, [16]byte{9}, w); !errors.Is(err, ErrUnwrap) {
		t.Fatalf("for another volume: %v", err)
	}
	if _, err := kek.Rotate(ctx, "old"); err != nil {
		t.Fatal(err)
	}
	keys := []WrappedKey{{Volume: vol, Version: 1, Wrapped: w}}
	if err := kek.Rewrap(ctx, "old", 0, keys); err != nil || keys[0].Err != nil {
		t.Fatalf("rewrap: %v %v", err, keys[0].Err)
	}
	if keys[0].Version != 2 || !strings.HasPrefix(string(keys[0].Wrapped), "vault:v2:") {
		t.Fatalf("rewrapped: %q v%d", keys[0].Wrapped, keys[0].Version)
	}
	if err := kek.Destroy(ctx, KeyRef{"vault", "old", 2}, vol, keys[0].Wrapped); err != nil {
		t.Fatalf("destroy of a bare wrapping: %v", err)
	}
	if n, err := kek.DestroyVolume(ctx, vol); err != nil || n != 0 {
		t.Fatalf("DestroyVolume: %d %v", n, err)
	}
	for _, k := range []WrappedKey{{Version: 1, Wrapped: w}, keys[0]} {
		if got, err := kek.Unwrap(ctx, KeyRef{"vault", "old", k.Version}, vol, k.Wrapped); err != nil || !bytes.Equal(got, dek) {
			t.Fatalf("the bare v%d wrapping after Destroy (documented: nothing to destroy): %v", k.Version, err)
		}
	}
	// Garbage is neither format.
	for _, bad := range []string{"gl2:zz:vault:v1:AAAA", "gl2:" + strings.Repeat("0", 32) + ":nope", "nope"} {
		if _, err := kek.Unwrap(ctx, KeyRef{"vault", "old", 1}, vol, []byte(bad)); !errors.Is(err, ErrUnwrap) {
			t.Errorf("unwrap %q: %v", bad, err)
		}
		if err := kek.Destroy(ctx, KeyRef{"vault", "old", 1}, vol, []byte(bad)); !errors.Is(err, ErrUnwrap) {
			t.Errorf("destroy %q: %v", bad, err)
		}
	}
}

// DestroyVolume deletes every secret of one volume and none of another's,
// with a token holding no more than the documented policy.
func TestVaultDestroyVolume(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	c := srv.Client()
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	volA, volB := [16]byte{0xaa, 1}, [16]byte{0xbb, 2}
	var wa, wb [][]byte
	for i := range 3 {
		w, _, err := kek.Wrap(ctx, "dv", volA, bytes.Repeat([]byte{byte(i)}, 32))
		if err != nil {
			t.Fatal(err)
		}
		wa = append(wa, w)
	}
	if _, err := kek.Rotate(ctx, "dv"); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		w, _, err := kek.Wrap(ctx, "dv", volB, bytes.Repeat([]byte{byte(i + 10)}, 32))
		if err != nil {
			t.Fatal(err)
		}
		wb = append(wb, w)
	}
	if n, err := kek.DestroyVolume(ctx, volA); err != nil || n != 3 {
		t.Fatalf("DestroyVolume(A): %d %v", n, err)
	}
	for i, w := range wa {
		if _, err := kek.Unwrap(ctx, KeyRef{"vault", "dv", 1}, volA, w); !errors.Is(err, ErrKeyDestroyed) {
			t.Errorf("volume A's key %d: %v, want ErrKeyDestroyed", i, err)
		}
	}
	for i, w := range wb {
		if got, err := kek.Unwrap(ctx, KeyRef{"vault", "dv", 2}, volB, w); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 10)}, 32)) {
			t.Errorf("volume B's key %d: %v", i, err)
		}
	}
	if s, err := c.Logical().List("secret/metadata/goldilocks/dek/" + formatUUID(volA)); err != nil || s != nil {
		t.Fatalf("volume A's secrets left: %v %v", s, err)
	}
	if s, err := c.Logical().List("secret/metadata/goldilocks/dek/" + formatUUID(volB)); err != nil || s == nil || len(s.Data["keys"].([]any)) != 2 {
		t.Fatalf("volume B's secrets: %v %v", s, err)
	}
	if n, err := kek.DestroyVolume(ctx, volA); err != nil || n != 0 {
		t.Fatalf("DestroyVolume(A) again: %d %v", n, err)
	}
	// One by one, with the policy's rights, and a rewrap.
	keys := []WrappedKey{{Volume: volB, Version: 2, Wrapped: wb[0]}}
	if _, err := kek.Rotate(ctx, "dv"); err != nil {
		t.Fatal(err)
	}
	if err := kek.Rewrap(ctx, "dv", 0, keys); err != nil || keys[0].Err != nil {
		t.Fatalf("rewrap: %v %v", err, keys[0].Err)
	}
	if err := kek.Destroy(ctx, KeyRef{"vault", "dv", 3}, volB, keys[0].Wrapped); err != nil {
		t.Fatalf("destroy: %v", err)
	}
	if _, err := kek.Unwrap(ctx, KeyRef{"vault", "dv", 2}, volB, wb[0]); !errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("after destroy: %v", err)
	}
	if n, err := kek.DestroyVolume(ctx, volB); err != nil || n != 1 {
		t.Fatalf("DestroyVolume(B): %d %v", n, err)
	}
}

// A rekey of a real volume on a Vault-wrapped key (a persistent Vault,
// restarted on the way): once it finishes, the header from before the
// rekey no longer opens, nor does the whole store from before; the
// rekeyed store does, until DestroyVolume (a shred).
func TestVaultRekeyDestroysOldKey(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{Persistent: true})
	srv.Setenv(t)
	ctx := context.Background()
	kek, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	const chunks = 64
	dev := newCrashDev(int64(LayoutFor(chunks * ChunkSize).End))
	id := [16]byte{0x7e, 0x4e}
	if err := Format(ctx, dev, id, chunks*ChunkSize, AES256GCM, kek, "rk"); err != nil {
		t.Fatal(err)
	}
	open := func(store *crashDev) (*Volume, error) {
		return Open(ctx, store, "vrk", id, kek, quietLog(), Options{})
	}
	v, err := open(dev)
	if err != nil {
		t.Fatal(err)
	}
	data := bytes.Repeat([]byte("vault-rk"), chunks*ChunkSize/8)
	if _, err := v.WriteAt(data, 0); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	before := bytes.Clone(dev.durable)
	oldHdr, _, err := PickHeader(before[:HeaderBlockSize], before[HeaderBlockSize:2*HeaderBlockSize])
	if err != nil {
		t.Fatal(err)
	}
	if !gl2Wrapping.Match(oldHdr.DEK[oldHdr.Active]) {
		t.Fatalf("the header's wrapped DEK: %q", oldHdr.DEK[oldHdr.Active])
	}
	if _, err := kek.Rotate(ctx, "rk"); err != nil {
		t.Fatal(err)
	}
	srv.Stop()
	srv.Restart() // the secrets are in Vault's storage, not its memory
	if v, err = open(dev); err != nil {
		t.Fatal(err)
	}
	if err := v.Rekey(ctx, kek, RekeyOptions{}); err != nil {
		t.Fatal(err)
	}
	if err := v.Close(); err != nil {
		t.Fatal(err)
	}
	for ver := uint32(1); ver <= 2; ver++ {
		ref := oldHdr.KEK
		ref.Version = ver
		if dek, err := kek.Unwrap(ctx, ref, id, oldHdr.DEK[oldHdr.Active]); !errors.Is(err, ErrKeyDestroyed) || dek != nil {
			t.Errorf("the pre-rekey wrapped DEK under header version %d: %v, want ErrKeyDestroyed", ver, err)
		}
	}
	withOld := bytes.Clone(dev.durable)
	copy(withOld[:2*HeaderBlockSize], before[:2*HeaderBlockSize])
	for name, img := range map[string][]byte{"the old header in the current store": withOld, "the whole store from before the rekey": before} {
		if _, err := open(&crashDev{durable: bytes.Clone(img)}); !errors.Is(err, ErrKeyDestroyed) {
			t.Errorf("%s: %v, want ErrKeyDestroyed", name, err)
		}
	}
	v, err = open(&crashDev{durable: bytes.Clone(dev.durable)})
	if err != nil {
		t.Fatalf("the rekeyed store: %v", err)
	}
	got := make([]byte, len(data))
	if _, err := v.ReadAt(got, 0); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("the rekeyed store reads %v, equal %v", err, bytes.Equal(got, data))
	}
	v.Close()
	if n, err := kek.DestroyVolume(ctx, id); err != nil || n != 1 {
		t.Fatalf("DestroyVolume: %d, %v", n, err)
	}
	if _, err := open(&crashDev{durable: bytes.Clone(dev.durable)}); !errors.Is(err, ErrKeyDestroyed) {
		t.Errorf("after DestroyVolume, the current store: %v, want ErrKeyDestroyed", err)
	}
}

// Without a usable KV version 2 engine, Wrap fails with an error naming
// the mount, the path and what to do, and never makes a wrapping whose
// secret could not be destroyed.
func TestVaultKVMissing(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	srv.Setenv(t)
	c := srv.Client()
	ctx := context.Background()
	dek := bytes.Repeat([]byte{7}, 32)
	wantKVError := func(t *testing.T, err error, mount string) {
		t.Helper()
		t.Logf("%s: %v", mount, err)
		if !errors.Is(err, ErrVaultKV) || errors.Is(err, ErrVaultUnavailable) {
			t.Fatalf("want ErrVaultKV: %v", err)
		}
		for _, s := range []string{
			"enable a KV version 2 engine at " + mount + "/",
			"GOLDILOCKS_VAULT_KV_MOUNT",
			mount + "/data/goldilocks/dek/*",
			mount + "/metadata/goldilocks/dek/*",
		} {
			if !strings.Contains(err.Error(), s) {
				t.Errorf("the error does not say %q: %v", s, err)
			}
		}
	}
	// A mount that does not exist, by the configuration and by the environment.
	kek, err := NewVaultKEK(VaultConfig{KVMount: "nokv", Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = kek.Wrap(ctx, "m", [16]byte{1}, dek)
	wantKVError(t, err, "nokv")
	t.Setenv(EnvVaultKVMount, "nokv-env/")
	kek, err = NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = kek.Wrap(ctx, "m", [16]byte{1}, dek)
	wantKVError(t, err, "nokv-env")
	// KV version 1 is not enough: it has no destroy of all versions.
	if err := c.Sys().Mount("kv1", &vault.MountInput{Type: "kv", Options: map[string]string{"version": "1"}}); err != nil {
		t.Fatal(err)
	}
	kek, err = NewVaultKEK(VaultConfig{KVMount: "kv1", Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = kek.Wrap(ctx, "m", [16]byte{1}, dek)
	wantKVError(t, err, "kv1")
	if s, _ := c.Logical().List("kv1/data/goldilocks/dek"); s != nil {
		t.Fatalf("something was written to the KV v1 engine: %v", s.Data)
	}
	// A token with Transit rights only.
	t.Setenv(EnvVaultKVMount, "")
	if err := c.Sys().PutPolicy("transit-only", `path "transit/*" { capabilities = ["create", "read", "update"] }`); err != nil {
		t.Fatal(err)
	}
	tok, err := c.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"transit-only"}})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_TOKEN", tok.Auth.ClientToken)
	kek, err = NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	_, _, err = kek.Wrap(ctx, "m", [16]byte{1}, dek)
	wantKVError(t, err, "secret")
	// The default mount, disabled after a wrap: the unwrap says that the
	// engine is gone, not that the key was destroyed by Goldilocks.
	t.Setenv("VAULT_TOKEN", srv.Token)
	kek, err = NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	w, v, err := kek.Wrap(ctx, "m", [16]byte{1}, dek)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Sys().Unmount("secret"); err != nil {
		t.Fatal(err)
	}
	_, err = kek.Unwrap(ctx, KeyRef{"vault", "m", v}, [16]byte{1}, w)
	if errors.Is(err, ErrKeyDestroyed) {
		t.Fatalf("unwrap with the KV engine gone: %v", err)
	}
	wantKVError(t, err, "secret")
	_, _, err = kek.Wrap(ctx, "m", [16]byte{1}, dek)
	wantKVError(t, err, "secret")
}

// The Vault anchor: two gateways (two connections, each with its data
// dir's file anchor beside it) see one anchor; it only moves forward,
// field by field, also when both advance it at once (check-and-set);
// Remove forgets it; a gateway whose data dir never saw the volume still
// refuses an older store (what `volume adopt` relies on).
func TestVaultAnchor(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	newGateway := func() Anchors {
		k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		return Anchors{NewFileAnchor(t.TempDir()), k.Anchor()}
	}
	a, b := newGateway(), newGateway()
	vol := [16]byte{0xa7, 7}
	if _, ok, err := a.Load(vol); err != nil || ok {
		t.Fatalf("new volume: ok %v err %v", ok, err)
	}
	if err := a.Advance(vol, AnchorState{Seq: 10, Generation: 3, Epoch: 1}); err != nil {
		t.Fatal(err)
	}
	if err := b.Advance(vol, AnchorState{Seq: 7, Generation: 5}); err != nil {
		t.Fatal(err)
	}
	want := AnchorState{Seq: 10, Generation: 5, Epoch: 1}
	for i, g := range []Anchors{a, b, {g0(newGateway())}} {
		st, ok, err := g.Load(vol)
		if err != nil || !ok || st != want {
			t.Errorf("gateway %d loads %+v ok %v err %v, want %+v", i, st, ok, err, want)
		}
	}
	// Both at once, many times: the result is the maximum of everything.
	var wg sync.WaitGroup
	for i := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			g := a
			if i%2 == 1 {
				g = b
			}
			if err := g.Advance(vol, AnchorState{Seq: uint64(100 + i)}); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if st, _, _ := b[1].Load(vol); st.Seq != 107 {
		t.Errorf("after concurrent advances the anchor is at %d, want 107", st.Seq)
	}
	// A fresh gateway's open of a store at commit 50 (< 107) is refused by
	// Open's check, which compares with Load: shown here on the state.
	fresh := Anchors{NewFileAnchor(t.TempDir()), b[1]}
	if st, _, _ := fresh.Load(vol); st.Seq <= 50 {
		t.Errorf("a new gateway would accept a store at commit 50: anchor %d", st.Seq)
	}
	if err := a.Remove(vol); err != nil {
		t.Fatal(err)
	}
	if _, ok, err := b[1].Load(vol); err != nil || ok {
		t.Errorf("after Remove: ok %v err %v", ok, err)
	}
	// A token with the policy of before the anchors: the refusal names
	// the paths to grant.
	c := srv.Client()
	old := strings.Split(vaultPolicy, "path \"secret/data/goldilocks/anchors")[0]
	if err := c.Sys().PutPolicy("before-anchors", old); err != nil {
		t.Fatal(err)
	}
	tok, err := c.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"before-anchors"}, NoDefaultPolicy: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_TOKEN", tok.Auth.ClientToken)
	k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.Anchor().Advance(vol, AnchorState{Seq: 1}); !errors.Is(err, ErrVaultKV) || !strings.Contains(err.Error(), "secret/data/goldilocks/anchors/*") {
		t.Errorf("an anchor refused by the token's policy: %v", err)
	}
}

// g0 is the Vault part of a gateway's anchors.
func g0(g Anchors) Anchor { return g[1] }

// useGatewayToken points the Vault environment at srv with a token that
// holds only the gateway's policy (README), as a deployment's would.
func useGatewayToken(t *testing.T, srv *vaulttest.Server) {
	t.Helper()
	c := srv.Client()
	if err := c.Sys().PutPolicy("goldilocks", vaultPolicy); err != nil {
		t.Fatal(err)
	}
	tok, err := c.Auth().Token().Create(&vault.TokenCreateRequest{Policies: []string{"goldilocks"}, NoDefaultPolicy: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Setenv("VAULT_ADDR", srv.Addr)
	t.Setenv("VAULT_TOKEN", tok.Auth.ClientToken)
}

// TestREADMEPolicy: the policy README gives operators is the one the
// tests run the gateway's token with.
func TestREADMEPolicy(t *testing.T) {
	b, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	_, block, ok := strings.Cut(string(b), "```hcl\n")
	if ok {
		block, _, ok = strings.Cut(block, "```")
	}
	if !ok || !strings.Contains(block, "transit/keys") {
		t.Fatal("README has no hcl block with the gateway's policy")
	}
	norm := func(s string) []string {
		var lines []string
		for l := range strings.Lines(s) {
			if f := strings.Fields(l); len(f) > 0 {
				lines = append(lines, strings.Join(f, " "))
			}
		}
		return lines
	}
	if got, want := norm(block), norm(vaultPolicy); !slices.Equal(got, want) {
		t.Errorf("README's policy:\n%s\nthe tests':\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}
