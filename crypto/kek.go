package crypto

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
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

// Keystore format constants (FORMAT.md, "Local keystore"). Part of the
// on-disk format.
const (
	KeystoreMagic   = "goldilocks-keystore"
	KeystoreVersion = 1
	KeystoreFile    = "keystore.json"
	wrapAAD         = "goldilocks dek v1"
)

// LocalKEK is the embedded default provider: key-encryption keys in a
// 0600 file in the data dir, each name with numbered versions.
type LocalKEK struct {
	path       string
	passphrase []byte

	mu       sync.Mutex // serialises read-modify-write of the file; guards the fields below
	sealKey  []byte     // derived from passphrase and sealSalt
	sealSalt string
}

type keystoreDoc struct {
	Magic   string                `json:"magic"`
	Version int                   `json:"version"`
	Sealed  *keystoreSeal         `json:"sealed,omitempty"`
	Keys    map[string][]localKey `json:"keys"`
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
	// Key is base64 of the 32-byte key, or, in a sealed keystore, of
	// nonce(12) ‖ AES-256-GCM(passphrase key, nonce, key, ad).
	Key     string    `json:"key"`
	Created time.Time `json:"created"`
}

// ErrKeystoreSealed is returned when a sealed keystore is used without its
// passphrase, or with a wrong one.
var ErrKeystoreSealed = errors.New("keystore is sealed by a passphrase: set GOLDILOCKS_KEYSTORE_PASSPHRASE or GOLDILOCKS_KEYSTORE_PASSPHRASE_FILE")

var _ KEKProvider = (*LocalKEK)(nil)

// NewLocalKEK returns the local provider of a data dir. With a
// passphrase, a new keystore is sealed by it (argon2id), and a sealed one
// is opened with it.
func NewLocalKEK(dataDir string, passphrase []byte) *LocalKEK {
	return &LocalKEK{path: filepath.Join(dataDir, KeystoreFile), passphrase: passphrase}
}

// Name is "local".
func (l *LocalKEK) Name() string { return "local" }

// withStore runs fn on the keystore under an exclusive file lock (other
// processes) and l.mu (this one), writing it back if fn changed it.
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
	doc := &keystoreDoc{Magic: KeystoreMagic, Version: KeystoreVersion, Keys: map[string][]localKey{}}
	b, err := os.ReadFile(l.path)
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("keystore: %w", err)
	default:
		if err := json.Unmarshal(b, doc); err != nil {
			return fmt.Errorf("keystore %s: damaged: %w", l.path, err)
		}
		if doc.Magic != KeystoreMagic || doc.Version != KeystoreVersion {
			return fmt.Errorf("keystore %s: not a version-%d keystore", l.path, KeystoreVersion)
		}
	}
	if doc.Sealed == nil && len(doc.Keys) == 0 && len(l.passphrase) > 0 {
		salt := make([]byte, 16)
		if _, err := rand.Read(salt); err != nil {
			return err
		}
		doc.Sealed = &keystoreSeal{KDF: "argon2id", Salt: base64.StdEncoding.EncodeToString(salt), Time: 3, MemoryKiB: 64 << 10, Threads: 2}
	}
	if doc.Sealed != nil {
		if err := l.deriveLocked(doc.Sealed); err != nil {
			return err
		}
	}
	changed, err := fn(doc)
	if err != nil || !changed {
		return err
	}
	out, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return err
	}
	tmp := l.path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	_, err = f.Write(append(out, '\n'))
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, l.path)
	}
	if err != nil {
		return fmt.Errorf("keystore: %w", err)
	}
	if d, err := os.Open(filepath.Dir(l.path)); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}

// deriveLocked derives (once) the key that seals the keystore's keys.
func (l *LocalKEK) deriveLocked(s *keystoreSeal) error {
	if len(l.passphrase) == 0 {
		return fmt.Errorf("%s: %w", l.path, ErrKeystoreSealed)
	}
	if l.sealKey != nil && l.sealSalt == s.Salt {
		return nil
	}
	salt, err := base64.StdEncoding.DecodeString(s.Salt)
	if err != nil || s.KDF != "argon2id" || s.Time == 0 || s.MemoryKiB == 0 || s.Threads == 0 {
		return fmt.Errorf("keystore %s: damaged seal parameters", l.path)
	}
	l.sealKey, l.sealSalt = argon2.IDKey(l.passphrase, salt, s.Time, s.MemoryKiB, s.Threads, 32), s.Salt
	return nil
}

func sealAD(name string, version uint32) []byte {
	return binary.LittleEndian.AppendUint32(append([]byte("goldilocks keystore v1"), name...), version)
}

// newLocalKeyLocked makes a new key version, sealed if the keystore is.
func (l *LocalKEK) newLocalKeyLocked(doc *keystoreDoc, name string, version uint32) (localKey, error) {
	k := make([]byte, 32)
	defer clear(k)
	if _, err := rand.Read(k); err != nil {
		return localKey{}, err
	}
	enc := k
	if doc.Sealed != nil {
		aead, err := gcm(l.sealKey)
		if err != nil {
			return localKey{}, err
		}
		nonce := make([]byte, aead.NonceSize())
		if _, err := rand.Read(nonce); err != nil {
			return localKey{}, err
		}
		enc = aead.Seal(nonce, nonce, k, sealAD(name, version))
	}
	return localKey{Version: version, Key: base64.StdEncoding.EncodeToString(enc), Created: time.Now().UTC()}, nil
}

// aeadLocked opens a key version of name as an AEAD.
func (l *LocalKEK) aeadLocked(doc *keystoreDoc, name string, k localKey) (cipher.AEAD, error) {
	raw, err := base64.StdEncoding.DecodeString(k.Key)
	if err != nil {
		return nil, fmt.Errorf("keystore: key %s version %d is damaged", name, k.Version)
	}
	if doc.Sealed != nil {
		aead, err := gcm(l.sealKey)
		if err != nil {
			return nil, err
		}
		if len(raw) < aead.NonceSize() {
			return nil, fmt.Errorf("keystore: key %s version %d is damaged", name, k.Version)
		}
		if raw, err = aead.Open(nil, raw[:aead.NonceSize()], raw[aead.NonceSize():], sealAD(name, k.Version)); err != nil {
			return nil, fmt.Errorf("%s: wrong passphrase: %w", l.path, ErrKeystoreSealed)
		}
		defer clear(raw)
	}
	if len(raw) != 32 {
		return nil, fmt.Errorf("keystore: key %s version %d is damaged", name, k.Version)
	}
	return gcm(raw)
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
		k, err := l.newLocalKeyLocked(doc, name, v)
		if err != nil {
			return false, err
		}
		doc.Keys[name] = append(vs, k)
		return true, nil
	})
	return v, err
}

// Wrap wraps dek under the newest version of name, creating version 1 of
// a key that does not exist yet.
func (l *LocalKEK) Wrap(_ context.Context, name string, volume [16]byte, dek []byte) ([]byte, uint32, error) {
	var (
		key  localKey
		aead cipher.AEAD
	)
	err := l.withStore(func(doc *keystoreDoc) (changed bool, err error) {
		vs := doc.Keys[name]
		if len(vs) > 0 {
			key = vs[len(vs)-1]
		} else {
			if key, err = l.newLocalKeyLocked(doc, name, 1); err != nil {
				return false, err
			}
			doc.Keys[name], changed = []localKey{key}, true
		}
		aead, err = l.aeadLocked(doc, name, key)
		return changed, err
	})
	if err != nil {
		return nil, 0, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, 0, err
	}
	return aead.Seal(nonce, nonce, dek, wrapAD(name, key.Version, volume)), key.Version, nil
}

// Rewrap unwraps and wraps again under version (0: the newest) of name,
// in this process: the local keystore's keys are here anyway.
func (l *LocalKEK) Rewrap(ctx context.Context, name string, version uint32, keys []WrappedKey) error {
	var (
		aeads  = map[uint32]cipher.AEAD{}
		target uint32
	)
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		vs := doc.Keys[name]
		if len(vs) == 0 {
			return false, fmt.Errorf("keystore: no key %s", name)
		}
		target = version
		if target == 0 {
			target = vs[len(vs)-1].Version
		}
		for _, k := range vs {
			a, err := l.aeadLocked(doc, name, k)
			if err != nil {
				return false, err
			}
			aeads[k.Version] = a
		}
		if aeads[target] == nil {
			return false, fmt.Errorf("keystore: no key %s version %d", name, target)
		}
		return false, nil
	})
	if err != nil {
		return err
	}
	for i := range keys {
		k := &keys[i]
		k.Err = nil
		a := aeads[k.Version]
		if a == nil {
			k.Err = fmt.Errorf("keystore: no key %s version %d", name, k.Version)
			continue
		}
		if len(k.Wrapped) < a.NonceSize() {
			k.Err = ErrUnwrap
			continue
		}
		dek, err := a.Open(nil, k.Wrapped[:a.NonceSize()], k.Wrapped[a.NonceSize():], wrapAD(name, k.Version, k.Volume))
		if err != nil {
			k.Err = ErrUnwrap
			continue
		}
		nonce := make([]byte, 12)
		if _, err := rand.Read(nonce); err != nil {
			clear(dek)
			return err
		}
		k.Wrapped = aeads[target].Seal(nonce, nonce, dek, wrapAD(name, target, k.Volume))
		k.Version = target
		clear(dek)
	}
	return nil
}

// Unwrap opens a wrapped DEK.
func (l *LocalKEK) Unwrap(_ context.Context, ref KeyRef, volume [16]byte, wrapped []byte) ([]byte, error) {
	var aead cipher.AEAD
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		for _, k := range doc.Keys[ref.Name] {
			if k.Version == ref.Version {
				a, err := l.aeadLocked(doc, ref.Name, k)
				aead = a
				return false, err
			}
		}
		return false, fmt.Errorf("keystore: no key %s version %d", ref.Name, ref.Version)
	})
	if err != nil {
		return nil, err
	}
	if len(wrapped) < aead.NonceSize() {
		return nil, ErrUnwrap
	}
	dek, err := aead.Open(nil, wrapped[:aead.NonceSize()], wrapped[aead.NonceSize():], wrapAD(ref.Name, ref.Version, volume))
	if err != nil {
		return nil, ErrUnwrap
	}
	return dek, nil
}

// wrapAD binds a wrapped DEK to its volume, key name and key version.
func wrapAD(name string, version uint32, volume [16]byte) []byte {
	ad := append([]byte(wrapAAD), volume[:]...)
	ad = binary.LittleEndian.AppendUint32(ad, version)
	return append(ad, name...)
}
