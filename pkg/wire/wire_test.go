package wire

import (
	"bytes"
	"encoding/binary"
	"errors"
	"hash/crc32"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"reflect"
	"runtime"
	"testing"
	"testing/iotest"
	"testing/quick"
	"time"
)

// sample is one record of a generated stream together with the value it
// was built from, so a round trip can compare decoded values.
type sample struct {
	t   Type
	val any
	// parts is how the body is handed to Writer.Write.
	parts [][]byte
}

type pagesVal struct {
	pfns  []uint64
	flags uint32
	data  []byte
}
type manifestVal struct {
	first  uint64
	hashes [][16]byte
}
type requestVal struct {
	reason uint32
	pfns   []uint64
}
type bitmapVal struct {
	first, nbits uint64
	words        []uint64
}

func randPFNs(rng *rand.Rand, n int) []uint64 {
	p := make([]uint64, n)
	for i := range p {
		p[i] = rng.Uint64() >> rng.IntN(64)
	}
	return p
}

func randBytes(rng *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// randSample builds a random record of type t.
func randSample(rng *rand.Rand, t Type) sample {
	switch t {
	case TypeHeader:
		h := Header{Version: Version, PageShift: PageShift, NumPages: rng.Uint64N(1 << 40), Flags: rng.Uint64N(16), Config: randBytes(rng, rng.IntN(300))}
		return sample{t: t, val: h, parts: [][]byte{h.Marshal(nil)}}
	case TypePages:
		n := 1 + rng.IntN(8)
		v := pagesVal{pfns: randPFNs(rng, n), data: randBytes(rng, n*PageSize)}
		return sample{t: t, val: v, parts: [][]byte{PagesPrefix(nil, v.pfns, 0), v.data}}
	case TypeZeroPages:
		p := randPFNs(rng, rng.IntN(100))
		return sample{t: t, val: p, parts: [][]byte{MarshalPFNs(nil, p)}}
	case TypeDiskRefs:
		refs := make([]DiskRef, rng.IntN(50))
		for i := range refs {
			refs[i] = DiskRef{PFN: rng.Uint64(), Disk: rng.Uint32(), Offset: rng.Uint64()}
			copy(refs[i].Hash[:], randBytes(rng, 16))
		}
		return sample{t: t, val: refs, parts: [][]byte{MarshalDiskRefs(nil, refs)}}
	case TypeState:
		s := randBytes(rng, rng.IntN(5000))
		return sample{t: t, val: s, parts: [][]byte{s[:len(s)/2], s[len(s)/2:]}}
	case TypeManifest:
		v := manifestVal{first: rng.Uint64N(1 << 30), hashes: make([][16]byte, rng.IntN(200))}
		for i := range v.hashes {
			copy(v.hashes[i][:], randBytes(rng, 16))
		}
		return sample{t: t, val: v, parts: [][]byte{MarshalManifest(nil, v.first, v.hashes)}}
	case TypeControl:
		c := Control{Kind: "hello", MigrationID: "m-1", Token: randBytes(rng, 32), Stream: rng.IntN(8), Streams: 8, Data: []byte(`{"a":1}`)}
		b, err := MarshalControl(nil, &c)
		if err != nil {
			panic(err)
		}
		return sample{t: t, val: c, parts: [][]byte{b}}
	case TypeEnd:
		return sample{t: t}
	case TypeRequest:
		v := requestVal{reason: 1 + rng.Uint32N(3), pfns: randPFNs(rng, rng.IntN(100))}
		return sample{t: t, val: v, parts: [][]byte{MarshalRequest(nil, v.reason, v.pfns)}}
	case TypeBitmap:
		nbits := rng.Uint64N(1000)
		words := randPFNs(rng, int(bitmapWords(nbits)))
		if nbits%64 != 0 {
			words[len(words)-1] &= 1<<(nbits%64) - 1
		}
		v := bitmapVal{first: rng.Uint64N(1 << 40), nbits: nbits, words: words}
		return sample{t: t, val: v, parts: [][]byte{MarshalBitmap(nil, v.first, v.nbits, v.words)}}
	case TypeRoundEnd:
		b := []byte(`{"round":3,"dirty":1234}`)
		return sample{t: t, val: b, parts: [][]byte{b}}
	}
	panic("unhandled type")
}

var allTypes = []Type{TypeHeader, TypePages, TypeZeroPages, TypeDiskRefs, TypeState, TypeManifest, TypeControl, TypeEnd, TypeRequest, TypeBitmap, TypeRoundEnd}

func encode(t testing.TB, samples []sample) []byte {
	t.Helper()
	var buf bytes.Buffer
	w := NewWriter(&buf)
	if err := w.WriteStreamHeader(); err != nil {
		t.Fatal(err)
	}
	for _, s := range samples {
		if err := w.Write(s.t, s.parts...); err != nil {
			t.Fatal(err)
		}
	}
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	if w.Bytes() != int64(buf.Len()) {
		t.Fatalf("Writer.Bytes() = %d, stream has %d bytes", w.Bytes(), buf.Len())
	}
	return buf.Bytes()
}

// decodeValue parses a record body with the parser for its type.
func decodeValue(rec Record) (any, error) {
	switch rec.Type {
	case TypeHeader:
		return ParseHeader(rec.Body)
	case TypePages:
		pfns, flags, data, err := ParsePages(rec.Body, nil)
		return pagesVal{pfns: pfns, flags: flags, data: append([]byte(nil), data...)}, err
	case TypeZeroPages:
		return ParsePFNs(rec.Body, nil)
	case TypeDiskRefs:
		return ParseDiskRefs(rec.Body, nil)
	case TypeState, TypeRoundEnd:
		return append([]byte(nil), rec.Body...), nil
	case TypeManifest:
		first, h, err := ParseManifest(rec.Body)
		return manifestVal{first: first, hashes: h}, err
	case TypeControl:
		return ParseControl(rec.Body)
	case TypeEnd:
		return nil, nil
	case TypeRequest:
		r, p, err := ParseRequest(rec.Body, nil)
		return requestVal{reason: r, pfns: p}, err
	case TypeBitmap:
		first, nbits, words, err := ParseBitmap(rec.Body)
		return bitmapVal{first: first, nbits: nbits, words: words}, err
	}
	return nil, errors.New("no parser")
}

// equalVal compares values treating nil and empty slices as equal.
func equalVal(a, b any) bool {
	norm := func(v any) any {
		switch x := v.(type) {
		case []uint64:
			if len(x) == 0 {
				return []uint64(nil)
			}
		case []DiskRef:
			if len(x) == 0 {
				return []DiskRef(nil)
			}
		case []byte:
			if len(x) == 0 {
				return []byte(nil)
			}
		case manifestVal:
			if len(x.hashes) == 0 {
				x.hashes = nil
			}
			return x
		case requestVal:
			if len(x.pfns) == 0 {
				x.pfns = nil
			}
			return x
		case bitmapVal:
			if len(x.words) == 0 {
				x.words = nil
			}
			return x
		}
		return v
	}
	return reflect.DeepEqual(norm(a), norm(b))
}

// readAll reads a whole stream; it reports whether the stream parsed
// cleanly: header, records, an End record, then io.EOF.
func readAll(r *Reader, fn func(Record)) (clean bool, err error) {
	if err := r.ReadStreamHeader(); err != nil {
		return false, err
	}
	sawEnd := false
	for {
		rec, err := r.Next()
		if err == io.EOF {
			return sawEnd, nil
		}
		if err != nil {
			return false, err
		}
		if sawEnd {
			// Records after End are legal framing but not a clean stream.
			return false, nil
		}
		if fn != nil {
			fn(rec)
		}
		sawEnd = rec.Type == TypeEnd
	}
}

func TestRoundTripEveryRecordType(t *testing.T) {
	for seed := uint64(0); seed < 50; seed++ {
		rng := rand.New(rand.NewPCG(seed, 7))
		var samples []sample
		for range 3 {
			for _, ty := range allTypes {
				if ty != TypeEnd {
					samples = append(samples, randSample(rng, ty))
				}
			}
		}
		rng.Shuffle(len(samples), func(i, j int) { samples[i], samples[j] = samples[j], samples[i] })
		samples = append(samples, sample{t: TypeEnd})
		stream := encode(t, samples)

		r := NewReader(bytes.NewReader(stream))
		i := 0
		clean, err := readAll(r, func(rec Record) {
			if i >= len(samples) {
				t.Fatalf("seed %d: more records than written", seed)
			}
			s := samples[i]
			i++
			if rec.Type != s.t {
				t.Fatalf("seed %d record %d: type %s, wrote %s", seed, i, rec.Type, s.t)
			}
			if int64(len(rec.Body)) != RecordSize(len(rec.Body))-RecordHeaderSize-int64(padLen(len(rec.Body))) {
				t.Fatal("RecordSize inconsistent")
			}
			got, err := decodeValue(rec)
			if err != nil {
				t.Fatalf("seed %d record %d (%s): %v", seed, i, rec.Type, err)
			}
			if !equalVal(got, s.val) {
				t.Fatalf("seed %d record %d (%s): decoded %+v, wrote %+v", seed, i, rec.Type, got, s.val)
			}
		})
		if err != nil || !clean {
			t.Fatalf("seed %d: clean=%v err=%v", seed, clean, err)
		}
		if i != len(samples) {
			t.Fatalf("seed %d: read %d records, wrote %d", seed, i, len(samples))
		}
		if r.Bytes() != int64(len(stream)) {
			t.Fatalf("seed %d: Reader.Bytes() = %d, stream is %d", seed, r.Bytes(), len(stream))
		}
		if len(stream)%Align != 0 {
			t.Fatalf("stream length %d not aligned", len(stream))
		}
	}
}

// Property tests of the body codecs with testing/quick.
func TestBodyCodecsProperties(t *testing.T) {
	cfg := &quick.Config{MaxCount: 500}
	check := func(name string, f any) {
		t.Helper()
		if err := quick.Check(f, cfg); err != nil {
			t.Errorf("%s: %v", name, err)
		}
	}
	check("pfn list", func(pfns []uint64) bool {
		got, err := ParsePFNs(MarshalPFNs(nil, pfns), make([]uint64, 3))
		return err == nil && equalVal(got, pfns)
	})
	check("request", func(r uint8, pfns []uint64) bool {
		reason := uint32(r%3) + 1
		gr, got, err := ParseRequest(MarshalRequest(nil, reason, pfns), nil)
		return err == nil && gr == reason && equalVal(got, pfns)
	})
	check("disk refs", func(pfn []uint64, disk uint32, off uint64, h [16]byte) bool {
		refs := make([]DiskRef, len(pfn))
		for i := range refs {
			refs[i] = DiskRef{PFN: pfn[i], Disk: disk + uint32(i), Offset: off ^ uint64(i), Hash: h}
		}
		got, err := ParseDiskRefs(MarshalDiskRefs(nil, refs), nil)
		return err == nil && equalVal(got, refs)
	})
	check("manifest", func(first uint32, hashes [][16]byte) bool {
		f, got, err := ParseManifestInto(MarshalManifest(nil, uint64(first), hashes), make([][16]byte, 0, 4))
		return err == nil && f == uint64(first) && equalVal(manifestVal{f, got}, manifestVal{uint64(first), hashes})
	})
	check("bitmap", func(first uint32, words []uint64, cut uint8) bool {
		nbits := uint64(len(words)) * 64
		if len(words) > 0 {
			nbits -= uint64(cut % 64)
		}
		f, n, got, err := ParseBitmap(MarshalBitmap(nil, uint64(first), nbits, words))
		if err != nil || f != uint64(first) || n != nbits || len(got) != len(words) {
			return false
		}
		for i := uint64(0); i < nbits; i++ {
			if (got[i/64]>>(i%64))&1 != (words[i/64]>>(i%64))&1 {
				return false
			}
		}
		return true
	})
	check("header", func(np uint32, flags uint8, cfg []byte) bool {
		h := Header{Version: Version, PageShift: PageShift, NumPages: uint64(np), Flags: uint64(flags % 16), Config: cfg}
		got, err := ParseHeader(h.Marshal(nil))
		return err == nil && got.NumPages == h.NumPages && got.Flags == h.Flags && bytes.Equal(got.Config, cfg)
	})
	check("pages", func(pfns []uint64) bool {
		if len(pfns) == 0 || len(pfns) > MaxBatchPages {
			return true
		}
		data := make([]byte, len(pfns)*PageSize)
		data[len(data)-1] = 7
		b := append(PagesPrefix(nil, pfns, 0), data...)
		got, flags, d, err := ParsePages(b, nil)
		return err == nil && flags == 0 && equalVal(got, pfns) && bytes.Equal(d, data)
	})
	check("control", func(kind, id, msg string, tok []byte, s, n int) bool {
		if kind == "" {
			kind = "k"
		}
		c := Control{Kind: kind, MigrationID: id, Message: msg, Token: tok, Stream: s, Streams: n}
		b, err := MarshalControl(nil, &c)
		if err != nil {
			return false
		}
		got, err := ParseControl(b)
		return err == nil && got.Kind == c.Kind && got.MigrationID == id && got.Message == msg &&
			bytes.Equal(got.Token, tok) && got.Stream == s && got.Streams == n
	})
}

// smallStream is a stream with every record type, small enough to flip
// every byte of it through every value.
func smallStream(t testing.TB) []byte {
	rng := rand.New(rand.NewPCG(1, 2))
	h := Header{Version: Version, PageShift: PageShift, NumPages: 4, Flags: FlagDedup, Config: []byte("name=vm1")}
	page := randBytes(rng, PageSize)
	ctl, _ := MarshalControl(nil, &Control{Kind: "hello", Streams: 2})
	return encode(t, []sample{
		{t: TypeControl, parts: [][]byte{ctl}},
		{t: TypeHeader, parts: [][]byte{h.Marshal(nil)}},
		{t: TypePages, parts: [][]byte{PagesPrefix(nil, []uint64{1}, 0), page}},
		{t: TypeZeroPages, parts: [][]byte{MarshalPFNs(nil, []uint64{0, 2})}},
		{t: TypeDiskRefs, parts: [][]byte{MarshalDiskRefs(nil, []DiskRef{{PFN: 3, Disk: 1, Offset: 8192}})}},
		{t: TypeRoundEnd, parts: [][]byte{[]byte(`{"r":1}`)}},
		{t: TypeState, parts: [][]byte{[]byte("vcpu0 regs")}}, // 10 bytes: padded
		{t: TypeBitmap, parts: [][]byte{MarshalBitmap(nil, 0, 4, []uint64{0xf})}},
		{t: TypeRequest, parts: [][]byte{MarshalRequest(nil, ReasonFallback, []uint64{3})}},
		{t: TypeManifest, parts: [][]byte{MarshalManifest(nil, 0, make([][16]byte, 4))}},
		{t: TypeEnd},
	})
}

func TestNoProperPrefixParsesCleanly(t *testing.T) {
	stream := smallStream(t)
	// Record boundaries, where io.EOF (not ErrUnexpectedEOF) is right.
	boundaries := map[int]bool{}
	{
		r := NewReader(bytes.NewReader(stream))
		if _, err := readAll(r, func(Record) { boundaries[int(r.Bytes())] = true }); err != nil {
			t.Fatal(err)
		}
		boundaries[StreamHeaderSize] = true
	}
	r := NewReader(nil)
	for n := 0; n < len(stream); n++ {
		r.Reset(bytes.NewReader(stream[:n]))
		clean, err := readAll(r, nil)
		if clean {
			t.Fatalf("prefix of %d/%d bytes parsed cleanly", n, len(stream))
		}
		if boundaries[n] {
			if err != nil {
				t.Fatalf("prefix of %d bytes ends at a record boundary: want io.EOF, got %v", n, err)
			}
			continue
		}
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("prefix of %d bytes: want io.ErrUnexpectedEOF, got %v", n, err)
		}
	}
}

func TestEverySingleByteCorruptionIsDetected(t *testing.T) {
	stream := smallStream(t)
	if clean, err := readAll(NewReader(bytes.NewReader(stream)), nil); !clean || err != nil {
		t.Fatalf("unmodified stream: clean=%v err=%v", clean, err)
	}
	bad := make([]byte, len(stream))
	r := NewReader(nil)
	src := bytes.NewReader(nil)
	kinds := map[error]int{}
	sentinels := []error{ErrBadMagic, ErrVersion, ErrTooLong, ErrChecksum, ErrUnknownMandatory, ErrPadding, ErrMalformed, io.ErrUnexpectedEOF}
	for i := range stream {
		for x := 1; x < 256; x++ {
			copy(bad, stream)
			bad[i] ^= byte(x)
			src.Reset(bad)
			r.Reset(src)
			clean, err := readAll(r, nil)
			if clean || err == nil {
				t.Fatalf("byte %d xor %#x: stream still parses (clean=%v)", i, x, clean)
			}
			known := false
			for _, s := range sentinels {
				if errors.Is(err, s) {
					kinds[s]++
					known = true
					break
				}
			}
			if !known {
				t.Fatalf("byte %d xor %#x: error %v wraps no sentinel", i, x, err)
			}
		}
	}
	t.Logf("%d corrupted streams, all rejected: %v", len(stream)*255, kinds)
}

// rawRecord frames a body by hand, with a valid checksum.
func rawRecord(t Type, body []byte) []byte {
	var h [RecordHeaderSize]byte
	binary.LittleEndian.PutUint32(h[0:], uint32(t))
	binary.LittleEndian.PutUint32(h[4:], uint32(len(body)))
	binary.LittleEndian.PutUint32(h[8:], crcOf(t, body))
	out := append(h[:], body...)
	return append(out, make([]byte, padLen(len(body)))...)
}

func crcOf(t Type, body []byte) uint32 {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.Write(t, body)
	_ = w.Flush()
	return binary.LittleEndian.Uint32(buf.Bytes()[8:])
}

func streamOf(records ...[]byte) []byte {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.WriteStreamHeader()
	_ = w.Flush()
	for _, r := range records {
		buf.Write(r)
	}
	return buf.Bytes()
}

func TestUnknownRecords(t *testing.T) {
	t.Run("an unknown optional record is skipped", func(t *testing.T) {
		s := streamOf(rawRecord(Optional|77, []byte("future stuff")), rawRecord(TypeState, []byte("s")), rawRecord(TypeEnd, nil))
		var got []Type
		clean, err := readAll(NewReader(bytes.NewReader(s)), func(r Record) { got = append(got, r.Type) })
		if err != nil || !clean || !reflect.DeepEqual(got, []Type{TypeState, TypeEnd}) {
			t.Fatalf("clean=%v err=%v types=%v", clean, err, got)
		}
	})
	t.Run("an unknown mandatory record is rejected", func(t *testing.T) {
		s := streamOf(rawRecord(77, []byte("future stuff")), rawRecord(TypeEnd, nil))
		_, err := readAll(NewReader(bytes.NewReader(s)), nil)
		if !errors.Is(err, ErrUnknownMandatory) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a mandatory twin of the optional RoundEnd type is rejected", func(t *testing.T) {
		s := streamOf(rawRecord(TypeRoundEnd&^Optional, []byte("{}")), rawRecord(TypeEnd, nil))
		_, err := readAll(NewReader(bytes.NewReader(s)), nil)
		if !errors.Is(err, ErrUnknownMandatory) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a skipped optional record still has its checksum checked", func(t *testing.T) {
		rec := rawRecord(Optional|77, []byte("future stuff"))
		rec[RecordHeaderSize] ^= 1
		_, err := readAll(NewReader(bytes.NewReader(streamOf(rec, rawRecord(TypeEnd, nil)))), nil)
		if !errors.Is(err, ErrChecksum) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("type zero is an unknown mandatory record", func(t *testing.T) {
		_, err := readAll(NewReader(bytes.NewReader(streamOf(rawRecord(0, nil)))), nil)
		if !errors.Is(err, ErrUnknownMandatory) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("an End record with a body is malformed", func(t *testing.T) {
		_, err := readAll(NewReader(bytes.NewReader(streamOf(rawRecord(TypeEnd, []byte{0})))), nil)
		if !errors.Is(err, ErrMalformed) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestStreamHeaderErrors(t *testing.T) {
	good := streamOf(rawRecord(TypeEnd, nil))
	cases := []struct {
		name string
		mod  func([]byte)
		want error
	}{
		{"a wrong magic is ErrBadMagic", func(b []byte) { b[0] = 'Q' }, ErrBadMagic},
		{"version 2 is ErrVersion", func(b []byte) { b[8] = 2 }, ErrVersion},
		{"non-zero flags are ErrMalformed", func(b []byte) { b[12] = 1 }, ErrMalformed},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			b := bytes.Clone(good)
			c.mod(b)
			err := NewReader(bytes.NewReader(b)).ReadStreamHeader()
			if !errors.Is(err, c.want) {
				t.Fatalf("got %v, want %v", err, c.want)
			}
		})
	}
	t.Run("an empty input is io.ErrUnexpectedEOF", func(t *testing.T) {
		err := NewReader(bytes.NewReader(nil)).ReadStreamHeader()
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("got %v", err)
		}
	})
}

// allocBytes reports the bytes allocated while f runs.
func allocBytes(f func()) uint64 {
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	f()
	runtime.ReadMemStats(&b)
	return b.TotalAlloc - a.TotalAlloc
}

func TestOverLongLengthRejectedWithoutAllocating(t *testing.T) {
	hdr := make([]byte, RecordHeaderSize)
	binary.LittleEndian.PutUint32(hdr[0:], uint32(TypePages))
	binary.LittleEndian.PutUint32(hdr[4:], MaxBody+8)
	// Plenty of bytes behind the header: a reader that trusted the length
	// would allocate and fill MaxBody+8 bytes.
	s := append(streamOf(hdr), make([]byte, MaxBody+64)...)
	r := NewReader(bytes.NewReader(s))
	var err error
	n := allocBytes(func() {
		if err = r.ReadStreamHeader(); err != nil {
			return
		}
		_, err = r.Next()
	})
	if !errors.Is(err, ErrTooLong) {
		t.Fatalf("got %v, want ErrTooLong", err)
	}
	if n > 64<<10 {
		t.Fatalf("rejecting an over-long record allocated %d bytes", n)
	}
	if cap(r.body) != 0 {
		t.Fatalf("body buffer grew to %d", cap(r.body))
	}
	t.Logf("allocated %d bytes; error: %v", n, err)

	t.Run("a forged maximal length costs only the bytes that arrive", func(t *testing.T) {
		hdr := make([]byte, RecordHeaderSize)
		binary.LittleEndian.PutUint32(hdr[0:], uint32(TypeState))
		binary.LittleEndian.PutUint32(hdr[4:], MaxBody)
		s := append(streamOf(hdr), make([]byte, 1000)...)
		r := NewReader(bytes.NewReader(s))
		var err error
		n := allocBytes(func() {
			_ = r.ReadStreamHeader()
			_, err = r.Next()
		})
		if !errors.Is(err, io.ErrUnexpectedEOF) {
			t.Fatalf("got %v", err)
		}
		if cap(r.body) > minBodyCap || n > 128<<10 {
			t.Fatalf("truncated %d-byte claim: body cap %d, allocated %d bytes", MaxBody, cap(r.body), n)
		}
	})
}

func TestWriterRefusesOverLongBody(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	big := make([]byte, MaxBody/2+1)
	if err := w.Write(TypeState, big, big); !errors.Is(err, ErrTooLong) {
		t.Fatalf("got %v", err)
	}
	if w.Bytes() != 0 || w.Buffered() != 0 {
		t.Fatalf("a refused record wrote %d bytes", w.Bytes())
	}
	// The Writer stays usable.
	if err := w.Write(TypeState, big); err != nil {
		t.Fatal(err)
	}
	// A body of exactly MaxBody is fine and reads back.
	full := make([]byte, MaxBody)
	full[MaxBody-1] = 9
	buf.Reset()
	w.Reset(&buf)
	_ = w.WriteStreamHeader()
	if err := w.Write(TypeState, full[:100], full[100:]); err != nil {
		t.Fatal(err)
	}
	_ = w.Flush()
	r := NewReader(&buf)
	_ = r.ReadStreamHeader()
	rec, err := r.Next()
	if err != nil || !bytes.Equal(rec.Body, full) {
		t.Fatalf("MaxBody record: %v", err)
	}
}

// recWriter records the slices the Writer hands to the underlying writer.
type recWriter struct {
	calls [][]byte
	bytes.Buffer
}

func (r *recWriter) Write(p []byte) (int, error) {
	r.calls = append(r.calls, p)
	return r.Buffer.Write(p)
}

func TestLargePartsAreWrittenThrough(t *testing.T) {
	var rw recWriter
	w := NewWriter(&rw)
	data := make([]byte, 256*PageSize)
	pfns := make([]uint64, 256)
	prefix := PagesPrefix(nil, pfns, 0)
	_ = w.WriteStreamHeader()
	if err := w.Write(TypePages, prefix, data); err != nil {
		t.Fatal(err)
	}
	_ = w.Flush()
	through := false
	for _, c := range rw.calls {
		if len(c) == len(data) && &c[0] == &data[0] {
			through = true
		}
	}
	if !through {
		t.Fatalf("the 1 MiB page data was copied, not written through (%d writes)", len(rw.calls))
	}
	rec, err := func() (Record, error) {
		r := NewReader(&rw.Buffer)
		if err := r.ReadStreamHeader(); err != nil {
			return Record{}, err
		}
		return r.Next()
	}()
	if err != nil || rec.Type != TypePages || len(rec.Body) != len(prefix)+len(data) {
		t.Fatalf("read back: %v", err)
	}
}

type failWriter struct{ n int }

func (f *failWriter) Write(p []byte) (int, error) {
	if f.n <= 0 {
		return 0, errors.New("connection reset")
	}
	f.n--
	return len(p), nil
}

func TestWriterErrorIsSticky(t *testing.T) {
	w := NewWriter(&failWriter{n: 0})
	_ = w.WriteStreamHeader()
	err := w.Flush()
	if err == nil {
		t.Fatal("flush to a failing writer succeeded")
	}
	if err2 := w.Write(TypeEnd); err2 == nil {
		t.Fatal("write after an error succeeded")
	}
	big := make([]byte, 1<<20)
	w2 := NewWriter(&failWriter{n: 0})
	if err := w2.Write(TypeState, big); err == nil {
		t.Fatal("write-through to a failing writer succeeded")
	}
}

func TestParseRejectsBadBodies(t *testing.T) {
	goodPages := append(PagesPrefix(nil, []uint64{5}, 0), make([]byte, PageSize)...)
	hdr := (&Header{Version: Version, PageShift: PageShift, NumPages: 10, Config: []byte("x")}).Marshal(nil)
	cases := []struct {
		name string
		err  func() error
	}{
		{"a pages body shorter than its prefix is malformed", func() error { _, _, _, err := ParsePages(goodPages[:12], nil); return err }},
		{"a pages body with one byte of data missing is malformed", func() error { _, _, _, err := ParsePages(goodPages[:len(goodPages)-1], nil); return err }},
		{"a pages batch of zero pages is malformed", func() error { _, _, _, err := ParsePages(PagesPrefix(nil, nil, 0), nil); return err }},
		{"a pages batch over MaxBatchPages is malformed", func() error {
			b := le.AppendUint32(nil, MaxBatchPages+1)
			b = le.AppendUint32(b, 0)
			_, _, _, err := ParsePages(b, nil)
			return err
		}},
		{"a pages batch claiming 2^32-1 pages is malformed", func() error {
			b := le.AppendUint32(nil, 0xffffffff)
			b = le.AppendUint32(b, 0)
			_, _, _, err := ParsePages(b, nil)
			return err
		}},
		{"unknown pages flags are malformed", func() error {
			b := bytes.Clone(goodPages)
			b[4] = 2
			_, _, _, err := ParsePages(b, nil)
			return err
		}},
		{"a compressed batch without data is malformed", func() error {
			_, _, _, err := ParsePages(PagesPrefix(nil, []uint64{1}, PagesZstd), nil)
			return err
		}},
		{"a pfn list whose count exceeds the body is malformed", func() error {
			b := MarshalPFNs(nil, []uint64{1, 2})
			b[0] = 3
			_, err := ParsePFNs(b, nil)
			return err
		}},
		{"a pfn list with a trailing byte is malformed", func() error { _, err := ParsePFNs(append(MarshalPFNs(nil, []uint64{1}), 0), nil); return err }},
		{"a pfn list with reserved bits is malformed", func() error {
			b := MarshalPFNs(nil, nil)
			b[7] = 1
			_, err := ParsePFNs(b, nil)
			return err
		}},
		{"a pfn list body of 4 bytes is malformed", func() error { _, err := ParsePFNs([]byte{0, 0, 0, 0}, nil); return err }},
		{"disk refs with a non-zero pad are malformed", func() error {
			b := MarshalDiskRefs(nil, []DiskRef{{PFN: 1}})
			b[8+12] = 1
			_, err := ParseDiskRefs(b, nil)
			return err
		}},
		{"disk refs cut short are malformed", func() error {
			b := MarshalDiskRefs(nil, []DiskRef{{PFN: 1}})
			_, err := ParseDiskRefs(b[:len(b)-1], nil)
			return err
		}},
		{"a manifest claiming 2^32-1 hashes is malformed", func() error {
			b := MarshalManifest(nil, 0, nil)
			le.PutUint32(b[8:], 0xffffffff)
			_, _, err := ParseManifest(b)
			return err
		}},
		{"a manifest whose pfn range overflows is malformed", func() error {
			_, _, err := ParseManifest(MarshalManifest(nil, ^uint64(0), make([][16]byte, 2)))
			return err
		}},
		{"a request with reason 0 is malformed", func() error { _, _, err := ParseRequest(MarshalRequest(nil, 0, []uint64{1}), nil); return err }},
		{"a request with a short pfn list is malformed", func() error {
			b := MarshalRequest(nil, ReasonDemand, []uint64{1, 2})
			_, _, err := ParseRequest(b[:len(b)-8], nil)
			return err
		}},
		{"a bitmap with bits past nbits is malformed", func() error {
			b := MarshalBitmap(nil, 0, 3, []uint64{7})
			b[16] = 0xff
			_, _, _, err := ParseBitmap(b)
			return err
		}},
		{"a bitmap claiming 2^64-1 bits is malformed", func() error {
			b := MarshalBitmap(nil, 0, 0, nil)
			le.PutUint64(b[8:], ^uint64(0))
			_, _, _, err := ParseBitmap(b)
			return err
		}},
		{"a bitmap whose pfn range overflows is malformed", func() error {
			_, _, _, err := ParseBitmap(MarshalBitmap(nil, ^uint64(0)-10, 64, []uint64{1}))
			return err
		}},
		{"a header of the wrong version is ErrVersion", func() error {
			b := bytes.Clone(hdr)
			b[0] = 9
			_, err := ParseHeader(b)
			if !errors.Is(err, ErrVersion) {
				return nil
			}
			return err
		}},
		{"a header with page shift 21 is malformed", func() error {
			b := bytes.Clone(hdr)
			b[4] = 21
			_, err := ParseHeader(b)
			return err
		}},
		{"a header with unknown flags is malformed", func() error {
			b := bytes.Clone(hdr)
			b[16] = 0x80
			_, err := ParseHeader(b)
			return err
		}},
		{"a header whose config length disagrees with the body is malformed", func() error {
			_, err := ParseHeader(append(bytes.Clone(hdr), 'y'))
			return err
		}},
		{"a control message that is not JSON is malformed", func() error { _, err := ParseControl([]byte("{kind")); return err }},
		{"a control message without kind is malformed", func() error { _, err := ParseControl([]byte(`{"message":"x"}`)); return err }},
		{"marshalling a control message without kind fails", func() error { _, err := MarshalControl(nil, &Control{}); return err }},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := c.err()
			if err == nil {
				t.Fatal("accepted")
			}
			if !errors.Is(err, ErrMalformed) && !errors.Is(err, ErrVersion) {
				t.Fatalf("error %v wraps neither ErrMalformed nor ErrVersion", err)
			}
		})
	}
}

func TestParseReusesStorage(t *testing.T) {
	pfns := make([]uint64, 0, 64)
	b := MarshalPFNs(nil, []uint64{1, 2, 3})
	got, err := ParsePFNs(b, pfns)
	if err != nil || &got[0] != &pfns[:1][0] {
		t.Fatalf("ParsePFNs did not reuse storage (err %v)", err)
	}
	hashes := make([][16]byte, 0, 8)
	_, gh, err := ParseManifestInto(MarshalManifest(nil, 0, make([][16]byte, 2)), hashes)
	if err != nil || &gh[0] != &hashes[:1][0] {
		t.Fatalf("ParseManifestInto did not reuse storage (err %v)", err)
	}
}

func TestPagesZstdRoundTrip(t *testing.T) {
	enc, err := NewPagesEncoder()
	if err != nil {
		t.Fatal(err)
	}
	defer enc.Close()
	dec, err := NewPagesDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer dec.Close()
	rng := rand.New(rand.NewPCG(3, 4))
	data := make([]byte, 16*PageSize)
	copy(data[PageSize:], randBytes(rng, 3*PageSize)) // mostly compressible
	pfns := randPFNs(rng, 16)
	comp := EncodePages(enc, nil, data)
	if len(comp) >= len(data) {
		t.Fatalf("compressed %d to %d", len(data), len(comp))
	}
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.WriteStreamHeader()
	_ = w.Write(TypePages, PagesPrefix(nil, pfns, PagesZstd), comp)
	_ = w.Flush()
	r := NewReader(&buf)
	_ = r.ReadStreamHeader()
	rec, err := r.Next()
	if err != nil {
		t.Fatal(err)
	}
	gp, flags, d, err := ParsePages(rec.Body, nil)
	if err != nil || flags != PagesZstd || !equalVal(gp, pfns) {
		t.Fatalf("parse: %v", err)
	}
	out, err := DecodePages(dec, d, len(gp), nil)
	if err != nil || !bytes.Equal(out, data) {
		t.Fatalf("decode: %v", err)
	}
	t.Run("a frame that decompresses to the wrong size is malformed", func(t *testing.T) {
		if _, err := DecodePages(dec, d, len(gp)-1, nil); !errors.Is(err, ErrMalformed) {
			t.Fatalf("got %v", err)
		}
	})
	t.Run("a frame inflating past one batch is refused", func(t *testing.T) {
		bomb := EncodePages(enc, nil, make([]byte, 2*MaxBatchPages*PageSize))
		out, err := DecodePages(dec, bomb, 1, nil)
		if err == nil || cap(out) > 2*MaxBatchPages*PageSize {
			t.Fatalf("bomb: err %v cap %d", err, cap(out))
		}
	})
	t.Run("garbage is malformed", func(t *testing.T) {
		if _, err := DecodePages(dec, []byte("not zstd at all"), 1, nil); !errors.Is(err, ErrMalformed) {
			t.Fatalf("got %v", err)
		}
	})
}

func TestTypeNames(t *testing.T) {
	for _, ty := range allTypes {
		if s := ty.String(); s == "" || s[0] == 'U' {
			t.Errorf("type %d has no name: %q", uint32(ty), s)
		}
	}
	if s := Type(99).String(); s != "Unknown(0x63)" {
		t.Errorf("got %q", s)
	}
}

func TestHeaderCRCMatchesStdlib(t *testing.T) {
	rng := rand.New(rand.NewPCG(11, 12))
	for range 1000 {
		ty, n := Type(rng.Uint32()), rng.Uint32()
		var b [8]byte
		binary.LittleEndian.PutUint32(b[0:], uint32(ty))
		binary.LittleEndian.PutUint32(b[4:], n)
		if got, want := headerCRC(ty, n), crc32.Checksum(b[:], castagnoli); got != want {
			t.Fatalf("headerCRC(%#x, %d) = %#x, crc32 says %#x", uint32(ty), n, got, want)
		}
	}
}

func TestWriteIsAllocationFree(t *testing.T) {
	pfns, data := make([]uint64, 256), make([]byte, 256*PageSize)
	small := MarshalPFNs(nil, pfns[:64])
	w := NewWriter(io.Discard)
	prefix := make([]byte, 0, 8+8*256)
	allocs := testing.AllocsPerRun(100, func() {
		prefix = PagesPrefix(prefix[:0], pfns, 0)
		_ = w.Write(TypePages, prefix, data)
		_ = w.Write(TypeZeroPages, small)
	})
	if allocs != 0 {
		t.Fatalf("Write allocates %.1f times per call pair", allocs)
	}
	var buf bytes.Buffer
	w = NewWriter(&buf)
	_ = w.WriteStreamHeader()
	for range 4 {
		_ = w.Write(TypePages, PagesPrefix(nil, pfns, 0), data)
	}
	_ = w.Flush()
	stream := buf.Bytes()
	src := bytes.NewReader(stream)
	r := NewReader(src)
	out := make([]uint64, 0, 256)
	read := func() {
		src.Reset(stream)
		r.Reset(src)
		_ = r.ReadStreamHeader()
		for {
			rec, err := r.Next()
			if err != nil {
				break
			}
			out, _, _, _ = ParsePages(rec.Body, out)
		}
	}
	read()
	if allocs := testing.AllocsPerRun(20, read); allocs != 0 {
		t.Fatalf("reading 4 page batches allocates %.1f times", allocs)
	}
}

func TestMarshalBitmapPadsShortWords(t *testing.T) {
	b := MarshalBitmap(nil, 10, 130, []uint64{^uint64(0)})
	first, nbits, words, err := ParseBitmap(b)
	if err != nil || first != 10 || nbits != 130 || !reflect.DeepEqual(words, []uint64{^uint64(0), 0, 0}) {
		t.Fatalf("got %d %d %v %v", first, nbits, words, err)
	}
	if _, err := MarshalControl(nil, nil); !errors.Is(err, ErrMalformed) {
		t.Fatalf("nil control: %v", err)
	}
}

func TestReaderHandlesShortReads(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	var samples []sample
	for _, ty := range allTypes {
		if ty != TypeEnd {
			samples = append(samples, randSample(rng, ty))
		}
	}
	samples = append(samples, sample{t: TypeEnd})
	stream := encode(t, samples)
	wrappers := map[string]func(io.Reader) io.Reader{
		"one byte per read":        iotest.OneByteReader,
		"half of each read":        iotest.HalfReader,
		"EOF together with data":   iotest.DataErrReader,
		"short reads and timeouts": func(r io.Reader) io.Reader { return iotest.TimeoutReader(iotest.HalfReader(r)) },
	}
	for name, wrap := range wrappers {
		t.Run(name, func(t *testing.T) {
			r := NewReader(wrap(bytes.NewReader(stream)))
			i := 0
			clean, err := readAll(r, func(rec Record) {
				got, err := decodeValue(rec)
				if err != nil || rec.Type != samples[i].t || !equalVal(got, samples[i].val) {
					t.Fatalf("record %d (%s): %v", i, rec.Type, err)
				}
				i++
			})
			if name == "short reads and timeouts" {
				// TimeoutReader fails the second read: that must surface as
				// an error, never as a clean stream.
				if clean || err == nil {
					t.Fatalf("clean=%v err=%v", clean, err)
				}
				return
			}
			if !clean || err != nil || i != len(samples) {
				t.Fatalf("clean=%v err=%v records=%d/%d", clean, err, i, len(samples))
			}
		})
	}
}

// TestOverTCPLoopback sends a random stream with large page batches over a
// real TCP connection (the Writer's vectored write-through path) and
// checks every record on the other side.
func TestOverTCPLoopback(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	rng := rand.New(rand.NewPCG(31, 32))
	var samples []sample
	for i := range 200 {
		if i%4 == 0 {
			n := 1 + rng.IntN(MaxBatchPages)
			v := pagesVal{pfns: randPFNs(rng, n), data: randBytes(rng, n*PageSize)}
			samples = append(samples, sample{t: TypePages, val: v, parts: [][]byte{PagesPrefix(nil, v.pfns, 0), v.data}})
			continue
		}
		samples = append(samples, randSample(rng, allTypes[rng.IntN(len(allTypes))]))
		if samples[len(samples)-1].t == TypeEnd {
			samples = samples[:len(samples)-1]
		}
	}
	samples = append(samples, sample{t: TypeEnd})

	sent := make(chan error, 1)
	go func() {
		c, err := net.Dial("tcp", ln.Addr().String())
		if err != nil {
			sent <- err
			return
		}
		defer c.Close()
		w := NewWriter(c)
		if err := w.WriteStreamHeader(); err != nil {
			sent <- err
			return
		}
		for _, s := range samples {
			if err := w.Write(s.t, s.parts...); err != nil {
				sent <- err
				return
			}
		}
		sent <- w.Flush()
	}()
	c, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	r := NewReader(c)
	i := 0
	clean, err := readAll(r, func(rec Record) {
		got, err := decodeValue(rec)
		if err != nil || rec.Type != samples[i].t || !equalVal(got, samples[i].val) {
			t.Fatalf("record %d (%s): %v", i, rec.Type, err)
		}
		i++
	})
	if err := <-sent; err != nil {
		t.Fatalf("sender: %v", err)
	}
	if !clean || err != nil || i != len(samples) {
		t.Fatalf("clean=%v err=%v records=%d/%d", clean, err, i, len(samples))
	}
	t.Logf("%d records, %d bytes over TCP", i, r.Bytes())
}

func TestReadDeadlineAtRecordBoundaryIsRetryable(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	cli, err := net.Dial("tcp", ln.Addr().String())
	if err != nil {
		t.Fatal(err)
	}
	defer cli.Close()
	srv, err := ln.Accept()
	if err != nil {
		t.Fatal(err)
	}
	defer srv.Close()

	w := NewWriter(cli)
	_ = w.WriteStreamHeader()
	_ = w.Write(TypeState, []byte("one"))
	if err := w.Flush(); err != nil {
		t.Fatal(err)
	}
	r := NewReader(srv)
	if err := r.ReadStreamHeader(); err != nil {
		t.Fatal(err)
	}
	if rec, err := r.Next(); err != nil || string(rec.Body) != "one" {
		t.Fatalf("first record: %v", err)
	}
	_ = srv.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := r.Next(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("idle connection: want a deadline error, got %v", err)
	}
	_ = srv.SetReadDeadline(time.Time{})
	_ = w.Write(TypeState, []byte("two"))
	_ = w.Flush()
	if rec, err := r.Next(); err != nil || string(rec.Body) != "two" {
		t.Fatalf("after the deadline: %v", err)
	}

	// A deadline in the middle of a record is fatal: the stream position
	// is lost.
	_, _ = cli.Write(rawRecord(TypeState, []byte("three"))[:10])
	_ = srv.SetReadDeadline(time.Now().Add(20 * time.Millisecond))
	if _, err := r.Next(); !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("half a record: want a deadline error, got %v", err)
	}
	_ = srv.SetReadDeadline(time.Time{})
	if _, err := r.Next(); err == nil {
		t.Fatal("reader resumed in the middle of a record")
	}
}

// TestEntryLimitsRefuseBeforeAllocating: a list record may carry at most
// MaxBatchPages entries (MaxManifestHashes hashes), whatever fits in
// MaxBody: a receiver sizes per-entry work (a page buffer per reference)
// from the count, so the count is refused before anything is decoded.
func TestEntryLimitsRefuseBeforeAllocating(t *testing.T) {
	over := make([]uint64, MaxBatchPages+1)
	refs := make([]DiskRef, MaxBatchPages+1)
	hashes := make([][16]byte, MaxManifestHashes+1)
	for name, parse := range map[string]func() error{
		"pfns":     func() error { _, err := ParsePFNs(MarshalPFNs(nil, over), nil); return err },
		"refs":     func() error { _, err := ParseDiskRefs(MarshalDiskRefs(nil, refs), nil); return err },
		"request":  func() error { _, _, err := ParseRequest(MarshalRequest(nil, ReasonDemand, over), nil); return err },
		"manifest": func() error { _, _, err := ParseManifest(MarshalManifest(nil, 0, hashes)); return err },
		"range":    func() error { _, _, err := ManifestRange(MarshalManifest(nil, 0, hashes)); return err },
	} {
		if err := parse(); !errors.Is(err, ErrMalformed) {
			t.Fatalf("%s: over the limit: %v, want ErrMalformed", name, err)
		}
	}
	// At the limit they parse.
	if got, err := ParseDiskRefs(MarshalDiskRefs(nil, refs[:MaxBatchPages]), nil); err != nil || len(got) != MaxBatchPages {
		t.Fatalf("%d refs: %d, %v", MaxBatchPages, len(got), err)
	}
	// The refusal of an 8 MiB reference record allocates only its error.
	body := MarshalDiskRefs(nil, make([]DiskRef, (8<<20)/diskRefSize))
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	_, err := ParseDiskRefs(body, nil)
	runtime.ReadMemStats(&after)
	if grew := after.TotalAlloc - before.TotalAlloc; err == nil || grew > 4<<10 {
		t.Fatalf("refusing an 8 MiB reference record: %v, %d bytes allocated", err, grew)
	}
	if first, count, err := ManifestRange(MarshalManifest(nil, 7, hashes[:3])); err != nil || first != 7 || count != 3 {
		t.Fatalf("ManifestRange: %d %d %v", first, count, err)
	}
	for _, n := range []uint64{0, 1, 63, 64, 65, 1 << 20} {
		if got, want := BitmapSize(n), len(MarshalBitmap(nil, 0, n, nil)); got != want {
			t.Fatalf("BitmapSize(%d) = %d, marshalled %d", n, got, want)
		}
	}
}

// TestReaderMaxBody: a Reader limited below MaxBody refuses a longer record
// from its header, and SetMaxBody(0) restores MaxBody.
func TestReaderMaxBody(t *testing.T) {
	var buf bytes.Buffer
	w := NewWriter(&buf)
	_ = w.Write(TypeControl, make([]byte, 100))
	_ = w.Write(TypeControl, make([]byte, 2000))
	_ = w.Flush()
	r := NewReader(bytes.NewReader(buf.Bytes()))
	r.SetMaxBody(1024)
	if _, err := r.Next(); err != nil {
		t.Fatal(err)
	}
	if _, err := r.Next(); !errors.Is(err, ErrTooLong) {
		t.Fatalf("a 2000-byte body under a 1024-byte limit: %v", err)
	}
	r = NewReader(bytes.NewReader(buf.Bytes()))
	r.SetMaxBody(1024)
	r.SetMaxBody(0)
	for range 2 {
		if _, err := r.Next(); err != nil {
			t.Fatal(err)
		}
	}
}
