package dedup

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"sync"
	"sync/atomic"
	"time"
)

const (
	// chunkSize is the size of one sequential read during a build.
	chunkSize = 1 << 20
	// regionSize is the granularity of Invalidate and incremental refresh.
	regionSize = 1 << 20
	// progressEvery is how often Options.Progress is called while indexing.
	progressEvery = 250 * time.Millisecond
	// logEvery is how often a long build logs its progress.
	logEvery = 10 * time.Second
)

// span is a byte range [off, end) of a disk.
type span struct{ off, end int64 }

// chunkResult carries the keys of the non-zero blocks of one chunk from a
// hash worker to the inserter.
type chunkResult struct {
	keys []key
	blks []uint32
}

// buildJob describes one build: which spans of the disk to hash into which
// table.
type buildJob struct {
	f       *os.File
	size    int64 // bytes indexed: the disk's size rounded down to BlockSize
	est     int64 // expected entries, sizes the first table
	spans   []span
	base    *table // entries to start from (nil: empty)
	workers int
	lim     *limiter
	log     func(msg string, kv ...any)
	prog    func(done, total int64)
}

// run hashes every block of the job's spans with parallel workers (each
// reading chunkSize sequentially with pread) and inserts the non-zero ones
// into a copy of base, growing it as needed. Holes of sparse files are
// skipped without reading.
func (j *buildJob) run(ctx context.Context) (*table, error) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()

	var total int64
	for _, s := range j.spans {
		total += s.end - s.off
	}
	workers := j.workers
	if workers < 1 {
		workers = 1
	}
	var done atomic.Int64
	adviseSequential(j.f)

	var errOnce sync.Once
	var firstErr error
	setErr := func(err error) {
		errOnce.Do(func() { firstErr = err; cancel() })
	}

	chunks := make(chan span, 2*workers)
	results := make(chan *chunkResult, 2*workers)
	free := make(chan *chunkResult, 4*workers)
	for range 4 * workers {
		free <- &chunkResult{keys: make([]key, 0, chunkSize/BlockSize), blks: make([]uint32, 0, chunkSize/BlockSize)}
	}

	// Producer: walk the spans' data extents, cut them into chunks.
	go func() {
		defer close(chunks)
		for _, s := range j.spans {
			off := s.off
			for off < s.end {
				ds, de := nextData(j.f, off, s.end)
				ds = min(max(ds&^(BlockSize-1), off), s.end)
				if de > s.end {
					de = s.end
				}
				if de = (de + BlockSize - 1) &^ (BlockSize - 1); de > s.end {
					de = s.end
				}
				done.Add(ds - off) // a hole: zeros, nothing to read
				for c := ds; c < de; c += chunkSize {
					ce := min(c+chunkSize, de)
					select {
					case chunks <- span{c, ce}:
					case <-ctx.Done():
						return
					}
				}
				if de <= off { // no progress possible; give up on this span
					done.Add(s.end - off)
					break
				}
				off = de
			}
		}
	}()

	// Hash workers.
	var wg sync.WaitGroup
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, chunkSize)
			for c := range chunks {
				n := int(c.end - c.off)
				if err := j.lim.wait(ctx, n); err != nil {
					setErr(err)
					return
				}
				if _, err := j.f.ReadAt(buf[:n], c.off); err != nil && !errors.Is(err, io.EOF) {
					setErr(fmt.Errorf("read %d bytes at offset %d: %w", n, c.off, err))
					return
				} else if err != nil {
					setErr(fmt.Errorf("read at offset %d: disk shrank below %d bytes while indexing: %w", c.off, j.size, err))
					return
				}
				var r *chunkResult
				select {
				case r = <-free:
				case <-ctx.Done():
					return
				}
				r.keys, r.blks = r.keys[:0], r.blks[:0]
				for o := 0; o+BlockSize <= n; o += BlockSize {
					b := buf[o : o+BlockSize]
					if IsZero(b) {
						continue
					}
					r.keys = append(r.keys, hashKey(b))
					r.blks = append(r.blks, uint32((c.off+int64(o))/BlockSize))
				}
				done.Add(int64(n))
				select {
				case results <- r:
				case <-ctx.Done():
					return
				}
			}
		}()
	}
	go func() { wg.Wait(); close(results) }()

	// Inserter (this goroutine): the table is private until returned.
	t := j.base
	if t == nil {
		t = newTable(max(j.est, 1024))
	}
	tick := time.NewTicker(progressEvery)
	defer tick.Stop()
	lastLog := time.Now()
	report := func() {
		d := done.Load()
		if j.prog != nil {
			j.prog(d, total)
		}
		if j.log != nil && time.Since(lastLog) >= logEvery && total > 0 {
			lastLog = time.Now()
			j.log("Indexing disk", "doneBytes", d, "totalBytes", total, "percent", 100*float64(d)/float64(total), "entries", t.entries)
		}
	}
	report()
	for {
		select {
		case r, ok := <-results:
			if !ok {
				if firstErr != nil {
					return nil, firstErr
				}
				if err := ctx.Err(); err != nil {
					return nil, err
				}
				report()
				return t.compacted(), nil
			}
			for i, k := range r.keys {
				t = t.add(k, r.blks[i])
			}
			free <- r
		case <-tick.C:
			report()
		}
	}
}
