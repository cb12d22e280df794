// Package policy will own access decisions: identities, rules, rate limits
// and quarantine, read from a declarative file. It is pure decisions,
// inputs in and verdict out: no I/O on the data path, no NBD, no keys.
//
// Nothing is implemented here yet (the identity-and-policy issue).
package policy
