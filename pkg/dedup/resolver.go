package dedup

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"runtime/debug"
	"slices"
	"sync"
	"sync/atomic"
)

// Sentinel errors of ResolveBatch; the errors passed to its fail callback
// wrap exactly one of them (test with errors.Is).
var (
	// ErrStale: the block no longer has the page's hash. Fetch the page
	// from the source.
	ErrStale = errors.New("dedup: disk block changed since it was indexed")
	// ErrDiskUnavailable: the disk is missing on this host or could not be
	// read. Fetch the page from the source.
	ErrDiskUnavailable = errors.New("dedup: disk unavailable")
	// ErrOutOfBounds: the reference names an unknown disk, an offset that is
	// not 4 KiB aligned, or a block past the end of the disk. A correct
	// source never sends one: treat it as a protocol error.
	ErrOutOfBounds = errors.New("dedup: reference outside the domain's disks")
)

// maxRunBytes bounds one coalesced read of ResolveBatch.
const maxRunBytes = 256 << 10

// resolverDisk is one disk as the destination sees it.
type resolverDisk struct {
	path string
	f    *os.File // nil when err != nil
	err  error    // why the disk is unavailable
}

// Resolver reads and verifies disk references on the destination, against
// the domain's disks as configured on this host, in the same order as the
// source's Catalog. Safe for concurrent use: concurrent ResolveBatch calls
// share one pool of `workers` read buffers, so reads in flight stay bounded
// by workers in total.
type Resolver struct {
	disks   []resolverDisk
	workers int
	bufs    chan []byte // read buffers (nil until first used); cap workers
}

// OpenResolver opens the disks read-only. A disk that is missing or cannot
// be opened is recorded, not fatal: references to it fail with
// ErrDiskUnavailable. workers bounds the reads in flight per batch (>= 1).
func OpenResolver(paths []string, workers int) *Resolver {
	if workers < 1 {
		workers = 1
	}
	r := &Resolver{disks: make([]resolverDisk, len(paths)), workers: workers, bufs: make(chan []byte, workers)}
	for range workers {
		r.bufs <- nil
	}
	for i, p := range paths {
		d := &r.disks[i]
		d.path = p
		if p == "" {
			d.err = fmt.Errorf("disk %d is not configured on this host", i)
			continue
		}
		f, err := os.Open(p)
		if err != nil {
			d.err = fmt.Errorf("open disk %d: %w", i, err)
			continue
		}
		if _, err := statDisk(f); err != nil {
			f.Close()
			d.err = fmt.Errorf("disk %d %s: %w", i, p, err)
			continue
		}
		d.f = f
	}
	return r
}

// Unavailable returns, per disk, why it cannot be read (nil when it can).
func (r *Resolver) Unavailable() []error {
	out := make([]error, len(r.disks))
	for i, d := range r.disks {
		out[i] = d.err
	}
	return out
}

// Close closes the disks. Call it after every ResolveBatch has returned;
// later batches fail every ref with ErrDiskUnavailable.
func (r *Resolver) Close() error {
	var errs []error
	for i := range r.disks {
		d := &r.disks[i]
		if d.f != nil {
			errs = append(errs, d.f.Close())
			d.f = nil
		}
		if d.err == nil {
			d.err = fmt.Errorf("disk %d %s: resolver closed", i, d.path)
		}
	}
	return errors.Join(errs...)
}

// run is a coalesced read: refs order[lo:hi] (sorted by offset) of one disk,
// covering [off, off+n).
type run struct {
	disk   int
	off    int64
	n      int
	lo, hi int
}

// ResolveBatch resolves refs: it reads every referenced block (sorted by
// offset, adjacent blocks coalesced into reads of up to 256 KiB, at most
// workers reads in flight), checks HashPage(block) == ref.Hash and copies the
// block into dst(i), which must return a slice of at least BlockSize bytes.
// Every ref that cannot be resolved gets fail(i, err), err wrapping:
//   - ErrStale: the block's hash differs (the disk changed);
//   - ErrDiskUnavailable: the disk is missing or a read failed;
//   - ErrOutOfBounds: unknown disk, offset not 4 KiB aligned, block past the
//     end of the disk, or dst(i) too short.
//
// The callbacks are never called concurrently with each other; each ref
// gets exactly one of them unless ctx is cancelled, in which case the
// remaining refs get neither and ctx's error is returned. ResolveBatch
// returns an error only for cancellation.
func (r *Resolver) ResolveBatch(ctx context.Context, refs []Ref, dst func(i int) []byte, fail func(i int, err error)) error {
	var cbMu sync.Mutex // serialises dst and fail

	sizes := make([]int64, len(r.disks))
	sizeErr := make([]error, len(r.disks))
	sized := make([]bool, len(r.disks))
	order := make([]int, 0, len(refs))
	for i := range refs {
		ref := &refs[i]
		if int64(ref.Disk) >= int64(len(r.disks)) {
			fail(i, fmt.Errorf("ref %d: disk %d of a domain with %d disks: %w", i, ref.Disk, len(r.disks), ErrOutOfBounds))
			continue
		}
		if ref.Offset < 0 || ref.Offset%BlockSize != 0 {
			fail(i, fmt.Errorf("ref %d: disk %d offset %d is not a non-negative multiple of %d: %w", i, ref.Disk, ref.Offset, BlockSize, ErrOutOfBounds))
			continue
		}
		d := &r.disks[ref.Disk]
		if d.err != nil {
			fail(i, fmt.Errorf("ref %d: %w: %w", i, ErrDiskUnavailable, d.err))
			continue
		}
		if !sized[ref.Disk] {
			sized[ref.Disk] = true
			sizes[ref.Disk], sizeErr[ref.Disk] = diskSize(d.f)
		}
		if err := sizeErr[ref.Disk]; err != nil {
			fail(i, fmt.Errorf("ref %d: size of disk %d %s: %w: %w", i, ref.Disk, d.path, ErrDiskUnavailable, err))
			continue
		}
		if ref.Offset > sizes[ref.Disk]-BlockSize {
			fail(i, fmt.Errorf("ref %d: disk %d offset %d is past the end of %s (%d bytes): %w", i, ref.Disk, ref.Offset, d.path, sizes[ref.Disk], ErrOutOfBounds))
			continue
		}
		order = append(order, i)
	}
	slices.SortFunc(order, func(a, b int) int {
		if c := cmp.Compare(refs[a].Disk, refs[b].Disk); c != 0 {
			return c
		}
		return cmp.Compare(refs[a].Offset, refs[b].Offset)
	})

	// Coalesce: the same or the next block of the same disk extends a run.
	var runs []run
	for k, i := range order {
		ref := &refs[i]
		if n := len(runs); n > 0 {
			last := &runs[n-1]
			end := last.off + int64(last.n)
			if last.disk == int(ref.Disk) && (ref.Offset == end-BlockSize || (ref.Offset == end && last.n+BlockSize <= maxRunBytes)) {
				if ref.Offset == end {
					last.n += BlockSize
				}
				last.hi = k + 1
				continue
			}
		}
		runs = append(runs, run{disk: int(ref.Disk), off: ref.Offset, n: BlockSize, lo: k, hi: k + 1})
	}

	if len(runs) == 1 || r.workers == 1 {
		// One run (a demand fault and its neighbours), or a resolver of
		// one worker (the destination's demand path): read on this
		// goroutine, without a hand-off that would add to fault latency.
		var buf []byte
		select {
		case buf = <-r.bufs:
		case <-ctx.Done():
			return ctx.Err()
		}
		if buf == nil {
			buf = make([]byte, maxRunBytes)
		}
		for i := range runs {
			r.resolveRun(&runs[i], refs, order, buf, dst, fail, &cbMu)
		}
		r.bufs <- buf
		return nil
	}
	work := make(chan *run)
	var wg sync.WaitGroup
	// A panic on a worker (in a callback, say) is raised again on the
	// caller's goroutine once every worker is done, where the caller's own
	// recovery sees it; a worker goroutine has none.
	var panicked atomic.Pointer[workerPanic]
	for range min(r.workers, len(runs)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var buf []byte
			defer func() {
				if p := recover(); p != nil {
					panicked.CompareAndSwap(nil, &workerPanic{value: p, stack: debug.Stack()})
					if buf != nil {
						r.bufs <- buf
					}
					for range work { // let the feeder finish
					}
				}
			}()
			for ru := range work {
				if buf == nil {
					select {
					case buf = <-r.bufs:
					case <-ctx.Done():
						return
					}
					if buf == nil {
						buf = make([]byte, maxRunBytes)
					}
				}
				r.resolveRun(ru, refs, order, buf, dst, fail, &cbMu)
			}
			if buf != nil {
				r.bufs <- buf
			}
		}()
	}
	var err error
feed:
	for i := range runs {
		select {
		case work <- &runs[i]:
		case <-ctx.Done():
			err = ctx.Err()
			break feed
		}
	}
	close(work)
	wg.Wait()
	if p := panicked.Load(); p != nil {
		panic(fmt.Sprintf("dedup: resolver worker: %v\n%s", p.value, p.stack))
	}
	return err
}

// workerPanic is a panic caught on a ResolveBatch worker.
type workerPanic struct {
	value any
	stack []byte
}

// resolveRun reads one run and settles each of its refs.
func (r *Resolver) resolveRun(ru *run, refs []Ref, order []int, buf []byte, dst func(int) []byte, fail func(int, error), cbMu *sync.Mutex) {
	d := &r.disks[ru.disk]
	n, rerr := d.f.ReadAt(buf[:ru.n], ru.off)
	if errors.Is(rerr, io.EOF) {
		rerr = nil // a short read: the blocks past n fail below
	}
	// Hash outside the lock; call back under it.
	var vs [maxRunBytes / BlockSize * 2]verdict
	v := vs[:0]
	lastAt, lastHash := -1, Hash{}
	for _, i := range order[ru.lo:ru.hi] {
		ref := &refs[i]
		at := int(ref.Offset - ru.off)
		switch {
		case rerr != nil:
			v = append(v, verdict{i: i, err: fmt.Errorf("ref %d: read disk %d %s at %d: %w: %w", i, ru.disk, d.path, ref.Offset, ErrDiskUnavailable, rerr)})
		case at+BlockSize > n:
			v = append(v, verdict{i: i, err: fmt.Errorf("ref %d: disk %d %s ends before offset %d (short read): %w", i, ru.disk, d.path, ref.Offset+BlockSize, ErrDiskUnavailable)})
		default:
			blk := buf[at : at+BlockSize]
			if at != lastAt { // refs to the same block are hashed once
				lastAt, lastHash = at, HashPage(blk)
			}
			if lastHash != ref.Hash {
				v = append(v, verdict{i: i, err: fmt.Errorf("ref %d: disk %d %s offset %d: %w", i, ru.disk, d.path, ref.Offset, ErrStale)})
			} else {
				v = append(v, verdict{i: i, blk: blk})
			}
		}
		if len(v) == cap(v) {
			settle(v, dst, fail, cbMu)
			v = v[:0]
		}
	}
	settle(v, dst, fail, cbMu)
}

// verdict is the outcome of one ref: blk to copy, or err to report.
type verdict struct {
	i   int
	blk []byte
	err error
}

// settle reports verdicts through the callbacks, under cbMu.
func settle(v []verdict, dst func(int) []byte, fail func(int, error), cbMu *sync.Mutex) {
	if len(v) == 0 {
		return
	}
	cbMu.Lock()
	defer cbMu.Unlock()
	for _, x := range v {
		if x.err != nil {
			fail(x.i, x.err)
			continue
		}
		d := dst(x.i)
		if len(d) < BlockSize {
			fail(x.i, fmt.Errorf("ref %d: dst returned %d bytes, need %d: %w", x.i, len(d), BlockSize, ErrOutOfBounds))
			continue
		}
		copy(d, x.blk)
	}
}
