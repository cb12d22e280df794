// Package crypto will own the encrypted volume format (FORMAT.md, written
// before its code): the volume header, chunk sealing as DARE 2.0 packages,
// the crash-safety scheme, and the KEK providers that wrap data keys.
//
// It is a block.Device stage that wraps another; it has no network code,
// never speaks NBD, and never decides who may attach what.
//
// Nothing is implemented here yet: encrypted volumes are the next issue.
package crypto
