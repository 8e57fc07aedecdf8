package dedup

import (
	"math/rand/v2"
	"os"
	"runtime"
	"testing"
	"time"
)

// checkSorted verifies the table invariants: occupied slots in ascending key
// order, each at or after its home slot, and the entry count.
func checkSorted(t *testing.T, tb *table) {
	t.Helper()
	var prev *entry
	var n int64
	for i := range tb.slots {
		e := &tb.slots[i]
		if e.blk == 0 {
			continue
		}
		n++
		if uint64(i) < tb.home(e.k0) {
			t.Fatalf("slot %d holds an entry whose home is %d", i, tb.home(e.k0))
		}
		if prev != nil && !less(prev, key{e.k0, e.k1}) {
			t.Fatalf("slot %d is out of order", i)
		}
		prev = e
	}
	if n != tb.entries {
		t.Fatalf("%d occupied slots, entries = %d", n, tb.entries)
	}
}

func TestTableInsertLookupGrow(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 7))
	tb := newTable(16)
	const n = 100_000
	keys := make([]key, n)
	for i := range keys {
		keys[i] = key{rng.Uint64(), rng.Uint32()}
		if tb.full() {
			tb = tb.rebuilt(tb.entries*2, nil)
		}
		for tb.insert(keys[i], uint32(i)) != nil {
			tb = tb.rebuilt(tb.entries+tb.entries/4+1024, nil)
		}
	}
	checkSorted(t, tb)
	for i, k := range keys {
		blk, ok := tb.lookup(k)
		if !ok || blk != uint32(i) {
			t.Fatalf("key %d: lookup = %d, %v", i, blk, ok)
		}
		// Same k0, other k1: a miss.
		if _, ok := tb.lookup(key{k.k0, k.k1 ^ 1}); ok {
			t.Fatalf("key %d with a flipped k1 bit was found", i)
		}
	}
	for range 10_000 {
		if _, ok := tb.lookup(key{rng.Uint64(), rng.Uint32()}); ok {
			t.Fatalf("a random key was found")
		}
	}
	if load := float64(tb.entries) / float64(tb.n); load > maxLoad || load < 0.4 {
		t.Fatalf("load factor %.2f outside [0.4, %.2f]", load, maxLoad)
	}
	c := tb.compacted()
	checkSorted(t, c)
	if load := float64(c.entries) / float64(c.n); load < 0.6 {
		t.Fatalf("compacted load factor %.2f", load)
	}
}

func TestTableKeepsLowestBlockForEqualKeys(t *testing.T) {
	tb := newTable(10)
	k := key{42, 7}
	for _, b := range []uint32{9, 3, 5} {
		if err := tb.insert(k, b); err != nil {
			t.Fatal(err)
		}
	}
	if blk, ok := tb.lookup(k); !ok || blk != 3 || tb.entries != 1 {
		t.Fatalf("lookup = %d, %v with %d entries; want block 3 once", blk, ok, tb.entries)
	}
}

func TestTableCollidingK0AndEdges(t *testing.T) {
	tb := newTable(64)
	// Many keys with the same k0 and keys at both ends of the range.
	for i := range uint32(40) {
		if err := tb.insert(key{1 << 63, 40 - i}, i); err != nil {
			t.Fatal(err)
		}
	}
	for i, k0 := range []uint64{0, ^uint64(0), ^uint64(0) - 1} {
		if err := tb.insert(key{k0, 0}, uint32(100+i)); err != nil {
			t.Fatal(err)
		}
	}
	checkSorted(t, tb)
	for i := range uint32(40) {
		if blk, ok := tb.lookup(key{1 << 63, 40 - i}); !ok || blk != i {
			t.Fatalf("k1=%d: lookup = %d, %v", 40-i, blk, ok)
		}
	}
	if blk, ok := tb.lookup(key{^uint64(0), 0}); !ok || blk != 101 {
		t.Fatalf("max key: %d, %v", blk, ok)
	}
	if _, ok := tb.lookup(key{1 << 63, 41}); ok {
		t.Fatalf("absent k1 found")
	}
}

func TestTableFilteredRebuild(t *testing.T) {
	tb := newTable(1000)
	rng := rand.New(rand.NewPCG(1, 2))
	keys := make([]key, 1000)
	for i := range keys {
		keys[i] = key{rng.Uint64(), rng.Uint32()}
		if err := tb.insert(keys[i], uint32(i)); err != nil {
			t.Fatal(err)
		}
	}
	odd := tb.rebuilt(tb.entries, func(blk uint32) bool { return blk%2 == 1 })
	checkSorted(t, odd)
	for i, k := range keys {
		_, ok := odd.lookup(k)
		if ok != (i%2 == 1) {
			t.Fatalf("key %d: found = %v after keeping odd blocks", i, ok)
		}
	}
}

// TestTable100GiBDisk sizes and fills a table as Open does for a full
// 100 GiB disk of distinct blocks (26.2 M entries) and reports its memory.
// Heavy (~0.5 GB, seconds): run with XENFERRY_DEDUP_SCALE=1.
func TestTable100GiBDisk(t *testing.T) {
	if os.Getenv("XENFERRY_DEDUP_SCALE") == "" {
		t.Skip("set XENFERRY_DEDUP_SCALE=1 to run the 100 GiB sizing test")
	}
	const blocks = 100 << 30 / BlockSize
	var ms runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&ms)
	before := ms.HeapAlloc
	start := time.Now()
	tb := newTable(blocks)
	rng := rand.New(rand.NewPCG(100, 100))
	var probe []key
	for i := range uint32(blocks) {
		k := key{rng.Uint64(), rng.Uint32()}
		tb = tb.add(k, i)
		if i%4096 == 0 {
			probe = append(probe, k)
		}
	}
	fill := time.Since(start)
	runtime.GC()
	runtime.ReadMemStats(&ms)
	heap := int64(ms.HeapAlloc) - int64(before)
	for _, k := range probe {
		if _, ok := tb.lookup(k); !ok {
			t.Fatalf("key missing")
		}
	}
	t.Logf("100 GiB disk, %d entries: table %.0f MiB (%.1f B/block, %.2f MB per GiB), heap %.0f MiB, filled in %v (%.0f ns/insert, inserter bound %.1f GB/s of disk)",
		tb.entries, float64(tb.memBytes())/(1<<20), float64(tb.memBytes())/blocks, float64(tb.memBytes())/1e6/100,
		float64(heap)/(1<<20), fill.Round(time.Millisecond), float64(fill.Nanoseconds())/blocks,
		float64(blocks*BlockSize)/fill.Seconds()/1e9)
	if tb.memBytes() > 1<<30 {
		t.Fatalf("table of a 100 GiB disk takes %d bytes", tb.memBytes())
	}
}
