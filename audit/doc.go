// Package audit owns the tamper-evident audit trail (FORMAT.md): an
// append-only, hash-chained JSON Lines log with signed checkpoints,
// segments that rotate and compress, verification that names what was
// changed, and export (JSON Lines, CEF). It records events; it decides
// nothing, never sees key material, and never touches volumes.
package audit
