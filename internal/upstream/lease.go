package upstream

import (
	"errors"
	"fmt"
	"net"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"goldilocks/audit"
)

// Lease is a lease that the device's user holds on the export
// (crypto.Lease: a record in Vault, crypto/FORMAT.md "Lease in Vault"),
// which NBD itself cannot keep: only its holder may send requests.
type Lease interface {
	// Check is nil while the holder may send; once it is not, every
	// request fails with EIO, and none is sent again after an outage.
	Check() error
	// Release gives the lease up; Close calls it once the connections
	// have ended, if every request sent was answered.
	Release() error
	// Abandon stops renewing it without giving it up (it runs out, and
	// another holder waits for that); Close calls it instead of Release
	// when a request failed unanswered.
	Abandon()
}

// fence checks the lease, if any, before a request is sent or sent
// again: a lease lost fails the request with EIO, and the first such
// failure is logged (event=lease_lost: it reaches the audit trail).
func (d *Device) fence() error {
	if d.o.Lease == nil {
		return nil
	}
	err := d.o.Lease.Check()
	if err == nil {
		return nil
	}
	if d.fenced.CompareAndSwap(false, true) {
		d.o.Log.Error("the volume's lease is lost: its requests to the backing store fail with EIO until it is attached again",
			"event", audit.EvLeaseLost, "backing", d.uri, "err", err)
	}
	return fmt.Errorf("upstream %s: %w: %w", d.uri, syscall.EIO, err)
}

// fenceLocked fails every request waiting in an outage once the lease is
// lost (none is sent again) and reports whether it was. The caller holds
// mu.
func (d *Device) fenceLocked() bool {
	err := d.fence()
	if err == nil {
		return false
	}
	if d.failed == nil || !errors.Is(d.failed, syscall.EIO) {
		d.failed = err
	}
	d.failLocked(err)
	return true
}

// setUserTimeout sets TCP_USER_TIMEOUT on a TCP connection: data the
// server has not acknowledged for that long (or a window closed that
// long) ends the connection, which bounds how long a request handed to
// the kernel can still reach a server cut off by a partition.
func setUserTimeout(nc net.Conn, d time.Duration) error {
	tc, ok := nc.(*net.TCPConn)
	if !ok || d <= 0 {
		return nil
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), unix.IPPROTO_TCP, unix.TCP_USER_TIMEOUT, int(d.Milliseconds()))
	}); err != nil {
		return err
	}
	return serr
}
