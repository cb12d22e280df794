package gateway

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"goldilocks/internal/nbdproto"
)

// Metrics are the gateway's Prometheus series. Per-request series carry
// two labels besides the command, the volume and the policy identity
// ("-" without a policy, never an address), so their number is bounded by
// volumes × identities. A session resolves its series once, at attach:
// counting a request then allocates nothing. A nil *Metrics counts
// nothing.
type Metrics struct {
	connections prometheus.Gauge
	requests    *prometheus.CounterVec
	bytes       *prometheus.CounterVec
	errors      *prometheus.CounterVec
	latency     *prometheus.HistogramVec
	inflight    *prometheus.GaugeVec
	throttled   *prometheus.CounterVec
	refused     *prometheus.CounterVec
	revoked     prometheus.Counter
	tlsFailures prometheus.Counter
}

// Reasons an attach is refused, the values of
// goldilocks_attaches_refused_total's label.
const (
	RefusedPolicy      = "policy"          // no rule grants it
	RefusedTLSRequired = "tls_required"    // the rule or the gateway needs TLS
	RefusedMaxConns    = "max_connections" // the identity's connection limit
	RefusedRate        = "attach_rate"     // the identity's attach rate (abuse.go)
	RefusedAudit       = "audit"           // the audit trail cannot record it
	RefusedUnknown     = "unknown_export"  // no such volume
	RefusedUnavailable = "unavailable"     // the volume does not open (key, storage)
)

// latencyBuckets span a page-cache hit (tens of µs) to a slow flush (s).
var latencyBuckets = []float64{25e-6, 50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2.5e-3, 5e-3, 10e-3, 25e-3, 50e-3, 100e-3, 250e-3, 500e-3, 1, 2.5}

// NewMetrics registers the gateway's series with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	labels := []string{"volume", "identity", "command"}
	m := &Metrics{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "goldilocks_nbd_connections", Help: "NBD connections open now.",
		}),
		requests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_nbd_requests_total", Help: "NBD requests answered, by volume, identity and command.",
		}, labels),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_nbd_bytes_total", Help: "Bytes read, written, trimmed, zeroed or cached, by volume, identity and command.",
		}, labels),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_nbd_errors_total", Help: "NBD requests answered with an error, by volume, identity and command.",
		}, labels),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "goldilocks_nbd_request_duration_seconds",
			Help:    "Time from a request's header to its reply being queued (read, write, flush), by volume and identity.",
			Buckets: latencyBuckets,
		}, labels),
		inflight: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "goldilocks_nbd_requests_in_flight", Help: "Requests read and not yet answered, by volume and identity.",
		}, []string{"volume", "identity"}),
		throttled: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_qos_throttled_seconds_total", Help: "Time requests waited for the policy's iops and bandwidth limits, by volume and identity.",
		}, []string{"volume", "identity"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_attaches_refused_total", Help: "Attaches refused, by reason.",
		}, []string{"reason"}),
		revoked: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "goldilocks_sessions_revoked_total", Help: "Live sessions cut by a policy reload.",
		}),
		tlsFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "goldilocks_tls_handshake_failures_total", Help: "TLS handshakes that failed.",
		}),
	}
	for _, r := range []string{RefusedPolicy, RefusedTLSRequired, RefusedMaxConns, RefusedRate, RefusedAudit, RefusedUnknown, RefusedUnavailable} {
		m.refused.WithLabelValues(r) // present at 0, for rate() and alerts
	}
	reg.MustRegister(m.connections, m.requests, m.bytes, m.errors, m.latency, m.inflight, m.throttled, m.refused, m.revoked, m.tlsFailures)
	return m
}

// sessionMetrics are one session's series, resolved at attach.
type sessionMetrics struct {
	requests, bytes, errors [nbdproto.NumCommands]prometheus.Counter
	latency                 [nbdproto.NumCommands]prometheus.Observer // read, write, flush only
	inflight                prometheus.Gauge
	throttled               prometheus.Counter
}

// session resolves the series of volume and identity.
func (m *Metrics) session(volume, identity string) *sessionMetrics {
	if m == nil {
		return nil
	}
	if identity == "" {
		identity = "-"
	}
	s := &sessionMetrics{
		inflight:  m.inflight.WithLabelValues(volume, identity),
		throttled: m.throttled.WithLabelValues(volume, identity),
	}
	for i := range nbdproto.NumCommands {
		name := commandName(uint16(i))
		s.requests[i] = m.requests.WithLabelValues(volume, identity, name)
		s.bytes[i] = m.bytes.WithLabelValues(volume, identity, name)
		s.errors[i] = m.errors.WithLabelValues(volume, identity, name)
		switch uint16(i) {
		case nbdproto.CmdRead, nbdproto.CmdWrite, nbdproto.CmdFlush:
			s.latency[i] = m.latency.WithLabelValues(volume, identity, name)
		}
	}
	return s
}

// gatewayEvent is something the gateway counts, once each time.
type gatewayEvent int

const (
	connOpened gatewayEvent = iota
	connClosed
	sessionRevoked
	tlsFailed
)

// note counts e.
func (m *Metrics) note(e gatewayEvent) {
	if m == nil {
		return
	}
	switch e {
	case connOpened:
		m.connections.Inc()
	case connClosed:
		m.connections.Dec()
	case sessionRevoked:
		m.revoked.Inc()
	case tlsFailed:
		m.tlsFailures.Inc()
	}
}

func (m *Metrics) attachRefused(reason string) {
	if m != nil {
		m.refused.WithLabelValues(reason).Inc()
	}
}

// inFlight adds delta to the requests in flight: +1 when one is read, -1
// when one will not be answered (request() takes the answered ones off).
func (s *sessionMetrics) inFlight(delta float64) {
	if s != nil {
		s.inflight.Add(delta)
	}
}

// request counts a finished request of cmd, begun at start.
func (s *sessionMetrics) request(cmd uint16, n int64, failed bool, start time.Time) {
	if s == nil || int(cmd) >= nbdproto.NumCommands {
		return
	}
	s.inflight.Dec()
	s.requests[cmd].Inc()
	if o := s.latency[cmd]; o != nil && !start.IsZero() {
		o.Observe(time.Since(start).Seconds())
	}
	if failed {
		s.errors[cmd].Inc()
		return
	}
	if n > 0 {
		s.bytes[cmd].Add(float64(n))
	}
}

// waited counts time a request spent waiting for a rate limit.
func (s *sessionMetrics) waited(d time.Duration) {
	if s != nil {
		s.throttled.Add(d.Seconds())
	}
}
