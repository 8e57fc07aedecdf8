package dedup

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// cpuTime returns the process's user+system CPU time. Benchmarks report
// bytes per CPU-second ("GB/cpu-s") next to wall-clock MB/s: on a shared
// machine the wall clock measures the neighbours too, CPU time does not.
func cpuTime(b *testing.B) time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_SELF, &ru); err != nil {
		b.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// reportPerCPU adds a GB/cpu-s metric for bytes processed since cpu0.
func reportPerCPU(b *testing.B, cpu0 time.Duration, bytes int64) {
	if d := cpuTime(b) - cpu0; d > 0 {
		b.ReportMetric(float64(bytes)/d.Seconds()/1e9, "GB/cpu-s")
	}
}

// Benchmarks: go test -run '^$' -bench . -benchtime 2s ./pkg/dedup
// MB/s columns are 10^6 bytes per second of disk indexed / pages classified
// / blocks resolved.

var (
	benchDiskOnce sync.Once
	benchDiskPath string
	benchDiskErr  error
)

const benchDiskBytes = 512 << 20

// benchDisk writes (once per process) a 512 MiB image of distinct random
// blocks — the worst case for the table — and reads it back so it sits in
// the page cache.
func benchDisk(b *testing.B) string {
	benchDiskOnce.Do(func() {
		dir, err := os.MkdirTemp("", "dedup-bench-")
		if err != nil {
			benchDiskErr = err
			return
		}
		benchDiskPath = filepath.Join(dir, "disk.img")
		f, err := os.Create(benchDiskPath)
		if err != nil {
			benchDiskErr = err
			return
		}
		defer f.Close()
		rng := rand.New(rand.NewPCG(1, 2))
		buf := make([]byte, 4<<20)
		for off := int64(0); off < benchDiskBytes; off += int64(len(buf)) {
			fillRandom(rng, buf)
			if _, err := f.WriteAt(buf, off); err != nil {
				benchDiskErr = err
				return
			}
		}
		for off := int64(0); off < benchDiskBytes; off += int64(len(buf)) {
			if _, err := f.ReadAt(buf, off); err != nil {
				benchDiskErr = err
				return
			}
		}
	})
	if benchDiskErr != nil {
		b.Fatal(benchDiskErr)
	}
	return benchDiskPath
}

func TestMain(m *testing.M) {
	code := m.Run()
	if benchDiskPath != "" {
		os.RemoveAll(filepath.Dir(benchDiskPath))
	}
	os.Exit(code)
}

// BenchmarkIndexBuild: Open of a 512 MiB image in the page cache (no state
// dir), every block distinct and non-zero.
func BenchmarkIndexBuild(b *testing.B) {
	path := benchDisk(b)
	for _, w := range []int{1, runtime.GOMAXPROCS(0)} {
		b.Run(fmt.Sprintf("workers=%d", w), func(b *testing.B) {
			b.SetBytes(benchDiskBytes)
			var entries, mem int64
			cpu0 := cpuTime(b)
			for b.Loop() {
				ix, err := Open(context.Background(), path, Options{Workers: w})
				if err != nil {
					b.Fatal(err)
				}
				entries, mem = ix.Entries(), ix.MemBytes()
				ix.Close()
			}
			reportPerCPU(b, cpu0, int64(b.N)*benchDiskBytes)
			b.ReportMetric(float64(entries), "entries")
			b.ReportMetric(float64(mem)/float64(entries), "tableB/entry")
		})
	}
}

// benchCatalog indexes the 512 MiB image and returns pages of each class.
func benchCatalog(b *testing.B) (*Catalog, map[string][][]byte) {
	path := benchDisk(b)
	ix, err := Open(context.Background(), path, Options{})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { ix.Close() })
	b.ReportMetric(float64(ix.MemBytes())/float64(ix.Entries()), "tableB/entry")
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	const n = 4096 // 16 MiB per class: larger than the CPU caches
	pages := map[string][][]byte{}
	for range n {
		pages["zero"] = append(pages["zero"], make([]byte, BlockSize))
		p := make([]byte, BlockSize)
		if _, err := f.ReadAt(p, rng.Int64N(benchDiskBytes/BlockSize)*BlockSize); err != nil {
			b.Fatal(err)
		}
		pages["disk"] = append(pages["disk"], p)
		pages["full"] = append(pages["full"], randomPage(rng))
	}
	for i := range n {
		pages["mixed"] = append(pages["mixed"], pages[[]string{"zero", "disk", "full"}[i%3]][i])
	}
	rng.Shuffle(n, func(i, j int) { pages["mixed"][i], pages["mixed"][j] = pages["mixed"][j], pages["mixed"][i] })
	return NewCatalog(ix), pages
}

// BenchmarkClassify: one page per op against a 131072-entry index.
func BenchmarkClassify(b *testing.B) {
	cat, pages := benchCatalog(b)
	want := map[string]Class{"zero": ClassZero, "disk": ClassDisk, "full": ClassFull}
	for _, name := range []string{"mixed", "zero", "disk", "full"} {
		ps := pages[name]
		b.Run(name, func(b *testing.B) {
			b.SetBytes(BlockSize)
			i := 0
			cpu0 := cpuTime(b)
			for b.Loop() {
				c, _, _ := cat.Classify(ps[i&(len(ps)-1)])
				if w, ok := want[name]; ok && c != w {
					b.Fatalf("class %v, want %v", c, w)
				}
				i++
			}
			reportPerCPU(b, cpu0, int64(b.N)*BlockSize)
		})
	}
	b.Run("mixed-parallel", func(b *testing.B) {
		ps := pages["mixed"]
		b.SetBytes(BlockSize)
		cpu0 := cpuTime(b)
		defer func() { reportPerCPU(b, cpu0, int64(b.N)*BlockSize) }()
		b.RunParallel(func(pb *testing.PB) {
			i := rand.IntN(len(ps))
			for pb.Next() {
				cat.Classify(ps[i&(len(ps)-1)])
				i++
			}
		})
	})
}

// BenchmarkLookup: a table of 4M entries (a full 16 GiB disk, 75 MB).
func BenchmarkLookup(b *testing.B) {
	const n = 4 << 20
	rng := rand.New(rand.NewPCG(5, 6))
	tb := newTable(n)
	hashes := make([]Hash, 0, 1<<16)
	for i := range uint32(n) {
		var h Hash
		for j := range h {
			h[j] = byte(rng.Uint32())
		}
		if err := tb.insert(keyOf(&h), i); err != nil {
			b.Fatal(err)
		}
		if i%64 == 0 && len(hashes) < cap(hashes) {
			hashes = append(hashes, h)
		}
	}
	ix := &Index{}
	ix.cur.Store(&snapshot{tab: tb, id: identity{Size: n * BlockSize}})
	misses := make([]Hash, len(hashes))
	for i := range misses {
		for j := range misses[i] {
			misses[i][j] = byte(rng.Uint32())
		}
	}
	b.Run("hit", func(b *testing.B) {
		i := 0
		for b.Loop() {
			if _, ok := ix.Lookup(hashes[i&(len(hashes)-1)]); !ok {
				b.Fatal("miss")
			}
			i++
		}
	})
	b.Run("miss", func(b *testing.B) {
		i := 0
		for b.Loop() {
			if _, ok := ix.Lookup(misses[i&(len(misses)-1)]); ok {
				b.Fatal("hit")
			}
			i++
		}
	})
}

func BenchmarkHashPage(b *testing.B) {
	p := randomPage(rand.New(rand.NewPCG(7, 8)))
	b.SetBytes(BlockSize)
	for b.Loop() {
		HashPage(p)
	}
}

func BenchmarkIsZero(b *testing.B) {
	zero := make([]byte, BlockSize)
	late := make([]byte, BlockSize)
	late[BlockSize-1] = 1
	for _, c := range []struct {
		name string
		p    []byte
	}{{"zero", zero}, {"nonzero-last-byte", late}, {"random", randomPage(rand.New(rand.NewPCG(1, 1)))}} {
		b.Run(c.name, func(b *testing.B) {
			b.SetBytes(BlockSize)
			for b.Loop() {
				IsZero(c.p)
			}
		})
	}
}

// BenchmarkResolveBatch: batches of 256 refs from the page cache, either 256
// adjacent blocks (coalesced into 256 KiB reads) or scattered blocks.
func BenchmarkResolveBatch(b *testing.B) {
	path := benchDisk(b)
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	const batch = 256
	mk := func(offs []int64) []Ref {
		refs := make([]Ref, len(offs))
		p := make([]byte, BlockSize)
		for i, off := range offs {
			if _, err := f.ReadAt(p, off); err != nil {
				b.Fatal(err)
			}
			refs[i] = Ref{Offset: off, Hash: HashPage(p)}
		}
		return refs
	}
	rng := rand.New(rand.NewPCG(9, 9))
	var adj, scat []int64
	base := rng.Int64N(benchDiskBytes/BlockSize-batch) * BlockSize
	for i := range int64(batch) {
		adj = append(adj, base+i*BlockSize)
		scat = append(scat, rng.Int64N(benchDiskBytes/BlockSize)*BlockSize)
	}
	dst := make([][]byte, batch)
	for i := range dst {
		dst[i] = make([]byte, BlockSize)
	}
	for _, c := range []struct {
		name string
		refs []Ref
	}{{"adjacent", mk(adj)}, {"scattered", mk(scat)}} {
		b.Run(c.name, func(b *testing.B) {
			r := OpenResolver([]string{path}, runtime.GOMAXPROCS(0))
			defer r.Close()
			b.SetBytes(batch * BlockSize)
			for b.Loop() {
				if err := r.ResolveBatch(context.Background(), c.refs, func(i int) []byte { return dst[i] },
					func(i int, err error) { b.Fatalf("ref %d: %v", i, err) }); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
