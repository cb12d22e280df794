package volume

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log/slog"
	"strings"
	"testing"
)

func testKeys(t *testing.T, vols ...string) (*Keys, *Registry) {
	t.Helper()
	reg, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	for _, v := range vols {
		name, key, _ := strings.Cut(v, "@")
		if _, err := reg.Create(CreateOptions{Name: name, Size: 1 << 20, Encrypted: true, KEK: "local:" + key}); err != nil {
			t.Fatal(err)
		}
	}
	return &Keys{Reg: reg, Open: LocalOpener{Reg: reg, Log: log}, Log: log}, reg
}

func versions(t *testing.T, k *Keys) map[string]uint32 {
	t.Helper()
	st, err := k.Status()
	if err != nil {
		t.Fatal(err)
	}
	m := map[string]uint32{}
	for _, s := range st {
		m[s.Volume] = s.Version
	}
	return m
}

func TestRotateSelection(t *testing.T) {
	k, _ := testKeys(t, "a@default", "b@default", "c@other")
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		o       RotateOptions
		errPart string
		want    map[string]uint32
	}{
		{"nothing", RotateOptions{}, "no key selected", map[string]uint32{"a": 1, "b": 1, "c": 1}},
		{"unknown key", RotateOptions{Keys: []string{"nope"}}, "no volume uses it", map[string]uint32{"a": 1, "b": 1, "c": 1}},
		{"one key", RotateOptions{Keys: []string{"default"}}, "", map[string]uint32{"a": 2, "b": 2, "c": 1}},
		{"qualified", RotateOptions{Keys: []string{"local:other"}}, "", map[string]uint32{"a": 2, "b": 2, "c": 2}},
		{"rewrap-only is idempotent", RotateOptions{All: true, RewrapOnly: true}, "", map[string]uint32{"a": 2, "b": 2, "c": 2}},
		{"all", RotateOptions{All: true}, "", map[string]uint32{"a": 3, "b": 3, "c": 3}},
		{"min-version met", RotateOptions{All: true, RewrapOnly: true, MinVersion: 3}, "", map[string]uint32{"a": 3, "b": 3, "c": 3}},
		{"min-version unmet", RotateOptions{Keys: []string{"other"}, RewrapOnly: true, MinVersion: 4}, "below --min-version 4", map[string]uint32{"a": 3, "b": 3, "c": 3}},
		{"unused local key made anyway", RotateOptions{Keys: []string{"local:spare"}}, "", map[string]uint32{"a": 3, "b": 3, "c": 3}},
	} {
		_, err := k.Rotate(ctx, tc.o)
		if (tc.errPart == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tc.errPart) {
			t.Errorf("%s: error %v, want %q", tc.name, err, tc.errPart)
		}
		if got := versions(t, k); !mapsEqual(got, tc.want) {
			t.Errorf("%s: versions %v, want %v", tc.name, got, tc.want)
		}
	}
}

func mapsEqual(a, b map[string]uint32) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// An interrupted rotation (a new key version made, no volume rewrapped
// yet) is finished by --rewrap-only, and the data reads after it.
func TestRotateResume(t *testing.T) {
	k, reg := testKeys(t, "a@default", "b@default")
	ctx := context.Background()
	kek, _ := reg.KEK("local")
	if _, err := kek.Rotate(ctx, "default"); err != nil { // the crash came after this
		t.Fatal(err)
	}
	var calls, last, total int
	res, err := k.Rotate(ctx, RotateOptions{Keys: []string{"default"}, RewrapOnly: true, MinVersion: 2,
		Progress: func(d, n int) { calls, last, total = calls+1, d, n }})
	if err != nil || len(res.Volumes) != 2 || res.Volumes[0].From != 1 || res.Volumes[0].To != 2 {
		t.Fatalf("resume: %+v %v", res, err)
	}
	if calls != 2 || last != 2 || total != 2 {
		t.Fatalf("progress: %d calls, last %d of %d; want one per volume", calls, last, total)
	}
	// An attached volume (open through Exports) rotates too, and serves.
	ex := NewExports(reg, slog.New(slog.DiscardHandler))
	exp, release, err := ex.Open("a")
	if err != nil {
		t.Fatal(err)
	}
	defer release()
	if _, err := exp.Device.WriteAt(bytes.Repeat([]byte{3}, 4096), 0); err != nil {
		t.Fatal(err)
	}
	k.Open = ex
	if _, err := k.Rotate(ctx, RotateOptions{All: true}); err != nil {
		t.Fatal(err)
	}
	if v := versions(t, k); v["a"] != 3 || v["b"] != 3 {
		t.Fatalf("versions %v", v)
	}
	got := make([]byte, 4096)
	if _, err := exp.Device.ReadAt(got, 0); err != nil || got[0] != 3 {
		t.Fatalf("read after rotation: %v", err)
	}
	// With the volume attached, a local open is refused, naming the cause.
	k.Open = LocalOpener{Reg: reg, Log: k.Log}
	res, err = k.Rotate(ctx, RotateOptions{All: true})
	if !errors.Is(err, ErrRotationIncomplete) || !strings.Contains(err.Error(), "a: ") {
		t.Fatalf("local rotation of an attached volume: %v", err)
	}
	if v := versions(t, k); v["a"] != 3 || v["b"] != 4 {
		t.Fatalf("versions after a partial rotation: %v", v)
	}
}
