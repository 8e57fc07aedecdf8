package dedup

import (
	"errors"
	"math/bits"
)

// entry is one slot of the table: 16 bytes, no pointers (the GC never scans
// the table). blk is the block number + 1; 0 marks an empty slot.
type entry struct {
	k0  uint64
	k1  uint32
	blk uint32
}

const (
	entryBytes = 16
	// maxLoad is the load factor (entries / home range) the table is built
	// to; past it an insert grows the table.
	maxLoad = 0.85
	// maxBlocks bounds a disk: block numbers are stored as uint32 + 1.
	maxBlocks = 1<<32 - 2
)

// errTableFull reports that an insert ran off the end of the slot array; the
// caller grows the table and retries.
var errTableFull = errors.New("dedup: table slack exhausted")

// table is an ordered linear-probing hash table (Amble & Knuth). The home
// slot of a key is fastrange(k0, n) = k0*n>>64, which is monotone in k0, and
// every insert keeps the occupied slots in ascending (k0, k1) order while each
// entry stays at or after its home slot. The whole array is therefore sorted,
// so:
//   - a lookup stops at the first slot whose key is larger than the one it
//     looks for (a miss costs about as much as a hit, ~4 slots at load 0.85);
//   - resizing and filtering are one sequential pass;
//   - there is no wrap-around: slots past n are slack for the last cluster.
//
// A table is immutable once published: Index swaps whole tables atomically,
// which is what makes Lookup lock-free.
type table struct {
	slots   []entry
	n       uint64 // home range
	entries int64
}

func newTable(capacity int64) *table {
	n := uint64(float64(capacity)/maxLoad) + 1
	if n < 64 {
		n = 64
	}
	return &table{slots: make([]entry, n+slackFor(n)), n: n}
}

// slackFor is how many slots follow the home range for the last cluster.
func slackFor(n uint64) uint64 { return 64 + n>>10 }

func (t *table) home(k0 uint64) uint64 {
	hi, _ := bits.Mul64(k0, t.n)
	return hi
}

func less(e *entry, k key) bool {
	return e.k0 < k.k0 || (e.k0 == k.k0 && e.k1 < k.k1)
}

// lookup returns the block number stored for k.
func (t *table) lookup(k key) (uint32, bool) {
	s := t.slots
	for i := t.home(k.k0); i < uint64(len(s)); i++ {
		e := &s[i]
		if e.blk == 0 || e.k0 > k.k0 {
			return 0, false
		}
		if e.k0 == k.k0 {
			if e.k1 == k.k1 {
				return e.blk - 1, true
			}
			if e.k1 > k.k1 {
				return 0, false
			}
		}
	}
	return 0, false
}

// insert adds k → block blk. A key already present keeps the lowest block
// number, so the result does not depend on insertion order.
func (t *table) insert(k key, blk uint32) error {
	s := t.slots
	p := t.home(k.k0)
	for p < uint64(len(s)) && s[p].blk != 0 && less(&s[p], k) {
		p++
	}
	if p == uint64(len(s)) {
		return errTableFull
	}
	if e := &s[p]; e.blk != 0 && e.k0 == k.k0 && e.k1 == k.k1 {
		if blk+1 < e.blk {
			e.blk = blk + 1
		}
		return nil
	}
	q := p
	for q < uint64(len(s)) && s[q].blk != 0 {
		q++
	}
	if q == uint64(len(s)) {
		return errTableFull
	}
	copy(s[p+1:q+1], s[p:q])
	s[p] = entry{k0: k.k0, k1: k.k1, blk: blk + 1}
	t.entries++
	return nil
}

// add inserts k → blk, growing the table by half when it is full or its
// slack ran out, and returns the table now holding the entry. Builds size
// their first table from the allocated blocks, an upper bound on entries,
// so growth is the exception.
func (t *table) add(k key, blk uint32) *table {
	if t.full() {
		t = t.rebuilt(t.entries+t.entries/2, nil)
	}
	for t.insert(k, blk) != nil {
		t = t.rebuilt(t.entries+t.entries/4+1024, nil)
	}
	return t
}

// full reports whether the next insert would pass maxLoad.
func (t *table) full() bool {
	return float64(t.entries+1) > maxLoad*float64(t.n)
}

// rebuilt returns a copy of t sized for capacity entries, keeping the entries
// for which keep returns true (nil keeps all). One sequential pass: the
// source is sorted, so each entry goes to max(home, previous+1).
func (t *table) rebuilt(capacity int64, keep func(blk uint32) bool) *table {
	if capacity < t.entries {
		capacity = t.entries
	}
	for {
		nt := newTable(capacity)
		if nt.placeFrom(t, keep) {
			return nt
		}
		capacity += capacity/4 + 64
	}
}

func (nt *table) placeFrom(t *table, keep func(blk uint32) bool) bool {
	next := uint64(0)
	s := nt.slots
	for i := range t.slots {
		e := t.slots[i]
		if e.blk == 0 || (keep != nil && !keep(e.blk-1)) {
			continue
		}
		h := nt.home(e.k0)
		if h < next {
			h = next
		}
		if h >= uint64(len(s)) {
			clear(nt.slots)
			nt.entries = 0
			return false
		}
		s[h] = e
		next = h + 1
		nt.entries++
	}
	return true
}

// compacted returns t, or a smaller copy when t is less than 60% loaded.
func (t *table) compacted() *table {
	if float64(t.entries) >= 0.6*float64(t.n) || t.n <= 64 {
		return t
	}
	return t.rebuilt(t.entries, nil)
}

func (t *table) memBytes() int64 { return int64(len(t.slots)) * entryBytes }
