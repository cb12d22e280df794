package volume

import (
	"os"
	"testing"

	"github.com/google/uuid"
)

// The registry file is hostile until parsed (a hand edit, a damaged
// disk): parsing never panics, and every volume it accepts has a valid
// name, a size the gateway can serve and a unique name and UUID.
func FuzzParseRegistry(f *testing.F) {
	if b, err := os.ReadFile("testdata/volumes.v1.json"); err == nil {
		f.Add(b)
	}
	f.Add([]byte(`{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"backing":"volumes/a.img"}]}`))
	f.Add([]byte(`{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"../x","size":-1}]}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		vols, err := parseRegistry(b, "fuzz")
		if err != nil {
			return
		}
		names, uuids := map[string]bool{}, map[uuid.UUID]bool{}
		for _, v := range vols {
			if !nameRE.MatchString(v.Name) {
				t.Errorf("invalid name %q accepted", v.Name)
			}
			if v.Size <= 0 || v.Size%SizeAlign != 0 {
				t.Errorf("volume %q: size %d accepted", v.Name, v.Size)
			}
			id, err := uuid.Parse(v.UUID)
			if err != nil || names[v.Name] || uuids[id] {
				t.Errorf("volume %q: bad or duplicate name or UUID accepted (%q)", v.Name, v.UUID)
			}
			names[v.Name], uuids[id] = true, true
		}
	})
}
