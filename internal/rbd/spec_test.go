package rbd

import (
	"errors"
	"testing"
)

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want Spec
		err  bool
	}{
		{"rbd:rbd/vm1", Spec{Pool: "rbd", Image: "vm1"}, false},
		{"rbd:pool/img:conf=/etc/ceph/c.conf:id=gw", Spec{Pool: "pool", Image: "img", Conf: "/etc/ceph/c.conf", ID: "gw"}, false},
		{"rbd:pool/img:id=gw", Spec{Pool: "pool", Image: "img", ID: "gw"}, false},
		{"rbd:pool", Spec{}, true},
		{"rbd:/img", Spec{}, true},
		{"rbd:pool/", Spec{}, true},
		{"rbd:a/b/c", Spec{}, true},
		{"rbd:a/b:keyring=/x", Spec{}, true},
		{"nbd://h/x", Spec{}, true},
	} {
		got, err := Parse(tc.in)
		if tc.err {
			if !errors.Is(err, ErrSpec) {
				t.Errorf("Parse(%q) = %+v, %v; want ErrSpec", tc.in, got, err)
			}
			continue
		}
		if err != nil || got != tc.want {
			t.Errorf("Parse(%q) = %+v, %v; want %+v", tc.in, got, err, tc.want)
		}
		if back, _ := Parse(got.String()); back != got {
			t.Errorf("%q does not round-trip: %q", tc.in, got.String())
		}
	}
}
