package engine

import (
	"context"
	"fmt"
	"math/bits"
	"runtime"
	"sync/atomic"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// sender owns one data stream and the pfn partition that travels on it.
// It reads pages, classifies them (zero / disk reference / full), hashes
// each once for the manifest, and writes batches. Fallback requests for its
// partition are answered in stream order, so a fallback answer can never
// overtake an older copy of the same page.
type sender struct {
	src *source
	idx int
	c   *conn
	// fallback carries pfns the destination could not resolve from disk;
	// bounded, drained between chunks and between commands.
	fallback chan []uint64
	// cmds runs work on the sender's goroutine (one at a time); results
	// are reported on the source's results channel.
	cmds chan func() error
	// demand carries demand requests for this partition (DemandInline);
	// dem batches their answers apart from the background batch, and they
	// go out urgent (without waiting for bandwidth).
	demand chan demandReq
	dem    *sender
	urgent bool

	pfns  []uint64
	data  []byte
	zeros []uint64
	refs  []wire.DiskRef
	pre   []byte
	body  []byte
	zbuf  []byte
	comp  *wire.Compressor
	ahead []byte // readAhead's buffer: one partition chunk
}

func newSender(s *source, idx int, c *conn) (*sender, error) {
	sd := &sender{
		src:      s,
		idx:      idx,
		c:        c,
		fallback: make(chan []uint64, 64),
		cmds:     make(chan func() error),
		demand:   make(chan demandReq, 64),
		pfns:     make([]uint64, 0, batchPages),
		data:     make([]byte, 0, batchPages*xenmem.PageSize),
		zeros:    make([]uint64, 0, wire.MaxBatchPages),
		refs:     make([]wire.DiskRef, 0, wire.MaxBatchPages/4),
	}
	if s.opts.DemandPath == DemandInline {
		sd.dem = newAnswerer(s, c)
		sd.dem.idx = idx
	}
	if s.opts.Compress && s.plan.Policy != PolicyXen {
		// Each stream carries its share of the link: compression pays
		// against that share.
		comp, err := wire.NewCompressor(s.opts.LinkBytesPerSec / int64(s.streams))
		if err != nil {
			return nil, fmt.Errorf("zstd encoder: %w", err)
		}
		comp.SetAlways(s.opts.CompressAlways)
		sd.comp = comp
	}
	return sd, nil
}

// newAnswerer is a sender that only answers requests on c (its batches
// are small: an answer goes out as soon as its request is served).
func newAnswerer(s *source, c *conn) *sender {
	return &sender{src: s, c: c, urgent: true,
		pfns: make([]uint64, 0, 64), data: make([]byte, 0, 64*xenmem.PageSize),
		zeros: make([]uint64, 0, 64), refs: make([]wire.DiskRef, 0, 64)}
}

// demandReq is one demand request's pfns for one partition.
type demandReq struct {
	reason uint32
	pfns   []uint64
}

// serveDemand answers the demand requests queued for this partition,
// ahead of the background page the sender was about to take.
func (sd *sender) serveDemand(ctx context.Context) error {
	for {
		select {
		case r := <-sd.demand:
			if err := sd.src.answer(ctx, sd.dem, r.reason, r.pfns); err != nil {
				return err
			}
		default:
			return nil
		}
	}
}

// loop is the sender's goroutine: it runs commands and, between them,
// answers fallback requests, so that fallbacks asked after the last round
// (while the destination checks its memory) are still served.
func (sd *sender) loop(ctx context.Context) {
	for {
		select {
		case fn := <-sd.cmds:
			sd.src.results <- fn()
		case r := <-sd.demand:
			if err := sd.src.answer(ctx, sd.dem, r.reason, r.pfns); err != nil {
				sd.src.fail(fmt.Errorf("answer demand requests: %w", err))
			}
		case pfns := <-sd.fallback:
			err := func() error {
				for _, p := range pfns {
					if err := sd.addPage(ctx, p, sendFallback); err != nil {
						return err
					}
				}
				return sd.flush(ctx)
			}()
			if err != nil {
				sd.src.fail(fmt.Errorf("answer fallback requests: %w", err))
			}
		case <-ctx.Done():
			return
		}
	}
}

// sendSet sends every page of this sender's partition set in set (and in
// only, when only is not nil), clearing each bit as the page is taken.
// Bits are cleared atomically: the priority path may take pages too. It
// returns early, leaving the rest set, when stop becomes true. With
// sendOnlyFull or sendOnlyCheap, pages of the other kind stay set.
//
// A chunk's pages are taken (their bits cleared) before any of them is
// read: the dirty log may be read and ORed into set at any moment (the
// policy's checkpoints), and a write it reports must either come before
// the read of the page or set the page's bit again after the take. Taken
// one by one after a read-ahead, a page written between the read and its
// take went with its old content, its dirty bit spent. A paused domain's
// pages do not change: then each page is taken as it is sent, so that a
// demand request for a page not yet sent takes it (and records its hash)
// itself, whatever becomes of this pass (a broken link ends it).
func (sd *sender) sendSet(ctx context.Context, set, only *xenmem.Bitmap, stop *atomic.Bool, mode sendMode) error {
	s := sd.src
	n := s.numPages
	chunk := uint64(1) << partitionShift
	k := uint64(s.streams)
	var taken [1 << (partitionShift - 6)]uint64
	for c := uint64(sd.idx); c*chunk < n; c += k {
		if stop != nil && stop.Load() {
			break
		}
		if err := sd.serveFallbacks(ctx); err != nil {
			return err
		}
		sd.yield()
		lo, hi := c*chunk, min((c+1)*chunk, n)
		frozen := s.frozen.Load()
		any := false
		for w := lo >> 6; w<<6 < hi; w++ {
			want := atomic.LoadUint64(&set.Words()[w])
			if only != nil {
				want &= only.Words()[w]
			}
			if want != 0 && !frozen {
				// The bits this take cleared: the priority path may have
				// taken some since the load.
				want &= atomic.AndUint64(&set.Words()[w], ^want)
			}
			taken[w-lo>>6] = want
			any = any || want != 0
		}
		if !any {
			continue
		}
		ahead, aheadLo, err := sd.readAhead(taken[:], lo, hi)
		if err != nil {
			return err
		}
		for w := lo >> 6; w<<6 < hi; w++ {
			word := taken[w-lo>>6]
			for word != 0 {
				b := uint64(bits.TrailingZeros64(word))
				word &^= 1 << b
				pfn := w<<6 + b
				if len(sd.demand) > 0 {
					if err := sd.serveDemand(ctx); err != nil {
						return err
					}
				}
				if frozen && !aclear(set, pfn) {
					continue // taken by the priority path
				}
				var src []byte
				if pfn >= aheadLo && (pfn-aheadLo)*xenmem.PageSize < uint64(len(ahead)) {
					src = ahead[(pfn-aheadLo)*xenmem.PageSize : (pfn-aheadLo+1)*xenmem.PageSize]
				}
				skipped, err := sd.addPageMode(ctx, pfn, mode, src)
				if err != nil {
					return err
				}
				if skipped {
					aset(set, pfn)
				}
			}
		}
	}
	return sd.flush(ctx)
}

// readAhead reads the taken pages of [lo,hi) (taken holds the chunk's
// words) with one ReadPages call over their span, when they fill at least
// an eighth of it, into the sender's read-ahead buffer; it returns the
// span's first pfn. A chunk with fewer pages is read page by page from
// the mapping.
func (sd *sender) readAhead(taken []uint64, lo, hi uint64) ([]byte, uint64, error) {
	first, last, count := hi, lo, uint64(0)
	for w := lo >> 6; w<<6 < hi; w++ {
		word := taken[w-lo>>6]
		if word == 0 {
			continue
		}
		count += uint64(bits.OnesCount64(word))
		first = min(first, w<<6+uint64(bits.TrailingZeros64(word)))
		last = max(last, w<<6+63-uint64(bits.LeadingZeros64(word)))
	}
	if count == 0 || count*8 < last-first+1 {
		return nil, 0, nil
	}
	span := (last - first + 1) * xenmem.PageSize
	if uint64(cap(sd.ahead)) < span {
		sd.ahead = make([]byte, (uint64(1)<<partitionShift)*xenmem.PageSize)
	}
	buf := sd.ahead[:span]
	if err := sd.src.dom.ReadPages(first, buf); err != nil {
		return nil, 0, fmt.Errorf("read guest memory: %w", err)
	}
	return buf, first, nil
}

// yield lets a demand-path goroutine waiting for this P run, between two
// chunks of the post-copy push: a vCPU waits for the demand path, nobody
// waits for the push. (Go preempts a busy goroutine only after 10 ms.)
func (sd *sender) yield() {
	if sd.src.phase.Load() == PhasePostCopy {
		runtime.Gosched()
	}
}

// serveFallbacks answers queued fallback requests without blocking.
//
// A fallback answer is the page as it is now, sent whole; the round may
// hold an older copy of the same page in one of its batches, or take a
// newer one later. Full, zero and reference pages are batched apart and
// each batch leaves when it fills, so the answer is fenced: the batches
// are flushed before it (older copies go first) and it is flushed at once
// (newer copies go after it). The destination keeps the copy that arrives
// last; the manifest describes the newest.
func (sd *sender) serveFallbacks(ctx context.Context) error {
	served := false
	for {
		select {
		case pfns := <-sd.fallback:
			if !served {
				if err := sd.flush(ctx); err != nil {
					return err
				}
				served = true
			}
			for _, p := range pfns {
				if err := sd.addPage(ctx, p, sendFallback); err != nil {
					return err
				}
			}
		default:
			if served {
				return sd.flushPages(ctx)
			}
			return nil
		}
	}
}

// How addPage sends a page.
type sendMode int

const (
	sendClassified sendMode = iota // zero / disk reference / full, as it classifies
	sendFull                       // whole, without touching the manifest hash
	sendFallback                   // whole, answering a failed disk reference
	sendOnlyFull                   // classified; only a full page is sent, others are skipped
	sendOnlyCheap                  // classified; only a zero page or disk reference is sent
)

// skips reports whether mode leaves a page of class c out.
func (m sendMode) skips(c dedup.Class) bool {
	switch m {
	case sendOnlyFull:
		return c != dedup.ClassFull
	case sendOnlyCheap:
		return c == dedup.ClassFull
	}
	return false
}

// addPage reads one page now and queues it in the right batch.
func (sd *sender) addPage(ctx context.Context, pfn uint64, mode sendMode) error {
	_, err := sd.addPageMode(ctx, pfn, mode, nil)
	return err
}

// addPageMode is addPage; a page that sendOnlyFull or sendOnlyCheap
// leaves out is not sent (skipped is true) and leaves no trace.
//
// src, when not nil, is a private copy of the page just read (readAhead);
// otherwise the page is read from the mapping.
func (sd *sender) addPageMode(ctx context.Context, pfn uint64, mode sendMode, src []byte) (skipped bool, err error) {
	full := mode == sendFull || mode == sendFallback
	s := sd.src
	off := pfn * xenmem.PageSize
	slot := sd.data[len(sd.data) : len(sd.data)+xenmem.PageSize]
	// A running guest may write the page while it is classified and
	// hashed: work on a copy. A paused one cannot: classify in place and
	// copy only a page that travels whole (in the post-copy push most
	// pages are zero pages or disk references, and copying each page
	// first made the push's first pass CPU-bound).
	// A page read ahead is a private copy already: classify it where it is.
	page, inSlot := s.mem[off:off+xenmem.PageSize], false
	switch {
	case src != nil:
		page = src
	case !s.frozen.Load():
		copy(slot, page)
		page, inSlot = slot, true
	}
	class, h, ref := sd.classify(page, full)
	if mode.skips(class) {
		return true, nil
	}
	if asetNew(s.sentOnce, pfn) == false {
		s.cnt.resent.Add(1)
	}
	if mode == sendFallback && s.catalog != nil {
		// A fallback: the block its reference named no longer holds the
		// page (or cannot be read there); stop offering it.
		s.catalog.MarkStale(s.hashes[pfn])
	}
	if !full {
		s.hashes[pfn] = h
	}
	switch class {
	case dedup.ClassZero:
		sd.zeros = append(sd.zeros, pfn)
		s.cnt.zero.Add(1)
		if len(sd.zeros) == cap(sd.zeros) {
			return false, sd.flushZeros(ctx)
		}
	case dedup.ClassDisk:
		sd.refs = append(sd.refs, wire.DiskRef{PFN: pfn, Disk: ref.Disk, Offset: uint64(ref.Offset), Hash: ref.Hash})
		s.cnt.disk.Add(1)
		if len(sd.refs) == cap(sd.refs) {
			return false, sd.flushRefs(ctx)
		}
	default:
		if !inSlot {
			copy(slot, page)
		}
		sd.data = sd.data[:len(sd.data)+xenmem.PageSize]
		sd.pfns = append(sd.pfns, pfn)
		if mode == sendFallback {
			s.cnt.fallbackSent.Add(1)
		} else {
			s.cnt.full.Add(1)
		}
		if len(sd.pfns) == cap(sd.pfns) || len(sd.pfns) >= int(sd.src.batchMax.Load()) {
			return false, sd.flushPages(ctx)
		}
	}
	return false, nil
}

// classify decides how a page travels. The xen strategy sends everything
// as full pages (stock libxc); the others elide zero pages and, with dedup,
// replace pages found on the domain's disks by references.
func (sd *sender) classify(page []byte, full bool) (dedup.Class, dedup.Hash, dedup.Ref) {
	s := sd.src
	switch {
	case !s.plan.ElideZero || full:
		return dedup.ClassFull, dedup.HashPage(page), dedup.Ref{}
	case s.catalog != nil:
		return s.catalog.Classify(page)
	case dedup.IsZero(page):
		return dedup.ClassZero, zeroHash, dedup.Ref{}
	default:
		return dedup.ClassFull, dedup.HashPage(page), dedup.Ref{}
	}
}

func (sd *sender) flush(ctx context.Context) error {
	if err := sd.flushPages(ctx); err != nil {
		return err
	}
	if err := sd.flushZeros(ctx); err != nil {
		return err
	}
	return sd.flushRefs(ctx)
}

func (sd *sender) flushPages(ctx context.Context) error {
	if len(sd.pfns) == 0 {
		return nil
	}
	flags := uint32(0)
	data := sd.data
	if sd.comp != nil {
		if out, ok := sd.comp.Compress(sd.zbuf, sd.data); ok {
			sd.zbuf, data, flags = out, out, wire.PagesZstd
		}
	}
	sd.pre = wire.PagesPrefix(sd.pre[:0], sd.pfns, flags)
	err := sd.c.sendAs(ctx, sd.urgent || sd.c.prio, wire.TypePages, sd.pre, data)
	sd.pfns, sd.data = sd.pfns[:0], sd.data[:0]
	return err
}

func (sd *sender) flushZeros(ctx context.Context) error {
	if len(sd.zeros) == 0 {
		return nil
	}
	sd.body = wire.MarshalPFNs(sd.body[:0], sd.zeros)
	sd.zeros = sd.zeros[:0]
	return sd.c.sendAs(ctx, sd.urgent || sd.c.prio, wire.TypeZeroPages, sd.body)
}

func (sd *sender) flushRefs(ctx context.Context) error {
	if len(sd.refs) == 0 {
		return nil
	}
	sd.body = wire.MarshalDiskRefs(sd.body[:0], sd.refs)
	sd.refs = sd.refs[:0]
	return sd.c.sendAs(ctx, sd.urgent || sd.c.prio, wire.TypeDiskRefs, sd.body)
}

// marker writes a flush marker: everything this stream carried before it
// has been sent.
func (sd *sender) marker(ctx context.Context, phase string) error {
	if err := sd.serveFallbacks(ctx); err != nil {
		return err
	}
	if err := sd.flush(ctx); err != nil {
		return err
	}
	return sd.c.sendControl(ctx, &wire.Control{Kind: ctlFlush, Stream: sd.idx, Message: phase})
}
