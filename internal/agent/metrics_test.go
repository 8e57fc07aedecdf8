package agent

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
)

// TestAgentMetrics drives the hook points the agent calls (Progress,
// the migration's outcome, receiver events, publish, index progress) and
// reads the exposition a scraper sees.
func TestAgentMetrics(t *testing.T) {
	reg := prometheus.NewRegistry()
	m := newAgentMetrics(reg)

	// Cumulative progress reports count each page once.
	m.sourceProgress("ns/a", engine.Progress{WireBytes: 1000, Pages: engine.PageCounts{Full: 10, Zero: 5}})
	m.sourceProgress("ns/a", engine.Progress{WireBytes: 3000, Pages: engine.PageCounts{Full: 12, Zero: 5, Disk: 4}})
	if got := testutil.ToFloat64(m.active.WithLabelValues("source")); got != 1 {
		t.Fatalf("active sources %v, want 1", got)
	}
	m.sourceDone("ns/a", engine.Result{WireBytes: 3500, DedupSavedBytes: 4 * 4096, PostCopy: true,
		Pages: engine.PageCounts{Full: 12, Zero: 5, Disk: 4, Demand: 3}}, nil)
	m.sourceDone("ns/b", engine.Result{}, fmt.Errorf("dial: %w", engine.ErrRemote))
	m.sourceDone("ns/c", engine.Result{}, fmt.Errorf("after go: %w", engine.ErrCommittedFailure))

	for class, pages := range map[string]float64{"full": 12, "zero": 5, "disk": 4, "demand": 3, "resent": 0} {
		if got := testutil.ToFloat64(m.pageBytes.WithLabelValues(class)); got != pages*4096 {
			t.Errorf("page bytes %s = %v, want %v", class, got, pages*4096)
		}
	}
	if got := testutil.ToFloat64(m.wireBytes); got != 3500 {
		t.Errorf("wire bytes %v, want 3500", got)
	}
	if got := testutil.ToFloat64(m.dedupSaved); got != 4*4096 {
		t.Errorf("dedup saved %v, want %v", got, 4*4096)
	}
	if got := testutil.ToFloat64(m.active.WithLabelValues("source")); got != 0 {
		t.Errorf("active sources after done %v, want 0", got)
	}
	for _, c := range []struct{ result, reason string }{{"succeeded", "postcopy"}, {"failed", "remote"}, {"held", "after_go"}} {
		if got := testutil.ToFloat64(m.migrations.WithLabelValues("source", c.result, c.reason)); got != 1 {
			t.Errorf("source %s/%s = %v, want 1", c.result, c.reason, got)
		}
	}

	// Incoming: a post-copy with three faults, then a discard.
	var h postcopy.Histogram
	for _, d := range []time.Duration{30 * time.Microsecond, 800 * time.Microsecond, 3 * time.Second} {
		h.Observe(d)
	}
	m.targetEvent(engine.Event{Kind: engine.EventPrepared})
	m.targetEvent(engine.Event{Kind: engine.EventDone, Stats: engine.ReceiveStats{FaultLatency: &h}})
	m.targetEvent(engine.Event{Kind: engine.EventPrepared})
	m.targetEvent(engine.Event{Kind: engine.EventDiscarded, Err: errors.New("verification failed")})
	if got := testutil.ToFloat64(m.active.WithLabelValues("target")); got != 0 {
		t.Errorf("active targets %v, want 0", got)
	}
	want := `
# HELP xenferry_agent_postcopy_fault_latency_seconds Post-copy demand fault latency at the destination, fault to page in place, of finished incoming migrations.
# TYPE xenferry_agent_postcopy_fault_latency_seconds histogram
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="2e-05"} 0
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="5e-05"} 1
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.0001"} 1
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.00025"} 1
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.0005"} 1
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.001"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.0025"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.005"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.01"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.025"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="0.1"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="1"} 2
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="5"} 3
xenferry_agent_postcopy_fault_latency_seconds_bucket{le="+Inf"} 3
xenferry_agent_postcopy_fault_latency_seconds_sum 3.001832
xenferry_agent_postcopy_fault_latency_seconds_count 3
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(want), "xenferry_agent_postcopy_fault_latency_seconds"); err != nil {
		t.Error(err)
	}
	if got := testutil.ToFloat64(m.migrations.WithLabelValues("target", "discarded", "verification_failed")); got != 1 {
		t.Errorf("target discarded = %v, want 1", got)
	}

	// Heartbeat and index progress.
	before := float64(time.Now().Unix())
	if err := m.published(nil); err != nil {
		t.Fatal(err)
	}
	if got := testutil.ToFloat64(m.heartbeat); got < before {
		t.Errorf("heartbeat %v, want >= %v", got, before)
	}
	if err := m.published(errors.New("api down")); err == nil {
		t.Error("published swallowed the error")
	}
	if got := testutil.ToFloat64(m.publishFail); got != 1 {
		t.Errorf("publish failures %v, want 1", got)
	}
	m.indexProgress("/srv/disk.img")(1<<20, 4<<20)
	if got := testutil.ToFloat64(m.indexDone.WithLabelValues("/srv/disk.img")); got != 1<<20 {
		t.Errorf("index built %v, want %v", got, 1<<20)
	}
	if n, err := testutil.GatherAndCount(reg); err != nil || n < 10 {
		t.Errorf("gathered %d series (err %v)", n, err)
	}
}
