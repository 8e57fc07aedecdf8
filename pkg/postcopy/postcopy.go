// Package postcopy is the destination side of early resume with lazy
// loading: it turns the guest's missing-page faults into demand requests
// (with a prefetch of the faulted page's neighbours), records when each
// faulted page arrives, and measures fault latency.
//
// The mechanism underneath is the backend's xenmem.Lazy (userfaultfd in the
// simulated host): a vCPU touching a missing page blocks in the kernel until
// the page is installed, by the demand path or by the background push,
// whichever comes first; installs are atomic per page, so a page is never
// installed twice and a page the guest wrote is never overwritten.
//
// Per-page state is bitmaps and flat arrays, never maps.
package postcopy

import (
	"context"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// DefaultPrefetch is how many following pages a demand request also asks
// for (spatial locality: guests touch neighbouring pages together).
const DefaultPrefetch = 7

// Tracker follows the lazy pages of one domain at the destination.
type Tracker struct {
	n         uint64
	have      *xenmem.Bitmap // installed pages (shared with the installer, atomic)
	requested *xenmem.Bitmap // pages asked for on the demand path
	raised    []int64        // per page: monotonic ns of the first unanswered fault, 0 if none
	prefetch  int
	batch     []uint64 // Handle's scratch
	hist      Histogram
	faults    atomic.Uint64
	requests  atomic.Uint64
}

// NewTracker returns a tracker for n pages. have is the installed-page
// bitmap the caller maintains with atomic operations (Installed is called
// after each first install).
func NewTracker(n uint64, have *xenmem.Bitmap, prefetch int) *Tracker {
	if prefetch < 0 {
		prefetch = 0
	}
	return &Tracker{n: n, have: have, requested: xenmem.NewBitmap(n), raised: make([]int64, n), prefetch: prefetch}
}

// Request asks the source for pages, ahead of the background push.
type Request func(pfns []uint64) error

// Serve turns faults into demand requests until faults is closed or ctx
// ends (see Handle).
func (t *Tracker) Serve(ctx context.Context, faults <-chan xenmem.Fault, request Request) error {
	for {
		var f xenmem.Fault
		var ok bool
		select {
		case f, ok = <-faults:
			if !ok {
				return nil
			}
		case <-ctx.Done():
			return ctx.Err()
		}
		if err := t.Handle(f, request); err != nil {
			return err
		}
	}
}

// Handle turns one fault into a demand request. A fault on a page
// already installed (a vCPU that raced the install) is ignored; a fault
// on a page already requested only records the time. The requested page
// comes first, then up to prefetch following pages that are neither
// installed nor requested. One goroutine at a time: the fault service's.
func (t *Tracker) Handle(f xenmem.Fault, request Request) error {
	if f.PFN >= t.n {
		return nil
	}
	t.faults.Add(1)
	if atest(t.have, f.PFN) {
		return nil
	}
	atomic.CompareAndSwapInt64(&t.raised[f.PFN], 0, f.RaisedNanos)
	if atest(t.have, f.PFN) { // installed meanwhile: account it now
		t.Installed(f.PFN)
		return nil
	}
	if !asetNew(t.requested, f.PFN) {
		return nil
	}
	batch := append(t.batch[:0], f.PFN)
	for p := f.PFN + 1; p < t.n && len(batch) <= t.prefetch; p++ {
		if atest(t.have, p) {
			continue
		}
		if asetNew(t.requested, p) {
			batch = append(batch, p)
		}
	}
	t.batch = batch
	t.requests.Add(1)
	return request(batch)
}

// Waited reports whether a vCPU faulted on pfn and it has not been
// installed since (its install is on someone's critical path).
func (t *Tracker) Waited(pfn uint64) bool {
	return pfn < t.n && atomic.LoadInt64(&t.raised[pfn]) != 0
}

// Installed records that pfn was installed; if a vCPU was waiting on it the
// fault's latency (raised → installed) is observed.
func (t *Tracker) Installed(pfn uint64) {
	if r := atomic.SwapInt64(&t.raised[pfn], 0); r != 0 {
		t.hist.Observe(time.Duration(Monotonic() - r))
	}
}

// Rerequest forgets every outstanding request (after the connection that
// carried them broke) and returns the faulted pages still waiting, to ask
// for again.
func (t *Tracker) Rerequest(dst []uint64) []uint64 {
	for i := range t.requested.Words() {
		atomic.StoreUint64(&t.requested.Words()[i], 0)
	}
	for p := uint64(0); p < t.n; p++ {
		if atomic.LoadInt64(&t.raised[p]) != 0 && !atest(t.have, p) {
			asetNew(t.requested, p)
			dst = append(dst, p)
		}
	}
	return dst
}

// Latency returns the fault-latency histogram.
func (t *Tracker) Latency() *Histogram { return &t.hist }

// Faults is the number of faults seen; Requests the demand requests sent.
func (t *Tracker) Faults() uint64   { return t.faults.Load() }
func (t *Tracker) Requests() uint64 { return t.requests.Load() }

// Monotonic is CLOCK_MONOTONIC in ns, the clock faults are stamped with.
func Monotonic() int64 {
	var ts unix.Timespec
	_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
	return ts.Nano()
}

func atest(b *xenmem.Bitmap, i uint64) bool {
	return atomic.LoadUint64(&b.Words()[i>>6])&(1<<(i&63)) != 0
}

func asetNew(b *xenmem.Bitmap, i uint64) bool {
	m := uint64(1) << (i & 63)
	return atomic.OrUint64(&b.Words()[i>>6], m)&m == 0
}

// Histogram is a fixed-size latency histogram: 1 µs buckets up to 10 ms,
// 1 ms buckets up to 10 s, one overflow bucket. Safe for concurrent use.
type Histogram struct {
	fine   [10000]atomic.Uint64
	coarse [10000]atomic.Uint64
	over   atomic.Uint64
	count  atomic.Uint64
}

// Observe adds one latency.
func (h *Histogram) Observe(d time.Duration) {
	h.count.Add(1)
	us := d.Microseconds()
	switch {
	case us < 0:
		h.fine[0].Add(1)
	case us < 10000:
		h.fine[us].Add(1)
	case us < 10000*1000:
		h.coarse[us/1000].Add(1)
	default:
		h.over.Add(1)
	}
}

// Count is the number of observations.
func (h *Histogram) Count() uint64 { return h.count.Load() }

// Cumulative folds the histogram into coarser buckets for export: counts[i]
// is the number of observations at or below upper[i] (upper ascending),
// sum their total and n their number, all at this histogram's bucket
// resolution (an observation counts as its bucket's upper edge, overflow
// as 10 s).
func (h *Histogram) Cumulative(upper []time.Duration) (counts []uint64, sum time.Duration, n uint64) {
	counts = make([]uint64, len(upper))
	add := func(edge time.Duration, c uint64) {
		if c == 0 {
			return
		}
		n += c
		sum += edge * time.Duration(c)
		for i, u := range upper {
			if edge <= u {
				counts[i] += c
			}
		}
	}
	for i := range h.fine {
		add(time.Duration(i+1)*time.Microsecond, h.fine[i].Load())
	}
	for i := range h.coarse {
		add(time.Duration(i+1)*time.Millisecond, h.coarse[i].Load())
	}
	add(10*time.Second, h.over.Load())
	return counts, sum, n
}

// Quantile returns the q-quantile (0 < q ≤ 1) at bucket resolution, 0 if empty.
func (h *Histogram) Quantile(q float64) time.Duration {
	n := h.count.Load()
	if n == 0 {
		return 0
	}
	rank := uint64(q*float64(n) + 0.5)
	if rank < 1 {
		rank = 1
	}
	var seen uint64
	for i := range h.fine {
		if seen += h.fine[i].Load(); seen >= rank {
			return time.Duration(i+1) * time.Microsecond
		}
	}
	for i := range h.coarse {
		if seen += h.coarse[i].Load(); seen >= rank {
			return time.Duration(i+1) * time.Millisecond
		}
	}
	return 10 * time.Second
}
