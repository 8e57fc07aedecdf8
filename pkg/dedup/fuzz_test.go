package dedup

import (
	"context"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"github.com/zeebo/xxh3"

	"github.com/xenferry/xenferry/internal/fuzzseed"
)

// persistedIndex builds a disk image of n blocks, indexes it and returns
// the disk's path and the persisted index file's bytes.
func persistedIndex(t testing.TB, dir string, n int64) (string, []byte) {
	t.Helper()
	im := makeImage(t, dir, n, 13)
	state := filepath.Join(dir, "state")
	ix, err := Open(context.Background(), im.path, Options{StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	ix.Close()
	files, _ := filepath.Glob(filepath.Join(state, "*.xfdedup"))
	if len(files) != 1 {
		t.Fatalf("%d persisted index files", len(files))
	}
	valid, err := os.ReadFile(files[0])
	if err != nil {
		t.Fatal(err)
	}
	return im.path, valid
}

// seal makes a persisted index belong to disk generation id and fixes up
// its checksum, so that the fuzzer's changes reach the shape, path and
// table checks behind the identity and checksum checks.
func seal(b []byte, id identity) []byte {
	b = append([]byte(nil), b...)
	if len(b) < 52 {
		return b
	}
	le := binary.LittleEndian
	le.PutUint64(b[16:], id.Dev)
	le.PutUint64(b[24:], id.Ino)
	le.PutUint64(b[32:], uint64(id.Size))
	le.PutUint64(b[40:], uint64(id.MtimeNs))
	var fl uint32
	if id.Block {
		fl = 1
	}
	le.PutUint32(b[48:], fl)
	if len(b) >= headerBytes+8 {
		le.PutUint64(b[len(b)-8:], xxh3.Hash(b[:len(b)-8]))
	}
	return b
}

// FuzzLoadIndex feeds arbitrary bytes to the persisted-index loader, as
// they are (sealed false) or sealed to the disk's identity with a correct
// checksum (sealed true). It must return an error, or a table that
// satisfies the table invariants, that finds every entry, and that
// survives save → load unchanged. A wrong identity must be reported as
// such (Open rebuilds on any error, but says why).
// Run: go test -run '^$' -fuzz '^FuzzLoadIndex$' ./pkg/dedup
func FuzzLoadIndex(f *testing.F) {
	dir := f.TempDir()
	diskPath, valid := persistedIndex(f, dir, 100)
	f.Add(valid, false)
	f.Add(valid, true)
	f.Add(valid[:headerBytes], true)
	f.Add([]byte{}, false)
	disk, err := os.Open(diskPath)
	if err != nil {
		f.Fatal(err)
	}
	defer disk.Close()
	id, err := statDisk(disk)
	if err != nil {
		f.Fatal(err)
	}
	p := filepath.Join(dir, "fuzz.xfdedup")
	again := filepath.Join(dir, "again.xfdedup")
	f.Fuzz(func(t *testing.T, data []byte, sealed bool) {
		if sealed {
			data = seal(data, id)
		}
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		tb, err := loadIndex(p, id)
		if err != nil {
			if sealed && errors.Is(err, errIdentityChanged) {
				t.Fatalf("sealed index refused for its identity: %v", err)
			}
			return
		}
		checkSorted(t, tb)
		for i := range tb.slots {
			if e := tb.slots[i]; e.blk != 0 {
				if blk, ok := tb.lookup(key{e.k0, e.k1}); !ok || blk != e.blk-1 {
					t.Fatalf("entry %d not found by lookup", i)
				}
			}
		}
		if err := saveIndex(again, diskPath, id, tb); err != nil {
			t.Fatal(err)
		}
		tb2, err := loadIndex(again, id)
		if err != nil {
			t.Fatalf("a loaded index saved again does not load: %v", err)
		}
		if tb2.n != tb.n || tb2.entries != tb.entries || !reflect.DeepEqual(tb2.slots, tb.slots) {
			t.Fatal("a loaded index saved and loaded again differs")
		}
	})
}

// TestWriteFuzzSeeds writes testdata/fuzz/FuzzLoadIndex from a real
// persisted index (see internal/fuzzseed): whole, cut at each part,
// and with the corruptions the loader checks for.
func TestWriteFuzzSeeds(t *testing.T) {
	w := fuzzseed.New(t)
	w.Clear("FuzzLoadIndex")
	_, valid := persistedIndex(t, t.TempDir(), 100)
	le := binary.LittleEndian
	w.Add("FuzzLoadIndex", "valid", valid, true)
	w.Add("FuzzLoadIndex", "valid-foreign-identity", valid, false)
	plen := int(le.Uint32(valid[80:]))
	table := headerBytes + (plen+7)&^7
	for _, c := range []struct {
		name string
		n    int
	}{{"header", headerBytes}, {"path", table}, {"table", table + (len(valid)-8-table)/2}, {"no-checksum", len(valid) - 8}} {
		w.Add("FuzzLoadIndex", "cut-"+c.name, valid[:c.n], true)
	}
	mut := func(name string, fn func(b []byte) []byte) {
		w.Add("FuzzLoadIndex", name, fn(append([]byte(nil), valid...)), true)
	}
	// The first two occupied slots swapped: out of order.
	mut("entries-swapped", func(b []byte) []byte {
		var occ []int
		for o := table; o+16 <= len(b)-8 && len(occ) < 2; o += 16 {
			if le.Uint32(b[o+12:]) != 0 {
				occ = append(occ, o)
			}
		}
		var tmp [16]byte
		copy(tmp[:], b[occ[0]:])
		copy(b[occ[0]:occ[0]+16], b[occ[1]:occ[1]+16])
		copy(b[occ[1]:], tmp[:])
		return b
	})
	mut("block-out-of-range", func(b []byte) []byte {
		for o := table; o+16 <= len(b)-8; o += 16 {
			if le.Uint32(b[o+12:]) != 0 {
				le.PutUint32(b[o+12:], 1<<31)
				break
			}
		}
		return b
	})
	mut("entry-count", func(b []byte) []byte { le.PutUint64(b[72:], le.Uint64(b[72:])+1); return b })
	mut("home-range", func(b []byte) []byte { le.PutUint64(b[56:], 1<<40); return b })
	mut("path-length", func(b []byte) []byte { le.PutUint32(b[80:], maxPathLen+1); return b })
	mut("trailing-byte", func(b []byte) []byte { return append(b[:len(b)-8], 0, 0, 0, 0, 0, 0, 0, 0, 0) })
	mut("version", func(b []byte) []byte { b[8] = 2; return b })
}
