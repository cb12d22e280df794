// Package crypto owns the encrypted volume format (FORMAT.md): chunk
// sealing as DARE 2.0 packages and, as the encrypted-volumes issue
// proceeds, the volume header, the crash-safe chunk map and the KEK
// providers that wrap data keys.
//
// It is a block.Device stage that wraps another; it has no network code,
// never speaks NBD, and never decides who may attach what.
//
// Today it holds the chunk sealer (chunk.go) only; the format is a draft
// and no volume is encrypted yet.
package crypto
