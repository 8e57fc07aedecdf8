//go:build linux

package paging

import (
	"bytes"
	"errors"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestPagerPagesARunningDomainOutAndIn runs in a dom0 whose hypervisor has
// memory paging (the lab's: make xenlab-postcopy-e2e runs it), as root,
// with XENFERRY_PAGING_DOMAIN naming the domid of a running HVM or PVH
// domU. With the domain paused it keeps a copy of every 4th gfn of its
// RAM, pages them out, reads half of them back through foreign mappings
// (each access raises a paging request this pager answers) and compares
// them with the copies; then it lets the guest run on the rest, so that its
// own vCPUs fault them in, and pushes what the guest did not touch.
func TestPagerPagesARunningDomainOutAndIn(t *testing.T) {
	ds := os.Getenv("XENFERRY_PAGING_DOMAIN")
	if ds == "" {
		t.Skip("XENFERRY_PAGING_DOMAIN (a domid) not set: needs dom0 on a Xen with memory paging")
	}
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	d, err := strconv.ParseUint(ds, 10, 16)
	if err != nil {
		t.Fatalf("XENFERRY_PAGING_DOMAIN=%q: %v", ds, err)
	}
	dom := uint16(d)
	if err := Probe(); err != nil {
		t.Fatalf("probe: %v", err)
	}
	p, err := Open(dom, 1<<20)
	if err != nil {
		t.Fatal(err)
	}
	info := p.Info()
	t.Logf("domain %d: %d pages (max %d), HVM %v, HAP %v", dom, info.TotPages, info.MaxPages, info.HVM, info.HAP)
	if err := PauseDomain(dom, true); err != nil {
		t.Fatal(err)
	}
	paused := true
	defer func() {
		if paused {
			_ = PauseDomain(dom, false)
		}
	}()
	if err := p.Enable(); err != nil {
		t.Fatal(err)
	}
	closed := false
	defer func() {
		if !closed {
			// Whatever failed, the guest must not be left paged out.
			p.Close()
		}
	}()
	var candidates []uint64
	// RAM starts at gfn 0; the few special pages (xenstore, console,
	// paging ring) sit far above it.
	ram := info.TotPages &^ 0xff
	for g := uint64(0x100); g < ram && g < 0xf0000; g += 4 {
		candidates = append(candidates, g)
	}
	saved := make([]byte, len(candidates)*PageSize)
	if err := ReadDomainPages(dom, candidates, saved, 1); err != nil {
		t.Fatalf("read the pages before paging them out: %v", err)
	}
	copyOf := map[uint64][]byte{}
	var evicted []uint64
	busy := 0
	for i, g := range candidates {
		if _, err := p.Evict([]uint64{g}); err != nil {
			if errors.Is(err, unix.EBUSY) || errors.Is(err, unix.EINVAL) {
				busy++ // mapped by a backend or not pageable: stays present
				continue
			}
			t.Fatalf("evict: %v", err)
		}
		evicted = append(evicted, g)
		copyOf[g] = saved[i*PageSize : (i+1)*PageSize]
	}
	t.Logf("paged out %d gfns (%d not pageable)", len(evicted), busy)
	if len(evicted) < len(candidates)/2 {
		t.Fatalf("only %d of %d gfns could be paged out", len(evicted), len(candidates))
	}

	// The fault path: Run hands each requested gfn to an installer that
	// loads the kept copy.
	faults := make(chan uint64, 4096)
	var demand sync.Map
	runErr := make(chan error, 1)
	go func() {
		runErr <- p.Run(func(g uint64) {
			demand.Store(g, true)
			faults <- g
		})
	}()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case g := <-faults:
				if err := p.Install(g, copyOf[g]); err != nil && !errors.Is(err, ErrNotPaged) {
					t.Errorf("install gfn %#x: %v", g, err)
				}
			case <-stop:
				return
			}
		}
	}()

	// Half back through foreign mappings, with the domain still paused:
	// the contents must be the kept copies, byte for byte.
	half := evicted[:len(evicted)/2]
	got := make([]byte, len(half)*PageSize)
	t0 := time.Now()
	if err := p.ReadPages(half, got, 2000); err != nil {
		t.Fatalf("read paged-out gfns back: %v", err)
	}
	t.Logf("read %d paged-out gfns back on demand in %v", len(half), time.Since(t0))
	for i, g := range half {
		if !bytes.Equal(got[i*PageSize:(i+1)*PageSize], copyOf[g]) {
			t.Fatalf("gfn %#x differs from its copy after paging in", g)
		}
	}
	// The guest runs on the rest for a while.
	if err := PauseDomain(dom, false); err != nil {
		t.Fatal(err)
	}
	paused = false
	time.Sleep(5 * time.Second)
	st := p.Stats()
	guestFaults := int(st.Installed) - len(half)
	t.Logf("guest ran 5 s: %d requests, %d installed, %d by the guest's own accesses", st.Requests, st.Installed, guestFaults)
	// The push: everything still paged out is loaded.
	for _, g := range evicted[len(evicted)/2:] {
		if err := p.Install(g, copyOf[g]); err != nil && !errors.Is(err, ErrNotPaged) {
			t.Fatalf("push gfn %#x: %v", g, err)
		}
	}
	if n := p.Paged(); n != 0 {
		t.Fatalf("%d gfns still paged out after the push", n)
	}
	close(stop)
	wg.Wait()
	closed = true
	if err := p.Close(); err != nil {
		t.Fatal(err)
	}
	if err := <-runErr; err != nil {
		t.Fatalf("pager loop: %v", err)
	}
	info2, err := (func() (DomainInfo, error) {
		h, err := openHypervisor()
		if err != nil {
			return DomainInfo{}, err
		}
		defer h.close()
		return h.domainInfo(dom)
	})()
	if err != nil {
		t.Fatalf("domain %d after the test: %v", dom, err)
	}
	if info2.Paused {
		t.Fatalf("domain %d is paused after the test", dom)
	}
	if info2.TotPages+1 < info.TotPages {
		t.Fatalf("domain %d has %d pages after the test, %d before", dom, info2.TotPages, info.TotPages)
	}
}
