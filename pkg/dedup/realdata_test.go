package dedup

import (
	"context"
	"errors"
	"io"
	"os"
	"runtime"
	"testing"
	"time"
)

// TestRealGuestDump classifies a real guest's RAM dump against its disk
// image, then resolves every disk reference through a Resolver, as a
// migration would. It needs XENFERRY_DEDUP_MEM and XENFERRY_DEDUP_DISK (see
// `make dedup-realdata`, which points them at hack/guestimage/.work) and is
// skipped otherwise.
func TestRealGuestDump(t *testing.T) {
	memPath, diskPath := os.Getenv("XENFERRY_DEDUP_MEM"), os.Getenv("XENFERRY_DEDUP_DISK")
	if memPath == "" || diskPath == "" {
		t.Skip("set XENFERRY_DEDUP_MEM and XENFERRY_DEDUP_DISK to a RAM dump and its disk image")
	}
	ctx := context.Background()

	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heapBefore := ms.HeapAlloc
	start := time.Now()
	ix, err := Open(ctx, diskPath, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	build := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&ms)
	t.Logf("index: %d MiB disk, %d entries, table %.1f MiB (%.1f B/entry, %.2f MB per GiB of disk), heap +%.1f MiB, built in %v (%.2f GB/s)",
		ix.Size()>>20, ix.Entries(), float64(ix.MemBytes())/(1<<20), float64(ix.MemBytes())/float64(ix.Entries()),
		float64(ix.MemBytes())/1e6/(float64(ix.Size())/(1<<30)), float64(int64(ms.HeapAlloc)-int64(heapBefore))/(1<<20),
		build.Round(time.Millisecond), float64(ix.Size())/build.Seconds()/1e9)

	cat := NewCatalog(ix)
	f, err := os.Open(memPath)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var counts [3]int64
	var refs []Ref
	var classifyTime time.Duration
	buf := make([]byte, 4<<20) // streamed: 4 MiB at a time
	for off := int64(0); ; off += int64(len(buf)) {
		n, err := f.ReadAt(buf, off)
		t0 := time.Now()
		for o := 0; o+BlockSize <= n; o += BlockSize {
			c, h, ref := cat.Classify(buf[o : o+BlockSize])
			counts[c]++
			if c == ClassDisk {
				if ref.Hash != h {
					t.Fatalf("ref hash differs from the page hash")
				}
				refs = append(refs, ref)
			}
		}
		classifyTime += time.Since(t0)
		if errors.Is(err, io.EOF) || n < len(buf) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	total := counts[0] + counts[1] + counts[2]
	if total == 0 {
		t.Fatalf("empty RAM dump")
	}
	pct := func(n int64) float64 { return 100 * float64(n) / float64(total) }
	t.Logf("RAM %d MiB: zero %.1f%%, on disk %.1f%%, other %.1f%%; classified at %.2f GB/s (1 goroutine)",
		total*BlockSize>>20, pct(counts[ClassZero]), pct(counts[ClassDisk]), pct(counts[ClassFull]),
		float64(total*BlockSize)/classifyTime.Seconds()/1e9)
	t.Logf("wire estimate: precopy sends %.1f MiB of pages, with disk references %.1f MiB (-%.1f%%)",
		float64((counts[ClassDisk]+counts[ClassFull])*BlockSize)/(1<<20), float64(counts[ClassFull]*BlockSize)/(1<<20),
		100*float64(counts[ClassDisk])/float64(counts[ClassDisk]+counts[ClassFull]))

	r := OpenResolver([]string{diskPath}, runtime.GOMAXPROCS(0))
	defer r.Close()
	var failed int64
	page := make([]byte, BlockSize)
	start = time.Now()
	for i := 0; i < len(refs); i += 1024 {
		batch := refs[i:min(i+1024, len(refs))]
		if err := r.ResolveBatch(ctx, batch, func(int) []byte { return page }, func(j int, err error) {
			failed++
			if failed < 5 {
				t.Errorf("ref %+v: %v", batch[j], err)
			}
		}); err != nil {
			t.Fatal(err)
		}
	}
	el := time.Since(start)
	t.Logf("resolved %d references (%.1f MiB) in %v (%.2f GB/s), %d failed",
		len(refs), float64(len(refs)*BlockSize)/(1<<20), el.Round(time.Millisecond), float64(len(refs)*BlockSize)/el.Seconds()/1e9, failed)
}
