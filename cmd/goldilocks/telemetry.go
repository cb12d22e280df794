package main

import (
	"runtime"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"goldilocks/audit"
	"goldilocks/internal/volume"
)

// serveMetrics are the gateway-wide series beside the NBD ones of
// gateway.Metrics: what the audit trail records (integrity failures,
// policy reloads, key rotations, rekey progress, and the trail's own
// health), Vault's requests, and the volumes' key state. Events reach
// them through audit.Options.Observe, so a series and its audit record
// cannot disagree.
type serveMetrics struct {
	auditRecords  *prometheus.CounterVec
	auditFailures prometheus.Counter
	integrity     *prometheus.CounterVec
	reloads       *prometheus.CounterVec
	rotations     prometheus.Counter
	rekeyDone     *prometheus.GaugeVec
	rekeyTotal    *prometheus.GaugeVec
	vaultRequests *prometheus.CounterVec
	vaultErrors   *prometheus.CounterVec
	vaultUp       prometheus.Gauge
	outages       *prometheus.CounterVec
}

func newServeMetrics(reg prometheus.Registerer) *serveMetrics {
	m := &serveMetrics{
		auditRecords: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_audit_records_total", Help: "Records appended to the audit trail, by event type.",
		}, []string{"type"}),
		auditFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "goldilocks_audit_write_failures_total", Help: "Audit records that could not be written (the action was refused unless --audit-on-failure continue).",
		}),
		integrity: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_integrity_failures_total", Help: "Integrity failures (a tampered, rolled back or damaged store), by volume and kind.",
		}, []string{"volume", "kind"}),
		reloads: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_policy_reloads_total", Help: "Policy reloads, by result (ok, failed).",
		}, []string{"result"}),
		rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "goldilocks_key_rotations_total", Help: "Key-encryption keys rotated.",
		}),
		rekeyDone: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "goldilocks_rekey_done_bytes", Help: "Bytes of a running (or last) rekey re-encrypted so far, by volume.",
		}, []string{"volume"}),
		rekeyTotal: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "goldilocks_rekey_total_bytes", Help: "Bytes a running (or last) rekey re-encrypts in all, by volume.",
		}, []string{"volume"}),
		vaultRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_vault_requests_total", Help: "Requests to Vault, by operation.",
		}, []string{"op"}),
		vaultErrors: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_vault_errors_total", Help: "Requests to Vault that failed, by operation.",
		}, []string{"op"}),
		outages: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "goldilocks_backing_outages_total", Help: "Outages of an upstream backing store (requests waited while it reconnected), by volume.",
		}, []string{"volume"}),
		vaultUp: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "goldilocks_vault_up", Help: "1 while Vault answers (or is not used), 0 after a request found it unreachable, until one succeeds.",
		}),
	}
	m.vaultUp.Set(1)
	// The operations crypto.VaultKEK names (the first word of each
	// request's description), present at 0 for rate() and alerts.
	for _, op := range []string{"encrypt", "decrypt", "reading", "creating", "rotating", "listing", "looking", "storing", "destroying"} {
		m.vaultRequests.WithLabelValues(op)
		m.vaultErrors.WithLabelValues(op)
	}
	for _, r := range []string{"ok", "failed"} {
		m.reloads.WithLabelValues(r)
	}
	build := prometheus.NewGaugeVec(prometheus.GaugeOpts{
		Name: "goldilocks_build_info", Help: "Always 1: the running build's version and Go version.",
	}, []string{"version", "goversion"})
	build.WithLabelValues(buildVersion(), runtime.Version()).Set(1)
	reg.MustRegister(m.auditRecords, m.auditFailures, m.integrity, m.reloads, m.rotations,
		m.rekeyDone, m.rekeyTotal, m.vaultRequests, m.vaultErrors, m.vaultUp, m.outages, build)
	return m
}

// observeAudit counts an audit append and what its event says.
func (m *serveMetrics) observeAudit(e audit.Event, err error) {
	if err != nil {
		m.auditFailures.Inc()
		return
	}
	m.auditRecords.WithLabelValues(string(e.Type)).Inc()
	switch e.Type {
	case audit.EvIntegrityFailure:
		kind, _ := e.Details["kind"].(string)
		m.integrity.WithLabelValues(e.Volume, kind).Inc()
	case audit.EvPolicyReload:
		m.reloads.WithLabelValues("ok").Inc()
	case audit.EvPolicyReloadFailed:
		m.reloads.WithLabelValues("failed").Inc()
	case audit.EvKeyRotate:
		if e.Details["version"] != nil { // one record per rotated key
			m.rotations.Inc()
		}
	case audit.EvRekeyStart, audit.EvRekeyProgress, audit.EvRekeyFinish:
		done, okd := number(e.Details["cursor"])
		total, okt := number(e.Details["chunks"])
		if e.Type == audit.EvRekeyFinish && okt {
			done, okd = total, true
		}
		if okd && okt {
			m.rekeyDone.WithLabelValues(e.Volume).Set(done * 4096)
			m.rekeyTotal.WithLabelValues(e.Volume).Set(total * 4096)
		}
	case audit.EvBackingOutage:
		if e.Details["failed"] == nil { // the outage's start, not its limit
			m.outages.WithLabelValues(e.Volume).Inc()
		}
	case audit.EvVaultUnreachable:
		m.vaultUp.Set(0)
	case audit.EvVaultBack:
		m.vaultUp.Set(1)
		// The operations crypto.VaultKEK names (the first word of each
		// request's description), present at 0 for rate() and alerts.
		for _, op := range []string{"encrypt", "decrypt", "reading", "creating", "rotating", "listing", "looking", "storing", "destroying"} {
			m.vaultRequests.WithLabelValues(op)
			m.vaultErrors.WithLabelValues(op)
		}
	}
}

// observeVault counts a Vault request.
func (m *serveMetrics) observeVault(op string, err error) {
	m.vaultRequests.WithLabelValues(op).Inc()
	if err != nil {
		m.vaultErrors.WithLabelValues(op).Inc()
	}
}

func number(v any) (float64, bool) {
	switch n := v.(type) {
	case float64:
		return n, true
	case int64:
		return float64(n), true
	case uint64:
		return float64(n), true
	case int:
		return float64(n), true
	case uint32:
		return float64(n), true
	}
	return 0, false
}

// keyStateCollector exposes each encrypted volume's nonce budget left:
// the fraction of its seal space (2^32 epochs of 2^31 seals, FORMAT.md
// "Nonces") not yet used. Read from the volumes' headers at most every
// 30 s.
type keyStateCollector struct {
	keys   *volume.Keys
	desc   *prometheus.Desc
	mu     sync.Mutex
	at     time.Time
	cached []volume.KeyStatus
}

func newKeyStateCollector(keys *volume.Keys) *keyStateCollector {
	return &keyStateCollector{keys: keys, desc: prometheus.NewDesc("goldilocks_volume_nonce_budget_remaining_ratio",
		"Fraction of an encrypted volume's nonce space (2^32 seal epochs of 2^31 seals) not yet used.", []string{"volume"}, nil)}
}

func (c *keyStateCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *keyStateCollector) Collect(ch chan<- prometheus.Metric) {
	c.mu.Lock()
	if time.Since(c.at) > 30*time.Second {
		if st, err := c.keys.Status(); err == nil {
			c.cached, c.at = st, time.Now()
		}
	}
	st := c.cached
	c.mu.Unlock()
	const space = float64(1<<32) * float64(1<<31)
	for _, s := range st {
		used := float64(s.Seals) // epochs before the current count 2^31 each
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, 1-used/space, s.Volume)
	}
}

// mapCacheCollector reports the map-node cache the encrypted volumes
// share (serve --map-cache): how full it is and how often a lookup found
// its node there. A miss reads and hashes a 4 KiB node; a cache much
// smaller than the leaves a workload cycles through misses on most of
// them (crypto/cowmap/cache.go: sampled LRU).
type mapCacheCollector struct {
	reg                           *volume.Registry
	nodes, capacity, hits, misses *prometheus.Desc
}

func newMapCacheCollector(reg *volume.Registry) *mapCacheCollector {
	return &mapCacheCollector{
		reg:      reg,
		nodes:    prometheus.NewDesc("goldilocks_map_cache_nodes", "Chunk-map nodes (4 KiB each) in the map cache of the encrypted volumes.", nil, nil),
		capacity: prometheus.NewDesc("goldilocks_map_cache_capacity_nodes", "Chunk-map nodes the map cache holds at most (serve --map-cache).", nil, nil),
		hits:     prometheus.NewDesc("goldilocks_map_cache_hits_total", "Chunk-map node lookups served from the map cache.", nil, nil),
		misses:   prometheus.NewDesc("goldilocks_map_cache_misses_total", "Chunk-map node lookups that read and verified the node from the backing store.", nil, nil),
	}
}

func (c *mapCacheCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- c.nodes
	ch <- c.capacity
	ch <- c.hits
	ch <- c.misses
}

func (c *mapCacheCollector) Collect(ch chan<- prometheus.Metric) {
	mc := c.reg.MapCache()
	nodes, hits, misses := mc.Stats()
	ch <- prometheus.MustNewConstMetric(c.nodes, prometheus.GaugeValue, float64(nodes))
	ch <- prometheus.MustNewConstMetric(c.capacity, prometheus.GaugeValue, float64(mc.Capacity()))
	ch <- prometheus.MustNewConstMetric(c.hits, prometheus.CounterValue, float64(hits))
	ch <- prometheus.MustNewConstMetric(c.misses, prometheus.CounterValue, float64(misses))
}
