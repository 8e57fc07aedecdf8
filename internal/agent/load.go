package agent

// What the controllers plan drains and rebalancing with, measured here:
// the CPU each domain's vCPUs use (from the backend's cumulative vCPU
// time, exponentially averaged over about a minute), the memory the
// domains hold, their page-dirtying rate, and what a live migration of
// each domain would cost now (from a scan of its memory against its
// disks' dedup indexes).

import (
	"context"
	"errors"
	"math"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

const (
	// loadTau is the time constant of the agent's load averages.
	loadTau = time.Minute
	// minSampleGap: samples closer than this are skipped, so a burst of
	// publishes (kicks) does not feed the average clock-tick noise.
	minSampleGap = time.Second
	// refWireBytes is what one page sent as a disk reference costs on the
	// link (a DISK_REFS entry of pkg/wire).
	refWireBytes = 40
	// predictRounds bounds the pre-copy rounds a prediction counts, as
	// the engine's policies bound them.
	predictRounds = 5
	// predictStopPages: a round that dirties fewer pages ends pre-copy.
	predictStopPages = 50
	// minLinkSample: a migration that put fewer bytes on the link does not
	// measure the link (fixed costs dominate its time).
	minLinkSample = 32 << 20
	// scanBatchPages is what one read of a memory scan takes.
	scanBatchPages = 256
	// loadWriteGap is the least time between two status writes of a
	// XenDomain that only its load or predicted cost changed.
	loadWriteGap = 15 * time.Second
)

// Defaults of the load and prediction settings of Config.
const (
	DefaultLinkRate     = 1 << 30 // bytes/s
	DefaultScanInterval = 5 * time.Minute
	DefaultScanRate     = 256 << 20 // bytes/s
)

// counterRate turns a cumulative counter into an exponentially averaged
// rate per second.
type counterRate struct {
	last  float64
	at    time.Time
	rate  float64
	valid bool
}

// observe takes the counter's value v at now. A value below the last one
// means the counter restarted (the domain came back to this host): it
// becomes the new base, and the average keeps its value.
func (c *counterRate) observe(v float64, now time.Time) {
	if c.at.IsZero() || v < c.last {
		c.last, c.at = v, now
		return
	}
	dt := now.Sub(c.at)
	if dt < minSampleGap {
		return
	}
	r := (v - c.last) / dt.Seconds()
	if !c.valid {
		c.rate, c.valid = r, true
	} else {
		c.rate += (1 - math.Exp(-dt.Seconds()/loadTau.Seconds())) * (r - c.rate)
	}
	c.last, c.at = v, now
}

// domainUsage is what one domain uses, averaged.
type domainUsage struct {
	cpu    counterRate // CPU seconds per second
	writes counterRate // page writes per second
}

// usageMeter averages the domains' CPU and page writes between heartbeats.
type usageMeter struct {
	mu   sync.Mutex
	doms map[string]*domainUsage // by domain name; bounded by the domains of this host
}

func newUsageMeter() *usageMeter { return &usageMeter{doms: map[string]*domainUsage{}} }

// observe samples the domains listed now and forgets the others.
func (u *usageMeter) observe(doms []xenmem.DomainInfo, now time.Time) {
	u.mu.Lock()
	defer u.mu.Unlock()
	here := make(map[string]bool, len(doms))
	for _, d := range doms {
		here[d.Name] = true
		du := u.doms[d.Name]
		if du == nil {
			du = &domainUsage{}
			u.doms[d.Name] = du
		}
		du.cpu.observe(d.CPUTime.Seconds(), now)
		du.writes.observe(float64(d.PageWrites), now)
	}
	for name := range u.doms {
		if !here[name] {
			delete(u.doms, name)
		}
	}
}

// seed starts a domain's CPU average at millis when it has none yet: a
// domain that just arrived carries the average its source published, and
// starting from its first samples here (post-copy, when the guest mostly
// waits for pages) would show it far lighter than it is for a minute.
func (u *usageMeter) seed(name string, millis int64) {
	u.mu.Lock()
	defer u.mu.Unlock()
	du := u.doms[name]
	if du == nil {
		du = &domainUsage{}
		u.doms[name] = du
	}
	if !du.cpu.valid && millis > 0 {
		du.cpu.rate, du.cpu.valid = float64(millis)/1000, true
	}
}

// cpuMillis is a domain's averaged CPU in thousandths of a CPU.
func (u *usageMeter) cpuMillis(name string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	if du := u.doms[name]; du != nil && du.cpu.valid {
		return int64(math.Round(du.cpu.rate * 1000))
	}
	return 0
}

// dirtyRate is a domain's averaged page-dirtying rate in bytes per second
// (page writes × 4 KiB: an upper bound, a page written twice counts twice).
func (u *usageMeter) dirtyRate(name string) int64 {
	u.mu.Lock()
	defer u.mu.Unlock()
	if du := u.doms[name]; du != nil && du.writes.valid {
		return int64(du.writes.rate * xenmem.PageSize)
	}
	return 0
}

// hostLoad is the XenHost's status.load: the memory every domain here
// holds (incoming ones too: their memory is taken) and the sum of the
// domains' averaged CPU.
func (u *usageMeter) hostLoad(doms []xenmem.DomainInfo, now time.Time) *v1.HostLoad {
	l := &v1.HostLoad{Time: &metav1.Time{Time: now}}
	for _, d := range doms {
		if d.State == xenmem.StateShutdown {
			continue
		}
		l.MemoryUsedBytes += int64(d.MemoryBytes)
		l.CPUMillis += u.cpuMillis(d.Name)
	}
	return l
}

// scanCounts is what a scan of a domain's memory found.
type scanCounts struct {
	pages, zero, disk uint64
	time              time.Time // when the scan ended; zero: no scan (an estimate from the size)
}

// predictCost is what a live migration of a domain costs: full pages go
// whole, disk pages as references, zero pages not at all, then pre-copy
// rounds send what the guest dirtied during the previous one (dirtyRate
// bytes/s over the round's time at linkRate bytes/s), each round bounded
// by the domain's memory, at most predictRounds, until a round dirties
// fewer than predictStopPages. The time is the bytes at linkRate.
func predictCost(c scanCounts, dirtyRate, linkRate float64) (int64, time.Duration) {
	if linkRate <= 0 {
		linkRate = DefaultLinkRate
	}
	full := c.pages
	if c.zero+c.disk < full {
		full -= c.zero + c.disk
	} else {
		full = 0
	}
	round := float64(full)*xenmem.PageSize + float64(c.disk)*refWireBytes
	total := round
	mem := float64(c.pages) * xenmem.PageSize
	for i := 0; i < predictRounds && dirtyRate > 0; i++ {
		dirtied := math.Min(dirtyRate*round/linkRate, mem)
		total += dirtied
		if dirtied < predictStopPages*xenmem.PageSize {
			break
		}
		round = dirtied
	}
	return int64(total), time.Duration(total / linkRate * float64(time.Second))
}

// migrationCost is the XenDomain's status.predictedCost.
func migrationCost(c scanCounts, dirtyRate, linkRate int64) *v1.MigrationCost {
	bytes, d := predictCost(c, float64(dirtyRate), float64(linkRate))
	mc := &v1.MigrationCost{Bytes: bytes, Time: metav1.Duration{Duration: d.Round(time.Millisecond)},
		Pages: c.pages, ZeroPages: c.zero, DiskPages: c.disk, DirtyRate: dirtyRate, LinkRate: linkRate}
	if !c.time.IsZero() {
		mc.ScanTime = &metav1.Time{Time: c.time}
	}
	return mc
}

// costChanged says whether a new prediction is worth a status write: a
// new scan, or bytes or time off by a tenth.
func costChanged(old, cur *v1.MigrationCost) bool {
	if old == nil || cur == nil {
		return old != cur
	}
	// Times are stored to the second.
	if (old.ScanTime == nil) != (cur.ScanTime == nil) || old.ScanTime != nil && old.ScanTime.Unix() != cur.ScanTime.Unix() {
		return true
	}
	return off(old.Bytes, cur.Bytes) || off(int64(old.Time.Duration), int64(cur.Time.Duration)) || old.LinkRate != cur.LinkRate
}

// cpuChanged says whether a domain's CPU moved enough to be written:
// by a tenth, or by 50 millis.
func cpuChanged(old, cur int64) bool {
	d := old - cur
	if d < 0 {
		d = -d
	}
	return d >= 50 && off(old, cur)
}

func off(old, cur int64) bool {
	d := old - cur
	if d < 0 {
		d = -d
	}
	return d*10 > old || old == 0 && cur != 0
}

// errScanStopped: a scan stopped because the domain started to migrate
// (or left).
var errScanStopped = errors.New("scan stopped: the domain migrates")

// scanMemory reads a domain's memory through peek, at most rate bytes a
// second, and classifies each page against cat (nil: zero or full only).
// stop is asked between batches; when it says so the scan ends with
// errScanStopped.
func scanMemory(ctx context.Context, peek xenmem.MemoryPeeker, name string, pages uint64, cat *dedup.Catalog, rate int64, stop func() bool) (scanCounts, error) {
	c := scanCounts{pages: pages}
	buf := make([]byte, scanBatchPages*xenmem.PageSize)
	start := time.Now()
	for first := uint64(0); first < pages; first += scanBatchPages {
		if stop != nil && stop() {
			return c, errScanStopped
		}
		n := min(uint64(scanBatchPages), pages-first)
		b := buf[:n*xenmem.PageSize]
		if err := peek.PeekPages(ctx, name, first, b); err != nil {
			return c, err
		}
		for p := 0; p < len(b); p += xenmem.PageSize {
			page := b[p : p+xenmem.PageSize]
			if cat == nil {
				if dedup.IsZero(page) {
					c.zero++
				}
				continue
			}
			switch class, _, _ := cat.Classify(page); class {
			case dedup.ClassZero:
				c.zero++
			case dedup.ClassDisk:
				c.disk++
			}
		}
		if rate > 0 {
			due := time.Duration(float64(first+n) * xenmem.PageSize / float64(rate) * float64(time.Second))
			if wait := due - time.Since(start); wait > 0 {
				t := time.NewTimer(wait)
				select {
				case <-ctx.Done():
					t.Stop()
					return c, ctx.Err()
				case <-t.C:
				}
			}
		} else if err := ctx.Err(); err != nil {
			return c, err
		}
	}
	c.time = time.Now()
	return c, nil
}

// domainScan is the prediction state of one domain.
type domainScan struct {
	info     xenmem.DomainInfo // as last listed
	counts   scanCounts        // the last completed scan
	tried    time.Time         // when the last scan started
	failures int
}

// costPredictor keeps the last scan of each domain of this host and runs
// the scans, one at a time, off the heartbeat.
type costPredictor struct {
	mu   sync.Mutex
	doms map[string]*domainScan // by domain name; bounded by the domains of this host
	kick chan struct{}
}

func newCostPredictor() *costPredictor {
	return &costPredictor{doms: map[string]*domainScan{}, kick: make(chan struct{}, 1)}
}

// track records the domains listed now and forgets the others; a domain
// never scanned wakes the scanner.
func (p *costPredictor) track(doms []xenmem.DomainInfo) {
	p.mu.Lock()
	here := make(map[string]bool, len(doms))
	fresh := false
	for _, d := range doms {
		here[d.Name] = true
		ds := p.doms[d.Name]
		if ds == nil {
			ds = &domainScan{}
			p.doms[d.Name] = ds
			fresh = true
		}
		ds.info = d
	}
	for name := range p.doms {
		if !here[name] {
			delete(p.doms, name)
		}
	}
	p.mu.Unlock()
	if fresh {
		select {
		case p.kick <- struct{}{}:
		default:
		}
	}
}

// counts is a domain's last scan, or an estimate from its size (every
// page full) when it was never scanned.
func (p *costPredictor) counts(d xenmem.DomainInfo) scanCounts {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ds := p.doms[d.Name]; ds != nil && !ds.counts.time.IsZero() {
		return ds.counts
	}
	return scanCounts{pages: d.MemoryBytes / xenmem.PageSize}
}

// next picks the domain to scan now: one that runs here, is not being
// migrated (ok says so), was never scanned or not for interval, most
// overdue first; after failures it waits longer.
func (p *costPredictor) next(now time.Time, interval time.Duration, ok func(xenmem.DomainInfo) bool) (xenmem.DomainInfo, bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	var best *domainScan
	for _, ds := range p.doms {
		if ds.info.State != xenmem.StateRunning {
			continue
		}
		wait := interval << min(ds.failures, 4)
		if ds.failures == 0 && ds.counts.time.IsZero() {
			wait = 0
		}
		if !ds.tried.IsZero() && now.Sub(ds.tried) < wait {
			continue
		}
		if !ok(ds.info) {
			continue
		}
		if best == nil || ds.tried.Before(best.tried) {
			best = ds
		}
	}
	if best == nil {
		return xenmem.DomainInfo{}, false
	}
	best.tried = now
	return best.info, true
}

// done records a scan's outcome.
func (p *costPredictor) done(name string, c scanCounts, err error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ds := p.doms[name]
	if ds == nil {
		return
	}
	switch {
	case err == nil:
		ds.counts, ds.failures = c, 0
	case errors.Is(err, errScanStopped):
		ds.tried = time.Time{} // not a failure: scan again once it is back
	default:
		ds.failures++
	}
}

// predictLoop scans the domains' memory for their predicted cost until
// ctx ends: each domain when it is found, then every ScanInterval, one at
// a time, never one that migrates; a backend that cannot peek at memory
// is never scanned (the prediction assumes every page full).
func (a *Agent) predictLoop(ctx context.Context) {
	peek, ok := a.host.(xenmem.MemoryPeeker)
	if !ok {
		<-ctx.Done() // Run ends when any of its loops returns
		return
	}
	t := time.NewTicker(10 * time.Second)
	defer t.Stop()
	for {
		for ctx.Err() == nil {
			d, ok := a.costs.next(time.Now(), a.cfg.ScanInterval, a.scannable)
			if !ok {
				break
			}
			a.scanOne(ctx, peek, d)
		}
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		case <-a.costs.kick:
		}
	}
}

// scannable: the domain does not migrate and each of its disks' index is
// settled (ready, or failed), so the scan sees the dedup a migration
// would get.
func (a *Agent) scannable(d xenmem.DomainInfo) bool {
	if a.migratingOut(d.Name) {
		return false
	}
	for _, disk := range d.Disks {
		if !a.indexes.cached(disk.Path) && !a.indexer.failed(disk.Path) {
			return false
		}
	}
	return true
}

func (a *Agent) scanOne(ctx context.Context, peek xenmem.MemoryPeeker, d xenmem.DomainInfo) {
	var cat *dedup.Catalog
	if len(d.Disks) > 0 {
		ixs := make([]*dedup.Index, len(d.Disks))
		for i, disk := range d.Disks {
			ixs[i] = a.indexes.peek(disk.Path)
		}
		cat = dedup.NewCatalog(ixs...)
	}
	start := time.Now()
	c, err := scanMemory(ctx, peek, d.Name, d.MemoryBytes/xenmem.PageSize, cat, a.cfg.ScanBytesPerSec,
		func() bool { return a.migratingOut(d.Name) })
	a.costs.done(d.Name, c, err)
	switch {
	case err == nil:
		a.log.V(1).Info("Scanned domain memory for its migration cost", "domain", d.Name, "pages", c.pages,
			"zeroPages", c.zero, "diskPages", c.disk, "seconds", time.Since(start).Seconds())
		a.kickPublish()
	case ctx.Err() != nil, errors.Is(err, errScanStopped), errors.Is(err, xenmem.ErrNoDomain):
	default:
		a.log.Error(err, "Could not scan domain memory; its predicted cost assumes every page full", "domain", d.Name)
	}
}

// recordLinkRate keeps the throughput of an outbound migration that
// succeeded as the link rate of later predictions.
func (a *Agent) recordLinkRate(wireBytes int64, total time.Duration) {
	if wireBytes < minLinkSample || total <= 0 {
		return
	}
	a.linkRate.Store(int64(float64(wireBytes) / total.Seconds()))
}

// currentLinkRate is the measured link rate, else the configured one.
func (a *Agent) currentLinkRate() int64 {
	if r := a.linkRate.Load(); r > 0 {
		return r
	}
	return a.cfg.LinkRate
}

// predictedCost is a domain's status.predictedCost now.
func (a *Agent) predictedCost(d xenmem.DomainInfo) *v1.MigrationCost {
	return migrationCost(a.costs.counts(d), a.usage.dirtyRate(d.Name), a.currentLinkRate())
}
