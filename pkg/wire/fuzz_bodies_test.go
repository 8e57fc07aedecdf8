package wire

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand/v2"
	"reflect"
	"testing"

	"github.com/xenferry/xenferry/internal/fuzzseed"
)

// sentinels are the errors the package documents; every decoding error
// wraps one of them (or, from the Reader, io.ErrUnexpectedEOF for input
// that ends inside a record).
var sentinels = []error{ErrBadMagic, ErrVersion, ErrTooLong, ErrChecksum, ErrUnknownMandatory, ErrPadding, ErrMalformed}

func wrapsSentinel(err error) bool {
	for _, s := range sentinels {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// Body kinds of FuzzBodies: the first argument selects the parser.
const (
	bodyHeader = iota
	bodyPages
	bodyPFNs
	bodyDiskRefs
	bodyManifest
	bodyRequest
	bodyBitmap
	bodyControl
	bodyKinds
)

// stale is reused storage full of garbage: a parser that appends to dst[:0]
// must not let any of it through.
func stale[T any](n int, v T) []T {
	s := make([]T, n)
	for i := range s {
		s[i] = v
	}
	return s
}

// checkBody parses b as a body of the given kind. An accepted body must be
// canonical (re-encode to exactly b), no larger in memory than b justifies,
// and parse to the same value into reused storage; a rejected one must
// fail with an error that wraps one of the package's sentinels.
func checkBody(t *testing.T, kind byte, b []byte) {
	var err error
	switch kind % bodyKinds {
	case bodyHeader:
		var h Header
		if h, err = ParseHeader(b); err == nil {
			if !bytes.Equal(h.Marshal(nil), b) {
				t.Fatalf("header %+v re-encodes differently", h)
			}
			if len(h.Config) > 0 && &h.Config[0] == &b[headerFixed] {
				t.Fatal("header config aliases the body")
			}
		}
	case bodyPages:
		var pfns []uint64
		var flags uint32
		var data []byte
		if pfns, flags, data, err = ParsePages(b, nil); err == nil {
			bounded(t, "pages", cap(pfns), 8, len(b))
			if !bytes.Equal(append(PagesPrefix(nil, pfns, flags), data...), b) {
				t.Fatal("pages body re-encodes differently")
			}
			again, _, _, err2 := ParsePages(b, stale(3*len(pfns)+1, uint64(0xdead)))
			if err2 != nil || !reflect.DeepEqual(again, pfns) {
				t.Fatalf("pages parsed into reused storage: %v, %v (want %v)", again, err2, pfns)
			}
		}
	case bodyPFNs:
		var pfns []uint64
		if pfns, err = ParsePFNs(b, nil); err == nil {
			bounded(t, "pfn list", cap(pfns), 8, len(b))
			if !bytes.Equal(MarshalPFNs(nil, pfns), b) {
				t.Fatal("pfn list re-encodes differently")
			}
			again, err2 := ParsePFNs(b, stale(len(pfns)+5, uint64(0xdead)))
			if err2 != nil || len(again) != len(pfns) || (len(pfns) > 0 && !reflect.DeepEqual(again, pfns)) {
				t.Fatalf("pfn list parsed into reused storage: %v, %v (want %v)", again, err2, pfns)
			}
		}
	case bodyDiskRefs:
		var refs []DiskRef
		if refs, err = ParseDiskRefs(b, nil); err == nil {
			bounded(t, "disk refs", cap(refs), diskRefSize, len(b))
			if !bytes.Equal(MarshalDiskRefs(nil, refs), b) {
				t.Fatal("disk refs re-encode differently")
			}
			again, err2 := ParseDiskRefs(b, stale(len(refs)+2, DiskRef{PFN: 7, Disk: 9}))
			if err2 != nil || len(again) != len(refs) || (len(refs) > 0 && !reflect.DeepEqual(again, refs)) {
				t.Fatalf("disk refs parsed into reused storage: %v, %v", again, err2)
			}
		}
	case bodyManifest:
		var first uint64
		var hashes [][16]byte
		if first, hashes, err = ParseManifest(b); err == nil {
			bounded(t, "manifest", cap(hashes), 16, len(b))
			if !bytes.Equal(MarshalManifest(nil, first, hashes), b) {
				t.Fatal("manifest re-encodes differently")
			}
			f2, again, err2 := ParseManifestInto(b, stale(len(hashes)+2, [16]byte{1}))
			if err2 != nil || f2 != first || len(again) != len(hashes) || (len(hashes) > 0 && !reflect.DeepEqual(again, hashes)) {
				t.Fatalf("manifest parsed into reused storage: %v", err2)
			}
		}
	case bodyRequest:
		var reason uint32
		var pfns []uint64
		if reason, pfns, err = ParseRequest(b, nil); err == nil {
			bounded(t, "request", cap(pfns), 8, len(b))
			if !bytes.Equal(MarshalRequest(nil, reason, pfns), b) {
				t.Fatal("request re-encodes differently")
			}
		}
	case bodyBitmap:
		var first, nbits uint64
		var words []uint64
		if first, nbits, words, err = ParseBitmap(b); err == nil {
			bounded(t, "bitmap", cap(words), 8, len(b))
			if !bytes.Equal(MarshalBitmap(nil, first, nbits, words), b) {
				t.Fatal("bitmap re-encodes differently")
			}
			if uint64(len(words)) != bitmapWords(nbits) {
				t.Fatalf("bitmap of %d bits has %d words", nbits, len(words))
			}
			f2, n2, again, err2 := ParseBitmapInto(b, stale(len(words)+3, ^uint64(0)))
			if err2 != nil || f2 != first || n2 != nbits || len(again) != len(words) || (len(words) > 0 && !reflect.DeepEqual(again, words)) {
				t.Fatalf("bitmap parsed into reused storage: %v", err2)
			}
		}
	case bodyControl:
		checkControl(t, b)
		return
	}
	if err != nil && !wrapsSentinel(err) {
		t.Fatalf("body kind %d: error %q wraps no wire sentinel", kind%bodyKinds, err)
	}
}

// jsonValue decodes a JSON value exactly (numbers as json.Number).
func jsonValue(t *testing.T, b []byte) any {
	if len(b) == 0 {
		return nil
	}
	d := json.NewDecoder(bytes.NewReader(b))
	d.UseNumber()
	var v any
	if err := d.Decode(&v); err != nil {
		t.Fatalf("control data %q is not JSON after a successful parse: %v", b, err)
	}
	return v
}

// checkControl: a CONTROL body either fails with ErrMalformed/ErrTooLong
// or has a kind and survives decode → encode → decode unchanged (Data
// compared as JSON values: encoding compacts it).
func checkControl(t *testing.T, b []byte) {
	c, err := ParseControl(b)
	if err != nil {
		if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrTooLong) {
			t.Fatalf("control error %q wraps neither ErrMalformed nor ErrTooLong", err)
		}
		return
	}
	if c.Kind == "" {
		t.Fatal("control message without kind accepted")
	}
	enc, err := MarshalControl(nil, &c)
	if err != nil {
		if errors.Is(err, ErrTooLong) {
			return // escaping may grow a body near MaxControl past it
		}
		t.Fatalf("accepted control %+v does not encode: %v", c, err)
	}
	c2, err := ParseControl(enc)
	if err != nil {
		t.Fatalf("encoded control %q does not parse: %v", enc, err)
	}
	if !reflect.DeepEqual(jsonValue(t, c.Data), jsonValue(t, c2.Data)) {
		t.Fatalf("control data %q became %q", c.Data, c2.Data)
	}
	c.Data, c2.Data = nil, nil
	if len(c.Token) == 0 {
		c.Token = nil
	}
	if !reflect.DeepEqual(c, c2) {
		t.Fatalf("control %+v became %+v", c, c2)
	}
}

// FuzzBodies runs one body parser, chosen by kind, on arbitrary bytes past
// any framing: accepted bodies are canonical, bounded and round-trip;
// rejected ones fail with a wrapped sentinel.
// Run: go test -run '^$' -fuzz '^FuzzBodies$' ./pkg/wire
func FuzzBodies(f *testing.F) {
	for k, b := range bodySeeds() {
		f.Add(byte(k), b)
	}
	f.Fuzz(func(t *testing.T, kind byte, b []byte) {
		checkBody(t, kind, b)
	})
}

// bodySeeds are real encoder output, one per body kind, indexed by kind.
func bodySeeds() [][]byte {
	rng := rand.New(rand.NewPCG(3, 5))
	h := Header{Version: Version, PageShift: PageShift, NumPages: 4096, Flags: FlagDedup | FlagPostCopy, Config: []byte(`{"name":"vm1","memoryBytes":16777216}`)}
	ctl, _ := MarshalControl(nil, &Control{Kind: "hello", MigrationID: "m-1", Token: []byte{1, 2, 3}, Streams: 2, Message: "main", Data: json.RawMessage(`{"round":1}`)})
	return [][]byte{
		bodyHeader:   h.Marshal(nil),
		bodyPages:    append(PagesPrefix(nil, []uint64{5}, 0), randBytes(rng, PageSize)...),
		bodyPFNs:     MarshalPFNs(nil, []uint64{0, 1, 2, 1 << 40}),
		bodyDiskRefs: MarshalDiskRefs(nil, []DiskRef{{PFN: 3, Disk: 1, Offset: 8192, Hash: [16]byte{0xaa}}, {PFN: 9, Offset: 4096}}),
		bodyManifest: MarshalManifest(nil, 64, [][16]byte{{1}, {2}, {3}}),
		bodyRequest:  MarshalRequest(nil, ReasonDemand, []uint64{7, 8}),
		bodyBitmap:   MarshalBitmap(nil, 128, 70, []uint64{0xf0f0, 0x3f}),
		bodyControl:  ctl,
	}
}

// FuzzControl decodes CONTROL bodies (JSON from the peer): see checkControl.
// Run: go test -run '^$' -fuzz '^FuzzControl$' ./pkg/wire
func FuzzControl(f *testing.F) {
	for _, s := range controlSeeds() {
		f.Add(s)
	}
	f.Fuzz(checkControl)
}

func controlSeeds() [][]byte {
	var out [][]byte
	for _, c := range []Control{
		{Kind: "hello", MigrationID: "default/web-1-x7", Token: []byte("0123456789abcdef"), Streams: 4, Message: "main"},
		{Kind: "hello", MigrationID: "m", Stream: 3, Message: "data"},
		{Kind: "prepared"},
		{Kind: "flush", Message: "precopy", Data: json.RawMessage(`{"gen":1}`)},
		{Kind: "done", Data: json.RawMessage(`{"verified":true,"pages":4096,"demand":12}`)},
		{Kind: "error", Message: "refused: token does not match"},
	} {
		b, err := MarshalControl(nil, &c)
		if err != nil {
			panic(err)
		}
		out = append(out, b)
	}
	return append(out, []byte(`{"kind":"x","data":[1,2.5e300,"\u00e9",null,{"a":{}}]}`), []byte(`{"kind":""}`), []byte(`null`))
}

// FuzzDecodePages decompresses arbitrary zstd frames as the data of a
// PAGES batch of count pages: the output is exactly count pages or the
// error wraps ErrMalformed, and the decoder never allocates past one full
// batch whatever the frame claims.
// Run: go test -run '^$' -fuzz '^FuzzDecodePages$' ./pkg/wire
func FuzzDecodePages(f *testing.F) {
	for _, s := range pagesFrameSeeds(f) {
		f.Add(s.count, s.frame)
	}
	dec, err := NewPagesDecoder()
	if err != nil {
		f.Fatal(err)
	}
	enc, err := NewPagesEncoder()
	if err != nil {
		f.Fatal(err)
	}
	var out, again []byte
	f.Fuzz(func(t *testing.T, count uint16, frame []byte) {
		n := 1 + int(count)%MaxBatchPages
		var err error
		out, err = DecodePages(dec, frame, n, out)
		if cap(out) > 2*MaxBatchPages*PageSize {
			t.Fatalf("decoder output grew to %d bytes", cap(out))
		}
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("DecodePages error %q does not wrap ErrMalformed", err)
			}
			if len(out) != 0 {
				t.Fatalf("failed DecodePages returned %d bytes", len(out))
			}
			return
		}
		if len(out) != n*PageSize {
			t.Fatalf("decoded %d bytes for %d pages", len(out), n)
		}
		again, err = DecodePages(dec, EncodePages(enc, nil, out), n, again)
		if err != nil || !bytes.Equal(again, out) {
			t.Fatalf("re-encoded batch decodes to %d bytes, %v", len(again), err)
		}
	})
}

type pagesFrame struct {
	count uint16
	frame []byte
}

func pagesFrameSeeds(t testing.TB) []pagesFrame {
	enc, err := NewPagesEncoder()
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	rng := rand.New(rand.NewPCG(7, 11))
	text := bytes.Repeat([]byte("GET /index.html HTTP/1.1\r\nHost: web-1\r\n\r\n"), 2*PageSize/41+1)[:2*PageSize]
	mixed := append(make([]byte, PageSize), randBytes(rng, PageSize)...)
	var out []pagesFrame
	for _, p := range [][]byte{make([]byte, PageSize), make([]byte, 16*PageSize), text, mixed} {
		out = append(out, pagesFrame{uint16(len(p)/PageSize - 1), EncodePages(enc, nil, p)})
	}
	// A frame that claims more than one batch, and one truncated.
	big := EncodePages(enc, nil, make([]byte, 2*MaxBatchPages*PageSize))
	out = append(out, pagesFrame{MaxBatchPages - 1, big})
	out = append(out, pagesFrame{0, out[0].frame[:len(out[0].frame)/2]})
	return out
}

// TestWriteFuzzSeeds writes testdata/fuzz for this package's targets from
// the encoders' output (see internal/fuzzseed).
func TestWriteFuzzSeeds(t *testing.T) {
	w := fuzzseed.New(t)
	for _, target := range []string{"FuzzReader", "FuzzBodies", "FuzzControl", "FuzzDecodePages"} {
		w.Clear(target)
	}
	rng := rand.New(rand.NewPCG(9, 9))
	w.Add("FuzzReader", "small-stream", smallStream(t))
	for _, ty := range allTypes {
		s := randSample(rng, ty)
		stream := encode(t, []sample{s, {t: TypeEnd}})
		if len(stream) > 16<<10 {
			continue // keep the corpus small; the body seeds cover the type
		}
		w.Add("FuzzReader", "record-"+ty.String(), stream)
	}
	w.Add("FuzzReader", "stream-header-only", encode(t, nil))
	full := smallStream(t)
	w.Add("FuzzReader", "cut-in-record", full[:len(full)/2])
	names := []string{"header", "pages", "pfns", "diskrefs", "manifest", "request", "bitmap", "control"}
	for k, b := range bodySeeds() {
		w.Add("FuzzBodies", names[k], byte(k), b)
		// The same body under every other parser: near misses.
		w.Add("FuzzBodies", names[k]+"-as-"+names[(k+1)%bodyKinds], byte((k+1)%bodyKinds), b)
	}
	w.Add("FuzzBodies", "bitmap-bits-past-end", byte(bodyBitmap), MarshalBitmap(nil, 0, 3, []uint64{0x7})[:16+8])
	w.Add("FuzzBodies", "manifest-overflow", byte(bodyManifest), MarshalManifest(nil, ^uint64(0), [][16]byte{{1}}))
	for i, c := range controlSeeds() {
		w.Add("FuzzControl", "control-"+string(rune('a'+i)), c)
	}
	for i, s := range pagesFrameSeeds(t) {
		w.Add("FuzzDecodePages", "frame-"+string(rune('a'+i)), s.count, s.frame)
	}
}
