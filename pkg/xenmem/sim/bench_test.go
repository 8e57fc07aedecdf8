package sim

import (
	"sort"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// BenchmarkReadDirty measures one dirty-log round (PAGEMAP_SCAN read and
// re-protect) on a running domain. "idle" has no writes; "web" writes 30
// MiB/s (hot set 1/16 taking 90%) and lets 10 ms pass between rounds, like
// a short pre-copy round; the gap is not timed.
func BenchmarkReadDirty(b *testing.B) {
	requiresUffd(b)
	for _, bc := range []struct {
		name string
		mem  string
		prof Profile
		gap  time.Duration
	}{
		{"256Mi/idle", "256Mi", Profile{Zero: 1}, 0},
		{"256Mi/web", "256Mi", Profile{Zero: 1, DirtyMiBps: 30, HotFraction: 1.0 / 16, HotWriteShare: 0.9, Seed: 1}, 10 * time.Millisecond},
		{"1Gi/idle", "1Gi", Profile{Zero: 1}, 0},
		{"1Gi/web", "1Gi", Profile{Zero: 1, DirtyMiBps: 30, HotFraction: 1.0 / 16, HotWriteShare: 0.9, Seed: 1}, 10 * time.Millisecond},
	} {
		b.Run(bc.name, func(b *testing.B) {
			h := newTestHost(b, DomainSpec{Name: "vm", Memory: bc.mem, VCPUs: 2, Profile: bc.prof})
			d := mustDomain(b, h, "vm")
			if err := d.EnableDirtyLog(); err != nil {
				b.Fatal(err)
			}
			bm := xenmem.NewBitmap(d.NumPages())
			var pages uint64
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				if bc.gap > 0 {
					b.StopTimer()
					time.Sleep(bc.gap)
					b.StartTimer()
				}
				bm.Reset()
				if err := d.ReadDirty(bm); err != nil {
					b.Fatal(err)
				}
				pages += bm.Count()
			}
			b.ReportMetric(float64(pages)/float64(b.N), "dirtyPages/op")
		})
	}
}

// BenchmarkLazyFaultRoundTrip measures a missing-page fault end to end: a
// vCPU reads a missing page, the fault arrives on Faults(), the page is
// installed, and the vCPU's read completes. It reports p50/p99 of the
// fault-raised→installed time (what the engine's fault latency measures,
// minus the network) and of the whole round trip.
func BenchmarkLazyFaultRoundTrip(b *testing.B) {
	requiresUffd(b)
	h := newTestHost(b)
	tgt, err := h.CreateTarget(ctxT(b), xenmem.DomainInfo{Name: "vm", MemoryBytes: 256 << 20, VCPUs: 1})
	if err != nil {
		b.Fatal(err)
	}
	defer tgt.Destroy()
	d := mustDomain(b, h, "vm")
	lz, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages()))
	if err != nil {
		b.Fatal(err)
	}
	if err := tgt.Resume(); err != nil {
		b.Fatal(err)
	}
	data := patternPage(1)
	n := min(uint64(b.N), tgt.NumPages())
	serve := make([]time.Duration, 0, n)
	rtt := make([]time.Duration, 0, n)
	done := make(chan error, 1)
	b.ResetTimer()
	for pfn := uint64(0); pfn < n; pfn++ {
		start := time.Now()
		go func() { _, err := d.Probe(ctxT(b), pfn); done <- err }()
		f := <-lz.Faults()
		if err := lz.Install(f.PFN, data); err != nil {
			b.Fatal(err)
		}
		serve = append(serve, time.Duration(monoNow()-f.RaisedNanos))
		if err := <-done; err != nil {
			b.Fatal(err)
		}
		rtt = append(rtt, time.Since(start))
	}
	b.StopTimer()
	pct := func(ds []time.Duration, q float64) float64 {
		sort.Slice(ds, func(i, j int) bool { return ds[i] < ds[j] })
		return float64(ds[int(q*float64(len(ds)-1))].Microseconds())
	}
	b.ReportMetric(pct(serve, 0.5), "installP50us")
	b.ReportMetric(pct(serve, 0.99), "installP99us")
	b.ReportMetric(pct(rtt, 0.5), "roundTripP50us")
	b.ReportMetric(pct(rtt, 0.99), "roundTripP99us")
}
