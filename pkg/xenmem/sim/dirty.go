package sim

import (
	"fmt"

	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Dirty logging uses the guest's userfaultfd in asynchronous write-protect
// mode (UFFD_FEATURE_WP_ASYNC) and the PAGEMAP_SCAN ioctl on the guest's
// /proc/<pid>/pagemap; see the package documentation for why.

// scanVecLen bounds the regions returned per PAGEMAP_SCAN call; the scan
// resumes from walk_end when it fills.
const scanVecLen = 512

func (d *Domain) needUffd(op string) error {
	if d.isDestroyed() {
		return fmt.Errorf("%s %s: %w", op, d.spec.Name, xenmem.ErrNoDomain)
	}
	if d.guest.uffd < 0 {
		return fmt.Errorf("%s %s: %w: %v", op, d.spec.Name, xenmem.ErrNotSupported, d.guest.uffdErr)
	}
	if !d.guest.alive() {
		return fmt.Errorf("%s %s: %w", op, d.spec.Name, d.guest.deadError())
	}
	return nil
}

// setRegistration registers the guest mapping with the given uffd modes (0
// unregisters). Precondition: opMu held.
func (d *Domain) setRegistration(mode uint64) error {
	size := d.npages * xenmem.PageSize
	if mode == 0 {
		if d.regMode != 0 {
			if err := uffdUnregister(d.guest.uffd, d.guest.base, size); err != nil {
				return err
			}
		}
	} else if err := uffdRegister(d.guest.uffd, d.guest.base, size, mode); err != nil {
		return err
	}
	d.regMode = mode
	return nil
}

// EnableDirtyLog write-protects all guest memory; from now on the first
// guest write to each page marks it written (the kernel resolves the fault
// itself, the guest does not wait for the agent).
func (d *Domain) EnableDirtyLog() error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if err := d.needUffd("enable dirty log"); err != nil {
		return err
	}
	if d.dirtyOn {
		return fmt.Errorf("enable dirty log %s: already enabled", d.spec.Name)
	}
	if err := d.setRegistration(d.regMode | uffdRegisterModeWP); err != nil {
		return fmt.Errorf("enable dirty log %s: %w", d.spec.Name, err)
	}
	if err := uffdWriteprotect(d.guest.uffd, d.guest.base, d.npages*xenmem.PageSize, true); err != nil {
		_ = d.setRegistration(d.regMode &^ uffdRegisterModeWP)
		return fmt.Errorf("enable dirty log %s: %w", d.spec.Name, err)
	}
	d.dirtyOn = true
	return nil
}

// ReadDirty ORs into dst every page written since the previous call (or
// EnableDirtyLog) and write-protects those pages again. Reading and
// re-protecting happen in one page-table walk under the page-table lock, so
// a concurrent guest write is reported by this call or the next one.
func (d *Domain) ReadDirty(dst *xenmem.Bitmap) error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	if !d.dirtyOn {
		return fmt.Errorf("read dirty %s: dirty log not enabled", d.spec.Name)
	}
	if dst.Len() != d.npages {
		return fmt.Errorf("read dirty %s: bitmap covers %d pages, domain has %d", d.spec.Name, dst.Len(), d.npages)
	}
	if err := d.needUffd("read dirty"); err != nil {
		return err
	}
	base := d.guest.base
	err := pagemapScanWritten(int(d.guest.pagemap.Fd()), base, base+d.npages*xenmem.PageSize, d.scanVec[:], func(start, end uint64) {
		setRange(dst, (start-base)>>xenmem.PageShift, (end-base)>>xenmem.PageShift)
	})
	if err != nil {
		return fmt.Errorf("read dirty %s: %w", d.spec.Name, err)
	}
	return nil
}

// DisableDirtyLog removes write protection and stops tracking.
func (d *Domain) DisableDirtyLog() error {
	d.opMu.Lock()
	defer d.opMu.Unlock()
	return d.disableDirtyLogLocked()
}

func (d *Domain) disableDirtyLogLocked() error {
	if !d.dirtyOn {
		return nil
	}
	if err := d.needUffd("disable dirty log"); err != nil {
		return err
	}
	if err := uffdWriteprotect(d.guest.uffd, d.guest.base, d.npages*xenmem.PageSize, false); err != nil {
		return fmt.Errorf("disable dirty log %s: %w", d.spec.Name, err)
	}
	if err := d.setRegistration(d.regMode &^ uffdRegisterModeWP); err != nil {
		return fmt.Errorf("disable dirty log %s: %w", d.spec.Name, err)
	}
	d.dirtyOn = false
	return nil
}

// setRange sets pfns [lo,hi) in b, a word at a time.
func setRange(b *xenmem.Bitmap, lo, hi uint64) {
	hi = min(hi, b.Len())
	w := b.Words()
	for lo < hi {
		if lo&63 == 0 && hi-lo >= 64 {
			w[lo>>6] = ^uint64(0)
			lo += 64
			continue
		}
		w[lo>>6] |= 1 << (lo & 63)
		lo++
	}
}
