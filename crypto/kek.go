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
	path string
	mu   sync.Mutex // serialises read-modify-write of the file in this process
}

type keystoreDoc struct {
	Magic   string                `json:"magic"`
	Version int                   `json:"version"`
	Keys    map[string][]localKey `json:"keys"`
}

type localKey struct {
	Version uint32    `json:"version"`
	Key     string    `json:"key"` // base64 of 32 bytes
	Created time.Time `json:"created"`
}

var _ KEKProvider = (*LocalKEK)(nil)

// NewLocalKEK returns the local provider of a data dir.
func NewLocalKEK(dataDir string) *LocalKEK {
	return &LocalKEK{path: filepath.Join(dataDir, KeystoreFile)}
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

func newLocalKey(version uint32) (localKey, error) {
	k := make([]byte, 32)
	if _, err := rand.Read(k); err != nil {
		return localKey{}, err
	}
	return localKey{Version: version, Key: base64.StdEncoding.EncodeToString(k), Created: time.Now().UTC()}, nil
}

// Rotate adds a new version of key name (creating the key if needed) and
// returns its number.
func (l *LocalKEK) Rotate(name string) (uint32, error) {
	var v uint32
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		vs := doc.Keys[name]
		v = uint32(len(vs)) + 1
		k, err := newLocalKey(v)
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
	var key localKey
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		vs := doc.Keys[name]
		if len(vs) > 0 {
			key = vs[len(vs)-1]
			return false, nil
		}
		k, err := newLocalKey(1)
		if err != nil {
			return false, err
		}
		key, doc.Keys[name] = k, []localKey{k}
		return true, nil
	})
	if err != nil {
		return nil, 0, err
	}
	aead, err := key.aead()
	if err != nil {
		return nil, 0, err
	}
	nonce := make([]byte, aead.NonceSize())
	if _, err := rand.Read(nonce); err != nil {
		return nil, 0, err
	}
	return aead.Seal(nonce, nonce, dek, wrapAD(name, key.Version, volume)), key.Version, nil
}

// Unwrap opens a wrapped DEK.
func (l *LocalKEK) Unwrap(_ context.Context, ref KeyRef, volume [16]byte, wrapped []byte) ([]byte, error) {
	var key localKey
	found := false
	err := l.withStore(func(doc *keystoreDoc) (bool, error) {
		for _, k := range doc.Keys[ref.Name] {
			if k.Version == ref.Version {
				key, found = k, true
			}
		}
		return false, nil
	})
	if err != nil {
		return nil, err
	}
	if !found {
		return nil, fmt.Errorf("keystore: no key %s version %d", ref.Name, ref.Version)
	}
	aead, err := key.aead()
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

func (k localKey) aead() (cipher.AEAD, error) {
	raw, err := base64.StdEncoding.DecodeString(k.Key)
	if err != nil || len(raw) != 32 {
		return nil, fmt.Errorf("keystore: key version %d is damaged", k.Version)
	}
	b, err := aes.NewCipher(raw)
	if err != nil {
		return nil, err
	}
	return cipher.NewGCM(b)
}

// wrapAD binds a wrapped DEK to its volume, key name and key version.
func wrapAD(name string, version uint32, volume [16]byte) []byte {
	ad := append([]byte(wrapAAD), volume[:]...)
	ad = binary.LittleEndian.AppendUint32(ad, version)
	return append(ad, name...)
}
