package gateway

import (
	"sync"
	"sync/atomic"
	"time"
)

// bucket is a token bucket kept as GCRA (the generic cell rate algorithm
// of ATM traffic shaping): instead of a token count it holds tat, the
// theoretical time at which everything admitted so far would have been
// paid for at rate. A request of n tokens moves tat on by n/rate; if tat
// then runs more than burst ahead of now, the request waits the excess.
// Waiting instead of refusing keeps the long-run rate exact and never
// starves a large request (as nbdkit's rate filter, filters/rate/bucket.c):
//
//	        ├── burst ──┤
//	now ────┼───────────┼──── tat ──▶ time
//	                    └─ wait ─┘
//
// One compare-and-swap per request, no lock: several connections of one
// identity share a bucket.
type bucket struct {
	rate     float64       // tokens per second
	burstDur time.Duration // how much time's worth may go at once
	perToken float64       // ns per token
	burst    int64         // ns
	tat      atomic.Int64  // ns on the server's coarse clock
}

func newBucket(rate float64, burst time.Duration) *bucket {
	return &bucket{rate: rate, burstDur: burst, perToken: 1e9 / rate, burst: int64(max(burst, time.Duration(1e9/rate)))}
}

// take takes n tokens at now (ns) and returns the time (ns) before which
// the caller must not go on: at most now when it need not wait.
func (b *bucket) take(n float64, now int64) int64 {
	cost := int64(n * b.perToken)
	for {
		old := b.tat.Load()
		tat := max(old, now) + cost
		if b.tat.CompareAndSwap(old, tat) {
			return tat - b.burst
		}
	}
}

// coarseClock is a monotonic clock read with one atomic load: time.Now
// costs 75 ns on the machines we measured, more than the whole
// per-request check may. One goroutine advances it every millisecond,
// started by the first reader; rates stay exact over time because a
// bucket's tat carries the debt, only the instant of a wait is off by up to
// a millisecond.
type coarseClock struct {
	start time.Time
	now   atomic.Int64
	once  sync.Once
	stop  chan struct{}
}

func newCoarseClock() *coarseClock { return &coarseClock{start: time.Now(), stop: make(chan struct{})} }

// Precise is Now read from the system clock: for the rare request that
// must wait, so that a ticker running late (a busy machine) never makes
// it wait longer.
func (k *coarseClock) Precise() int64 { return int64(time.Since(k.start)) }

// Now is nanoseconds since the clock was made.
func (k *coarseClock) Now() int64 {
	k.once.Do(func() {
		k.now.Store(int64(time.Since(k.start)))
		go k.run()
	})
	return k.now.Load()
}

func (k *coarseClock) run() {
	t := time.NewTicker(time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-k.stop:
			return
		case now := <-t.C:
			k.now.Store(int64(now.Sub(k.start)))
		}
	}
}

// Stop ends the clock's goroutine.
func (k *coarseClock) Stop() {
	select {
	case <-k.stop:
	default:
		close(k.stop)
	}
}
