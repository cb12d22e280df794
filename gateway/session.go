package gateway

import (
	"math"
	"strconv"
	"sync/atomic"
	"time"

	"goldilocks/audit"
	"goldilocks/internal/nbdproto"
)

// Recorder puts events on the audit trail (audit.Log). Append fails when
// the event cannot be recorded: the gateway then refuses the attach (fail
// closed) unless Config.AuditContinue.
type Recorder interface {
	Append(audit.Event) error
}

// sessionStats are one connection's totals, for its detach record: per
// request one atomic add, on the connection's own cache lines.
type sessionStats struct {
	start  time.Time
	ops    [nbdproto.NumCommands]atomic.Uint64
	bytes  [nbdproto.NumCommands]atomic.Uint64
	errors atomic.Uint64
}

// count records one finished request in the metrics and the session.
func (c *conn) count(r *request, n int64, failed bool) {
	cmd := r.typ
	c.sm.request(cmd, n, failed, r.start)
	if int(cmd) >= nbdproto.NumCommands {
		return
	}
	c.stats.ops[cmd].Add(1)
	if failed {
		c.stats.errors.Add(1)
	} else if n > 0 {
		c.stats.bytes[cmd].Add(uint64(n))
	}
}

// who names the connection's other end for the audit trail: its policy
// identity, else its certificate or uid, else its address.
func (c *conn) who() string {
	if g := c.grant.Load(); g != nil && g.identity != "" {
		return g.identity
	}
	switch {
	case c.peer.Cert != nil:
		return certName(c.peer.Cert)
	case c.peer.Unix:
		return "uid:" + strconv.FormatInt(c.peer.UID, 10)
	}
	return c.addr
}

// recordAttach puts an allowed attach on the audit trail; an error means
// it could not, and the attach must be refused (fail closed).
func (c *conn) recordAttach(g *grant) error {
	rec := c.srv.cfg.Audit
	if rec == nil {
		return nil
	}
	reason := "no policy: every volume is served"
	d := map[string]any{"peer": c.addr, "tls": c.tls, "read_only": c.readOnly}
	if g != nil {
		reason = g.reason
	}
	if c.peer.Unix {
		d["uid"], d["pid"] = c.peer.UID, c.peer.PID
	}
	err := rec.Append(audit.Event{Type: audit.EvAttach, Identity: c.who(), Volume: c.exp.Name, Decision: "allow", Reason: reason, Details: d})
	c.recorded = err == nil
	if err != nil && c.srv.cfg.AuditContinue {
		c.log.Error("audit log unavailable; attaching anyway (audit on_failure: continue)", "err", err)
		return nil
	}
	return err
}

// recordDetach puts the session's totals on the audit trail.
func (c *conn) recordDetach() {
	rec := c.srv.cfg.Audit
	if rec == nil || !c.recorded {
		return
	}
	c.recorded = false
	s := &c.stats
	d := map[string]any{
		"ops_read": s.ops[nbdproto.CmdRead].Load(), "bytes_read": s.bytes[nbdproto.CmdRead].Load(),
		"ops_write": s.ops[nbdproto.CmdWrite].Load(), "bytes_written": s.bytes[nbdproto.CmdWrite].Load(),
		"ops_flush": s.ops[nbdproto.CmdFlush].Load(), "ops_trim": s.ops[nbdproto.CmdTrim].Load(),
		"ops_zero":  s.ops[nbdproto.CmdWriteZeroes].Load(),
		"ops_other": s.ops[nbdproto.CmdCache].Load() + s.ops[nbdproto.CmdBlockStatus].Load(),
		"errors":    s.errors.Load(), "seconds": 0.0,
	}
	if !s.start.IsZero() { // zero: the handshake was lost after the attach
		d["seconds"] = math.Round(time.Since(s.start).Seconds()*1000) / 1000 // ms
	}
	vol := c.volume
	if c.exp != nil {
		vol = c.exp.Name
	}
	if err := rec.Append(audit.Event{Type: audit.EvDetach, Identity: c.who(), Volume: vol, Details: d}); err != nil {
		c.log.Error("audit log unavailable: the detach is not on record", "err", err)
	}
}
