package crypto

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/hkdf"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"goldilocks/internal/atomicfile"
	"goldilocks/internal/secretfile"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/crypto/argon2"
)

// KEKProvider wraps and unwraps volume data keys with a key-encryption
// key it keeps. A wrapped DEK is bound to its volume: unwrapping it under
// another volume's UUID fails.
type KEKProvider interface {
	// Name is the provider's name in volume headers ("local", "vault").
	Name() string
	// Wrap wraps dek under the current version of key name.
	Wrap(ctx context.Context, name string, volume [16]byte, dek []byte) (wrapped []byte, version uint32, err error)
	// Unwrap returns the DEK that Wrap wrapped.
	Unwrap(ctx context.Context, ref KeyRef, volume [16]byte, wrapped []byte) ([]byte, error)
	// Rotate makes a new version of key name the one Wrap uses, and
	// returns its number.
	Rotate(ctx context.Context, name string) (uint32, error)
	// Rewrap rewraps each key under version of key name (0: the newest),
	// in place, without the DEKs leaving the provider where it can keep
	// them in. A key that fails gets its Err set; the error returned is
	// for the whole call (the provider unreachable).
	Rewrap(ctx context.Context, name string, version uint32, keys []WrappedKey) error
}

// KeyDestroyer is a KEKProvider that can destroy one wrapped DEK for good:
// after Destroy, no copy of `wrapped` opens, under any version of the KEK.
type KeyDestroyer interface {
	Destroy(ctx context.Context, ref KeyRef, volume [16]byte, wrapped []byte) error
}

// VolumeKeyDestroyer is a KEKProvider that can destroy every DEK it
// wrapped for a volume without being shown the wrappings: for a shred,
// which then need not trust the volume's header.
type VolumeKeyDestroyer interface {
	DestroyVolume(ctx context.Context, volume [16]byte) (destroyed int, err error)
}

// WrappedKey is one DEK to rewrap: in, its wrapping; out, the new one.
type WrappedKey struct {
	Volume  [16]byte
	Version uint32
	Wrapped []byte
	Err     error
}

// ErrUnwrap is returned when a wrapped DEK does not open: another volume's,
// another key's, or tampered.
var ErrUnwrap = errors.New("crypto: wrapped data key does not open with this key")

// ErrKeyDestroyed is returned by Unwrap for a wrapped DEK whose secret was destroyed.
var ErrKeyDestroyed = errors.New("crypto: the data key was destroyed (volume shredded or rekeyed)")

// Keystore format constants (FORMAT.md, "Local keystore"). Part of the
// on-disk format.
const (
	KeystoreMagic = "goldilocks-keystore"
	// KeystoreVersion is the version written. Version 1 (values without
	// a sealed:/plain: tag, no DEK secrets) is read, and written back as
	// version 2 at its first change.
	KeystoreVersion = 2
	KeystoreFile    = "keystore.json"

	// Tags of every key and DEK secret value in a version-2 keystore.
	tagSealed = "sealed:"
	tagPlain  = "plain:"
	// keyLen is the length of a KEK, a DEK secret and a DEK.
	keyLen = 32
	// sealedLen is the length of a sealed value: nonce ‖ GCM(key).
	sealedLen = 12 + keyLen + 16

	// Seal associated data: of a KEK ("goldilocks keystore v1" ‖ name ‖
	// version u32 LE), of a DEK secret (the label ‖ secret id(16) ‖
	// volume UUID(16)).
	sealKeyAAD    = "goldilocks keystore v1"
	sealSecretAAD = "goldilocks keystore dek secret v1"

	// Wrapped DEK, format 1: nonce(12) ‖ GCM(KEK, nonce, DEK, ad v1).
	wrapAAD      = "goldilocks dek v1"
	wrappedLenV1 = 12 + keyLen + 16
	// Wrapped DEK, format 2: 0x02 ‖ secret id(16) ‖ nonce(12) ‖
	// GCM(HKDF-SHA256(KEK, salt = secret, info), nonce, DEK, ad v2).
	wrapFormatV2 = 0x02
	wrapAADv2    = "goldilocks dek v2"
	wrapInfoV2   = "goldilocks dek wrap v2"
	wrappedLenV2 = 1 + 16 + 12 + keyLen + 16

	// Bounds on the argon2id parameters read from a sealed keystore, so
	// that an edited file cannot make the gateway allocate without limit.
	maxSealTime      = 64
	maxSealMemoryKiB = 4 << 20 // 4 GiB
)

// LocalKEK is the embedded default provider: key-encryption keys in a
// 0600 file in the data dir, each name with numbered versions, and one
// random secret per wrapped DEK, so that a DEK can be destroyed (Destroy)
// whatever copies of its wrapping exist.
type LocalKEK struct {
	path       string
	passphrase []byte

	mu           sync.Mutex // serialises read-modify-write of the file; guards the fields below
	sealKey      []byte     // derived from passphrase and sealSalt
	sealSalt     string
	sealVerified bool // sealKey opened a value of the keystore
}

type keystoreDoc struct {
	Magic   string                `json:"magic"`
	Version int                   `json:"version"`
	Sealed  *keystoreSeal         `json:"sealed,omitempty"`
	Keys    map[string][]localKey `json:"keys"`
	// DEKSecrets are the per-DEK secrets by hex id.
	DEKSecrets map[string]dekSecret `json:"dek_secrets,omitempty"`
}

// dekSecret is the secret of one wrapped DEK and the volume it is for.
type dekSecret struct {
	Volume string `json:"volume"` // UUID, text form
	// Secret is a tagged value as a key's: the 32 random bytes, sealed in
	// a sealed keystore.
	Secret string `json:"secret"`
}

// keystoreSeal says how the keys are sealed by a passphrase.
type keystoreSeal struct {
	KDF       string `json:"kdf"` // "argon2id"
	Salt      string `json:"salt"`
	Time      uint32 `json:"time"`
	MemoryKiB uint32 `json:"memory_kib"`
	Threads   uint8  `json:"threads"`
}

type localKey struct {
	Version uint32 `json:"version"`
	// Key is "plain:" and base64 of the 32-byte key or, in a sealed
	// keystore, "sealed:" and base64 of nonce(12) ‖ AES-256-GCM(passphrase
	// key, nonce, key, ad). In memory it always has its tag (a version-1
	// file's untagged values are tagged when read).
	Key     string    `json:"key"`
	Created time.Time `json:"created"`
}

// ErrKeystoreSealed is returned when a sealed keystore is used without its
// passphrase, or with a wrong one.
var ErrKeystoreSealed = errors.New("keystore is sealed by a passphrase: set GOLDILOCKS_KEYSTORE_PASSPHRASE or GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE")

// ErrKeystoreUnsealed is returned by every operation of a LocalKEK given a
// passphrase when its keystore exists and is not sealed: the passphrase is
// not silently ignored, and a keystore whose seal was removed is not used.
var ErrKeystoreUnsealed = errors.New("keystore.json is not sealed, but a passphrase is set: refusing to use its keys unsealed (unset GOLDILOCKS_KEYSTORE_PASSPHRASE and GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE to use it as it is)")

var (
	_ KEKProvider        = (*LocalKEK)(nil)
	_ KeyDestroyer       = (*LocalKEK)(nil)
	_ VolumeKeyDestroyer = (*LocalKEK)(nil)
)

// NewLocalKEK returns the local provider of a data dir. With a non-empty
// passphrase, a new keystore is sealed by it (argon2id), a sealed one is
// opened with it, and an existing unsealed one is refused
// (ErrKeystoreUnsealed).
func NewLocalKEK(dataDir string, passphrase []byte) *LocalKEK {
	return &LocalKEK{path: filepath.Join(dataDir, KeystoreFile), passphrase: passphrase}
}

// Name is "local".
func (l *LocalKEK) Name() string { return "local" }

// Sealed reports whether the keystore file exists and whether it is sealed
// by a passphrase. It needs no passphrase and opens no key; a damaged or
// edited file is an error. When a passphrase is set and the keystore
// exists unsealed, err is ErrKeystoreUnsealed (sealed and exists are still
// reported).
func (l *LocalKEK) Sealed() (sealed, exists bool, err error) {
	doc, exists, err := readKeystore(l.path)
	if err != nil {
		return false, exists, err
	}
	sealed = doc.Sealed != nil
	if exists && !sealed && len(l.passphrase) > 0 {
		return false, true, fmt.Errorf("%s: %w", l.path, ErrKeystoreUnsealed)
	}
	return sealed, exists, nil
}

// withStore runs fn on the keystore under an exclusive file lock (other
// processes) and l.mu (this one), writing it back if fn changed it and
// returned no error.
func (l *LocalKEK) withStore(fn func(*keystoreDoc) (changed bool, err error)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	lf, err := os.OpenFile(l.path+".lock", os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	defer lf.Close()
	if err := syscall.Flock(int(lf.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	doc, exists, err := readKeystore(l.path)
	if err != nil {
		return err
	}
	switch {
	case exists && doc.Sealed == nil && len(l.passphrase) > 0:
		return fmt.Errorf("%s: %w", l.path, ErrKeystoreUnsealed)
	case !exists && len(l.passphrase) > 0:
		salt := make([]byte, 16)
		if _, err := rand.Read(salt); err != nil {
			return err
		}
		doc.Sealed = &keystoreSeal{KDF: "argon2id", Salt: base64.StdEncoding.EncodeToString(salt), Time: 3, MemoryKiB: 64 << 10, Threads: 2}
	}
	changed, err := fn(doc)
	if err != nil || !changed {
		return err
	}
	doc.Version = KeystoreVersion
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	if err := atomicfile.Write(l.path, append(out, '\n'), 0o600); err != nil {
		return fmt.Errorf("keystore %s: %w", l.path, err)
	}
	return nil
}

// readKeystore reads and checks a keystore file; a missing file is an
// empty keystore (exists false). Every value of the result has its tag.
func readKeystore(path string) (doc *keystoreDoc, exists bool, err error) {
	doc = &keystoreDoc{Magic: KeystoreMagic, Version: KeystoreVersion, Keys: map[string][]localKey{}}
	b, err := secretfile.Read(path)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return doc, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("keystore: %w", err)
	}
	doc, err = parseKeystore(b, path)
	return doc, true, err
}

// parseKeystore parses a keystore and checks that it is whole and
// consistent: every value is 32 bytes (plain) or a sealed 32-byte key,
// sealed values only with a seal block and plain ones only without.
func parseKeystore(b []byte, path string) (*keystoreDoc, error) {
	doc := &keystoreDoc{}
	if err := json.Unmarshal(b, doc); err != nil {
		return nil, fmt.Errorf("keystore %s: damaged: %w", path, err)
	}
	if doc.Magic != KeystoreMagic || doc.Version != 1 && doc.Version != KeystoreVersion {
		return nil, fmt.Errorf("keystore %s: not a version-1 or version-%d keystore", path, KeystoreVersion)
	}
	if doc.Keys == nil {
		doc.Keys = map[string][]localKey{}
	}
	if s := doc.Sealed; s != nil {
		salt, err := base64.StdEncoding.DecodeString(s.Salt)
		if err != nil || len(salt) < 16 || s.KDF != "argon2id" || s.Time == 0 || s.Time > maxSealTime ||
			s.MemoryKiB < 8*uint32(max(s.Threads, 1)) || s.MemoryKiB > maxSealMemoryKiB || s.Threads == 0 {
			return nil, fmt.Errorf("keystore %s: damaged seal parameters", path)
		}
	}
	legacy := doc.Version == 1
	// check tags (legacy: classifies) one value, and returns it tagged.
	check := func(v, what string) (string, error) {
		sealed, raw, err := splitValue(v, legacy)
		if err != nil {
			return "", fmt.Errorf("keystore %s: %s is damaged: %w", path, what, err)
		}
		defer clear(raw)
		switch {
		case sealed && doc.Sealed == nil:
			return "", fmt.Errorf("%s: keys are sealed but the sealed block is missing (edited?)", path)
		case !sealed && doc.Sealed != nil:
			return "", fmt.Errorf("keystore %s: %s is stored unsealed in a sealed keystore (edited?)", path, what)
		}
		want := keyLen
		if sealed {
			want = sealedLen
		}
		if len(raw) != want {
			return "", fmt.Errorf("keystore %s: %s is damaged: %d bytes, want %d", path, what, len(raw), want)
		}
		tag := tagPlain
		if sealed {
			tag = tagSealed
		}
		return tag + base64.StdEncoding.EncodeToString(raw), nil
	}
	for name, vs := range doc.Keys {
		for i := range vs {
			what := fmt.Sprintf("key %s version %d", name, vs[i].Version)
			if vs[i].Version != uint32(i)+1 {
				return nil, fmt.Errorf("keystore %s: key %s: version %d in place %d (edited?)", path, name, vs[i].Version, i+1)
			}
			v, err := check(vs[i].Key, what)
			if err != nil {
				return nil, err
			}
			vs[i].Key = v
		}
	}
	for id, s := range doc.DEKSecrets {
		if b, err := hex.DecodeString(id); err != nil || len(b) != 16 || hex.EncodeToString(b) != id {
			return nil, fmt.Errorf("keystore %s: data key secret id %q is damaged", path, id)
		}
		if _, err := parseUUID(s.Volume); err != nil {
			return nil, fmt.Errorf("keystore %s: data key secret %s: volume %q is damaged", path, id, s.Volume)
		}
		v, err := check(s.Secret, "data key secret "+id)
		if err != nil {
			return nil, err
		}
		s.Secret = v
		doc.DEKSecrets[id] = s
	}
	return doc, nil
}

// splitValue decodes a keystore value: its tag and bytes. An untagged
// value is accepted only in a legacy (version 1) keystore, where its
// length says what it is: 32 bytes a plain key, 60 a sealed one.
func splitValue(v string, legacy bool) (sealed bool, raw []byte, err error) {
	body, tagged := v, true
	switch {
	case strings.HasPrefix(v, tagSealed):
		sealed, body = true, v[len(tagSealed):]
	case strings.HasPrefix(v, tagPlain):
		body = v[len(tagPlain):]
	case legacy:
		tagged = false
	default:
		return false, nil, errors.New("no sealed: or plain: tag")
	}
	raw, err = base64.StdEncoding.DecodeString(body)
	if err != nil {
		return false, nil, errors.New("not base64")
	}
	if !tagged {
		switch len(raw) {
		case keyLen:
		case sealedLen:
			sealed = true
		default:
			clear(raw)
			return false, nil, fmt.Errorf("%d bytes, want %d or %d", len(raw), keyLen, sealedLen)
		}
	}
	return sealed, raw, nil
}

// sealAEADLocked derives (once) the key that seals the keystore's values.
func (l *LocalKEK) sealAEADLocked(doc *keystoreDoc) (cipher.AEAD, error) {
	if len(l.passphrase) == 0 {
		return nil, fmt.Errorf("%s: %w", l.path, ErrKeystoreSealed)
	}
	s := doc.Sealed
	if l.sealKey == nil || l.sealSalt != s.Salt {
		salt, err := base64.StdEncoding.DecodeString(s.Salt)
		if err != nil {
			return nil, fmt.Errorf("keystore %s: damaged seal parameters", l.path)
		}
		clear(l.sealKey)
		l.sealKey, l.sealSalt, l.sealVerified = argon2.IDKey(l.passphrase, salt, s.Time, s.MemoryKiB, s.Threads, keyLen), s.Salt, false
	}
	return gcm(l.sealKey)
}

func sealAD(name string, version uint32) []byte {
	return binary.LittleEndian.AppendUint32(append([]byte(sealKeyAAD), name...), version)
}

func secretAD(id, volume [16]byte) []byte {
	return append(append([]byte(sealSecretAAD), id[:]...), volume[:]...)
}

// formatUUID is a UUID's text form.
func formatUUID(u [16]byte) string {
	return fmt.Sprintf("%x-%x-%x-%x-%x", u[0:4], u[4:6], u[6:8], u[8:10], u[10:16])
}

// parseUUID reads a UUID in the text form formatUUID writes.
func parseUUID(s string) (u [16]byte, err error) {
	b, err := hex.DecodeString(strings.ReplaceAll(s, "-", ""))
	if err != nil || len(b) != 16 {
		return u, errors.New("not a UUID")
	}
	copy(u[:], b)
	if formatUUID(u) != s {
		return u, errors.New("not a UUID in canonical form")
	}
	return u, nil
}

// encodeValueLocked makes a keystore value of a 32-byte key: sealed (with
// ad) in a sealed keystore, plain otherwise. In a sealed keystore it
// first proves the passphrase on a value already there, so that a wrong
// passphrase never adds a value no one can open.
func (l *LocalKEK) encodeValueLocked(doc *keystoreDoc, raw, ad []byte) (string, error) {
	if doc.Sealed == nil {
		return tagPlain + base64.StdEncoding.EncodeToString(raw), nil
	}
	aead, err := l.sealAEADLocked(doc)
	if err != nil {
		return "", err
	}
	if err := l.verifyPassphraseLocked(doc); err != nil {
		return "", err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return "", err
	}
	return tagSealed + base64.StdEncoding.EncodeToString(aead.Seal(nonce, nonce, raw, ad)), nil
}

// verifyPassphraseLocked opens one value of a sealed keystore (if it has
// any) with the passphrase key.
func (l *LocalKEK) verifyPassphraseLocked(doc *keystoreDoc) error {
	if l.sealVerified {
		return nil
	}
	for name, vs := range doc.Keys {
		if len(vs) > 0 {
			raw, err := l.decodeValueLocked(doc, vs[0].Key, sealAD(name, vs[0].Version), "key "+name)
			clear(raw)
			return err
		}
	}
	for id, s := range doc.DEKSecrets {
		var bid [16]byte
		hex.Decode(bid[:], []byte(id))
		vol, _ := parseUUID(s.Volume)
		raw, err := l.decodeValueLocked(doc, s.Secret, secretAD(bid, vol), "data key secret "+id)
		clear(raw)
		return err
	}
	return nil
}

// decodeValueLocked opens a keystore value: the 32-byte key, for the
// caller to clear.
func (l *LocalKEK) decodeValueLocked(doc *keystoreDoc, v string, ad []byte, what string) ([]byte, error) {
	sealed, raw, err := splitValue(v, false)
	if err != nil {
		return nil, fmt.Errorf("keystore %s: %s is damaged: %w", l.path, what, err)
	}
	if sealed != (doc.Sealed != nil) {
		clear(raw)
		return nil, fmt.Errorf("keystore %s: %s does not match the keystore's seal (edited?)", l.path, what)
	}
	if sealed {
		aead, err := l.sealAEADLocked(doc)
		if err != nil {
			return nil, err
		}
		if len(raw) != sealedLen {
			return nil, fmt.Errorf("keystore %s: %s is damaged", l.path, what)
		}
		key, err := aead.Open(nil, raw[:aead.NonceSize()], raw[aead.NonceSize():], ad)
		if err != nil && l.sealVerified {
			return nil, fmt.Errorf("keystore %s: %s does not open with the passphrase that opens the rest (edited?)", l.path, what)
		}
		if err != nil {
			return nil, fmt.Errorf("%s: wrong passphrase: %w", l.path, ErrKeystoreSealed)
		}
		l.sealVerified = true
		raw = key
	}
	if len(raw) != keyLen {
		clear(raw)
		return nil, fmt.Errorf("keystore %s: %s is damaged", l.path, what)
	}
	return raw, nil
}

// newKeyLocked makes a new key version, sealed if the keystore is.
func (l *LocalKEK) newKeyLocked(doc *keystoreDoc, name string, version uint32) (localKey, error) {
	k := make([]byte, keyLen)
	defer clear(k)
	if _, err := rand.Read(k); err != nil {
		return localKey{}, err
	}
	enc, err := l.encodeValueLocked(doc, k, sealAD(name, version))
	if err != nil {
		return localKey{}, err
	}
	return localKey{Version: version, Key: enc, Created: time.Now().UTC()}, nil
}

// kekLocked returns version of key name, for the caller to clear.
func (l *LocalKEK) kekLocked(doc *keystoreDoc, name string, version uint32) ([]byte, error) {
	for _, k := range doc.Keys[name] {
		if k.Version == version {
			return l.decodeValueLocked(doc, k.Key, sealAD(name, version), fmt.Sprintf("key %s version %d", name, version))
		}
	}
	return nil, fmt.Errorf("keystore: no key %s version %d", name, version)
}

// newSecretLocked adds a new DEK secret for volume to the keystore: its
// id and the secret, for the caller to clear.
func (l *LocalKEK) newSecretLocked(doc *keystoreDoc, volume [16]byte) (id [16]byte, s []byte, err error) {
	if doc.DEKSecrets == nil {
		doc.DEKSecrets = map[string]dekSecret{}
	}
	for {
		if _, err := rand.Read(id[:]); err != nil {
			return id, nil, err
		}
		if _, taken := doc.DEKSecrets[hex.EncodeToString(id[:])]; !taken {
			break
		}
	}
	s = make([]byte, keyLen)
	if _, err := rand.Read(s); err != nil {
		return id, nil, err
	}
	enc, err := l.encodeValueLocked(doc, s, secretAD(id, volume))
	if err != nil {
		clear(s)
		return id, nil, err
	}
	doc.DEKSecrets[hex.EncodeToString(id[:])] = dekSecret{Volume: formatUUID(volume), Secret: enc}
	return id, s, nil
}

// secretLocked returns the DEK secret id of volume, for the caller to
// clear; an error wrapping ErrKeyDestroyed if the keystore has none by
// that id, ErrUnwrap if it is another volume's.
func (l *LocalKEK) secretLocked(doc *keystoreDoc, id, volume [16]byte) ([]byte, error) {
	h := hex.EncodeToString(id[:])
	s, ok := doc.DEKSecrets[h]
	if !ok {
		return nil, fmt.Errorf("keystore %s: data key secret %s: %w", l.path, h, ErrKeyDestroyed)
	}
	if s.Volume != formatUUID(volume) {
		return nil, fmt.Errorf("%w: data key secret %s is volume %s's", ErrUnwrap, h, s.Volume)
	}
	return l.decodeValueLocked(doc, s.Secret, secretAD(id, volume), "data key secret "+h)
}

func gcm(key []byte) (cipher.AEAD, error) {
	b, err := aes.NewCipher(key)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// Rotate adds a new version of key name (creating the key if needed) and
// returns its number.
func (l *LocalKEK) Rotate(_ context.Context, name string) (uint32, error) {
	var v uint32
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		vs := doc.Keys[name]
		v = uint32(len(vs)) + 1
		k, err := l.newKeyLocked(doc, name, v)
		if err != nil {
			return false, err
		}
		doc.Keys[name] = append(vs, k)
		return true, nil
	})
	return v, err
}

// Wrap wraps dek (32 bytes) under the newest version of name, creating
// version 1 of a key that does not exist yet, with a new DEK secret
// (format 2).
func (l *LocalKEK) Wrap(_ context.Context, name string, volume [16]byte, dek []byte) ([]byte, uint32, error) {
	if len(dek) != keyLen {
		return nil, 0, fmt.Errorf("keystore: a data key is %d bytes, not %d", keyLen, len(dek))
	}
	var (
		wrapped []byte
		version uint32
	)
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		vs := doc.Keys[name]
		if len(vs) == 0 {
			k, err := l.newKeyLocked(doc, name, 1)
			if err != nil {
				return false, err
			}
			vs = []localKey{k}
			doc.Keys[name] = vs
		}
		version = vs[len(vs)-1].Version
		kek, err := l.kekLocked(doc, name, version)
		if err != nil {
			return false, err
		}
		defer clear(kek)
		id, s, err := l.newSecretLocked(doc, volume)
		if err != nil {
			return false, err
		}
		defer clear(s)
		wrapped, err = wrapV2(kek, s, id, name, version, volume, dek)
		return err == nil, err
	})
	if err != nil {
		return nil, 0, err
	}
	return wrapped, version, nil
}

// Rewrap unwraps and wraps again under version (0: the newest) of name,
// in this process: the local keystore's keys are here anyway. A format-2
// wrapped DEK keeps its secret; a format-1 one gets a new secret (and
// becomes format 2), though a copy of its old wrapping keeps opening.
func (l *LocalKEK) Rewrap(_ context.Context, name string, version uint32, keys []WrappedKey) error {
	out := make([]WrappedKey, len(keys)) // applied only once the keystore is written
	err := l.withStore(func(doc *keystoreDoc) (changed bool, err error) {
		vs := doc.Keys[name]
		if len(vs) == 0 {
			return false, fmt.Errorf("keystore: no key %s", name)
		}
		target := version
		if target == 0 {
			target = vs[len(vs)-1].Version
		}
		keks := map[uint32][]byte{}
		defer func() {
			for _, k := range keks {
				clear(k)
			}
		}()
		kek := func(v uint32) ([]byte, error) {
			if k, ok := keks[v]; ok {
				return k, nil
			}
			k, err := l.kekLocked(doc, name, v)
			if err == nil {
				keks[v] = k
			}
			return k, err
		}
		to, err := kek(target)
		if err != nil {
			return false, err
		}
		for i, k := range keys {
			out[i] = WrappedKey{Volume: k.Volume, Version: k.Version, Wrapped: k.Wrapped}
			from, err := kek(k.Version)
			if errors.Is(err, ErrKeystoreSealed) {
				return false, err
			}
			if err != nil {
				out[i].Err = err
				continue
			}
			dek, id, s, err := l.openLocked(doc, from, name, k.Version, k.Volume, k.Wrapped)
			if errors.Is(err, ErrKeystoreSealed) {
				return false, err
			}
			if err != nil {
				out[i].Err = err
				continue
			}
			if s == nil { // format 1: give it a secret
				if id, s, err = l.newSecretLocked(doc, k.Volume); err != nil {
					clear(dek)
					return false, err
				}
				changed = true
			}
			w, err := wrapV2(to, s, id, name, target, k.Volume, dek)
			clear(dek)
			clear(s)
			if err != nil {
				return false, err
			}
			out[i].Wrapped, out[i].Version = w, target
		}
		return changed, nil
	})
	if err != nil {
		return err
	}
	copy(keys, out)
	return nil
}

// Unwrap opens a wrapped DEK, of format 1 or 2. A format-2 wrapped DEK
// whose secret was destroyed fails with ErrKeyDestroyed, under any version.
func (l *LocalKEK) Unwrap(_ context.Context, ref KeyRef, volume [16]byte, wrapped []byte) ([]byte, error) {
	var dek []byte
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		if _, _, err := parseWrapped(wrapped); err != nil {
			return false, err
		}
		kek, err := l.kekForLocked(doc, ref, wrapped)
		if err != nil {
			return false, err
		}
		defer clear(kek)
		var s []byte
		dek, _, s, err = l.openLocked(doc, kek, ref.Name, ref.Version, volume, wrapped)
		clear(s)
		return false, err
	})
	if err != nil {
		return nil, err
	}
	return dek, nil
}

// Destroy removes the secret of a format-2 wrapped DEK from the keystore
// (the file is rewritten atomically and synced): from then on that
// wrapping and every copy of it, under every KEK version, fails to open
// with ErrKeyDestroyed. It checks first that wrapped opens for volume
// under ref, so that a header copied from another volume cannot make it
// destroy that volume's key. Destroying a destroyed key is a no-op.
//
// A format-1 wrapped DEK (made before DEK secrets existed) has no secret:
// Destroy returns nil for it but cannot destroy anything; any copy of it
// opens as long as its KEK version exists.
//
// Destroy is as final as the removal of the secret from keystore.json: a
// copy of the keystore file taken before still holds it.
func (l *LocalKEK) Destroy(_ context.Context, ref KeyRef, volume [16]byte, wrapped []byte) error {
	format, id, err := parseWrapped(wrapped)
	if err != nil {
		return err
	}
	if format == 1 {
		return nil
	}
	return l.withStore(func(doc *keystoreDoc) (bool, error) {
		h := hex.EncodeToString(id[:])
		if _, ok := doc.DEKSecrets[h]; !ok {
			return false, nil // destroyed already
		}
		kek, err := l.kekLocked(doc, ref.Name, ref.Version)
		if err != nil {
			return false, fmt.Errorf("refusing to destroy data key secret %s: %w", h, err)
		}
		defer clear(kek)
		dek, _, s, err := l.openLocked(doc, kek, ref.Name, ref.Version, volume, wrapped)
		clear(dek)
		clear(s)
		if err != nil {
			return false, fmt.Errorf("refusing to destroy data key secret %s: it does not open for volume %x under %s version %d: %w", h, volume, ref.Name, ref.Version, err)
		}
		delete(doc.DEKSecrets, h)
		return true, nil
	})
}

// DestroyVolume removes every DEK secret of volume from the keystore, as
// Destroy does one, and returns how many there were. It trusts nothing
// of the volume's store (no header needed, no key opened): a shred calls
// it with the UUID of the data dir's registry. Wrappings of format 1,
// which have no secret, are not destroyed.
func (l *LocalKEK) DestroyVolume(_ context.Context, volume [16]byte) (int, error) {
	n := 0
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		u := formatUUID(volume)
		for id, s := range doc.DEKSecrets {
			if s.Volume == u {
				delete(doc.DEKSecrets, id)
				n++
			}
		}
		return n > 0, nil
	})
	if err != nil {
		return 0, err
	}
	return n, nil
}

// kekForLocked returns the KEK version ref names, after checking that a
// format-2 wrapped DEK's secret exists (so that a destroyed key reports
// ErrKeyDestroyed whatever version is asked for).
func (l *LocalKEK) kekForLocked(doc *keystoreDoc, ref KeyRef, wrapped []byte) ([]byte, error) {
	if format, id, _ := parseWrapped(wrapped); format == 2 {
		if _, ok := doc.DEKSecrets[hex.EncodeToString(id[:])]; !ok {
			return nil, fmt.Errorf("keystore %s: data key secret %x: %w", l.path, id, ErrKeyDestroyed)
		}
	}
	return l.kekLocked(doc, ref.Name, ref.Version)
}

// openLocked opens a wrapped DEK with kek (version of name): the DEK and,
// for format 2, its secret id and secret (nil for format 1), for the
// caller to clear.
func (l *LocalKEK) openLocked(doc *keystoreDoc, kek []byte, name string, version uint32, volume [16]byte, wrapped []byte) (dek []byte, id [16]byte, s []byte, err error) {
	format, id, err := parseWrapped(wrapped)
	if err != nil {
		return nil, id, nil, err
	}
	if format == 1 {
		aead, err := gcm(kek)
		if err != nil {
			return nil, id, nil, err
		}
		dek, err := aead.Open(nil, wrapped[:12], wrapped[12:], wrapAD(name, version, volume))
		if err != nil {
			return nil, id, nil, ErrUnwrap
		}
		return dek, id, nil, nil
	}
	if s, err = l.secretLocked(doc, id, volume); err != nil {
		return nil, id, nil, err
	}
	aead, err := wrapAEADv2(kek, s)
	if err != nil {
		clear(s)
		return nil, id, nil, err
	}
	dek, err = aead.Open(nil, wrapped[17:29], wrapped[29:], wrapADv2(name, version, volume, id))
	if err != nil {
		clear(s)
		return nil, id, nil, ErrUnwrap
	}
	return dek, id, s, nil
}

// parseWrapped tells a wrapped DEK's format by its length: format 1 is
// 60 bytes and has no version byte; format 2 is 77 bytes starting 0x02.
func parseWrapped(w []byte) (format int, id [16]byte, err error) {
	switch {
	case len(w) == wrappedLenV1:
		return 1, id, nil
	case len(w) == wrappedLenV2 && w[0] == wrapFormatV2:
		copy(id[:], w[1:17])
		return 2, id, nil
	}
	return 0, id, fmt.Errorf("%w: not a local keystore wrapping (%d bytes)", ErrUnwrap, len(w))
}

// wrapV2 wraps dek: 0x02 ‖ id ‖ nonce ‖ GCM(HKDF(kek, s), nonce, dek, ad).
func wrapV2(kek, s []byte, id [16]byte, name string, version uint32, volume [16]byte, dek []byte) ([]byte, error) {
	aead, err := wrapAEADv2(kek, s)
	if err != nil {
		return nil, err
	}
	out := make([]byte, 1+16+12, wrappedLenV2)
	out[0] = wrapFormatV2
	copy(out[1:], id[:])
	nonce := out[17:29]
	if _, err := rand.Read(nonce); err != nil {
		return nil, err
	}
	return aead.Seal(out, nonce, dek, wrapADv2(name, version, volume, id)), nil
}

// wrapAEADv2 is AES-256-GCM under HKDF-SHA256(kek, salt = s, info).
func wrapAEADv2(kek, s []byte) (cipher.AEAD, error) {
	wk, err := hkdf.Key(sha256.New, kek, s, wrapInfoV2, keyLen)
	if err != nil {
		return nil, err
	}
	defer clear(wk)
	return gcm(wk)
}

// wrapAD binds a format-1 wrapped DEK to its volume, key name and key
// version.
func wrapAD(name string, version uint32, volume [16]byte) []byte {
	ad := append([]byte(wrapAAD), volume[:]...)
	ad = binary.LittleEndian.AppendUint32(ad, version)
	return append(ad, name...)
}

// wrapADv2 binds a format-2 wrapped DEK to its volume, key version, secret
// id and key name: "goldilocks dek v2" ‖ UUID(16) ‖ version u32 LE ‖
// id(16) ‖ name (the one field of variable length, last).
func wrapADv2(name string, version uint32, volume, id [16]byte) []byte {
	ad := append([]byte(wrapAADv2), volume[:]...)
	ad = binary.LittleEndian.AppendUint32(ad, version)
	ad = append(ad, id[:]...)
	return append(ad, name...)
}
