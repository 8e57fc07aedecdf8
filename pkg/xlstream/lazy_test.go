package xlstream

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/klauspost/compress/zstd"
)

// newest returns, for each pfn with contents in the stream, its last copy.
func newest(t *testing.T, in []byte) map[uint64][]byte {
	t.Helper()
	m := map[uint64][]byte{}
	rd := NewReader(bytes.NewReader(in))
	for {
		tok, err := rd.Next()
		if errors.Is(err, io.EOF) {
			return m
		}
		if err != nil {
			t.Fatal(err)
		}
		if tok.Kind != TokPages {
			continue
		}
		di := 0
		for _, e := range tok.Page.Entries {
			if !pageHasData(PFNType(e)) {
				continue
			}
			m[PFN(e)] = bytes.Clone(tok.Page.Data(di))
			di++
		}
	}
}

// testSink is a LazySink that keeps pages in memory and demands some of
// them as soon as the manifest is complete, as a pager would on faults.
type testSink struct {
	mu       sync.Mutex
	hashes   map[uint64]uint64
	got      map[uint64][]byte
	demand   func(uint64) error
	demanded []uint64
	done     chan struct{}
	closed   bool
	err      error
}

func (s *testSink) Hello(name string) error { return nil }
func (s *testSink) Start(d func(uint64) error) {
	s.mu.Lock()
	s.demand = d
	s.mu.Unlock()
}
func (s *testSink) Manifest(es []LazyEntry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range es {
		s.hashes[e.PFN] = e.Hash
	}
	return nil
}
func (s *testSink) Page(pfn uint64, page []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	h, ok := s.hashes[pfn]
	if !ok || PageHash(page) != h {
		return fmt.Errorf("page for pfn %#x: held %v, hash mismatch", pfn, ok)
	}
	s.got[pfn] = bytes.Clone(page)
	if len(s.got) == len(s.hashes) && !s.closed {
		s.closed = true
		close(s.done)
	}
	return nil
}
func (s *testSink) Wait() error {
	select {
	case <-s.done:
		return s.err
	case <-time.After(30 * time.Second):
		return errors.New("not every held page came")
	}
}
func (s *testSink) Abort(err error) {}

// TestEarlyResumeHoldsPagesBackAndDeliversTheNewestCopies runs a session
// over TCP on the captured PVH stream with early resume: the rebuilt
// stream must carry no contents for the held pfns (XALLOC), the manifest
// must hold them all, and demands and the push must deliver each one's
// newest copy, verified against the manifest.
func TestEarlyResumeHoldsPagesBackAndDeliversTheNewestCopies(t *testing.T) {
	t.Run("page by page", func(t *testing.T) { testEarlyResume(t, false) })
	// Compression Always: the push goes in LAZYPAGESZ batches.
	t.Run("compressed push", func(t *testing.T) { testEarlyResume(t, true) })
}

func testEarlyResume(t *testing.T, compress bool) {
	in := loadFixture(t, fixtures[1].file)
	want := newest(t, in)
	sink := &testSink{hashes: map[uint64]uint64{}, got: map[uint64][]byte{}, done: make(chan struct{})}
	lz, err := NewLazySource(t.TempDir(), "test.spool")
	if err != nil {
		t.Fatal(err)
	}
	defer lz.Remove()
	var rebuilt bytes.Buffer
	r := tcpSession(t, in, SendOptions{Lazy: lz, LazyName: "test.spool", Compress: compress, CompressAlways: compress}, ReceiveOptions{Lazy: sink}, nil, func(cmdIn io.Reader, cmdOut io.WriteCloser) {
		io.Copy(&rebuilt, cmdIn)
		// The domain "runs": fault on three held pfns before the push.
		sink.mu.Lock()
		var ask []uint64
		for pfn := range sink.hashes {
			if len(ask) == 3 {
				break
			}
			ask = append(ask, pfn)
		}
		d := sink.demand
		sink.mu.Unlock()
		for _, p := range ask {
			if err := d(p); err != nil {
				t.Errorf("demand: %v", err)
			}
		}
		sink.mu.Lock()
		sink.demanded = ask
		sink.mu.Unlock()
		cmdOut.Write([]byte("ready"))
		cmdOut.Close()
	})
	st := r.send
	if st.LazyHeld == 0 || int(st.LazyHeld) != len(sink.hashes) || st.LazyDemanded+st.LazyPushed < st.LazyHeld {
		t.Fatalf("held %d, manifest %d, demanded %d, pushed %d", st.LazyHeld, len(sink.hashes), st.LazyDemanded, st.LazyPushed)
	}
	if compress != (st.LazyPushedCompressed > 0) || st.LazyPushedCompressed > st.LazyPushed {
		t.Fatalf("compress %v: %d of %d pushed pages went compressed", compress, st.LazyPushedCompressed, st.LazyPushed)
	}
	if st.LazyDemanded < int64(len(sink.demanded)) {
		t.Fatalf("%d demands answered, %d made", st.LazyDemanded, len(sink.demanded))
	}
	for pfn, page := range sink.got {
		if !bytes.Equal(page, want[pfn]) {
			t.Fatalf("pfn %#x: delivered page is not its newest copy in the stream", pfn)
		}
	}
	// The rebuilt stream: held pfns have no contents, all others do.
	rb := newest(t, rebuilt.Bytes())
	for pfn := range sink.hashes {
		if _, ok := rb[pfn]; ok {
			t.Fatalf("pfn %#x is held back but has contents in the rebuilt stream", pfn)
		}
	}
	for pfn := range want {
		_, held := sink.hashes[pfn]
		if _, ok := rb[pfn]; !ok && !held {
			t.Fatalf("pfn %#x lost: neither in the stream nor held", pfn)
		}
	}
	t.Logf("held %d of %d pfns, %d demanded, %d pushed (%d compressed), stream %d -> %d bytes, link %d",
		st.LazyHeld, len(want), st.LazyDemanded, st.LazyPushed, st.LazyPushedCompressed, len(in), rebuilt.Len(), st.Encode.OutBytes)
}

func TestLazyFramesAreValidated(t *testing.T) {
	if _, err := parseLazyHello([]byte{1, 0, 0, 0, 3, 0, '.', '.', '/'}); err == nil {
		t.Fatal("a spool name with a slash was accepted")
	}
	if _, err := parseManifest([]byte{1, 0, 0, 0}); err == nil {
		t.Fatal("a manifest shorter than its count was accepted")
	}
	m := make([]byte, 4+16)
	m[0] = 1
	le.PutUint64(m[4:], 0xfeffc) // a special page: never held
	if _, err := parseManifest(m); err == nil {
		t.Fatal("a manifest holding a special page was accepted")
	}
	var on atomicBoolForTest
	if err := receiveLazy(nil, FrameLazyHello, nil, &on.b, nil, nil); !errors.Is(err, ErrLazyRefused) {
		t.Fatalf("a destination without a pager: %v, want ErrLazyRefused", err)
	}

	// Compressed push batches: bounded, and exactly the pages they name.
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	batch := func(n uint32, pfns int, pages int) []byte {
		b := le.AppendUint32(nil, n)
		for i := 0; i < pfns; i++ {
			b = le.AppendUint64(b, uint64(i))
		}
		return enc.EncodeAll(make([]byte, pages*PageSize), b)
	}
	sink := &testSink{hashes: map[uint64]uint64{0: PageHash(make([]byte, PageSize))}, got: map[uint64][]byte{}, done: make(chan struct{})}
	var inf lazyInflater
	defer inf.close()
	var off atomicBoolForTest
	if err := receiveLazy(sink, FrameLazyPagesZ, batch(1, 1, 1), &off.b, &inf, nil); !errors.Is(err, ErrBadFrame) {
		t.Fatalf("LAZYPAGESZ before LAZYHELLO: %v", err)
	}
	off.b.Store(true)
	for name, body := range map[string][]byte{
		"no pages":              batch(0, 0, 0),
		"more than the bound":   batch(maxLazyBatch+1, maxLazyBatch+1, 1),
		"pfns cut short":        batch(4, 2, 0)[:4+16],
		"fewer pages than pfns": batch(2, 2, 1),
		"more pages than pfns":  batch(1, 1, 2),
		"a zero bomb":           batch(1, 1, 1<<12),
		"not zstd":              append(batch(1, 1, 0)[:12], "garbage"...),
	} {
		if err := receiveLazy(sink, FrameLazyPagesZ, body, &off.b, &inf, nil); !errors.Is(err, ErrBadFrame) {
			t.Errorf("LAZYPAGESZ with %s: %v, want ErrBadFrame", name, err)
		}
	}
	if err := receiveLazy(sink, FrameLazyPagesZ, batch(1, 1, 1), &off.b, &inf, nil); err != nil || len(sink.got) != 1 {
		t.Fatalf("a good batch of one page: %v (%d delivered)", err, len(sink.got))
	}
}

type atomicBoolForTest struct{ b atomic.Bool }
