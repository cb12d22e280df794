// Package secretfile reads files that hold secrets (a keystore, a private
// key, a passphrase, a Vault secret id) and refuses any that group or
// others may read or write, as ssh does for its keys: such a file has
// leaked already, or can be replaced. It owns that check and nothing
// else; callers parse what it returns.
package secretfile

import (
	"errors"
	"fmt"
	"io"
	"os"
)

// ErrLoose: the file's mode lets group or others at it.
var ErrLoose = errors.New("a file holding a secret must be accessible to its owner only")

// Read returns the contents of the secret file at path, after checking
// that it is a regular file with no group or other permission bits.
// Errors from os (a missing file: os.ErrNotExist) are wrapped as they are.
func Read(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	if err := check(f, path); err != nil {
		return nil, err
	}
	return io.ReadAll(f)
}

// Check checks the file at path as Read does, without reading it (for
// files a library reads itself, such as a TLS key).
func Check(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return check(f, path)
}

func check(f *os.File, path string) error {
	st, err := f.Stat()
	if err != nil {
		return err
	}
	if !st.Mode().IsRegular() {
		return fmt.Errorf("%s: not a regular file", path)
	}
	if p := st.Mode().Perm(); p&0o077 != 0 {
		return fmt.Errorf("%s has mode %04o: %w (chmod 600 %s)", path, p, ErrLoose, path)
	}
	return nil
}
