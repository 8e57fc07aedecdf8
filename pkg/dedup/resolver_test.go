package dedup

import (
	"context"
	"errors"
	"math/rand/v2"
	"path/filepath"
	"strings"
	"sync"
	"testing"
)

// outcome records what ResolveBatch did with each ref.
type outcome struct {
	mu     sync.Mutex
	inCB   bool
	calls  []int
	errs   []error
	pages  [][]byte
	overlp bool // a callback ran while another was running
}

func newOutcome(n int) *outcome {
	o := &outcome{calls: make([]int, n), errs: make([]error, n), pages: make([][]byte, n)}
	for i := range o.pages {
		o.pages[i] = make([]byte, BlockSize)
	}
	return o
}

func (o *outcome) enter() {
	o.mu.Lock()
	if o.inCB {
		o.overlp = true
	}
	o.inCB = true
	o.mu.Unlock()
}

func (o *outcome) leave() { o.mu.Lock(); o.inCB = false; o.mu.Unlock() }

func (o *outcome) dst(i int) []byte { o.enter(); defer o.leave(); o.calls[i]++; return o.pages[i] }

func (o *outcome) fail(i int, err error) { o.enter(); defer o.leave(); o.calls[i]++; o.errs[i] = err }

func TestResolveBatch(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	im := makeImage(t, dir, 1500, 31)
	ix, err := Open(ctx, im.path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer ix.Close()
	cat := NewCatalog(ix)

	// Refs for every random block, classified as the source would, in a
	// shuffled order, with some repeated.
	rng := rand.New(rand.NewPCG(8, 8))
	var refs []Ref
	for b, k := range im.kind {
		if k != 'r' && k != 'd' {
			continue
		}
		class, _, ref := cat.Classify(readBlock(t, im.path, int64(b)*BlockSize))
		if class != ClassDisk {
			t.Fatalf("block %d classified %v", b, class)
		}
		refs = append(refs, ref)
	}
	refs = append(refs, refs[:50]...)
	rng.Shuffle(len(refs), func(i, j int) { refs[i], refs[j] = refs[j], refs[i] })

	stale := refs[10]
	stalePage := readBlock(t, im.path, stale.Offset)
	staleNew := randomPage(rng)
	writeBlock(t, im.path, stale.Offset, staleNew) // changed after the ref was made

	missing := filepath.Join(dir, "missing.img")
	r := OpenResolver([]string{im.path, missing, ""}, 3)
	defer r.Close()
	if un := r.Unavailable(); un[0] != nil || un[1] == nil || un[2] == nil {
		t.Fatalf("Unavailable = %v", un)
	}

	bad := []struct {
		name string
		ref  Ref
		want error
		msg  string
	}{
		{"a ref to a missing disk is unavailable", Ref{Disk: 1, Offset: 0, Hash: stale.Hash}, ErrDiskUnavailable, "missing.img"},
		{"a ref to an unconfigured disk is unavailable", Ref{Disk: 2, Offset: 0, Hash: stale.Hash}, ErrDiskUnavailable, "not configured"},
		{"a ref to an unknown disk is out of bounds", Ref{Disk: 3, Offset: 0}, ErrOutOfBounds, "disk 3 of a domain with 3 disks"},
		{"a ref past the end of the disk is out of bounds", Ref{Disk: 0, Offset: im.blocks * BlockSize}, ErrOutOfBounds, "past the end"},
		{"a ref straddling the end is out of bounds", Ref{Disk: 0, Offset: im.blocks*BlockSize - BlockSize/2}, ErrOutOfBounds, "multiple of 4096"},
		{"a misaligned ref is out of bounds", Ref{Disk: 0, Offset: 4097, Hash: stale.Hash}, ErrOutOfBounds, "multiple of 4096"},
		{"a negative offset is out of bounds", Ref{Disk: 0, Offset: -4096}, ErrOutOfBounds, "non-negative"},
		{"a huge offset is out of bounds", Ref{Disk: 0, Offset: 1 << 62}, ErrOutOfBounds, "past the end"},
	}
	all := append([]Ref(nil), refs...)
	for _, b := range bad {
		all = append(all, b.ref)
	}
	o := newOutcome(len(all))
	if err := r.ResolveBatch(ctx, all, o.dst, o.fail); err != nil {
		t.Fatal(err)
	}
	if o.overlp {
		t.Fatalf("callbacks ran concurrently")
	}
	for i, n := range o.calls {
		if n != 1 {
			t.Fatalf("ref %d got %d callbacks, want exactly 1", i, n)
		}
	}
	for i, ref := range refs {
		if ref.Offset == stale.Offset {
			if !errors.Is(o.errs[i], ErrStale) {
				t.Fatalf("ref %d to the rewritten block: err %v, want ErrStale", i, o.errs[i])
			}
			continue
		}
		if o.errs[i] != nil {
			t.Fatalf("ref %d (offset %d): %v", i, ref.Offset, o.errs[i])
		}
		if HashPage(o.pages[i]) != ref.Hash {
			t.Fatalf("ref %d: copied block does not match its hash", i)
		}
	}
	if HashPage(stalePage) != stale.Hash || HashPage(staleNew) == stale.Hash {
		t.Fatalf("test setup: stale block not changed")
	}
	for j, b := range bad {
		t.Run(b.name, func(t *testing.T) {
			err := o.errs[len(refs)+j]
			if !errors.Is(err, b.want) || !strings.Contains(err.Error(), b.msg) {
				t.Fatalf("err %v, want %v mentioning %q", err, b.want, b.msg)
			}
		})
	}
}

func TestResolveBatchRejectsShortDst(t *testing.T) {
	im := makeImage(t, t.TempDir(), 64, 41)
	r := OpenResolver([]string{im.path}, 1)
	defer r.Close()
	p := readBlock(t, im.path, 0)
	var got error
	err := r.ResolveBatch(context.Background(), []Ref{{Offset: 0, Hash: HashPage(p)}},
		func(int) []byte { return make([]byte, 10) }, func(_ int, err error) { got = err })
	if err != nil || !errors.Is(got, ErrOutOfBounds) {
		t.Fatalf("ResolveBatch = %v, fail got %v; want ErrOutOfBounds", err, got)
	}
}

func TestResolveBatchCancelled(t *testing.T) {
	im := makeImage(t, t.TempDir(), 1024, 42)
	r := OpenResolver([]string{im.path}, 2)
	defer r.Close()
	refs := make([]Ref, 0, 512)
	for b := int64(0); b < 1024; b += 2 { // no adjacency: one run per ref
		refs = append(refs, Ref{Offset: b * BlockSize})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	var n int
	err := r.ResolveBatch(ctx, refs, func(int) []byte { n++; return make([]byte, BlockSize) }, func(int, error) { n++ })
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v, want context.Canceled", err)
	}
	if n == len(refs) {
		t.Fatalf("every ref was settled after cancellation")
	}
}

func TestResolveBatchCoalescesReads(t *testing.T) {
	im := makeImage(t, t.TempDir(), 200, 43)
	r := OpenResolver([]string{im.path}, 4)
	defer r.Close()
	var refs []Ref
	// Blocks 10..139 (130 blocks: more than one 256 KiB run), shuffled, with
	// block 20 twice.
	for b := int64(10); b < 140; b++ {
		refs = append(refs, Ref{Offset: b * BlockSize, Hash: HashPage(readBlock(t, im.path, b*BlockSize))})
	}
	refs = append(refs, refs[10])
	rand.New(rand.NewPCG(1, 1)).Shuffle(len(refs), func(i, j int) { refs[i], refs[j] = refs[j], refs[i] })
	o := newOutcome(len(refs))
	if err := r.ResolveBatch(context.Background(), refs, o.dst, o.fail); err != nil {
		t.Fatal(err)
	}
	for i, ref := range refs {
		if o.errs[i] != nil || o.calls[i] != 1 || HashPage(o.pages[i]) != ref.Hash {
			t.Fatalf("ref %d: %d calls, err %v", i, o.calls[i], o.errs[i])
		}
	}
}

func TestResolveBatchConcurrentCallsShareBoundedBuffers(t *testing.T) {
	im := makeImage(t, t.TempDir(), 512, 44)
	r := OpenResolver([]string{im.path}, 2)
	defer r.Close()
	var refs []Ref
	for b := int64(0); b < 512; b += 3 {
		refs = append(refs, Ref{Offset: b * BlockSize, Hash: HashPage(readBlock(t, im.path, b*BlockSize))})
	}
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			o := newOutcome(len(refs))
			if err := r.ResolveBatch(context.Background(), refs, o.dst, o.fail); err != nil {
				errs <- err
				return
			}
			for i, ref := range refs {
				if o.errs[i] != nil || HashPage(o.pages[i]) != ref.Hash {
					errs <- o.errs[i]
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatalf("concurrent batch: %v", err)
	}
	if len(r.bufs) != cap(r.bufs) || cap(r.bufs) != 2 {
		t.Fatalf("buffer pool %d/%d after the batches, want 2/2", len(r.bufs), cap(r.bufs))
	}
}

func TestResolveBatchAfterClose(t *testing.T) {
	im := makeImage(t, t.TempDir(), 16, 45)
	r := OpenResolver([]string{im.path}, 1)
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	var got error
	if err := r.ResolveBatch(context.Background(), []Ref{{Offset: 0}}, func(int) []byte { return make([]byte, BlockSize) },
		func(_ int, err error) { got = err }); err != nil || !errors.Is(got, ErrDiskUnavailable) {
		t.Fatalf("after Close: %v, %v; want ErrDiskUnavailable", err, got)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("second Close: %v", err)
	}
}
