package paging

import (
	"errors"
	"fmt"
	"sync"

	"golang.org/x/sys/unix"
)

// domidSelf is DOMID_SELF: no remote domain, so a paging op on it fails at
// once, with ENOSYS when paging is not built in.
const domidSelf = 0x7FF0

// maxWaiting bounds the requests kept while their gfn's page is fetched:
// each paused vCPU has at most one, and the ring holds 8.
const maxWaiting = 1024

// Probe says whether this host can page domain memory: dom0 with the
// privcmd devices, on a hypervisor built with CONFIG_MEM_PAGING.
func Probe() error {
	h, err := openHypervisor()
	if err != nil {
		return err
	}
	defer h.close()
	err = h.pagingOp(domidSelf, pagingNominate, 0, nil)
	if errors.Is(err, unix.ENOSYS) {
		return fmt.Errorf("%w: the hypervisor has no memory paging (built without CONFIG_MEM_PAGING, which Xen marks unsupported)", ErrUnsupported)
	}
	return nil
}

// Stats count what a pager did.
type Stats struct {
	Evicted   uint64 // gfns made paged-out
	Installed uint64 // pages loaded (on demand or pushed)
	Requests  uint64 // paging requests from Xen
	Dropped   uint64 // paged-out gfns the guest gave back
}

// Pager owns the paging ring of one domain.
//
// Invariants: paged has a bit set exactly for the gfns this pager made
// paged-out and has not installed since; every request taken off the ring
// is answered once, either at once (its gfn is present again) or by the
// Install of its gfn; waiting holds only gfns with their bit set.
type Pager struct {
	h       *hypervisor
	dom     uint16
	info    DomainInfo
	ringMem []byte
	ev      *evtchn

	// installMu makes an Install's check, load and bookkeeping one step:
	// two installs of one gfn (a fault and the push) must not both load.
	installMu sync.Mutex
	mu        sync.Mutex
	ring      *backRing
	paged     []uint64 // bitmap over gfns [0, 64*len)
	npaged    int
	waiting   map[uint64][]Request
	stats     Stats
	closed    bool
}

// Open prepares a pager for dom, which must be an HVM or PVH domain on
// hardware-assisted paging (Xen's condition for the paging ring). maxGFN
// bounds the gfns that may be paged out.
func Open(dom uint16, maxGFN uint64) (*Pager, error) {
	if maxGFN == 0 || maxGFN > 1<<36 {
		return nil, fmt.Errorf("paging: max gfn %d out of range", maxGFN)
	}
	h, err := openHypervisor()
	if err != nil {
		return nil, err
	}
	info, err := h.domainInfo(dom)
	if err != nil {
		h.close()
		return nil, err
	}
	if !info.HVM || !info.HAP {
		h.close()
		return nil, fmt.Errorf("%w: domain %d is not an HVM/PVH domain on hardware-assisted paging (PV domains cannot be paged; migrate them pre-copy)", ErrUnsupported, dom)
	}
	return &Pager{h: h, dom: dom, info: info, paged: make([]uint64, (maxGFN+63)/64), waiting: map[uint64][]Request{}}, nil
}

// Info is the domain's info when the pager was opened.
func (p *Pager) Info() DomainInfo { return p.info }

// Enable sets up the paging ring the way libxenctrl does: with the domain
// paused, the ring's frame (HVM_PARAM_PAGING_RING_PFN) is populated if
// needed, mapped here, handed to Xen, and taken out of the guest's
// physmap so that the guest cannot write it.
func (p *Pager) Enable() (err error) {
	if err := p.h.pause(p.dom, true); err != nil {
		return fmt.Errorf("pause domain %d: %w", p.dom, err)
	}
	defer func() {
		if uerr := p.h.pause(p.dom, false); uerr != nil && err == nil {
			err = fmt.Errorf("unpause domain %d: %w", p.dom, uerr)
		}
	}()
	pfn, err := p.h.hvmParam(p.dom, hvmParamPagingRing)
	if err != nil {
		return err
	}
	if pfn == 0 {
		return fmt.Errorf("%w: domain %d has no paging ring frame", ErrUnsupported, p.dom)
	}
	mem, errs, err := p.h.mapForeign(p.dom, []uint64{pfn})
	if err == nil && errs[0] != 0 {
		_ = unix.Munmap(mem)
		err = unix.Errno(-errs[0])
	}
	if err != nil {
		if _, perr := p.h.reservation(p.dom, []uint64{pfn}, false); perr != nil {
			return fmt.Errorf("populate the paging ring frame %#x of domain %d: %w (map: %v)", pfn, p.dom, perr, err)
		}
		mem, errs, err = p.h.mapForeign(p.dom, []uint64{pfn})
		if err == nil && errs[0] != 0 {
			_ = unix.Munmap(mem)
			err = unix.Errno(-errs[0])
		}
		if err != nil {
			return fmt.Errorf("map the paging ring frame %#x of domain %d: %w", pfn, p.dom, err)
		}
	}
	port, err := p.h.vmEventPaging(p.dom, true)
	if err != nil {
		_ = unix.Munmap(mem)
		if errors.Is(err, unix.ENOSYS) {
			return fmt.Errorf("%w: enable paging on domain %d: %v", ErrUnsupported, p.dom, err)
		}
		return fmt.Errorf("enable the paging ring of domain %d: %w (ENODEV: not HAP; EXDEV: populate-on-demand; EBUSY: another pager)", p.dom, err)
	}
	ring, _ := newBackRing(mem)
	ring.init()
	if _, err := p.h.reservation(p.dom, []uint64{pfn}, true); err != nil {
		// Not fatal (libxenctrl goes on too), but the guest could write the ring.
		_ = err
	}
	ev, err := bindEvtchn(p.dom, port)
	if err != nil {
		_, _ = p.h.vmEventPaging(p.dom, false)
		_ = unix.Munmap(mem)
		return err
	}
	p.mu.Lock()
	p.ringMem, p.ring, p.ev = mem, ring, ev
	p.mu.Unlock()
	return nil
}

// Evict makes each gfn paged-out: nominated, then its frame freed. The
// domain should be paused, so that the contents the caller holds for the
// gfn stay the newest. It stops after the batch holding the first gfn that
// cannot be paged out and returns how many were (IsPaged tells which).
func (p *Pager) Evict(gfns []uint64) (int, error) {
	for _, g := range gfns {
		if g >= uint64(len(p.paged))*64 {
			return 0, fmt.Errorf("paging: gfn %#x beyond the pager's bound", g)
		}
	}
	done := 0
	// Nominate and evict go two by two in multicalls: one hypercall per
	// batch instead of two per gfn (the cost before the resume).
	per := MaxPagingOpBatch / 2
	ops := make([]uint8, 0, 2*per)
	batch := make([]uint64, 0, 2*per)
	for start := 0; start < len(gfns); start += per {
		end := min(start+per, len(gfns))
		ops, batch = ops[:0], batch[:0]
		for _, g := range gfns[start:end] {
			ops = append(ops, pagingNominate, pagingEvict)
			batch = append(batch, g, g)
		}
		res, err := p.h.pagingOps(p.dom, ops, batch)
		if err != nil {
			return done, err
		}
		// Every gfn the batch evicted is recorded, even past a failure:
		// an evicted gfn nobody knows of would never be installed.
		var first error
		for i, g := range gfns[start:end] {
			if rc := res[2*i]; rc != 0 {
				if first == nil {
					first = fmt.Errorf("nominate gfn %#x of domain %d: %w", g, p.dom, unix.Errno(-rc))
				}
				continue
			}
			if rc := res[2*i+1]; rc != 0 {
				if first == nil {
					first = fmt.Errorf("evict gfn %#x of domain %d: %w", g, p.dom, unix.Errno(-rc))
				}
				continue
			}
			p.mu.Lock()
			if p.paged[g/64]&(1<<(g%64)) == 0 {
				p.paged[g/64] |= 1 << (g % 64)
				p.npaged++
			}
			p.stats.Evicted++
			p.mu.Unlock()
			done++
		}
		if first != nil {
			return done, first
		}
	}
	return done, nil
}

// IsPaged says whether gfn is still paged out.
func (p *Pager) IsPaged(g uint64) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	return g < uint64(len(p.paged))*64 && p.paged[g/64]&(1<<(g%64)) != 0
}

// Paged is the number of gfns still paged out.
func (p *Pager) Paged() int {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.npaged
}

// Stats returns the counters so far.
func (p *Pager) Stats() Stats {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.stats
}

// Run serves the ring until Close: each request for a paged-out gfn is
// kept, and fault is called once per gfn (from Run's goroutine; it must
// not block for long: queue the fetch). Requests for gfns present again
// are answered at once.
func (p *Pager) Run(fault func(gfn uint64)) error {
	for {
		// Drain first: requests may be on the ring before the first event.
		err := p.drain(fault)
		if err == nil {
			err = p.ev.wait()
		}
		if err != nil {
			p.mu.Lock()
			closed := p.closed
			p.mu.Unlock()
			if closed {
				return nil // Close ended it
			}
			return err
		}
	}
}

func (p *Pager) drain(fault func(gfn uint64)) error {
	var want []uint64
	p.mu.Lock()
	notify := false
	for {
		req, ok, err := p.ring.next()
		if err != nil {
			p.mu.Unlock()
			return err
		}
		if !ok {
			break
		}
		p.stats.Requests++
		g := req.GFN
		isPaged := g < uint64(len(p.paged))*64 && p.paged[g/64]&(1<<(g%64)) != 0
		if req.Drop() {
			// The guest gave the gfn back (balloon): nothing to load.
			// Every request is answered, a drop too: an unanswered one
			// would hold its ring slot for good.
			if isPaged {
				p.paged[g/64] &^= 1 << (g % 64)
				p.npaged--
				p.stats.Dropped++
			}
			isPaged = false
		}
		if !isPaged {
			if err := p.ring.respond(req); err != nil {
				p.mu.Unlock()
				return err
			}
			notify = true
			continue
		}
		if len(p.waiting) >= maxWaiting {
			p.mu.Unlock()
			return fmt.Errorf("paging: %d gfns awaited at once", len(p.waiting))
		}
		if len(p.waiting[g]) == 0 {
			want = append(want, g)
		}
		p.waiting[g] = append(p.waiting[g], req)
	}
	p.mu.Unlock()
	if notify {
		if err := p.ev.notify(); err != nil {
			return err
		}
	}
	for _, g := range want {
		fault(g)
	}
	return nil
}

// Install loads page as gfn's contents and answers every request waiting
// for it. It returns ErrNotPaged when gfn is not paged out (installed
// already, or never evicted): the guest's copy is then the newer one.
func (p *Pager) Install(gfn uint64, page []byte) error {
	if len(page) != PageSize {
		return fmt.Errorf("paging: page of %d bytes", len(page))
	}
	p.installMu.Lock()
	defer p.installMu.Unlock()
	if !p.IsPaged(gfn) {
		return ErrNotPaged
	}
	if err := p.h.pagingOp(p.dom, pagingPrep, gfn, page); err != nil {
		return fmt.Errorf("load gfn %#x of domain %d: %w", gfn, p.dom, err)
	}
	p.mu.Lock()
	if p.paged[gfn/64]&(1<<(gfn%64)) != 0 {
		p.paged[gfn/64] &^= 1 << (gfn % 64)
		p.npaged--
	}
	p.stats.Installed++
	reqs := p.waiting[gfn]
	delete(p.waiting, gfn)
	var err error
	for _, r := range reqs {
		if err = p.ring.respond(r); err != nil {
			break
		}
	}
	p.mu.Unlock()
	if err != nil {
		return err
	}
	if len(reqs) > 0 {
		return p.ev.notify()
	}
	return nil
}

// Close stops Run and, when nothing is paged out any more, hands the ring
// back to Xen. With the domain paused it answers every request still on
// the ring (a vCPU paused on a request is released only by its answer,
// which disabling the ring would not give), then disables the ring. With
// gfns still paged out the ring stays (the domain would hang without it)
// and Close says so.
func (p *Pager) Close() error {
	p.mu.Lock()
	p.closed = true
	p.mu.Unlock()
	if p.ev == nil {
		p.h.close()
		return nil
	}
	p.ev.stop()
	var err error
	if perr := p.h.pause(p.dom, true); perr != nil {
		err = fmt.Errorf("pause domain %d to close its pager: %w", p.dom, perr)
	}
	if derr := p.drain(func(uint64) {}); derr != nil && err == nil {
		err = derr
	}
	p.mu.Lock()
	n := p.npaged
	p.mu.Unlock()
	if n == 0 {
		if _, derr := p.h.vmEventPaging(p.dom, false); derr != nil && err == nil {
			err = fmt.Errorf("disable the paging ring of domain %d: %w", p.dom, derr)
		}
	} else if err == nil {
		err = fmt.Errorf("paging: closed with %d gfns of domain %d still paged out", n, p.dom)
	}
	if uerr := p.h.pause(p.dom, false); uerr != nil && err == nil {
		err = fmt.Errorf("unpause domain %d after closing its pager: %w", p.dom, uerr)
	}
	p.ev.close()
	_ = unix.Munmap(p.ringMem)
	p.h.close()
	return err
}

// ReadPages maps gfns of the domain and copies their contents into dst
// (len(gfns)*PageSize bytes). A paged-out gfn fails the map (ENOENT) and
// makes Xen ask the pager for it; ReadPages retries those while Run and
// the installs go on, up to tries rounds.
func (p *Pager) ReadPages(gfns []uint64, dst []byte, tries int) error {
	return readPages(p.h, p.dom, gfns, dst, tries)
}
