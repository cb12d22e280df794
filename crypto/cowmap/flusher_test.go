package cowmap

import (
	"errors"
	"testing"
	"time"
)

// A Flusher keeps the first failure: the next flush of the device would
// succeed (memDev fails once, as Linux reports a failed fdatasync once),
// but every later Flush fails, and a checkpoint waiting for a flush hears
// of it.
func TestFlusherKeepsAFailure(t *testing.T) {
	g, _ := NewGeometry(64, 8)
	dev := newMemDev(g)
	f := NewFlusher(dev)
	if err := f.Flush(); err != nil {
		t.Fatal(err)
	}
	dev.failNext = true
	first := f.Flush()
	if first == nil {
		t.Fatal("the injected failure was not reported")
	}
	for i := 0; i < 3; i++ {
		if err := f.Flush(); !errors.Is(err, first) {
			t.Fatalf("flush %d after a failure: %v, want the first failure", i, err)
		}
	}
	if dev.flushes != 2 {
		t.Fatalf("the device was flushed %d times, want 2: none after the failure", dev.flushes)
	}
	if ok, err := f.Flushed(f.Mark(), time.Millisecond); ok || err == nil {
		t.Fatalf("Flushed after a failure: %v, %v", ok, err)
	}
}

// Flushed waits for a flush that began after Mark, not one before it.
func TestFlusherFlushed(t *testing.T) {
	g, _ := NewGeometry(64, 8)
	f := NewFlusher(newMemDev(g))
	f.Flush()
	mark := f.Mark()
	if ok, err := f.Flushed(mark, 5*time.Millisecond); ok || err != nil {
		t.Fatalf("no flush since the mark, yet Flushed says %v, %v", ok, err)
	}
	go func() {
		time.Sleep(5 * time.Millisecond)
		f.Flush()
	}()
	if ok, err := f.Flushed(mark, 10*time.Second); !ok || err != nil {
		t.Fatalf("a flush after the mark, yet Flushed says %v, %v", ok, err)
	}
	if ok, _ := f.Flushed(mark, 0); !ok {
		t.Fatal("Flushed forgot a completed flush")
	}
}
