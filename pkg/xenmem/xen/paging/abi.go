// Package paging is xenferry's pager for Xen's memory paging (the vm_event
// paging ring): it makes guest frames of an HVM or PVH domain "paged out"
// (present in the p2m, no memory behind them) and answers the domain's
// accesses to them by installing their contents, which is what early
// resume on Xen needs (docs/xen-postcopy.md).
//
// It talks to Xen through dom0's /dev/xen/privcmd, /dev/xen/hypercall and
// /dev/xen/evtchn directly rather than through libxenctrl: libxenctrl is
// versioned per Xen release (libxenctrl.so.4.17, .4.18, ...) and would tie
// the agent to cgo and to one dom0's library, while the hypercall ABI used
// here is a handful of fixed-layout structures. The one versioned part, the
// domctl interface version, is probed at open.
//
// A hypervisor built without CONFIG_MEM_PAGING (every distribution's: Xen
// marks it UNSUPPORTED) answers the paging calls with ENOSYS; Probe says
// so, and the agent then does not offer early resume.
package paging

import "errors"

// PageSize is the size of a guest frame.
const PageSize = 4096

// Hypercall numbers (xen/include/public/xen.h).
const (
	hypercallMemoryOp   = 12
	hypercallXenVersion = 17
	hypercallHVMOp      = 34
	hypercallDomctl     = 36
)

// domctl (xen/include/public/domctl.h): struct xen_domctl is {cmd u32,
// interface_version u32, domain u16, pad, union u (128 bytes) at 16}.
const (
	domctlSize            = 144
	domctlPayload         = 16
	domctlPauseDomain     = 3
	domctlUnpauseDomain   = 4
	domctlGetDomainInfo   = 5
	domctlVMEventOp       = 56
	vmEventEnable         = 0
	vmEventDisable        = 1
	vmEventModePaging     = 1
	domInfoFlagsOffset    = domctlPayload + 4 // xen_domctl_getdomaininfo.flags
	domInfoTotPagesOffset = domctlPayload + 8
	domInfoMaxPagesOffset = domctlPayload + 16
	domInfoHVM            = 1 << 1
	domInfoPaused         = 1 << 3
	domInfoHAP            = 1 << 8
)

// Domctl interface versions of the Xen releases this pager knows (4.13 to
// 4.20): the one the running hypervisor accepts is found by trying them.
var domctlVersions = []uint32{0x15, 0x16, 0x17, 0x14, 0x13, 0x12}

// Memory ops (xen/include/public/memory.h).
const (
	memDecreaseReservation = 1
	memPopulatePhysmap     = 6
	memPagingOp            = 20
	pagingNominate         = 0
	pagingEvict            = 1
	pagingPrep             = 2
	// struct xen_mem_paging_op {op u8, domain u16 at 2, buffer u64 at 8,
	// gfn u64 at 16}.
	pagingOpSize = 24
	// struct xen_memory_reservation {extent_start at 0, nr_extents at 8,
	// extent_order at 16, mem_flags at 20, domid at 24}.
	reservationSize = 32
)

// HVM params (xen/include/public/hvm/params.h, hvm_op.h): struct
// xen_hvm_param {domid u16, index u32 at 4, value u64 at 8}.
const (
	hvmGetParam        = 1
	hvmParamSize       = 16
	hvmParamPagingRing = 27
)

// The vm_event ring (xen/include/public/vm_event.h, io/ring.h) for
// interface version 7 (Xen 4.13 and later): a shared ring of one page, the
// four indexes and 48 bytes of padding, then entries of 400 bytes (the
// union of request and response); 8 of them fit.
const (
	VMEventInterfaceVersion = 7
	ringHeader              = 64
	ringEntrySize           = 400
	ringSize                = 8
	reasonMemPaging         = 3
	flagVCPUPaused          = 1 << 0
	pagingFlagDropPage      = 1 << 0
	pagingFlagEvictFail     = 1 << 1
	// offsets in an entry
	evVersion    = 0
	evFlags      = 4
	evReason     = 8
	evVCPU       = 12
	evPagingGFN  = 24
	evPagingP2MT = 32
	evPagingFlag = 36
)

// Errors.
var (
	// ErrUnsupported: this host cannot page domain memory (no Xen, not
	// dom0, or a hypervisor without CONFIG_MEM_PAGING).
	ErrUnsupported = errors.New("xen memory paging unsupported on this host")
	// ErrNotPaged: Install for a gfn that is not paged out.
	ErrNotPaged = errors.New("gfn is not paged out")
)
