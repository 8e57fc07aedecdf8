package xlstream

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"reflect"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/fuzzseed"
)

// sentinels are the package's errors; every error it returns wraps one.
var sentinels = []error{ErrBadMagic, ErrUnsupported, ErrBadHeader, ErrBadRecord, ErrRecordTooLong, ErrTruncated, ErrBadFrame, ErrChecksum, ErrFallbackFailed, ErrCommandEnded, ErrLazyRefused}

func wrapsSentinel(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// miniStream rebuilds a captured stream with every record except the
// PAGE_DATA ones verbatim, and in place of the first PAGE_DATA record one
// made of real entries of the capture's records: the first zero page, the
// first page with contents and the first entry without data (as libxc
// writes them), so a seed stays a few KiB and is complete.
func miniStream(t testing.TB, in []byte) []byte {
	t.Helper()
	r := NewReader(bytes.NewReader(in))
	var out []byte
	at := -1
	var res []byte
	var ents []uint64
	var data [][]byte
	var zero, full, none bool
	for {
		tok, err := r.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if tok.Kind != TokPages {
			out = append(out, tok.Raw...)
			continue
		}
		p := tok.Page
		if at < 0 {
			at, res = len(out), bytes.Clone(p.Raw[12:16])
		}
		d := 0
		for _, e := range p.Entries {
			if !pageHasData(PFNType(e)) {
				if !none {
					none = true
					ents = append(ents, e)
				}
				continue
			}
			pg := p.Data(d)
			d++
			if z := isZero(pg); (z && !zero) || (!z && !full) {
				zero, full = zero || z, full || !z
				ents = append(ents, e)
				data = append(data, bytes.Clone(pg))
			}
		}
	}
	if at < 0 {
		t.Fatal("no PAGE_DATA record in the capture")
	}
	var rec []byte
	rec = le.AppendUint32(rec, RecPageData)
	rec = le.AppendUint32(rec, uint32(8+8*len(ents)+PageSize*len(data)))
	rec = le.AppendUint32(rec, uint32(len(ents)))
	rec = append(rec, res...)
	for _, e := range ents {
		rec = le.AppendUint64(rec, e)
	}
	for _, pg := range data {
		rec = append(rec, pg...)
	}
	return append(out[:at:at], append(rec, out[at:]...)...)
}

// memDisk is a shared disk in memory for the round-trip targets: the
// pages of a stream whose hash is even (every page, with all) are "on the
// disk", so some pages travel as REFs, and pages whose slot is stale
// changed since.
type memDisk struct {
	pages [][]byte
	all   bool
	stale func(slot int) bool
}

func (d *memDisk) Lookup(page []byte) (Ref, bool) {
	h := hashPage(page)
	if h[0]&1 != 0 && !d.all {
		return Ref{}, false
	}
	d.pages = append(d.pages, bytes.Clone(page))
	return Ref{Disk: 0, Offset: uint64(len(d.pages)-1) * PageSize, Hash: h}, true
}

func (d *memDisk) ReadPage(ref Ref, dst []byte) error {
	slot := ref.Offset / PageSize
	if ref.Disk != 0 || ref.Offset%PageSize != 0 || slot >= uint64(len(d.pages)) {
		return fmt.Errorf("no block at disk %d offset %d", ref.Disk, ref.Offset)
	}
	if d.stale != nil && d.stale(int(slot)) {
		return errors.New("stale block")
	}
	copy(dst, d.pages[slot])
	if hashPage(dst) != ref.Hash {
		return errors.New("hash mismatch")
	}
	return nil
}

// FuzzReader splits arbitrary bytes as an xl/libxl/libxc stream: tokens
// account for every byte consumed, page records are well formed, a clean
// end passed the whole input through, and errors wrap a sentinel.
// Run: go test -run '^$' -fuzz '^FuzzReader$' ./pkg/xlstream
func FuzzReader(f *testing.F) {
	for _, fx := range fixtures {
		in := loadFixture(f, fx.file)
		f.Add(miniStream(f, in))
		f.Add(in[:4096])
	}
	f.Add([]byte{})
	f.Add(bytes.Repeat([]byte{0xff}, 64))
	f.Fuzz(func(t *testing.T, b []byte) {
		r := NewReader(bytes.NewReader(b))
		var out bytes.Buffer
		for {
			tok, err := r.Next()
			if err != nil {
				if errors.Is(err, io.EOF) {
					if !bytes.Equal(out.Bytes(), b) {
						t.Fatalf("clean end after %d of %d bytes, output differs", out.Len(), len(b))
					}
					if !r.Complete() {
						t.Fatal("clean end of an incomplete stream")
					}
				} else if !wrapsSentinel(err) {
					t.Fatalf("error %q wraps no sentinel", err)
				}
				break
			}
			if tok.Kind == TokPages {
				p := tok.Page
				if len(p.Raw) != p.PrefixLen()+p.NData*PageSize || p.NData > len(p.Entries) || &p.Raw[0] != &tok.Raw[0] {
					t.Fatalf("page record of %d bytes for %d pfns, %d pages", len(p.Raw), len(p.Entries), p.NData)
				}
				for i, e := range p.Entries {
					if uint64(le.Uint64(p.Raw[16+8*i:])) != e {
						t.Fatalf("pfn entry %d is %#x, record has %#x", i, e, le.Uint64(p.Raw[16+8*i:]))
					}
				}
			}
			out.Write(tok.Raw)
			if s := r.Stats(); s.Bytes != int64(out.Len()) {
				t.Fatalf("stats say %d bytes consumed, tokens hold %d", s.Bytes, out.Len())
			}
		}
		if x := r.XL(); x != nil && len(x.Config) > 0 {
			if _, err := x.Disks(); err != nil && !errors.Is(err, ErrBadHeader) {
				t.Fatalf("Disks error %q does not wrap ErrBadHeader", err)
			}
		}
	})
}

// FuzzEncodeDecode: a stream the Reader accepts in full is rebuilt byte
// for byte from its frames, with some pages sent as verified disk REFs.
// Run: go test -run '^$' -fuzz '^FuzzEncodeDecode$' ./pkg/xlstream
func FuzzEncodeDecode(f *testing.F) {
	for _, fx := range fixtures {
		f.Add(miniStream(f, loadFixture(f, fx.file)))
	}
	var frames, out bytes.Buffer
	f.Fuzz(func(t *testing.T, b []byte) {
		frames.Reset()
		out.Reset()
		d := &memDisk{}
		es, rs, err := Encode(bytes.NewReader(b), &frames, d)
		if err != nil {
			if !wrapsSentinel(err) {
				t.Fatalf("Encode error %q wraps no sentinel", err)
			}
			return
		}
		if es.ZeroPages+es.RefPages+es.DataPages != rs.DataPages {
			t.Fatalf("encoder kinds %+v do not add up to %d pages", es, rs.DataPages)
		}
		ds, err := Decode(bytes.NewReader(frames.Bytes()), &out, d)
		if err != nil {
			t.Fatalf("Decode of the encoder's frames: %v", err)
		}
		if !bytes.Equal(out.Bytes(), b) {
			t.Fatalf("rebuilt %d bytes, stream has %d (or they differ)", out.Len(), len(b))
		}
		if ds.RefPages != es.RefPages || ds.ZeroPages != es.ZeroPages || ds.DataPages != es.DataPages || ds.StalePages != 0 {
			t.Fatalf("decode %+v after encode %+v", ds, es)
		}
	})
}

// FuzzDecode rebuilds a stream from arbitrary frames (what the destination
// reads from the network): errors wrap a sentinel, and nothing but the
// package's bounded buffers is allocated.
// Run: go test -run '^$' -fuzz '^FuzzDecode$' ./pkg/xlstream
func FuzzDecode(f *testing.F) {
	for _, s := range frameSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d := &memDisk{pages: [][]byte{make([]byte, PageSize), bytes.Repeat([]byte{1}, PageSize)}}
		_, err := Decode(bytes.NewReader(b), io.Discard, d)
		if err != nil && !wrapsSentinel(err) {
			t.Fatalf("Decode error %q wraps no sentinel", err)
		}
	})
}

// frameSeeds are the encoder's frames for the fixtures' mini streams, with
// and without disk REFs.
func frameSeeds(t testing.TB) [][]byte {
	var out [][]byte
	for _, fx := range fixtures {
		in := miniStream(t, loadFixture(t, fx.file))
		for _, idx := range []*memDisk{nil, {all: true}} {
			var frames bytes.Buffer
			var pi PageIndex
			if idx != nil {
				pi = idx
			}
			if _, _, err := Encode(bytes.NewReader(in), &frames, pi); err != nil {
				t.Fatal(err)
			}
			if idx != nil && len(idx.pages) > 0 {
				// The source's answer to the destination's NEED for the
				// first REF, as if it had failed verification.
				writeFrame(&frames, FrameFallback, le.AppendUint64(nil, 0), idx.pages[0])
			}
			out = append(out, frames.Bytes())
		}
	}
	var small bytes.Buffer
	writeFrame(&small, FrameRaw, []byte("abc"))
	writeFrame(&small, FrameEnd)
	out = append(out, small.Bytes())
	// The PV mini stream with its page records compressed, as on a slow
	// link.
	var z bytes.Buffer
	e := NewEncoder(&z, nil, 0)
	if err := e.EnableCompression(1e6, false); err != nil {
		t.Fatal(err)
	}
	if _, _, err := encode(bytes.NewReader(miniStream(t, loadFixture(t, fixtures[0].file))), e); err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(z.Bytes(), []byte{0x28, 0xb5, 0x2f, 0xfd}) {
		t.Fatal("no compressed record in the compressed seed")
	}
	return append(out, z.Bytes())
}

// fuzzConn is the destination's end of a session: it reads the fuzz input
// and discards what the destination sends back.
type fuzzConn struct {
	io.Reader
	sent int
}

func (c *fuzzConn) Write(p []byte) (int, error) { c.sent += len(p); return len(p), nil }

type nopCloser struct{ io.Writer }

func (nopCloser) Close() error { return nil }

// commandPipes stands in for a command whose output ends once its input is
// closed (as xl migrate-receive's does when it succeeds).
func commandPipes() (io.WriteCloser, io.Reader) {
	pr, pw := io.Pipe()
	return endsWith{io.Discard, pw}, pr
}

type endsWith struct {
	io.Writer
	out *io.PipeWriter
}

func (e endsWith) Close() error { return e.out.Close() }

// FuzzReceive is the destination of an xl transport session fed arbitrary
// bytes from the source, REFs resolved against a disk where every other
// block is stale (so it asks for fallbacks): it returns, with an error
// that wraps a sentinel or none, and leaves no goroutine behind.
// Run: go test -run '^$' -fuzz '^FuzzReceive$' ./pkg/xlstream
func FuzzReceive(f *testing.F) {
	for _, s := range frameSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d := &memDisk{pages: [][]byte{make([]byte, PageSize), bytes.Repeat([]byte{1}, PageSize)}, stale: func(s int) bool { return s%2 == 1 }}
		conn := &fuzzConn{Reader: bytes.NewReader(b)}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		in, out := commandPipes()
		_, err := Receive(ctx, conn, in, out, d,
			ReceiveOptions{QueueBytes: 1 << 20, FallbackTimeout: 5 * time.Millisecond, Wait: func() int { return 0 }})
		if err != nil && !wrapsSentinel(err) {
			t.Fatalf("Receive error %q wraps no sentinel", err)
		}
	})
}

// FuzzReadHello parses a session's hello frame: an accepted argv is
// written back identically; errors wrap a sentinel or are io.EOF.
// Run: go test -run '^$' -fuzz '^FuzzReadHello$' ./pkg/xlstream
func FuzzReadHello(f *testing.F) {
	for _, s := range helloSeeds(f) {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		argv, err := ReadHello(bytes.NewReader(b))
		if err != nil {
			if !wrapsSentinel(err) && !errors.Is(err, io.EOF) {
				t.Fatalf("ReadHello error %q wraps no sentinel", err)
			}
			return
		}
		var again bytes.Buffer
		if err := WriteHello(&again, argv); err != nil {
			t.Fatalf("accepted argv %q cannot be written: %v", argv, err)
		}
		argv2, err := ReadHello(&again)
		if err != nil || !reflect.DeepEqual(argv, argv2) {
			t.Fatalf("argv %q read back as %q, %v", argv, argv2, err)
		}
	})
}

func helloSeeds(t testing.TB) [][]byte {
	var out [][]byte
	for _, argv := range [][]string{
		{"xl", "migrate-receive", "-d"},
		{"xl", "migrate-receive", "-r", "-e"},
		nil,
		{""},
	} {
		var b bytes.Buffer
		if err := WriteHello(&b, argv); err != nil {
			t.Fatal(err)
		}
		out = append(out, b.Bytes())
	}
	return out
}

// TestWriteFuzzSeeds writes testdata/fuzz for this package's targets from
// the captured streams (see internal/fuzzseed).
func TestWriteFuzzSeeds(t *testing.T) {
	w := fuzzseed.New(t)
	for _, target := range []string{"FuzzReader", "FuzzEncodeDecode", "FuzzDecode", "FuzzReceive", "FuzzReadHello"} {
		w.Clear(target)
	}
	// The corpus is committed: the PV stream (the larger) seeds the reader
	// and the destination, the PVH stream the round trip; both seed the
	// reader cut inside each layer's headers and first records.
	for i, fx := range fixtures {
		name := []string{"pv", "pvh"}[i]
		full := loadFixture(t, fx.file)
		mini := miniStream(t, full)
		if i == 0 {
			w.Add("FuzzReader", name, mini)
		} else {
			w.Add("FuzzEncodeDecode", name, mini)
			w.Add("FuzzReader", name+"-libxl", mini[libxlStart(t, mini):])
		}
		for _, n := range []int{40, 48 + 100, 1200, 1500} {
			w.Add("FuzzReader", fmt.Sprintf("%s-cut-%d", name, n), full[:n])
		}
	}
	frames := frameSeeds(t)
	// 0, 1: PV without and with REFs; 2, 3: PVH; 4: a tiny session; 5:
	// PV compressed.
	for _, i := range []int{1, 2, 4, 5} {
		w.Add("FuzzDecode", fmt.Sprintf("frames-%d", i), frames[i])
	}
	for _, i := range []int{0, 3, 4, 5} {
		w.Add("FuzzReceive", fmt.Sprintf("frames-%d", i), frames[i])
	}
	for i, s := range helloSeeds(t) {
		w.Add("FuzzReadHello", fmt.Sprintf("hello-%d", i), s)
	}
}
