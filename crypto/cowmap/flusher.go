package cowmap

import (
	"sync"
	"time"

	"goldilocks/internal/block"
)

// Flusher is the store of a volume whose flushes come from several places
// at once: commits, a checkpoint running beside them, header writes. It
// runs one flush at a time and keeps the first failure: Linux reports a
// failed fdatasync once, to whichever call comes first, so a flush that
// began after it might succeed although pages it was meant to write were
// dropped. Every flush after a failure fails. It also tells a checkpoint
// when a flush that began after its writes has completed, so that the
// checkpoint's writes ride on the commits' flushes instead of adding one.
type Flusher struct {
	block.Device

	run sync.Mutex // held across Device.Flush

	mu      sync.Mutex // guards the fields below
	started uint64     // flushes begun
	done    uint64     // the last flush that completed without error
	err     error
	doneCh  chan struct{} // made by a waiter, closed by the next completed flush
}

// NewFlusher wraps dev.
func NewFlusher(dev block.Device) *Flusher {
	return &Flusher{Device: dev}
}

// Flush flushes the store, after any flush under way, unless one failed.
func (f *Flusher) Flush() error {
	f.run.Lock()
	defer f.run.Unlock()
	f.mu.Lock()
	if f.err != nil {
		f.mu.Unlock()
		return f.err
	}
	f.started++
	n := f.started
	f.mu.Unlock()
	err := f.Device.Flush()
	f.mu.Lock()
	defer f.mu.Unlock()
	if err != nil {
		f.err = err
	} else {
		f.done = n
	}
	if f.doneCh != nil {
		close(f.doneCh)
		f.doneCh = nil
	}
	return err
}

// Mark returns what Flushed waits for: a flush that begins after Mark.
func (f *Flusher) Mark() uint64 {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.started + 1
}

// Flushed waits until a flush numbered mark or later has completed
// without error, and reports whether one did within wait. It does not
// flush; it returns the failure if a flush failed.
func (f *Flusher) Flushed(mark uint64, wait time.Duration) (bool, error) {
	t := time.NewTimer(wait)
	defer t.Stop()
	for {
		f.mu.Lock()
		if f.doneCh == nil {
			f.doneCh = make(chan struct{})
		}
		done, err, ch := f.done, f.err, f.doneCh
		f.mu.Unlock()
		if err != nil {
			return false, err
		}
		if done >= mark {
			return true, nil
		}
		select {
		case <-ch:
		case <-t.C:
			return false, nil
		}
	}
}
