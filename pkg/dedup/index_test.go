package dedup

import (
	"context"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// progressLog records Progress calls.
type progressLog struct {
	mu    sync.Mutex
	calls int
	last  [2]int64
}

func (p *progressLog) fn(done, total int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.calls++
	p.last = [2]int64{done, total}
}

func (p *progressLog) get() (int, [2]int64) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.calls, p.last
}

func TestOpenBuildsIndexOfGeneratedImage(t *testing.T) {
	for _, workers := range []int{1, 3} {
		t.Run("workers="+string(rune('0'+workers)), func(t *testing.T) {
			im := makeImage(t, t.TempDir(), 6000, 11) // ~23 MiB, with holes
			var pl progressLog
			ix, err := Open(context.Background(), im.path, Options{Workers: workers, Progress: pl.fn})
			if err != nil {
				t.Fatal(err)
			}
			defer ix.Close()
			if ix.Size() != im.blocks*BlockSize || ix.Blocks() != im.blocks || ix.Path() != im.path {
				t.Fatalf("Size %d Blocks %d Path %s", ix.Size(), ix.Blocks(), ix.Path())
			}
			checkIndexMatchesFile(t, ix)
			if want := distinctNonZero(t, im.path); ix.Entries() != want {
				t.Fatalf("Entries %d, want %d", ix.Entries(), want)
			}
			calls, last := pl.get()
			if calls < 2 || last[0] != last[1] || last[1] != ix.Size() {
				t.Fatalf("progress: %d calls, last %v; want >= 2 calls ending at %d/%d", calls, last, ix.Size(), ix.Size())
			}
			if per := float64(ix.MemBytes()) / float64(ix.Entries()); per > 40 {
				t.Fatalf("%.1f bytes per entry", per)
			}
		})
	}
}

func TestOpenRejectsBadDisks(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		name, path, want string
	}{
		{"a missing file is a clear error", filepath.Join(dir, "nope.img"), "no such file"},
		{"a directory is not a disk", dir, "not a regular file or block device"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := Open(context.Background(), tc.path, Options{})
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), tc.path) {
				t.Fatalf("err = %v, want it to name %s and say %q", err, tc.path, tc.want)
			}
		})
	}
}

func TestOpenHonoursCancellation(t *testing.T) {
	im := makeImage(t, t.TempDir(), 2000, 3)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := Open(ctx, im.path, Options{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
}

func TestPersistedIndexReloadAndRebuild(t *testing.T) {
	dir := t.TempDir()
	state := filepath.Join(dir, "state")
	im := makeImage(t, dir, 3000, 5)
	ctx := context.Background()

	var pl progressLog
	ix, err := Open(ctx, im.path, Options{StateDir: state, Progress: pl.fn})
	if err != nil {
		t.Fatal(err)
	}
	entries := ix.Entries()
	ix.Close()
	files, _ := filepath.Glob(filepath.Join(state, "*.xfdedup"))
	if len(files) != 1 {
		t.Fatalf("state files %v, want one", files)
	}

	t.Run("an unchanged disk loads the persisted index without reading it", func(t *testing.T) {
		var pl progressLog
		ix, err := Open(ctx, im.path, Options{StateDir: state, Progress: pl.fn})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		if calls, _ := pl.get(); calls != 0 {
			t.Fatalf("progress called %d times: the disk was re-read", calls)
		}
		if ix.Entries() != entries {
			t.Fatalf("Entries %d after reload, want %d", ix.Entries(), entries)
		}
		checkIndexMatchesFile(t, ix)
	})

	t.Run("a corrupted index file is rebuilt", func(t *testing.T) {
		data, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		rng := rand.New(rand.NewPCG(9, 9))
		for range 20 {
			bad := append([]byte(nil), data...)
			bad[rng.IntN(len(bad))] ^= byte(1 + rng.IntN(255))
			if _, err := loadIndex2(t, bad, ix); err == nil {
				t.Fatalf("a corrupted index file loaded")
			}
		}
		for _, n := range []int{0, 10, headerBytes, len(data) - 1} {
			if _, err := loadIndex2(t, data[:n], ix); err == nil {
				t.Fatalf("a %d-byte prefix of the index file loaded", n)
			}
		}
		bad := append([]byte(nil), data...)
		bad[len(bad)/2] ^= 0x10
		if err := os.WriteFile(files[0], bad, 0o644); err != nil {
			t.Fatal(err)
		}
		var pl progressLog
		ix, err := Open(ctx, im.path, Options{StateDir: state, Progress: pl.fn})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		if calls, _ := pl.get(); calls == 0 {
			t.Fatalf("a corrupted index was used")
		}
		checkIndexMatchesFile(t, ix)
	})

	t.Run("a modified disk is rebuilt", func(t *testing.T) {
		p := randomPage(rand.New(rand.NewPCG(1, 99)))
		time.Sleep(10 * time.Millisecond) // let mtime move
		writeBlock(t, im.path, 17*BlockSize, p)
		var pl progressLog
		ix, err := Open(ctx, im.path, Options{StateDir: state, Progress: pl.fn})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		if calls, _ := pl.get(); calls == 0 {
			t.Fatalf("the stale persisted index was used")
		}
		if off, ok := ix.Lookup(HashPage(p)); !ok || off != 17*BlockSize {
			t.Fatalf("new block: Lookup = %d, %v", off, ok)
		}
		checkIndexMatchesFile(t, ix)
	})
}

// loadIndex2 writes data as the state file of ix's disk and loads it.
func loadIndex2(t *testing.T, data []byte, ix *Index) (*table, error) {
	t.Helper()
	f, err := os.Open(ix.Path())
	if err != nil {
		t.Fatal(err)
	}
	id, err := statDisk(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	p := filepath.Join(t.TempDir(), "x.xfdedup")
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return loadIndex(p, id)
}

func TestRefresh(t *testing.T) {
	ctx := context.Background()
	rng := rand.New(rand.NewPCG(3, 4))

	t.Run("an unchanged disk is not re-read", func(t *testing.T) {
		im := makeImage(t, t.TempDir(), 1000, 1)
		var pl progressLog
		ix, err := Open(ctx, im.path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		ix.opts.Progress = pl.fn
		if err := ix.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		if calls, _ := pl.get(); calls != 0 {
			t.Fatalf("Refresh re-read an unchanged disk")
		}
	})

	t.Run("invalidated regions are re-hashed incrementally", func(t *testing.T) {
		im := makeImage(t, t.TempDir(), 3000, 2)
		state := filepath.Join(t.TempDir(), "state")
		ix, err := Open(ctx, im.path, Options{StateDir: state})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		var pl progressLog
		ix.opts.Progress = pl.fn
		// Overwrite three blocks in two regions; remember what they held.
		offs := []int64{5 * BlockSize, 6 * BlockSize, 1000 * BlockSize}
		var oldHashes, newHashes []Hash
		for _, off := range offs {
			oldHashes = append(oldHashes, HashPage(readBlock(t, im.path, off)))
			p := randomPage(rng)
			newHashes = append(newHashes, HashPage(p))
			writeBlock(t, im.path, off, p)
			ix.Invalidate(off, BlockSize)
		}
		if err := ix.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		_, last := pl.get()
		if last[1] != 2*regionSize {
			t.Fatalf("refresh read %d bytes, want the 2 invalidated regions (%d)", last[1], 2*regionSize)
		}
		for i, off := range offs {
			if got, ok := ix.Lookup(newHashes[i]); !ok || got != off {
				t.Fatalf("new block at %d: Lookup = %d, %v", off, got, ok)
			}
			if got, ok := ix.Lookup(oldHashes[i]); ok && got == off {
				t.Fatalf("old content still maps to %d", off)
			}
		}
		// Blocks in untouched regions keep their entries; the index is
		// exactly the file's except for duplicates whose canonical copy was
		// in a refreshed region (harmless: a missed reference).
		for b := int64(300); b < 900; b++ {
			if im.kind[b] != 'r' {
				continue
			}
			h := HashPage(readBlock(t, im.path, b*BlockSize))
			if got, ok := ix.Lookup(h); !ok || got > b*BlockSize {
				t.Fatalf("untouched block %d: Lookup = %d, %v", b, got, ok)
			}
		}
		// The refreshed generation was persisted: a reopen loads it.
		var pl2 progressLog
		ix2, err := Open(ctx, im.path, Options{StateDir: state, Progress: pl2.fn})
		if err != nil {
			t.Fatal(err)
		}
		defer ix2.Close()
		if calls, _ := pl2.get(); calls != 0 {
			t.Fatalf("the refreshed index was not persisted")
		}
		if got, ok := ix2.Lookup(newHashes[2]); !ok || got != offs[2] {
			t.Fatalf("reloaded index: Lookup = %d, %v", got, ok)
		}
	})

	t.Run("growth with invalidation indexes the new tail", func(t *testing.T) {
		im := makeImage(t, t.TempDir(), 600, 3)
		ix, err := Open(ctx, im.path, Options{})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		p := randomPage(rng)
		writeBlock(t, im.path, 700*BlockSize, p) // extends the file
		ix.Invalidate(0, BlockSize)
		if err := ix.Refresh(ctx); err != nil {
			t.Fatal(err)
		}
		if ix.Blocks() != 701 {
			t.Fatalf("Blocks %d after growth, want 701", ix.Blocks())
		}
		if got, ok := ix.Lookup(HashPage(p)); !ok || got != 700*BlockSize {
			t.Fatalf("tail block: Lookup = %d, %v", got, ok)
		}
	})

	t.Run("an unreported change rebuilds at the I/O cap with lookups served meanwhile", func(t *testing.T) {
		im := makeImage(t, t.TempDir(), 2048, 4) // 8 MiB
		ix, err := Open(ctx, im.path, Options{ReadBytesPerSec: 4 << 20})
		if err != nil {
			t.Fatal(err)
		}
		defer ix.Close()
		keep := HashPage(readBlock(t, im.path, 2*BlockSize))
		p := randomPage(rng)
		time.Sleep(10 * time.Millisecond)
		writeBlock(t, im.path, 40*BlockSize, p)

		var stop atomic.Bool
		var lookups atomic.Int64
		var wg sync.WaitGroup
		wg.Add(1)
		go func() {
			defer wg.Done()
			for !stop.Load() {
				if _, ok := ix.Lookup(keep); !ok {
					t.Errorf("lookup of an unchanged block missed during refresh")
					return
				}
				lookups.Add(1)
			}
		}()
		start := time.Now()
		err = ix.Refresh(ctx)
		el := time.Since(start)
		stop.Store(true)
		wg.Wait()
		if err != nil {
			t.Fatal(err)
		}
		// 8 MiB of which 1 MiB is holes, at 4 MiB/s with a one-second burst.
		if el < 500*time.Millisecond {
			t.Fatalf("rebuild took %v: the I/O cap was not applied", el)
		}
		if got, ok := ix.Lookup(HashPage(p)); !ok || got != 40*BlockSize {
			t.Fatalf("new block: Lookup = %d, %v", got, ok)
		}
		checkIndexMatchesFile(t, ix)
		t.Logf("rebuild took %v, %d lookups served meanwhile", el, lookups.Load())
	})

	t.Run("close cancels a running refresh", func(t *testing.T) {
		im := makeImage(t, t.TempDir(), 2048, 5)
		ix, err := Open(ctx, im.path, Options{ReadBytesPerSec: 1 << 20})
		if err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		writeBlock(t, im.path, 0, randomPage(rng))
		errc := make(chan error, 1)
		go func() { errc <- ix.Refresh(ctx) }()
		time.Sleep(100 * time.Millisecond)
		ix.Close()
		select {
		case err := <-errc:
			if !errors.Is(err, context.Canceled) {
				t.Fatalf("Refresh after Close = %v, want context.Canceled", err)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("Refresh did not stop after Close")
		}
		if _, ok := ix.Lookup(HashPage(readBlock(t, im.path, 0))); ok {
			t.Fatalf("Lookup hit after Close")
		}
		if err := ix.Refresh(ctx); err == nil {
			t.Fatalf("Refresh after Close succeeded")
		}
	})
}

func TestOpenBlockDevice(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root for a loop device")
	}
	im := makeImage(t, t.TempDir(), 2048, 6)
	out, err := exec.Command("losetup", "--find", "--show", "--read-only", im.path).Output()
	if err != nil {
		t.Skipf("no loop device: %v", err)
	}
	dev := strings.TrimSpace(string(out))
	defer exec.Command("losetup", "-d", dev).Run()

	ix, err := Open(context.Background(), dev, Options{StateDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	if ix.Size() != im.blocks*BlockSize {
		t.Fatalf("block device size %d, want %d", ix.Size(), im.blocks*BlockSize)
	}
	if want := distinctNonZero(t, im.path); ix.Entries() != want {
		t.Fatalf("Entries %d, want %d", ix.Entries(), want)
	}
	h := HashPage(readBlock(t, im.path, 100*BlockSize))
	if off, ok := ix.Lookup(h); !ok || HashPage(readBlock(t, dev, off)) != h {
		t.Fatalf("Lookup on the block device = %d, %v", off, ok)
	}
	r := OpenResolver([]string{dev}, 2)
	defer r.Close()
	got := make([]byte, BlockSize)
	var ferr error
	if err := r.ResolveBatch(context.Background(), []Ref{{Offset: 100 * BlockSize, Hash: h}},
		func(int) []byte { return got }, func(_ int, err error) { ferr = err }); err != nil || ferr != nil {
		t.Fatalf("resolve on a block device: %v, %v", err, ferr)
	}
	if HashPage(got) != h {
		t.Fatalf("resolved block differs")
	}
}

func TestInvalidateEdges(t *testing.T) {
	ctx := context.Background()
	im := makeImage(t, t.TempDir(), 700, 12)
	ix, err := Open(ctx, im.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	var pl progressLog
	ix.opts.Progress = pl.fn

	// Ranges that name nothing inside the disk are ignored: Refresh of the
	// unchanged disk then reads nothing.
	ix.Invalidate(-5, 100)
	ix.Invalidate(0, 0)
	ix.Invalidate(0, -1)
	ix.Invalidate(ix.Size(), 4096)
	if err := ix.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if calls, _ := pl.get(); calls != 0 {
		t.Fatalf("ranges outside the disk caused a re-read")
	}

	// A huge length covers the rest of the disk without overflowing.
	ix.Invalidate(BlockSize, 1<<62+(1<<62-1))
	if err := ix.Refresh(ctx); err != nil {
		t.Fatal(err)
	}
	if _, last := pl.get(); last[1] != ix.Size() {
		t.Fatalf("refresh covered %d bytes, want the whole disk (%d)", last[1], ix.Size())
	}
	checkIndexMatchesFile(t, ix)
}

func TestTinyDisksPersistAndReload(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name    string
		size    int
		entries int64
	}{
		{"an empty disk has no entries", 0, 0},
		{"a disk shorter than a block has no entries", 1000, 0},
		{"a partial last block is not indexed", BlockSize + 1000, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "tiny.img")
			data := make([]byte, tc.size)
			for i := range data {
				data[i] = byte(i%251 + 1)
			}
			if err := os.WriteFile(path, data, 0o644); err != nil {
				t.Fatal(err)
			}
			state := filepath.Join(dir, "state")
			ix, err := Open(ctx, path, Options{StateDir: state})
			if err != nil {
				t.Fatal(err)
			}
			if ix.Entries() != tc.entries || ix.Blocks() != int64(tc.size/BlockSize) {
				t.Fatalf("Entries %d Blocks %d", ix.Entries(), ix.Blocks())
			}
			ix.Close()
			var pl progressLog
			ix, err = Open(ctx, path, Options{StateDir: state, Progress: pl.fn})
			if err != nil {
				t.Fatal(err)
			}
			defer ix.Close()
			if calls, _ := pl.get(); calls != 0 {
				t.Fatalf("the persisted index of a tiny disk was not reused")
			}
			if ix.Entries() != tc.entries {
				t.Fatalf("Entries %d after reload", ix.Entries())
			}
		})
	}
}
