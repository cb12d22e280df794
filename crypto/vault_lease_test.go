package crypto

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"goldilocks/internal/block"
	"goldilocks/internal/vaulttest"
)

// TestVaultLease runs the lease protocol of FORMAT.md ("Lease in Vault")
// against a real Vault server, with a gateway's token: a held lease is
// refused to another gateway, a released one taken at once, a silent one
// taken over only after its TTL and a margin (its holder fenced by then),
// a broken one fences a holder that still lives, and a record whose
// newest version was deleted is not taken for free.
func TestVaultLease(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	const ttl = 1200 * time.Millisecond
	margin := ttl / 4
	gateway := func() *VaultLease {
		k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		return k.Lease(ttl)
	}
	a, b, c, d, e := gateway(), gateway(), gateway(), gateway(), gateway()
	vol := [16]byte{0x1e, 0xa5}
	ctx := context.Background()

	la, err := a.Acquire(ctx, vol, "host-a:1:/a")
	if err != nil {
		t.Fatal(err)
	}
	if err := la.Check(); err != nil {
		t.Fatalf("a fresh lease: %v", err)
	}

	// Held and renewed: refused, the holder named, once a renewal is seen.
	start := time.Now()
	_, err = b.Acquire(ctx, vol, "host-b:2:/b")
	if !errors.Is(err, block.ErrLeased) || !strings.Contains(err.Error(), "host-a:1:/a") {
		t.Fatalf("a held lease: %v, want ErrLeased naming host-a", err)
	}
	if el := time.Since(start); el > ttl {
		t.Errorf("refusal took %v: the holder renews every %v", el, ttl/3)
	}
	if err := la.Check(); err != nil {
		t.Fatalf("the holder after another's attempt: %v", err)
	}

	// Released: taken at once.
	if err := la.Release(); err != nil {
		t.Fatal(err)
	}
	if err := la.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("a released lease checks %v, want ErrLeaseLost", err)
	}
	start = time.Now()
	lb, err := b.Acquire(ctx, vol, "host-b:2:/b")
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el > ttl/2 {
		t.Errorf("taking a released lease took %v", el)
	}

	// B dies (no renewal, no release): C waits a TTL and a margin, and B
	// has fenced itself before C holds it.
	lb.abandon()
	start = time.Now()
	lc, err := c.Acquire(ctx, vol, "host-c:3:/c")
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < ttl+margin-ttl/3 {
		t.Errorf("a silent lease taken over after %v, want at least %v less one renewal period", el, ttl+margin)
	}
	if err := lb.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the dead holder at the takeover checks %v, want ErrLeaseLost", err)
	}
	if err := lc.Check(); err != nil {
		t.Fatal(err)
	}

	// C lives; D breaks the lease: C's next renewal finds it gone.
	who, err := d.Break(ctx, vol, "host-d:4:/d")
	if err != nil || who != "host-c:3:/c" {
		t.Fatalf("break: %q, %v; want host-c's", who, err)
	}
	deadline := time.Now().Add(ttl)
	for lc.Check() == nil {
		if time.Now().After(deadline) {
			t.Fatal("a broken lease's holder still may write after a TTL")
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := lc.Check(); !errors.Is(err, ErrLeaseLost) || !strings.Contains(err.Error(), "took it") {
		t.Fatalf("the broken holder: %v", err)
	}
	// D waits out the broken record; E breaks it again meanwhile: told
	// it is broken already (by D), nothing written, and D's wait goes on.
	start = time.Now()
	var ld *Lease
	acquired := make(chan error, 1)
	go func() {
		var err error
		ld, err = d.Acquire(ctx, vol, "host-d:4:/d")
		acquired <- err
	}()
	_, before, _, _ := d.read(ctx, vol)
	time.Sleep(ttl / 3)
	if who, err := e.Break(ctx, vol, "host-e:5:/e"); !errors.Is(err, ErrAlreadyBroken) || who != "" || !strings.Contains(err.Error(), "host-d:4:/d") {
		t.Fatalf("a second break: %q, %v; want ErrAlreadyBroken naming host-d", who, err)
	}
	if _, after, _, _ := d.read(ctx, vol); after != before {
		t.Fatalf("a second break wrote the record again (version %d -> %d)", before, after)
	}
	if err := <-acquired; err != nil {
		t.Fatalf("the attach waiting out a broken lease, after a second break: %v", err)
	}
	if el := time.Since(start); el < ttl {
		t.Errorf("a broken lease taken after %v: a holder that lives needs up to a TTL to fence", el)
	}
	if err := ld.Release(); err != nil {
		t.Fatal(err)
	}

	// The newest version deleted (by the storage admin's token, say):
	// held by someone unknown, not free.
	vol2 := [16]byte{0x1e, 0xa6}
	l2, err := a.Acquire(ctx, vol2, "host-a:1:/a")
	if err != nil {
		t.Fatal(err)
	}
	l2.abandon()
	if _, err := srv.Client().Logical().Delete("secret/data/goldilocks/leases/" + formatUUID(vol2)); err != nil {
		t.Fatal(err)
	}
	start = time.Now()
	l3, err := b.Acquire(ctx, vol2, "host-b:2:/b")
	if err != nil {
		t.Fatal(err)
	}
	if el := time.Since(start); el < ttl {
		t.Errorf("a lease whose newest version was deleted taken after %v, as if free", el)
	}
	l3.Release()

	// A held lease and a short context: ErrLeased, not a hang.
	l4, err := a.Acquire(ctx, vol2, "host-a:1:/a")
	if err != nil {
		t.Fatal(err)
	}
	defer l4.Release()
	sctx, cancel := context.WithTimeout(ctx, ttl/4)
	defer cancel()
	if _, err := b.Acquire(sctx, vol2, "host-b:2:/b"); !errors.Is(err, block.ErrLeased) {
		t.Fatalf("with a short context: %v", err)
	}
}

// TestVaultLeaseBreakKeepsTTL: a break by a gateway with a short TTL must
// not let the lease go before a holder with a long one has fenced itself.
// The holder here is alive but silent (stopped, say): its own deadline
// decides.
func TestVaultLeaseBreakKeepsTTL(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	gateway := func(ttl time.Duration) *VaultLease {
		k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
		if err != nil {
			t.Fatal(err)
		}
		return k.Lease(ttl)
	}
	long, short := gateway(3*time.Second), gateway(300*time.Millisecond)
	vol := [16]byte{0xb4, 0xea}
	ctx := context.Background()
	if who, err := short.Break(ctx, vol, "host-s:2:/s"); err != nil || who != "" {
		t.Fatalf("breaking a lease never taken: %q, %v", who, err)
	}
	held, err := long.Acquire(ctx, vol, "host-l:1:/l")
	if err != nil {
		t.Fatal(err)
	}
	held.abandon() // stopped: no renewal, so no refused one fences it early
	if who, err := short.Break(ctx, vol, "host-s:2:/s"); err != nil || who != "host-l:1:/l" {
		t.Fatalf("break: %q, %v", who, err)
	}
	taken, err := short.Acquire(ctx, vol, "host-s:2:/s")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Release()
	if err := held.Check(); err == nil {
		t.Fatal("the lease was taken over while its old holder could still write")
	}

	// The other way round: a short-lived holder broken by a gateway with
	// a long TTL is taken over on the holder's time (0.375 s), which its
	// fence is timed by, not on the breaker's (3.75 s).
	vol2 := [16]byte{0xb4, 0xeb}
	held2, err := short.Acquire(ctx, vol2, "host-s:2:/s")
	if err != nil {
		t.Fatal(err)
	}
	held2.abandon()
	if who, err := long.Break(ctx, vol2, "host-l:1:/l"); err != nil || who != "host-s:2:/s" {
		t.Fatalf("break: %q, %v", who, err)
	}
	t0 := time.Now()
	taken2, err := long.Acquire(ctx, vol2, "host-l:1:/l")
	if err != nil {
		t.Fatal(err)
	}
	defer taken2.Release()
	if took := time.Since(t0); took > 2*time.Second {
		t.Errorf("the takeover after a break took %v: the broken record has the breaker's TTL, not the holder's", took)
	}
	if err := held2.Check(); err == nil {
		t.Fatal("the lease was taken over while its old holder could still write")
	}
}

// A holder whose Vault goes away keeps writing through its renewals'
// failures only until its deadline (3/4 of the TTL after the last
// answered renewal was sent), then is fenced, and stays fenced when
// Vault is back (its requests failed meanwhile: it is attached again).
func TestVaultLeaseVaultGone(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{Persistent: true})
	useGatewayToken(t, srv)
	const ttl = 1200 * time.Millisecond
	k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	held, err := k.Lease(ttl).Acquire(context.Background(), [16]byte{0x90, 0x9e}, "host-v:1:/v")
	if err != nil {
		t.Fatal(err)
	}
	defer held.abandon()
	time.Sleep(ttl / 2) // a renewal or so answered
	if err := held.Check(); err != nil {
		t.Fatalf("renewed while Vault is up: %v", err)
	}
	srv.Stop()
	stopped := time.Now()
	for held.Check() == nil {
		// 3/4 of the TTL after the last answered renewal, which came
		// before the stop; a little more for the polling.
		if time.Since(stopped) > ttl*3/4+150*time.Millisecond {
			t.Fatalf("the holder may still write %v after Vault went away (TTL %v)", time.Since(stopped).Round(time.Millisecond), ttl)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := held.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("fenced with %v, want ErrLeaseLost", err)
	}
	t.Logf("fenced %v after Vault went away", time.Since(stopped).Round(time.Millisecond))
	srv.Restart()
	time.Sleep(2 * ttl) // renewals would be answered now
	if err := held.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Fatalf("the fenced holder may write again once Vault is back: %v", err)
	}
}

// BenchmarkLeaseCheck is what the fence costs each request an upstream
// device sends (the clocks read through the vDSO, and a mutex).
func BenchmarkLeaseCheck(b *testing.B) {
	s := &Lease{l: &VaultLease{ttl: DefaultLeaseTTL}, deadline: time.Now().Add(time.Hour)}
	b.ReportAllocs()
	for b.Loop() {
		if err := s.Check(); err != nil {
			b.Fatal(err)
		}
	}
}

// TestVaultLeaseStopsPromptly: a renewal waiting on a Vault that has
// stopped answering (a host that drops packets, not one that refuses)
// does not hold up Abandon, which a device's Close calls.
func TestVaultLeaseStopsPromptly(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	const ttl = 3 * time.Second // renewals every 1 s, each request bounded by 500 ms
	k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	held, err := k.Lease(ttl).Acquire(context.Background(), [16]byte{0x57, 0x0b}, "host-h:1:/h")
	if err != nil {
		t.Fatal(err)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	go func() { // accepts, reads, never answers
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go io.Copy(io.Discard, c)
		}
	}()
	if err := k.c.SetAddress("http://" + ln.Addr().String()); err != nil {
		t.Fatal(err)
	}
	time.Sleep(ttl/3 + ttl/12) // the first renewal is waiting on the silent server
	start := time.Now()
	held.Abandon()
	if el := time.Since(start); el > 200*time.Millisecond {
		t.Errorf("Abandon took %v while a renewal waited on a silent Vault", el.Round(time.Millisecond))
	}
	if err := held.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Errorf("after Abandon: %v, want ErrLeaseLost", err)
	}

	// A renewal that the stop cut short may still have been applied:
	// Release then finds the record one version on, still ours, and
	// releases that version; another gateway takes the lease at once.
	if err := k.c.SetAddress(srv.Addr); err != nil {
		t.Fatal(err)
	}
	vol := [16]byte{0x57, 0x0c}
	held = acquireRenewedLate(t, k.Lease(ttl), vol)
	if err := held.Release(); err != nil {
		t.Fatalf("release after a renewal it did not see answered: %v", err)
	}
	start = time.Now()
	other, err := k.Lease(ttl).Acquire(context.Background(), vol, "host-o:2:/o")
	if err != nil {
		t.Fatal(err)
	}
	defer other.abandon()
	if el := time.Since(start); el > ttl/2 {
		t.Errorf("the released lease was taken after %v, want at once", el.Round(time.Millisecond))
	}
}

// acquireRenewedLate takes vol's lease as host-h and then writes a renewal
// of it that the holder never saw answered (one the stop cut short, applied
// after all): the record stands one version past the holder's.
func acquireRenewedLate(t *testing.T, l *VaultLease, vol [16]byte) *Lease {
	t.Helper()
	held, err := l.Acquire(context.Background(), vol, "host-h:1:/h")
	if err != nil {
		t.Fatal(err)
	}
	held.mu.Lock()
	version := held.version
	held.mu.Unlock()
	if _, err := l.write(context.Background(), vol, held.rec, version); err != nil {
		t.Fatal(err)
	}
	return held
}

// TestVaultLeaseReleaseReadBackFails: when Release's check-and-set is
// refused (a renewal cut short by the stop was applied after all) and
// reading the record back fails too, Release says so, and the lease is
// not handed on at once: it still runs out, and another gateway takes it
// after the record has stood for its TTL. (Vault answers 503 to reads
// through a proxy in front of the real server, as a standby that lost
// its active node does.)
func TestVaultLeaseReleaseReadBackFails(t *testing.T) {
	srv := vaulttest.Start(t, vaulttest.Options{})
	useGatewayToken(t, srv)
	target, err := url.Parse(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	var failReads atomic.Bool
	fwd := httputil.NewSingleHostReverseProxy(target)
	proxy := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if failReads.Load() && r.Method == http.MethodGet {
			http.Error(w, `{"errors":["Vault is sealed"]}`, http.StatusServiceUnavailable)
			return
		}
		fwd.ServeHTTP(w, r)
	}))
	defer proxy.Close()

	const ttl = 3 * time.Second
	k, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	if err := k.c.SetAddress(proxy.URL); err != nil {
		t.Fatal(err)
	}
	vol := [16]byte{0x57, 0x0d}
	held := acquireRenewedLate(t, k.Lease(ttl), vol)
	failReads.Store(true)
	err = held.Release()
	if err == nil || !errors.Is(err, ErrVaultUnavailable) || !strings.Contains(err.Error(), "releasing the lease") {
		t.Fatalf("release whose read-back failed: %v, want an error saying the release's read failed, ErrVaultUnavailable", err)
	}
	t.Logf("Release: %v", err)
	if err := held.Check(); !errors.Is(err, ErrLeaseLost) {
		t.Errorf("after a failed release the holder may still write: %v", err)
	}

	k2, err := NewVaultKEK(VaultConfig{Log: quietLog()})
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	ctx, cancel := context.WithTimeout(context.Background(), 4*ttl)
	defer cancel()
	other, err := k2.Lease(ttl).Acquire(ctx, vol, "host-o:2:/o")
	if err != nil {
		t.Fatalf("the lease did not run out: %v", err)
	}
	defer other.abandon()
	if el := time.Since(start); el < ttl {
		t.Errorf("taken over after %v: a lease whose release failed was handed on before its TTL (%v)", el.Round(time.Millisecond), ttl)
	}
}
