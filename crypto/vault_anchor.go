package crypto

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"

	vault "github.com/hashicorp/vault/api"
)

// VaultAnchor keeps rollback anchors in Vault's KV version 2 engine (the
// one VaultKEK keeps its data key secrets in), at
// KVMount/data/goldilocks/anchors/<volume UUID>, advanced with
// check-and-set: every gateway that reaches the Vault cluster sees the same
// anchor, so a volume that moves between gateways (volume adopt) keeps
// its rollback protection, which a data dir's anchor file cannot give.
// FORMAT.md, "Rollback anchor".
type VaultAnchor struct {
	k *VaultKEK
}

var _ Anchor = (*VaultAnchor)(nil)

// vaultAnchorDir is where anchors live under the KV mount. Part of the
// format.
const vaultAnchorDir = "goldilocks/anchors"

// Anchor returns the anchor store of this Vault connection.
func (k *VaultKEK) Anchor() *VaultAnchor { return &VaultAnchor{k: k} }

func (a *VaultAnchor) path(op string, volume [16]byte) string {
	return a.k.cfg.KVMount + "/" + op + "/" + vaultAnchorDir + "/" + formatUUID(volume)
}

// vaultAnchorTimeout bounds one anchor operation (Load, Advance, Remove).
const vaultAnchorTimeout = 10 * time.Second

// read returns the anchored state and the KV version holding it (0: none).
func (a *VaultAnchor) read(ctx context.Context, volume [16]byte) (AnchorState, int64, error) {
	p := a.path("data", volume)
	s, err := a.k.call(ctx, "reading rollback anchor "+p, func() (*vault.Secret, error) {
		return a.k.c.Logical().ReadWithContext(ctx, p)
	})
	if err != nil {
		return AnchorState{}, 0, a.kvError(err)
	}
	var data, meta map[string]any
	if s != nil {
		data, _ = s.Data["data"].(map[string]any)
		meta, _ = s.Data["metadata"].(map[string]any)
	}
	if data == nil { // never written, or its newest version deleted
		var version int64
		if meta != nil {
			n, _ := meta["version"].(json.Number)
			version, _ = n.Int64()
		}
		return AnchorState{}, version, nil
	}
	n, _ := meta["version"].(json.Number)
	version, verr := n.Int64()
	field := func(name string, bits int) uint64 {
		v, _ := data[name].(string)
		x, perr := strconv.ParseUint(v, 10, bits)
		if perr != nil && err == nil {
			err = fmt.Errorf("vault at %s: rollback anchor %s: field %s is %q", a.k.c.Address(), p, name, v)
		}
		return x
	}
	st := AnchorState{Seq: field("seq", 64), Generation: field("generation", 64), Epoch: uint32(field("epoch", 32))}
	if vol, _ := data["volume"].(string); err == nil && vol != formatUUID(volume) {
		err = fmt.Errorf("vault at %s: rollback anchor %s names volume %q", a.k.c.Address(), p, vol)
	}
	if err == nil && verr != nil {
		err = fmt.Errorf("vault at %s: rollback anchor %s: no KV version in the answer", a.k.c.Address(), p)
	}
	return st, version, err
}

// Load returns the anchored state (ok false if Vault has none).
func (a *VaultAnchor) Load(volume [16]byte) (AnchorState, bool, error) {
	ctx, cancel := context.WithTimeout(context.Background(), vaultAnchorTimeout)
	defer cancel()
	st, version, err := a.read(ctx, volume)
	return st, err == nil && version > 0 && st != (AnchorState{}), err
}

// Advance records st field by field where it is newer: read, merge, and
// write with check-and-set on the version read, again if another writer
// came in between.
func (a *VaultAnchor) Advance(volume [16]byte, st AnchorState) error {
	ctx, cancel := context.WithTimeout(context.Background(), vaultAnchorTimeout)
	defer cancel()
	p := a.path("data", volume)
	for try := 0; ; try++ {
		old, version, err := a.read(ctx, volume)
		if err != nil {
			return err
		}
		merged := old.Merge(st)
		if version > 0 && merged == old {
			return nil
		}
		_, err = a.k.call(ctx, "advancing rollback anchor "+p, func() (*vault.Secret, error) {
			return a.k.c.Logical().WriteWithContext(ctx, p, map[string]any{
				"data": map[string]any{
					"volume":     formatUUID(volume),
					"seq":        strconv.FormatUint(merged.Seq, 10),
					"generation": strconv.FormatUint(merged.Generation, 10),
					"epoch":      strconv.FormatUint(uint64(merged.Epoch), 10),
				},
				"options": map[string]any{"cas": version},
			})
		})
		if err == nil {
			return nil
		}
		if !casMismatch(err) || try == 8 {
			return a.kvError(err)
		}
	}
}

// casMismatch reports whether err is KV's refusal of a stale
// check-and-set (another writer advanced the anchor first).
func casMismatch(err error) bool {
	var re *vault.ResponseError
	return errors.As(err, &re) && re.StatusCode == 400 && strings.Contains(strings.Join(re.Errors, " "), "check-and-set")
}

// Remove deletes the volume's anchor with all its versions (volume shred).
func (a *VaultAnchor) Remove(volume [16]byte) error {
	ctx, cancel := context.WithTimeout(context.Background(), vaultAnchorTimeout)
	defer cancel()
	p := a.path("metadata", volume)
	_, err := a.k.call(ctx, "deleting rollback anchor "+p, func() (*vault.Secret, error) {
		return a.k.c.Logical().DeleteWithContext(ctx, p)
	})
	if err != nil {
		return a.kvError(err)
	}
	return nil
}

// kvError says, with a refusal of an anchor request, what the token
// needs (not for an unavailable Vault).
func (a *VaultAnchor) kvError(err error) error {
	if errors.Is(err, ErrVaultUnavailable) {
		return err
	}
	m := a.k.cfg.KVMount
	return fmt.Errorf("%w (%s/): rollback anchors: the token needs create, read and update on %s/data/%s/* and delete on %s/metadata/%s/* (README, the gateway's Vault policy): %w",
		ErrVaultKV, m, m, vaultAnchorDir, m, vaultAnchorDir, err)
}

// Anchors is an Anchor kept in several places at once (a data dir's file
// and Vault): Load gives the newest of what they hold, Advance and Remove
// go to all of them.
type Anchors []Anchor

// Load merges every anchor's state; an error from any is returned.
func (as Anchors) Load(volume [16]byte) (AnchorState, bool, error) {
	var (
		st    AnchorState
		found bool
	)
	for _, a := range as {
		s, ok, err := a.Load(volume)
		if err != nil {
			return AnchorState{}, false, err
		}
		if ok {
			st, found = st.Merge(s), true
		}
	}
	return st, found, nil
}

// Advance advances every anchor; it returns the first error, after
// trying them all.
func (as Anchors) Advance(volume [16]byte, st AnchorState) error {
	var first error
	for _, a := range as {
		if err := a.Advance(volume, st); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Remove removes the volume's anchor everywhere.
func (as Anchors) Remove(volume [16]byte) error {
	var first error
	for _, a := range as {
		if err := a.Remove(volume); err != nil && first == nil {
			first = err
		}
	}
	return first
}
