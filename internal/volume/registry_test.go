package volume

import (
	"bytes"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/uuid"

	"goldilocks/crypto"
	"goldilocks/internal/block"
)

func TestRegistryVectorV1(t *testing.T) {
	b, err := os.ReadFile("testdata/volumes.v1.json")
	if err != nil {
		t.Fatal(err)
	}
	vols, err := parseRegistry(b, "volumes.v1.json")
	if err != nil {
		t.Fatal(err)
	}
	want := []Volume{
		{Name: "demo", UUID: "3f2c1a5e-8d4b-4c7a-9e21-0b6f5d7c8a90", Size: 1 << 30, Backing: "volumes/demo.img",
			Created: time.Date(2026, 11, 26, 7, 30, 0, 0, time.UTC)},
		{Name: "vm-a.root", UUID: "a1b2c3d4-e5f6-4711-8899-aabbccddeeff", Size: 2 << 30, Backing: "/dev/vg0/vm-a-root",
			ReadOnly: true, Created: time.Date(2026, 11, 26, 7, 31, 2, 5e8, time.UTC)},
	}
	if len(vols) != len(want) {
		t.Fatalf("%d volumes, want %d", len(vols), len(want))
	}
	for i := range want {
		g, w := vols[i], want[i]
		if g.Name != w.Name || g.UUID != w.UUID || g.Size != w.Size || g.Backing != w.Backing ||
			g.ReadOnly != w.ReadOnly || g.Encrypted != w.Encrypted || !g.Created.Equal(w.Created) || g.KEK != nil {
			t.Errorf("volume %d = %+v, want %+v", i, g, w)
		}
	}
}

func TestRegistryVectorV2(t *testing.T) {
	b, err := os.ReadFile("testdata/volumes.v2.json")
	if err != nil {
		t.Fatal(err)
	}
	vols, err := parseRegistry(b, "volumes.v2.json")
	if err != nil {
		t.Fatal(err)
	}
	if len(vols) != 2 || len(vols[0].Snapshots) != 2 {
		t.Fatalf("volumes %+v: want one with two snapshots and a clone", vols)
	}
	if b := vols[1].Base; vols[1].Name != "db-test" || b == nil || *b != (BaseRef{Volume: "db", Snapshot: "nightly-2", UUID: "0b9d7f5e-3c1a-4e8b-a6d4-2f0e8c6a4b13"}) {
		t.Fatalf("clone %+v", vols[1])
	}
	want := []SnapshotRecord{
		{Name: "nightly-1", UUID: "e3a1c5b7-9d2f-4b6a-8c0e-7f1d3b5a9c24",
			Backing: "snapshots/5d0f6a3c-2b7e-4e41-9a8d-1c3b5e7f9a02-e3a1c5b7-9d2f-4b6a-8c0e-7f1d3b5a9c24.img",
			Created: time.Date(2026, 12, 4, 23, 0, 0, 25e7, time.UTC), Seq: 4711},
		{Name: "nightly-2", UUID: "0b9d7f5e-3c1a-4e8b-a6d4-2f0e8c6a4b13",
			Backing: "snapshots/5d0f6a3c-2b7e-4e41-9a8d-1c3b5e7f9a02-0b9d7f5e-3c1a-4e8b-a6d4-2f0e8c6a4b13.img",
			Created: time.Date(2026, 12, 5, 23, 0, 0, 0, time.UTC), Seq: 9001},
	}
	for i, w := range want {
		g := vols[0].Snapshots[i]
		if g.Name != w.Name || g.UUID != w.UUID || g.Backing != w.Backing || !g.Created.Equal(w.Created) || g.Seq != w.Seq {
			t.Errorf("snapshot %d = %+v, want %+v", i, g, w)
		}
	}
}

func TestRegistryRejectsDamage(t *testing.T) {
	for _, tc := range []struct{ name, doc, want string }{
		{"not json", `{`, "damaged"},
		{"bad magic", `{"magic":"x","version":1,"volumes":[]}`, "magic"},
		{"future version", `{"magic":"goldilocks-volumes","version":3,"volumes":[]}`, "format version 3"},
		{"snapshots in version 1", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"encrypted":true,"backing":"b","snapshots":[{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11","backing":"snapshots/x.img"}]}]}`, "version-1"},
		{"snapshot of a plain volume", `{"magic":"goldilocks-volumes","version":2,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"backing":"b","snapshots":[{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11","backing":"snapshots/x.img"}]}]}`, "plain volume"},
		{"snapshot twice", `{"magic":"goldilocks-volumes","version":2,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"encrypted":true,"backing":"b","snapshots":[{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11","backing":"snapshots/x.img"},{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a12","backing":"snapshots/y.img"}]}]}`, "listed twice"},
		{"snapshot with the volume's uuid", `{"magic":"goldilocks-volumes","version":2,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"encrypted":true,"backing":"b","snapshots":[{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","backing":"snapshots/x.img"}]}]}`, "not unique"},
		{"clone of a missing snapshot", `{"magic":"goldilocks-volumes","version":2,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"encrypted":true,"backing":"b","base":{"volume":"x","snapshot":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11"}}]}`, "its base"},
		{"snapshot outside the data dir", `{"magic":"goldilocks-volumes","version":2,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"encrypted":true,"backing":"b","snapshots":[{"name":"s","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11","backing":"../x.img"}]}]}`, "inside the data dir"},
		{"bad name", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"../x","size":4096,"backing":"b"}]}`, "volume name"},
		{"duplicate", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"backing":"b"},{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a11","size":4096,"backing":"b"}]}`, "twice"},
		{"unaligned size", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4097,"backing":"b"}]}`, "size 4097"},
		{"no backing", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096}]}`, "no backing"},
		{"bad uuid", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"x","size":4096,"backing":"b"}]}`, "uuid"},
		{"shared uuid", `{"magic":"goldilocks-volumes","version":1,"volumes":[{"name":"a","uuid":"9b2e1b9e-6b53-4d43-8f0b-3c2a3f5e7a10","size":4096,"backing":"b"},{"name":"c","uuid":"9B2E1B9E-6B53-4D43-8F0B-3C2A3F5E7A10","size":4096,"backing":"d"}]}`, "same UUID"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseRegistry([]byte(tc.doc), "volumes.json")
			if !errors.Is(err, ErrBadRegistry) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrBadRegistry mentioning %q", err, tc.want)
			}
		})
	}
}

func TestCreateListGet(t *testing.T) {
	dir := t.TempDir()
	r, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	v, err := r.Create(CreateOptions{Name: "a", Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	st, err := os.Stat(r.BackingPath(v))
	if err != nil || st.Size() != 1<<20 {
		t.Fatalf("backing file: %v %v", st, err)
	}
	if _, err := r.Create(CreateOptions{Name: "a", Size: 4096}); !errors.Is(err, ErrExists) {
		t.Fatalf("duplicate create: %v", err)
	}
	for _, bad := range []CreateOptions{
		{Name: "", Size: 4096}, {Name: "-x", Size: 4096}, {Name: strings.Repeat("n", 65), Size: 4096},
		{Name: "b", Size: 4095}, {Name: "b"}, {Name: "c", Encrypted: true}, {Name: "d", Size: 4096, Encrypted: true, KEK: "vault:x"},
	} {
		if _, err := r.Create(bad); err == nil {
			t.Errorf("create %+v succeeded", bad)
		}
	}
	// An existing backing file, its size taken when none is given.
	ext := filepath.Join(t.TempDir(), "ext.raw")
	os.WriteFile(ext, make([]byte, 3*4096+100), 0o600)
	v2, err := r.Create(CreateOptions{Name: "ext", Backing: ext})
	if err != nil || v2.Size != 3*4096 || r.BackingPath(v2) != ext {
		t.Fatalf("create with backing: %+v %v", v2, err)
	}
	// A second registry on the same dir sees both (another process).
	r2, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	vols, _ := r2.List()
	if len(vols) != 2 || vols[0].Name != "a" || vols[1].Name != "ext" {
		t.Fatalf("list = %+v", vols)
	}
	if _, err := r2.Get("zzz"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("get missing: %v", err)
	}
	// No failed create left a backing file behind.
	ents, _ := os.ReadDir(filepath.Join(dir, volumesDir))
	if len(ents) != 1 {
		t.Fatalf("volumes dir holds %d files, want 1", len(ents))
	}
}

func TestConcurrentCreates(t *testing.T) {
	dir := t.TempDir()
	var wg sync.WaitGroup
	for i := 0; i < 16; i++ {
		wg.Add(1)
		go func(i int) {
			defer wg.Done()
			r, err := Open(dir) // one registry each, as separate processes would
			if err != nil {
				t.Error(err)
				return
			}
			if _, err := r.Create(CreateOptions{Name: "v" + string(rune('a'+i)), Size: 4096}); err != nil {
				t.Error(err)
			}
		}(i)
	}
	wg.Wait()
	r, _ := Open(dir)
	vols, err := r.List()
	if err != nil || len(vols) != 16 {
		t.Fatalf("%d volumes after 16 concurrent creates (err %v)", len(vols), err)
	}
}

func TestExportsShareOneDevice(t *testing.T) {
	r, _ := Open(t.TempDir())
	if _, err := r.Create(CreateOptions{Name: "a", Size: 8192}); err != nil {
		t.Fatal(err)
	}
	e := NewExports(r, slog.Default())
	x1, rel1, err := e.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	x2, rel2, err := e.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	if x1.Device != x2.Device {
		t.Fatal("two connections to one volume must share its device")
	}
	rel1()
	rel1() // idempotent
	if _, err := x2.Device.ReadAt(make([]byte, 10), 0); err != nil {
		t.Fatalf("device closed while still attached: %v", err)
	}
	rel2()
	if _, _, err := e.Open("nope"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("unknown volume: %v", err)
	}
}

// Attaches that come at once (an upgrade adopting every connection) open
// each volume once, in parallel across volumes, and share it per volume;
// the last release closes it, and it opens again after.
func TestExportsOpenConcurrently(t *testing.T) {
	r, _ := Open(t.TempDir())
	for _, n := range []string{"a", "b", "c"} {
		if _, err := r.Create(CreateOptions{Name: n, Size: 1 << 20, Encrypted: n != "c"}); err != nil {
			t.Fatal(err)
		}
	}
	e := NewExports(r, slog.New(slog.DiscardHandler))
	const per = 8
	devs := make([]block.Device, 3*per)
	rels := make([]func(), 3*per)
	errs := make([]error, 3*per)
	var wg sync.WaitGroup
	for i := range devs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			x, rel, err := e.Open([]string{"a", "b", "c"}[i%3])
			if err == nil {
				devs[i], rels[i] = x.Device, rel
			}
			errs[i] = err
		}()
	}
	wg.Wait()
	for i := range devs {
		if errs[i] != nil {
			t.Fatal(errs[i])
		}
		if devs[i] != devs[i%3] {
			t.Fatalf("attach %d of volume %d got its own device", i, i%3)
		}
	}
	if devs[0] == devs[1] || devs[1] == devs[2] {
		t.Fatal("two volumes share a device")
	}
	for _, rel := range rels {
		rel()
	}
	if _, err := devs[2].ReadAt(make([]byte, 4096), 0); err == nil { // the plain volume's file
		t.Fatal("the device still reads after its last release")
	}
	x, rel, err := e.Open("a")
	if err != nil {
		t.Fatalf("open after the last release: %v", err)
	}
	defer rel()
	if _, err := x.Device.ReadAt(make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
}

// BenchmarkRegistryGet: the lookup every attach makes (the volume, its
// labels for the policy) costs the same with 10 volumes or 2,000: an
// index, not a copy and scan of the registry.
func BenchmarkRegistryGet(b *testing.B) {
	for _, n := range []int{10, 2000} {
		b.Run(fmt.Sprint(n), func(b *testing.B) {
			dir := b.TempDir()
			r, err := Open(dir)
			if err != nil {
				b.Fatal(err)
			}
			err = r.update(func(vols []Volume) ([]Volume, error) {
				for i := range n {
					vols = append(vols, Volume{Name: fmt.Sprintf("v%d", i), UUID: uuid.NewString(), Size: 4096, Backing: "x",
						Labels: map[string]string{"tenant": "t"}})
				}
				return vols, nil
			})
			if err != nil {
				b.Fatal(err)
			}
			name := fmt.Sprintf("v%d", n/2)
			b.ReportAllocs()
			b.ResetTimer()
			for range b.N {
				if _, err := r.Get(name); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestCreateOverHeldVolume: a backing store that already holds a volume
// (here a file holding an encrypted volume, as another data dir or another
// gateway made it) is refused as a new volume's backing unless Overwrite,
// and the refusal writes nothing; either header copy marks it, as one may
// be torn.
func TestCreateOverHeldVolume(t *testing.T) {
	dir := t.TempDir()
	back := filepath.Join(dir, "shared.img")
	os.WriteFile(back, nil, 0o600)
	os.Truncate(back, 8<<20)
	a, err := Open(filepath.Join(dir, "a"))
	if err != nil {
		t.Fatal(err)
	}
	made, err := a.Create(CreateOptions{Name: "vm", Size: 2 << 20, Encrypted: true, Backing: back})
	if err != nil {
		t.Fatal(err)
	}
	whole, _ := os.ReadFile(back)
	hdr := append([]byte(nil), whole[:2*crypto.HeaderBlockSize]...)
	zero := make([]byte, crypto.HeaderBlockSize)
	for _, tc := range []struct {
		name   string
		damage func(f *os.File) // to the store's header blocks, before the create
		plain  bool
		held   bool
	}{
		{name: "encrypted over encrypted", held: true},
		{name: "plain over encrypted", plain: true, held: true},
		{name: "copy A torn", damage: func(f *os.File) { f.WriteAt(zero, 0) }, held: true},
		{name: "copy B torn", damage: func(f *os.File) { f.WriteAt(zero, crypto.HeaderBlockSize) }, held: true},
		{name: "both copies zero", damage: func(f *os.File) { f.WriteAt(zero, 0); f.WriteAt(zero, crypto.HeaderBlockSize) }, plain: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f, err := os.OpenFile(back, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			f.WriteAt(hdr, 0)
			if tc.damage != nil {
				tc.damage(f)
			}
			f.Close()
			before, _ := os.ReadFile(back)
			b, err := Open(filepath.Join(t.TempDir(), "b"))
			if err != nil {
				t.Fatal(err)
			}
			held, err := b.HeldVolume(back)
			if err != nil || (held != "") != tc.held {
				t.Fatalf("HeldVolume = %q, %v; want held %v", held, err, tc.held)
			}
			if tc.held && tc.damage == nil && !strings.Contains(held, made.UUID) {
				t.Errorf("HeldVolume = %q does not name uuid %s", held, made.UUID)
			}
			o := CreateOptions{Name: "vm", Size: 2 << 20, Encrypted: !tc.plain, Backing: back}
			_, err = b.Create(o)
			if !tc.held {
				if err != nil {
					t.Fatalf("create over a store that holds nothing: %v", err)
				}
				return
			}
			if !errors.Is(err, ErrHoldsVolume) || !strings.Contains(err.Error(), "volume adopt vm --backing") {
				t.Fatalf("create over a held store: %v, want ErrHoldsVolume naming adopt", err)
			}
			if after, _ := os.ReadFile(back); !bytes.Equal(before, after) {
				t.Fatal("the refused create wrote to the store")
			}
			if vols, _ := b.List(); len(vols) != 0 {
				t.Fatalf("the refused create registered %+v", vols)
			}
			o.Overwrite = true
			v, err := b.Create(o)
			if err != nil || v.UUID == made.UUID {
				t.Fatalf("create with Overwrite: %+v %v", v, err)
			}
		})
	}
}
