package agent

import (
	"context"
	"errors"
	"flag"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
)

// The agent's Prometheus metrics, served beside controller-runtime's own by
// the agent's manager (--metrics-bind-address). Labels take values from
// small fixed sets only (roles, results, reasons, page classes, the host's
// disks), so every series is bounded whatever arrives from the network.
//
// The endpoint is protected like the controller's: HTTPS, and only callers
// whose bearer token the API server accepts (TokenReview) and who may GET
// /metrics (SubjectAccessReview, ClusterRole xenferry-metrics-reader); the
// RBAC markers for those two reviews are in node-agent/rbac.go.

const pageBytes = 4096

// Page classes, as engine.PageCounts counts them.
var pageClasses = []string{"full", "zero", "disk", "disk_fallback", "resent", "demand"}

// faultBuckets are the exported post-copy fault latency buckets: a demand
// fault served from the network takes one round trip (tens of µs on a LAN)
// plus queueing; seconds mean a stalled source.
var faultBuckets = []time.Duration{
	20 * time.Microsecond, 50 * time.Microsecond, 100 * time.Microsecond, 250 * time.Microsecond,
	500 * time.Microsecond, time.Millisecond, 2500 * time.Microsecond, 5 * time.Millisecond,
	10 * time.Millisecond, 25 * time.Millisecond, 100 * time.Millisecond, time.Second, 5 * time.Second,
}

type agentMetrics struct {
	migrations  *prometheus.CounterVec
	active      *prometheus.GaugeVec
	pageBytes   *prometheus.CounterVec
	wireBytes   prometheus.Counter
	dedupSaved  prometheus.Counter
	indexDone   *prometheus.GaugeVec
	indexTotal  *prometheus.GaugeVec
	heartbeat   prometheus.Gauge
	publishFail prometheus.Counter
	faults      *faultHistogram

	mu   sync.Mutex
	last map[string]engine.PageCounts // per running outgoing migration: pages already counted
	wire map[string]int64             // per running outgoing migration: wire bytes already counted
}

// telemetry is the agent process's metric set, registered with controller-runtime's
// registry (the one its manager serves).
var telemetry = newAgentMetrics(ctrlmetrics.Registry)

func newAgentMetrics(reg prometheus.Registerer) *agentMetrics {
	m := &agentMetrics{
		migrations: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xenferry_agent_migrations_total",
			Help: "Migration halves this agent finished, by role (source, target), result (succeeded, failed, held, discarded) and reason.",
		}, []string{"role", "result", "reason"}),
		active: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "xenferry_agent_migrations_active",
			Help: "Migration halves running on this agent, by role.",
		}, []string{"role"}),
		pageBytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xenferry_agent_page_bytes_total",
			Help: "Guest memory sent by outgoing migrations, in bytes of 4 KiB pages, by page class (full, zero, disk, disk_fallback, resent, demand).",
		}, []string{"class"}),
		wireBytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_agent_wire_bytes_total",
			Help: "Bytes outgoing migrations put on the wire (records, after compression and dedup).",
		}),
		dedupSaved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_agent_dedup_saved_bytes_total",
			Help: "Bytes outgoing migrations did not send because the destination read them from shared disks.",
		}),
		indexDone: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "xenferry_agent_dedup_index_built_bytes",
			Help: "Bytes of a disk indexed so far by the running (or last) dedup index build.",
		}, []string{"disk"}),
		indexTotal: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "xenferry_agent_dedup_index_size_bytes",
			Help: "Bytes to index in the running (or last) dedup index build of a disk.",
		}, []string{"disk"}),
		heartbeat: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "xenferry_agent_heartbeat_timestamp_seconds",
			Help: "Unix time of the agent's last successful XenHost heartbeat.",
		}),
		publishFail: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_agent_publish_failures_total",
			Help: "Failed publishes of the XenHost heartbeat and XenDomains.",
		}),
		faults: &faultHistogram{desc: prometheus.NewDesc("xenferry_agent_postcopy_fault_latency_seconds",
			"Post-copy demand fault latency at the destination, fault to page in place, of finished incoming migrations.", nil, nil),
			counts: make([]uint64, len(faultBuckets))},
		last: map[string]engine.PageCounts{},
		wire: map[string]int64{},
	}
	for _, c := range []prometheus.Collector{m.migrations, m.active, m.pageBytes, m.wireBytes, m.dedupSaved,
		m.indexDone, m.indexTotal, m.heartbeat, m.publishFail, m.faults} {
		reg.MustRegister(c)
	}
	for _, cl := range pageClasses {
		m.pageBytes.WithLabelValues(cl)
	}
	return m
}

// BindMetricsFlags adds the metrics endpoint's flags to `run`.
func BindMetricsFlags(fs *flag.FlagSet) {
	fs.StringVar(&metricsAddr, "metrics-bind-address", "0", "address of the Prometheus /metrics endpoint (0 disables)")
	fs.StringVar(&metricsCertDir, "metrics-cert-dir", "", "directory with tls.crt and tls.key for the metrics endpoint (empty: a self-signed certificate generated at start)")
	fs.BoolVar(&metricsSecure, "metrics-secure", true, "serve /metrics over HTTPS to authenticated, authorised callers; false serves plain HTTP to anyone (tests, local control plane)")
}

var (
	metricsAddr    = "0"
	metricsCertDir string
	metricsSecure  = true
)

// metricsServerOptions configures the agent manager's metrics endpoint.
func metricsServerOptions() metricsserver.Options {
	if metricsAddr == "0" || !metricsSecure {
		return metricsserver.Options{BindAddress: metricsAddr}
	}
	return metricsserver.Options{BindAddress: metricsAddr, SecureServing: true, CertDir: metricsCertDir,
		FilterProvider: filters.WithAuthenticationAndAuthorization}
}

// sourceProgress counts what an outgoing migration sent since its last
// report (Progress hook; PageCounts and WireBytes are cumulative).
func (m *agentMetrics) sourceProgress(key string, pr engine.Progress) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.countLocked(key, pr.Pages, pr.WireBytes)
}

func (m *agentMetrics) countLocked(key string, pc engine.PageCounts, wire int64) {
	prev, running := m.last[key]
	if !running {
		m.active.WithLabelValues("source").Inc()
	}
	now := []uint64{pc.Full, pc.Zero, pc.Disk, pc.DiskFallback, pc.Resent, pc.Demand}
	was := []uint64{prev.Full, prev.Zero, prev.Disk, prev.DiskFallback, prev.Resent, prev.Demand}
	for i, cl := range pageClasses {
		if now[i] > was[i] {
			m.pageBytes.WithLabelValues(cl).Add(float64((now[i] - was[i]) * pageBytes))
		}
	}
	if d := wire - m.wire[key]; d > 0 {
		m.wireBytes.Add(float64(d))
	}
	m.last[key], m.wire[key] = pc, max(wire, m.wire[key])
}

// sourceDone records an outgoing migration's outcome and forgets its
// running totals.
func (m *agentMetrics) sourceDone(key string, res engine.Result, err error) {
	m.mu.Lock()
	m.countLocked(key, res.Pages, res.WireBytes)
	delete(m.last, key)
	delete(m.wire, key)
	m.active.WithLabelValues("source").Dec()
	m.mu.Unlock()
	if res.DedupSavedBytes > 0 {
		m.dedupSaved.Add(float64(res.DedupSavedBytes))
	}
	switch {
	case err == nil && res.PostCopy:
		m.migrations.WithLabelValues("source", "succeeded", "postcopy").Inc()
	case err == nil:
		m.migrations.WithLabelValues("source", "succeeded", "precopy").Inc()
	case errors.Is(err, engine.ErrDiscarded):
		m.migrations.WithLabelValues("source", "discarded", "destination_discarded").Inc()
	case errors.Is(err, engine.ErrCommittedFailure):
		m.migrations.WithLabelValues("source", "held", "after_go").Inc()
	default:
		m.migrations.WithLabelValues("source", "failed", failureReason(err)).Inc()
	}
}

// targetEvent records the receiver's events for an incoming migration.
func (m *agentMetrics) targetEvent(ev engine.Event) {
	switch ev.Kind {
	case engine.EventPrepared:
		m.active.WithLabelValues("target").Inc()
	case engine.EventDone:
		m.active.WithLabelValues("target").Dec()
		m.migrations.WithLabelValues("target", "succeeded", "verified").Inc()
		m.faults.add(ev.Stats.FaultLatency)
	case engine.EventFailed:
		m.active.WithLabelValues("target").Dec()
		m.migrations.WithLabelValues("target", "failed", failureReason(ev.Err)).Inc()
		m.faults.add(ev.Stats.FaultLatency)
	case engine.EventDiscarded:
		m.active.WithLabelValues("target").Dec()
		m.migrations.WithLabelValues("target", "discarded", "verification_failed").Inc()
		m.faults.add(ev.Stats.FaultLatency)
	}
}

// failureReason maps an error to one of a fixed set of reasons.
func failureReason(err error) string {
	switch {
	case err == nil:
		return "aborted"
	case errors.Is(err, context.Canceled):
		return "canceled"
	case errors.Is(err, context.DeadlineExceeded):
		return "timeout"
	case errors.Is(err, engine.ErrProtocol):
		return "protocol"
	case errors.Is(err, engine.ErrRemote):
		return "remote"
	case errors.Is(err, engine.ErrInternal):
		return "internal"
	default:
		return "error"
	}
}

// indexProgress returns the dedup.Options.Progress callback for a disk.
func (m *agentMetrics) indexProgress(disk string) func(done, total int64) {
	d, t := m.indexDone.WithLabelValues(disk), m.indexTotal.WithLabelValues(disk)
	return func(done, total int64) {
		d.Set(float64(done))
		t.Set(float64(total))
	}
}

// published records the outcome of one publish (the heartbeat) and
// returns its error.
func (m *agentMetrics) published(err error) error {
	if err != nil {
		m.publishFail.Inc()
		return err
	}
	m.heartbeat.SetToCurrentTime()
	return nil
}

// faultHistogram accumulates the fault latency histograms of finished
// incoming migrations (each already bounded, fixed-size) into the exported
// buckets.
type faultHistogram struct {
	desc *prometheus.Desc

	mu     sync.Mutex
	counts []uint64 // cumulative, per faultBuckets
	sum    float64
	n      uint64
}

func (f *faultHistogram) add(h *postcopy.Histogram) {
	if h == nil || h.Count() == 0 {
		return
	}
	counts, sum, n := h.Cumulative(faultBuckets)
	f.mu.Lock()
	defer f.mu.Unlock()
	for i, c := range counts {
		f.counts[i] += c
	}
	f.sum += sum.Seconds()
	f.n += n
}

func (f *faultHistogram) Describe(ch chan<- *prometheus.Desc) { ch <- f.desc }

func (f *faultHistogram) Collect(ch chan<- prometheus.Metric) {
	f.mu.Lock()
	buckets := make(map[float64]uint64, len(faultBuckets))
	for i, u := range faultBuckets {
		buckets[u.Seconds()] = f.counts[i]
	}
	sum, n := f.sum, f.n
	f.mu.Unlock()
	ch <- prometheus.MustNewConstHistogram(f.desc, n, sum, buckets)
}
