// Package rbd is the Ceph RBD backend: a block.Device on an RBD image,
// through librbd (github.com/ceph/go-ceph, cgo). A backing store names an
// image as QEMU does: rbd:POOL/IMAGE[:conf=PATH][:id=USER]; without conf,
// CEPH_CONF or /etc/ceph/ceph.conf, and the keyring the conf names.
//
// It owns the RBD client and nothing else. Binaries built without the
// "ceph" build tag (a pure-Go build) have only this file and stub.go:
// Open then says the binary lacks Ceph support.
package rbd

import (
	"errors"
	"fmt"
	"strings"
)

// Errors callers branch on.
var (
	ErrSpec   = errors.New("rbd: not an RBD image (rbd:POOL/IMAGE[:conf=PATH][:id=USER])")
	ErrNoCeph = errors.New("this goldilocks was built without Ceph RBD support (make build on a machine with librbd-dev and librados-dev builds it in; or go build -tags ceph,pacific)")
)

// Spec names an image and how to reach its cluster.
type Spec struct {
	Pool, Image string
	Conf        string // ceph.conf; "": CEPH_CONF or the default
	ID          string // the client's id (client.ID); "": admin
}

// IsSpec reports whether s names an RBD image.
func IsSpec(s string) bool { return strings.HasPrefix(s, "rbd:") }

// Parse reads rbd:POOL/IMAGE[:conf=PATH][:id=USER].
func Parse(s string) (Spec, error) {
	rest, ok := strings.CutPrefix(s, "rbd:")
	if !ok {
		return Spec{}, fmt.Errorf("%w: %q", ErrSpec, s)
	}
	parts := strings.Split(rest, ":")
	pool, image, ok := strings.Cut(parts[0], "/")
	if !ok || pool == "" || image == "" || strings.Contains(image, "/") {
		return Spec{}, fmt.Errorf("%w: %q", ErrSpec, s)
	}
	sp := Spec{Pool: pool, Image: image}
	for _, p := range parts[1:] {
		k, v, _ := strings.Cut(p, "=")
		switch k {
		case "conf":
			sp.Conf = v
		case "id":
			sp.ID = v
		default:
			return Spec{}, fmt.Errorf("%w: option %q in %q (conf= and id= are known)", ErrSpec, p, s)
		}
	}
	return sp, nil
}

// String writes the spec back in its own syntax.
func (s Spec) String() string {
	out := "rbd:" + s.Pool + "/" + s.Image
	if s.Conf != "" {
		out += ":conf=" + s.Conf
	}
	if s.ID != "" {
		out += ":id=" + s.ID
	}
	return out
}
