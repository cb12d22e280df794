// Package cowmap owns the authenticated copy-on-write chunk map of an
// encrypted volume (crypto/FORMAT.md, "The map"): for every chunk, which of
// its two homes holds its ciphertext and the opaque 48 bytes that the
// volume stores beside it, kept as a hash tree whose root the volume's
// header carries, plus a MAC-chained log of the commits since the last
// checkpoint. It recovers the map after a crash, verifies every node and
// log block it reads, and holds nodes in a bounded cache shared by volumes.
//
// It knows nothing of encryption beyond the MAC key of the log it is
// given, never writes the volume header (a checkpoint hands the new state
// to its caller), and never touches chunk data: the caller writes the
// ciphertext to the home that Home returns.
//
// Lock order: the caller's chunk locks, then Map.commitMu, then Map.mu,
// then Map.treeMu, then the home bits' and the Cache's locks (leaves).
// A checkpoint beside the commits runs in its own goroutine holding none
// of them while it writes; it takes Map.mu and Map.treeMu to install its
// tree. Holders of commitMu may wait for it (it never takes commitMu); a
// write waits for its moves in Home without holding Map.mu. Flusher's
// locks are leaves.
package cowmap
