package sim

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// testSkipZeroFill leaves present zero pages to the fault path (tests).
var testSkipZeroFill atomic.Bool

// faultQueue bounds the faults waiting for the engine; when it is full the
// service loop stops reading the userfaultfd and the kernel holds the rest
// (at most one per blocked guest thread).
const faultQueue = 1024

// lazy is the post-copy state of a target domain: the guest's mapping is
// registered in missing mode on the guest's userfaultfd, which the agent
// holds; the agent reads fault events and installs pages into the guest's
// address space with UFFDIO_COPY/UFFDIO_ZEROPAGE.
type lazy struct {
	d      *Domain
	uffd   int
	base   uint64
	npages uint64

	present  []atomic.Uint64 // bitmap: page installed (or found present)
	nPresent atomic.Uint64

	faults chan xenmem.Fault
	// handler, when set (SetFaultHandler), takes each fault on the
	// service thread instead of the faults channel.
	handler atomic.Pointer[func(xenmem.Fault)]
	// ufd is a duplicate of uffd that the service loop polls and reads on
	// its own locked, real-time thread (postcopy.PinRealtime): the kernel
	// wakes that thread itself when a fault arrives, with no Go scheduler
	// between the fault and its handler. qfd, an eventfd, wakes it to stop.
	ufd, qfd int
	quit     chan struct{}
	done     chan struct{}
	// fillDone is closed when the background zero fill has finished.
	fillDone chan struct{}
	// zeroFilled counts present zero pages filled on a fault.
	zeroFilled atomic.Uint64

	// ioMu is held shared by every ioctl on uffd and exclusively by stop,
	// so the fd is never used after the domain is torn down (and a reused
	// fd number never receives a stray ioctl).
	ioMu      sync.RWMutex
	stopOnce  sync.Once
	closeOnce sync.Once
	closed    atomic.Bool
}

var _ xenmem.Lazy = (*lazy)(nil)

// startLazy arms lazy loading. Precondition: opMu held, domain paused and
// never run on this host.
func (d *Domain) startLazy(present *xenmem.Bitmap) (_ *lazy, retErr error) {
	if err := d.needUffd("start lazy"); err != nil {
		return nil, err
	}
	if present.Len() != d.npages {
		return nil, fmt.Errorf("start lazy %s: present bitmap covers %d pages, domain has %d", d.spec.Name, present.Len(), d.npages)
	}
	d.mu.Lock()
	busy, state := d.lazy != nil, d.state
	d.mu.Unlock()
	if busy {
		return nil, fmt.Errorf("start lazy %s: already armed", d.spec.Name)
	}
	if state != xenmem.StateIncoming {
		return nil, fmt.Errorf("start lazy %s: domain is %s; lazy loading is armed once, before the first resume", d.spec.Name, state)
	}
	// Which pages the memfd's page cache holds (mincore on a shared file
	// mapping reports page-cache residency), one byte per page.
	resident := make([]byte, d.npages)
	if err := mincore(d.mem, resident); err != nil {
		return nil, fmt.Errorf("start lazy %s: mincore: %w", d.spec.Name, err)
	}
	// Missing pages must fault: punch out any copy the page cache holds (a
	// stale pre-copy page that the source sends again later), one call per
	// run of missing pages that has a resident page. This is synchronous:
	// a stale page would be read without a fault.
	fd := int(d.memFile.Fd())
	var punched uint64
	for lo := uint64(0); lo < d.npages; {
		if present.Test(lo) {
			lo++
			continue
		}
		hi, stale := lo, false
		for ; hi < d.npages && !present.Test(hi); hi++ {
			stale = stale || resident[hi]&1 != 0
		}
		if stale {
			if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(lo*xenmem.PageSize), int64((hi-lo)*xenmem.PageSize)); err != nil {
				return nil, fmt.Errorf("start lazy %s: punch out missing pages [%d,%d): %w", d.spec.Name, lo, hi, err)
			}
			punched += hi - lo
		}
		lo = hi
	}
	l := &lazy{
		d: d, uffd: d.guest.uffd, base: d.guest.base, npages: d.npages,
		present: make([]atomic.Uint64, (d.npages+63)/64),
		faults:  make(chan xenmem.Fault, faultQueue),
		done:    make(chan struct{}),
	}
	for i, w := range present.Words() {
		l.present[i].Store(w)
	}
	l.nPresent.Store(present.Count())
	dup, err := unix.FcntlInt(uintptr(l.uffd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("start lazy %s: dup userfaultfd: %w", d.spec.Name, err)
	}
	qfd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		unix.Close(dup)
		return nil, fmt.Errorf("start lazy %s: eventfd: %w", d.spec.Name, err)
	}
	l.ufd, l.qfd = dup, qfd
	l.quit = make(chan struct{})
	if err := d.setRegistration(d.regMode | uffdRegisterModeMissing); err != nil {
		unix.Close(dup)
		unix.Close(qfd)
		return nil, fmt.Errorf("start lazy %s: %w", d.spec.Name, err)
	}
	d.mu.Lock()
	d.lazy = l
	d.mu.Unlock()
	go l.serve()
	// Present pages that are not in the page cache are zero pages never
	// written here. They are made real zero pages in the background, after
	// the domain may already run, to keep this call (part of the downtime)
	// short; a vCPU touching one before that faults and the service loop
	// zero-fills it on the spot without reporting it.
	l.fillDone = make(chan struct{})
	go l.fillZero(present, resident)
	d.log.Info("Armed lazy loading", "domain", d.spec.Name, "presentPages", l.nPresent.Load(), "missingPages", d.npages-l.nPresent.Load(), "stalePagesPunched", punched)
	return l, nil
}

// SetFaultHandler makes the fault service call fn for every fault, on
// its own thread, instead of delivering it on Faults: the engine's demand
// request then leaves from the thread the kernel woke for the fault. Set
// it before the domain first runs. Not part of xenmem.Lazy; reach it with
// a type assertion to interface{ SetFaultHandler(func(xenmem.Fault)) }.
func (l *lazy) SetFaultHandler(fn func(xenmem.Fault)) { l.handler.Store(&fn) }

// serve reads fault events from the userfaultfd and hands them on. It runs
// in the agent, but the faulting threads are the guest's: a stop-the-world
// in the agent never waits for them. It blocks in poll(2) on a locked
// real-time thread (postcopy.PinRealtime), so a fault wakes it at once
// whatever else the cores run.
func (l *lazy) serve() {
	defer close(l.done)
	defer close(l.faults)
	postcopy.PinRealtime(l.d.log, "userfaultfd reader")
	buf := make([]byte, 64*uffdMsgSize)
	fds := []unix.PollFd{{Fd: int32(l.ufd), Events: unix.POLLIN}, {Fd: int32(l.qfd), Events: unix.POLLIN}}
	for {
		fds[0].Revents, fds[1].Revents = 0, 0
		if _, err := unix.Poll(fds, -1); err != nil {
			if err == unix.EINTR {
				continue
			}
			l.d.log.Error(err, "Fault service stopped: poll userfaultfd failed", "domain", l.d.spec.Name)
			return
		}
		if fds[1].Revents != 0 {
			return // stop
		}
		n, rerr := unix.Read(l.ufd, buf)
		if rerr == unix.EAGAIN || rerr == unix.EINTR {
			continue
		}
		if rerr != nil {
			l.d.log.Error(rerr, "Fault service stopped: read userfaultfd failed", "domain", l.d.spec.Name)
			return
		}
		if n == 0 {
			l.d.log.Info("Fault service stopped: userfaultfd closed", "domain", l.d.spec.Name)
			return
		}
		var ts unix.Timespec
		_ = unix.ClockGettime(unix.CLOCK_MONOTONIC, &ts)
		now := ts.Nano()
		for off := 0; off+uffdMsgSize <= n; off += uffdMsgSize {
			m := buf[off : off+uffdMsgSize]
			if m[0] != uffdEventPagefault {
				continue
			}
			flags := binary.NativeEndian.Uint64(m[8:])
			addr := binary.NativeEndian.Uint64(m[16:])
			if addr < l.base {
				continue
			}
			pfn := (addr - l.base) >> xenmem.PageShift
			if pfn >= l.npages {
				continue
			}
			if l.Present(pfn) {
				// Either installed since the fault was raised (the install
				// woke the vCPU; this gets EEXIST) or a present zero page the
				// background fill has not reached: fill it now.
				l.ioMu.RLock()
				if e := uffdZeropage(l.uffd, l.base+pfn*xenmem.PageSize, xenmem.PageSize); e == 0 {
					l.zeroFilled.Add(1)
				}
				l.ioMu.RUnlock()
				continue
			}
			f := xenmem.Fault{PFN: pfn, Write: flags&uffdPagefaultFlagWrite != 0, RaisedNanos: now}
			if h := l.handler.Load(); h != nil {
				(*h)(f)
				continue
			}
			select {
			case l.faults <- f:
			case <-l.quit:
				return
			}
		}
	}
}

// fillZero makes the present pages that the page cache lacks real zero
// pages, one UFFDIO_ZEROPAGE per run; a page that appeared meanwhile (a
// fault filled it) ends the run with EEXIST and the fill moves past it.
func (l *lazy) fillZero(present *xenmem.Bitmap, resident []byte) {
	defer close(l.fillDone)
	if testSkipZeroFill.Load() {
		return
	}
	var filled uint64
	for lo := uint64(0); lo < l.npages; {
		if !present.Test(lo) || resident[lo]&1 != 0 {
			lo++
			continue
		}
		hi := lo + 1
		for hi < l.npages && present.Test(hi) && resident[hi]&1 == 0 {
			hi++
		}
		for lo < hi {
			l.ioMu.RLock()
			if l.closed.Load() {
				l.ioMu.RUnlock()
				return
			}
			arg := uffdioZeropageArg{Range: uffdioRange{l.base + lo*xenmem.PageSize, (hi - lo) * xenmem.PageSize}}
			e := uffdZeropageArg(l.uffd, &arg)
			l.ioMu.RUnlock()
			done := uint64(max(arg.Zeropage, 0)) / xenmem.PageSize
			filled += done
			switch e {
			case 0:
				lo = hi
			case unix.EAGAIN:
				lo += done
			case unix.EEXIST:
				lo += done + 1
			default:
				l.d.log.Error(e, "Zero fill of present pages stopped; faults on them are filled one by one", "domain", l.d.spec.Name, "pfn", lo+done)
				return
			}
		}
	}
	l.d.log.V(1).Info("Filled present zero pages", "domain", l.d.spec.Name, "pages", filled)
}

// Faults delivers missing-page faults; closed by Close.
func (l *lazy) Faults() <-chan xenmem.Fault { return l.faults }

func (l *lazy) markPresent(pfn uint64) {
	bit := uint64(1) << (pfn & 63)
	if l.present[pfn>>6].Or(bit)&bit == 0 {
		l.nPresent.Add(1)
	}
}

// Present reports whether pfn is installed.
func (l *lazy) Present(pfn uint64) bool {
	return pfn < l.npages && l.present[pfn>>6].Load()&(1<<(pfn&63)) != 0
}

// installError explains a failed install of pfn.
func (l *lazy) installError(op string, pfn uint64, e unix.Errno) error {
	if (e == unix.ESRCH || e == unix.ENOENT) && !l.d.guest.alive() {
		return fmt.Errorf("%s %s pfn %d: %w", op, l.d.spec.Name, pfn, l.d.guest.deadError())
	}
	return fmt.Errorf("%s %s pfn %d: %w", op, l.d.spec.Name, pfn, e)
}

// Install copies data (one page) into the missing page pfn atomically and
// wakes the vCPUs waiting on it; a page already present is left alone and
// ErrPageExists returned, even after Close: a late duplicate (the answer to
// a demand request the push had already satisfied) is not an error for the
// caller.
func (l *lazy) Install(pfn uint64, data []byte) error {
	if len(data) != xenmem.PageSize {
		return fmt.Errorf("install %s pfn %d: %d bytes, want %d", l.d.spec.Name, pfn, len(data), xenmem.PageSize)
	}
	return l.installOne("install", pfn, data)
}

// InstallZero makes the missing page pfn a zero page (UFFDIO_ZEROPAGE).
func (l *lazy) InstallZero(pfn uint64) error { return l.installOne("install zero", pfn, nil) }

// installOne is a run of one page that reports a present page as an error.
func (l *lazy) installOne(op string, pfn uint64, data []byte) error {
	var exists [1]bool
	if err := l.InstallRun(pfn, 1, data, exists[:]); err != nil {
		return err
	}
	if exists[0] {
		return fmt.Errorf("%s %s pfn %d: %w", op, l.d.spec.Name, pfn, xenmem.ErrPageExists)
	}
	return nil
}

// InstallRun installs n consecutive pages from first: one UFFDIO_COPY (or
// UFFDIO_ZEROPAGE when data is nil) per stretch of pages not known to be
// present. The kernel stops a call at the first page that exists (it
// returns the bytes done with EAGAIN, or EEXIST when none were); that page
// is marked in exists and the run goes on after it. On this 2-core VM a
// 64-page UFFDIO_COPY costs 0.95 µs a page against 3.3 µs for one call a
// page (docs/benchmarks.md).
func (l *lazy) InstallRun(first uint64, n int, data []byte, exists []bool) error {
	if n <= 0 || len(exists) < n || (data != nil && len(data) != n*xenmem.PageSize) {
		return fmt.Errorf("install run %s at pfn %d: %d pages, %d bytes of data, room for %d flags", l.d.spec.Name, first, n, len(data), len(exists))
	}
	if first >= l.npages || uint64(n) > l.npages-first {
		return fmt.Errorf("install run %s: pfns [%d,%d) out of range (%d pages)", l.d.spec.Name, first, first+uint64(n), l.npages)
	}
	clear(exists[:n])
	l.ioMu.RLock()
	defer l.ioMu.RUnlock()
	op := "install run"
	for i := 0; i < n; {
		if l.Present(first + uint64(i)) {
			exists[i] = true
			i++
			continue
		}
		if l.closed.Load() {
			return fmt.Errorf("%s %s pfn %d: lazy loading is closed", op, l.d.spec.Name, first+uint64(i))
		}
		j := i + 1
		for j < n && !l.Present(first+uint64(j)) {
			j++
		}
		dst := l.base + (first+uint64(i))*xenmem.PageSize
		length := uint64(j-i) * xenmem.PageSize
		var done int64
		var e unix.Errno
		if data != nil {
			arg := uffdioCopyArg{Dst: dst, Src: uint64(uintptr(unsafe.Pointer(&data[i*xenmem.PageSize]))), Len: length}
			_, e = ioctlPtr(l.uffd, uffdioCopy, unsafe.Pointer(&arg))
			done = arg.Copy
		} else {
			arg := uffdioZeropageArg{Range: uffdioRange{dst, length}}
			e = uffdZeropageArg(l.uffd, &arg)
			done = arg.Zeropage
		}
		if done > 0 {
			for k := i; k < i+int(done/xenmem.PageSize); k++ {
				l.markPresent(first + uint64(k))
			}
			i += int(done / xenmem.PageSize)
		}
		switch e {
		case 0, unix.EAGAIN:
			// all done, or stopped early: go on from i
		case unix.EEXIST:
			l.markPresent(first + uint64(i))
			exists[i] = true
			i++
		default:
			return l.installError(op, first+uint64(i), e)
		}
	}
	return nil
}

// PresentCount is the number of pages present.
func (l *lazy) PresentCount() uint64 { return l.nPresent.Load() }

// stop ends the fault service loop. Idempotent.
func (l *lazy) stop() {
	l.stopOnce.Do(func() {
		l.closed.Store(true)
		l.ioMu.Lock() // wait for installs in flight; later ones see closed
		l.ioMu.Unlock()
		close(l.quit)
		var one [8]byte
		binary.NativeEndian.PutUint64(one[:], 1)
		_, _ = unix.Write(l.qfd, one[:]) // wakes the service loop
		<-l.done
		unix.Close(l.ufd)
		unix.Close(l.qfd)
		if l.fillDone != nil {
			<-l.fillDone
		}
	})
}

// ErrPagesMissing is returned by Lazy.Close when pages are still missing;
// the domain keeps its missing-page registration (vCPUs touching them wait)
// and must be destroyed.
var ErrPagesMissing = errors.New("sim: pages still missing")

// Close stops fault delivery. If every page is present the missing-mode
// registration is dropped; otherwise it stays (a vCPU touching a missing
// page waits rather than read a wrong zero page) and ErrPagesMissing is
// returned.
func (l *lazy) Close() error {
	var err error
	l.closeOnce.Do(func() {
		l.stop()
		d := l.d
		d.opMu.Lock()
		defer d.opMu.Unlock()
		d.mu.Lock()
		if d.lazy == l {
			d.lazy = nil
		}
		destroyed := d.destroyed
		d.mu.Unlock()
		if destroyed {
			return
		}
		if missing := l.npages - l.nPresent.Load(); missing > 0 {
			err = fmt.Errorf("close lazy %s: %d: %w", d.spec.Name, missing, ErrPagesMissing)
			return
		}
		if e := d.setRegistration(d.regMode &^ uffdRegisterModeMissing); e != nil {
			err = fmt.Errorf("close lazy %s: %w", d.spec.Name, e)
			return
		}
		d.mu.Lock()
		d.lazyPending = false
		d.mu.Unlock()
		d.host.persistLogged("complete post-copy of " + d.spec.Name)
	})
	return err
}

// PresentBitmap copies the present set into dst (same length): the
// destination's received bitmap, e.g. to resume a post-copy after a broken
// connection. Not part of xenmem.Lazy; reach it with a type assertion to
// interface{ PresentBitmap(*xenmem.Bitmap) error }.
func (l *lazy) PresentBitmap(dst *xenmem.Bitmap) error {
	if dst.Len() != l.npages {
		return fmt.Errorf("present bitmap %s: bitmap covers %d pages, domain has %d", l.d.spec.Name, dst.Len(), l.npages)
	}
	w := dst.Words()
	for i := range l.present {
		w[i] = l.present[i].Load()
	}
	return nil
}
