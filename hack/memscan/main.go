// Command memscan classifies the pages of a raw guest memory dump against the
// guest's disk image(s): zero pages, pages byte-identical to a 4 KiB block of
// a disk at a 4 KiB-aligned offset (what disk-dedup transfer can send as a
// reference), optionally pages found at a finer alignment, and the rest. It is
// a measurement tool for hack/guestimage dumps, not part of the data path.
//
//	go run ./hack/memscan -mem hack/guestimage/.work/mem.raw -disk hack/guestimage/.work/disk.raw
//
// The disk index is a sorted array of fixed-size entries (128-bit xxh3 hash +
// position, 24 bytes per non-zero block), searched by binary search; every
// hash match is verified by reading the block back and comparing bytes.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/zeebo/xxh3"
)

const pageSize = 4096

// entry is one indexed disk window: content hash and where it is. pos holds
// the disk number in its top 8 bits and the byte offset in the low 56.
type entry struct {
	hi, lo uint64
	pos    uint64
}

const posDiskShift = 56

func (e entry) disk() int     { return int(e.pos >> posDiskShift) }
func (e entry) offset() int64 { return int64(e.pos & (1<<posDiskShift - 1)) }
func cmpEntry(a, b entry) int {
	switch {
	case a.hi < b.hi:
		return -1
	case a.hi > b.hi:
		return 1
	case a.lo < b.lo:
		return -1
	case a.lo > b.lo:
		return 1
	}
	return 0
}

// index is a sorted array of entries.
type index []entry

func (ix index) lookup(h xxh3.Uint128) (entry, bool) {
	k := entry{hi: h.Hi, lo: h.Lo}
	i, found := slices.BinarySearchFunc(ix, k, cmpEntry)
	if !found {
		return entry{}, false
	}
	return ix[i], true
}

// Result is what memscan reports (-json prints it as one line).
type Result struct {
	Mem           string   `json:"mem"`
	Disks         []string `json:"disks"`
	Pages         int64    `json:"pages"`
	Zero          int64    `json:"zero"`
	Disk4K        int64    `json:"disk4k"`
	DiskFine      int64    `json:"diskFine"`
	FineAlign     int      `json:"fineAlign,omitempty"`
	Other         int64    `json:"other"`
	OtherDupInRAM int64    `json:"otherDupInRAM"`
	HashOnlyMatch int64    `json:"hashOnlyMatch"`
	ZeroFrac      float64  `json:"zeroFraction"`
	Disk4KFrac    float64  `json:"disk4kFraction"`
	DiskFineFrac  float64  `json:"diskFineFraction"`
	OtherFrac     float64  `json:"otherFraction"`
	// DistinctDiskContents is how many different block contents the disk4k
	// pages hold (several pages may hold the same block; a disk may hold the
	// same content in several blocks).
	DistinctDiskContents int64   `json:"distinctDiskContents"`
	DiskBlocks           int64   `json:"diskBlocks"`
	DiskBlocksIndexed    int64   `json:"diskBlocksIndexed"`
	FineWindowsIndexed   int64   `json:"fineWindowsIndexed,omitempty"`
	IndexBytes           int64   `json:"indexBytes"`
	IndexSeconds         float64 `json:"indexSeconds"`
	ScanSeconds          float64 `json:"scanSeconds"`
}

func main() {
	var (
		memPath  = flag.String("mem", "", "raw memory dump: page i of the file is guest frame i (required)")
		diskList = flag.String("disk", "", "comma-separated raw disk images of the guest (required)")
		fine     = flag.Int("fine", 0, "also look for pages at this finer disk alignment (512, 1024 or 2048; 0: off)")
		workers  = flag.Int("workers", runtime.GOMAXPROCS(0), "parallel hashing workers")
		asJSON   = flag.Bool("json", false, "print the result as one JSON line")
		quiet    = flag.Bool("q", false, "no progress output")
		regions  = flag.Int("regions", 0, "also print the classes per region of this many MiB of guest-physical memory (0: off)")
	)
	flag.Parse()
	if *memPath == "" || *diskList == "" {
		fmt.Fprintln(os.Stderr, "memscan: -mem and -disk are required")
		flag.Usage()
		os.Exit(2)
	}
	if *fine != 0 && (*fine < 512 || *fine >= pageSize || pageSize%*fine != 0) {
		fmt.Fprintf(os.Stderr, "memscan: -fine %d: want 512, 1024 or 2048\n", *fine)
		os.Exit(2)
	}
	if *workers < 1 {
		*workers = 1
	}
	s := &scanner{workers: *workers, fine: *fine, quiet: *quiet}
	res, err := s.run(*memPath, strings.Split(*diskList, ","))
	if err != nil {
		fmt.Fprintf(os.Stderr, "memscan: %v\n", err)
		os.Exit(1)
	}
	if *asJSON {
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
		return
	}
	printTable(os.Stdout, res)
	if *regions > 0 {
		printRegions(os.Stdout, s.classes, *regions)
	}
}

// printRegions prints the class fractions of each region of mib MiB.
func printRegions(w io.Writer, classes []uint8, mib int) {
	per := mib << 20 / pageSize
	fmt.Fprintf(w, "%-21s %7s %7s %7s %7s\n", "guest-physical MiB", "zero", "disk", "fine", "other")
	for start := 0; start < len(classes); start += per {
		var n [4]int
		end := min(start+per, len(classes))
		for _, c := range classes[start:end] {
			n[c]++
		}
		pct := func(i int) float64 { return 100 * float64(n[i]) / float64(end-start) }
		fmt.Fprintf(w, "%9d-%-11d %6.1f%% %6.1f%% %6.1f%% %6.1f%%\n", start*pageSize>>20, end*pageSize>>20,
			pct(int(classZero)), pct(int(classDisk4K)), pct(int(classDiskFine)), pct(int(classOther)))
	}
}

type scanner struct {
	workers int
	fine    int
	quiet   bool
	disks   []*os.File
	// classes holds one class byte per page of the dump (filled by scanMem).
	classes []uint8
}

// Page classes in scanner.classes.
const (
	classZero uint8 = iota
	classDisk4K
	classDiskFine
	classOther
)

func (s *scanner) run(memPath string, diskPaths []string) (*Result, error) {
	if len(diskPaths) > 1<<(64-posDiskShift) {
		return nil, fmt.Errorf("%d disks: at most %d", len(diskPaths), 1<<(64-posDiskShift))
	}
	res := &Result{Mem: memPath, Disks: diskPaths, FineAlign: s.fine}
	for _, p := range diskPaths {
		f, err := os.Open(p)
		if err != nil {
			return nil, fmt.Errorf("open disk: %w", err)
		}
		defer f.Close()
		s.disks = append(s.disks, f)
	}
	t0 := time.Now()
	mainIx, fineIx, err := s.buildIndex(res)
	if err != nil {
		return nil, err
	}
	res.IndexSeconds = time.Since(t0).Seconds()
	res.IndexBytes = int64(len(mainIx)+len(fineIx)) * 24
	t0 = time.Now()
	if err := s.scanMem(memPath, mainIx, fineIx, res); err != nil {
		return nil, err
	}
	res.ScanSeconds = time.Since(t0).Seconds()
	if res.Pages > 0 {
		n := float64(res.Pages)
		res.ZeroFrac = float64(res.Zero) / n
		res.Disk4KFrac = float64(res.Disk4K) / n
		res.DiskFineFrac = float64(res.DiskFine) / n
		res.OtherFrac = float64(res.Other) / n
	}
	return res, nil
}

// progress prints "what: done/total MiB (rate)" to stderr about once a second.
type progress struct {
	what  string
	total int64
	done  atomic.Int64
	quiet bool
	stop  chan struct{}
	wg    sync.WaitGroup
	start time.Time
}

func newProgress(what string, total int64, quiet bool) *progress {
	p := &progress{what: what, total: total, quiet: quiet, stop: make(chan struct{}), start: time.Now()}
	if quiet {
		return p
	}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		t := time.NewTicker(time.Second)
		defer t.Stop()
		for {
			select {
			case <-t.C:
				p.print()
			case <-p.stop:
				return
			}
		}
	}()
	return p
}

func (p *progress) print() {
	d := p.done.Load()
	el := time.Since(p.start).Seconds()
	pct := 0.0
	if p.total > 0 {
		pct = 100 * float64(d) / float64(p.total)
	}
	fmt.Fprintf(os.Stderr, "memscan: %s: %d/%d MiB (%.0f%%), %.0f MiB/s\n", p.what, d>>20, p.total>>20, pct, float64(d)/(1<<20)/max(el, 1e-9))
}

func (p *progress) finish() {
	if p.quiet {
		return
	}
	close(p.stop)
	p.wg.Wait()
	p.print()
}

const chunkSize = 8 << 20

// buildIndex hashes every 4 KiB block at 4 KiB-aligned offsets of every disk
// (zero blocks are skipped) into a sorted array; with -fine it also hashes the
// 4 KiB windows at the finer offsets that are not 4 KiB-aligned.
func (s *scanner) buildIndex(res *Result) (index, index, error) {
	var total int64
	sizes := make([]int64, len(s.disks))
	for i, f := range s.disks {
		st, err := f.Stat()
		if err != nil {
			return nil, nil, fmt.Errorf("stat disk %s: %w", f.Name(), err)
		}
		if st.Size()%pageSize != 0 {
			fmt.Fprintf(os.Stderr, "memscan: warning: disk %s size %d is not a multiple of 4096; the tail is not indexed\n", f.Name(), st.Size())
		}
		sizes[i] = st.Size()
		total += st.Size()
		res.DiskBlocks += st.Size() / pageSize
	}
	type job struct {
		disk int
		off  int64
	}
	jobs := make(chan job, s.workers)
	mainParts := make([]index, s.workers)
	fine := make([]index, s.workers)
	errs := make([]error, s.workers)
	pr := newProgress("indexing disk", total, s.quiet)
	var wg sync.WaitGroup
	for w := 0; w < s.workers; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			buf := make([]byte, chunkSize+pageSize)
			for j := range jobs {
				if errs[w] != nil {
					continue // drain
				}
				n, err := s.disks[j.disk].ReadAt(buf, j.off)
				if err != nil && !errors.Is(err, io.EOF) {
					errs[w] = fmt.Errorf("read disk %s at %d: %w", s.disks[j.disk].Name(), j.off, err)
					continue
				}
				data := buf[:n]
				lim := min(int64(chunkSize), int64(n)) // starting offsets owned by this chunk
				tag := uint64(j.disk) << posDiskShift
				for o := int64(0); o+pageSize <= int64(n) && o < lim; o += pageSize {
					b := data[o : o+pageSize]
					if isZero(b) {
						continue
					}
					h := xxh3.Hash128(b)
					mainParts[w] = append(mainParts[w], entry{hi: h.Hi, lo: h.Lo, pos: tag | uint64(j.off+o)})
				}
				if s.fine > 0 {
					for o := int64(0); o+pageSize <= int64(n) && o < lim; o += int64(s.fine) {
						if o%pageSize == 0 {
							continue
						}
						b := data[o : o+pageSize]
						if isZero(b) {
							continue
						}
						h := xxh3.Hash128(b)
						fine[w] = append(fine[w], entry{hi: h.Hi, lo: h.Lo, pos: tag | uint64(j.off+o)})
					}
				}
				pr.done.Add(lim)
			}
		}(w)
	}
	for d, size := range sizes {
		for off := int64(0); off < size; off += chunkSize {
			jobs <- job{disk: d, off: off}
		}
	}
	close(jobs)
	wg.Wait()
	pr.finish()
	if err := errors.Join(errs...); err != nil {
		return nil, nil, err
	}
	merge := func(parts []index) index {
		var n int
		for _, p := range parts {
			n += len(p)
		}
		out := make(index, 0, n)
		for _, p := range parts {
			out = append(out, p...)
		}
		slices.SortFunc(out, cmpEntry)
		return out
	}
	mainIx := merge(mainParts)
	fineIx := merge(fine)
	res.DiskBlocksIndexed = int64(len(mainIx))
	res.FineWindowsIndexed = int64(len(fineIx))
	return mainIx, fineIx, nil
}

// scanMem classifies every page of the dump. Per-worker counters and arrays;
// no per-page map.
func (s *scanner) scanMem(memPath string, mainIx, fine index, res *Result) error {
	f, err := os.Open(memPath)
	if err != nil {
		return fmt.Errorf("open memory dump: %w", err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return fmt.Errorf("stat memory dump %s: %w", memPath, err)
	}
	if st.Size()%pageSize != 0 {
		return fmt.Errorf("memory dump %s: size %d is not a multiple of 4096", memPath, st.Size())
	}
	type counts struct {
		zero, disk4k, diskFine, other, hashOnly int64
		otherHashes                             []xxh3.Uint128
		diskRefs                                []uint64
		err                                     error
	}
	s.classes = make([]uint8, st.Size()/pageSize) // disjoint indices per worker
	cs := make([]counts, s.workers)
	jobs := make(chan int64, s.workers)
	pr := newProgress("classifying pages", st.Size(), s.quiet)
	var wg sync.WaitGroup
	for w := 0; w < s.workers; w++ {
		wg.Add(1)
		go func(c *counts) {
			defer wg.Done()
			buf := make([]byte, chunkSize)
			blk := make([]byte, pageSize)
			// verify reads the indexed window back and compares bytes.
			verify := func(e entry, page []byte) (bool, error) {
				if _, err := s.disks[e.disk()].ReadAt(blk, e.offset()); err != nil {
					return false, fmt.Errorf("verify: read disk %s at %d: %w", s.disks[e.disk()].Name(), e.offset(), err)
				}
				return bytes.Equal(blk, page), nil
			}
			for off := range jobs {
				if c.err != nil {
					continue
				}
				n, err := f.ReadAt(buf, off)
				if err != nil && !errors.Is(err, io.EOF) {
					c.err = fmt.Errorf("read memory dump at %d: %w", off, err)
					continue
				}
				for o := 0; o+pageSize <= n; o += pageSize {
					p := buf[o : o+pageSize]
					pfn := (off + int64(o)) / pageSize
					if isZero(p) {
						s.classes[pfn] = classZero
						c.zero++
						continue
					}
					h := xxh3.Hash128(p)
					if e, ok := mainIx.lookup(h); ok {
						same, err := verify(e, p)
						if err != nil {
							c.err = err
							break
						}
						if same {
							s.classes[pfn] = classDisk4K
							c.disk4k++
							c.diskRefs = append(c.diskRefs, e.pos)
							continue
						}
						c.hashOnly++
					}
					if len(fine) > 0 {
						if e, ok := fine.lookup(h); ok {
							same, err := verify(e, p)
							if err != nil {
								c.err = err
								break
							}
							if same {
								s.classes[pfn] = classDiskFine
								c.diskFine++
								continue
							}
							c.hashOnly++
						}
					}
					s.classes[pfn] = classOther
					c.other++
					c.otherHashes = append(c.otherHashes, h)
				}
				pr.done.Add(int64(n))
			}
		}(&cs[w])
	}
	for off := int64(0); off < st.Size(); off += chunkSize {
		jobs <- off
	}
	close(jobs)
	wg.Wait()
	pr.finish()
	var others []xxh3.Uint128
	var refs []uint64
	for i := range cs {
		c := &cs[i]
		if c.err != nil {
			return c.err
		}
		res.Zero += c.zero
		res.Disk4K += c.disk4k
		res.DiskFine += c.diskFine
		res.Other += c.other
		res.HashOnlyMatch += c.hashOnly
		others = append(others, c.otherHashes...)
		refs = append(refs, c.diskRefs...)
	}
	res.Pages = st.Size() / pageSize
	// Other pages whose content also appears elsewhere in RAM (copies beyond
	// the first): what in-stream dedup could still save.
	slices.SortFunc(others, func(a, b xxh3.Uint128) int {
		return cmpEntry(entry{hi: a.Hi, lo: a.Lo}, entry{hi: b.Hi, lo: b.Lo})
	})
	for i := 1; i < len(others); i++ {
		if others[i] == others[i-1] {
			res.OtherDupInRAM++
		}
	}
	slices.Sort(refs)
	res.DistinctDiskContents = int64(len(slices.Compact(refs)))
	return nil
}

var zeroPage [pageSize]byte

// isZero reports whether a 4 KiB page is all zero bytes.
func isZero(b []byte) bool { return bytes.Equal(b, zeroPage[:]) }

func printTable(w io.Writer, r *Result) {
	pct := func(n int64) string { return fmt.Sprintf("%6.2f%%", 100*float64(n)/float64(max(r.Pages, 1))) }
	fmt.Fprintf(w, "memory %s: %d pages (%d MiB)\n", r.Mem, r.Pages, r.Pages*pageSize>>20)
	fmt.Fprintf(w, "disks  %s: %d blocks, %d non-zero indexed (index %d MiB, %.1fs)\n",
		strings.Join(r.Disks, ","), r.DiskBlocks, r.DiskBlocksIndexed, r.IndexBytes>>20, r.IndexSeconds)
	fmt.Fprintf(w, "  zero                      %9d  %s\n", r.Zero, pct(r.Zero))
	fmt.Fprintf(w, "  on disk, 4 KiB-aligned    %9d  %s  (%d distinct contents)\n", r.Disk4K, pct(r.Disk4K), r.DistinctDiskContents)
	if r.FineAlign > 0 {
		fmt.Fprintf(w, "  on disk, %4d-aligned only %8d  %s\n", r.FineAlign, r.DiskFine, pct(r.DiskFine))
	}
	fmt.Fprintf(w, "  other                     %9d  %s  (%d of them repeat another other page)\n", r.Other, pct(r.Other), r.OtherDupInRAM)
	if r.HashOnlyMatch > 0 {
		fmt.Fprintf(w, "  hash matched but bytes differed: %d (counted as other)\n", r.HashOnlyMatch)
	}
	fmt.Fprintf(w, "scan %.1fs\n", r.ScanSeconds)
}
