//go:build ceph

package rbd

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"github.com/ceph/go-ceph/rados"
	gorbd "github.com/ceph/go-ceph/rbd"

	"goldilocks/internal/block"
)

// Supported reports whether this binary has the RBD backend.
const Supported = true

// Image is an open RBD image as a block device. librbd is safe for
// concurrent calls on one image: every goroutine's request is in flight
// at once.
type Image struct {
	spec  Spec
	conn  *rados.Conn
	ioctx *rados.IOContext
	img   *gorbd.Image
	size  int64
	// leased: this client holds the image's exclusive lock (lease.go).
	leased bool
	// fastDiff: the image keeps an object map with fast-diff, so block
	// status is answered from it (Extents) without reading objects.
	fastDiff bool
	// aio runs reads, writes and flushes asynchronously (aio.go); nil:
	// go-ceph's synchronous calls.
	aio *aio
}

var (
	_ block.Device    = (*Image)(nil)
	_ block.Capable   = (*Image)(nil)
	_ block.Trimmer   = (*Image)(nil)
	_ block.Zeroer    = (*Image)(nil)
	_ block.Extenter  = (*Image)(nil)
	_ block.Submitter = (*Image)(nil)
)

// Caps: trim and zero, block status where the image has fast-diff; not
// CanFastWrite (every write waits for the OSDs).
func (i *Image) Caps() block.Caps {
	c := block.CanTrim | block.CanZero
	if i.aio != nil {
		c |= block.CanSubmit
	}
	if i.fastDiff {
		c |= block.CanExtents
	}
	return c
}

// Open connects to the cluster and opens the image.
func Open(s Spec) (*Image, error) {
	id := s.ID
	if id == "" {
		id = "admin"
	}
	conn, err := rados.NewConnWithUser(id)
	if err != nil {
		return nil, fmt.Errorf("rbd %s: %w", s, err)
	}
	conf := s.Conf
	if conf == "" {
		conf = os.Getenv("CEPH_CONF")
	}
	if conf != "" {
		err = conn.ReadConfigFile(conf)
	} else {
		err = conn.ReadDefaultConfigFile()
	}
	if err == nil {
		conn.SetConfigOption("client_mount_timeout", "30")
		// librbd's cache in writeback mode from the first write, as QEMU's
		// rbd driver under cache=writeback (qemu-nbd's default): an NBD
		// client's writes are durable at its FLUSH (rbd_flush) or FUA, not
		// before, so nothing is promised that the cache breaks. (Left in
		// writethrough until a first flush, a client that flushes rarely
		// waits for the OSDs on every write.)
		conn.SetConfigOption("rbd_cache_writethrough_until_flush", "false")
		err = conn.Connect()
	}
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: connecting to the cluster: %w", s, err)
	}
	ioctx, err := conn.OpenIOContext(s.Pool)
	if err != nil {
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: pool %s: %w", s, s.Pool, err)
	}
	img, err := gorbd.OpenImage(ioctx, s.Image, gorbd.NoSnapshot)
	if err != nil {
		ioctx.Destroy()
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: image %s: %w", s, s.Image, err)
	}
	size, err := img.GetSize()
	if err != nil {
		img.Close()
		ioctx.Destroy()
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: %w", s, err)
	}
	feat, err := img.GetFeatures()
	if err != nil {
		img.Close()
		ioctx.Destroy()
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: %w", s, err)
	}
	a, err := newAIO(img)
	if err != nil {
		img.Close()
		ioctx.Destroy()
		conn.Shutdown()
		return nil, fmt.Errorf("rbd %s: %w", s, err)
	}
	i := &Image{spec: s, conn: conn, ioctx: ioctx, img: img, size: int64(size), aio: a,
		fastDiff: feat&gorbd.FeatureObjectMap != 0 && feat&gorbd.FeatureFastDiff != 0}
	if a != nil {
		a.cb = i.completed
	}
	return i, nil
}

// errno turns a librbd error into the errno it carries, so that a client
// sees ENOSPC as ENOSPC.
func errno(err error) error {
	var ce interface{ ErrorCode() int }
	if errors.As(err, &ce) {
		if c := ce.ErrorCode(); c < 0 {
			return syscall.Errno(-c)
		} else if c > 0 {
			return syscall.Errno(c)
		}
	}
	return err
}

// ReadAt reads len(p) bytes at off.
func (i *Image) ReadAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(i.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	if i.aio != nil {
		if ret := i.aio.do(opRead, off, p); ret != int64(len(p)) {
			return 0, fmt.Errorf("rbd %s: read %d bytes at %d: %w", i.spec, len(p), off, shortOr(ret))
		}
		return len(p), nil
	}
	n, err := i.img.ReadAt(p, off)
	if err != nil || n < len(p) {
		return 0, fmt.Errorf("rbd %s: read %d bytes at %d: %w", i.spec, len(p), off, errno(err))
	}
	return n, nil
}

// SubmitReadAt queues a read for librbd's aio, started at the next Push
// (or by a ReadAt, WriteAt or Flush meanwhile); done runs on the
// completion reader (block.Submitter). False (use ReadAt) for a range out
// of bounds, or when every aio slot is taken.
func (i *Image) SubmitReadAt(p []byte, off int64, done func(error, *block.Batch)) bool {
	if i.aio == nil || len(p) == 0 || !block.CheckRange(i.size, off, int64(len(p))) {
		return false
	}
	return i.aio.submit(opRead, off, p, done)
}

// SubmitWriteAt is SubmitReadAt for a write; RBD has no FUA, so a write
// that asks for it is declined (WriteAtFUA is a write and a flush).
func (i *Image) SubmitWriteAt(p []byte, off int64, fua bool, done func(error, *block.Batch)) bool {
	if i.aio == nil || fua || len(p) == 0 || !block.CheckRange(i.size, off, int64(len(p))) {
		return false
	}
	return i.aio.submit(opWrite, off, p, done)
}

// Push starts the requests submitted since the last Push (the aio's
// submission thread is woken once for them).
func (i *Image) Push() {
	if i.aio != nil {
		i.aio.push()
	}
}

// completed turns a submitted request's result into done's error, as
// ReadAt and WriteAt do theirs (the aio's callback, bound once at Open).
func (i *Image) completed(ret int64, op, n int, done func(error, *block.Batch), b *block.Batch) {
	var err error
	switch {
	case op == int(opRead) && ret != int64(n):
		err = fmt.Errorf("rbd %s: read %d bytes: %w", i.spec, n, shortOr(ret))
	case op == int(opWrite) && ret != 0 && ret != int64(n):
		err = fmt.Errorf("rbd %s: write %d bytes: %w", i.spec, n, shortOr(ret))
	}
	done(err, b)
}

// WriteAt writes p at off.
func (i *Image) WriteAt(p []byte, off int64) (int, error) {
	if !block.CheckRange(i.size, off, int64(len(p))) {
		return 0, block.ErrOutOfRange
	}
	if i.aio != nil {
		// A write completes with 0 (a read with the bytes it read).
		if ret := i.aio.do(opWrite, off, p); ret != 0 && ret != int64(len(p)) {
			return 0, fmt.Errorf("rbd %s: write %d bytes at %d: %w", i.spec, len(p), off, shortOr(ret))
		}
		return len(p), nil
	}
	n, err := i.img.WriteAt(p, off)
	if err != nil || n < len(p) {
		return 0, fmt.Errorf("rbd %s: write %d bytes at %d: %w", i.spec, len(p), off, errno(err))
	}
	return n, nil
}

// Flush makes completed writes durable (rbd_flush).
func (i *Image) Flush() error {
	if i.aio != nil {
		if ret := i.aio.do(opFlush, 0, nil); ret < 0 {
			return fmt.Errorf("rbd %s: flush: %w", i.spec, aioErr(ret))
		}
		return nil
	}
	if err := i.img.Flush(); err != nil {
		return fmt.Errorf("rbd %s: flush: %w", i.spec, errno(err))
	}
	return nil
}

// Trim discards a range (rbd_discard: it then reads as zeros).
func (i *Image) Trim(off, length int64) error {
	if !block.CheckRange(i.size, off, length) {
		return block.ErrOutOfRange
	}
	if _, err := i.img.Discard(uint64(off), uint64(length)); err != nil {
		return fmt.Errorf("rbd %s: discard %d bytes at %d: %w", i.spec, length, off, errno(err))
	}
	return nil
}

// Zero writes zeros over a range: a discard where it may unmap (RBD reads
// a discarded range as zeros), else rbd_writesame of a zero block.
func (i *Image) Zero(off, length int64, mayUnmap, fast bool) error {
	if !block.CheckRange(i.size, off, length) {
		return block.ErrOutOfRange
	}
	if mayUnmap {
		return i.Trim(off, length)
	}
	if fast {
		return block.ErrNotSupported
	}
	zero := make([]byte, 4096)
	for length > 0 {
		n := min(length, 1<<30)
		if n%4096 != 0 || off%4096 != 0 {
			if _, err := i.WriteAt(make([]byte, n), off); err != nil {
				return err
			}
		} else if _, err := i.img.WriteSame(uint64(off), uint64(n), zero, 0); err != nil {
			return fmt.Errorf("rbd %s: write zeros %d bytes at %d: %w", i.spec, n, off, errno(err))
		}
		off, length = off+n, length-n
	}
	return nil
}

// Extents reports which RADOS objects of the range exist, from the
// image's object map (rbd_diff_iterate2 from the image's creation, whole
// objects): an object that was never written, or was discarded whole, is
// a hole that reads as zeros; an existing one is data, at object
// granularity (4 MiB by default).
func (i *Image) Extents(dst []block.Extent, off, length int64, maxN int) ([]block.Extent, error) {
	if !block.CheckRange(i.size, off, length) {
		return dst, block.ErrOutOfRange
	}
	if length == 0 || maxN <= 0 {
		return dst, nil
	}
	end, cur, n := off+length, off, 0
	add := func(to int64, fl uint32) {
		if k := len(dst); n > 0 && dst[k-1].Flags == fl {
			dst[k-1].Length += to - cur
		} else {
			dst = append(dst, block.Extent{Length: to - cur, Flags: fl})
			n++
		}
		cur = to
	}
	// full reports whether an extent of flags fl would be one too many.
	full := func(fl uint32) bool { return n >= maxN && dst[len(dst)-1].Flags != fl }
	const hole = block.ExtentHole | block.ExtentZero
	stopped := false
	err := i.img.DiffIterate(gorbd.DiffIterateConfig{
		Offset: uint64(off), Length: uint64(length), WholeObject: gorbd.EnableWholeObject,
		Callback: func(o, l uint64, exists int, _ interface{}) int {
			s, e := max(int64(o), cur), min(int64(o+l), end)
			if e <= s {
				return 0
			}
			fl := uint32(0)
			if exists == 0 {
				fl = hole
			}
			if s > cur {
				if full(hole) {
					stopped = true
					return -1
				}
				add(s, hole)
			}
			if full(fl) {
				stopped = true
				return -1
			}
			add(e, fl)
			return 0
		},
	})
	if err != nil && !stopped {
		return dst, fmt.Errorf("rbd %s: block status at %d: %w", i.spec, off, errno(err))
	}
	if !stopped && cur < end && !full(hole) {
		add(end, hole)
	}
	return dst, nil
}

// Size is the image's size (or the Limit set).
func (i *Image) Size() int64 { return i.size }

// Limit serves only the first size bytes of a larger image.
func (i *Image) Limit(size int64) {
	if size >= 0 && size < i.size {
		i.size = size
	}
}

// Close closes the image and the cluster connection.
func (i *Image) Close() error {
	if i.aio != nil {
		i.aio.quiesce()
	}
	i.releaseLease()
	err := i.img.Close()
	if i.aio != nil {
		i.aio.close()
	}
	i.ioctx.Destroy()
	i.conn.Shutdown()
	return err
}
