package sim

import (
	"context"
	crand "crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Version is reported as the hypervisor version of simulated hosts.
const Version = "xenferry-sim/1"

// Host is a simulated Xen host; it implements xenmem.Host.
type Host struct {
	cfg      Config
	capacity uint64
	stateDir string // Options.StateDir, absolute; "" = guests die with the agent
	log      logr.Logger
	// persistMu serialises registry writes.
	persistMu sync.Mutex

	// mu protects the fields below.
	mu       sync.Mutex
	domains  map[string]*Domain
	reserved map[string]uint64 // memory of domains being created
	nextID   int
	closed   bool
	// teardowns counts released domains whose resources are still being
	// freed (destroyAsync); Close waits for them.
	teardowns sync.WaitGroup
}

var _ xenmem.Host = (*Host)(nil)

// NewHost creates a host and starts the configured domains (running);
// its guests die with this process. OpenHost with a StateDir makes them
// outlive it.
func NewHost(cfg Config, log logr.Logger) (*Host, error) {
	return OpenHost(cfg, Options{}, log)
}

// Config returns the host's configuration.
func (h *Host) Config() Config { return h.cfg }

// Domain returns a domain by name (tests and benchmarks).
func (h *Host) Domain(name string) (*Domain, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	d, ok := h.domains[name]
	return d, ok
}

// Info describes the host; free memory is capacity minus every domain.
// Capabilities of a sim host: xenferry's engine with every strategy; the
// guests' memory can be lazily loaded through userfaultfd; the engine's
// receivers decode zstd page batches.
var Capabilities = xenmem.Capabilities{Transport: xenmem.TransportEngine,
	Strategies: []string{"precopy", "postcopy", "hybrid"}, Dedup: true, EarlyResume: true, Compression: []string{"zstd"}}

func (h *Host) Info(ctx context.Context) (xenmem.HostInfo, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return xenmem.HostInfo{
		Name:             h.cfg.Name,
		Backend:          "sim",
		Version:          Version,
		TotalMemoryBytes: h.capacity,
		FreeMemoryBytes:  h.capacity - h.usedLocked(),
		CPUs:             h.cfg.CPUs,
		Capabilities:     Capabilities,
	}, nil
}

func (h *Host) usedLocked() uint64 {
	var used uint64
	for _, d := range h.domains {
		used += d.npages * xenmem.PageSize
	}
	for _, r := range h.reserved {
		used += r
	}
	return used
}

// Domains lists the domains, sorted by name.
func (h *Host) Domains(ctx context.Context) ([]xenmem.DomainInfo, error) {
	h.mu.Lock()
	ds := make([]*Domain, 0, len(h.domains))
	for _, d := range h.domains {
		ds = append(ds, d)
	}
	h.mu.Unlock()
	out := make([]xenmem.DomainInfo, 0, len(ds))
	for _, d := range ds {
		info := d.Info()
		info.CPUTime = d.cpuTime()
		info.PageWrites, _ = d.Counters()
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Name < out[j].Name })
	return out, nil
}

// reserve claims a name and memory for a domain being created.
func (h *Host) reserve(name string, bytes uint64) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.closed {
		return fmt.Errorf("domain %s: host %s is closed", name, h.cfg.Name)
	}
	if _, ok := h.domains[name]; ok {
		return fmt.Errorf("domain %s: %w", name, xenmem.ErrExists)
	}
	if _, ok := h.reserved[name]; ok {
		return fmt.Errorf("domain %s: %w (being created)", name, xenmem.ErrExists)
	}
	if free := h.capacity - h.usedLocked(); bytes > free {
		return fmt.Errorf("domain %s needs %d bytes, host %s has %d free: %w", name, bytes, h.cfg.Name, free, xenmem.ErrNoMemory)
	}
	h.reserved[name] = bytes
	return nil
}

// commit turns a reservation into a domain (d == nil drops it).
func (h *Host) commit(name string, d *Domain) {
	h.mu.Lock()
	defer h.mu.Unlock()
	delete(h.reserved, name)
	if d != nil {
		d.id = h.nextID
		h.nextID++
		h.domains[name] = d
	}
}

// remove forgets a destroyed domain.
func (h *Host) remove(d *Domain) {
	h.mu.Lock()
	removed := h.domains[d.spec.Name] == d
	if removed {
		delete(h.domains, d.spec.Name)
	}
	h.mu.Unlock()
	if removed {
		h.persistLogged("destroy " + d.spec.Name)
	}
}

// CreateDomain builds a domain's memory from its profile or image and starts
// it running.
func (h *Host) CreateDomain(ctx context.Context, spec DomainSpec) (_ xenmem.DomainInfo, retErr error) {
	if err := spec.Validate(); err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
	}
	memBytes, _ := ParseBytes(spec.Memory)
	if err := h.reserve(spec.Name, memBytes); err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain: %w", err)
	}
	var d *Domain
	defer func() {
		// Runs after the reservation became the domain (below).
		if retErr == nil {
			h.persistLogged("create " + spec.Name)
		}
	}()
	defer func() {
		if retErr != nil && d != nil {
			d.destroy()
			d = nil
		}
		h.commit(spec.Name, d)
	}()
	spec.Disks = append([]DiskSpec(nil), spec.Disks...) // resolved below; the caller's stays as is
	disks := make([]xenmem.Disk, 0, len(spec.Disks))
	for i, ds := range spec.Disks {
		p := h.cfg.diskPath(ds.Path)
		spec.Disks[i].Path = p
		if ds.Size != "" {
			size, _ := ParseBytes(ds.Size)
			_, statErr := os.Stat(p)
			start := time.Now()
			if statErr != nil {
				h.log.Info("Generating disk image", "domain", spec.Name, "disk", ds.ID, "path", p, "bytes", size)
			}
			if err := GenerateDisk(p, int64(size), spec.Profile.Seed+int64(i)); err != nil {
				return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
			}
			if statErr != nil {
				h.log.Info("Generated disk image", "domain", spec.Name, "disk", ds.ID, "seconds", time.Since(start).Seconds())
			}
		} else if _, err := os.Stat(p); err != nil {
			return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: disk %s: %w (set its size to generate it)", spec.Name, ds.ID, err)
		}
		disks = append(disks, xenmem.Disk{ID: ds.ID, Path: p})
	}
	var err error
	d, err = h.newDomain(spec, disks, memBytes)
	if err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
	}
	start := time.Now()
	if spec.Image != "" {
		err = d.fillFromImage(ctx, spec.Image)
	} else {
		err = d.fillFromProfile(ctx)
	}
	if err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
	}
	// A running VM's memory is allocated and mapped; map all of it in the
	// agent now (allocating the zero pages) so that the first migration
	// round does not pay ~0.4 s/GiB of page faults that only the simulation
	// has. Best effort: MADV_POPULATE_READ needs Linux 5.14.
	_ = unix.Madvise(d.mem, unix.MADV_POPULATE_READ)
	if err := d.startGuest(); err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
	}
	d.state = xenmem.StatePaused
	d.uuid = newUUID()
	if err := d.Resume(); err != nil {
		return xenmem.DomainInfo{}, fmt.Errorf("create domain %s: %w", spec.Name, err)
	}
	d.log.Info("Created domain", "domain", spec.Name, "memoryBytes", memBytes, "vcpus", spec.VCPUs,
		"buildSeconds", time.Since(start).Seconds(), "guestPID", d.guest.pid)
	return d.Info(), nil
}

// newDomain creates the memory and control memfds of a domain, mapped in the
// agent, with the workload parameters written into the control page. The
// guest process is not started yet.
func (h *Host) newDomain(spec DomainSpec, disks []xenmem.Disk, memBytes uint64) (_ *Domain, retErr error) {
	d := &Domain{host: h, log: h.log, spec: spec, disks: disks, npages: memBytes / xenmem.PageSize, state: xenmem.StateIncoming}
	defer func() {
		if retErr != nil {
			d.unmapFiles()
		}
	}()
	fd, err := unix.MemfdCreate("xenferry-sim-mem-"+spec.Name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create: %w", err)
	}
	d.memFile = os.NewFile(uintptr(fd), "memfd:"+spec.Name)
	if err := d.memFile.Truncate(int64(memBytes)); err != nil {
		return nil, fmt.Errorf("size guest memory to %d bytes: %w", memBytes, err)
	}
	if d.mem, err = unix.Mmap(fd, 0, int(memBytes), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err != nil {
		return nil, fmt.Errorf("map guest memory (%d bytes): %w", memBytes, err)
	}
	_ = unix.Madvise(d.mem, unix.MADV_NOHUGEPAGE)
	cfd, err := unix.MemfdCreate("xenferry-sim-ctl-"+spec.Name, unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("memfd_create control page: %w", err)
	}
	d.ctlFile = os.NewFile(uintptr(cfd), "memfd-ctl:"+spec.Name)
	if err := d.ctlFile.Truncate(ctlSize); err != nil {
		return nil, fmt.Errorf("size control page: %w", err)
	}
	raw, err := unix.Mmap(cfd, 0, ctlSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, fmt.Errorf("map control page: %w", err)
	}
	d.ctl = ctlPage(raw)
	d.initControl()
	return d, nil
}

// initControl writes the workload parameters; the guest starts parked
// (pause word 1).
func (d *Domain) initControl() {
	p := d.spec.Profile
	c := d.ctl
	c.store32(offVCPUs, uint32(d.spec.VCPUs))
	c.store32(offPause, 1)
	c.store64(offMemBytes, d.npages*xenmem.PageSize)
	c.storeF(offWRate, p.DirtyMiBps*256)
	c.storeF(offRRate, p.ReadMiBps*256)
	hotStart, hot := hotWindow(d.npages, p)
	c.store64(offHotStart, hotStart)
	c.store64(offHotPages, hot)
	c.storeF(offHotShare, p.HotWriteShare)
	c.store64(offSeed, uint64(p.Seed))
	for i := 0; i < d.spec.VCPUs; i++ {
		c.store64(vcpuOff(i, vcWRNG), initialRNG(uint64(p.Seed), i, 0x7772))
		c.store64(vcpuOff(i, vcRRNG), initialRNG(uint64(p.Seed), i, 0x7264))
	}
	c.store64(offMagic, controlMagic)
}

func (d *Domain) startGuest() error {
	sock, logPath := "", ""
	if d.host.stateDir != "" {
		sock, logPath = d.host.guestSock(d.spec.Name), d.host.guestLog(d.spec.Name)
	}
	g, err := startGuest(d.spec.Name, d.memFile, d.ctlFile, sock, logPath)
	if err != nil {
		return err
	}
	d.guest = g
	if g.uffdErr != nil {
		d.log.Info("Guest has no userfaultfd: dirty logging and lazy loading unavailable", "domain", d.spec.Name, "reason", g.uffdErr.Error())
	}
	return nil
}

func (d *Domain) unmapFiles() {
	if d.mem != nil {
		_ = unix.Munmap(d.mem)
		d.mem = nil
	}
	if d.ctl != nil {
		_ = unix.Munmap(d.ctl)
		d.ctl = nil
	}
	if d.memFile != nil {
		d.memFile.Close()
	}
	if d.ctlFile != nil {
		d.ctlFile.Close()
	}
}

// Page categories of a profile-built domain.
const (
	pageZero  = 0
	pageDisk  = 1
	pageOther = 2
)

// hotWindow is the contiguous range of pages the hot set covers.
func hotWindow(n uint64, p Profile) (start, pages uint64) {
	pages = uint64(math.Round(p.HotFraction * float64(n)))
	if p.HotFraction > 0 && pages == 0 {
		pages = 1
	}
	if pages > 0 && pages < n {
		s := uint64(p.Seed) ^ 0x686f74 // "hot"
		start = splitmix64(&s) % (n - pages + 1)
	}
	return start, min(pages, n)
}

// layout returns the category of every page (a byte array, 1 byte per
// page) with exactly round(zero×n) zero and round(disk×n) disk pages,
// shuffled by the profile's seed, except that the hot set holds "other" pages as far
// as there are enough of them: the pages a workload keeps writing are its
// working (anonymous) memory, not clean page cache — a guest's page cache
// is rewritten only when files are, and written-back blocks are on disk
// again. Cold writes still land anywhere.
func layout(n uint64, p Profile) []uint8 {
	cat := make([]uint8, n)
	nz := uint64(math.Round(p.Zero * float64(n)))
	nd := min(uint64(math.Round(p.Disk*float64(n))), n-nz)
	for i := nz; i < n; i++ {
		if i < nz+nd {
			cat[i] = pageDisk
		} else {
			cat[i] = pageOther
		}
	}
	rng := rand.New(rand.NewPCG(uint64(p.Seed), 0x6c61796f7574))
	rng.Shuffle(int(n), func(i, j int) { cat[i], cat[j] = cat[j], cat[i] })
	hs, hn := hotWindow(n, p)
	out := uint64(0) // next candidate outside the window
	for i := hs; i < hs+hn; i++ {
		if cat[i] == pageOther {
			continue
		}
		for out < n && (cat[out] != pageOther || (out >= hs && out < hs+hn)) {
			out++
		}
		if out == n {
			break // fewer "other" pages than the hot set holds
		}
		cat[i], cat[out] = cat[out], cat[i]
	}
	return cat
}

// diskBlock maps the k-th disk page to a distinct block of a disk with
// blocks blocks: an affine permutation with a stride coprime to blocks.
type diskBlockMap struct{ blocks, start, stride uint64 }

func newDiskBlockMap(blocks uint64, seed int64) diskBlockMap {
	s := uint64(seed) ^ 0x6469736b
	m := diskBlockMap{blocks: blocks, start: splitmix64(&s) % blocks, stride: splitmix64(&s)%blocks | 1}
	for gcd(m.stride, blocks) != 1 {
		m.stride++
	}
	return m
}

func (m diskBlockMap) block(k uint64) uint64 { return (m.start + k*m.stride) % m.blocks }

func gcd(a, b uint64) uint64 {
	for b != 0 {
		a, b = b, a%b
	}
	return a
}

// progressEvery is how much memory is built between progress log lines.
const progressEvery = 256 << 20

func (d *Domain) fillFromProfile(ctx context.Context) error {
	p := d.spec.Profile
	cat := layout(d.npages, p)
	var disk *os.File
	var bm diskBlockMap
	var nDisk uint64
	for _, c := range cat {
		if c == pageDisk {
			nDisk++
		}
	}
	if nDisk > 0 {
		f, err := os.Open(d.disks[0].Path)
		if err != nil {
			return fmt.Errorf("build memory from disk %s: %w", d.disks[0].ID, err)
		}
		defer f.Close()
		st, err := f.Stat()
		if err != nil {
			return fmt.Errorf("build memory from disk %s: %w", d.disks[0].ID, err)
		}
		blocks := uint64(st.Size()) / xenmem.PageSize
		if blocks < nDisk {
			return fmt.Errorf("build memory: disk %s (%s) has %d blocks of 4 KiB, the profile needs %d distinct blocks: make the disk at least %d bytes",
				d.disks[0].ID, d.disks[0].Path, blocks, nDisk, nDisk*xenmem.PageSize)
		}
		disk, bm = f, newDiskBlockMap(blocks, p.Seed)
	}
	rng := uint64(p.Seed) ^ 0x6d656d6f7279 // "memory"
	var k uint64
	for pfn, c := range cat {
		page := d.mem[uint64(pfn)*xenmem.PageSize : uint64(pfn+1)*xenmem.PageSize]
		switch c {
		case pageDisk:
			if _, err := disk.ReadAt(page, int64(bm.block(k)*xenmem.PageSize)); err != nil {
				return fmt.Errorf("build memory: read disk %s block %d: %w", d.disks[0].ID, bm.block(k), err)
			}
			k++
		case pageOther:
			fillRandom(page, &rng)
		}
		if uint64(pfn+1)*xenmem.PageSize%progressEvery == 0 {
			if err := ctx.Err(); err != nil {
				return fmt.Errorf("build memory: %w", err)
			}
			d.log.V(1).Info("Building domain memory", "domain", d.spec.Name, "doneBytes", uint64(pfn+1)*xenmem.PageSize, "totalBytes", d.npages*xenmem.PageSize)
		}
	}
	return nil
}

// fillFromImage streams a raw memory image into guest memory; all-zero
// pages are skipped so they stay unallocated.
func (d *Domain) fillFromImage(ctx context.Context, path string) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("memory image: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("memory image: %w", err)
	}
	if want := d.npages * xenmem.PageSize; uint64(st.Size()) != want {
		return fmt.Errorf("memory image %s has %d bytes, the domain's memory is %d: they must be equal", path, st.Size(), want)
	}
	buf := make([]byte, 1<<20)
	var off uint64
	for {
		n, err := io.ReadFull(f, buf)
		for p := 0; p+xenmem.PageSize <= n; p += xenmem.PageSize {
			pg := buf[p : p+xenmem.PageSize]
			if !isZero(pg) {
				copy(d.mem[off+uint64(p):], pg)
			}
		}
		off += uint64(n)
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			break
		}
		if err != nil {
			return fmt.Errorf("memory image %s at %d: %w", path, off, err)
		}
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("memory image %s: %w", path, err)
		}
	}
	return nil
}

func isZero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// Close destroys every domain of a host without a state dir: its guests
// cannot outlive the process that created them. A host with a state dir
// detaches instead: the guests keep running, as domUs do when dom0's
// toolstack stops, and the next OpenHost on the same state dir adopts them.
func (h *Host) Close() error {
	h.mu.Lock()
	h.closed = true
	ds := make([]*Domain, 0, len(h.domains))
	for _, d := range h.domains {
		ds = append(ds, d)
	}
	h.domains = map[string]*Domain{}
	h.mu.Unlock()
	for _, d := range ds {
		if h.stateDir != "" {
			d.detach()
		} else {
			d.destroy()
		}
	}
	h.teardowns.Wait()
	return nil
}

// specFromInfo rebuilds a domain spec on the destination from DomainInfo.
func specFromInfo(info xenmem.DomainInfo) (DomainSpec, error) {
	var spec DomainSpec
	if len(info.Config) > 0 {
		if err := json.Unmarshal(info.Config, &spec); err != nil {
			return DomainSpec{}, fmt.Errorf("domain %s: config is not a sim domain spec: %w", info.Name, err)
		}
	}
	spec.Name = info.Name
	spec.Namespace = info.Namespace
	spec.Labels = info.Labels
	spec.Memory = fmt.Sprint(info.MemoryBytes)
	if info.VCPUs > 0 {
		spec.VCPUs = info.VCPUs
	}
	spec.Image = ""
	spec.Disks = spec.Disks[:0]
	for _, dk := range info.Disks {
		spec.Disks = append(spec.Disks, DiskSpec{ID: dk.ID, Path: dk.Path})
	}
	return spec, nil
}

// newUUID returns a random (version 4) UUID.
func newUUID() string {
	var b [16]byte
	_, _ = crand.Read(b[:])
	b[6] = b[6]&0x0f | 0x40
	b[8] = b[8]&0x3f | 0x80
	return fmt.Sprintf("%x-%x-%x-%x-%x", b[0:4], b[4:6], b[6:8], b[8:10], b[10:16])
}
