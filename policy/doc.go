// Package policy owns access decisions (FORMAT.md): the policy file,
// identities, rules, rate limits and quarantine. It is pure decisions,
// inputs in and verdict out: it reads its file when asked, and nothing else
// — no network, no NBD, no keys, no clocks on the data path. The gateway
// enforces what it decides.
package policy
