// Package crypto owns encryption at rest (FORMAT.md, format 2): chunks
// sealed as DARE 2.0 packages under per-epoch subkeys, the volume header
// with its wrapped data keys, the rollback anchor, key rotation and online
// rekey, the KEK providers that wrap data keys (the local keystore,
// Vault Transit), and the lease record kept beside them in Vault (not yet
// taken by an attach). The authenticated copy-on-write chunk map is its own
// package, crypto/cowmap, which knows nothing of encryption.
//
// Files: chunk.go (sealing), header.go (the header and its two copies),
// epoch.go (seal epochs and the keyring), anchor.go (rollback anchor),
// volume.go (attach, flush, detach), io.go (the data path), rekey.go
// (rotation, rekey), kek.go and vault.go (KEK providers), vault_anchor.go
// and vault_lease.go (the anchor and the lease in Vault's KV).
//
// It is a block.Device stage that wraps another; it serves no network
// protocol, never speaks NBD, and never decides who may attach what. The
// only network it touches is a KEK provider's (Vault); chunk and map code
// never imports Vault's client.
//
// Lock order: Volume.keyMu (one rotation or rekey), then the chunk locks
// (ascending index), then the map's commit lock, Volume.gate (a write
// holds it shared from choosing a home to recording it; a commit takes it
// exclusively to snapshot), headerState.mu, the map's state lock, its tree
// lock, the node cache's shard locks; the keyring's lock is a leaf. A
// write may wait, holding its chunk lock and the gate shared, for the
// commit in progress to end; that commit holds neither.
package crypto
