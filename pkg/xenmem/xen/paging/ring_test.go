package paging

import (
	"encoding/binary"
	"strings"
	"sync/atomic"
	"testing"
)

// frontRing plays Xen's side of the ring in a test: it produces requests
// and consumes responses, the way vm_event.c does.
type frontRing struct {
	page    []byte
	reqProd uint32
	rspCons uint32
}

func (f *frontRing) put(t *testing.T, version, reason uint32, req Request) {
	t.Helper()
	if f.reqProd-f.rspCons >= ringSize {
		t.Fatalf("front ring full")
	}
	off := ringHeader + int(f.reqProd%ringSize)*ringEntrySize
	e := f.page[off : off+ringEntrySize]
	clear(e)
	le := binary.LittleEndian
	le.PutUint32(e[evVersion:], version)
	le.PutUint32(e[evFlags:], req.Flags)
	le.PutUint32(e[evReason:], reason)
	le.PutUint32(e[evVCPU:], req.VCPU)
	le.PutUint64(e[evPagingGFN:], req.GFN)
	le.PutUint32(e[evPagingP2MT:], req.P2MT)
	le.PutUint32(e[evPagingFlag:], req.PagingFlags)
	f.reqProd++
	atomic.StoreUint32((*uint32)(ptr(f.page, 0)), f.reqProd)
}

func (f *frontRing) take(t *testing.T) (version, flags, vcpu uint32, gfn uint64, ok bool) {
	t.Helper()
	prod := atomic.LoadUint32((*uint32)(ptr(f.page, 8)))
	if prod == f.rspCons {
		return 0, 0, 0, 0, false
	}
	off := ringHeader + int(f.rspCons%ringSize)*ringEntrySize
	e := f.page[off : off+ringEntrySize]
	f.rspCons++
	le := binary.LittleEndian
	return le.Uint32(e[evVersion:]), le.Uint32(e[evFlags:]), le.Uint32(e[evVCPU:]), le.Uint64(e[evPagingGFN:]), true
}

func TestBackRingRequestsAndResponses(t *testing.T) {
	page := make([]byte, PageSize)
	r, err := newBackRing(page)
	if err != nil {
		t.Fatal(err)
	}
	r.init()
	f := &frontRing{page: page}
	if _, ok, err := r.next(); ok || err != nil {
		t.Fatalf("empty ring gave a request (ok %v, err %v)", ok, err)
	}
	if got := binary.LittleEndian.Uint32(page[4:]); got != 1 {
		t.Fatalf("req_event after an empty check = %d, want 1 (an event for the next request)", got)
	}
	// More requests than slots, in two laps, answered out of order.
	for lap := 0; lap < 3; lap++ {
		var want []uint64
		for i := 0; i < ringSize; i++ {
			g := uint64(lap*100 + i)
			f.put(t, VMEventInterfaceVersion, reasonMemPaging, Request{GFN: g, VCPU: uint32(i % 2), Flags: flagVCPUPaused})
			want = append(want, g)
		}
		var got []Request
		for {
			req, ok, err := r.next()
			if err != nil {
				t.Fatal(err)
			}
			if !ok {
				break
			}
			got = append(got, req)
		}
		if len(got) != ringSize {
			t.Fatalf("lap %d: %d requests, want %d", lap, len(got), ringSize)
		}
		for i, req := range got {
			if req.GFN != want[i] || !req.VCPUPaused() || req.VCPU != uint32(i%2) {
				t.Fatalf("lap %d request %d = %+v, want gfn %d", lap, i, req, want[i])
			}
		}
		for i := len(got) - 1; i >= 0; i-- {
			if err := r.respond(got[i]); err != nil {
				t.Fatal(err)
			}
		}
		for i := len(got) - 1; i >= 0; i-- {
			v, fl, vcpu, g, ok := f.take(t)
			if !ok || v != VMEventInterfaceVersion || fl != flagVCPUPaused || g != got[i].GFN || vcpu != got[i].VCPU {
				t.Fatalf("lap %d response: version %d flags %d vcpu %d gfn %d ok %v; want the answer to %+v", lap, v, fl, vcpu, g, ok, got[i])
			}
		}
	}
	if err := r.respond(Request{GFN: 1}); err == nil {
		t.Fatal("a response without an outstanding request was accepted")
	}
}

func TestBackRingRejectsBadRequests(t *testing.T) {
	for _, tc := range []struct {
		name    string
		setup   func(f *frontRing)
		wantErr string
	}{
		{"old interface version", func(f *frontRing) { f.put(t, 6, reasonMemPaging, Request{GFN: 1}) }, "interface version 6"},
		{"not a paging request", func(f *frontRing) { f.put(t, VMEventInterfaceVersion, 9, Request{GFN: 1}) }, "reason 9"},
		{"producer far ahead", func(f *frontRing) {
			binary.LittleEndian.PutUint32(f.page[0:], 1000)
		}, "requests ahead"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			page := make([]byte, PageSize)
			r, _ := newBackRing(page)
			r.init()
			tc.setup(&frontRing{page: page})
			_, _, err := r.next()
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("err = %v, want one with %q", err, tc.wantErr)
			}
		})
	}
}
