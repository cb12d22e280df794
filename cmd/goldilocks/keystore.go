package main

import (
	"log/slog"
	"path/filepath"
	"strings"

	"goldilocks/crypto"
	"goldilocks/internal/volume"
)

// unsealedKeystoreWarning is said wherever a volume's data key sits in an
// unsealed keystore in the same data dir as the volume's ciphertext.
const unsealedKeystoreWarning = "the local keystore is not sealed and sits in the data dir beside the ciphertext it protects: " +
	"a copy of the data dir holds both key and data " +
	"(a passphrase, GOLDILOCKS_KEYSTORE_PASSPHRASE or _FILE, seals a new keystore; or keep backing stores out of the data dir)"

// keystoreExposed reports whether v is an encrypted volume whose KEK is
// in the local keystore, that keystore is not sealed, and v's backing
// file lives in the data dir. An error is the keystore's (damaged, or a
// passphrase set for an unsealed one).
func keystoreExposed(reg *volume.Registry, v volume.Volume) (bool, error) {
	if !v.Encrypted || v.KEK != nil && v.KEK.Provider != "local" && v.KEK.Provider != "" {
		return false, nil
	}
	kek, err := reg.KEK("local")
	if err != nil {
		return false, err
	}
	l, ok := kek.(*crypto.LocalKEK)
	if !ok {
		return false, nil
	}
	sealed, exists, err := l.Sealed()
	if err != nil || sealed || !exists {
		return false, err
	}
	return !volume.IsRemote(v) && inDir(reg.Dir(), reg.BackingPath(v)), nil
}

// volumeWarnings are the warnings `volume info` shows for v.
func volumeWarnings(reg *volume.Registry, v volume.Volume) []string {
	exposed, err := keystoreExposed(reg, v)
	switch {
	case err != nil:
		return []string{"local keystore: " + err.Error()}
	case exposed:
		return []string{unsealedKeystoreWarning}
	}
	return nil
}

// warnKeystore logs, once, the volumes of vols whose key sits in an
// unsealed keystore beside their ciphertext, or that the local keystore
// is unusable for them.
func warnKeystore(reg *volume.Registry, log *slog.Logger, vols []volume.Volume) {
	var exposed []string
	for _, v := range vols {
		ok, err := keystoreExposed(reg, v)
		if err != nil {
			log.Error("local keystore unusable: volumes with local keys will not attach", "err", err)
			return
		}
		if ok {
			exposed = append(exposed, v.Name)
		}
	}
	if len(exposed) > 0 {
		log.Warn(unsealedKeystoreWarning, "keystore", filepath.Join(reg.Dir(), crypto.KeystoreFile), "volumes", strings.Join(exposed, ","))
	}
}

// inDir reports whether path is dir or under it, symbolic links resolved
// where they resolve.
func inDir(dir, path string) bool {
	resolve := func(p string) string {
		if r, err := filepath.EvalSymlinks(p); err == nil {
			return r
		}
		return filepath.Clean(p)
	}
	rel, err := filepath.Rel(resolve(dir), resolve(path))
	return err == nil && rel != ".." && !strings.HasPrefix(rel, ".."+string(filepath.Separator))
}
