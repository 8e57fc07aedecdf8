package sim

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// pauseTimeout bounds how long Pause waits for every vCPU to park. A vCPU
// blocked in a missing-page fault parks only once the page is installed.
const pauseTimeout = 10 * time.Second

// Domain is one simulated domain: a memfd of guest memory mapped in the
// agent, a control page, and a guest process running the vCPUs.
type Domain struct {
	host   *Host
	log    logr.Logger
	id     int
	uuid   string
	spec   DomainSpec
	disks  []xenmem.Disk
	npages uint64

	memFile *os.File
	mem     []byte // agent mapping of guest memory, MAP_SHARED read/write
	ctlFile *os.File
	ctl     ctlPage
	guest   *guestProc

	// opMu serialises life-cycle operations (pause, resume, dirty log,
	// lazy arming, probes, destroy) on this domain and protects the fields
	// up to mu.
	opMu    sync.Mutex
	dirtyOn bool
	regMode uint64                 // uffd registration of guest memory
	scanVec [scanVecLen]pageRegion // PAGEMAP_SCAN output

	// mu protects the fields below.
	mu        sync.Mutex
	state     xenmem.State
	handle    bool // a SourceDomain or TargetDomain handle is open
	paused    bool
	lazy      *lazy
	destroyed bool
	// committed: a source handle told the destination to run this domain
	// (SourceDomain.Commit); it must not run here again until a Reclaim.
	// It outlives the handle, so no later handle or Resume can undo it.
	committed bool
	// lazyPending: pages were missing when the domain resumed (post-copy)
	// and not all have arrived yet; persisted, since only the agent
	// process that started the post-copy can ever serve them.
	lazyPending bool
	// finalWrites/finalReads hold the counters once the control page is gone.
	finalWrites, finalReads uint64
}

// Info describes the domain.
func (d *Domain) Info() xenmem.DomainInfo {
	d.mu.Lock()
	state := d.state
	d.mu.Unlock()
	cfg, _ := json.Marshal(d.spec)
	return xenmem.DomainInfo{
		ID:          d.id,
		Name:        d.spec.Name,
		UUID:        d.uuid,
		MemoryBytes: d.npages * xenmem.PageSize,
		VCPUs:       d.spec.VCPUs,
		Disks:       append([]xenmem.Disk(nil), d.disks...),
		State:       state,
		Namespace:   d.spec.Namespace,
		Labels:      d.spec.Labels,
		Config:      cfg,
	}
}

// Memory is the agent's mapping of guest memory (shared with the guest).
func (d *Domain) Memory() []byte { return d.mem }

// NumPages is the number of 4 KiB guest pages.
func (d *Domain) NumPages() uint64 { return d.npages }

// Ops is the number of workload operations (writes + reads) done so far,
// over every vCPU, including those done on earlier hosts (LoadState).
func (d *Domain) Ops() uint64 {
	w, r := d.Counters()
	return w + r
}

// Counters returns the workload's write and read operation counts.
func (d *Domain) Counters() (writes, reads uint64) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.destroyed {
		return d.finalWrites, d.finalReads
	}
	return d.countersLocked()
}

func (d *Domain) countersLocked() (writes, reads uint64) {
	for i := 0; i < d.spec.VCPUs; i++ {
		writes += d.ctl.load64(vcpuOff(i, vcWrites))
		reads += d.ctl.load64(vcpuOff(i, vcReads))
	}
	return writes, reads
}

// PID is the guest process id.
func (d *Domain) PID() int { return d.guest.pid }

// SetRates changes the workload's write and read rates (MiB/s) while it runs.
func (d *Domain) SetRates(dirtyMiBps, readMiBps float64) {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if d.isDestroyed() {
		return
	}
	d.ctl.storeF(offWRate, dirtyMiBps*256)
	d.ctl.storeF(offRRate, readMiBps*256)
}

// Pause parks every vCPU; when it returns no guest write is in flight.
func (d *Domain) Pause() error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	return d.pauseLocked()
}

func (d *Domain) pauseLocked() error {
	d.mu.Lock()
	if d.destroyed {
		d.mu.Unlock()
		return fmt.Errorf("pause %s: %w", d.spec.Name, xenmem.ErrNoDomain)
	}
	d.mu.Unlock()
	pw := d.ctl.u32(offPause)
	g := atomic.LoadUint32(pw)
	if g&1 == 0 {
		g = atomic.AddUint32(pw, 1)
		futexWake(pw)
		futexWake(d.ctl.u32(offProbeReq)) // vCPU 0 idles on the probe word
	}
	deadline := time.Now().Add(pauseTimeout)
	parkSeq := d.ctl.u32(offParkSeq)
	for {
		seq := atomic.LoadUint32(parkSeq)
		all := true
		for i := 0; i < d.spec.VCPUs; i++ {
			if d.ctl.load32(vcpuOff(i, vcParked)) != g {
				all = false
				break
			}
		}
		if all {
			break
		}
		if !d.guest.alive() {
			return fmt.Errorf("pause %s: %w", d.spec.Name, d.guest.deadError())
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("pause %s: vCPUs did not park within %v (blocked on a missing page that is never installed?)", d.spec.Name, pauseTimeout)
		}
		// Every vCPU bumps the park sequence and wakes us when it parks;
		// seq was read before the check, so no acknowledgement is missed.
		// (time.Sleep would not do: Go rounds short sleeps of an idle
		// process up to a millisecond.)
		futexWait(parkSeq, seq, int64(time.Millisecond))
	}
	d.mu.Lock()
	d.paused = true
	if d.state == xenmem.StateRunning {
		d.state = xenmem.StatePaused
	}
	d.mu.Unlock()
	return nil
}

// Resume lets the vCPUs run.
func (d *Domain) Resume() error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	return d.resumeLocked()
}

func (d *Domain) resumeLocked() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.destroyed {
		return fmt.Errorf("resume %s: %w", d.spec.Name, xenmem.ErrNoDomain)
	}
	if d.committed {
		return fmt.Errorf("resume %s: the destination was told to run it; only a Reclaim resumes it here: %w", d.spec.Name, xenmem.ErrCommitted)
	}
	if !d.guest.alive() {
		return fmt.Errorf("resume %s: %w", d.spec.Name, d.guest.deadError())
	}
	pw := d.ctl.u32(offPause)
	if atomic.LoadUint32(pw)&1 != 0 {
		atomic.AddUint32(pw, 1)
		futexWake(pw)
	}
	d.paused = false
	if d.state == xenmem.StatePaused || d.state == xenmem.StateIncoming {
		d.state = xenmem.StateRunning
	}
	return nil
}

func (d *Domain) isDestroyed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.destroyed
}

// Committed reports whether a migration committed the domain to its
// destination and nothing has resolved that yet (Reclaim or Release).
func (d *Domain) Committed() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.committed
}

// Paused reports whether the vCPUs are parked.
func (d *Domain) Paused() bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.paused
}

// Probe makes vCPU 0 read page pfn through the guest's own mapping and
// returns the FNV-1a hash of what it read. The domain must be running; on a
// lazily loaded domain a missing page blocks the probe until installed.
func (d *Domain) Probe(ctx context.Context, pfn uint64) (uint64, error) {
	if pfn >= d.npages {
		return 0, fmt.Errorf("probe %s: pfn %d out of range (%d pages)", d.spec.Name, pfn, d.npages)
	}
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if d.isDestroyed() {
		return 0, fmt.Errorf("probe %s: %w", d.spec.Name, xenmem.ErrNoDomain)
	}
	d.ctl.store64(offProbePFN, pfn)
	req := atomic.AddUint32(d.ctl.u32(offProbeReq), 1)
	futexWake(d.ctl.u32(offProbeReq))
	// Poll without blocking in a syscall: a goroutine blocked in futex(2)
	// would hold its P, delaying the goroutine that serves this very fault.
	for spins := 0; d.ctl.load32(offProbeAck) != req; spins++ {
		if !d.guest.alive() {
			return 0, fmt.Errorf("probe %s: %w", d.spec.Name, d.guest.deadError())
		}
		if err := ctx.Err(); err != nil {
			return 0, fmt.Errorf("probe %s pfn %d: %w", d.spec.Name, pfn, err)
		}
		// Go rounds sub-millisecond sleeps of an idle process up to 1 ms
		// (epoll timeouts are in ms), so spin with Gosched for a while.
		if spins < 2000 {
			runtime.Gosched()
		} else {
			time.Sleep(100 * time.Microsecond)
		}
	}
	return d.ctl.load64(offProbeRes), nil
}

// PageHash is fnv64 of a page as the agent sees it (to compare with Probe).
func PageHash(page []byte) uint64 { return fnv64(page) }

// vCPU state blob (SaveState/LoadState), little endian:
//
//	off size field
//	  0    8 magic "XFSIMST1"
//	  8    4 vcpus
//	 12    4 reserved (0)
//	 16 32*n per vCPU: write rng, read rng, writes, reads
var stateMagic = binary.LittleEndian.Uint64([]byte("XFSIMST1"))

// ErrBadState is returned by LoadState for a state blob it cannot use.
var ErrBadState = errors.New("sim: bad vCPU state")

func (d *Domain) saveState() ([]byte, error) {
	if !d.Paused() {
		return nil, fmt.Errorf("save state %s: domain is running, pause it first", d.spec.Name)
	}
	n := d.spec.VCPUs
	b := make([]byte, 16+32*n)
	binary.LittleEndian.PutUint64(b, stateMagic)
	binary.LittleEndian.PutUint32(b[8:], uint32(n))
	for i := 0; i < n; i++ {
		o := 16 + 32*i
		binary.LittleEndian.PutUint64(b[o:], d.ctl.load64(vcpuOff(i, vcWRNG)))
		binary.LittleEndian.PutUint64(b[o+8:], d.ctl.load64(vcpuOff(i, vcRRNG)))
		binary.LittleEndian.PutUint64(b[o+16:], d.ctl.load64(vcpuOff(i, vcWrites)))
		binary.LittleEndian.PutUint64(b[o+24:], d.ctl.load64(vcpuOff(i, vcReads)))
	}
	return b, nil
}

func (d *Domain) loadState(b []byte) error {
	if !d.Paused() {
		return fmt.Errorf("load state %s: domain is running", d.spec.Name)
	}
	if len(b) < 16 || binary.LittleEndian.Uint64(b) != stateMagic {
		return fmt.Errorf("load state %s: %w: missing magic", d.spec.Name, ErrBadState)
	}
	n := int(binary.LittleEndian.Uint32(b[8:]))
	if n != d.spec.VCPUs {
		return fmt.Errorf("load state %s: %w: %d vCPUs in state, domain has %d", d.spec.Name, ErrBadState, n, d.spec.VCPUs)
	}
	if len(b) != 16+32*n {
		return fmt.Errorf("load state %s: %w: length %d, want %d", d.spec.Name, ErrBadState, len(b), 16+32*n)
	}
	for i := 0; i < n; i++ {
		o := 16 + 32*i
		d.ctl.store64(vcpuOff(i, vcWRNG), binary.LittleEndian.Uint64(b[o:]))
		d.ctl.store64(vcpuOff(i, vcRRNG), binary.LittleEndian.Uint64(b[o+8:]))
		d.ctl.store64(vcpuOff(i, vcWrites), binary.LittleEndian.Uint64(b[o+16:]))
		d.ctl.store64(vcpuOff(i, vcReads), binary.LittleEndian.Uint64(b[o+24:]))
	}
	return nil
}

// letGo ends the agent's hold on d, once: the operation counters are
// frozen and lazy loading stops serving faults (its registration is the
// guest's to keep or lose). It reports false when d was let go already.
// shutdown marks the domain as gone, as destroy does; detach leaves the
// state the registry has. The caller holds opMu.
func (d *Domain) letGo(shutdown bool) bool {
	d.mu.Lock()
	if d.destroyed {
		d.mu.Unlock()
		return false
	}
	d.finalWrites, d.finalReads = d.countersLocked()
	d.destroyed = true
	if shutdown {
		d.state = xenmem.StateShutdown
	}
	lz := d.lazy
	d.lazy = nil
	d.mu.Unlock()
	if lz != nil {
		lz.stop()
	}
	return true
}

// destroy kills the guest process and unmaps everything. Idempotent.
func (d *Domain) destroy() {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !d.letGo(true) {
		return
	}
	d.teardown()
}

// destroyAsync ends the domain now and frees its resources in the
// background: the guest is sent SIGKILL before it returns (its vCPUs,
// parked, never run again), and the wait for the process to exit, the
// unmapping and the closing of its memory, which together take 40-90 ms
// at 256 MiB on the 2-core development VM, happen after, off the
// migration's critical path, as a Xen hypervisor relinquishes a destroyed
// domain's pages after `xl destroy` returns. Host.Close waits for them.
func (d *Domain) destroyAsync() {
	d.opMu.Lock()
	if !d.letGo(true) {
		d.opMu.Unlock()
		return
	}
	if d.guest != nil {
		d.guest.signalKill()
	}
	h := d.host
	if h != nil {
		h.teardowns.Add(1)
	}
	go func() {
		defer d.opMu.Unlock()
		if h != nil {
			defer h.teardowns.Done()
		}
		d.teardown()
	}()
}

// teardown kills the guest, waits for it and unmaps everything. opMu held,
// the domain let go.
func (d *Domain) teardown() {
	if d.guest != nil {
		d.guest.kill()
	}
	d.unmapFiles()
	if d.host != nil && d.host.stateDir != "" {
		_ = os.Remove(d.host.guestSock(d.spec.Name))
		_ = os.Remove(d.host.guestLog(d.spec.Name))
	}
	d.log.Info("Destroyed domain", "domain", d.spec.Name, "id", d.id)
}
