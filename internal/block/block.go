// Package block defines the block device that every stage of the data path
// implements: a few methods in the manner of io.ReaderAt and io.WriterAt,
// plus optional interfaces (trim, zero, extents, zero-copy) that a stage
// advertises by implementing them and that callers find by type assertion.
//
// It owns the Device contract and the file backend. It knows nothing of
// NBD, encryption, policy or audit; those wrap a Device, one file each.
package block

import (
	"errors"
	"os"
)

// Device is a fixed-size, byte-addressed block store.
//
// Concurrency: every method may be called from many goroutines at once.
// Overlapping concurrent writes land in an unspecified order, as on a disk.
//
// Partial I/O: ReadAt and WriteAt either transfer all of len(p) bytes or
// return a non-nil error. Callers validate ranges before calling; a range
// outside [0, Size()) returns ErrOutOfRange.
type Device interface {
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64) (int, error)
	// Size is the logical size in bytes; it does not change while open.
	Size() int64
	// Flush makes every completed write durable (fdatasync).
	Flush() error
	Close() error
}

// Trimmer is implemented by devices that can discard a range. After a
// Trim the range reads as unspecified data (zeros for the file backend).
type Trimmer interface {
	Trim(off, length int64) error
}

// Zeroer is implemented by devices that can write zeros without a data
// transfer. With mayUnmap the device may deallocate the range; with fast it
// must return ErrNotSupported rather than fall back to writing zeros.
type Zeroer interface {
	Zero(off, length int64, mayUnmap, fast bool) error
}

// Extent flags, the same bits as NBD's base:allocation context.
const (
	ExtentHole uint32 = 1 << 0 // not allocated in the backing store
	ExtentZero uint32 = 1 << 1 // reads as zeros
)

// Extent is a run of bytes with the same allocation state.
type Extent struct {
	Length int64
	Flags  uint32
}

// Extenter is implemented by devices that know which ranges are allocated.
// Extents appends at most max extents describing [off, off+length) to dst
// and returns it; the extents are contiguous, start at off and never extend
// past off+length.
type Extenter interface {
	Extents(dst []Extent, off, length int64, max int) ([]Extent, error)
}

// FUAWriter is implemented by devices that make one write durable in one
// request (NBD's FUA): a file with RWF_DSYNC, an NBD server with
// NBD_CMD_FLAG_FUA. The caller would otherwise write, then Flush, which
// makes every completed write durable and costs a second round trip.
type FUAWriter interface {
	WriteAtFUA(p []byte, off int64) (int, error)
}

// Prober is implemented by devices that tell cheaply (one system call,
// no allocation) whether the block at off has been written: a write
// there allocates nothing. A file answers with SEEK_DATA; a device
// without holes always says yes.
type Prober interface {
	Written(off int64) bool
}

// Filer is implemented by devices whose bytes are the bytes of a file at
// the same offsets, with no transformation. The transport may then send
// them with sendfile. Stages that change bytes (encryption) must not
// implement it.
type Filer interface {
	File() *os.File
}

// Mapper is implemented by devices that lend their bytes from memory: a
// read-only shared mapping of the backing file, so that a transport
// copies them once, into the socket, instead of reading them into a
// buffer first. Mapped returns the n bytes at off, after faulting in
// every page (the I/O a read would do, on the caller's goroutine): a page
// that cannot be read (an I/O error, a file that shrank underneath) is an
// error, never a crash. The slice stays valid until the device is
// closed; it is read-only, and its bytes change under a concurrent write
// as the file's do. ErrNotMapped: no mapping (read instead).
type Mapper interface {
	Mapped(off, n int64) ([]byte, error)
}

// TryReader is implemented by devices that can attempt a read that fails
// with ErrWouldBlock, at once, instead of waiting for I/O (the data is not
// in memory). The transport then serves the read without a thread hop.
type TryReader interface {
	TryReadAt(p []byte, off int64) (int, error)
}

// Submitter is implemented by devices that start a read or write and
// complete it later, on a goroutine of their own (a network device reading
// its server's replies): a transport then needs no goroutine parked per
// request. done runs exactly once, with the result; the buffer is the
// device's until then. A device may decline a request (false: nothing
// started, done will not run), which the caller then makes with ReadAt,
// WriteAt or WriteAtFUA. Requests submitted since the last Push may wait
// in a buffer until it (so that a batch shares one system call): a
// caller pushes before anything that could block it.
//
// done's Batch is the device goroutine's batch of completions (nil when
// done runs elsewhere, as for a request refused at once): what done
// leaves to it runs once every completion at hand has run.
type Submitter interface {
	SubmitReadAt(p []byte, off int64, done func(error, *Batch)) bool
	SubmitWriteAt(p []byte, off int64, fua bool, done func(error, *Batch)) bool
	Push()
}

// Batch gathers what the completions a device's goroutine runs together
// leave to be done after the last of them, before the goroutine could
// block: a transport answering them then sends their replies in one
// system call rather than one each. The zero Batch is ready for use by
// one goroutine; the device runs it (Run) whenever it would otherwise
// wait, so a deferred flush waits for no new completion.
type Batch struct{ fs []Flusher }

// Flusher is what a completion defers to the end of its batch.
type Flusher interface{ FlushBatch() }

// Defer has f flushed once, at the end of the batch; on a nil Batch
// (no batch: done runs on its own) at once.
func (b *Batch) Defer(f Flusher) {
	if b == nil {
		f.FlushBatch()
		return
	}
	for _, g := range b.fs {
		if g == f {
			return
		}
	}
	b.fs = append(b.fs, f)
}

// Run flushes what was deferred, in order, and empties the batch.
func (b *Batch) Run() {
	for i, f := range b.fs {
		f.FlushBatch()
		b.fs[i] = nil
	}
	b.fs = b.fs[:0]
}

// Handoffer is implemented by devices that can be closed for another
// process that opens the same store right after (an upgrade in place)
// more cheaply than by Close: what was written stays readable there, but
// what only a clean close records (a checkpoint, a clean-detach mark) is
// left for that process's open to recover.
type Handoffer interface {
	Handoff() error
}

// ChangeTracker is implemented by devices that know which ranges were
// written since a named point in time (a snapshot): ChangedExtents appends
// at most max extents describing [off, off+length) to dst, flag
// ExtentDirty where written since (the names are the caller's, as the
// export list offers them: ExportInfo.Changed in gateway).
type ChangeTracker interface {
	ChangedExtents(since string, dst []Extent, off, length int64, max int) ([]Extent, error)
}

// ExtentDirty flags a range written since the point a ChangeTracker was
// asked about (NBD's qemu:dirty-bitmap contexts use the same bit).
const ExtentDirty uint32 = 1 << 0

// Cacher is implemented by devices that can prefetch a range.
type Cacher interface {
	Cache(off, length int64) error
}

// Sentinel errors callers branch on.
var (
	ErrOutOfRange   = errors.New("block: range outside device")
	ErrNotSupported = errors.New("block: operation not supported")
	ErrReadOnly     = errors.New("block: device is read-only")
	ErrClosed       = errors.New("block: device is closed")
	ErrWouldBlock   = errors.New("block: operation would block")
	ErrNotMapped    = errors.New("block: no memory mapping")
	// ErrLeased: another gateway holds the store's lease (an RBD image's
	// exclusive lock); only it may write the store.
	ErrLeased = errors.New("the backing store is leased by another gateway")
	ErrInUse  = errors.New("block: in use by another process (a running gateway?)")
)

// CheckRange reports whether [off, off+length) lies inside a device of the
// given size, without overflowing.
func CheckRange(size, off, length int64) bool {
	return off >= 0 && length >= 0 && off <= size && length <= size-off
}
