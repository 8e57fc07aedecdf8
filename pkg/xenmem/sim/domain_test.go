package sim

import (
	"bytes"
	"context"
	"errors"
	"math"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

func TestProfileFractionsComeOutAsConfigured(t *testing.T) {
	spec := DomainSpec{
		Name: "vm", Memory: "64Mi", VCPUs: 1,
		Disks:   []DiskSpec{{ID: "xvda", Path: "vm.img", Size: "32Mi"}},
		Profile: Profile{Zero: 0.15, Disk: 0.45, Seed: 11}, // no workload: memory stays as built
	}
	h := newTestHost(t, spec)
	d := mustDomain(t, h, "vm")
	idx := diskIndex(t, d.Info().Disks[0].Path)
	seen := map[uint64]bool{}
	var zero, disk, other uint64
	mem := d.Memory()
	for pfn := uint64(0); pfn < d.NumPages(); pfn++ {
		p := page(mem, pfn)
		switch hsh := fnv64(p); {
		case isZeroPage(p):
			zero++
		case idx[hsh]:
			if seen[hsh] {
				t.Fatalf("pfn %d repeats a disk block already used: disk pages must come from distinct blocks", pfn)
			}
			seen[hsh] = true
			disk++
		default:
			other++
		}
	}
	n := float64(d.NumPages())
	t.Logf("pages: %d zero (%.4f), %d disk (%.4f), %d other (%.4f)", zero, float64(zero)/n, disk, float64(disk)/n, other, float64(other)/n)
	if want := uint64(math.Round(0.15 * n)); zero != want {
		t.Errorf("zero pages = %d, want %d", zero, want)
	}
	if want := uint64(math.Round(0.45 * n)); disk != want {
		t.Errorf("disk pages = %d, want %d", disk, want)
	}
	if d.Ops() != 0 {
		t.Errorf("a domain with zero rates did %d operations", d.Ops())
	}
}

func TestProfileNeedsALargeEnoughDisk(t *testing.T) {
	h := newTestHost(t)
	_, err := h.CreateDomain(ctxT(t), DomainSpec{
		Name: "vm", Memory: "8Mi", VCPUs: 1,
		Disks:   []DiskSpec{{ID: "xvda", Path: "small.img", Size: "1Mi"}},
		Profile: Profile{Disk: 0.5},
	})
	if err == nil || !bytesContains(err.Error(), "make the disk at least") {
		t.Fatalf("CreateDomain with a too small disk: %v", err)
	}
	if _, ok := h.Domain("vm"); ok {
		t.Fatal("failed CreateDomain left a domain behind")
	}
	info, _ := h.Info(ctxT(t))
	if info.FreeMemoryBytes != info.TotalMemoryBytes {
		t.Fatalf("failed CreateDomain leaked memory: free %d of %d", info.FreeMemoryBytes, info.TotalMemoryBytes)
	}
}

func bytesContains(s, sub string) bool { return bytes.Contains([]byte(s), []byte(sub)) }

func TestImageDomainCopiesTheImage(t *testing.T) {
	dir := t.TempDir()
	img := dir + "/mem.raw"
	if err := GenerateDisk(img, 4<<20, 5); err != nil {
		t.Fatal(err)
	}
	h := newTestHost(t)
	if _, err := h.CreateDomain(ctxT(t), DomainSpec{Name: "img", Memory: "4Mi", VCPUs: 1, Image: img}); err != nil {
		t.Fatal(err)
	}
	d := mustDomain(t, h, "img")
	want := diskIndex(t, img)
	for pfn := uint64(0); pfn < d.NumPages(); pfn++ {
		if !want[fnv64(page(d.Memory(), pfn))] {
			t.Fatalf("pfn %d is not from the image", pfn)
		}
	}
	if _, err := h.CreateDomain(ctxT(t), DomainSpec{Name: "bad", Memory: "8Mi", VCPUs: 1, Image: img}); err == nil || !bytesContains(err.Error(), "must be equal") {
		t.Fatalf("image of the wrong size: %v", err)
	}
}

func TestWorkloadRateRoughlyAsConfigured(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "64Mi", VCPUs: 2, Profile: Profile{Zero: 0.5, DirtyMiBps: 20, ReadMiBps: 40, Seed: 3}})
	d := mustDomain(t, h, "vm")
	w0, r0 := d.Counters()
	start := time.Now()
	time.Sleep(time.Second)
	w1, r1 := d.Counters()
	el := time.Since(start).Seconds()
	wRate := float64(w1-w0) / el / 256
	rRate := float64(r1-r0) / el / 256
	t.Logf("write rate %.2f MiB/s (want 20), read rate %.2f MiB/s (want 40)", wRate, rRate)
	if wRate < 20*0.85 || wRate > 20*1.15 {
		t.Errorf("write rate %.2f MiB/s, want 20 ±15%%", wRate)
	}
	if rRate < 40*0.85 || rRate > 40*1.15 {
		t.Errorf("read rate %.2f MiB/s, want 40 ±15%%", rRate)
	}
}

func TestHotSetTakesItsShareOfWrites(t *testing.T) {
	requiresUffd(t)
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "64Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 40, HotFraction: 1.0 / 16, HotWriteShare: 0.9, Seed: 9}})
	d := mustDomain(t, h, "vm")
	if err := d.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(300 * time.Millisecond)
	bm := xenmem.NewBitmap(d.NumPages())
	if err := d.ReadDirty(bm); err != nil {
		t.Fatal(err)
	}
	hs, hn := d.ctl.load64(offHotStart), d.ctl.load64(offHotPages)
	var in, out uint64
	for p := bm.Next(0); p < bm.Len(); p = bm.Next(p + 1) {
		if p >= hs && p < hs+hn {
			in++
		} else {
			out++
		}
	}
	// About 3000 writes: ~2700 land in 1024 hot pages (most of them get
	// hit), ~300 spread over 15360 cold pages. Compare the share of each
	// set that got dirty: uniform writes would give equal shares.
	hotShare, coldShare := float64(in)/float64(hn), float64(out)/float64(d.NumPages()-hn)
	t.Logf("dirty pages: %d of %d hot (%.3f), %d of %d cold (%.3f)", in, hn, hotShare, out, d.NumPages()-hn, coldShare)
	if hotShare < 10*coldShare || in > hn || out == 0 {
		t.Errorf("hot set not hot: %.3f of hot pages dirty, %.3f of cold ones", hotShare, coldShare)
	}
}

func TestPauseReallyStopsWrites(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "32Mi", VCPUs: 4, Profile: Profile{DirtyMiBps: 100, ReadMiBps: 100, Seed: 4}})
	d := mustDomain(t, h, "vm")
	time.Sleep(100 * time.Millisecond)
	for round := 0; round < 5; round++ {
		if err := d.Pause(); err != nil {
			t.Fatal(err)
		}
		ops := d.Ops()
		snap := append([]byte(nil), d.Memory()...)
		time.Sleep(100 * time.Millisecond)
		if got := d.Ops(); got != ops {
			t.Fatalf("round %d: %d operations while paused", round, got-ops)
		}
		if !bytes.Equal(snap, d.Memory()) {
			t.Fatalf("round %d: memory changed while paused", round)
		}
		if err := d.Resume(); err != nil {
			t.Fatal(err)
		}
		// The vCPUs run again: progress shows as soon as they get a CPU
		// (on a loaded 2-core machine that can take a while).
		deadline := time.Now().Add(5 * time.Second)
		for d.Ops() == ops && time.Now().Before(deadline) {
			time.Sleep(5 * time.Millisecond)
		}
		if d.Ops() == ops {
			t.Fatalf("round %d: no progress within 5s of Resume", round)
		}
	}
}

// TestDirtyLogIsExact copies memory like a pre-copy migration does (all
// pages, then the pages ReadDirty reports, round after round, while the guest
// writes at a high rate), pauses, copies the last round, and requires the copy
// to equal guest memory page for page: a write missed by the log would leave
// a stale page.
func TestDirtyLogIsExact(t *testing.T) {
	requiresUffd(t)
	for _, tc := range []struct {
		name string
		spec DomainSpec
	}{
		{"64 MiB, 2 vCPUs, 60 MiB/s, half the writes in a 5% hot set",
			DomainSpec{Name: "vm", Memory: "64Mi", VCPUs: 2, Profile: Profile{Zero: 0.3, DirtyMiBps: 60, HotFraction: 0.05, HotWriteShare: 0.5, Seed: 21}}},
		{"odd size (1025 pages), 4 vCPUs hammering 8 pages",
			DomainSpec{Name: "vm", Memory: "4100Ki", VCPUs: 4, Profile: Profile{DirtyMiBps: 40, HotFraction: 8.0 / 1025, HotWriteShare: 0.95, Seed: 22}}},
	} {
		t.Run(tc.name, func(t *testing.T) { testDirtyLogIsExact(t, tc.spec) })
	}
}

func testDirtyLogIsExact(t *testing.T, spec DomainSpec) {
	h := newTestHost(t, spec)
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	mem := src.Memory()
	n := src.NumPages()
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	cp := make([]byte, len(mem))
	copy(cp, mem) // round 0: everything, while the guest writes
	union := xenmem.NewBitmap(n)
	bm := xenmem.NewBitmap(n)
	var rounds, reported uint64
	copyDirty := func() {
		for p := bm.Next(0); p < n; p = bm.Next(p + 1) {
			copy(page(cp, p), page(mem, p))
		}
	}
	deadline := time.Now().Add(1500 * time.Millisecond)
	for time.Now().Before(deadline) {
		time.Sleep(time.Duration(rounds%7) * 3 * time.Millisecond)
		bm.Reset()
		if err := src.ReadDirty(bm); err != nil {
			t.Fatal(err)
		}
		union.Or(bm)
		reported += bm.Count()
		rounds++
		copyDirty()
	}
	time.Sleep(20 * time.Millisecond) // let the guest dirty pages for the final round
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	stale := append([]byte(nil), cp...) // the copy without the final round
	bm.Reset()
	if err := src.ReadDirty(bm); err != nil {
		t.Fatal(err)
	}
	union.Or(bm)
	copyDirty()
	var mismatch, staleMismatch uint64
	for p := uint64(0); p < n; p++ {
		if !bytes.Equal(page(cp, p), page(mem, p)) {
			mismatch++
			if mismatch < 5 {
				t.Errorf("pfn %d differs from the copy: a guest write was not reported (in union: %v)", p, union.Test(p))
			}
		}
		if !bytes.Equal(page(stale, p), page(mem, p)) {
			staleMismatch++
		}
	}
	writes, _ := mustDomain(t, h, "vm").Counters()
	t.Logf("%d rounds, %d pages reported (%d distinct), %d guest writes, final round %d pages; copy without the final round differs in %d pages",
		rounds, reported, union.Count(), writes, bm.Count(), staleMismatch)
	if mismatch != 0 {
		t.Fatalf("%d pages differ after the final round", mismatch)
	}
	if reported > writes {
		t.Errorf("log reported %d pages but the guest wrote only %d times", reported, writes)
	}
	if bm.Count() == 0 {
		t.Errorf("the final round reported nothing although the guest wrote for 20 ms before the pause")
	} else if staleMismatch == 0 {
		t.Errorf("the check is blind: skipping the final round left no stale page")
	}
	// After the final read, a paused domain has nothing dirty.
	bm.Reset()
	if err := src.ReadDirty(bm); err != nil || bm.Count() != 0 {
		t.Fatalf("paused domain reports %d dirty pages (%v)", bm.Count(), err)
	}
}

func TestSourceCloseResumesWhatItPaused(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "16Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 10, Seed: 1}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := h.OpenSource(ctxT(t), "vm"); err == nil {
		t.Fatal("second OpenSource on the same domain succeeded")
	}
	if got := src.Info().State; got != xenmem.StateMigrating {
		t.Fatalf("state while open = %s", got)
	}
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	ops := src.Ops()
	if err := src.Close(); err != nil {
		t.Fatal(err)
	}
	d := mustDomain(t, h, "vm")
	time.Sleep(50 * time.Millisecond)
	if d.Ops() == ops || d.Info().State != xenmem.StateRunning {
		t.Fatalf("domain not running after Close: state %s, ops %d → %d", d.Info().State, ops, d.Ops())
	}
	// A second migration attempt can log dirty pages again.
	src, err = h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatalf("EnableDirtyLog on a domain whose first migration was abandoned: %v", err)
	}
	time.Sleep(50 * time.Millisecond)
	bm := xenmem.NewBitmap(src.NumPages())
	if err := src.ReadDirty(bm); err != nil || bm.Count() == 0 {
		t.Fatalf("second dirty log: %d pages, %v", bm.Count(), err)
	}
	// Release destroys it and frees its memory.
	pid := d.PID()
	if err := src.Release(); err != nil {
		t.Fatal(err)
	}
	src.Close()
	if _, ok := h.Domain("vm"); ok {
		t.Fatal("released domain still listed")
	}
	// Release kills the guest at once and reaps it in the background.
	for deadline := time.Now().Add(5 * time.Second); syscallKill0(pid) == nil; time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("guest process %d still exists 5 s after Release", pid)
		}
	}
	info, _ := h.Info(ctxT(t))
	if info.FreeMemoryBytes != info.TotalMemoryBytes {
		t.Fatalf("free memory %d of %d after release", info.FreeMemoryBytes, info.TotalMemoryBytes)
	}
}

func TestHostAccountsMemoryAndNames(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "a", Memory: "256Mi", VCPUs: 1, Profile: Profile{Zero: 1}})
	info, err := h.Info(ctxT(t))
	if err != nil {
		t.Fatal(err)
	}
	if info.Backend != "sim" || info.TotalMemoryBytes != 4<<30 || info.FreeMemoryBytes != 4<<30-256<<20 {
		t.Fatalf("host info %+v", info)
	}
	if _, err := h.CreateDomain(ctxT(t), DomainSpec{Name: "a", Memory: "4Mi", VCPUs: 1}); !errors.Is(err, xenmem.ErrExists) {
		t.Fatalf("duplicate name: %v", err)
	}
	if _, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "b", MemoryBytes: 4 << 30, VCPUs: 1}); !errors.Is(err, xenmem.ErrNoMemory) {
		t.Fatalf("over capacity: %v", err)
	}
	if _, err := h.OpenSource(ctxT(t), "nope"); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Fatalf("unknown domain: %v", err)
	}
	ds, _ := h.Domains(ctxT(t))
	if len(ds) != 1 || ds[0].Name != "a" || ds[0].State != xenmem.StateRunning || ds[0].ID != 1 {
		t.Fatalf("domains %+v", ds)
	}
}

// TestSaveLoadStateContinuesTheWorkload moves a domain by hand (memory copy,
// SaveState, LoadState) and checks that the destination's vCPU performs
// exactly the writes the source would have performed next.
func TestSaveLoadStateContinuesTheWorkload(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "16Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 2, Seed: 5}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	time.Sleep(100 * time.Millisecond)
	if _, err := src.SaveState(); err == nil {
		t.Fatal("SaveState of a running domain succeeded")
	}
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	state, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	sd := mustDomain(t, h, "vm")
	savedWrites, _ := sd.Counters()
	w := sd.ctl.workload()
	rng := sd.ctl.load64(vcpuOff(0, vcWRNG))
	info := src.Info()

	dst := newTestHost(t)
	tgt, err := dst.CreateTarget(ctxT(t), info)
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	copy(tgt.Memory(), src.Memory())
	if tgt.Info().UUID != info.UUID || info.UUID == "" {
		t.Fatalf("target UUID %q, source %q: a migrated domain keeps its UUID", tgt.Info().UUID, info.UUID)
	}
	if err := tgt.LoadState(state[:len(state)-1]); !errors.Is(err, ErrBadState) {
		t.Fatalf("truncated state accepted: %v", err)
	}
	if err := tgt.LoadState(state); err != nil {
		t.Fatal(err)
	}
	if tgt.Ops() != src.Ops() {
		t.Fatalf("ops after LoadState %d, source had %d", tgt.Ops(), src.Ops())
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	const k = 5
	td := mustDomain(t, dst, "vm")
	deadline := time.Now().Add(5 * time.Second)
	for wr, _ := td.Counters(); wr < savedWrites+k; wr, _ = td.Counters() {
		if time.Now().After(deadline) {
			t.Fatalf("destination did not write: %d writes, want %d", wr, savedWrites+k)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := td.Pause(); err != nil {
		t.Fatal(err)
	}
	for i := uint64(0); i < k; i++ {
		pfn := w.pick(&rng)
		want := make([]byte, xenmem.PageSize)
		w.stamp(want, 0, savedWrites+i)
		off := stampOffset(savedWrites + i)
		if got := page(tgt.Memory(), pfn)[off : off+48]; !bytes.Equal(got, want[off:off+48]) {
			t.Fatalf("write %d after migration: pfn %d slot %d does not hold the predicted stamp", savedWrites+i, pfn, off)
		}
	}
}

func syscallKill0(pid int) error { return killZero(pid) }

var _ = context.Background

func TestHandlesFailCleanlyAfterHostClose(t *testing.T) {
	h := newTestHost(t, DomainSpec{Name: "vm", Memory: "4Mi", VCPUs: 1, Profile: Profile{DirtyMiBps: 1}})
	src, err := h.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "in", MemoryBytes: 4 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
	if err := src.EnableDirtyLog(); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Errorf("EnableDirtyLog after host close: %v", err)
	}
	if err := src.Pause(); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Errorf("Pause after host close: %v", err)
	}
	if _, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages())); err == nil {
		t.Error("StartLazy after host close succeeded")
	}
	if err := tgt.Resume(); !errors.Is(err, xenmem.ErrNoDomain) {
		t.Errorf("Resume after host close: %v", err)
	}
	_ = src.Ops()
	if err := src.Close(); err != nil {
		t.Errorf("source Close after host close: %v", err)
	}
	if err := tgt.Close(); err != nil {
		t.Errorf("target Close after host close: %v", err)
	}
	if _, err := h.CreateDomain(ctxT(t), DomainSpec{Name: "x", Memory: "4Mi", VCPUs: 1}); err == nil {
		t.Error("CreateDomain on a closed host succeeded")
	}
}

// TestTargetWritePages: runs and scattered pages land where they belong,
// read back through the mapping and through the guest (Probe); bad calls
// are refused.
func TestTargetWritePages(t *testing.T) {
	requiresUffd(t)
	h := newTestHost(t)
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "w", MemoryBytes: 4 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Destroy()
	pfns := []uint64{3, 4, 5, 9, 1023, 0}
	data := make([]byte, len(pfns)*xenmem.PageSize)
	for i := range pfns {
		for k := 0; k < xenmem.PageSize; k++ {
			data[i*xenmem.PageSize+k] = byte(int(pfns[i]) + k*31)
		}
	}
	if err := tgt.WritePages(pfns, data); err != nil {
		t.Fatalf("WritePages: %v", err)
	}
	mem := tgt.Memory()
	for i, p := range pfns {
		if !bytes.Equal(page(mem, p), data[i*xenmem.PageSize:(i+1)*xenmem.PageSize]) {
			t.Errorf("pfn %d: content differs", p)
		}
	}
	if !bytes.Equal(page(mem, 6), make([]byte, xenmem.PageSize)) {
		t.Errorf("pfn 6 was not written and should read as zero")
	}
	if err := tgt.WritePages([]uint64{1024}, data[:xenmem.PageSize]); err == nil {
		t.Errorf("WritePages beyond the last page: no error")
	}
	if err := tgt.WritePages([]uint64{1, 2}, data[:xenmem.PageSize]); err == nil {
		t.Errorf("WritePages with too little data: no error")
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := tgt.WritePages([]uint64{7}, data[:xenmem.PageSize]); err == nil {
		t.Errorf("WritePages after Resume: no error")
	}
}

// TestSourceReadPages: ReadPages returns what the mapping holds, for a run
// in the middle and one ending at the last page, and refuses bad ranges.
func TestSourceReadPages(t *testing.T) {
	requiresUffd(t)
	h := newTestHost(t, DomainSpec{Name: "r", Memory: "4Mi", VCPUs: 1, Profile: Profile{Zero: 0.2, Seed: 5}})
	src, err := h.OpenSource(ctxT(t), "r")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	mem := src.Memory()
	for _, r := range []struct{ first, n uint64 }{{0, 1}, {17, 100}, {src.NumPages() - 5, 5}} {
		buf := make([]byte, r.n*xenmem.PageSize)
		if err := src.ReadPages(r.first, buf); err != nil {
			t.Fatalf("ReadPages(%d, %d pages): %v", r.first, r.n, err)
		}
		if !bytes.Equal(buf, mem[r.first*xenmem.PageSize:(r.first+r.n)*xenmem.PageSize]) {
			t.Errorf("ReadPages(%d, %d pages) differs from the mapping", r.first, r.n)
		}
	}
	if err := src.ReadPages(src.NumPages()-1, make([]byte, 2*xenmem.PageSize)); err == nil {
		t.Error("ReadPages past the end: no error")
	}
	if err := src.ReadPages(0, make([]byte, 100)); err == nil {
		t.Error("ReadPages of a partial page: no error")
	}
}
