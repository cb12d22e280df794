package block

import (
	"errors"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// File is a Device over a regular file or a block device. Regular files
// may be sparse: Trim punches holes, Zero uses fallocate, and Extents uses
// SEEK_DATA/SEEK_HOLE. Flush is fdatasync. All I/O is positional (pread,
// pwrite), so one File serves any number of connections.
type File struct {
	f        *os.File
	fd       int
	size     int64
	readOnly bool
	blockDev bool

	noNowait atomic.Bool // RWF_NOWAIT reads are not supported here

	zeroOnce sync.Once
	zeros    []byte // shared zero buffer for fallback zeroing; read-only

	mapOnce sync.Once
	mapped  []byte // the file, mapped read-only and shared; nil: none (yet)
}

var (
	_ Device    = (*File)(nil)
	_ Trimmer   = (*File)(nil)
	_ Zeroer    = (*File)(nil)
	_ Extenter  = (*File)(nil)
	_ Filer     = (*File)(nil)
	_ Cacher    = (*File)(nil)
	_ TryReader = (*File)(nil)
	_ Mapper    = (*File)(nil)
)

// OpenFile opens path as a Device. A regular file's size is its length; a
// block device's size is the device's.
func OpenFile(path string, readOnly bool) (*File, error) {
	flag := os.O_RDWR
	if readOnly {
		flag = os.O_RDONLY
	}
	f, err := os.OpenFile(path, flag, 0)
	if err != nil {
		return nil, err
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, err
	}
	d := &File{f: f, fd: int(f.Fd()), readOnly: readOnly}
	switch {
	case st.Mode().IsRegular():
		d.size = st.Size()
	case st.Mode()&os.ModeDevice != 0:
		end, err := f.Seek(0, io.SeekEnd)
		if err != nil {
			f.Close()
			return nil, fmt.Errorf("size of block device %s: %w", path, err)
		}
		d.size, d.blockDev = end, true
	default:
		f.Close()
		return nil, fmt.Errorf("%s: not a regular file or block device", path)
	}
	return d, nil
}

// Lock takes an exclusive advisory lock on the backing store, so that
// two processes never open one volume for writing at once. It fails at
// once with ErrInUse if another open file holds it.
func (d *File) Lock() error {
	for {
		err := unix.Flock(d.fd, unix.LOCK_EX|unix.LOCK_NB)
		switch err {
		case nil:
			return nil
		case unix.EINTR:
			continue
		case unix.EWOULDBLOCK:
			return ErrInUse
		default:
			return err
		}
	}
}

// Limit serves only the first size bytes of a larger backing store. It
// must be called before the File is shared.
func (d *File) Limit(size int64) {
	if size >= 0 && size < d.size {
		d.size = size
	}
}

// Size returns the size in bytes.
func (d *File) Size() int64 { return d.size }

// File returns the underlying file for zero-copy sends.
func (d *File) File() *os.File { return d.f }

// ReadAt reads len(p) bytes at off. Bytes past the end of a file that
// shrank underneath us read as an error, not as zeros.
func (d *File) ReadAt(p []byte, off int64) (int, error) {
	if !CheckRange(d.size, off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	n := 0
	for n < len(p) {
		m, err := unix.Pread(d.fd, p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		if m == 0 {
			return n, io.ErrUnexpectedEOF
		}
		n += m
	}
	return n, nil
}

// TryReadAt reads len(p) bytes at off if they are in the page cache
// (preadv2 with RWF_NOWAIT), else returns ErrWouldBlock at once.
func (d *File) TryReadAt(p []byte, off int64) (int, error) {
	if !CheckRange(d.size, off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	if len(p) == 0 {
		return 0, nil
	}
	if d.noNowait.Load() {
		return 0, ErrWouldBlock
	}
	// A raw system call: RWF_NOWAIT cannot block, so the Go runtime need
	// not know of it, and its sysmon is not woken (see package rawsock).
	iov := unix.Iovec{Base: &p[0]}
	iov.SetLen(len(p))
	n, _, e := unix.RawSyscall6(unix.SYS_PREADV2, uintptr(d.fd), uintptr(unsafe.Pointer(&iov)), 1, uintptr(off), 0, unix.RWF_NOWAIT)
	switch {
	case e == unix.EOPNOTSUPP || e == unix.ENOSYS || e == unix.EINVAL:
		d.noNowait.Store(true)
		return 0, ErrWouldBlock
	case e != 0 || int(n) != len(p):
		return 0, ErrWouldBlock // EAGAIN, or only part is cached
	}
	return int(n), nil
}

// WriteAt writes p at off.
func (d *File) WriteAt(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, ErrReadOnly
	}
	if !CheckRange(d.size, off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	n := 0
	for n < len(p) {
		m, err := unix.Pwrite(d.fd, p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, err
		}
		n += m
	}
	return n, nil
}

// Flush makes completed writes durable.
func (d *File) Flush() error {
	if d.readOnly {
		return nil
	}
	for {
		err := unix.Fdatasync(d.fd)
		if err != unix.EINTR {
			return err
		}
	}
}

// Trim deallocates the range; it then reads as zeros. A filesystem without
// hole punching makes Trim a no-op, which NBD permits.
func (d *File) Trim(off, length int64) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if !CheckRange(d.size, off, length) {
		return ErrOutOfRange
	}
	err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length)
	if errors.Is(err, ErrNotSupported) {
		return nil
	}
	return err
}

// Zero makes the range read as zeros.
func (d *File) Zero(off, length int64, mayUnmap, fast bool) error {
	if d.readOnly {
		return ErrReadOnly
	}
	if !CheckRange(d.size, off, length) {
		return ErrOutOfRange
	}
	if mayUnmap {
		if err := d.fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, length); !errors.Is(err, ErrNotSupported) {
			return err
		}
	}
	if err := d.fallocate(unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, length); !errors.Is(err, ErrNotSupported) {
		return err
	}
	if fast {
		return ErrNotSupported
	}
	d.zeroOnce.Do(func() { d.zeros = make([]byte, 1<<20) })
	for length > 0 {
		n := min(length, int64(len(d.zeros)))
		if _, err := d.WriteAt(d.zeros[:n], off); err != nil {
			return err
		}
		off += n
		length -= n
	}
	return nil
}

func (d *File) fallocate(mode uint32, off, length int64) error {
	for {
		err := unix.Fallocate(d.fd, mode, off, length)
		switch err {
		case nil:
			return nil
		case unix.EINTR:
			continue
		case unix.EOPNOTSUPP, unix.ENOSYS, unix.EINVAL:
			return ErrNotSupported
		default:
			return err
		}
	}
}

// Extents reports data and holes with SEEK_DATA and SEEK_HOLE. A block
// device, or a filesystem without them, reports everything as data.
func (d *File) Extents(dst []Extent, off, length int64, max int) ([]Extent, error) {
	if !CheckRange(d.size, off, length) {
		return dst, ErrOutOfRange
	}
	end := off + length
	if d.blockDev {
		return append(dst, Extent{Length: length}), nil
	}
	for n := 0; off < end && n < max; n++ {
		data, err := unix.Seek(d.fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			// No data from off to the end of the file: a hole, unless the
			// file shrank underneath us (then it is not zeros, it is gone).
			var st unix.Stat_t
			if err := unix.Fstat(d.fd, &st); err != nil || st.Size < end {
				return dst, fmt.Errorf("file ends at %d, before %d: %w", st.Size, end, io.ErrUnexpectedEOF)
			}
		}
		if err == unix.ENXIO || (err == nil && data >= end) {
			// Only a hole remains before end.
			return append(dst, Extent{Length: end - off, Flags: ExtentHole | ExtentZero}), nil
		}
		if err != nil {
			return append(dst, Extent{Length: end - off}), nil
		}
		if data > off {
			dst = append(dst, Extent{Length: data - off, Flags: ExtentHole | ExtentZero})
			off = data
			continue
		}
		hole, err := unix.Seek(d.fd, off, unix.SEEK_HOLE)
		if err != nil || hole > end {
			hole = end
		}
		if hole <= off { // a trim raced us: the data just found is gone; look again
			continue
		}
		dst = append(dst, Extent{Length: hole - off})
		off = hole
	}
	return dst, nil
}

// WriteAtFUA writes p at off and returns once it is durable: pwritev2
// with RWF_DSYNC, which syncs this write only (fdatasync would write back
// every dirty page of the file); where the kernel lacks it, pwrite and
// fdatasync.
func (d *File) WriteAtFUA(p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, ErrReadOnly
	}
	if !CheckRange(d.size, off, int64(len(p))) {
		return 0, ErrOutOfRange
	}
	for done := 0; done < len(p); {
		n, err := unix.Pwritev2(d.fd, [][]byte{p[done:]}, off+int64(done), unix.RWF_DSYNC)
		if err == unix.EINTR {
			continue
		}
		if err == unix.ENOSYS || err == unix.EOPNOTSUPP {
			if _, err := d.WriteAt(p[done:], off+int64(done)); err != nil {
				return done, err
			}
			return len(p), d.Flush()
		}
		if err != nil {
			return done, err
		}
		if n == 0 {
			return done, io.ErrShortWrite
		}
		done += n
	}
	return len(p), nil
}

// Written reports whether the block at off holds data (SEEK_DATA finds it
// there): a write to it allocates nothing.
func (d *File) Written(off int64) bool {
	if d.blockDev {
		return true
	}
	data, err := unix.Seek(d.fd, off, unix.SEEK_DATA)
	return err == nil && data == off
}

// Cache asks the kernel to read the range ahead.
func (d *File) Cache(off, length int64) error {
	if !CheckRange(d.size, off, length) {
		return ErrOutOfRange
	}
	return unix.Fadvise(d.fd, off, length, unix.FADV_WILLNEED)
}

// Mapped returns the n bytes at off from a read-only shared mapping of
// the file, made at the first call, after touching each of their pages:
// a page not in the page cache is read there, on the caller's goroutine,
// and one that cannot be read (SIGBUS: an I/O error, or the file shrank
// underneath) returns EIO instead of killing the process. A page evicted
// again before the caller copies it is read once more by the kernel
// during that copy (which then fails with EFAULT if it cannot be).
func (d *File) Mapped(off, n int64) (p []byte, err error) {
	if !CheckRange(d.size, off, n) {
		return nil, ErrOutOfRange
	}
	d.mapOnce.Do(d.mapFile)
	if d.mapped == nil {
		return nil, ErrNotMapped
	}
	p = d.mapped[off : off+n : off+n]
	defer func() {
		if recover() != nil { // only the faults below panic here
			p, err = nil, fmt.Errorf("mapped read of %d bytes at %d: %w", n, off, unix.EIO)
		}
	}()
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	var sum byte
	for i := int64(0); i < n; i += pageSize - (off+i)%pageSize {
		sum += p[i]
	}
	runtime.KeepAlive(sum) // the loads are the point
	return p, nil
}

const pageSize = 4096 // a lower bound: touching more often costs little

// mapFile maps the whole file, or leaves d.mapped nil if it cannot (an
// empty file, an address space too small for it).
func (d *File) mapFile() {
	if d.size <= 0 || d.size > math.MaxInt {
		return
	}
	m, err := unix.Mmap(d.fd, 0, int(d.size), unix.PROT_READ, unix.MAP_SHARED)
	if err == nil {
		d.mapped = m
	}
}

// Close closes the file and removes its mapping; no slice Mapped
// returned may be used after it.
func (d *File) Close() error {
	d.mapOnce.Do(func() {}) // no mapping from now on
	if d.mapped != nil {
		unix.Munmap(d.mapped)
		d.mapped = nil
	}
	return d.f.Close()
}
