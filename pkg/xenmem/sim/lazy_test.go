package sim

import (
	"bytes"
	"errors"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// patternPage is the content the "source" has for pfn.
func patternPage(pfn uint64) []byte {
	p := make([]byte, xenmem.PageSize)
	s := pfn*0x9e3779b97f4a7c15 + 1
	for i := 0; i < len(p); i += 8 {
		v := splitmix64(&s)
		for k := 0; k < 8; k++ {
			p[i+k] = byte(v >> (8 * k))
		}
	}
	return p
}

// newLazyTarget creates a target domain whose even pages are present (odd
// pfns below 64 are zero pages marked present, the others have content) and
// odd pages are missing, arms lazy loading and resumes it.
func newLazyTarget(t *testing.T, prof Profile, vcpus int) (*Domain, xenmem.TargetDomain, xenmem.Lazy) {
	t.Helper()
	requiresUffd(t)
	h := newTestHost(t)
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "vm", MemoryBytes: 16 << 20, VCPUs: vcpus})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tgt.Destroy(); tgt.Close() })
	d := mustDomain(t, h, "vm")
	d.SetRates(prof.DirtyMiBps, prof.ReadMiBps)
	n := tgt.NumPages()
	present := xenmem.NewBitmap(n)
	for p := uint64(0); p < n; p += 2 {
		present.Set(p)
		if p >= 64 {
			copy(page(tgt.Memory(), p), patternPage(p))
		}
	}
	lz, err := tgt.StartLazy(present)
	if err != nil {
		t.Fatal(err)
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	return d, tgt, lz
}

func TestLazyFaultBlocksUntilInstallAndSeesTheContent(t *testing.T) {
	d, _, lz := newLazyTarget(t, Profile{}, 1)
	ctx := ctxT(t)

	// Present pages read without faulting: one with content, one zero page
	// that was never written on this host.
	for _, pfn := range []uint64{100, 2} {
		got, err := d.Probe(ctx, pfn)
		if err != nil {
			t.Fatal(err)
		}
		want := PageHash(patternPage(pfn))
		if pfn < 64 {
			want = PageHash(zeroPage)
		}
		if got != want {
			t.Fatalf("present pfn %d read wrong content", pfn)
		}
	}
	select {
	case f := <-lz.Faults():
		t.Fatalf("fault on a present page: %+v", f)
	default:
	}

	const missing = 101
	type res struct {
		h   uint64
		err error
	}
	done := make(chan res, 1)
	go func() { h, err := d.Probe(ctx, missing); done <- res{h, err} }()
	var f xenmem.Fault
	select {
	case f = <-lz.Faults():
	case <-time.After(5 * time.Second):
		t.Fatal("no fault for a missing page")
	}
	if f.PFN != missing || f.Write || f.RaisedNanos <= 0 {
		t.Fatalf("fault %+v, want a read of pfn %d", f, missing)
	}
	select {
	case r := <-done:
		t.Fatalf("vCPU read a missing page without waiting: %+v", r)
	case <-time.After(100 * time.Millisecond):
	}
	if lz.Present(missing) {
		t.Fatal("missing page reported present")
	}
	if err := lz.Install(missing, patternPage(missing)); err != nil {
		t.Fatal(err)
	}
	select {
	case r := <-done:
		if r.err != nil || r.h != PageHash(patternPage(missing)) {
			t.Fatalf("vCPU read %x (%v) after install, want the installed page", r.h, r.err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("vCPU still blocked after Install")
	}
	if !lz.Present(missing) {
		t.Fatal("installed page not reported present")
	}
	// A second install of the same page is refused.
	if err := lz.Install(missing, zeroPage); !errors.Is(err, xenmem.ErrPageExists) {
		t.Fatalf("second Install: %v", err)
	}
	// InstallZero serves a fault too.
	go func() { h, err := d.Probe(ctx, 103); done <- res{h, err} }()
	// A fault interrupted by a signal is raised again: skip stale ones.
	for f = <-lz.Faults(); f.PFN == missing; f = <-lz.Faults() {
	}
	if f.PFN != 103 {
		t.Fatalf("fault for pfn %d, want 103", f.PFN)
	}
	if err := lz.InstallZero(f.PFN); err != nil {
		t.Fatal(err)
	}
	if r := <-done; r.err != nil || r.h != PageHash(zeroPage) {
		t.Fatalf("after InstallZero the vCPU read %x (%v)", r.h, r.err)
	}
	if err := lz.Install(d.NumPages(), patternPage(0)); err == nil {
		t.Fatal("Install out of range succeeded")
	}
	got := xenmem.NewBitmap(d.NumPages())
	if err := lz.(interface{ PresentBitmap(*xenmem.Bitmap) error }).PresentBitmap(got); err != nil {
		t.Fatal(err)
	}
	if want := d.NumPages()/2 + 2; got.Count() != want || !got.Test(missing) || !got.Test(103) || got.Test(105) {
		t.Fatalf("present bitmap has %d pages, want %d including the two installed", got.Count(), want)
	}
	if err := lz.Close(); !errors.Is(err, ErrPagesMissing) {
		t.Fatalf("Close with pages missing: %v", err)
	}
}

// TestLazyNeverOverwritesGuestWrites serves the faults of a writing guest,
// lets it write over the served pages, then pushes the source's pages
// again: every push must be refused and the guest's writes must survive.
func TestLazyNeverOverwritesGuestWrites(t *testing.T) {
	d, tgt, lz := newLazyTarget(t, Profile{DirtyMiBps: 8}, 2)
	served := xenmem.NewBitmap(d.NumPages())
	deadline := time.Now().Add(5 * time.Second)
	var faults, writeFaults int
	for served.Count() < 50 && time.Now().Before(deadline) {
		select {
		case f := <-lz.Faults():
			faults++
			if f.Write {
				writeFaults++
			}
			if served.Test(f.PFN) {
				continue
			}
			if f.PFN%4 == 1 {
				err := lz.InstallZero(f.PFN)
				if err != nil {
					t.Fatal(err)
				}
			} else if err := lz.Install(f.PFN, patternPage(f.PFN)); err != nil {
				t.Fatal(err)
			}
			served.Set(f.PFN)
		case <-time.After(time.Second):
		}
	}
	if served.Count() < 50 {
		t.Fatalf("only %d faults served in 5 s", served.Count())
	}
	// Keep serving while pausing so no vCPU stays blocked.
	stop := make(chan struct{})
	go func() {
		for {
			select {
			case f := <-lz.Faults():
				_ = lz.InstallZero(f.PFN)
			case <-stop:
				return
			}
		}
	}()
	if err := d.Pause(); err != nil {
		t.Fatal(err)
	}
	close(stop)
	mem := tgt.Memory()
	for p := served.Next(0); p < served.Len(); p = served.Next(p + 1) {
		before := append([]byte(nil), page(mem, p)...)
		if err := lz.Install(p, bytes.Repeat([]byte{0xee}, xenmem.PageSize)); !errors.Is(err, xenmem.ErrPageExists) {
			t.Fatalf("late push over pfn %d: %v", p, err)
		}
		if !bytes.Equal(before, page(mem, p)) {
			t.Fatalf("late push changed pfn %d", p)
		}
		// The page is the served content plus the guest's 48-byte stamps.
		base := patternPage(p)
		if p%4 == 1 {
			base = zeroPage
		}
		for off := 0; off < xenmem.PageSize; off += 64 {
			if !bytes.Equal(before[off+48:off+64], base[off+48:off+64]) {
				t.Fatalf("pfn %d slot %d: bytes outside the guest's stamp differ from the installed page", p, off)
			}
		}
	}
	w, _ := d.Counters()
	t.Logf("%d faults (%d writes), %d pages served, %d guest writes", faults, writeFaults, served.Count(), w)
	if writeFaults == 0 {
		t.Fatal("no write faults from a writing guest")
	}
}

func TestLazyRefusesMisuse(t *testing.T) {
	requiresUffd(t)
	h := newTestHost(t, DomainSpec{Name: "run", Memory: "4Mi", VCPUs: 1})
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "vm", MemoryBytes: 4 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	if _, err := tgt.StartLazy(xenmem.NewBitmap(3)); err == nil {
		t.Fatal("StartLazy with a bitmap of the wrong size succeeded")
	}
	if err := tgt.Resume(); err != nil {
		t.Fatal(err)
	}
	if _, err := tgt.StartLazy(xenmem.NewBitmap(tgt.NumPages())); err == nil {
		t.Fatal("StartLazy after Resume succeeded")
	}
}

func TestTargetCloseWithoutResumeLeavesNothing(t *testing.T) {
	h := newTestHost(t)
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "vm", MemoryBytes: 4 << 20, VCPUs: 2})
	if err != nil {
		t.Fatal(err)
	}
	pid := mustDomain(t, h, "vm").PID()
	if st := tgt.Info().State; st != xenmem.StateIncoming {
		t.Fatalf("new target is %s", st)
	}
	tgt.Close()
	if _, ok := h.Domain("vm"); ok {
		t.Fatal("closed, never resumed target still listed")
	}
	if killZero(pid) == nil {
		t.Fatalf("guest %d of a closed target still runs", pid)
	}
}

// TestLazyTargetCompletesAndMigratesOn installs every missing page while the
// guest runs, closes the lazy loader (the missing-page registration goes
// away), and then uses the domain as the source of a next migration.
func TestLazyTargetCompletesAndMigratesOn(t *testing.T) {
	d, tgt, lz := newLazyTarget(t, Profile{DirtyMiBps: 4}, 1)
	n := tgt.NumPages()
	for p := uint64(1); p < n; p += 2 {
		// Serve faults first (demand ahead of push), then push the next page.
		for drained := false; !drained; {
			select {
			case f := <-lz.Faults():
				if err := lz.Install(f.PFN, patternPage(f.PFN)); err != nil && !errors.Is(err, xenmem.ErrPageExists) {
					t.Fatal(err)
				}
			default:
				drained = true
			}
		}
		if err := lz.Install(p, patternPage(p)); err != nil && !errors.Is(err, xenmem.ErrPageExists) {
			t.Fatal(err)
		}
	}
	if err := lz.Close(); err != nil {
		t.Fatalf("Close with every page present: %v", err)
	}
	if _, ok := <-lz.Faults(); ok {
		t.Fatal("Faults not closed by Close")
	}
	if err := tgt.Close(); err != nil {
		t.Fatal(err)
	}
	if st := d.Info().State; st != xenmem.StateRunning {
		t.Fatalf("resumed target is %s after Close", st)
	}
	src, err := d.host.OpenSource(ctxT(t), "vm")
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	if err := src.EnableDirtyLog(); err != nil {
		t.Fatal(err)
	}
	w0, _ := d.Counters()
	time.Sleep(200 * time.Millisecond)
	if err := src.Pause(); err != nil {
		t.Fatal(err)
	}
	w1, _ := d.Counters()
	bm := xenmem.NewBitmap(n)
	if err := src.ReadDirty(bm); err != nil {
		t.Fatal(err)
	}
	if bm.Count() == 0 || bm.Count() > w1-w0 {
		t.Fatalf("%d dirty pages after %d writes", bm.Count(), w1-w0)
	}
	// The pushed pages kept their content apart from the guest's stamps.
	mem := tgt.Memory()
	for p := uint64(65); p < n; p += 2 {
		base := patternPage(p)
		for off := 0; off < xenmem.PageSize; off += 64 {
			if !bytes.Equal(page(mem, p)[off+48:off+64], base[off+48:off+64]) {
				t.Fatalf("pfn %d slot %d differs from the pushed page outside the guest's stamp", p, off)
			}
		}
	}
}

// TestLazyMakesPresentPagesResident checks the page cache after StartLazy:
// every present page is there (zero pages never written included, once the
// background fill is done) and every missing page is not, even one the
// agent had written before (a stale copy).
func TestLazyMakesPresentPagesResident(t *testing.T) {
	requiresUffd(t)
	h := newTestHost(t)
	tgt, err := h.CreateTarget(ctxT(t), xenmem.DomainInfo{Name: "vm", MemoryBytes: 8 << 20, VCPUs: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer tgt.Close()
	n := tgt.NumPages()
	present := xenmem.NewBitmap(n)
	mem := tgt.Memory()
	s := uint64(7)
	for p := uint64(0); p < n; p++ {
		switch splitmix64(&s) % 4 {
		case 0: // present with content
			present.Set(p)
			copy(page(mem, p), patternPage(p))
		case 1: // present zero page, never written here
			present.Set(p)
		case 2: // missing, but a stale copy is in memory
			copy(page(mem, p), patternPage(p))
		}
	}
	lz, err := tgt.StartLazy(present)
	if err != nil {
		t.Fatal(err)
	}
	<-lz.(*lazy).fillDone
	res := make([]byte, n)
	if err := mincore(mem, res); err != nil {
		t.Fatal(err)
	}
	for p := uint64(0); p < n; p++ {
		if present.Test(p) != (res[p]&1 != 0) {
			t.Fatalf("pfn %d: present %v but resident %v", p, present.Test(p), res[p]&1 != 0)
		}
	}
}

// TestLazyFillsPresentZeroPagesOnFault turns the background zero fill off:
// a vCPU reading a present zero page then faults, and the service loop must
// fill it by itself, without reporting a fault to the engine.
func TestLazyFillsPresentZeroPagesOnFault(t *testing.T) {
	testSkipZeroFill.Store(true)
	defer testSkipZeroFill.Store(false)
	d, _, lz := newLazyTarget(t, Profile{}, 1)
	for _, pfn := range []uint64{0, 2, 4} { // present zero pages (pfn < 64, even)
		got, err := d.Probe(ctxT(t), pfn)
		if err != nil {
			t.Fatal(err)
		}
		if got != PageHash(zeroPage) {
			t.Fatalf("present zero page %d read wrong content", pfn)
		}
	}
	select {
	case f := <-lz.Faults():
		t.Fatalf("fault on a present page reached the engine: %+v", f)
	default:
	}
	// The counter moves just after the ioctl that already woke the vCPU.
	for deadline := time.Now().Add(time.Second); lz.(*lazy).zeroFilled.Load() < 3 && time.Now().Before(deadline); {
		time.Sleep(time.Millisecond)
	}
	if got := lz.(*lazy).zeroFilled.Load(); got != 3 {
		t.Fatalf("%d pages zero-filled on fault, want 3", got)
	}
}

// TestLazyInstallRun: a run over present and missing pages installs only
// the missing ones (one kernel call per stretch), reports the others, and
// copes with a page the kernel has but the present bitmap does not know
// (the kernel stops the copy there).
func TestLazyInstallRun(t *testing.T) {
	d, _, lz := newLazyTarget(t, Profile{}, 1)
	ctx := ctxT(t)
	l := lz.(*lazy)
	// pfn 205 installed behind the bitmap's back: the kernel has it.
	if e := uffdCopy(l.uffd, l.base+205*xenmem.PageSize, patternPage(205)); e != 0 {
		t.Fatalf("direct UFFDIO_COPY: %v", e)
	}
	const first, n = 200, 10
	data := make([]byte, 0, n*xenmem.PageSize)
	for p := uint64(first); p < first+n; p++ {
		data = append(data, patternPage(p+1000)...)
	}
	exists := make([]bool, n)
	if err := lz.InstallRun(first, n, data, exists); err != nil {
		t.Fatalf("InstallRun: %v", err)
	}
	for i := range n {
		p := uint64(first + i)
		wantExists := p%2 == 0 || p == 205
		if exists[i] != wantExists {
			t.Errorf("pfn %d: exists=%v, want %v", p, exists[i], wantExists)
		}
		want := patternPage(p + 1000)
		if wantExists {
			want = patternPage(p)
		}
		h, err := d.Probe(ctx, p)
		if err != nil || h != PageHash(want) {
			t.Errorf("pfn %d: guest reads %x (%v), want %x", p, h, err, PageHash(want))
		}
		if !lz.Present(p) {
			t.Errorf("pfn %d not present after the run", p)
		}
	}
	// A zero run over present and missing pages.
	exists = make([]bool, 3)
	if err := lz.InstallRun(301, 3, nil, exists); err != nil {
		t.Fatalf("InstallRun zero: %v", err)
	}
	if exists[0] || !exists[1] || exists[2] {
		t.Errorf("zero run exists = %v, want [false true false]", exists)
	}
	for _, p := range []uint64{301, 303} {
		if h, err := d.Probe(ctx, p); err != nil || h != PageHash(zeroPage) {
			t.Errorf("pfn %d: guest reads %x (%v), want the zero page", p, h, err)
		}
	}
	// Bad calls.
	if err := lz.InstallRun(d.NumPages()-1, 2, nil, make([]bool, 2)); err == nil {
		t.Error("InstallRun past the end: no error")
	}
	if err := lz.InstallRun(401, 2, data[:xenmem.PageSize], make([]bool, 2)); err == nil {
		t.Error("InstallRun with too little data: no error")
	}
}

// uffdCopy (test helper) installs one page (src must hold PageSize bytes) at dst and wakes
// the waiters. EEXIST means the page is already present.
func uffdCopy(fd int, dst uint64, src []byte) unix.Errno {
	arg := uffdioCopyArg{Dst: dst, Src: uint64(uintptr(unsafe.Pointer(&src[0]))), Len: uint64(len(src))}
	for {
		_, e := ioctlPtr(fd, uffdioCopy, unsafe.Pointer(&arg))
		if e == unix.EAGAIN { // address space changing under us: retry
			arg.Copy = 0
			continue
		}
		return e
	}
}
