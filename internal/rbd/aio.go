//go:build ceph

package rbd

/*
#cgo LDFLAGS: -lrbd
#include <errno.h>
#include <stdint.h>
#include <unistd.h>
#include <rbd/librbd.h>

// gl_done runs on a librbd thread when a request completes: it writes the
// request's slot and result, 16 bytes, to the pipe that Go reads (a write
// of at most PIPE_BUF bytes to a pipe is atomic). arg packs the pipe's
// descriptor (high 32 bits) and the slot (low 32).
static void gl_done(rbd_completion_t c, void *arg) {
	uintptr_t a = (uintptr_t)arg;
	int64_t msg[2];
	msg[0] = (int64_t)(a & 0xffffffffu);
	msg[1] = (int64_t)rbd_aio_get_return_value(c);
	const char *p = (const char *)msg;
	size_t left = sizeof msg;
	while (left > 0) {
		ssize_t n = write((int)(a >> 32), p, left);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; // the pipe is gone: the image is closing
		}
		p += n;
		left -= (size_t)n;
	}
}

// gl_submit starts one request: op 0 read, 1 write, 2 flush.
static int gl_submit(rbd_image_t img, int op, uint64_t off, size_t len, char *buf, uintptr_t arg, rbd_completion_t *c) {
	int r = rbd_aio_create_completion((void *)arg, gl_done, c);
	if (r < 0)
		return r;
	switch (op) {
	case 0: r = rbd_aio_read(img, off, len, buf, *c); break;
	case 1: r = rbd_aio_write(img, off, len, buf, *c); break;
	default: r = rbd_aio_flush(img, *c); break;
	}
	if (r < 0)
		rbd_aio_release(*c);
	return r;
}
*/
import "C"

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"reflect"
	"runtime"
	"sync"
	"syscall"
	"unsafe"

	gorbd "github.com/ceph/go-ceph/rbd"
	"golang.org/x/sys/unix"

	"goldilocks/internal/block"
)

// Operations of gl_submit.
const (
	opRead  C.int = 0
	opWrite C.int = 1
	opFlush C.int = 2
)

// aioSlots is how many requests one image has in flight through librbd's
// asynchronous calls; more wait for a slot.
const aioSlots = 256

// aio runs reads, writes and flushes through librbd's asynchronous calls
// (rbd_aio_*), as QEMU's rbd driver does: the calling goroutine parks
// until its completion arrives through a pipe (do), or does not wait at
// all and the completion reader runs the request's callback (submit),
// instead of holding an OS thread blocked in librbd for the whole round
// trip to the OSDs (which makes the Go runtime hand the thread's P to
// another one per request).
type aio struct {
	img   C.rbd_image_t
	r     *os.File // completions: slot u64, result i64
	wfd   int      // the pipe's write end, used by gl_done
	slots [aioSlots]aioSlot
	free  chan uint32
	wg    sync.WaitGroup // the completion reader
	// cb completes a submitted request: librbd's result, the request's
	// op (opRead, opWrite), length and done function, and the batch of
	// the completion reader. Set once, before the first submit.
	cb func(ret int64, op, n int, done func(error, *block.Batch), b *block.Batch)
}

type aioSlot struct {
	done chan int64
	comp C.rbd_completion_t
	pin  runtime.Pinner // the buffer librbd holds until completion
	// A submitted request's (submit): its completion runs the aio's
	// callback with them instead of waking a caller through done.
	fn func(error, *block.Batch)
	op int
	n  int
}

// imageHandle is the rbd_image_t of an image opened by go-ceph, which does
// not export it (v0.41.0: the field Image.image). Nil if that changed:
// the caller then keeps go-ceph's synchronous calls.
func imageHandle(img *gorbd.Image) unsafe.Pointer {
	f := reflect.ValueOf(img).Elem().FieldByName("image")
	if !f.IsValid() || f.Kind() != reflect.UnsafePointer {
		return nil
	}
	return *(*unsafe.Pointer)(unsafe.Pointer(f.UnsafeAddr()))
}

// newAIO starts the completion reader for img; nil, nil if go-ceph's
// handle is not reachable.
func newAIO(img *gorbd.Image) (*aio, error) {
	h := imageHandle(img)
	if h == nil {
		return nil, nil
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, fmt.Errorf("completion pipe: %w", err)
	}
	// The read end goes to Go's poller; the write end stays blocking for
	// gl_done (it never fills: at most aioSlots messages of 16 bytes wait).
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, err
	}
	a := &aio{img: C.rbd_image_t(h), r: os.NewFile(uintptr(p[0]), "rbd-completions"), wfd: p[1], free: make(chan uint32, aioSlots)}
	for i := range a.slots {
		a.slots[i].done = make(chan int64, 1)
		a.free <- uint32(i)
	}
	a.wg.Add(1)
	go a.complete()
	return a, nil
}

// complete hands each completion to the goroutine waiting on its slot,
// or runs a submitted request's callback; the callbacks of the
// completions one read returns share a batch, run before the next read.
func (a *aio) complete() {
	defer a.wg.Done()
	var (
		buf   [64 * 16]byte
		batch block.Batch
	)
	have := 0
	for {
		n, err := a.r.Read(buf[have:])
		have += n
		k := 0
		for ; have-k >= 16; k += 16 {
			slot := binary.NativeEndian.Uint64(buf[k:])
			ret := int64(binary.NativeEndian.Uint64(buf[k+8:]))
			if slot >= aioSlots {
				continue
			}
			s := &a.slots[slot]
			if s.fn == nil {
				s.done <- ret
				continue
			}
			op, n, fn := s.op, s.n, s.fn
			s.fn = nil
			C.rbd_aio_release(s.comp)
			s.pin.Unpin()
			a.free <- uint32(slot)
			a.cb(ret, op, n, fn, &batch)
		}
		have = copy(buf[:], buf[k:have])
		batch.Run()
		if err != nil {
			return // closed
		}
	}
}

// submit starts one read or write and returns at once: a.cb runs on the
// completion reader with librbd's result and fn. False, with nothing
// started, when every slot is taken or librbd refuses the request at once.
func (a *aio) submit(op C.int, off int64, p []byte, fn func(error, *block.Batch)) bool {
	var slot uint32
	select {
	case slot = <-a.free:
	default:
		return false
	}
	s := &a.slots[slot]
	s.pin.Pin(&p[0])
	s.op, s.n, s.fn = int(op), len(p), fn
	arg := C.uintptr_t(uint64(a.wfd)<<32 | uint64(slot))
	if r := C.gl_submit(a.img, op, C.uint64_t(off), C.size_t(len(p)), (*C.char)(unsafe.Pointer(&p[0])), arg, &s.comp); r < 0 {
		s.fn = nil
		s.pin.Unpin()
		a.free <- slot
		return false
	}
	return true
}

// do runs one request and returns librbd's result (bytes, or -errno).
func (a *aio) do(op C.int, off int64, p []byte) int64 {
	slot := <-a.free
	s := &a.slots[slot]
	var buf *C.char
	if len(p) > 0 {
		s.pin.Pin(&p[0])
		buf = (*C.char)(unsafe.Pointer(&p[0]))
	}
	arg := C.uintptr_t(uint64(a.wfd)<<32 | uint64(slot))
	r := C.gl_submit(a.img, op, C.uint64_t(off), C.size_t(len(p)), buf, arg, &s.comp)
	var ret int64
	if r < 0 {
		ret = int64(r)
	} else {
		ret = <-s.done
		C.rbd_aio_release(s.comp)
	}
	s.pin.Unpin()
	a.free <- slot
	return ret
}

// quiesce waits until no request is in flight and lets none start: it
// takes every slot (a request gives its slot back only once its completion
// has arrived). Then no callback of librbd's can write to the pipe any
// more, whose descriptor close frees for reuse.
func (a *aio) quiesce() {
	for range aioSlots {
		<-a.free
	}
}

// close stops the completion reader, after quiesce.
func (a *aio) close() {
	unix.Close(a.wfd)
	a.wg.Wait()
	a.r.Close()
}

// aioErr turns a librbd result into an error.
func aioErr(ret int64) error {
	if ret >= 0 {
		return nil
	}
	return syscall.Errno(-ret)
}

// errShort: librbd answered fewer bytes than asked.
var errShort = errors.New("short transfer")

// shortOr is the error of a read or write that did not move every byte.
func shortOr(ret int64) error {
	if ret < 0 {
		return aioErr(ret)
	}
	return errShort
}
