package gateway

import (
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"sync"
	"time"

	"goldilocks/audit"
	"goldilocks/internal/nbdproto"
	"goldilocks/policy"
)

// Enforcement of the access policy (policy/FORMAT.md, "Enforcement"). The
// policy package decides; this file applies its decisions: at attach, per
// request (cheap checks only, no allocation), and to live sessions when
// the policy changes.

// repErrPolicy is NBD_REP_ERR_POLICY: the server refuses by policy.
const repErrPolicy = uint32(2 | 1<<31)

// grant is what an attached connection may do. Immutable: a policy reload
// replaces it whole.
type grant struct {
	identity string
	readOnly bool
	deny     uint16 // 1<<command for each command the grant refuses
	limits   []limit
	maxConns int
	reason   string
}

// limit is one token bucket a request draws on: one token per request, or
// one per payload byte.
type limit struct {
	b     *bucket
	bytes bool
}

type limKey struct {
	kind string // "identity" or "volume"
	name string
	byte bool
}

// policy is the policy in force, or nil to serve everything to everyone.
func (s *Server) policy() *policy.Policy {
	if s.cfg.Policy == nil {
		return nil
	}
	return s.cfg.Policy()
}

// limiter returns the shared bucket for key at this rate, keeping the one
// already there (and its tokens) if the rate has not changed.
func (s *Server) limiter(key limKey, rate float64, burst time.Duration) *bucket {
	s.limMu.Lock()
	defer s.limMu.Unlock()
	b := s.limiters[key]
	if b == nil || b.rate != rate || b.burstDur != burst {
		b = newBucket(rate, burst)
		s.limiters[key] = b
	}
	return b
}

// grantFor turns a decision into a grant, with its shared buckets.
func (s *Server) grantFor(d policy.Decision, identity, volume string) *grant {
	g := &grant{identity: identity, readOnly: d.ReadOnly, maxConns: d.MaxConns, reason: d.Reason}
	for cmd, bit := range map[uint16]policy.Commands{nbdproto.CmdTrim: policy.CmdTrim, nbdproto.CmdWriteZeroes: policy.CmdWriteZeroes, nbdproto.CmdCache: policy.CmdCache, nbdproto.CmdBlockStatus: policy.CmdBlockStatus} {
		if d.Commands&bit == 0 {
			g.deny |= 1 << cmd
		}
	}
	add := func(kind, name string, l policy.Limit) {
		if l.IOPS > 0 {
			g.limits = append(g.limits, limit{b: s.limiter(limKey{kind, name, false}, l.IOPS, l.Burst)})
		}
		if l.Bandwidth > 0 {
			g.limits = append(g.limits, limit{b: s.limiter(limKey{kind, name, true}, l.Bandwidth, l.Burst), bytes: true})
		}
	}
	add("identity", identity, d.Identity)
	add("volume", volume, d.Volume)
	return g
}

// permits is the one place a grant decides a command: 0, or EPERM for a
// write-type command under a read-only grant or a command the grant
// withholds. A nil grant (no policy) permits everything.
func (g *grant) permits(cmd uint16) uint32 {
	if g == nil {
		return 0
	}
	switch cmd {
	case nbdproto.CmdWrite, nbdproto.CmdTrim, nbdproto.CmdWriteZeroes:
		if g.readOnly {
			return nbdproto.ErrnoPerm
		}
	}
	if g.deny&(1<<cmd) != 0 {
		return nbdproto.ErrnoPerm
	}
	return 0
}

// labels returns an export's labels for the policy (nil if unknown).
func (s *Server) labels(name string) map[string]string {
	if l, ok := s.cfg.Exports.(Labeler); ok {
		labels, _ := l.Labels(name)
		return labels
	}
	list, err := s.cfg.Exports.List()
	if err != nil {
		return nil
	}
	for _, e := range list {
		if e.Name == name {
			return e.Labels
		}
	}
	return nil
}

// decision is the policy's answer for one export and this connection.
type decision struct {
	g        *grant // nil: allowed with no policy (or refused)
	identity string
	code     uint32 // 0: allowed; else the option reply code
	msg      string // for the client: short, no detail
	reason   string // for the log and the audit trail
}

// decide asks the policy about export name for this connection. With no
// policy everything is allowed with no limits (nil grant).
func (c *conn) decide(name string) decision {
	pol := c.srv.policy()
	if pol == nil {
		return decision{}
	}
	id := pol.Identify(&c.peer)
	d := pol.Decide(id, policy.Volume{Name: name, Labels: c.srv.labels(name)})
	switch {
	case !d.Allow:
		// A refusal's reason names the identity and the volume, never the
		// policy file or its rules: the client may see it.
		return decision{identity: id, code: repErrPolicy, msg: d.Reason, reason: d.Reason}
	case d.TLSRequired && !c.tls:
		return decision{identity: id, code: nbdproto.RepErrTLSReqd, msg: "this export is served over TLS only", reason: d.Reason + ", over TLS only"}
	}
	return decision{g: c.srv.grantFor(d, id, name), identity: id}
}

// tlsRequired reports whether this server refuses plaintext altogether.
func (c *conn) tlsRequired() bool {
	if c.srv.cfg.TLSRequired {
		return true
	}
	pol := c.srv.policy()
	return pol != nil && pol.TLSRequired
}

// visible reports whether NBD_OPT_LIST shows export name to this
// connection: only what it may attach.
func (c *conn) visible(pol *policy.Policy, id string, e ExportInfo) bool {
	if pol == nil {
		return true
	}
	d := pol.Decide(id, policy.Volume{Name: e.Name, Labels: e.Labels})
	return d.Allow && (!d.TLSRequired || c.tls)
}

// attach records an attached connection under its grant, enforcing the
// grant's connection limit. It returns a refusal message or "".
func (c *conn) attach(g *grant) string {
	return c.countAttach(g, true)
}

// countAttach is attach, enforcing the connection limit only if limit (an
// adopted connection is attached already: it is counted, never refused).
func (c *conn) countAttach(g *grant, limit bool) string {
	if g == nil {
		return ""
	}
	s := c.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	if limit && g.maxConns > 0 && s.idConns[g.identity] >= g.maxConns {
		return fmt.Sprintf("identity %s already has %d connections (max_connections %d)", g.identity, s.idConns[g.identity], g.maxConns)
	}
	s.idConns[g.identity]++
	c.counted, c.isCounted = g.identity, true
	c.grant.Store(g)
	return ""
}

// detach undoes attach's count; a second call does nothing.
func (c *conn) detach() {
	if !c.isCounted {
		return
	}
	c.isCounted = false
	s := c.srv
	s.mu.Lock()
	if s.idConns[c.counted]--; s.idConns[c.counted] <= 0 {
		delete(s.idConns, c.counted)
	}
	s.mu.Unlock()
}

// admit applies the grant to one validated request: read-only and
// allowed commands, then the rate limits (waiting if over). It returns 0
// or the NBD error. It allocates nothing.
func (c *conn) admit(r *request) uint32 {
	g := c.grant.Load()
	if g == nil {
		return 0
	}
	if errno := g.permits(r.typ); errno != 0 {
		return errno
	}
	if len(g.limits) == 0 {
		return 0
	}
	now := c.srv.clock.Now()
	var until int64
	for _, l := range g.limits {
		n := 1.0
		if l.bytes {
			n = 0
			if r.typ == nbdproto.CmdRead || r.typ == nbdproto.CmdWrite {
				n = float64(r.length)
			}
		}
		until = max(until, l.b.take(n, now))
	}
	if until > now {
		if wait := until - c.srv.clock.Precise(); wait > 0 {
			c.pause(time.Duration(wait))
			c.sm.waited(time.Duration(wait))
		}
	}
	return 0
}

// pause waits d, or less if the session is cut meanwhile. Only the reader
// goroutine calls it.
func (c *conn) pause(d time.Duration) {
	c.flushDeferred() // replies already done go out before we sleep
	if c.timer == nil {
		c.timer = time.NewTimer(d)
	} else {
		c.timer.Reset(d)
	}
	select {
	case <-c.timer.C:
	case <-c.cut:
		c.timer.Stop()
	}
}

// revoke cuts a live session: its connection closes at once.
func (c *conn) revoke(reason string) {
	c.cutOnce.Do(func() {
		c.srv.cfg.Metrics.note(sessionRevoked)
		c.log.Warn("access revoked: cutting the session", "event", audit.EvSessionRevoked, "reason", reason)
		close(c.cut)
		c.nc.Close()
	})
}

func (c *conn) expName() string {
	if c.exp == nil {
		return ""
	}
	return c.exp.Name
}

// Reauthorize decides every live session again under the policy now in
// force (after a reload): a session now denied, quarantined or over its
// TLS requirement is cut; the others get their new grant for their next
// request. It returns how many sessions were cut.
func (s *Server) Reauthorize() int {
	pol := s.policy()
	s.mu.Lock()
	var attached []*conn
	for c := range s.live {
		if c.grant.Load() != nil || (pol != nil && c.attached.Load()) {
			attached = append(attached, c)
		}
	}
	s.mu.Unlock()
	cut := 0
	for _, c := range attached {
		if pol == nil {
			c.grant.Store(nil)
			continue
		}
		d := c.decide(c.expName())
		if d.code != 0 {
			c.revoke(d.reason)
			cut++
			continue
		}
		c.grant.Store(d.g)
	}
	return cut
}

// peerTLS records the verified client certificate after STARTTLS.
func (c *conn) peerTLS(tc *tls.Conn) {
	c.peer.TLS = true
	if certs := tc.ConnectionState().PeerCertificates; len(certs) > 0 {
		c.peer.Cert = certs[0]
		c.log = c.log.With("cert", certName(certs[0]))
	}
}

// certName is how logs name a client certificate: its first URI SAN (a
// SPIFFE ID), else its first DNS SAN, else its common name.
func certName(c *x509.Certificate) string {
	switch {
	case len(c.URIs) > 0:
		return c.URIs[0].String()
	case len(c.DNSNames) > 0:
		return c.DNSNames[0]
	}
	return "CN=" + c.Subject.CommonName
}

// cutState is a session's revocation state.
type cutState struct {
	cut     chan struct{}
	cutOnce sync.Once
	timer   *time.Timer
}
