package dedup

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

func TestClassify(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	im0 := makeImage(t, filepath.Join(dir), 500, 21)
	dir1 := filepath.Join(dir, "d1")
	if err := os.Mkdir(dir1, 0o755); err != nil {
		t.Fatal(err)
	}
	im1 := makeImage(t, dir1, 500, 22)
	ix0, err := Open(ctx, im0.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix0.Close()
	ix1, err := Open(ctx, im1.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix1.Close()
	// Disk 1 has no index: a nil entry is skipped.
	cat := NewCatalog(ix0, nil, ix1)
	if cat.Disks() != 3 {
		t.Fatalf("Disks = %d", cat.Disks())
	}

	firstRandom := func(im *image) int64 {
		for b, k := range im.kind {
			if k == 'r' {
				return int64(b)
			}
		}
		t.Fatal("image without random blocks")
		return 0
	}
	b0, b1 := firstRandom(im0), firstRandom(im1)+7
	for im1.kind[b1] != 'r' {
		b1++
	}
	onDisk0 := readBlock(t, im0.path, b0*BlockSize)
	onDisk1 := readBlock(t, im1.path, b1*BlockSize)
	other := randomPage(rand.New(rand.NewPCG(5, 5)))

	for _, tc := range []struct {
		name  string
		page  []byte
		class Class
		ref   Ref
	}{
		{"a zero page is zero", make([]byte, BlockSize), ClassZero, Ref{}},
		{"a page equal to a block of disk 0 is a disk reference", onDisk0, ClassDisk, Ref{Disk: 0, Offset: b0 * BlockSize, Hash: HashPage(onDisk0)}},
		{"a page equal to a block of disk 2 names disk 2", onDisk1, ClassDisk, Ref{Disk: 2, Offset: b1 * BlockSize, Hash: HashPage(onDisk1)}},
		{"a page on no disk is full", other, ClassFull, Ref{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			class, h, ref := cat.Classify(tc.page)
			if class != tc.class {
				t.Fatalf("class %v, want %v", class, tc.class)
			}
			if h != HashPage(tc.page) {
				t.Fatalf("returned hash %x, want HashPage %x", h, HashPage(tc.page))
			}
			if ref != tc.ref {
				t.Fatalf("ref %+v, want %+v", ref, tc.ref)
			}
		})
	}

	t.Run("a page one bit off a disk block is full", func(t *testing.T) {
		p := append([]byte(nil), onDisk0...)
		p[123] ^= 4
		if class, _, _ := cat.Classify(p); class != ClassFull {
			t.Fatalf("class %v", class)
		}
	})
	t.Run("an empty catalog classifies non-zero pages as full", func(t *testing.T) {
		if class, h, _ := NewCatalog().Classify(onDisk0); class != ClassFull || h != HashPage(onDisk0) {
			t.Fatalf("class %v", class)
		}
	})
	t.Run("a closed index is not consulted", func(t *testing.T) {
		ix, err := Open(ctx, im0.path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		ix.Close()
		if class, _, _ := NewCatalog(ix).Classify(onDisk0); class != ClassFull {
			t.Fatalf("class %v after Close", class)
		}
	})
	for _, c := range []Class{ClassFull, ClassZero, ClassDisk, 9} {
		if c.String() == "" {
			t.Fatalf("Class %d has no name", c)
		}
	}
}

func TestMarkStale(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	im := makeImage(t, dir, 600, 51)
	dir1 := filepath.Join(dir, "d1")
	if err := os.Mkdir(dir1, 0o755); err != nil {
		t.Fatal(err)
	}
	ix0, err := Open(ctx, im.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix0.Close()
	var b int64 = 40
	for im.kind[b] != 'r' {
		b++
	}
	page := readBlock(t, im.path, b*BlockSize)
	// Disk 1 holds the same block at another offset.
	im1 := makeImage(t, dir1, 100, 52)
	writeBlock(t, im1.path, 77*BlockSize, page)
	ix1, err := Open(ctx, im1.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix1.Close()
	cat := NewCatalog(ix0, ix1)

	class, h, ref := cat.Classify(page)
	if class != ClassDisk || ref.Disk != 0 || ref.Offset != b*BlockSize {
		t.Fatalf("before: %v %+v", class, ref)
	}
	cat.MarkStale(h)
	if class, _, ref = cat.Classify(page); class != ClassDisk || ref.Disk != 1 || ref.Offset != 77*BlockSize {
		t.Fatalf("after the first fallback: %v %+v, want disk 1 offset %d", class, ref, 77*BlockSize)
	}
	cat.MarkStale(h)
	if class, _, _ = cat.Classify(page); class != ClassFull {
		t.Fatalf("after both fallbacks: %v, want full", class)
	}
	// Other blocks are unaffected; the marks ask the next Refresh to re-hash
	// the block's region, which clears them.
	var other int64 = b + 1
	for im.kind[other] != 'r' {
		other++
	}
	if c, _, _ := cat.Classify(readBlock(t, im.path, other*BlockSize)); c != ClassDisk {
		t.Fatalf("an unmarked block: %v", c)
	}
	var pl progressLog
	ix0.opts.Progress = pl.fn
	if err := ix0.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, last := pl.get(); last[1] != regionSize {
		t.Fatalf("refresh after MarkStale read %d bytes, want one region", last[1])
	}
	if class, _, ref = cat.Classify(page); class != ClassDisk || ref.Disk != 0 {
		t.Fatalf("after refresh: %v %+v, want disk 0 again", class, ref)
	}
	// Out-of-range marks are ignored.
	ix0.MarkStale(-1)
	ix0.MarkStale(1 << 50)
}
