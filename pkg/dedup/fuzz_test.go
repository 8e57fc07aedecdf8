package dedup

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// FuzzLoadIndex feeds arbitrary bytes to the persisted-index loader: it must
// return an error or a table that satisfies the table invariants, never
// panic. Run: go test -run '^$' -fuzz FuzzLoadIndex ./pkg/dedup
func FuzzLoadIndex(f *testing.F) {
	dir := f.TempDir()
	im := makeImage(f, dir, 300, 13)
	state := filepath.Join(dir, "state")
	ix, err := Open(context.Background(), im.path, Options{StateDir: state})
	if err != nil {
		f.Fatal(err)
	}
	ix.Close()
	files, _ := filepath.Glob(filepath.Join(state, "*.xfdedup"))
	valid, err := os.ReadFile(files[0])
	if err != nil {
		f.Fatal(err)
	}
	f.Add(valid)
	f.Add(valid[:headerBytes])
	f.Add([]byte{})
	disk, err := os.Open(im.path)
	if err != nil {
		f.Fatal(err)
	}
	defer disk.Close()
	id, err := statDisk(disk)
	if err != nil {
		f.Fatal(err)
	}
	p := filepath.Join(dir, "fuzz.xfdedup")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		tb, err := loadIndex(p, id)
		if err != nil {
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
	})
}
