package sim

import (
	"errors"
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

// BenchmarkLazyFaults measures the sim's share of post-copy fault latency:
// a 2-vCPU guest writes 8 MiB/s over a domain whose pages are all missing,
// and this goroutine serves every fault with Install, as the engine's
// fault loop does (without the network). It reports p50/p99 of
// fault read → page installed (Fault.RaisedNanos to Install's return) and
// the guest's write rate while faulting.
func BenchmarkLazyFaults(b *testing.B) {
	requiresUffd(b)
	h := newTestHost(b)
	tgt, err := h.CreateTarget(ctxT(b), xenmem.DomainInfo{Name: "vm", MemoryBytes: 256 << 20, VCPUs: 2})
	if err != nil {
		b.Fatal(err)
	}
	defer tgt.Destroy()
	d := mustDomain(b, h, "vm")
	d.SetRates(8, 0)
	lz, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages()))
	if err != nil {
		b.Fatal(err)
	}
	if err := tgt.Resume(); err != nil {
		b.Fatal(err)
	}
	data := patternPage(1)
	lat := make([]time.Duration, 0, b.N)
	start := time.Now()
	w0, _ := d.Counters()
	b.ResetTimer()
	for len(lat) < b.N {
		f := <-lz.Faults()
		err := lz.Install(f.PFN, data)
		if errors.Is(err, xenmem.ErrPageExists) {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Duration(monoNow()-f.RaisedNanos))
	}
	b.StopTimer()
	w1, _ := d.Counters()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "installP50us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "installP99us")
	b.ReportMetric(float64(w1-w0)/256/time.Since(start).Seconds(), "guestWriteMiBps")
}

// BenchmarkProbeMissingPage is the full round trip of one guest read of a
// missing page: Probe (vCPU 0 reads the page) → fault → Install → the read
// completes. Probe's own polling adds to it; see BenchmarkLazyFaults for
// the fault service alone.
func BenchmarkProbeMissingPage(b *testing.B) {
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
	go func() {
		for f := range lz.Faults() {
			_ = lz.Install(f.PFN, zeroPage)
		}
	}()
	ctx := ctxT(b)
	n := min(uint64(b.N), tgt.NumPages())
	rtt := make([]time.Duration, 0, n)
	b.ResetTimer()
	for pfn := uint64(0); pfn < n; pfn++ {
		start := time.Now()
		if _, err := d.Probe(ctx, pfn); err != nil {
			b.Fatal(err)
		}
		rtt = append(rtt, time.Since(start))
	}
	b.StopTimer()
	sort.Slice(rtt, func(i, j int) bool { return rtt[i] < rtt[j] })
	b.ReportMetric(float64(rtt[len(rtt)/2].Nanoseconds())/1e3, "roundTripP50us")
	b.ReportMetric(float64(rtt[len(rtt)*99/100].Nanoseconds())/1e3, "roundTripP99us")
}

// BenchmarkPause measures Pause (until every vCPU has acknowledged) and
// Resume on a 2-vCPU domain running 30 MiB/s of writes and 200 MiB/s of
// reads, with 2 ms of running between cycles (not timed).
func BenchmarkPause(b *testing.B) {
	h := newTestHost(b, DomainSpec{Name: "vm", Memory: "64Mi", VCPUs: 2, Profile: Profile{Zero: 1, DirtyMiBps: 30, ReadMiBps: 200, Seed: 1}})
	d := mustDomain(b, h, "vm")
	lat := make([]time.Duration, 0, b.N)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		time.Sleep(2 * time.Millisecond)
		b.StartTimer()
		start := time.Now()
		if err := d.Pause(); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		if err := d.Resume(); err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
	b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "pauseP50us")
	b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "pauseP99us")
}

// BenchmarkLazyFaultsUnderPush is post-copy without the network: a 1 GiB
// domain with every page missing runs the migbench "web" workload (30
// MiB/s of writes, 90% in a 1/16 hot set, 200 MiB/s of reads) while one
// goroutine pushes every page in pfn order and another serves faults ahead
// of it. It reports the fault latency (fault read → installed), the push
// time, the demand pages, and the workload's speed during the push
// relative to its configured rate. It runs once whatever b.N.
func BenchmarkLazyFaultsUnderPush(b *testing.B) {
	requiresUffd(b)
	{ // one migration whatever b.N: it takes about a second
		h := newTestHost(b)
		info := xenmem.DomainInfo{Name: "vm", MemoryBytes: 1 << 30, VCPUs: 2}
		tgt, err := h.CreateTarget(ctxT(b), info)
		if err != nil {
			b.Fatal(err)
		}
		d := mustDomain(b, h, "vm")
		d.ctl.store64(offHotPages, d.NumPages()/16)
		d.ctl.storeF(offHotShare, 0.9)
		d.SetRates(30, 200)
		lz, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages()))
		if err != nil {
			b.Fatal(err)
		}
		data := patternPage(3)
		var lat []time.Duration
		faultsDone := make(chan struct{})
		go func() {
			defer close(faultsDone)
			for f := range lz.Faults() {
				if err := lz.Install(f.PFN, data); err == nil {
					lat = append(lat, time.Duration(monoNow()-f.RaisedNanos))
				}
			}
		}()
		if err := tgt.Resume(); err != nil {
			b.Fatal(err)
		}
		start := time.Now()
		ops0 := d.Ops()
		for p := uint64(0); p < tgt.NumPages(); p++ {
			if err := lz.Install(p, data); err != nil && !errors.Is(err, xenmem.ErrPageExists) {
				b.Fatal(err)
			}
		}
		push := time.Since(start)
		opsRate := float64(d.Ops()-ops0) / push.Seconds()
		if err := lz.Close(); err != nil {
			b.Fatal(err)
		}
		<-faultsDone
		tgt.Destroy()
		h.Close()
		if len(lat) == 0 {
			b.Fatal("no faults")
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		b.ReportMetric(float64(lat[len(lat)/2].Nanoseconds())/1e3, "faultP50us")
		b.ReportMetric(float64(lat[len(lat)*99/100].Nanoseconds())/1e3, "faultP99us")
		b.ReportMetric(float64(len(lat)), "demandPages")
		b.ReportMetric(push.Seconds(), "pushSeconds")
		b.ReportMetric(opsRate/((30+200)*256), "workloadSpeed") // 1 = as configured
	}
}

// BenchmarkWritePages installs a fresh 256 MiB target domain's memory in
// batches of 64 pages, as the engine's receiver does before post-copy,
// through WritePages (pwrite on the memory file) and, for comparison,
// through stores into the agent's mapping.
func BenchmarkWritePages(b *testing.B) {
	const batch = 64
	for _, via := range []string{"pwrite", "mapping"} {
		b.Run(via, func(b *testing.B) {
			h := newTestHost(b)
			data := make([]byte, batch*xenmem.PageSize)
			for i := range data {
				data[i] = byte(i*7 + 1)
			}
			pfns := make([]uint64, batch)
			b.SetBytes(256 << 20)
			for i := 0; i < b.N; i++ {
				b.StopTimer()
				info := xenmem.DomainInfo{Name: "t", MemoryBytes: 256 << 20, VCPUs: 1}
				tgt, err := h.CreateTarget(ctxT(b), info)
				if err != nil {
					b.Fatal(err)
				}
				mem := tgt.Memory()
				b.StartTimer()
				for p := uint64(0); p < tgt.NumPages(); p += batch {
					for k := range pfns {
						pfns[k] = p + uint64(k)
					}
					if via == "pwrite" {
						if err := tgt.WritePages(pfns, data); err != nil {
							b.Fatal(err)
						}
					} else {
						copy(mem[p*xenmem.PageSize:], data)
					}
				}
				b.StopTimer()
				if err := tgt.Destroy(); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
		})
	}
}
