package gateway

import (
	"net"
	"strconv"
	"sync"
	"time"

	"goldilocks/audit"
)

// Bounds on what a client can make the gateway spend before and around
// an attach (the request path has its own: MaxInflight, the grant's
// rates). Each is a Config field with a default:
//
//	MaxHandshakes   connections still negotiating, over all clients, and
//	MaxPeerHandshakes  per peer (uid or address): one beyond is closed at
//	                accept (a client that opens connections and never
//	                finishes the handshake holds at most this many
//	                goroutines and read buffers, for at most
//	                HandshakeTimeout each, and leaves the others room)
//	maxOptions      options in one handshake (endless options)
//	AttachRate      attaches a second per identity, with a burst of
//	                AttachBurst: beyond, an attach is refused, and the
//	                audit trail gets one record per identity per
//	                attachAuditEvery with the count of those it left out
//	ReplyTimeout    how long a reply may wait for a client that does not
//	                read (a slow reader): then the connection is closed
const (
	defaultMaxHandshakes     = 1024
	defaultMaxPeerHandshakes = 128
	maxOptions               = 256
	defaultAttachRate        = 50
	defaultAttachBurst       = 200
	defaultReplyTimeout      = time.Minute
	attachAuditEvery         = 10 * time.Second
)

// attachLimiter keeps the attach rate of each identity.
type attachLimiter struct {
	mu     sync.Mutex
	ids    map[string]*attachState
	pruned time.Time // the last sweep of idle identities (at most one a second)
	rate   float64
	cap    float64
}

type attachState struct {
	tokens     float64
	last       time.Time // tokens are as of last
	audited    time.Time // the last rate-limit record on the trail
	suppressed int       // refusals since, not on the trail
}

func newAttachLimiter(rate float64, burst int) *attachLimiter {
	return &attachLimiter{ids: make(map[string]*attachState), rate: rate, cap: float64(burst)}
}

// allow takes one attach for id. When it refuses, audit says whether this
// refusal goes on the audit trail, and suppressed how many before it did
// not.
func (l *attachLimiter) allow(id string, now time.Time) (ok, audit bool, suppressed int) {
	if l == nil || l.rate <= 0 {
		return true, false, 0
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	s := l.ids[id]
	if s == nil {
		if len(l.ids) >= 1<<14 && now.Sub(l.pruned) > time.Second { // forget the idle ones
			l.pruned = now
			for k, v := range l.ids {
				if now.Sub(v.last) > time.Minute {
					delete(l.ids, k)
				}
			}
		}
		s = &attachState{tokens: l.cap, last: now}
		l.ids[id] = s
	}
	s.tokens = min(l.cap, s.tokens+now.Sub(s.last).Seconds()*l.rate)
	s.last = now
	if s.tokens >= 1 {
		s.tokens--
		return true, false, 0
	}
	if now.Sub(s.audited) >= attachAuditEvery {
		n := s.suppressed
		s.audited, s.suppressed = now, 0
		return false, true, n
	}
	s.suppressed++
	return false, false, 0
}

// attachKey is who an attach counts against: the identity the policy
// gave, else the peer (a Unix socket's uid, a TCP client's address).
func (c *conn) attachKey(identity string) string {
	switch {
	case identity != "":
		return identity
	case c.peer.Unix:
		return "uid:" + strconv.FormatInt(c.peer.UID, 10)
	}
	host, _, err := net.SplitHostPort(c.addr)
	if err != nil {
		host = c.addr
	}
	return "addr:" + host
}

// rateRefused logs (and, at most once per attachAuditEvery per identity,
// audits) an attach refused by the attach rate.
func (c *conn) rateRefused(name, identity string, auditIt bool, suppressed int) {
	if !auditIt {
		c.log.Debug("attach refused: attach rate", "volume", name, "identity", identity)
		return
	}
	c.log.Warn("attach refused by policy", "event", audit.EvAttachRefused, "volume", name,
		"identity", identity, "decision", "deny", "reason", "attach rate limit", "suppressed", suppressed)
}

// overHandshakes says which bound a new connection of peer key would
// pass ("" if none). Callers hold s.mu.
func (s *Server) overHandshakes(key string) string {
	switch {
	case s.cfg.MaxHandshakes > 0 && s.handshaking.Load() >= int64(s.cfg.MaxHandshakes):
		return "max_handshakes"
	case s.cfg.MaxPeerHandshakes > 0 && s.peerShakes[key] >= s.cfg.MaxPeerHandshakes:
		return "max_peer_handshakes " + key
	}
	return ""
}

// handshakeDone ends c's count as negotiating (once).
func (c *conn) handshakeDone() {
	s := c.srv
	s.mu.Lock()
	defer s.mu.Unlock()
	if c.shakeKey == "" {
		return
	}
	s.handshaking.Add(-1)
	if s.peerShakes[c.shakeKey]--; s.peerShakes[c.shakeKey] <= 0 {
		delete(s.peerShakes, c.shakeKey)
	}
	c.shakeKey = ""
}

// noteOverflow logs a connection closed at accept because too many are
// negotiating, at most once a second (with the count since).
func (s *Server) noteOverflow(bound string) {
	s.ovMu.Lock()
	defer s.ovMu.Unlock()
	s.ovCount++
	if now := time.Now(); now.Sub(s.ovLast) >= time.Second {
		s.log.Warn("connections closed at accept: too many handshakes in progress", "bound", bound, "closed", s.ovCount)
		s.ovLast, s.ovCount = now, 0
	}
}

// ioErrorAuditEvery bounds the io_error records of one connection: a
// failing store must not flood the audit trail (every failure is logged).
const ioErrorAuditEvery = 10 * time.Second

// requestFailed logs a request the device failed; the first failure of a
// connection, then at most one every ioErrorAuditEvery (with the count of
// those between), also goes to the audit trail as io_error.
func (c *conn) requestFailed(r *request, errno uint32, err error) {
	c.errMu.Lock()
	now := time.Now()
	auditIt := now.Sub(c.errAudited) >= ioErrorAuditEvery
	suppressed := c.errSuppressed
	if auditIt {
		c.errAudited, c.errSuppressed = now, 0
	} else {
		c.errSuppressed++
	}
	c.errMu.Unlock()
	if !auditIt {
		c.log.Error("request failed", "cmd", commandName(r.typ), "offset", r.off, "length", r.length, "errno", errnoName(errno), "err", err)
		return
	}
	c.log.Error("request failed", "event", audit.EvIOError, "volume", c.expName(), "cmd", commandName(r.typ), "offset", r.off, "length", r.length,
		"errno", errnoName(errno), "err", err, "failures_since_last_record", suppressed)
}
