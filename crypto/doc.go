// Package crypto owns encryption at rest (FORMAT.md): chunks sealed as
// DARE 2.0 packages, the volume header with its wrapped data keys, the
// crash-safe copy-on-write chunk map, key rotation and online rekey, and the
// KEK providers that wrap data keys (the local keystore, Vault Transit).
//
// It is a block.Device stage that wraps another; it serves no network
// protocol, never speaks NBD, and never decides who may attach what. The
// only network it touches is a KEK provider's (Vault).
package crypto
