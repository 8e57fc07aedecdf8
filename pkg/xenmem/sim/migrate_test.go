package sim

import (
	"bytes"
	"errors"
	"testing"
	"time"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// TestHandMigrationPreThenPostCopy composes every piece the engine uses, by
// hand and without a network: two pre-copy rounds driven by the dirty log
// while the source writes, a switch-over (pause, SaveState, LoadState),
// then post-copy: the pages dirtied in the last round are missing on the
// destination, whose guest runs (reading, so it faults on them) while
// faults are served ahead of a push. At the end the destination's memory
// must equal the source's memory at the pause, page for page, and the
// destination's workload must have continued from the source's counters.
func TestHandMigrationPreThenPostCopy(t *testing.T) {
	requiresUffd(t)
	srcHost := newTestHost(t, DomainSpec{Name: "vm", Memory: "32Mi", VCPUs: 2,
		Disks:   []DiskSpec{{ID: "xvda", Path: "vm.img", Size: "16Mi"}},
		Profile: Profile{Zero: 0.2, Disk: 0.4, DirtyMiBps: 40, HotFraction: 1.0 / 16, HotWriteShare: 0.8, ReadMiBps: 60, Seed: 8}})
	dstHost := newTestHost(t)
	ctx := ctxT(t)

	src, err := srcHost.OpenSource(ctx, "vm")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	tgt, err := dstHost.CreateTarget(ctx, src.Info())
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	n := src.NumPages()
	smem, tmem := src.Memory(), tgt.Memory()

	// Pre-copy: everything, then what the log says, twice.
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	copy(tmem, smem)
	dirty := xenmem.NewBitmap(n)
	for round := 0; round < 2; round++ {
		time.Sleep(30 * time.Millisecond)
		dirty.Reset()
		if err := src.ReadDirty(dirty); err != nil {
			t.Fatal(err)
		}
		if round == 1 {
			break // these go post-copy
		}
		for p := dirty.Next(0); p < n; p = dirty.Next(p + 1) {
			copy(page(tmem, p), page(smem, p))
		}
	}
	// Switch-over.
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	last := xenmem.NewBitmap(n)
	if err := src.ReadDirty(last); err != nil {
		t.Fatal(err)
	}
	dirty.Or(last) // missing on the destination
	state, err := src.SaveState()
	if err != nil {
		t.Fatal(err)
	}
	final := append([]byte(nil), smem...) // the source at the pause
	present := xenmem.NewBitmap(n)
	present.SetAll()
	present.AndNot(dirty)
	if err := tgt.LoadState(state); err != nil {
		t.Fatal(err)
	}
	lz, err := tgt.StartLazy(present)
	if err != nil {
		t.Fatal(err)
	}
	td := mustDomain(t, dstHost, "vm")
	td.SetRates(0, 200) // read only, so memory stays comparable
	opsAtSwitch := src.Ops()
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	// Post-copy: faults first, then the next page of the push.
	var demand, pushed int
	install := func(p uint64) {
		err := lz.Install(p, page(final, p))
		if err != nil && !errors.Is(err, xenmem.ErrPageExists) {
			t.Fatal(err)
		}
	}
	for p := dirty.Next(0); p < n; p = dirty.Next(p + 1) {
		for drained := false; !drained; {
			select {
			case f := <-lz.Faults():
				if !dirty.Test(f.PFN) {
					t.Fatalf("fault on pfn %d, which was present", f.PFN)
				}
				install(f.PFN)
				demand++
			default:
				drained = true
			}
		}
		install(p)
		pushed++
		time.Sleep(50 * time.Microsecond) // a link, roughly: let the guest fault
	}
	if err := lz.Close(); err != nil {
		t.Fatal(err)
	}
	if err := src.Release(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(20 * time.Millisecond)
	if err := td.Pause(); err != nil {
		t.Fatal(err)
	}
	t.Logf("%d pages post-copy (%d by demand), destination ops %d → %d", pushed, demand, opsAtSwitch, td.Ops())
	for p := uint64(0); p < n; p++ {
		if !bytes.Equal(page(tmem, p), page(final, p)) {
			t.Fatalf("pfn %d differs from the source at the pause (missing=%v)", p, dirty.Test(p))
		}
	}
	if td.Ops() <= opsAtSwitch {
		t.Fatalf("destination ops %d did not continue from %d", td.Ops(), opsAtSwitch)
	}
	if pushed == 0 {
		t.Fatal("nothing went post-copy: the test did not exercise lazy loading")
	}
}
