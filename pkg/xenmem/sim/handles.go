package sim

import (
	"context"
	"fmt"
	"sync"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// OpenSource takes a running domain for an outgoing migration. One handle
// per domain at a time.
func (h *Host) OpenSource(ctx context.Context, name string) (xenmem.SourceDomain, error) {
	sd, err := h.openSource(name)
	if err == nil {
		h.persistLogged("open source " + name)
	}
	return sd, err
}

func (h *Host) openSource(name string) (xenmem.SourceDomain, error) {
	d, ok := h.Domain(name)
	if !ok {
		return nil, fmt.Errorf("open source %s: %w", name, xenmem.ErrNoDomain)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.destroyed {
		return nil, fmt.Errorf("open source %s: %w", name, xenmem.ErrNoDomain)
	}
	if d.handle {
		return nil, fmt.Errorf("open source %s: a migration handle is already open (one migration at a time; wait for it to end)", name)
	}
	if d.state != xenmem.StateRunning && d.state != xenmem.StatePaused {
		return nil, fmt.Errorf("open source %s: domain is %s, want Running or Paused", name, d.state)
	}
	d.handle = true
	d.state = xenmem.StateMigrating
	return &source{d: d}, nil
}

// CreateTarget creates a paused, empty domain to receive info's memory: a
// zero-filled memfd and a guest process whose vCPUs are parked.
func (h *Host) CreateTarget(ctx context.Context, info xenmem.DomainInfo) (_ xenmem.TargetDomain, retErr error) {
	spec, err := specFromInfo(info)
	if err != nil {
		return nil, fmt.Errorf("create target: %w", err)
	}
	if !nameRE.MatchString(spec.Name) {
		return nil, fmt.Errorf("create target: bad domain name %q", spec.Name)
	}
	if info.MemoryBytes == 0 || info.MemoryBytes%xenmem.PageSize != 0 {
		return nil, fmt.Errorf("create target %s: memory %d bytes is not a positive multiple of 4 KiB", spec.Name, info.MemoryBytes)
	}
	if spec.VCPUs < 1 || spec.VCPUs > MaxVCPUs {
		return nil, fmt.Errorf("create target %s: %d vCPUs, want 1..%d", spec.Name, spec.VCPUs, MaxVCPUs)
	}
	if err := h.reserve(spec.Name, info.MemoryBytes); err != nil {
		return nil, fmt.Errorf("create target: %w", err)
	}
	var d *Domain
	defer func() {
		// Runs after the reservation became the domain (below): the
		// registry knows the guest before anyone can resume it.
		if retErr == nil {
			if err := h.persist(); err != nil {
				_ = (&target{d: d}).Destroy()
				retErr = fmt.Errorf("create target %s: %w", spec.Name, err)
			}
		}
	}()
	defer func() {
		if retErr != nil && d != nil {
			d.destroy()
			d = nil
		}
		h.commit(spec.Name, d)
	}()
	disks := append([]xenmem.Disk(nil), info.Disks...)
	if d, err = h.newDomain(spec, disks, info.MemoryBytes); err != nil {
		return nil, fmt.Errorf("create target %s: %w", spec.Name, err)
	}
	if err := d.startGuest(); err != nil {
		return nil, fmt.Errorf("create target %s: %w", spec.Name, err)
	}
	d.state = xenmem.StateIncoming
	d.paused = true
	d.handle = true
	d.uuid = info.UUID // the same domain, moved
	if d.uuid == "" {
		d.uuid = newUUID()
	}
	d.log.Info("Created target domain", "domain", spec.Name, "memoryBytes", info.MemoryBytes, "guestPID", d.guest.pid)
	return &target{d: d}, nil
}

// source is the SourceDomain handle.
type source struct {
	d *Domain
	// mu protects the fields below.
	mu         sync.Mutex
	pausedByMe bool
	// committed: this handle committed the domain (Commit); reclaimed: it
	// then resumed it on a verdict (Reclaim). The domain's own committed
	// flag is what forbids a resume; these say what this handle did.
	committed bool
	reclaimed bool
	released  bool
	closed    bool
}

var _ xenmem.SourceDomain = (*source)(nil)

func (s *source) Info() xenmem.DomainInfo { return s.d.Info() }
func (s *source) NumPages() uint64        { return s.d.npages }
func (s *source) Memory() []byte          { return s.d.mem }

// ReadPages reads the memory file (pread): the kernel copies through its own
// mapping, so the first read of a page costs no fault or first touch of the
// agent's mapping (on the VMs measured here that first touch cost about
// 2.4 µs a page, 0.6 s per GiB; docs/benchmarks.md).
func (s *source) ReadPages(first uint64, dst []byte) error {
	n := uint64(len(dst)) / xenmem.PageSize
	if uint64(len(dst))%xenmem.PageSize != 0 || first >= s.d.npages || n > s.d.npages-first {
		return fmt.Errorf("read pages %s: %d bytes at pfn %d of %d pages", s.d.spec.Name, len(dst), first, s.d.npages)
	}
	if _, err := s.d.memFile.ReadAt(dst, int64(first*xenmem.PageSize)); err != nil {
		return fmt.Errorf("read pages %s at pfn %d: %w", s.d.spec.Name, first, err)
	}
	return nil
}
func (s *source) EnableDirtyLog() error { return s.d.EnableDirtyLog() }
func (s *source) ReadDirty(dst *xenmem.Bitmap) error {
	return s.d.ReadDirty(dst)
}
func (s *source) DisableDirtyLog() error { return s.d.DisableDirtyLog() }
func (s *source) Ops() uint64            { return s.d.Ops() }

func (s *source) Pause() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released || s.closed {
		return fmt.Errorf("pause %s: handle is closed", s.d.spec.Name)
	}
	wasPaused := s.d.Paused()
	if err := s.d.Pause(); err != nil {
		return err
	}
	if !wasPaused {
		s.pausedByMe = true
	}
	return nil
}

func (s *source) Resume() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released || s.closed {
		return fmt.Errorf("resume %s: handle is closed", s.d.spec.Name)
	}
	if err := s.d.Resume(); err != nil {
		return err
	}
	s.pausedByMe = false
	return nil
}

// Commit marks the domain as handed to the destination. It must be
// paused; a domain that an earlier handle committed and nobody resolved
// is refused, so a second migration can never send it to a second host.
func (s *source) Commit() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released || s.closed {
		return fmt.Errorf("commit %s: handle is closed", s.d.spec.Name)
	}
	if s.committed {
		return nil
	}
	d := s.d
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	defer d.mu.Unlock()
	switch {
	case d.destroyed:
		return fmt.Errorf("commit %s: %w", d.spec.Name, xenmem.ErrNoDomain)
	case d.committed:
		return fmt.Errorf("commit %s: an earlier migration committed it and nothing resolved that (Reclaim or Release first): %w", d.spec.Name, xenmem.ErrCommitted)
	case !d.paused:
		return fmt.Errorf("commit %s: the domain is running; pause it before the destination is told to run it", d.spec.Name)
	}
	d.committed = true
	s.committed = true
	d.log.Info("Committed domain to its destination; it stays paused here", "domain", d.spec.Name)
	return nil
}

// Reclaim resumes a committed domain on a verdict that the destination
// does not and never will run it.
func (s *source) Reclaim(reason string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released {
		return fmt.Errorf("reclaim %s: released: %w", s.d.spec.Name, xenmem.ErrNoDomain)
	}
	if s.closed {
		return fmt.Errorf("reclaim %s: handle is closed", s.d.spec.Name)
	}
	d := s.d
	d.opMu.Lock()
	defer d.opMu.Unlock()
	d.mu.Lock()
	committed := d.committed
	d.mu.Unlock()
	if !committed {
		return fmt.Errorf("reclaim %s: the domain is not committed to a destination (nothing to reclaim; Resume resumes it)", d.spec.Name)
	}
	d.mu.Lock()
	d.committed = false
	d.mu.Unlock()
	if err := d.resumeLocked(); err != nil {
		d.mu.Lock()
		d.committed = true
		d.mu.Unlock()
		return fmt.Errorf("reclaim %s: %w", d.spec.Name, err)
	}
	s.committed, s.reclaimed, s.pausedByMe = false, true, false
	d.host.persistLogged("reclaim " + d.spec.Name)
	d.log.Info("Reclaimed domain: it runs here again", "domain", d.spec.Name, "reason", reason)
	return nil
}

func (s *source) SaveState() ([]byte, error) { return s.d.saveState() }

// Release destroys the domain after it runs elsewhere. A domain this
// handle reclaimed runs here again and is not released.
func (s *source) Release() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.released {
		return nil
	}
	if s.reclaimed {
		return fmt.Errorf("release %s: it was reclaimed and runs here", s.d.spec.Name)
	}
	s.released = true
	s.d.destroyAsync()
	s.d.host.remove(s.d)
	return nil
}

// Close drops the handle. Dirty logging is switched off. A domain not
// released and not committed keeps running: if this handle paused it, it
// is resumed. A committed domain stays paused, whatever the migration's
// outcome: the destination may run it.
func (s *source) Close() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return nil
	}
	s.closed = true
	if s.released {
		return nil
	}
	d := s.d
	var err error
	d.opMu.Lock()
	if e := d.disableDirtyLogLocked(); e != nil {
		err = e
	}
	if s.pausedByMe && !s.committed && !d.Committed() {
		if e := d.resumeLocked(); e != nil && err == nil {
			err = e
		}
	}
	d.opMu.Unlock()
	d.mu.Lock()
	d.handle = false
	if d.state == xenmem.StateMigrating {
		if d.paused {
			d.state = xenmem.StatePaused
		} else {
			d.state = xenmem.StateRunning
		}
	}
	d.mu.Unlock()
	d.host.persistLogged("close source " + d.spec.Name)
	if err != nil {
		return fmt.Errorf("close source %s: %w", d.spec.Name, err)
	}
	return nil
}

// target is the TargetDomain handle.
type target struct {
	d *Domain
	// mu protects the fields below.
	mu        sync.Mutex
	resumed   bool
	destroyed bool
	closed    bool
}

var _ xenmem.TargetDomain = (*target)(nil)

func (t *target) Info() xenmem.DomainInfo { return t.d.Info() }
func (t *target) NumPages() uint64        { return t.d.npages }
func (t *target) Memory() []byte          { return t.d.mem }
func (t *target) Ops() uint64             { return t.d.Ops() }

// WritePages writes each run of consecutive pages with one pwrite on the
// memory file: the kernel copies through its own mapping, so the agent's
// mapping takes no page fault per page (on the VMs measured here a first
// store into a mapped page cost 4-12 µs; a 1 MiB pwrite into a fresh memfd
// 0.2 µs a page; docs/benchmarks.md).
func (t *target) WritePages(pfns []uint64, data []byte) error {
	if len(data) != len(pfns)*xenmem.PageSize {
		return fmt.Errorf("write pages %s: %d pfns with %d bytes of data", t.d.spec.Name, len(pfns), len(data))
	}
	t.mu.Lock()
	bad := t.resumed || t.destroyed || t.closed
	t.mu.Unlock()
	if bad {
		return fmt.Errorf("write pages %s: domain resumed or handle closed", t.d.spec.Name)
	}
	return xenmem.Runs(pfns, func(i, j int) error {
		if pfns[i] >= t.d.npages || pfns[j-1] >= t.d.npages {
			return fmt.Errorf("write pages %s: pfn %d beyond %d pages", t.d.spec.Name, max(pfns[i], pfns[j-1]), t.d.npages)
		}
		if _, err := t.d.memFile.WriteAt(data[i*xenmem.PageSize:j*xenmem.PageSize], int64(pfns[i]*xenmem.PageSize)); err != nil {
			return fmt.Errorf("write pages %s at pfn %d: %w", t.d.spec.Name, pfns[i], err)
		}
		return nil
	})
}

func (t *target) LoadState(state []byte) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.resumed {
		return fmt.Errorf("load state %s: domain already resumed", t.d.spec.Name)
	}
	return t.d.loadState(state)
}

func (t *target) StartLazy(present *xenmem.Bitmap) (xenmem.Lazy, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.resumed || t.destroyed || t.closed {
		return nil, fmt.Errorf("start lazy %s: call it once, before Resume", t.d.spec.Name)
	}
	// Durable before any page can be missing in a running guest: a
	// restarted agent must never drop the missing-page registration.
	t.d.mu.Lock()
	t.d.lazyPending = true
	t.d.mu.Unlock()
	if err := t.d.host.persist(); err != nil {
		t.d.mu.Lock()
		t.d.lazyPending = false
		t.d.mu.Unlock()
		return nil, fmt.Errorf("start lazy %s: %w", t.d.spec.Name, err)
	}
	t.d.opMu.Lock()
	defer t.d.opMu.Unlock()
	return t.d.startLazy(present)
}

func (t *target) Resume() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.destroyed || t.closed {
		return fmt.Errorf("resume %s: handle is closed", t.d.spec.Name)
	}
	// The registry stops calling it incoming (which adoption destroys)
	// before its vCPUs run.
	d := t.d
	d.mu.Lock()
	wasIncoming := d.state == xenmem.StateIncoming
	if wasIncoming {
		d.state = xenmem.StatePaused
	}
	d.mu.Unlock()
	if wasIncoming {
		if err := d.host.persist(); err != nil {
			d.mu.Lock()
			d.state = xenmem.StateIncoming
			d.mu.Unlock()
			return fmt.Errorf("resume %s: %w", d.spec.Name, err)
		}
	}
	if err := t.d.Resume(); err != nil {
		return err
	}
	t.resumed = true
	t.d.log.Info("Resumed domain on target", "domain", t.d.spec.Name)
	return nil
}

// Destroy removes the domain and everything created for it.
func (t *target) Destroy() error {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.destroyed {
		return nil
	}
	t.destroyed = true
	t.d.destroy()
	t.d.host.remove(t.d)
	return nil
}

// Close drops the handle. A target that was never resumed is destroyed
// (nothing half-created stays behind); a resumed one keeps running.
func (t *target) Close() error {
	t.mu.Lock()
	if t.closed {
		t.mu.Unlock()
		return nil
	}
	t.closed = true
	resumed, destroyed := t.resumed, t.destroyed
	t.mu.Unlock()
	if !resumed && !destroyed {
		t.mu.Lock()
		t.destroyed = true
		t.mu.Unlock()
		t.d.destroy()
		t.d.host.remove(t.d)
		return nil
	}
	t.d.mu.Lock()
	t.d.handle = false
	t.d.mu.Unlock()
	return nil
}
