package control

import (
	"context"
	"errors"
	"fmt"
	"sync"
)

// ErrUpgrading is what a client gets while the gateway is being upgraded
// in place: an operation that was running stopped at a point it resumes
// from, or a new one was not started. The same call succeeds against the
// gateway that serves the socket next; Client.Rekey retries it.
var ErrUpgrading = errors.New("gateway upgrading: try again")

// Gate holds the control socket's operations during an upgrade in
// place. Pause stops the interruptible ones (rekeys: they stop at a
// point they resume from), waits for the rest and refuses new ones with
// ErrUpgrading, so that no operation holds a volume open while the new
// gateway opens it; Resume lets them run again (after a rollback, or in
// the new gateway once it has taken over).
type Gate struct {
	mu     sync.Mutex // guards paused, ops
	paused bool
	ops    map[*gateOp]struct{}
}

type gateOp struct {
	cancel        context.CancelCauseFunc // Pause cancels an interruptible one with ErrUpgrading
	done          chan struct{}
	interruptible bool
}

// NewGate returns a gate, paused if paused (a new gateway before it took
// over).
func NewGate(paused bool) *Gate {
	return &Gate{paused: paused, ops: make(map[*gateOp]struct{})}
}

// begin starts an operation: ctx is cancelled by a Pause if it is
// interruptible; end must be called when it returns. ErrUpgrading while
// paused.
func (g *Gate) begin(ctx context.Context, interruptible bool) (context.Context, func(), error) {
	g.mu.Lock()
	defer g.mu.Unlock()
	if g.paused {
		return nil, nil, ErrUpgrading
	}
	op := &gateOp{done: make(chan struct{}), interruptible: interruptible}
	ctx, op.cancel = context.WithCancelCause(ctx)
	g.ops[op] = struct{}{}
	return ctx, func() {
		g.mu.Lock()
		delete(g.ops, op)
		g.mu.Unlock()
		op.cancel(nil)
		close(op.done)
	}, nil
}

// Pause refuses new operations, stops the interruptible ones and waits
// until every running one has ended, or ctx is done (the gate stays
// paused: Resume undoes it). It returns how many it interrupted.
func (g *Gate) Pause(ctx context.Context) (int, error) {
	g.mu.Lock()
	g.paused = true
	var wait []chan struct{}
	n := 0
	for op := range g.ops {
		if op.interruptible {
			op.cancel(ErrUpgrading)
			n++
		}
		wait = append(wait, op.done)
	}
	g.mu.Unlock()
	for i, ch := range wait {
		select {
		case <-ch:
		case <-ctx.Done():
			return n, fmt.Errorf("control operations: %d of %d still running: %w", len(wait)-i, len(wait), ctx.Err())
		}
	}
	return n, nil
}

// Resume lets operations start again.
func (g *Gate) Resume() {
	g.mu.Lock()
	g.paused = false
	g.mu.Unlock()
}
