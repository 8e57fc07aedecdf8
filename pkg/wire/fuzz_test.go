package wire

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"
)

var (
	fuzzDecOnce sync.Once
	fuzzDec     *zstd.Decoder
	fuzzDecErr  error
)

// bounded fails if a parser's output holds more elements of size elem than
// a body of n bytes can encode (append may over-allocate up to 2x).
func bounded(t *testing.T, what string, capacity, elem, n int) {
	t.Helper()
	if capacity*elem > 2*n+64 {
		t.Fatalf("%s: %d elements of %d bytes from a %d-byte body", what, capacity, elem, n)
	}
}

// parseEverything runs every body parser on b (with fresh storage, so
// allocation is attributable) and checks that whatever a parser accepts is
// canonical (re-encodes to exactly b) and no larger than b justifies.
func parseEverything(t *testing.T, b []byte) {
	if h, err := ParseHeader(b); err == nil {
		if !bytes.Equal(h.Marshal(nil), b) {
			t.Fatalf("header %+v re-encodes differently", h)
		}
	}
	if pfns, flags, data, err := ParsePages(b, nil); err == nil {
		bounded(t, "pages", cap(pfns), 8, len(b))
		if !bytes.Equal(append(PagesPrefix(nil, pfns, flags), data...), b) {
			t.Fatal("pages body re-encodes differently")
		}
		if flags&PagesZstd != 0 {
			fuzzDecOnce.Do(func() { fuzzDec, fuzzDecErr = NewPagesDecoder() })
			if fuzzDecErr != nil {
				t.Fatal(fuzzDecErr)
			}
			out, err := DecodePages(fuzzDec, data, len(pfns), nil)
			if err == nil && len(out) != len(pfns)*PageSize {
				t.Fatalf("decoded %d bytes for %d pages", len(out), len(pfns))
			}
			if cap(out) > 2*MaxBatchPages*PageSize {
				t.Fatalf("zstd output grew to %d bytes", cap(out))
			}
		}
	}
	if pfns, err := ParsePFNs(b, nil); err == nil {
		bounded(t, "pfn list", cap(pfns), 8, len(b))
		if !bytes.Equal(MarshalPFNs(nil, pfns), b) {
			t.Fatal("pfn list re-encodes differently")
		}
	}
	if refs, err := ParseDiskRefs(b, nil); err == nil {
		bounded(t, "disk refs", cap(refs), diskRefSize, len(b))
		if !bytes.Equal(MarshalDiskRefs(nil, refs), b) {
			t.Fatal("disk refs re-encode differently")
		}
	}
	if first, hashes, err := ParseManifest(b); err == nil {
		bounded(t, "manifest", cap(hashes), 16, len(b))
		if !bytes.Equal(MarshalManifest(nil, first, hashes), b) {
			t.Fatal("manifest re-encodes differently")
		}
	}
	if reason, pfns, err := ParseRequest(b, nil); err == nil {
		bounded(t, "request", cap(pfns), 8, len(b))
		if !bytes.Equal(MarshalRequest(nil, reason, pfns), b) {
			t.Fatal("request re-encodes differently")
		}
	}
	if first, nbits, words, err := ParseBitmap(b); err == nil {
		bounded(t, "bitmap", cap(words), 8, len(b))
		if !bytes.Equal(MarshalBitmap(nil, first, nbits, words), b) {
			t.Fatal("bitmap re-encodes differently")
		}
	}
	if c, err := ParseControl(b); err == nil && c.Kind == "" {
		t.Fatal("control message without kind accepted")
	}
}

// FuzzReader feeds arbitrary bytes through the Reader and every Parse
// function: nothing may panic, memory stays bounded by the input, every
// accepted body is canonical, every error wraps a sentinel (or
// io.ErrUnexpectedEOF), and a clean end consumed the whole input.
// Run: go test -run '^$' -fuzz '^FuzzReader$' ./pkg/wire
func FuzzReader(f *testing.F) {
	f.Add(smallStream(f))
	rng := rand.New(rand.NewPCG(9, 9))
	for _, ty := range allTypes {
		s := randSample(rng, ty)
		f.Add(encode(f, []sample{s, {t: TypeEnd}}))
		var body []byte
		for _, p := range s.parts {
			body = append(body, p...)
		}
		f.Add(body)
	}
	f.Add([]byte("XFERRY\r\n\x01\x00\x00\x00\x00\x00\x00\x00"))
	f.Add([]byte{})

	r := NewReader(nil)
	src := bytes.NewReader(nil)
	f.Fuzz(func(t *testing.T, data []byte) {
		// The raw input as a body, past any checksum.
		parseEverything(t, data)

		src.Reset(data)
		r.Reset(src)
		if err := r.ReadStreamHeader(); err != nil {
			if !wrapsSentinel(err) && !errors.Is(err, io.ErrUnexpectedEOF) {
				t.Fatalf("stream header error %q wraps no sentinel", err)
			}
			return
		}
		for {
			rec, err := r.Next()
			if err != nil {
				if err != io.EOF && !wrapsSentinel(err) && !errors.Is(err, io.ErrUnexpectedEOF) {
					t.Fatalf("Next error %q wraps no sentinel", err)
				}
				if err == io.EOF && r.Bytes() != int64(len(data)) {
					t.Fatalf("clean end after %d of %d bytes", r.Bytes(), len(data))
				}
				break
			}
			if len(rec.Body) > len(data) {
				t.Fatalf("record body of %d bytes from %d input bytes", len(rec.Body), len(data))
			}
			if !rec.Type.Known() {
				t.Fatalf("unknown type %s returned", rec.Type)
			}
			parseEverything(t, rec.Body)
		}
		// The body buffer never grows past twice the input or MaxBody.
		if c := cap(r.body); c > MaxBody || (c > minBodyCap && c > 2*len(data)) {
			t.Fatalf("body buffer of %d bytes for a %d-byte input", c, len(data))
		}
	})
}
