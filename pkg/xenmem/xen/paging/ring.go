package paging

import (
	"encoding/binary"
	"fmt"
	"sync/atomic"
	"unsafe"
)

// Request is one paging request Xen put on the ring.
type Request struct {
	GFN   uint64
	VCPU  uint32
	Flags uint32 // VM_EVENT_FLAG_*
	// PagingFlags are MEM_PAGING_* (drop, evict failed).
	PagingFlags uint32
	P2MT        uint32
}

// VCPUPaused: the vCPU that made the request waits for the response.
func (r Request) VCPUPaused() bool { return r.Flags&flagVCPUPaused != 0 }

// Drop: the guest gave the gfn back (balloon); nothing is to be loaded.
func (r Request) Drop() bool { return r.PagingFlags&pagingFlagDropPage != 0 }

// backRing is the pager's (back) end of the shared ring in page: Xen
// produces requests and consumes responses. Indexes are free-running
// uint32s; slot = index mod ringSize.
//
// Invariants: reqCons <= req_prod (Xen's); rspProd (private) trails
// reqCons by the responses owed; nothing is written to the page except
// responses, rsp_prod and req_event.
type backRing struct {
	page    []byte
	reqCons uint32
	rspProd uint32
}

func newBackRing(page []byte) (*backRing, error) {
	if len(page) < PageSize {
		return nil, fmt.Errorf("paging: ring page of %d bytes", len(page))
	}
	return &backRing{page: page[:PageSize]}, nil
}

func (r *backRing) idx(off int) *uint32 { return (*uint32)(unsafe.Pointer(&r.page[off])) }

// init resets the shared indexes the way BACK_RING_INIT/SHARED_RING_INIT
// leave them; called before the ring is handed to Xen.
func (r *backRing) init() {
	clear(r.page)
	atomic.StoreUint32(r.idx(4), 1)  // req_event
	atomic.StoreUint32(r.idx(12), 1) // rsp_event
	r.reqCons, r.rspProd = 0, 0
}

func (r *backRing) entry(i uint32) []byte {
	off := ringHeader + int(i%ringSize)*ringEntrySize
	return r.page[off : off+ringEntrySize]
}

// next returns the next unconsumed request, if any. A producer index that
// runs more than a ring ahead is Xen's bug or a corrupted page; it is an
// error, not a loop over garbage.
func (r *backRing) next() (Request, bool, error) {
	prod := atomic.LoadUint32(r.idx(0))
	if prod == r.reqCons {
		// Ask for an event for the next request, then look again
		// (RING_FINAL_CHECK_FOR_REQUESTS).
		atomic.StoreUint32(r.idx(4), r.reqCons+1)
		prod = atomic.LoadUint32(r.idx(0))
		if prod == r.reqCons {
			return Request{}, false, nil
		}
	}
	if prod-r.reqCons > ringSize {
		return Request{}, false, fmt.Errorf("paging: ring producer %d is %d requests ahead of %d", prod, prod-r.reqCons, r.reqCons)
	}
	e := r.entry(r.reqCons)
	le := binary.LittleEndian
	if v := le.Uint32(e[evVersion:]); v != VMEventInterfaceVersion {
		return Request{}, false, fmt.Errorf("paging: request of vm_event interface version %d, this pager speaks %d", v, VMEventInterfaceVersion)
	}
	req := Request{
		Flags:       le.Uint32(e[evFlags:]),
		VCPU:        le.Uint32(e[evVCPU:]),
		GFN:         le.Uint64(e[evPagingGFN:]),
		P2MT:        le.Uint32(e[evPagingP2MT:]),
		PagingFlags: le.Uint32(e[evPagingFlag:]),
	}
	reason := le.Uint32(e[evReason:])
	r.reqCons++
	if reason != reasonMemPaging {
		return req, true, fmt.Errorf("paging: request with reason %d on the paging ring", reason)
	}
	return req, true, nil
}

// respond puts the response to req on the ring and publishes it. The
// response carries the interface version: Xen drops a response without it
// (the reason Debian's xenpaging hangs guests on 4.17).
func (r *backRing) respond(req Request) error {
	if r.rspProd == r.reqCons {
		return fmt.Errorf("paging: response to gfn %#x without an outstanding request", req.GFN)
	}
	e := r.entry(r.rspProd)
	clear(e)
	le := binary.LittleEndian
	le.PutUint32(e[evVersion:], VMEventInterfaceVersion)
	le.PutUint32(e[evFlags:], req.Flags&flagVCPUPaused)
	le.PutUint32(e[evReason:], reasonMemPaging)
	le.PutUint32(e[evVCPU:], req.VCPU)
	le.PutUint64(e[evPagingGFN:], req.GFN)
	le.PutUint32(e[evPagingFlag:], req.PagingFlags&pagingFlagDropPage)
	r.rspProd++
	atomic.StoreUint32(r.idx(8), r.rspProd) // rsp_prod, after the entry
	return nil
}

func ptr(b []byte, off int) unsafe.Pointer { return unsafe.Pointer(&b[off]) }
