package main

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// TestClassify builds a disk and a memory dump with a known mix of pages and
// checks every class is counted exactly.
func TestClassify(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(1, 2))
	randPage := func() []byte {
		b := make([]byte, pageSize)
		for i := range b {
			b[i] = byte(rng.IntN(256))
		}
		return b
	}
	// Disk: 64 random blocks, then 16 zero blocks, then 16 more random blocks,
	// and a 100-byte tail that is not a whole block.
	var disk []byte
	for i := 0; i < 64; i++ {
		disk = append(disk, randPage()...)
	}
	disk = append(disk, make([]byte, 16*pageSize)...)
	for i := 0; i < 16; i++ {
		disk = append(disk, randPage()...)
	}
	disk = append(disk, make([]byte, 100)...)
	diskPath := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(diskPath, disk, 0o644); err != nil {
		t.Fatal(err)
	}
	blk := func(i int) []byte { return disk[i*pageSize : (i+1)*pageSize] }

	var mem []byte
	// 10 zero pages.
	mem = append(mem, make([]byte, 10*pageSize)...)
	// 20 pages equal to aligned disk blocks (0..14 and 80..83), block 3 twice.
	for i := 0; i < 19; i++ {
		b := i
		if i >= 15 {
			b = 80 + i - 15
		}
		mem = append(mem, blk(b)...)
	}
	mem = append(mem, blk(3)...)
	// 5 pages equal to disk windows at 512-byte (not 4096) offsets.
	for i := 0; i < 5; i++ {
		off := 7*pageSize + 512*(i+1)
		mem = append(mem, disk[off:off+pageSize]...)
	}
	// 7 random pages, one of them twice (8 pages).
	r := randPage()
	mem = append(mem, r...)
	for i := 0; i < 6; i++ {
		mem = append(mem, randPage()...)
	}
	mem = append(mem, r...)
	memPath := filepath.Join(dir, "mem.raw")
	if err := os.WriteFile(memPath, mem, 0o644); err != nil {
		t.Fatal(err)
	}

	for _, tc := range []struct {
		name      string
		fine      int
		workers   int
		wantFine  int64
		wantOther int64
	}{
		{name: "4 KiB alignment only, one worker", fine: 0, workers: 1, wantFine: 0, wantOther: 13},
		{name: "512-byte alignment too, three workers", fine: 512, workers: 3, wantFine: 5, wantOther: 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := &scanner{workers: tc.workers, fine: tc.fine, quiet: true}
			res, err := s.run(memPath, []string{diskPath})
			if err != nil {
				t.Fatal(err)
			}
			if res.Pages != 43 || res.Zero != 10 || res.Disk4K != 20 || res.DiskFine != tc.wantFine || res.Other != tc.wantOther {
				t.Fatalf("pages/zero/disk4k/fine/other = %d/%d/%d/%d/%d, want 43/10/20/%d/%d",
					res.Pages, res.Zero, res.Disk4K, res.DiskFine, res.Other, tc.wantFine, tc.wantOther)
			}
			if res.DistinctDiskContents != 19 {
				t.Errorf("distinct disk contents = %d, want 19", res.DistinctDiskContents)
			}
			if res.DiskBlocks != 96 || res.DiskBlocksIndexed != 80 {
				t.Errorf("disk blocks/indexed = %d/%d, want 96/80", res.DiskBlocks, res.DiskBlocksIndexed)
			}
			if res.OtherDupInRAM != 1 {
				t.Errorf("other pages repeating another = %d, want 1", res.OtherDupInRAM)
			}
			// Page classes in dump order: 10 zero, 20 disk, 5 fine (or other), 8 other.
			want := make([]uint8, 0, 43)
			for i := 0; i < 43; i++ {
				switch {
				case i < 10:
					want = append(want, classZero)
				case i < 30:
					want = append(want, classDisk4K)
				case i < 35 && tc.fine > 0:
					want = append(want, classDiskFine)
				default:
					want = append(want, classOther)
				}
			}
			if string(s.classes) != string(want) {
				t.Errorf("classes = %v, want %v", s.classes, want)
			}
			if res.HashOnlyMatch != 0 {
				t.Errorf("hash-only matches = %d, want 0", res.HashOnlyMatch)
			}
		})
	}
}

func TestBadInput(t *testing.T) {
	dir := t.TempDir()
	memPath := filepath.Join(dir, "mem.raw")
	if err := os.WriteFile(memPath, make([]byte, pageSize+1), 0o644); err != nil {
		t.Fatal(err)
	}
	s := &scanner{workers: 1, quiet: true}
	if _, err := s.run(memPath, []string{filepath.Join(dir, "missing.raw")}); err == nil {
		t.Fatal("missing disk: no error")
	}
	diskPath := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(diskPath, make([]byte, pageSize), 0o644); err != nil {
		t.Fatal(err)
	}
	if _, err := s.run(memPath, []string{diskPath}); err == nil {
		t.Fatal("dump size not a multiple of 4096: no error")
	}
}
