package e2e

import (
	"bytes"
	"context"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"goldilocks/internal/vaulttest"
	"goldilocks/internal/volume"
)

// Secrets hygiene: no key-encryption key, data key, DEK secret, Vault
// token or keystore passphrase appears, in any encoding, in what the
// gateway and the CLI write for people and machines to read: the
// gateway's log at debug level, every command's output (--json too), the
// audit trail and its export, the data dir's files other than the
// keystore. The data keys are taken before and after a rekey (the test
// unwraps them itself from the headers). And files holding secrets are
// refused when group or others may read them.
func TestNoSecretsInOutputs(t *testing.T) {
	need(t, "qemu-io")
	v := vaulttest.Start(t, vaulttest.Options{})
	v.Setenv(t)
	token := os.Getenv("VAULT_TOKEN")
	dir := t.TempDir()
	var outputs []string
	cli := func(args ...string) {
		t.Helper()
		outputs = append(outputs, goldilocks(t, dir, args...))
	}
	cli("volume", "create", "loc", "--size", "16M")
	cli("volume", "create", "vlt", "--size", "16M", "--kek", "vault:hygiene")
	deks := dataKeys(t, dir, "loc", "vlt")

	g := startGateway(t, dir, "--log-level", "debug")
	writes, reads := qemuWrites(4, 0x31)
	for _, name := range []string{"loc", "vlt"} {
		outputs = append(outputs, run(t, "qemu-io", append(append(append([]string{"-f", "raw"}, writes...), reads...), g.unixURI(name))...))
	}
	cli("key", "rotate", "--all", "--json")
	cli("key", "rekey", "loc")
	cli("key", "rekey", "vlt")
	cli("key", "status", "--json")
	cli("volume", "info", "loc", "--json")
	cli("volume", "info", "vlt")
	cli("volume", "list", "--json")
	cli("config", "show", "--json")
	deks = append(deks, dataKeys(t, dir, "loc", "vlt")...)
	if bytes.Equal(deks[0], deks[2]) {
		t.Fatal("the rekey did not change the data key: the test looks at the wrong keys")
	}
	cli("audit", "export")
	cli("audit", "verify")
	outputs = append(outputs, g.logText())

	// The keystore's KEKs and DEK secrets, decoded from its file.
	var ks struct {
		Keys map[string][]struct {
			Key string `json:"key"`
		} `json:"keys"`
		Secrets map[string]struct {
			Secret string `json:"secret"`
		} `json:"dek_secrets"`
	}
	raw, err := os.ReadFile(filepath.Join(dir, "keystore.json"))
	if err != nil || json.Unmarshal(raw, &ks) != nil {
		t.Fatalf("keystore: %v", err)
	}
	secrets := map[string][]byte{}
	for name, vs := range ks.Keys {
		for _, k := range vs {
			b, err := base64.StdEncoding.DecodeString(strings.TrimPrefix(k.Key, "plain:"))
			if err != nil || len(b) != 32 {
				t.Fatalf("keystore key %s: %q", name, k.Key)
			}
			secrets[fmt.Sprintf("KEK %s v%d", name, len(secrets))] = b
		}
	}
	for id, s := range ks.Secrets {
		b, _ := base64.StdEncoding.DecodeString(strings.TrimPrefix(s.Secret, "plain:"))
		secrets["DEK secret "+id] = b
	}
	for i, d := range deks {
		secrets["data key "+string(rune('0'+i))] = d
	}
	if len(secrets) < 6 {
		t.Fatalf("only %d secrets to look for", len(secrets))
	}
	// Everything in the data dir but the keystore and the volumes.
	filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || strings.HasPrefix(filepath.Base(p), "keystore.json") || filepath.Ext(p) == ".img" || strings.HasSuffix(p, ".sock") {
			return nil
		}
		b, _ := os.ReadFile(p)
		outputs = append(outputs, string(b))
		return nil
	})
	all := strings.Join(outputs, "\n")
	for what, s := range secrets {
		for _, enc := range []string{string(s), hex.EncodeToString(s), strings.ToUpper(hex.EncodeToString(s)),
			base64.StdEncoding.EncodeToString(s), base64.RawStdEncoding.EncodeToString(s),
			base64.URLEncoding.EncodeToString(s), base64.RawURLEncoding.EncodeToString(s)} {
			if strings.Contains(all, enc) {
				t.Errorf("%s found in the outputs (as %q)", what, enc)
			}
		}
	}
	if strings.Contains(all, token) {
		t.Error("the Vault token found in the outputs")
	}
	t.Logf("searched %d bytes of logs, outputs and files for %d secrets and the Vault token", len(all), len(secrets))

	// Loose modes refused, with the fix named.
	g.stop(9)
	ks0 := filepath.Join(dir, "keystore.json")
	os.Chmod(ks0, 0o644)
	if out, err := runGoldilocks(dir, "volume", "create", "more", "--size", "1M"); err == nil || !strings.Contains(out, "chmod 600") {
		t.Errorf("a keystore readable by others was used: %v\n%s", err, out)
	}
	os.Chmod(ks0, 0o600)
	cdir := t.TempDir()
	newCA(t, "hygiene").leaf(t, cdir, "server", "localhost", true)
	key := filepath.Join(cdir, "server-key.pem")
	os.Chmod(key, 0o640)
	if out, err := runGoldilocks(dir, "serve", "--listen", "127.0.0.1:0", "--metrics", "", "--tls-cert", filepath.Join(cdir, "server-cert.pem"), "--tls-key", key); err == nil || !strings.Contains(out, "chmod 600") {
		t.Errorf("serve took a TLS key readable by its group: %v\n%s", err, out)
	}
	pass := filepath.Join(t.TempDir(), "pass")
	os.WriteFile(pass, []byte("correct horse"), 0o644)
	os.Chmod(pass, 0o644)
	t.Setenv("GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE", pass)
	if out, err := runGoldilocks(t.TempDir(), "volume", "create", "p", "--size", "1M"); err == nil || !strings.Contains(out, "chmod 600") {
		t.Errorf("a passphrase file readable by others was used: %v\n%s", err, out)
	}
}

// dataKeys unwraps the active data key of each named volume from its
// header, as the gateway does.
func dataKeys(t *testing.T, dir string, names ...string) [][]byte {
	t.Helper()
	reg, err := volume.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	var out [][]byte
	for _, n := range names {
		v, err := reg.Get(n)
		if err != nil {
			t.Fatal(err)
		}
		h, err := reg.Header(v)
		if err != nil {
			t.Fatal(err)
		}
		kek, err := reg.KEK(h.KEK.Provider)
		if err != nil {
			t.Fatal(err)
		}
		dek, err := kek.Unwrap(context.Background(), h.KEK, h.UUID, h.DEK[h.Active])
		if err != nil {
			t.Fatalf("unwrapping %s's data key: %v", n, err)
		}
		out = append(out, dek)
	}
	return out
}

// A gateway that crashes writes no core file (GOTRACEBACK=crash and
// SIGABRT, core files allowed by its rlimit and the kernel's
// core_pattern): it makes itself non-dumpable. Its data keys live in
// mappings marked MADV_DONTDUMP, but what is derived from them for the
// cipher, and transient copies in the hash state HKDF leaves behind, are
// in Go's heap: this test found the data key in such a core file before
// the gateway made itself non-dumpable.
func TestNoCoreDump(t *testing.T) {
	need(t, "qemu-io", "prlimit")
	if b, _ := os.ReadFile("/proc/sys/kernel/core_pattern"); strings.TrimSpace(string(b)) != "core" {
		missing(t, "core_pattern \"core\" (the kernel writes core files to the process's directory; here it is "+strings.TrimSpace(string(b))+")")
	}
	dir := t.TempDir()
	goldilocks(t, dir, "volume", "create", "c", "--size", "16M")
	dek := dataKeys(t, dir, "c")[0]
	work := t.TempDir()
	cmd := exec.Command("prlimit", "--core=unlimited", "--", goldilocksBin, "serve", "--data-dir", dir, "--listen", "127.0.0.1:0", "--metrics", "")
	cmd.Dir = work
	cmd.Env = append(os.Environ(), "GOTRACEBACK=crash")
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	sock := filepath.Join(dir, "nbd.sock")
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the gateway did not start")
		}
	}
	// An attached, written volume: its key is in use.
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x61 0 1M", "nbd+unix:///c?socket="+sock)
	cl, err := dialNBD(sock, "c")
	if err != nil {
		t.Fatal(err)
	}
	defer cl.close()
	cmd.Process.Signal(syscall.SIGABRT)
	cmd.Wait()
	if files, _ := os.ReadDir(work); len(files) != 0 {
		core, _ := os.ReadFile(filepath.Join(work, files[0].Name()))
		t.Fatalf("the crashed gateway left %s (%d MiB; the data key in it: %v) in its directory: a core dump", files[0].Name(), len(core)>>20, bytes.Contains(core, dek))
	}
}
