package postcopy

import (
	"context"
	"errors"
	"os"
	"slices"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// serveAll runs Serve over the given faults and returns the requests made.
func serveAll(t *testing.T, tr *Tracker, faults []xenmem.Fault) [][]uint64 {
	t.Helper()
	ch := make(chan xenmem.Fault, len(faults))
	for _, f := range faults {
		ch <- f
	}
	close(ch)
	var got [][]uint64
	if err := tr.Serve(context.Background(), ch, func(pfns []uint64) error {
		got = append(got, slices.Clone(pfns))
		return nil
	}); err != nil {
		t.Fatalf("Serve: %v", err)
	}
	return got
}

func TestServePrefetchSkipsPresentAndRequested(t *testing.T) {
	have := xenmem.NewBitmap(64)
	have.Set(11) // installed: never asked for
	tr := NewTracker(64, have, 3)
	now := Monotonic()
	got := serveAll(t, tr, []xenmem.Fault{
		{PFN: 10, RaisedNanos: now},
		{PFN: 12, RaisedNanos: now}, // requested as prefetch of 10: no new request
		{PFN: 11, RaisedNanos: now}, // present: ignored
		{PFN: 62, RaisedNanos: now}, // prefetch stops at the end of memory
		{PFN: 64, RaisedNanos: now}, // out of range: ignored
	})
	want := [][]uint64{{10, 12, 13, 14}, {62, 63}}
	if !slices.EqualFunc(got, want, slices.Equal) {
		t.Fatalf("requests = %v, want %v", got, want)
	}
	if tr.Faults() != 4 || tr.Requests() != 2 {
		t.Fatalf("faults %d requests %d, want 4 and 2", tr.Faults(), tr.Requests())
	}
}

func TestInstalledObservesOnlyWaitedPages(t *testing.T) {
	have := xenmem.NewBitmap(16)
	tr := NewTracker(16, have, 0)
	serveAll(t, tr, []xenmem.Fault{{PFN: 3, RaisedNanos: Monotonic() - int64(250*time.Microsecond)}})
	have.Set(3)
	tr.Installed(3)
	tr.Installed(3) // a second install report observes nothing
	have.Set(4)
	tr.Installed(4) // nobody waited for page 4
	h := tr.Latency()
	if h.Count() != 1 {
		t.Fatalf("latency observations = %d, want 1", h.Count())
	}
	if q := h.Quantile(0.5); q < 250*time.Microsecond || q > 100*time.Millisecond {
		t.Fatalf("p50 = %v, want about 250µs or more", q)
	}
}

func TestRerequestAfterBrokenConnection(t *testing.T) {
	have := xenmem.NewBitmap(32)
	tr := NewTracker(32, have, 2)
	now := Monotonic()
	serveAll(t, tr, []xenmem.Fault{{PFN: 5, RaisedNanos: now}, {PFN: 20, RaisedNanos: now}})
	have.Set(20)
	tr.Installed(20)
	// The connection carrying the requests broke: only the faulted page
	// still missing is asked again, and prefetched pages may be asked anew.
	if got := tr.Rerequest(nil); !slices.Equal(got, []uint64{5}) {
		t.Fatalf("Rerequest = %v, want [5]", got)
	}
	got := serveAll(t, tr, []xenmem.Fault{{PFN: 6, RaisedNanos: now}})
	if !slices.EqualFunc(got, [][]uint64{{6, 7, 8}}, slices.Equal) {
		t.Fatalf("after Rerequest: requests = %v, want [[6 7 8]]", got)
	}
}

func TestServeStopsOnRequestError(t *testing.T) {
	tr := NewTracker(8, xenmem.NewBitmap(8), 0)
	ch := make(chan xenmem.Fault, 1)
	ch <- xenmem.Fault{PFN: 1, RaisedNanos: Monotonic()}
	boom := errors.New("link down")
	if err := tr.Serve(context.Background(), ch, func([]uint64) error { return boom }); !errors.Is(err, boom) {
		t.Fatalf("Serve = %v, want %v", err, boom)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := tr.Serve(ctx, make(chan xenmem.Fault), nil); !errors.Is(err, context.Canceled) {
		t.Fatalf("Serve on a cancelled context = %v", err)
	}
}

func TestHistogramQuantiles(t *testing.T) {
	var h Histogram
	for i := 0; i < 98; i++ {
		h.Observe(40 * time.Microsecond)
	}
	h.Observe(3 * time.Millisecond)
	h.Observe(20 * time.Second)
	if q := h.Quantile(0.5); q != 41*time.Microsecond {
		t.Fatalf("p50 = %v, want 41µs (bucket upper bound)", q)
	}
	if q := h.Quantile(0.99); q != 3001*time.Microsecond {
		t.Fatalf("p99 = %v, want 3.001ms", q)
	}
	if q := h.Quantile(1); q != 10*time.Second {
		t.Fatalf("p100 = %v, want the overflow bound 10s", q)
	}
	var empty Histogram
	if empty.Quantile(0.99) != 0 {
		t.Fatal("empty histogram has a quantile")
	}
}

func TestMirrorRoundTripAndVerification(t *testing.T) {
	dir := t.TempDir()
	const n = 40
	m, err := CreateMirror(dir, "m1", n)
	if err != nil {
		t.Fatal(err)
	}
	pages := make([][]byte, n)
	hs := make([]dedup.Hash, n)
	for p := range pages {
		pages[p] = make([]byte, xenmem.PageSize)
		for i := range pages[p] {
			pages[p][i] = byte(p*7 + i)
		}
		hs[p] = dedup.HashPage(pages[p])
	}
	if err := m.WriteHashes(0, hs); err != nil {
		t.Fatal(err)
	}
	present := xenmem.NewBitmap(n)
	for _, p := range []uint64{1, 17, 39} {
		if err := m.WritePage(p, pages[p]); err != nil {
			t.Fatal(err)
		}
		present.Set(p)
	}
	// Not committed yet: the destination must not use it.
	if _, err := OpenMirror(dir, "m1", n); !errors.Is(err, ErrNoMirror) {
		t.Fatalf("OpenMirror before Commit = %v, want ErrNoMirror", err)
	}
	if err := m.Commit(present); err != nil {
		t.Fatal(err)
	}
	if err := m.Close(); err != nil {
		t.Fatal(err)
	}
	if _, err := OpenMirror(dir, "m1", n+1); !errors.Is(err, ErrNoMirror) {
		t.Fatalf("OpenMirror with the wrong size = %v, want ErrNoMirror", err)
	}
	o, err := OpenMirror(dir, "m1", n)
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, xenmem.PageSize)
	for _, p := range []uint64{1, 17, 39} {
		if err := o.ReadPage(p, buf); err != nil || !slices.Equal(buf, pages[p]) {
			t.Fatalf("page %d: err %v, equal %v", p, err, slices.Equal(buf, pages[p]))
		}
	}
	if o.Has(2) || o.ReadPage(2, buf) == nil {
		t.Fatal("the mirror serves a page it does not hold")
	}
	o.Close()

	// A corrupted page is refused, not installed.
	pf, _, _ := MirrorPaths(dir, "m1")
	f, err := os.OpenFile(pf, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0xff}, 17*xenmem.PageSize+100); err != nil {
		t.Fatal(err)
	}
	f.Close()
	o, err = OpenMirror(dir, "m1", n)
	if err != nil {
		t.Fatal(err)
	}
	defer o.Close()
	if err := o.ReadPage(17, buf); err == nil {
		t.Fatal("a corrupted mirror page was accepted")
	}
	RemoveMirror(dir, "m1")
	if _, err := OpenMirror(dir, "m1", n); !errors.Is(err, ErrNoMirror) {
		t.Fatalf("OpenMirror after RemoveMirror = %v", err)
	}
}
