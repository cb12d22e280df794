package gateway

import (
	"sync"
	"time"
)

// bucket is a token bucket in the manner of nbdkit's rate filter
// (filters/rate/bucket.c): tokens accrue at rate per second up to burst;
// a request takes what it costs and, if that leaves the bucket in debt,
// waits until the debt is paid. Debt instead of refusal keeps the long-run
// rate exact and never starves a large request:
//
//	tokens ▲  burst ─────────────╮   refill at rate
//	       │                      ╲__/‾‾‾‾‾‾‾
//	     0 ┼───────────────────────┼──────────▶ time
//	       │          take(n) ─────╯ debt → wait debt/rate
type bucket struct {
	rate, burst float64 // per second; at most

	mu     sync.Mutex // guards tokens, last
	tokens float64
	last   time.Time
}

func newBucket(rate float64, burst time.Duration) *bucket {
	b := &bucket{rate: rate, burst: max(rate*burst.Seconds(), 1)}
	b.tokens = b.burst
	return b
}

// take takes n tokens at now and returns how long the caller must wait.
func (b *bucket) take(n float64, now time.Time) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	if !b.last.IsZero() {
		b.tokens = min(b.burst, b.tokens+now.Sub(b.last).Seconds()*b.rate)
	}
	b.last = now
	b.tokens -= n
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}
