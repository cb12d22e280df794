package crypto

import (
	"bytes"
	"encoding/hex"
	"os"
	"strings"
	"testing"
)

// Files the gateway reads are hostile until parsed: a keystore and an
// anchor file (the data dir can be edited, or damaged). Parsing never
// panics; what parses is what the format allows.

func FuzzParseKeystore(f *testing.F) {
	if b, err := os.ReadFile("testdata/keystore-v1.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"magic":"goldilocks-keystore","version":2,"keys":{"default":[{"version":1,"key":"plain:` + strings.Repeat("A", 43) + `=","created":"2026-01-01T00:00:00Z"}]}}`))
	f.Add([]byte(`{"magic":"goldilocks-keystore","version":2,"sealed":{},"keys":{"k":[{"version":2,"key":"sealed:AAAA"}]},"dek_secrets":{"00":{"volume":"x","secret":"plain:"}}}`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		doc, err := parseKeystore(b, "fuzz")
		if err != nil {
			return
		}
		for name, vs := range doc.Keys {
			for i, k := range vs {
				if int(k.Version) != i+1 {
					t.Errorf("key %s: version %d at position %d accepted", name, k.Version, i)
				}
				if !strings.HasPrefix(k.Key, "plain:") && !strings.HasPrefix(k.Key, "sealed:") {
					t.Errorf("key %s v%d: untagged value accepted", name, k.Version)
				}
			}
		}
	})
}

func FuzzParseAnchor(f *testing.F) {
	v := [16]byte{1, 2, 3}
	f.Add(marshalAnchor(v, AnchorState{Seq: 9, Generation: 4, Epoch: 2}))
	f.Add(make([]byte, anchorSize))
	f.Add([]byte("GLDLANC\x00"))
	f.Fuzz(func(t *testing.T, b []byte) {
		st, err := parseAnchor(b, v)
		if err != nil {
			return
		}
		if got := marshalAnchor(v, st); string(got[:52]) != string(b[:52]) {
			t.Errorf("anchor parsed as %+v does not write back the same bytes", st)
		}
	})
}

// FuzzOpenBackup: a backup stream is read from untrusted storage. Reading
// never panics and never returns a record outside the header's volume or
// out of order; the vector's stream reads to its end.
func FuzzOpenBackup(f *testing.F) {
	key := make([]byte, 32)
	for i := range key {
		key[i] = byte(i)
	}
	if raw, err := os.ReadFile("testdata/backup-v1-full.hex"); err == nil {
		if b, err := hex.DecodeString(strings.TrimSpace(string(raw))); err == nil {
			f.Add(b)
			f.Add(b[:200])
		}
	}
	f.Add([]byte("GLBACKUP"))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := OpenBackup(bytes.NewReader(b), func(*BackupHeader) ([]byte, error) { return bytes.Clone(key), nil })
		if err != nil {
			return
		}
		var next int64
		for i := 0; i < 1<<16; i++ {
			rec, err := r.Next()
			if err != nil {
				return
			}
			if rec.Off < next || rec.Len <= 0 || uint64(rec.Off+rec.Len) > r.Header().Size {
				t.Fatalf("record %+v after %d, volume of %d bytes", rec, next, r.Header().Size)
			}
			next = rec.Off + rec.Len
		}
	})
}
