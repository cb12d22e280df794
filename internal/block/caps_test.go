package block

import "testing"

// hider wraps a File and declares that it passes on nothing optional: the
// File's promoted methods must not leak through.
type hider struct{ *File }

func (hider) Caps() Caps { return 0 }

// trimOnly passes on Trim alone.
type trimOnly struct{ *File }

func (trimOnly) Caps() Caps { return CanTrim }

func TestOptionalOf(t *testing.T) {
	f := newFile(t, 1<<20, false)
	for _, tc := range []struct {
		name string
		d    Device
		want [7]bool // trim, zero, extents, cache, tryRead, file, map
	}{
		{"file", f, [7]bool{true, true, true, true, true, true, true}},
		{"mem", NewMem(4096), [7]bool{true, true}},
		{"a wrapper that declares nothing optional", hider{f}, [7]bool{}},
		{"a wrapper that passes on trim", trimOnly{f}, [7]bool{true}},
	} {
		o := OptionalOf(tc.d)
		got := [7]bool{o.Trimmer != nil, o.Zeroer != nil, o.Extenter != nil, o.Cacher != nil, o.TryReader != nil, o.Filer != nil, o.Mapper != nil}
		if got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
