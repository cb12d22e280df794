package gateway

import (
	"testing"
	"time"

	"goldilocks/internal/nbdproto"
	"goldilocks/policy"
)

// BenchmarkAdmit is the per-request policy check: read-only, allowed
// commands, and the token buckets of the identity and the volume (rates
// high enough that nobody waits), as the reader goroutine runs it.
func BenchmarkAdmit(b *testing.B) {
	s := New(Config{})
	for _, bc := range []struct {
		name string
		d    policy.Decision
	}{
		{"no-limits", policy.Decision{Allow: true, Commands: policy.AllCommands}},
		{"iops+bandwidth-identity+volume", policy.Decision{Allow: true, Commands: policy.AllCommands,
			Identity: policy.Limit{IOPS: 1e12, Bandwidth: 1e15, Burst: time.Second},
			Volume:   policy.Limit{IOPS: 1e12, Bandwidth: 1e15, Burst: time.Second}}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			c := &conn{srv: s}
			c.cut = make(chan struct{})
			c.grant.Store(s.grantFor(bc.d, "vm-a", "a-root"))
			r := &request{typ: nbdproto.CmdRead, length: 4096}
			b.ReportAllocs()
			for b.Loop() {
				if c.admit(r) != 0 {
					b.Fatal("refused")
				}
			}
		})
	}
}

func TestAdmit(t *testing.T) {
	s := New(Config{})
	c := &conn{srv: s}
	c.cut = make(chan struct{})
	c.grant.Store(s.grantFor(policy.Decision{Allow: true, ReadOnly: true, Commands: policy.CmdBlockStatus}, "x", "v"))
	for _, tc := range []struct {
		typ  uint16
		want uint32
	}{
		{nbdproto.CmdRead, 0}, {nbdproto.CmdFlush, 0}, {nbdproto.CmdBlockStatus, 0},
		{nbdproto.CmdWrite, nbdproto.ErrnoPerm}, {nbdproto.CmdTrim, nbdproto.ErrnoPerm}, {nbdproto.CmdWriteZeroes, nbdproto.ErrnoPerm}, {nbdproto.CmdCache, nbdproto.ErrnoPerm},
	} {
		if got := c.admit(&request{typ: tc.typ, length: 4096}); got != tc.want {
			t.Errorf("%s: errno %d, want %d", commandName(tc.typ), got, tc.want)
		}
	}
	// A bucket in debt makes the request wait about debt/rate.
	c.grant.Store(s.grantFor(policy.Decision{Allow: true, Commands: policy.AllCommands,
		Identity: policy.Limit{IOPS: 100, Burst: 10 * time.Millisecond}}, "y", "v"))
	start := time.Now()
	for i := 0; i < 6; i++ { // 1 token of burst, then 5 × 10 ms
		c.admit(&request{typ: nbdproto.CmdRead, length: 4096})
	}
	if d := time.Since(start); d < 40*time.Millisecond || d > 500*time.Millisecond {
		t.Errorf("6 requests at 100 IOPS (burst 1) took %v, want about 50 ms", d)
	}
}

// The attach limiter: one identity's burst, then its rate; another
// identity is not affected; a refusal goes on the trail once per
// attachAuditEvery with the count of those it stands for.
func TestAttachLimiter(t *testing.T) {
	l := newAttachLimiter(2, 3)
	now := time.Unix(1000, 0)
	for i := range 3 {
		if ok, _, _ := l.allow("a", now); !ok {
			t.Fatalf("attach %d within the burst refused", i)
		}
	}
	ok, audit, _ := l.allow("a", now)
	if ok || !audit {
		t.Fatalf("beyond the burst: ok %v audit %v", ok, audit)
	}
	for range 5 {
		if ok, audit, _ := l.allow("a", now); ok || audit {
			t.Fatal("a refusal within the audit interval allowed or audited")
		}
	}
	if ok, _, _ := l.allow("b", now); !ok {
		t.Fatal("another identity refused")
	}
	if ok, _, _ := l.allow("a", now.Add(500*time.Millisecond)); !ok {
		t.Fatal("one token after half a second at 2/s refused")
	}
	// A rate too slow to refill: the next audited refusal counts the five
	// left out.
	slow := newAttachLimiter(1e-6, 1)
	slow.allow("c", now)
	slow.allow("c", now) // refused, audited
	for range 5 {
		slow.allow("c", now.Add(time.Second))
	}
	if ok, audit, n := slow.allow("c", now.Add(attachAuditEvery+time.Second)); ok || !audit || n != 5 {
		t.Fatalf("after the audit interval: ok %v audit %v suppressed %d, want a refusal audited with 5 left out", ok, audit, n)
	}
}
