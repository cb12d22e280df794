package volume

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/internal/block"
)

// TestSnapshotDeleteDestroysKey: a copy of a snapshot's store taken
// before its delete no longer opens after it (its data key is destroyed
// in the keystore, as a shred's is), while the volume still opens.
func TestSnapshotDeleteDestroysKey(t *testing.T) {
	k, reg := testKeys(t, "v@default")
	s := &Snapshots{Reg: reg, Open: k.Open, Log: k.Log}
	ctx := context.Background()
	res, err := s.Create(ctx, "v", "s1")
	if err != nil {
		t.Fatal(err)
	}
	store := filepath.Join(reg.Dir(), res.Snapshot.Backing)
	kept := filepath.Join(t.TempDir(), "kept.img")
	b, err := os.ReadFile(store)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(kept, b, 0o600); err != nil {
		t.Fatal(err)
	}
	open := func(path string, id [16]byte) error {
		dev, err := block.OpenFile(path, false)
		if err != nil {
			return err
		}
		kek, _ := reg.KEK("local")
		h, err := crypto.OpenHeader(ctx, dev, "kept", id, kek, k.Log)
		if err == nil {
			h.Close()
		}
		dev.Close()
		return err
	}
	sid := uuid.MustParse(res.Snapshot.UUID)
	if err := open(kept, sid); err != nil {
		t.Fatalf("the copy before the delete: %v", err)
	}
	if err := s.Delete(ctx, "v", "s1"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(store); !os.IsNotExist(err) {
		t.Fatalf("the store is still there: %v", err)
	}
	if err := open(kept, sid); !errors.Is(err, crypto.ErrKeyDestroyed) {
		t.Fatalf("the kept copy after the delete: %v, want ErrKeyDestroyed", err)
	}
	v, err := reg.Get("v")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := reg.OpenDevice(v, k.Log)
	if err != nil {
		t.Fatalf("the volume after its snapshot's delete: %v", err)
	}
	dev.Close()
}
