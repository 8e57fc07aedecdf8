package paging

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers of Linux's Xen drivers (include/uapi/xen/privcmd.h,
// evtchn.h): _IOC(_IOC_NONE, type, nr, size).
const (
	ioctlPrivcmdHypercall    = 0x00305000 // 'P' 0, struct privcmd_hypercall (48)
	ioctlPrivcmdMmapBatchV2  = 0x00205004 // 'P' 4, struct privcmd_mmapbatch_v2 (32)
	ioctlEvtchnBindInterdom  = 0x00084501 // 'E' 1, {remote_domain, remote_port}
	ioctlEvtchnUnbind        = 0x00044503 // 'E' 3, {port}
	ioctlEvtchnNotify        = 0x00044504 // 'E' 4, {port}
	hypercallBufSize         = 16 * PageSize
	bufPage                  = 0 // the page Install copies from
	bufArgs                  = PageSize
	bufExtents               = 2 * PageSize // xen_pfn_t[] for reservations
	maxExtentsPerReservation = PageSize / 8
	// A multicall of paging ops: entries {op, result, args[6]} (64
	// bytes each), then the xen_mem_paging_op each one points at.
	bufMulti         = 4 * PageSize
	multicallEntry   = 64
	hypercallMulti   = 13
	MaxPagingOpBatch = (hypercallBufSize - bufMulti) / (multicallEntry + pagingOpSize)
)

// hypervisor is dom0's handle on Xen: privcmd for hypercalls and foreign
// mappings, and one buffer from /dev/xen/hypercall (memory Xen may read
// and write while the hypercall runs; ordinary process memory can be
// paged or moved under it). One caller at a time: mu guards the buffer.
type hypervisor struct {
	privcmd *os.File
	hbuf    []byte
	mu      sync.Mutex
	domctlV uint32
}

func openHypervisor() (*hypervisor, error) {
	pc, err := os.OpenFile("/dev/xen/privcmd", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("%w: open /dev/xen/privcmd: %v (not dom0, or xen-privcmd not loaded)", ErrUnsupported, err)
	}
	hc, err := os.OpenFile("/dev/xen/hypercall", os.O_RDWR, 0)
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("%w: open /dev/xen/hypercall: %v", ErrUnsupported, err)
	}
	buf, err := unix.Mmap(int(hc.Fd()), 0, hypercallBufSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	hc.Close() // the mapping keeps the buffer
	if err != nil {
		pc.Close()
		return nil, fmt.Errorf("map a hypercall buffer: %w", err)
	}
	h := &hypervisor{privcmd: pc, hbuf: buf}
	if err := h.findDomctlVersion(); err != nil {
		h.close()
		return nil, err
	}
	return h, nil
}

func (h *hypervisor) close() {
	if h.hbuf != nil {
		_ = unix.Munmap(h.hbuf)
		h.hbuf = nil
	}
	h.privcmd.Close()
}

func (h *hypervisor) addr(off int) uint64 { return uint64(uintptr(unsafe.Pointer(&h.hbuf[off]))) }

// hypercall issues op with args through privcmd; Xen's negative return is
// the errno.
func (h *hypervisor) hypercall(op uint64, args ...uint64) (int64, error) {
	var hc struct {
		op  uint64
		arg [5]uint64
	}
	hc.op = op
	copy(hc.arg[:], args)
	r, _, e := unix.Syscall(unix.SYS_IOCTL, h.privcmd.Fd(), ioctlPrivcmdHypercall, uintptr(unsafe.Pointer(&hc)))
	if e != 0 {
		return -1, e
	}
	return int64(r), nil
}

// domctl runs cmd on dom with the payload written by fill into the
// domctl's union; read, when set, sees the domctl after the call.
func (h *hypervisor) domctl(cmd uint32, dom uint16, fill func(p []byte), read func(d []byte)) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.domctlLocked(h.domctlV, cmd, dom, fill, read)
}

func (h *hypervisor) domctlLocked(version, cmd uint32, dom uint16, fill func(p []byte), read func(d []byte)) error {
	d := h.hbuf[bufArgs : bufArgs+domctlSize]
	clear(d)
	le := binary.LittleEndian
	le.PutUint32(d[0:], cmd)
	le.PutUint32(d[4:], version)
	le.PutUint16(d[8:], dom)
	if fill != nil {
		fill(d[domctlPayload:])
	}
	if _, err := h.hypercall(hypercallDomctl, h.addr(bufArgs)); err != nil {
		return err
	}
	if read != nil {
		read(d)
	}
	return nil
}

// findDomctlVersion asks for dom0's own info with each known interface
// version; Xen refuses a version it does not speak with EACCES.
func (h *hypervisor) findDomctlVersion() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	var last error
	for _, v := range domctlVersions {
		err := h.domctlLocked(v, domctlGetDomainInfo, 0, nil, nil)
		if err == nil {
			h.domctlV = v
			return nil
		}
		if !errors.Is(err, unix.EACCES) {
			return fmt.Errorf("getdomaininfo of dom0: %w", err)
		}
		last = err
	}
	return fmt.Errorf("%w: the hypervisor speaks none of the domctl interface versions %#x (%v)", ErrUnsupported, domctlVersions, last)
}

// DomainInfo is what the pager needs to know of a domain.
type DomainInfo struct {
	HVM, HAP, Paused   bool
	TotPages, MaxPages uint64
}

func (h *hypervisor) domainInfo(dom uint16) (DomainInfo, error) {
	var di DomainInfo
	err := h.domctl(domctlGetDomainInfo, dom, nil, func(d []byte) {
		le := binary.LittleEndian
		if le.Uint16(d[domctlPayload:]) != dom {
			return // getdomaininfo answers the next domain when dom is gone
		}
		f := le.Uint32(d[domInfoFlagsOffset:])
		di = DomainInfo{HVM: f&domInfoHVM != 0, HAP: f&domInfoHAP != 0, Paused: f&domInfoPaused != 0,
			TotPages: le.Uint64(d[domInfoTotPagesOffset:]), MaxPages: le.Uint64(d[domInfoMaxPagesOffset:])}
	})
	if err != nil {
		return di, fmt.Errorf("getdomaininfo of domain %d: %w", dom, err)
	}
	if di.MaxPages == 0 {
		return di, fmt.Errorf("domain %d: %w", dom, unix.ESRCH)
	}
	return di, nil
}

func (h *hypervisor) pause(dom uint16, on bool) error {
	cmd := uint32(domctlUnpauseDomain)
	if on {
		cmd = domctlPauseDomain
	}
	return h.domctl(cmd, dom, nil, nil)
}

// vmEventPaging enables (returning Xen's event channel port) or disables
// the paging ring of dom.
func (h *hypervisor) vmEventPaging(dom uint16, enable bool) (uint32, error) {
	op := uint32(vmEventDisable)
	if enable {
		op = vmEventEnable
	}
	var port uint32
	err := h.domctl(domctlVMEventOp, dom, func(p []byte) {
		binary.LittleEndian.PutUint32(p[0:], op)
		binary.LittleEndian.PutUint32(p[4:], vmEventModePaging)
	}, func(d []byte) { port = binary.LittleEndian.Uint32(d[domctlPayload+8:]) })
	return port, err
}

func (h *hypervisor) hvmParam(dom uint16, index uint32) (uint64, error) {
	h.mu.Lock()
	defer h.mu.Unlock()
	p := h.hbuf[bufArgs : bufArgs+hvmParamSize]
	clear(p)
	le := binary.LittleEndian
	le.PutUint16(p[0:], dom)
	le.PutUint32(p[4:], index)
	if _, err := h.hypercall(hypercallHVMOp, hvmGetParam, h.addr(bufArgs)); err != nil {
		return 0, fmt.Errorf("get HVM param %d of domain %d: %w", index, dom, err)
	}
	return le.Uint64(p[8:]), nil
}

// reservation populates (or, with decrease, frees) the given gfns of dom,
// at most maxExtentsPerReservation at a time. It returns how many were
// done; Xen stops at the first it cannot do.
func (h *hypervisor) reservation(dom uint16, gfns []uint64, decrease bool) (int, error) {
	if len(gfns) > maxExtentsPerReservation {
		return 0, fmt.Errorf("reservation of %d extents, at most %d", len(gfns), maxExtentsPerReservation)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	le := binary.LittleEndian
	for i, g := range gfns {
		le.PutUint64(h.hbuf[bufExtents+8*i:], g)
	}
	r := h.hbuf[bufArgs : bufArgs+reservationSize]
	clear(r)
	le.PutUint64(r[0:], h.addr(bufExtents))
	le.PutUint64(r[8:], uint64(len(gfns)))
	le.PutUint16(r[24:], dom)
	cmd := uint64(memPopulatePhysmap)
	if decrease {
		cmd = memDecreaseReservation
	}
	n, err := h.hypercall(hypercallMemoryOp, cmd, h.addr(bufArgs))
	if err != nil {
		return 0, err
	}
	return int(n), nil
}

// pagingOp runs one XENMEM_paging_op; for prep, page (when not nil) is the
// contents Xen copies into the fresh frame.
func (h *hypervisor) pagingOp(dom uint16, op uint8, gfn uint64, page []byte) error {
	h.mu.Lock()
	defer h.mu.Unlock()
	le := binary.LittleEndian
	p := h.hbuf[bufArgs : bufArgs+pagingOpSize]
	clear(p)
	p[0] = op
	le.PutUint16(p[2:], dom)
	if page != nil {
		copy(h.hbuf[bufPage:bufPage+PageSize], page)
		le.PutUint64(p[8:], h.addr(bufPage))
	}
	le.PutUint64(p[16:], gfn)
	_, err := h.hypercall(hypercallMemoryOp, memPagingOp, h.addr(bufArgs))
	return err
}

// pagingOps runs ops[i] on gfns[i] in one multicall, in order, and returns
// each op's result (0 or a negative errno).
func (h *hypervisor) pagingOps(dom uint16, ops []uint8, gfns []uint64) ([]int64, error) {
	n := len(ops)
	if n == 0 || n != len(gfns) || n > MaxPagingOpBatch {
		return nil, fmt.Errorf("paging: batch of %d ops for %d gfns (at most %d)", n, len(gfns), MaxPagingOpBatch)
	}
	h.mu.Lock()
	defer h.mu.Unlock()
	le := binary.LittleEndian
	ents := h.hbuf[bufMulti : bufMulti+n*multicallEntry]
	argOff := bufMulti + n*multicallEntry
	clear(h.hbuf[bufMulti : argOff+n*pagingOpSize])
	for i := range ops {
		a := argOff + i*pagingOpSize
		h.hbuf[a] = ops[i]
		le.PutUint16(h.hbuf[a+2:], dom)
		le.PutUint64(h.hbuf[a+16:], gfns[i])
		e := ents[i*multicallEntry:]
		le.PutUint64(e[0:], hypercallMemoryOp)
		le.PutUint64(e[16:], memPagingOp)
		le.PutUint64(e[24:], h.addr(a))
	}
	if _, err := h.hypercall(hypercallMulti, h.addr(bufMulti), uint64(n)); err != nil {
		return nil, fmt.Errorf("multicall of %d paging ops: %w", n, err)
	}
	res := make([]int64, n)
	for i := range res {
		res[i] = int64(le.Uint64(ents[i*multicallEntry+8:]))
	}
	return res, nil
}

// mapForeign maps gfns of dom into this process, read-write; errs[i] is
// the per-page error (ENOENT for a paged-out gfn, which also asks the pager
// for it). The caller unmaps with unix.Munmap.
func (h *hypervisor) mapForeign(dom uint16, gfns []uint64) ([]byte, []int32, error) {
	if len(gfns) == 0 {
		return nil, nil, errors.New("map of no gfns")
	}
	mem, err := unix.Mmap(int(h.privcmd.Fd()), 0, len(gfns)*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return nil, nil, fmt.Errorf("reserve %d pages for a foreign mapping: %w", len(gfns), err)
	}
	arr := make([]uint64, len(gfns))
	copy(arr, gfns)
	errs := make([]int32, len(gfns))
	var mb struct {
		num  uint32
		dom  uint16
		_    uint16
		addr uint64
		arr  uintptr
		err  uintptr
	}
	mb.num, mb.dom = uint32(len(gfns)), dom
	mb.addr = uint64(uintptr(unsafe.Pointer(&mem[0])))
	mb.arr, mb.err = uintptr(unsafe.Pointer(&arr[0])), uintptr(unsafe.Pointer(&errs[0]))
	_, _, e := unix.Syscall(unix.SYS_IOCTL, h.privcmd.Fd(), ioctlPrivcmdMmapBatchV2, uintptr(unsafe.Pointer(&mb)))
	if e != 0 && e != unix.ENOENT {
		_ = unix.Munmap(mem)
		return nil, nil, fmt.Errorf("map %d gfns of domain %d: %w", len(gfns), dom, e)
	}
	return mem, errs, nil
}

// evtchn is a bound interdomain event channel. The fd is used raw, with
// poll: a blocking read would not return when another goroutine closes it.
type evtchn struct {
	fd     int
	port   uint32
	closed atomic.Bool
}

func bindEvtchn(dom uint16, remote uint32) (*evtchn, error) {
	fd, err := unix.Open("/dev/xen/evtchn", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open /dev/xen/evtchn: %w", err)
	}
	b := [2]uint32{uint32(dom), remote}
	r, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), ioctlEvtchnBindInterdom, uintptr(unsafe.Pointer(&b)))
	if e != 0 {
		unix.Close(fd)
		return nil, fmt.Errorf("bind to port %d of domain %d: %w", remote, dom, e)
	}
	return &evtchn{fd: fd, port: uint32(r)}, nil
}

// errEvtchnClosed: wait ended because close was called.
var errEvtchnClosed = errors.New("event channel closed")

// wait blocks until the port fires (then unmasks it) or close is called.
func (c *evtchn) wait() error {
	for {
		if c.closed.Load() {
			return errEvtchnClosed
		}
		pfd := []unix.PollFd{{Fd: int32(c.fd), Events: unix.POLLIN}}
		n, err := unix.Poll(pfd, 100)
		if err == unix.EINTR || n == 0 {
			continue
		}
		if err != nil {
			return fmt.Errorf("poll event channel: %w", err)
		}
		var b [4]byte
		if _, err := unix.Read(c.fd, b[:]); err != nil {
			if err == unix.EAGAIN || err == unix.EINTR {
				continue
			}
			return fmt.Errorf("read event channel: %w", err)
		}
		if _, err := unix.Write(c.fd, b[:]); err != nil {
			return fmt.Errorf("unmask event channel: %w", err)
		}
		return nil
	}
}

func (c *evtchn) notify() error {
	p := c.port
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), ioctlEvtchnNotify, uintptr(unsafe.Pointer(&p))); e != 0 {
		return fmt.Errorf("notify event channel %d: %w", c.port, e)
	}
	return nil
}

// stop makes wait return; the port stays bound until close.
func (c *evtchn) stop() { c.closed.Store(true) }

func (c *evtchn) close() {
	c.closed.Store(true)
	p := c.port
	_, _, _ = unix.Syscall(unix.SYS_IOCTL, uintptr(c.fd), ioctlEvtchnUnbind, uintptr(unsafe.Pointer(&p)))
	unix.Close(c.fd)
}
