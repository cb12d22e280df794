//go:build ceph

package rbd

/*
#cgo LDFLAGS: -lrbd -lpthread
#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <rbd/librbd.h>

#define GL_SLOTS 256

// One request a slot holds: op 0 read, 1 write, 2 flush.
//
// buf is an integer, not a pointer: Go stores a Go buffer's address there
// (the buffer pinned until the request completes), and a store of a
// pointer type would have Go's write barrier read the field's previous
// value, the address of a buffer that may have been freed since, as a
// pointer ("found bad pointer in Go heap").
struct gl_req {
	uint64_t off;
	uint64_t len;
	uintptr_t buf;
	int32_t op;
	int32_t pad;
};

// gl_q is what Go shares with the submission thread, in C memory. Go
// writes a slot's request, then the slot at ring[tail % GL_SLOTS], then
// tail (one producer at a time: Go's mutex); the thread alone reads them
// and advances its own head. sleeping is the futex the thread waits on.
struct gl_q {
	uint32_t tail;
	uint32_t sleeping;
	uint32_t stop;
	uint32_t pad;
	uint32_t ring[GL_SLOTS];
	struct gl_req req[GL_SLOTS];
	rbd_image_t img;
	int wfd;
	pthread_t th;
};

// gl_report writes a request's slot and result, 16 bytes, to the pipe
// that Go reads (a write of at most PIPE_BUF bytes to a pipe is atomic).
static void gl_report(int fd, uint32_t slot, int64_t ret) {
	int64_t msg[2] = {(int64_t)slot, ret};
	const char *p = (const char *)msg;
	size_t left = sizeof msg;
	while (left > 0) {
		ssize_t n = write(fd, p, left);
		if (n < 0) {
			if (errno == EINTR)
				continue;
			return; // the pipe is gone: the image is closing
		}
		p += n;
		left -= (size_t)n;
	}
}

// gl_done runs on a librbd thread when a request completes. arg packs the
// pipe's descriptor (high 32 bits) and the slot (low 32). The completion
// is released here, as QEMU's rbd driver does, so that Go makes no call
// into C per request.
static void gl_done(rbd_completion_t c, void *arg) {
	uintptr_t a = (uintptr_t)arg;
	int64_t ret = (int64_t)rbd_aio_get_return_value(c);
	rbd_aio_release(c);
	gl_report((int)(a >> 32), (uint32_t)(a & 0xffffffffu), ret);
}

// gl_start starts the request in slot s; one librbd refuses at once is
// reported through the pipe like any other result.
static void gl_start(struct gl_q *q, uint32_t s) {
	struct gl_req *r = &q->req[s];
	uintptr_t arg = ((uintptr_t)(uint32_t)q->wfd << 32) | s;
	rbd_completion_t c;
	int ret = rbd_aio_create_completion((void *)arg, gl_done, &c);
	if (ret < 0) {
		gl_report(q->wfd, s, ret);
		return;
	}
	switch (r->op) {
	case 0: ret = rbd_aio_read(q->img, r->off, r->len, (char *)r->buf, c); break;
	case 1: ret = rbd_aio_write(q->img, r->off, r->len, (const char *)r->buf, c); break;
	default: ret = rbd_aio_flush(q->img, c); break;
	}
	if (ret < 0) {
		rbd_aio_release(c);
		gl_report(q->wfd, s, ret);
	}
}

// gl_run is the submission thread: it starts what Go queued, then sleeps
// on the futex until Go wakes it (Go stores tail, then loads sleeping;
// the thread stores sleeping, then loads tail: one of them sees the
// other's store).
static void *gl_run(void *arg) {
	struct gl_q *q = arg;
	uint32_t h = 0;
	sigset_t set; // signals are for Go's threads, but a fault here is this thread's
	sigfillset(&set);
	sigdelset(&set, SIGSEGV);
	sigdelset(&set, SIGBUS);
	sigdelset(&set, SIGFPE);
	sigdelset(&set, SIGILL);
	pthread_sigmask(SIG_BLOCK, &set, NULL);
	for (;;) {
		uint32_t t = __atomic_load_n(&q->tail, __ATOMIC_ACQUIRE);
		if (h != t) {
			for (; h != t; h++)
				gl_start(q, q->ring[h % GL_SLOTS]);
			continue;
		}
		if (__atomic_load_n(&q->stop, __ATOMIC_ACQUIRE))
			return NULL;
		__atomic_store_n(&q->sleeping, 1, __ATOMIC_SEQ_CST);
		if (__atomic_load_n(&q->tail, __ATOMIC_SEQ_CST) == h && !__atomic_load_n(&q->stop, __ATOMIC_SEQ_CST))
			syscall(SYS_futex, &q->sleeping, FUTEX_WAIT_PRIVATE, 1, NULL, NULL, 0);
		__atomic_store_n(&q->sleeping, 0, __ATOMIC_SEQ_CST);
	}
}

static struct gl_q *gl_open(rbd_image_t img, int wfd) {
	struct gl_q *q = calloc(1, sizeof *q);
	if (q == NULL)
		return NULL;
	q->img = img;
	q->wfd = wfd;
	if (pthread_create(&q->th, NULL, gl_run, q) != 0) {
		free(q);
		return NULL;
	}
	return q;
}

// gl_close stops the thread (Go has stored stop and woken it) and frees q.
static void gl_close(struct gl_q *q) {
	pthread_join(q->th, NULL);
	free(q);
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
	"sync/atomic"
	"syscall"
	"unsafe"

	gorbd "github.com/ceph/go-ceph/rbd"
	"golang.org/x/sys/unix"

	"goldilocks/internal/block"
)

// Operations of a request (gl_req.op).
const (
	opRead  = 0
	opWrite = 1
	opFlush = 2
)

// futexWakePrivate is FUTEX_WAKE|FUTEX_PRIVATE_FLAG (linux/futex.h).
const futexWakePrivate = C.FUTEX_WAKE | C.FUTEX_PRIVATE_FLAG

// aioSlots is how many requests one image has in flight through librbd's
// asynchronous calls; more wait for a slot.
const aioSlots = C.GL_SLOTS

// aio runs reads, writes and flushes through librbd's asynchronous calls
// (rbd_aio_*), as QEMU's rbd driver does: the calling goroutine parks
// until its completion arrives through a pipe (do), or does not wait at
// all and the completion reader runs the request's callback (submit).
//
// Go makes no call into C per request. A call into C enters the Go
// runtime as a system call does (entersyscall), and the first one after
// the process was idle wakes the runtime's sysmon thread, which then polls
// every 20 µs until the process is idle again: at a few thousand requests
// a second that was an eighth of the gateway's CPU (bench/README.md,
// "What the RBD cells measure" and "librbd submissions from a C thread"). So requests go through a queue in C
// memory to a thread of C's own (gl_run), which calls librbd and sleeps on
// a futex that Go wakes with a raw system call (push); librbd's callback
// releases the completion itself and writes the result to a pipe, which
// Go reads with raw system calls (package rawsock's reasoning).
type aio struct {
	q     *C.struct_gl_q
	r     *os.File // completions: slot u64, result i64
	rc    syscall.RawConn
	wfd   int // the pipe's write end, which gl_report writes
	slots [aioSlots]aioSlot
	free  chan uint32
	wg    sync.WaitGroup // the completion reader
	mu    sync.Mutex     // one producer at a time; guards pushed, stores to tail
	// tail is Go's copy of q.tail. complete loads it, for the race
	// detector, which sees neither C memory nor the C thread: what a
	// submitter wrote before it queued a request happens before the
	// request's completion is handled.
	tail atomic.Uint32
	// pushed is the tail the thread was last woken for (push).
	pushed uint32
	// cb completes a submitted request: librbd's result, the request's
	// op (opRead, opWrite), length and done function, and the batch of
	// the completion reader. Set once, before the first submit.
	cb func(ret int64, op, n int, done func(error, *block.Batch), b *block.Batch)
}

type aioSlot struct {
	done chan int64
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

// newAIO starts the submission thread and the completion reader for img;
// nil, nil if go-ceph's handle is not reachable.
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
	// gl_report (it never fills: at most aioSlots messages of 16 bytes wait).
	if err := unix.SetNonblock(p[0], true); err != nil {
		unix.Close(p[0])
		unix.Close(p[1])
		return nil, err
	}
	r := os.NewFile(uintptr(p[0]), "rbd-completions")
	rc, err := r.SyscallConn()
	if err != nil {
		r.Close()
		unix.Close(p[1])
		return nil, fmt.Errorf("completion pipe: %w", err)
	}
	q := C.gl_open(C.rbd_image_t(h), C.int(p[1]))
	if q == nil {
		r.Close()
		unix.Close(p[1])
		return nil, errors.New("starting the submission thread failed")
	}
	a := &aio{q: q, r: r, rc: rc, wfd: p[1], free: make(chan uint32, aioSlots)}
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
		have  int
		got   int           // what the last read returned: 0 at the end
		rerr  syscall.Errno // and its error
	)
	read := func(fd uintptr) bool {
		for {
			r, _, e := syscall.RawSyscall(syscall.SYS_READ, fd, uintptr(unsafe.Pointer(&buf[have])), uintptr(len(buf)-have))
			switch e {
			case 0:
				got, rerr = int(r), 0 // 0 bytes: the write end was closed
			case syscall.EINTR:
				continue
			case syscall.EAGAIN:
				return false // nothing yet: the poller waits
			default:
				got, rerr = 0, e
			}
			return true
		}
	}
	for {
		got, rerr = 0, 0
		err := a.rc.Read(read)
		a.tail.Load() // (for the race detector: see tail)
		have += got
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
			s.pin.Unpin()
			a.free <- uint32(slot)
			a.cb(ret, op, n, fn, &batch)
		}
		have = copy(buf[:], buf[k:have])
		batch.Run()
		if err != nil || rerr != 0 || got == 0 {
			return // closed (at the end of close)
		}
	}
}

// enqueue puts slot's request on the submission thread's queue; push
// wakes the thread for it.
func (a *aio) enqueue(slot uint32, op int, off int64, p []byte) {
	r := &a.q.req[slot]
	r.off, r.len, r.op, r.buf = C.uint64_t(off), C.uint64_t(len(p)), C.int32_t(op), 0
	if len(p) > 0 {
		r.buf = C.uintptr_t(uintptr(unsafe.Pointer(&p[0])))
	}
	a.mu.Lock()
	t := a.tail.Load()
	a.q.ring[t%aioSlots] = C.uint32_t(slot)
	a.tail.Store(t + 1)
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&a.q.tail)), t+1)
	a.mu.Unlock()
}

// push wakes the submission thread if it sleeps and requests were queued
// since the last push: a futex wake, made raw (it cannot block), so the Go
// runtime does not see it.
func (a *aio) push() {
	a.mu.Lock()
	if a.pushed == a.tail.Load() {
		a.mu.Unlock()
		return
	}
	a.pushed = a.tail.Load()
	a.mu.Unlock()
	a.wake()
}

func (a *aio) wake() {
	w := (*uint32)(unsafe.Pointer(&a.q.sleeping))
	if atomic.LoadUint32(w) == 1 && atomic.CompareAndSwapUint32(w, 1, 0) {
		syscall.RawSyscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWakePrivate, 1, 0, 0, 0)
	}
}

// submit queues one read or write and returns at once: a.cb runs on the
// completion reader with librbd's result and fn. Nothing starts before
// push. False, with nothing queued, when every slot is taken.
func (a *aio) submit(op int, off int64, p []byte, fn func(error, *block.Batch)) bool {
	var slot uint32
	select {
	case slot = <-a.free:
	default:
		return false
	}
	s := &a.slots[slot]
	s.pin.Pin(&p[0])
	s.op, s.n, s.fn = op, len(p), fn
	a.enqueue(slot, op, off, p)
	return true
}

// do runs one request and returns librbd's result (bytes, or -errno).
// Requests submitted and not yet pushed go with it.
func (a *aio) do(op int, off int64, p []byte) int64 {
	var slot uint32
	select {
	case slot = <-a.free:
	default:
		a.push() // the slots may be held by requests not yet pushed
		slot = <-a.free
	}
	s := &a.slots[slot]
	if len(p) > 0 {
		s.pin.Pin(&p[0])
	}
	a.enqueue(slot, op, off, p)
	a.push()
	ret := <-s.done
	s.pin.Unpin()
	a.free <- slot
	return ret
}

// quiesce waits until no request is in flight and lets none start: it
// takes every slot (a request gives its slot back only once its completion
// has arrived). Then no callback of librbd's can write to the pipe any
// more, whose descriptor close frees for reuse.
func (a *aio) quiesce() {
	a.push()
	for range aioSlots {
		<-a.free
	}
}

// close stops the submission thread and the completion reader, after
// quiesce.
func (a *aio) close() {
	atomic.StoreUint32((*uint32)(unsafe.Pointer(&a.q.stop)), 1)
	w := (*uint32)(unsafe.Pointer(&a.q.sleeping))
	atomic.StoreUint32(w, 0)
	syscall.RawSyscall6(syscall.SYS_FUTEX, uintptr(unsafe.Pointer(w)), futexWakePrivate, 1, 0, 0, 0)
	C.gl_close(a.q)
	a.q = nil
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
