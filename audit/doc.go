// Package audit will own the tamper-evident audit trail: hash-chained,
// signed, append-only records, their export and their verification. It
// never sees key material and is not on the per-request data path.
//
// Nothing is implemented here yet (the audit issue).
package audit
