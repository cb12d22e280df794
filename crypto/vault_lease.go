package crypto

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"sync"
	"time"

	vault "github.com/hashicorp/vault/api"
	"golang.org/x/sys/unix"

	"goldilocks/internal/block"
)

// VaultLease keeps volume leases in Vault's KV version 2 engine, at
// KVMount/data/goldilocks/leases/<volume UUID>, written with
// check-and-set: the lease of volumes on an upstream NBD export, which
// has no lock of its own (FORMAT.md, "Lease in Vault"), taken by every
// read-write open of their store (internal/volume/lease.go).
type VaultLease struct {
	k   *VaultKEK
	ttl time.Duration
}

// ErrLeaseLost is returned by Lease.Check once the holder may no longer
// write: another gateway took the lease, or no renewal was answered in
// time (the holder is fenced).
var ErrLeaseLost = errors.New("the volume's lease is lost: writes are fenced")

// ErrAlreadyBroken is returned by Break when the lease is broken already
// (by the gateway it names): the record is left as it stands, so the
// takeover it started is not put off, nor a gateway waiting for it sent
// away as if a holder had renewed.
var ErrAlreadyBroken = errors.New("the volume's lease is broken already")

// vaultLeaseDir is where leases live under the KV mount. Part of the
// format.
const vaultLeaseDir = "goldilocks/leases"

// DefaultLeaseTTL is a lease's time to live when none is given.
const DefaultLeaseTTL = 20 * time.Second

// vaultLeaseTimeout bounds one request about a lease.
const vaultLeaseTimeout = 5 * time.Second

// Lease states (the record's "state").
const (
	leaseHeld     = "held"
	leaseReleased = "released"
	leaseBroken   = "broken"
)

// Lease returns the lease store of this Vault connection; ttl 0 is
// DefaultLeaseTTL.
func (k *VaultKEK) Lease(ttl time.Duration) *VaultLease {
	if ttl <= 0 {
		ttl = DefaultLeaseTTL
	}
	return &VaultLease{k: k, ttl: ttl}
}

// margin is what separates the holder's fence from a takeover.
func (l *VaultLease) margin(ttl time.Duration) time.Duration { return ttl / 4 }

// leaseRecord is the data of one version of a lease.
type leaseRecord struct {
	Holder, Nonce, State string
	TTL                  time.Duration
}

// boottime is CLOCK_BOOTTIME, which goes on through a suspend: an
// acquisition's watch of another holder is measured on it (FORMAT.md);
// the holder's own deadline is checked on cheaper clocks (Check).
func boottime() time.Duration {
	var ts unix.Timespec
	unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) // cannot fail on Linux
	return time.Duration(ts.Nano())
}

func (l *VaultLease) path(op string, volume [16]byte) string {
	return l.k.cfg.KVMount + "/" + op + "/" + vaultLeaseDir + "/" + formatUUID(volume)
}

// read returns the newest record, its KV version (0: never written) and
// whether it holds data (a version whose data was deleted does not).
func (l *VaultLease) read(ctx context.Context, volume [16]byte) (leaseRecord, int64, bool, error) {
	p := l.path("data", volume)
	s, err := l.k.call(ctx, "reading lease "+p, func() (*vault.Secret, error) {
		return l.k.c.Logical().ReadWithContext(ctx, p)
	})
	if err != nil {
		return leaseRecord{}, 0, false, l.kvError(err)
	}
	var data, meta map[string]any
	if s != nil {
		data, _ = s.Data["data"].(map[string]any)
		meta, _ = s.Data["metadata"].(map[string]any)
	}
	var version int64
	if meta != nil {
		n, _ := meta["version"].(json.Number)
		version, _ = n.Int64()
	}
	if data == nil {
		return leaseRecord{}, version, false, nil
	}
	str := func(k string) string { v, _ := data[k].(string); return v }
	rec := leaseRecord{Holder: str("holder"), Nonce: str("nonce"), State: str("state")}
	ms, perr := strconv.ParseInt(str("ttl_ms"), 10, 64)
	if vol := str("volume"); vol != formatUUID(volume) || perr != nil || ms <= 0 || version == 0 {
		return leaseRecord{}, version, false, fmt.Errorf("vault at %s: lease %s is malformed (volume %q, ttl_ms %q)", l.k.c.Address(), p, vol, str("ttl_ms"))
	}
	rec.TTL = time.Duration(ms) * time.Millisecond
	return rec, version, true, nil
}

// write writes rec with check-and-set on version and returns the new
// version.
func (l *VaultLease) write(ctx context.Context, volume [16]byte, rec leaseRecord, version int64) (int64, error) {
	p := l.path("data", volume)
	s, err := l.k.call(ctx, "writing lease "+p, func() (*vault.Secret, error) {
		return l.k.c.Logical().WriteWithContext(ctx, p, map[string]any{
			"data": map[string]any{
				"volume": formatUUID(volume),
				"holder": rec.Holder,
				"nonce":  rec.Nonce,
				"state":  rec.State,
				"ttl_ms": strconv.FormatInt(rec.TTL.Milliseconds(), 10),
			},
			"options": map[string]any{"cas": version},
		})
	})
	if err != nil {
		return 0, err
	}
	var n int64
	if s != nil {
		v, _ := s.Data["version"].(json.Number)
		n, _ = v.Int64()
	}
	if n == 0 {
		return 0, fmt.Errorf("vault at %s: writing lease %s: no KV version in the answer", l.k.c.Address(), p)
	}
	return n, nil
}

// configure sets the lease key's metadata at first use: every write must
// carry check-and-set, and versions are not deleted behind our back.
func (l *VaultLease) configure(ctx context.Context, volume [16]byte) error {
	p := l.path("metadata", volume)
	_, err := l.k.call(ctx, "configuring lease "+p, func() (*vault.Secret, error) {
		return l.k.c.Logical().WriteWithContext(ctx, p, map[string]any{
			"cas_required": true, "delete_version_after": "0s", "max_versions": 16,
		})
	})
	if err != nil {
		return l.kvError(err)
	}
	return nil
}

func newNonce() string {
	var b [16]byte
	rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// Acquire takes the volume's lease for holder (host:pid:data dir) and
// keeps it renewed until Release. A lease another gateway holds is
// watched: renewed meanwhile, the acquisition fails with block.ErrLeased
// naming the holder; unchanged for its TTL and a margin, its holder is
// taken as dead (it has fenced itself by then) and the lease taken over.
// ctx bounds the whole acquisition.
func (l *VaultLease) Acquire(ctx context.Context, volume [16]byte, holder string) (*Lease, error) {
	p := l.path("data", volume)
	var (
		watched    int64 // the version being watched, 0: none
		watchedRec leaseRecord
		since      time.Duration
	)
	for {
		rctx, cancel := context.WithTimeout(ctx, vaultLeaseTimeout)
		rec, version, ok, err := l.read(rctx, volume)
		cancel()
		now := boottime() // from the reply: a renewal served before it is in what was read
		if err != nil {
			if watched != 0 && ctx.Err() != nil { // out of time while watching a holder
				return nil, fmt.Errorf("lease %s: %w (%s): %w", p, block.ErrLeased, describeHolder(watchedRec, watchedRec.Nonce != ""), ctx.Err())
			}
			return nil, err
		}
		// Free: never written, or released. Held or broken: watched (a
		// broken record is a holder fenced by break-lease, or about to be).
		free := version == 0 || ok && rec.State == leaseReleased
		if !free {
			if watched != version || watchedRec.Nonce != rec.Nonce {
				if watched != 0 {
					return nil, fmt.Errorf("lease %s: %w (%s renews it)", p, block.ErrLeased, describeHolder(rec, ok))
				}
				watched, watchedRec, since = version, rec, now
			}
			ttl := rec.TTL
			if !ok {
				ttl = l.ttl // a deleted version: held by someone unknown
			}
			if wait := since + ttl + l.margin(ttl) - now; wait > 0 {
				select {
				case <-ctx.Done():
					return nil, fmt.Errorf("lease %s: %w (%s): %w", p, block.ErrLeased, describeHolder(rec, ok), ctx.Err())
				case <-time.After(min(wait, ttl/4)):
				}
				continue
			}
			// Unchanged for a TTL and a margin: its holder has fenced itself.
		}
		if version == 0 {
			cctx, cancel := context.WithTimeout(ctx, vaultLeaseTimeout)
			err := l.configure(cctx, volume)
			cancel()
			if err != nil {
				return nil, err
			}
		}
		mine := leaseRecord{Holder: holder, Nonce: newNonce(), State: leaseHeld, TTL: l.ttl}
		sent := time.Now()
		wctx, cancel := context.WithTimeout(ctx, vaultLeaseTimeout)
		n, err := l.write(wctx, volume, mine, version)
		cancel()
		if err != nil {
			if !casMismatch(err) {
				return nil, l.kvError(err)
			}
			// Someone else wrote meanwhile (or a deleted version read as
			// none): look again, not at once.
			watched = 0
			select {
			case <-ctx.Done():
				return nil, fmt.Errorf("lease %s: %w: %w", p, block.ErrLeased, ctx.Err())
			case <-time.After(l.ttl / 8):
			}
			continue
		}
		ls := &Lease{l: l, volume: volume, rec: mine, version: n, deadline: sent.Add(l.ttl - l.margin(l.ttl)),
			stop: make(chan struct{}), done: make(chan struct{})}
		ls.ctx, ls.cancel = context.WithCancel(context.Background())
		go ls.renew()
		return ls, nil
	}
}

func describeHolder(rec leaseRecord, ok bool) string {
	if !ok || rec.Holder == "" {
		return "held by an unknown gateway"
	}
	return "held by " + rec.Holder
}

// Break writes a broken record over whoever holds the volume's lease and
// returns who did ("" if nobody; a lease never taken or released is left
// alone; one broken already is too, with ErrAlreadyBroken naming who
// broke it): a holder that still lives fails its next renewal and fences
// itself. An attach then takes the lease over as from a dead holder, once
// the record stayed unchanged for its TTL and a margin. The broken
// record keeps the holder's TTL, which is what its fence is timed by
// (with a shorter one, the takeover could come before the holder's next
// renewal fences it; a longer one only delays the takeover); ours only
// where the record has none (a deleted version).
func (l *VaultLease) Break(ctx context.Context, volume [16]byte, holder string) (string, error) {
	for try := 0; ; try++ {
		rctx, cancel := context.WithTimeout(ctx, vaultLeaseTimeout)
		rec, version, ok, err := l.read(rctx, volume)
		cancel()
		if err != nil {
			return "", err
		}
		if version == 0 || ok && rec.State == leaseReleased {
			return "", nil
		}
		if ok && rec.State == leaseBroken {
			return "", fmt.Errorf("lease %s: %w by %s", l.path("data", volume), ErrAlreadyBroken, rec.Holder)
		}
		was := ""
		if ok && rec.State == leaseHeld {
			was = rec.Holder
		}
		ttl := rec.TTL
		if !ok || ttl <= 0 { // a deleted version
			ttl = l.ttl
		}
		wctx, cancel := context.WithTimeout(ctx, vaultLeaseTimeout)
		_, err = l.write(wctx, volume, leaseRecord{Holder: holder, Nonce: newNonce(), State: leaseBroken, TTL: ttl}, version)
		cancel()
		if err == nil {
			return was, nil
		}
		if !casMismatch(err) || try == 8 {
			return "", l.kvError(err)
		}
	}
}

// kvError says, with a refusal of a lease request, what the token needs
// (not for an unavailable Vault).
func (l *VaultLease) kvError(err error) error {
	if errors.Is(err, ErrVaultUnavailable) || errors.Is(err, ErrVaultKV) {
		return err
	}
	m := l.k.cfg.KVMount
	return fmt.Errorf("%w (%s/): leases: the token needs create, read and update on %s/data/%s/* and create and update on %s/metadata/%s/* (crypto/FORMAT.md, \"Lease in Vault\"): %w",
		ErrVaultKV, m, m, vaultLeaseDir, m, vaultLeaseDir, err)
}

// Lease is a held lease, renewed every third of its TTL until Release or
// Abandon, or until it is fenced (Check).
type Lease struct {
	l      *VaultLease
	volume [16]byte
	rec    leaseRecord
	stop   chan struct{}
	done   chan struct{}
	// ctx is cancelled with stop: a renewal waiting on a Vault that does
	// not answer gives up at once, so that Abandon and Release return.
	ctx    context.Context
	cancel context.CancelFunc

	mu       sync.Mutex
	version  int64     // the KV version last written by us
	deadline time.Time // after which we may not write (fenced; Check)
	lost     error     // set once: fenced (the lease went to another, or its deadline passed)
}

// Check reports whether the holder may still write: nil, or
// ErrLeaseLost (taken by another, or not renewed in time). The caller
// checks before every request it sends, so it reads the clocks Go reads
// without a system call (the vDSO: time.Now took 54 ns on the test VM,
// a clock_gettime system call for CLOCK_BOOTTIME 1.4 µs; Check 74 ns,
// BenchmarkLeaseCheck): the deadline has passed if
// either CLOCK_MONOTONIC or CLOCK_REALTIME says so. The first stops
// during a suspend, the second goes on through it (the kernel sets it
// at resume, before any task runs again) but may be stepped; only a
// suspend together with a step back of the wall clock could let a
// holder write late (FORMAT.md).
func (s *Lease) Check() error {
	now := time.Now()
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lost != nil {
		return s.lost
	}
	if !now.Before(s.deadline) || !now.Round(0).Before(s.deadline.Round(0)) { // monotonic, wall
		// For good: a renewal answered later does not undo the fence
		// (the holder's requests have failed meanwhile; it is attached
		// again, FORMAT.md).
		s.lost = fmt.Errorf("%w: no renewal answered by Vault in time", ErrLeaseLost)
		return s.lost
	}
	return nil
}

// renew rewrites the record every TTL/3 until stop; a renewal that was
// not answered is tried again every TTL/12 until one is, or the deadline
// fences the holder.
func (s *Lease) renew() {
	defer close(s.done)
	wait := s.l.ttl / 3
	for {
		select {
		case <-s.stop:
			return
		case <-time.After(wait):
		}
		s.mu.Lock()
		fenced := s.lost != nil
		s.mu.Unlock()
		if fenced {
			return // lost for good
		}
		renewed, lost := s.renewOnce()
		if lost {
			return
		}
		if wait = s.l.ttl / 3; !renewed {
			wait = s.l.ttl / 12
		}
	}
}

// renewTimeout bounds one renewal request: short enough that a few fit
// before the deadline.
func (s *Lease) renewTimeout() time.Duration { return min(vaultLeaseTimeout, s.l.ttl/6) }

// renewOnce writes the record again; it reports whether that was
// answered, and whether the lease is lost to another.
func (s *Lease) renewOnce() (renewed, lost bool) {
	s.mu.Lock()
	version := s.version
	s.mu.Unlock()
	sent := time.Now()
	ctx, cancel := context.WithTimeout(s.ctx, s.renewTimeout())
	defer cancel()
	n, err := s.l.write(ctx, s.volume, s.rec, version)
	if err == nil {
		s.renewed(n, sent)
		return true, false
	}
	// Refused, or no answer: did a write of ours apply (a lost reply)?
	// Asked with a time of its own: the write's may be spent.
	rctx, rcancel := context.WithTimeout(s.ctx, s.renewTimeout())
	defer rcancel()
	rec, v, ok, rerr := s.l.read(rctx, s.volume)
	switch {
	case rerr != nil || s.ctx.Err() != nil:
		return false, false // Vault unreachable: tried again; the deadline decides
	case ok && rec.Nonce == s.rec.Nonce && rec.State == leaseHeld:
		// A write of ours applied though its reply was lost: go on from
		// its version. The deadline stays: that write may be an earlier
		// one than this.
		s.mu.Lock()
		if s.lost == nil && v > s.version {
			s.version = v
		}
		s.mu.Unlock()
		return false, false // renewed again soon, on that version
	}
	s.mu.Lock()
	s.lost = fmt.Errorf("%w: %s took it", ErrLeaseLost, describeHolder(rec, ok))
	s.mu.Unlock()
	return false, true
}

func (s *Lease) renewed(version int64, sent time.Time) {
	s.mu.Lock()
	if s.lost == nil {
		s.version, s.deadline = version, sent.Add(s.l.ttl-s.l.margin(s.l.ttl))
	}
	s.mu.Unlock()
}

// Release stops renewing (a renewal in flight is cancelled) and marks the
// lease released (check-and-set on the version last written, or, if that
// is refused, on the version read back while the record is still ours: the
// cancelled renewal may have been applied), so that another gateway takes
// it at once. Call it after the last write and FLUSH were answered. A fenced lease
// (taken by another, or past its deadline) is left as it is: requests
// sent before the fence may still be at the server, and a takeover waits
// for the record to stand for its TTL and a quarter.
func (s *Lease) Release() error {
	s.Check() // a deadline passed unnoticed fences it now
	s.abandon()
	s.mu.Lock()
	version, lost := s.version, s.lost
	s.lost = fmt.Errorf("%w: released", ErrLeaseLost)
	s.mu.Unlock()
	if lost != nil {
		return nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), vaultLeaseTimeout)
	defer cancel()
	rec := s.rec
	rec.State = leaseReleased
	_, err := s.l.write(ctx, s.volume, rec, version)
	if casMismatch(err) {
		// A renewal cut short by the stop may have been applied after
		// all: released on its version if the record is still ours.
		cur, v, ok, rerr := s.l.read(ctx, s.volume)
		switch {
		case rerr != nil: // not released: renewed no more, it runs out
			return fmt.Errorf("releasing the lease: the record changed and reading it back failed, so it is left to run out (another gateway takes it once it has stood for %v and a quarter): %w", s.l.ttl, rerr)
		case ok && cur.Nonce == s.rec.Nonce && cur.State == leaseHeld:
			_, err = s.l.write(ctx, s.volume, rec, v)
		default: // not ours (a CAS refusal is no question of the token's rights)
			return fmt.Errorf("%w: %s took it before the release", ErrLeaseLost, describeHolder(cur, ok))
		}
	}
	if err != nil {
		return s.l.kvError(err)
	}
	return nil
}

// Abandon stops renewing without releasing, and fences the holder: the
// lease runs out, and another gateway takes it over after its TTL and a
// quarter. For a holder whose last requests may still be carried out
// (upstream.Device.Close after one failed unanswered).
func (s *Lease) Abandon() {
	s.abandon()
	s.mu.Lock()
	if s.lost == nil {
		s.lost = fmt.Errorf("%w: abandoned", ErrLeaseLost)
	}
	s.mu.Unlock()
}

// abandon stops renewing without releasing (what a holder that dies
// does): a renewal in flight is cancelled, not waited out, so a Vault
// that does not answer holds up no detach.
func (s *Lease) abandon() {
	select {
	case <-s.stop:
	default:
		close(s.stop)
		s.cancel()
	}
	<-s.done
}
