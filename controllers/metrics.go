package controllers

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// Metrics are the controller's Prometheus metrics.
type Metrics struct {
	Reconciles prometheus.Counter
	Finished   *prometheus.CounterVec
	Duration   prometheus.Histogram
	Downtime   prometheus.Histogram
	Bytes      prometheus.Counter
	DedupSaved prometheus.Counter
	DedupRatio prometheus.Histogram
	phases     *phaseCollector
}

// NewMetrics creates the metrics; reader serves the per-phase gauge at
// scrape time (the manager's cache).
func NewMetrics(reader ctrl.Reader) *Metrics {
	return &Metrics{
		Reconciles: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_controller_reconciles_total", Help: "VMMigration reconciles run by the controller.",
		}),
		Finished: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "xenferry_migrations_finished_total", Help: "VMMigrations that reached a final phase, by phase and reason.",
		}, []string{"phase", "reason"}),
		Duration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "xenferry_migration_duration_seconds", Help: "Total time of succeeded migrations.",
			Buckets: prometheus.ExponentialBuckets(0.25, 2, 12),
		}),
		Downtime: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "xenferry_migration_downtime_seconds", Help: "Downtime of succeeded migrations.",
			Buckets: prometheus.ExponentialBuckets(0.001, 2, 14),
		}),
		Bytes: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_migration_wire_bytes_total", Help: "Bytes sent on the wire by succeeded migrations.",
		}),
		DedupSaved: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "xenferry_migration_dedup_saved_bytes_total", Help: "Bytes not sent thanks to disk references.",
		}),
		DedupRatio: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "xenferry_migration_dedup_ratio", Help: "Share of guest memory sent as disk references, per succeeded migration.",
			Buckets: prometheus.LinearBuckets(0, 0.1, 11),
		}),
		phases: &phaseCollector{reader: reader, desc: prometheus.NewDesc(
			"xenferry_migrations", "VMMigrations by phase.", []string{"phase"}, nil)},
	}
}

// Register adds every metric to reg.
func (m *Metrics) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.Reconciles, m.Finished, m.Duration, m.Downtime, m.Bytes, m.DedupSaved, m.DedupRatio, m.phases} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}

func (m *Metrics) observeFinal(mig *v1.VMMigration) {
	reason := ""
	for _, c := range mig.Status.Conditions {
		if c.Type == v1.CompletedCondition {
			reason = c.Reason
		}
	}
	m.Finished.WithLabelValues(string(mig.Status.Phase), reason).Inc()
	res := mig.Status.Result
	if mig.Status.Phase != v1.MigrationSucceeded || res == nil {
		return
	}
	m.Duration.Observe(res.TotalTime.Seconds())
	m.Downtime.Observe(res.Downtime.Seconds())
	m.Bytes.Add(float64(res.BytesSent))
	m.DedupSaved.Add(float64(res.DedupSavedBytes))
	if res.MemoryBytes > 0 {
		m.DedupRatio.Observe(float64(res.DedupSavedBytes) / float64(res.MemoryBytes))
	}
}

// phaseCollector counts VMMigrations by phase from the cache at scrape time.
type phaseCollector struct {
	reader ctrl.Reader
	desc   *prometheus.Desc
}

func (c *phaseCollector) Describe(ch chan<- *prometheus.Desc) { ch <- c.desc }

func (c *phaseCollector) Collect(ch chan<- prometheus.Metric) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	var l v1.VMMigrationList
	if err := c.reader.List(ctx, &l); err != nil {
		ch <- prometheus.NewInvalidMetric(c.desc, err)
		return
	}
	phases := []v1.VMMigrationPhase{v1.MigrationPending, v1.MigrationScheduling, v1.MigrationPreparingTarget, v1.MigrationTargetReady,
		v1.MigrationPreCopy, v1.MigrationStopAndCopy, v1.MigrationPostCopy, v1.MigrationSucceeded, v1.MigrationFailed, v1.MigrationCancelled}
	counts := make([]int, len(phases))
	for i := range l.Items {
		for j, p := range phases {
			if l.Items[i].Status.Phase == p {
				counts[j]++
			}
		}
	}
	for j, p := range phases {
		ch <- prometheus.MustNewConstMetric(c.desc, prometheus.GaugeValue, float64(counts[j]), string(p))
	}
}
