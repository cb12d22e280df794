//go:build !ceph

package rbd

// Supported reports whether this binary has the RBD backend.
const Supported = false

// Image is an open RBD image; a binary without Ceph support has none.
type Image struct{ noImage }

// Open fails: this binary was built without Ceph support.
func Open(s Spec) (*Image, error) { return nil, ErrNoCeph }

type noImage struct{}

func (noImage) ReadAt([]byte, int64) (int, error)  { return 0, ErrNoCeph }
func (noImage) WriteAt([]byte, int64) (int, error) { return 0, ErrNoCeph }
func (noImage) Size() int64                        { return 0 }
func (noImage) Flush() error                       { return ErrNoCeph }
func (noImage) Close() error                       { return nil }
func (noImage) Limit(int64)                        {}

// MetaVolume and MetaLease are the image metadata keys (lease.go).
const (
	MetaVolume = "goldilocks.volume"
	MetaLease  = "goldilocks.lease"
)

// AcquireLease fails: no Ceph support.
func (*Image) AcquireLease(string) error { return ErrNoCeph }

// BreakLease fails: no Ceph support.
func BreakLease(Spec) (string, error) { return "", ErrNoCeph }

// Metadata fails: no Ceph support.
func (*Image) Metadata(string) (string, error) { return "", ErrNoCeph }

// SetMetadata fails: no Ceph support.
func (*Image) SetMetadata(string, string) error { return ErrNoCeph }
