package dedup

import (
	"context"
	"errors"
	"fmt"
	"math/bits"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
)

// Options configure how an Index is built, persisted and refreshed.
type Options struct {
	// StateDir is where indexes persist ("" = don't persist). One file per
	// disk, named after its device and inode.
	StateDir string
	// Workers is the number of parallel hash workers (default GOMAXPROCS).
	Workers int
	// ReadBytesPerSec caps the read rate of rebuilds started by Refresh
	// (0 = none). Open's initial build is not capped: its caller waits.
	ReadBytesPerSec int64
	// Progress, if set, is called with the bytes indexed so far and the
	// bytes to index, a few times per second while indexing and once at the
	// end. It is called from one goroutine at a time.
	Progress func(done, total int64)
	// Log receives progress and decisions; the zero Logger discards.
	Log logr.Logger
}

// snapshot is one published generation of an Index. tab and id are
// immutable; stale is the only mutable part (atomic bits).
type snapshot struct {
	tab *table
	id  identity
	// stale marks blocks the destination could not use during this
	// generation (MarkStale): one bit per block, allocated on the first mark.
	stale atomic.Pointer[[]atomic.Uint64]
}

// lookup finds k, ignoring blocks marked stale.
func (s *snapshot) lookup(k key) (uint32, bool) {
	blk, ok := s.tab.lookup(k)
	if !ok {
		return 0, false
	}
	if bm := s.stale.Load(); bm != nil && (*bm)[blk/64].Load()&(1<<(blk%64)) != 0 {
		return 0, false
	}
	return blk, true
}

// markStale sets the stale bit of block blk.
func (s *snapshot) markStale(blk int64) {
	if blk < 0 || blk >= s.id.Size/BlockSize {
		return
	}
	bm := s.stale.Load()
	if bm == nil {
		fresh := make([]atomic.Uint64, (s.id.Size/BlockSize+63)/64)
		if !s.stale.CompareAndSwap(nil, &fresh) {
			bm = s.stale.Load()
		} else {
			bm = &fresh
		}
	}
	(*bm)[blk/64].Or(1 << (blk % 64))
}

// Index maps the content hash of every non-zero 4 KiB block of one disk to
// the block's offset. See the package documentation for its layout and
// memory cost. Lookup is safe for concurrent use with everything else;
// Refresh and Close serialise among themselves.
type Index struct {
	path string
	opts Options
	log  logr.Logger

	cur atomic.Pointer[snapshot]

	// refreshMu serialises Refresh and Close.
	refreshMu sync.Mutex

	// mu protects dirty and closed.
	mu     sync.Mutex
	dirty  []uint64 // one bit per regionSize bytes reported by Invalidate
	closed bool

	done      chan struct{} // closed by Close; cancels a running Refresh
	closeOnce sync.Once
}

// Open returns the index of the disk at path (a raw image file or a block
// device). With Options.StateDir set it loads the persisted index when the
// disk's identity (device, inode, size, mtime in ns) still matches, else it
// builds one with sequential large reads and Options.Workers parallel hash
// workers, then persists it. Zero blocks are not indexed.
func Open(ctx context.Context, path string, opts Options) (*Index, error) {
	if opts.Workers <= 0 {
		opts.Workers = runtime.GOMAXPROCS(0)
	}
	ix := &Index{path: path, opts: opts, log: opts.Log.WithValues("disk", path), done: make(chan struct{})}

	f, err := os.Open(path)
	if err != nil {
		return nil, fmt.Errorf("dedup: open disk %s: %w", path, err)
	}
	defer f.Close()
	id, err := statDisk(f)
	if err != nil {
		return nil, fmt.Errorf("dedup: disk %s: %w", path, err)
	}
	if id.Size/BlockSize > maxBlocks {
		return nil, fmt.Errorf("dedup: disk %s: %d bytes is more than the %d blocks an index can address", path, id.Size, int64(maxBlocks))
	}

	if opts.StateDir != "" {
		t, err := loadIndex(ix.statePath(id), id)
		switch {
		case err == nil:
			ix.cur.Store(&snapshot{tab: t, id: id})
			ix.log.Info("Loaded persisted dedup index", "entries", t.entries, "memBytes", t.memBytes())
			return ix, nil
		case errors.Is(err, os.ErrNotExist):
			ix.log.V(1).Info("No persisted dedup index; building one")
		default:
			ix.log.Info("Persisted dedup index not usable; rebuilding", "reason", err.Error())
		}
	}

	t, err := ix.build(ctx, f, id, []span{{0, id.Size &^ (BlockSize - 1)}}, nil, nil)
	if err != nil {
		return nil, fmt.Errorf("dedup: index disk %s: %w", path, err)
	}
	ix.publish(t, id)
	return ix, nil
}

// build runs one buildJob and logs its throughput.
func (ix *Index) build(ctx context.Context, f *os.File, id identity, spans []span, base *table, lim *limiter) (*table, error) {
	start := time.Now()
	j := &buildJob{
		f:       f,
		size:    id.Size &^ (BlockSize - 1),
		est:     allocatedBlocks(f, id),
		spans:   spans,
		base:    base,
		workers: ix.opts.Workers,
		lim:     lim,
		prog:    ix.opts.Progress,
		log:     func(msg string, kv ...any) { ix.log.Info(msg, kv...) },
	}
	var bytes int64
	for _, s := range spans {
		bytes += s.end - s.off
	}
	ix.log.V(1).Info("Indexing disk", "bytes", bytes, "spans", len(spans), "workers", j.workers)
	t, err := j.run(ctx)
	if err != nil {
		return nil, err
	}
	el := time.Since(start)
	ix.log.Info("Indexed disk", "bytes", bytes, "entries", t.entries, "memBytes", t.memBytes(),
		"seconds", el.Seconds(), "GBps", float64(bytes)/el.Seconds()/1e9)
	return t, nil
}

// publish swaps in a new generation and persists it (a failure to persist
// is logged: the index in memory is still good).
func (ix *Index) publish(t *table, id identity) {
	old := ix.cur.Swap(&snapshot{tab: t, id: id})
	if ix.opts.StateDir == "" {
		return
	}
	if err := saveIndex(ix.statePath(id), ix.path, id, t); err != nil {
		ix.log.Error(err, "Could not persist dedup index; it will be rebuilt on the next start")
	}
	if old != nil && ix.statePath(old.id) != ix.statePath(id) {
		// The path now names another file: drop the old file's index.
		if err := os.Remove(ix.statePath(old.id)); err != nil && !errors.Is(err, os.ErrNotExist) {
			ix.log.Error(err, "Could not remove the persisted index of the replaced disk")
		}
	}
}

// Lookup returns the offset of a disk block whose content hash starts with
// the same 96 bits as h. Lock-free: it reads the current immutable table.
// A hit is a candidate: the destination always verifies the full hash.
func (ix *Index) Lookup(h Hash) (off int64, ok bool) {
	s := ix.cur.Load()
	if s == nil {
		return 0, false
	}
	blk, ok := s.lookup(keyOf(&h))
	return int64(blk) * BlockSize, ok
}

// MarkStale records that the block at off did not serve as a reference (the
// destination found it changed or could not read it): Lookup stops
// returning it until the next Refresh, and its region is reported to the
// next Refresh as with Invalidate. Costs one bit per block of the disk,
// allocated on the first call. Safe for concurrent use with Lookup.
func (ix *Index) MarkStale(off int64) {
	s := ix.cur.Load()
	if s == nil || off < 0 {
		return
	}
	s.markStale(off / BlockSize)
	ix.Invalidate(off&^(BlockSize-1), BlockSize)
}

// Path returns the disk's path.
func (ix *Index) Path() string { return ix.path }

// Size returns the disk's size in bytes when it was last indexed.
func (ix *Index) Size() int64 {
	if s := ix.cur.Load(); s != nil {
		return s.id.Size
	}
	return 0
}

// Blocks returns the number of whole 4 KiB blocks of the disk.
func (ix *Index) Blocks() int64 { return ix.Size() / BlockSize }

// Entries returns the number of distinct non-zero blocks indexed.
func (ix *Index) Entries() int64 {
	if s := ix.cur.Load(); s != nil {
		return s.tab.entries
	}
	return 0
}

// MemBytes returns the memory held by the index's table.
func (ix *Index) MemBytes() int64 {
	if s := ix.cur.Load(); s != nil {
		return s.tab.memBytes()
	}
	return 0
}

// Invalidate reports that bytes [off, off+length) of the disk changed since
// the index was built. The next Refresh re-hashes only the reported regions
// (1 MiB granularity) instead of the whole disk. Contract: a caller that uses
// Invalidate reports every write it knows of; writes it does not report stay
// stale until a full rebuild (which only costs missed or fallback
// references, never correctness: references are verified at the destination).
func (ix *Index) Invalidate(off, length int64) {
	if length <= 0 || off < 0 {
		return
	}
	size := ix.Size()
	if off >= size {
		return // past the end: Refresh indexes growth anyway
	}
	end := size
	if length < size-off {
		end = off + length
	}
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if ix.closed {
		return
	}
	nreg := (size + regionSize - 1) / regionSize
	if int64(len(ix.dirty)) < (nreg+63)/64 {
		ix.dirty = append(ix.dirty, make([]uint64, (nreg+63)/64-int64(len(ix.dirty)))...)
	}
	for r := off / regionSize; r <= (end-1)/regionSize; r++ {
		ix.dirty[r/64] |= 1 << (r % 64)
	}
}

// takeDirty returns and clears the regions reported by Invalidate.
func (ix *Index) takeDirty() []uint64 {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	d := ix.dirty
	ix.dirty = nil
	for _, w := range d {
		if w != 0 {
			return d
		}
	}
	return nil
}

// restoreDirty merges regions back after a failed Refresh.
func (ix *Index) restoreDirty(d []uint64) {
	ix.mu.Lock()
	defer ix.mu.Unlock()
	if len(ix.dirty) < len(d) {
		ix.dirty = append(ix.dirty, make([]uint64, len(d)-len(ix.dirty))...)
	}
	for i, w := range d {
		ix.dirty[i] |= w
	}
}

// Refresh brings the index up to date with the disk and swaps the new table
// in atomically; Lookups keep using the previous table until then. It blocks
// until done: run it in a goroutine for a background refresh.
//   - Same identity (device, inode, size, mtime) and nothing reported by
//     Invalidate: nothing to do (not for block devices, whose mtime does not
//     move on writes).
//   - Regions reported by Invalidate (same device and inode): re-hash only
//     those regions, plus any growth past the old end; drop blocks past a
//     new, smaller end.
//   - Otherwise (the change cannot be told): rebuild from scratch at
//     Options.ReadBytesPerSec.
func (ix *Index) Refresh(ctx context.Context) (err error) {
	ix.refreshMu.Lock()
	defer ix.refreshMu.Unlock()
	old := ix.cur.Load()
	if old == nil {
		return fmt.Errorf("dedup: refresh %s: index is closed", ix.path)
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-ix.done:
			cancel()
		case <-ctx.Done():
		}
	}()

	dirty := ix.takeDirty()
	defer func() {
		if err != nil && dirty != nil {
			ix.restoreDirty(dirty)
		}
	}()

	f, err := os.Open(ix.path)
	if err != nil {
		return fmt.Errorf("dedup: refresh %s: %w", ix.path, err)
	}
	defer f.Close()
	id, err := statDisk(f)
	if err != nil {
		return fmt.Errorf("dedup: refresh %s: %w", ix.path, err)
	}
	if id.Size/BlockSize > maxBlocks {
		return fmt.Errorf("dedup: refresh %s: %d bytes is more than the %d blocks an index can address", ix.path, id.Size, int64(maxBlocks))
	}

	sameFile := id.Dev == old.id.Dev && id.Ino == old.id.Ino && id.Block == old.id.Block
	switch {
	case dirty == nil && !id.Block && id == old.id:
		ix.log.V(1).Info("Disk unchanged; index is current")
		return nil
	case dirty != nil && sameFile:
		t, err := ix.refreshRegions(ctx, f, old, id, dirty)
		if err != nil {
			return fmt.Errorf("dedup: refresh %s: %w", ix.path, err)
		}
		ix.publish(t, id)
		return nil
	default:
		ix.log.Info("Disk changed in ways the index cannot tell; rebuilding", "old", old.id.String(), "new", id.String(),
			"readBytesPerSec", ix.opts.ReadBytesPerSec)
		t, err := ix.build(ctx, f, id, []span{{0, id.Size &^ (BlockSize - 1)}}, nil, newLimiter(ix.opts.ReadBytesPerSec))
		if err != nil {
			return fmt.Errorf("dedup: rebuild index of %s: %w", ix.path, err)
		}
		ix.publish(t, id)
		return nil
	}
}

// refreshRegions re-hashes the dirty regions (and growth) on top of a copy
// of the old table without their blocks.
func (ix *Index) refreshRegions(ctx context.Context, f *os.File, old *snapshot, id identity, dirty []uint64) (*table, error) {
	newEnd := id.Size &^ (BlockSize - 1)
	oldEnd := old.id.Size &^ (BlockSize - 1)
	newBlocks := uint32(newEnd / BlockSize)
	isDirty := func(blk uint32) bool {
		r := int64(blk) * BlockSize / regionSize
		return r/64 < int64(len(dirty)) && dirty[r/64]&(1<<(r%64)) != 0
	}
	var spans []span
	var bytes int64
	for w, word := range dirty {
		for word != 0 {
			b := int64(w*64) + int64(bits.TrailingZeros64(word))
			word &= word - 1
			s := span{b * regionSize, min((b+1)*regionSize, newEnd, oldEnd)}
			if s.off >= s.end {
				continue
			}
			if n := len(spans); n > 0 && spans[n-1].end == s.off {
				spans[n-1].end = s.end
			} else {
				spans = append(spans, s)
			}
			bytes += s.end - s.off
		}
	}
	if newEnd > oldEnd {
		spans = append(spans, span{oldEnd, newEnd})
		bytes += newEnd - oldEnd
	}
	ix.log.Info("Refreshing changed regions of the index", "bytes", bytes, "spans", len(spans))
	base := old.tab.rebuilt(old.tab.entries+bytes/BlockSize, func(blk uint32) bool { return blk < newBlocks && !isDirty(blk) })
	return ix.build(ctx, f, id, spans, base, newLimiter(ix.opts.ReadBytesPerSec))
}

// Close releases the index; a running Refresh is cancelled and waited for.
// Lookups after Close miss.
func (ix *Index) Close() error {
	ix.closeOnce.Do(func() { close(ix.done) })
	ix.refreshMu.Lock()
	defer ix.refreshMu.Unlock()
	ix.mu.Lock()
	ix.closed = true
	ix.dirty = nil
	ix.mu.Unlock()
	ix.cur.Store(nil)
	return nil
}
