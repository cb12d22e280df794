package volume

import (
	"context"
	"fmt"
	"log/slog"
	"time"

	"goldilocks/crypto"
	"goldilocks/internal/upstream"
)

// The lease of a volume on an upstream NBD export, which has no lock of
// its own: kept in Vault (crypto.VaultLease, crypto/FORMAT.md "Lease in
// Vault"), so only volumes whose key is in Vault have one. Every
// read-write open of such a volume's store takes it (an encrypted
// volume's store is opened read-write even when it is served read-only:
// the header is written at attach), and the upstream device checks it
// before every request it sends and releases it at Close (abandons it,
// left to run out, if a request failed unanswered).

// SetLeaseTTL sets the time to live of the leases this registry takes on
// volumes on upstream exports (0: crypto.DefaultLeaseTTL). A holder that
// cannot renew its lease for three quarters of it fences itself; a dead
// holder's lease is taken over after the TTL and a quarter.
func (r *Registry) SetLeaseTTL(d time.Duration) { r.leaseTTL = d }

// upstreamLeased reports whether v's store is leased in Vault: an
// encrypted volume on an upstream export with its key in Vault.
func upstreamLeased(v Volume) bool {
	return upstream.IsURI(v.Backing) && v.Encrypted && v.KEK != nil && v.KEK.Provider == "vault"
}

// leaseStore returns the lease store of v's Vault and the TTL it uses.
func (r *Registry) leaseStore(v Volume) (*crypto.VaultLease, [16]byte, time.Duration, error) {
	id, err := v.UUIDBytes()
	if err != nil {
		return nil, id, 0, err
	}
	kek, err := r.KEK("vault")
	if err != nil {
		return nil, id, 0, fmt.Errorf("volume %s: its lease: %w", v.Name, err)
	}
	vk, ok := kek.(*crypto.VaultKEK)
	if !ok {
		return nil, id, 0, fmt.Errorf("volume %s: its lease: the vault provider is a %T", v.Name, kek)
	}
	ttl := r.leaseTTL
	if ttl <= 0 {
		ttl = crypto.DefaultLeaseTTL
	}
	return vk.Lease(ttl), id, ttl, nil
}

// upstreamOptions takes v's lease, if it has one, for a read-write open
// of its upstream store, and returns the options to dial it with: the
// lease, and TCP_USER_TIMEOUT at the lease's margin (a quarter of its
// TTL), so that a request handed to the kernel on a link cut off longer
// than that is dropped with the connection, not delivered later. A
// volume on an upstream export without a lease is logged as such.
func (r *Registry) upstreamOptions(v Volume, readOnly bool, log *slog.Logger) (upstream.Options, error) {
	o := upstream.Options{Log: log, OutageLimit: r.outageLimit, Conns: r.upstreamConns}
	if readOnly {
		return o, nil
	}
	if !upstreamLeased(v) {
		if log != nil {
			log.Warn("volume on an upstream export has no lease: nothing keeps another gateway from attaching it at once (only encrypted volumes with their key in Vault are leased)")
		}
		return o, nil
	}
	vl, id, ttl, err := r.leaseStore(v)
	if err != nil {
		return o, err
	}
	// Long enough to take over a dead holder's lease (its TTL and a
	// quarter, our default if its is longer) and for a few slow answers.
	ctx, cancel := context.WithTimeout(context.Background(), 2*max(ttl, crypto.DefaultLeaseTTL)+15*time.Second)
	defer cancel()
	lease, err := vl.Acquire(ctx, id, r.holder())
	if err != nil {
		return o, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	o.Lease, o.UserTimeout = lease, ttl/4
	return o, nil
}

// breakUpstreamLease breaks the lease another gateway holds on v's
// upstream store: its holder fences itself at its next renewal, and an
// attach here takes the lease over once the broken record has stood for
// the TTL and a quarter.
func (r *Registry) breakUpstreamLease(v Volume) (string, error) {
	if !upstreamLeased(v) {
		return "", fmt.Errorf("volume %s: backing %s has no lease to break (on an upstream export, only encrypted volumes with their key in Vault are leased)", v.Name, v.Backing)
	}
	vl, id, _, err := r.leaseStore(v)
	if err != nil {
		return "", err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	who, err := vl.Break(ctx, id, r.holder())
	if err != nil {
		return who, fmt.Errorf("volume %s: %w", v.Name, err)
	}
	return who, nil
}
