package engine

import (
	"context"
	"net"
	"testing"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// writingDomain stands in for a running guest: reading its pages (the
// sender's read-ahead) first lets the guest clear page pfn.
type writingDomain struct {
	xenmem.SourceDomain
	mem []byte
	pfn uint64
}

func (d *writingDomain) ReadPages(first uint64, dst []byte) error {
	clear(d.mem[d.pfn*xenmem.PageSize : (d.pfn+1)*xenmem.PageSize])
	copy(dst, d.mem[first*xenmem.PageSize:])
	return nil
}

// TestFallbackAnswerKeepsPageOrder: a fallback answer is the page as it is
// when answered. Within a round it must reach the destination before any
// copy of the page read after it, whatever their classes: the sender
// batches full, zero and reference pages apart, and a fallback answer left
// in the full-page batch while a newer zero copy of the page went out in
// the zero batch arrived last, leaving at the destination an older page
// than the one the manifest describes.
func TestFallbackAnswerKeepsPageOrder(t *testing.T) {
	const n, pfn = 2048, 5
	mem := make([]byte, n*xenmem.PageSize)
	mem[pfn*xenmem.PageSize] = 0x5a
	s := &source{
		opts:     Options{Strategy: StrategyPreCopy, DemandPath: DemandPriorityConn},
		dom:      &writingDomain{mem: mem, pfn: pfn},
		numPages: n,
		mem:      mem,
		streams:  1,
		hashes:   make([]dedup.Hash, n),
		sentOnce: xenmem.NewBitmap(n),
	}
	s.batchMax.Store(wire.MaxBatchPages)
	a, b := net.Pipe()
	defer a.Close()
	defer b.Close()
	sd, err := newSender(s, 0, newConn(a, nil, false))
	if err != nil {
		t.Fatal(err)
	}
	// The destination's view: the content of each page as records arrive.
	last := make(chan []byte, 1)
	go func() {
		r := wire.NewReader(b)
		var page []byte
		defer func() { last <- page }()
		for {
			rec, err := r.Next()
			if err != nil {
				return
			}
			switch rec.Type {
			case wire.TypePages:
				pfns, _, data, err := wire.ParsePages(rec.Body, nil)
				if err != nil {
					t.Error(err)
					return
				}
				for i, p := range pfns {
					if p == pfn {
						page = append([]byte(nil), data[i*xenmem.PageSize:(i+1)*xenmem.PageSize]...)
					}
				}
			case wire.TypeZeroPages:
				pfns, err := wire.ParsePFNs(rec.Body, nil)
				if err != nil {
					t.Error(err)
					return
				}
				for _, p := range pfns {
					if p == pfn {
						page = make([]byte, xenmem.PageSize)
					}
				}
			case wire.TypeEnd:
				return
			}
		}
	}()
	// A fallback for pfn is queued; the round then finds pfn dirty again.
	sd.fallback <- []uint64{pfn}
	set := xenmem.NewBitmap(n)
	for p := range uint64(n) {
		set.Set(p)
	}
	if err := sd.sendSet(context.Background(), set, nil, nil, sendClassified); err != nil {
		t.Fatal(err)
	}
	if err := sd.c.send(context.Background(), wire.TypeEnd); err != nil {
		t.Fatal(err)
	}
	got := <-last
	if dedup.HashPage(got) != s.hashes[pfn] {
		t.Fatalf("page %d at the destination (first byte %#x) is not the one the manifest describes", pfn, got[0])
	}
}
