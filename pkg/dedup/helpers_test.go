package dedup

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
)

// image is a generated disk image and what the test knows about it.
type image struct {
	path   string
	blocks int64
	// kind per block: 'h' hole, 'z' written zeros, 'r' random, 'd' duplicate
	// of an earlier random block.
	kind []byte
}

// makeImage writes a sparse image of n blocks: holes, explicit zero blocks,
// random blocks and duplicates of earlier random blocks.
func makeImage(t testing.TB, dir string, n int64, seed uint64) *image {
	t.Helper()
	path := filepath.Join(dir, "disk.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(n * BlockSize); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewPCG(seed, 1))
	im := &image{path: path, blocks: n, kind: make([]byte, n)}
	buf := make([]byte, BlockSize)
	var randoms []int64
	for b := int64(0); b < n; b++ {
		// Runs of holes of 256 blocks (1 MiB) every 8 MiB, so SEEK_HOLE sees them.
		if (b/256)%8 == 3 {
			im.kind[b] = 'h'
			continue
		}
		switch x := rng.IntN(10); {
		case x == 0:
			im.kind[b] = 'z'
			clear(buf)
		case x == 1 && len(randoms) > 0:
			im.kind[b] = 'd'
			src := randoms[rng.IntN(len(randoms))]
			if _, err := f.ReadAt(buf, src*BlockSize); err != nil {
				t.Fatal(err)
			}
		default:
			im.kind[b] = 'r'
			fillRandom(rng, buf)
			randoms = append(randoms, b)
		}
		if _, err := f.WriteAt(buf, b*BlockSize); err != nil {
			t.Fatal(err)
		}
	}
	return im
}

func fillRandom(rng *rand.Rand, p []byte) {
	for i := 0; i+8 <= len(p); i += 8 {
		v := rng.Uint64()
		p[i], p[i+1], p[i+2], p[i+3], p[i+4], p[i+5], p[i+6], p[i+7] =
			byte(v), byte(v>>8), byte(v>>16), byte(v>>24), byte(v>>32), byte(v>>40), byte(v>>48), byte(v>>56)
	}
}

func randomPage(rng *rand.Rand) []byte {
	p := make([]byte, BlockSize)
	fillRandom(rng, p)
	return p
}

func readBlock(t testing.TB, path string, off int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, BlockSize)
	if _, err := f.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

func writeBlock(t testing.TB, path string, off int64, p []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
}

// distinctNonZero counts the distinct non-zero block contents of a file.
func distinctNonZero(t testing.TB, path string) int64 {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[Hash]bool{} // test-only bookkeeping
	for o := 0; o+BlockSize <= len(data); o += BlockSize {
		if b := data[o : o+BlockSize]; !IsZero(b) {
			seen[HashPage(b)] = true
		}
	}
	return int64(len(seen))
}

// checkIndexMatchesFile verifies that every non-zero block of the file is
// found, at an offset with the same content and the lowest such offset, and
// that the index holds nothing else.
func checkIndexMatchesFile(t testing.TB, ix *Index) {
	t.Helper()
	data, err := os.ReadFile(ix.Path())
	if err != nil {
		t.Fatal(err)
	}
	first := map[Hash]int64{}
	for o := 0; o+BlockSize <= len(data); o += BlockSize {
		b := data[o : o+BlockSize]
		if IsZero(b) {
			continue
		}
		h := HashPage(b)
		if _, ok := first[h]; !ok {
			first[h] = int64(o)
		}
	}
	for h, want := range first {
		got, ok := ix.Lookup(h)
		if !ok {
			t.Fatalf("block at %d (hash %x) not found in the index", want, h)
		}
		if got != want {
			t.Fatalf("hash %x: Lookup = %d, want lowest offset %d", h, got, want)
		}
	}
	if ix.Entries() != int64(len(first)) {
		t.Fatalf("Entries() = %d, want %d distinct non-zero blocks", ix.Entries(), len(first))
	}
	if _, ok := ix.Lookup(zeroHash); ok {
		t.Fatalf("the zero block is indexed")
	}
}
