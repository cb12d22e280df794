package gateway

import (
	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the gateway's Prometheus series. Counters are resolved per
// command once, so that counting a request allocates nothing. A nil
// *Metrics counts nothing.
type Metrics struct {
	connections prometheus.Gauge
	requests    [numCommands]prometheus.Counter
	bytes       [numCommands]prometheus.Counter
	errors      [numCommands]prometheus.Counter
}

// NewMetrics registers the gateway's series with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "goldilocks_nbd_connections", Help: "NBD connections open now.",
		}),
	}
	req := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "goldilocks_nbd_requests_total", Help: "NBD requests answered, by command.",
	}, []string{"command"})
	byt := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "goldilocks_nbd_bytes_total", Help: "Bytes read, written, trimmed or zeroed, by command.",
	}, []string{"command"})
	errs := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "goldilocks_nbd_errors_total", Help: "NBD requests answered with an error, by command.",
	}, []string{"command"})
	for i := range numCommands {
		name := commandName(uint16(i))
		m.requests[i] = req.WithLabelValues(name)
		m.bytes[i] = byt.WithLabelValues(name)
		m.errors[i] = errs.WithLabelValues(name)
	}
	reg.MustRegister(m.connections, req, byt, errs)
	return m
}

func (m *Metrics) connOpened() {
	if m != nil {
		m.connections.Inc()
	}
}

func (m *Metrics) connClosed() {
	if m != nil {
		m.connections.Dec()
	}
}

func (m *Metrics) request(cmd uint16, n int64, failed bool) {
	if m == nil || int(cmd) >= numCommands {
		return
	}
	m.requests[cmd].Inc()
	if failed {
		m.errors[cmd].Inc()
		return
	}
	if n > 0 {
		m.bytes[cmd].Add(float64(n))
	}
}
