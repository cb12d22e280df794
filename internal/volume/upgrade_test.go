package volume

import (
	"bytes"
	"compress/gzip"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"hash/crc32"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"goldilocks/crypto"
	v1 "goldilocks/crypto/v1"
	"goldilocks/internal/block"
)

const v1Dir = "testdata/v1-datadir"

// v1DataDir copies the format-1 data dir (testdata/v1-datadir/README.md)
// into a temp dir, the backing file gunzipped to volumes/v1vol.img, and
// returns it with the SHA-256 of the volume's plaintext.
func v1DataDir(t *testing.T) (dir, want string) {
	t.Helper()
	dir = t.TempDir()
	for _, f := range []string{"keystore.json", "volumes.json"} {
		b, err := os.ReadFile(filepath.Join(v1Dir, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	gz, err := os.Open(filepath.Join(v1Dir, "v1vol.img.gz"))
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
	sum, err := os.ReadFile(filepath.Join(v1Dir, "plaintext.sha256"))
	if err != nil {
		t.Fatal(err)
	}
	return dir, strings.Fields(string(sum))[0]
}

func testLog(t *testing.T) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelWarn}))
}

// plaintextSHA attaches the volume as the gateway does and hashes all of it.
func plaintextSHA(t *testing.T, r *Registry, name string) string {
	t.Helper()
	v, err := r.Get(name)
	if err != nil {
		t.Fatal(err)
	}
	dev, err := r.OpenDevice(v, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	buf := make([]byte, dev.Size())
	if _, err := dev.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(buf)
	return hex.EncodeToString(s[:])
}

// v1SHA reads the format-1 store with the format-1 reader.
func v1SHA(t *testing.T, r *Registry, name string) string {
	t.Helper()
	v, _ := r.Get(name)
	id, _ := v.UUIDBytes()
	f, err := block.OpenFile(r.BackingPath(v), true)
	if err != nil {
		t.Fatal(err)
	}
	kek, _ := r.KEK("local")
	old, err := v1.Open(context.Background(), f, name, id, kek, testLog(t))
	if err != nil {
		f.Close()
		t.Fatal(err)
	}
	defer old.Close()
	buf := make([]byte, old.Size())
	if _, err := old.ReadAt(buf, 0); err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(buf)
	return hex.EncodeToString(s[:])
}

func fileSHA(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

// dekSecrets counts the DEK secrets in the local keystore.
func dekSecrets(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, crypto.KeystoreFile))
	if err != nil {
		t.Fatal(err)
	}
	var doc struct {
		DEKSecrets map[string]any `json:"dek_secrets"`
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		t.Fatal(err)
	}
	return len(doc.DEKSecrets)
}

func TestUpgradeFormat1(t *testing.T) {
	dir, want := v1DataDir(t)
	r, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := r.Get("v1vol")
	if err != nil {
		t.Fatal(err)
	}
	path := r.BackingPath(v)
	if f, err := fileFormat(path); f != 1 || err != nil {
		t.Fatalf("format %d %v", f, err)
	}
	// Refused at attach, naming the command, by the registry and by the
	// gateway's view of it.
	_, err = r.OpenDevice(v, testLog(t))
	if !errors.Is(err, crypto.ErrNeedsUpgrade) || !strings.Contains(err.Error(), "goldilocks volume upgrade v1vol") {
		t.Fatalf("attach of a format-1 volume: %v", err)
	}
	if _, _, err := NewExports(r, testLog(t)).Open("v1vol"); !errors.Is(err, crypto.ErrNeedsUpgrade) {
		t.Fatalf("export of a format-1 volume: %v", err)
	}

	var last [2]uint64
	calls := 0
	res, err := r.Upgrade(context.Background(), "v1vol", func(done, total uint64) {
		if done < last[0] || done > total {
			t.Errorf("progress %d/%d after %d", done, total, last[0])
		}
		last = [2]uint64{done, total}
		calls++
	}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := plaintextSHA(t, r, "v1vol"); got != want {
		t.Fatalf("plaintext SHA-256 after the upgrade %s, want %s", got, want)
	}
	if res.FromFormat != 1 || res.ToFormat != 2 || res.Chunks != 16 || res.Copied != 16 || res.Bytes != 64<<10 ||
		res.Discarded || res.OldKeyDestroyed || res.Backing != path ||
		res.KEK != (KEKRef{Provider: "local", Key: "default", Version: 1}) {
		t.Fatalf("result %+v", res)
	}
	if last != [2]uint64{16, 16} || calls == 0 {
		t.Fatalf("last progress %v after %d calls", last, calls)
	}
	if f, err := fileFormat(path); f != 2 || err != nil {
		t.Fatalf("format after the upgrade: %d %v", f, err)
	}
	if _, err := os.Stat(path + UpgradeSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the new store's temporary name is still there: %v", err)
	}
	id, _ := v.UUIDBytes()
	if _, ok, err := r.Anchor().Load(id); !ok || err != nil {
		t.Fatalf("no rollback anchor after the upgrade: %v", err)
	}
	h, err := ReadHeaderFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if h.Suite != crypto.AES256GCM || h.Size != 64<<10 || h.UUID != id || len(h.DEK[0]) == 60 {
		t.Fatalf("new header %+v", h)
	}
	if n := dekSecrets(t, dir); n != 1 {
		t.Fatalf("%d DEK secrets in the keystore, want the new key's", n)
	}
	st, _ := os.Stat(path)
	if st.Mode().Perm() != 0o600 {
		t.Fatalf("new backing file mode %v", st.Mode())
	}

	// Again: already format 2, nothing changes.
	before := [3]string{fileSHA(t, path), fileSHA(t, filepath.Join(dir, "volumes.json")), fileSHA(t, filepath.Join(dir, "keystore.json"))}
	_, err = r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	if !errors.Is(err, ErrUpToDate) || !strings.Contains(err.Error(), "already format 2") {
		t.Fatalf("second upgrade: %v", err)
	}
	after := [3]string{fileSHA(t, path), fileSHA(t, filepath.Join(dir, "volumes.json")), fileSHA(t, filepath.Join(dir, "keystore.json"))}
	if before != after {
		t.Fatal("a second upgrade changed the store, the registry or the keystore")
	}

	// Neither plain volumes nor unknown ones.
	if _, err := r.Create(CreateOptions{Name: "p", Size: 1 << 20}); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Upgrade(context.Background(), "p", nil, nil); err == nil || !strings.Contains(err.Error(), "plain") {
		t.Fatalf("plain volume: %v", err)
	}
	if _, err := r.Upgrade(context.Background(), "nope", nil, nil); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown volume: %v", err)
	}
}

// An attached volume (its backing file locked by a gateway) is refused.
func TestUpgradeRefusesAttached(t *testing.T) {
	dir, _ := v1DataDir(t)
	r, _ := Open(dir)
	v, _ := r.Get("v1vol")
	path := r.BackingPath(v)
	f, err := block.OpenFile(path, false)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Lock(); err != nil {
		t.Fatal(err)
	}
	before := fileSHA(t, path)
	_, err = r.Upgrade(context.Background(), "v1vol", nil, nil)
	if !errors.Is(err, block.ErrInUse) || !strings.Contains(err.Error(), "detach it first") || !strings.Contains(err.Error(), "v1vol") {
		t.Fatalf("upgrade of an attached volume: %v", err)
	}
	if fileSHA(t, path) != before {
		t.Fatal("the refused upgrade changed the store")
	}
	if _, err := os.Stat(path + UpgradeSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("a refused upgrade left %s: %v", path+UpgradeSuffix, err)
	}
}

var errCrash = errors.New("simulated crash")

// A crash after the copy, before the rename, leaves the format-1 volume
// as it was; the next run starts again and completes. A leftover of
// garbage is discarded likewise.
func TestUpgradeInterrupted(t *testing.T) {
	dir, want := v1DataDir(t)
	r, _ := Open(dir)
	v, _ := r.Get("v1vol")
	path := r.BackingPath(v)
	id, _ := v.UUIDBytes()
	before := fileSHA(t, path)

	upgradeHook = func(stage string) error {
		if stage == "before-rename" {
			return errCrash
		}
		return nil
	}
	_, err := r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	upgradeHook = nil
	if !errors.Is(err, errCrash) {
		t.Fatalf("crashed upgrade: %v", err)
	}
	if f, _ := fileFormat(path + UpgradeSuffix); f != 2 {
		t.Fatalf("the crash should leave a complete format-2 copy: format %d", f)
	}
	if fileSHA(t, path) != before {
		t.Fatal("the old store changed before the rename")
	}
	if f, _ := fileFormat(path); f != 1 {
		t.Fatalf("format %d after a crash before the rename", f)
	}
	if got := v1SHA(t, r, "v1vol"); got != want {
		t.Fatalf("the old volume reads %s, want %s", got, want)
	}
	if _, err := r.OpenDevice(v, testLog(t)); !errors.Is(err, crypto.ErrNeedsUpgrade) {
		t.Fatalf("attach after a crashed upgrade: %v", err)
	}
	if _, ok, _ := r.Anchor().Load(id); ok {
		t.Fatal("a crashed upgrade wrote the anchor of a store that is not in place")
	}
	if n := dekSecrets(t, dir); n != 1 {
		t.Fatalf("%d DEK secrets after the crash, want the partial copy's", n)
	}

	res, err := r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if !res.Discarded || res.Copied != 16 {
		t.Fatalf("rerun: %+v", res)
	}
	if got := plaintextSHA(t, r, "v1vol"); got != want {
		t.Fatalf("after the rerun: %s, want %s", got, want)
	}
	if n := dekSecrets(t, dir); n != 1 {
		t.Fatalf("%d DEK secrets after the rerun: the partial copy's key was not destroyed", n)
	}

	// Garbage under the temporary name (a crash while formatting).
	dir, want = v1DataDir(t)
	r, _ = Open(dir)
	v, _ = r.Get("v1vol")
	junk := make([]byte, 1<<20)
	rand.Read(junk)
	if err := os.WriteFile(r.BackingPath(v)+UpgradeSuffix, junk, 0o600); err != nil {
		t.Fatal(err)
	}
	res, err = r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	if err != nil || !res.Discarded {
		t.Fatalf("upgrade over a garbage leftover: %+v %v", res, err)
	}
	if got := plaintextSHA(t, r, "v1vol"); got != want {
		t.Fatalf("after a garbage leftover: %s, want %s", got, want)
	}
}

// Raw access to the format-1 test image (one map page at 8192, its
// copies A and B; the format-1 FORMAT.md, "Layout" and "The chunk map"),
// for tests that damage or edit it.

// v1CurrentPage says which map page copy is current, and its generation.
func v1CurrentPage(img []byte) (cur int, gen uint64) {
	const mapOff = 8192
	ga := binary.LittleEndian.Uint64(img[mapOff:])
	gb := binary.LittleEndian.Uint64(img[mapOff+4096:])
	if gb > ga {
		return 1, gb
	}
	return 0, ga
}

// v1SlotOf is the byte offset of chunk c's ciphertext.
func v1SlotOf(img []byte, c int) int64 {
	cur, _ := v1CurrentPage(img)
	_, which, err := v1.PickHeader(img[:4096], img[4096:8192])
	if err != nil {
		panic(err)
	}
	slotOff := binary.LittleEndian.Uint64(img[which*4096+72:])
	slot := binary.LittleEndian.Uint32(img[8192+cur*4096+16+c*40:])
	return int64(slotOff) + 4096*int64(slot-1)
}

// v1Unmap writes a newer map page copy without the entries of the chunks
// keep rejects.
func v1Unmap(img []byte, keep func(c int) bool) {
	cur, gen := v1CurrentPage(img)
	pg := bytes.Clone(img[8192+cur*4096:][:4096])
	for c := 0; c < 16; c++ {
		if !keep(c) {
			clear(pg[16+c*40:][:40])
		}
	}
	binary.LittleEndian.PutUint64(pg, gen+1)
	crc := crc32.Update(0, crc32.MakeTable(crc32.Castagnoli), pg[:12])
	crc = crc32.Update(crc, crc32.MakeTable(crc32.Castagnoli), pg[16:])
	binary.LittleEndian.PutUint32(pg[12:], crc)
	copy(img[8192+(1-cur)*4096:], pg)
}

// Unmapped chunks are not copied, and read as zeros after the upgrade.
func TestUpgradeSkipsUnmapped(t *testing.T) {
	dir, want := v1DataDir(t)
	r, _ := Open(dir)
	v, _ := r.Get("v1vol")
	path := r.BackingPath(v)
	img, _ := os.ReadFile(path)
	v1Unmap(img, func(c int) bool { return c%3 == 0 }) // the others hold zeros
	os.WriteFile(path, img, 0o600)
	res, err := r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	if got := plaintextSHA(t, r, "v1vol"); got != want {
		t.Fatalf("plaintext %s, want %s", got, want)
	}
	if res.Copied != 6 || res.Bytes != 6*4096 {
		t.Fatalf("result %+v", res)
	}
	dev, err := r.OpenDevice(v, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close()
	ext, err := dev.(block.Extenter).Extents(nil, 4096, 2*4096, 10)
	if err != nil || len(ext) != 1 || ext[0].Flags&block.ExtentHole == 0 {
		t.Fatalf("chunks 1-2 should be holes: %+v %v", ext, err)
	}
}

// A chunk that fails authentication stops the upgrade, naming it; the
// volume stays in format 1, and no partial copy or its key is left.
func TestUpgradeDamagedChunk(t *testing.T) {
	dir, _ := v1DataDir(t)
	r, _ := Open(dir)
	v, _ := r.Get("v1vol")
	path := r.BackingPath(v)
	img, _ := os.ReadFile(path)
	img[v1SlotOf(img, 3)+7] ^= 1
	os.WriteFile(path, img, 0o600)
	_, err := r.Upgrade(context.Background(), "v1vol", nil, nil)
	if !errors.Is(err, crypto.ErrChunkAuth) || !strings.Contains(err.Error(), "chunk 3") || !strings.Contains(err.Error(), "still format 1") {
		t.Fatalf("upgrade of a damaged volume: %v", err)
	}
	if f, _ := fileFormat(path); f != 1 {
		t.Fatalf("format %d", f)
	}
	if _, err := os.Stat(path + UpgradeSuffix); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("partial copy left: %v", err)
	}
	if n := dekSecrets(t, dir); n != 0 {
		t.Fatalf("the failed upgrade left %d DEK secrets", n)
	}
}

// A format-1 copy put back after an upgrade is a rollback: refused.
func TestUpgradeRefusesRolledBackCopy(t *testing.T) {
	dir, _ := v1DataDir(t)
	r, _ := Open(dir)
	v, _ := r.Get("v1vol")
	path := r.BackingPath(v)
	oldImg, _ := os.ReadFile(path)
	if _, err := r.Upgrade(context.Background(), "v1vol", nil, nil); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(path, oldImg, 0o600)
	_, err := r.Upgrade(context.Background(), "v1vol", nil, nil)
	if !errors.Is(err, crypto.ErrRollback) {
		t.Fatalf("upgrade of a format-1 copy of an upgraded volume: %v", err)
	}
}

// A backing file outside the data dir, reached through a symlink: the new
// store is written beside the file itself, and the link stays a link.
func TestUpgradeBackingOutsideDataDir(t *testing.T) {
	dir, want := v1DataDir(t)
	elsewhere := t.TempDir()
	real := filepath.Join(elsewhere, "disk.img")
	if err := os.Rename(filepath.Join(dir, "volumes", "v1vol.img"), real); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(t.TempDir(), "link.img")
	os.Symlink(real, link)
	b, _ := os.ReadFile(filepath.Join(dir, "volumes.json"))
	b = bytes.Replace(b, []byte(`"volumes/v1vol.img"`), []byte(`"`+link+`"`), 1)
	os.WriteFile(filepath.Join(dir, "volumes.json"), b, 0o600)
	r, _ := Open(dir)
	upgradeHook = func(stage string) error {
		if _, err := os.Stat(real + UpgradeSuffix); err != nil {
			t.Errorf("no new store beside the backing file: %v", err)
		}
		return nil
	}
	res, err := r.Upgrade(context.Background(), "v1vol", nil, testLog(t))
	upgradeHook = nil
	if err != nil || res.Backing != real {
		t.Fatalf("%+v %v", res, err)
	}
	if fi, err := os.Lstat(link); err != nil || fi.Mode()&os.ModeSymlink == 0 {
		t.Fatalf("the link is gone: %v", err)
	}
	if f, _ := fileFormat(real); f != 2 {
		t.Fatalf("format %d", f)
	}
	if got := plaintextSHA(t, r, "v1vol"); got != want {
		t.Fatalf("plaintext %s, want %s", got, want)
	}
}
