package xlstream

import (
	"bufio"
	"errors"
	"fmt"
	"io"

	"github.com/klauspost/compress/zstd"
	"github.com/zeebo/xxh3"
)

// PageResolver reads referenced pages from the shared disks (destination
// side).
type PageResolver interface {
	// ReadPage fills dst (PageSize bytes) with the block ref names and
	// checks it against ref.Hash; an error (stale block, I/O error, unknown
	// disk) makes the Decoder ask the source for the page instead.
	ReadPage(ref Ref, dst []byte) error
}

// DecodeStats counts what a Decoder did.
type DecodeStats struct {
	PageRecords int64
	ZeroPages   int64
	RefPages    int64 // REF pages read from disk and verified
	DataPages   int64
	StalePages  int64 // REF pages that failed and came from the source
	InBytes     int64 // frame bytes consumed
	OutBytes    int64 // bytes of the rebuilt stream
	// CompressedRecords came as FramePagesZ.
	CompressedRecords int64
}

// Decoder rebuilds the original stream from frames (destination side).
type Decoder struct {
	w   io.Writer
	res PageResolver
	// Need fetches REF page seq from the source after a failed read; nil
	// means no fallback (the rebuild fails).
	Need func(seq uint64) ([]byte, error)
	// Ack, when set, is called with the next REF seq after each record
	// that had REFs.
	Ack func(seq uint64) error

	seq   uint64
	rec   []byte
	stale []int
	stats DecodeStats
	z     inflater // FramePagesZ payloads
}

// NewDecoder returns a Decoder writing the rebuilt stream to w; res may be
// nil when the source has no PageIndex (no REFs).
func NewDecoder(w io.Writer, res PageResolver) *Decoder {
	return &Decoder{w: w, res: res, z: inflater{max: MaxPageRecord}}
}

// Stats returns the counters so far.
func (d *Decoder) Stats() DecodeStats { return d.stats }

// Close releases the decompressor, if one was made.
func (d *Decoder) Close() { d.z.close() }

// Frame handles one frame; it returns true after the END frame.
func (d *Decoder) Frame(kind byte, body []byte) (bool, error) {
	d.stats.InBytes += int64(frameHeaderLen + len(body))
	switch kind {
	case FrameRaw:
		return false, d.write(body)
	case FramePages:
		return false, d.pages(body, false)
	case FramePagesZ:
		return false, d.pages(body, true)
	case FrameEnd:
		return true, nil
	}
	return false, fmt.Errorf("%w: unexpected frame kind %d", ErrBadFrame, kind)
}

func (d *Decoder) write(b []byte) error {
	n, err := d.w.Write(b)
	d.stats.OutBytes += int64(n)
	if err != nil {
		return fmt.Errorf("xlstream: write rebuilt stream: %w", err)
	}
	return nil
}

func (d *Decoder) pages(body []byte, compressed bool) error {
	if len(body) < 17 {
		return fmt.Errorf("%w: PAGES frame of %d bytes", ErrBadFrame, len(body))
	}
	typ, length := le.Uint32(body), le.Uint32(body[4:])
	count := le.Uint32(body[8:])
	if typ != RecPageData || count == 0 || length > MaxPageRecord {
		return fmt.Errorf("%w: PAGES frame with record type %#x, count %d, length %d", ErrBadFrame, typ, count, length)
	}
	prefixLen := 16 + 8*int(count)
	total := 8 + int(length)
	if length > MaxPageRecord || uint64(length) < 8+8*uint64(count) {
		return fmt.Errorf("%w: PAGES frame: record length %d for %d pfns", ErrBadFrame, length, count)
	}
	if cap(d.rec) < total {
		d.rec = make([]byte, total)
	}
	rec := d.rec[:total]
	copy(rec, body[:16])
	rest, err := decodePFNs(rec[16:prefixLen], body[16:], int(count))
	if err != nil {
		return err
	}
	n := 0
	for i := 0; i < int(count); i++ {
		t := PFNType(le.Uint64(rec[16+8*i:]))
		if !pageTypeValid(t) {
			return fmt.Errorf("%w: PAGES frame: pfn %d has unknown type %#x", ErrBadFrame, i, t)
		}
		if pageHasData(t) {
			n++
		}
	}
	if want := 8 + 8*int(count) + PageSize*n; int(length) != want {
		return fmt.Errorf("%w: PAGES frame: record length %d, want %d", ErrBadFrame, length, want)
	}
	if len(rest) < 8+n {
		return fmt.Errorf("%w: PAGES frame: checksum or %d page kinds missing", ErrBadFrame, n)
	}
	sum := le.Uint64(rest)
	kinds := rest[8 : 8+n]
	payload := rest[8+n:]
	if compressed {
		if payload, err = d.inflate(kinds, payload); err != nil {
			return err
		}
	}

	d.stale = d.stale[:0]
	firstSeq := d.seq
	var zero, refs, data int64
	for i, k := range kinds {
		dst := rec[prefixLen+i*PageSize : prefixLen+(i+1)*PageSize]
		switch k {
		case KindZero:
			clear(dst)
			zero++
		case KindData:
			if len(payload) < PageSize {
				return fmt.Errorf("%w: PAGES frame: page %d data cut short", ErrBadFrame, i)
			}
			copy(dst, payload[:PageSize])
			payload = payload[PageSize:]
			data++
		case KindRef:
			if len(payload) < refLen {
				return fmt.Errorf("%w: PAGES frame: page %d reference cut short", ErrBadFrame, i)
			}
			ref := getRef(payload)
			payload = payload[refLen:]
			if d.res == nil || d.res.ReadPage(ref, dst) != nil {
				d.stale = append(d.stale, i)
			} else {
				refs++
			}
			d.seq++
		default:
			return fmt.Errorf("%w: PAGES frame: page %d has kind %d", ErrBadFrame, i, k)
		}
	}
	if len(payload) != 0 {
		return fmt.Errorf("%w: PAGES frame: %d bytes after the last page", ErrBadFrame, len(payload))
	}
	if len(d.stale) > 0 {
		if err := d.fallback(rec, prefixLen, kinds, firstSeq); err != nil {
			return err
		}
	}
	if got := xxh3.Hash(rec); got != sum {
		return fmt.Errorf("%w: PAGE_DATA record of %d pfns (first pfn %#x): checksum %#x, source had %#x",
			ErrChecksum, count, PFN(le.Uint64(rec[16:])), got, sum)
	}
	if refs > 0 || len(d.stale) > 0 {
		if d.Ack != nil {
			if err := d.Ack(d.seq); err != nil {
				return err
			}
		}
	}
	d.stats.PageRecords++
	if compressed {
		d.stats.CompressedRecords++
	}
	d.stats.ZeroPages += zero
	d.stats.RefPages += refs
	d.stats.DataPages += data
	d.stats.StalePages += int64(len(d.stale))
	return d.write(rec)
}

// inflate decompresses the payload of a FramePagesZ: exactly the REFs and
// DATA pages its kinds announce.
func (d *Decoder) inflate(kinds, z []byte) ([]byte, error) {
	want := 0
	for _, k := range kinds {
		switch k {
		case KindData:
			want += PageSize
		case KindRef:
			want += refLen
		}
	}
	if want == 0 {
		return nil, fmt.Errorf("%w: compressed PAGES frame without REF or DATA pages", ErrBadFrame)
	}
	return d.z.inflate(z, want, "PAGES frame")
}

// inflater decompresses zstd frames into a buffer it reuses (one
// goroutine). The decoder's output is capped at max bytes whatever the
// frame claims, and must be exactly the length the caller expects.
type inflater struct {
	max int
	d   *zstd.Decoder // made at the first frame
	buf []byte
}

func (f *inflater) inflate(z []byte, want int, what string) ([]byte, error) {
	if want > f.max {
		return nil, fmt.Errorf("%w: %s of %d bytes (at most %d)", ErrBadFrame, what, want, f.max)
	}
	if f.d == nil {
		d, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
			zstd.WithDecoderMaxMemory(uint64(f.max)), zstd.WithDecoderLowmem(true))
		if err != nil {
			return nil, fmt.Errorf("xlstream: create zstd decoder: %w", err)
		}
		f.d = d
	}
	out, err := f.d.DecodeAll(z, f.buf[:0])
	if err != nil {
		return nil, fmt.Errorf("%w: %s: decompress: %v", ErrBadFrame, what, err)
	}
	f.buf = out
	if len(out) != want {
		return nil, fmt.Errorf("%w: %s decompressed to %d bytes, want %d", ErrBadFrame, what, len(out), want)
	}
	return out, nil
}

func (f *inflater) close() {
	if f.d != nil {
		f.d.Close()
		f.d = nil
	}
}

// fallback asks the source for every stale REF page of the record.
func (d *Decoder) fallback(rec []byte, prefixLen int, kinds []byte, firstSeq uint64) error {
	// seq of page i: firstSeq + number of REFs before i.
	seqOf := func(i int) uint64 {
		s := firstSeq
		for _, k := range kinds[:i] {
			if k == KindRef {
				s++
			}
		}
		return s
	}
	for _, i := range d.stale {
		seq := seqOf(i)
		if d.Need == nil {
			return fmt.Errorf("%w: REF %d (page %d of a record) failed verification and no source is connected", ErrFallbackFailed, seq, i)
		}
		pg, err := d.Need(seq)
		if err != nil {
			return fmt.Errorf("%w: REF %d: %v", ErrFallbackFailed, seq, err)
		}
		if len(pg) != PageSize {
			return fmt.Errorf("%w: REF %d: got %d bytes", ErrFallbackFailed, seq, len(pg))
		}
		copy(rec[prefixLen+i*PageSize:], pg)
	}
	return nil
}

// Decode rebuilds a stream from frames read from r until the END frame
// (files and tests; no fallback).
func Decode(r io.Reader, w io.Writer, res PageResolver) (DecodeStats, error) {
	br := bufio.NewReaderSize(r, 1<<20)
	d := NewDecoder(w, res)
	defer d.Close()
	var buf []byte
	for {
		kind, body, err := readFrame(br, buf)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = fmt.Errorf("%w: frames ended without END", ErrTruncated)
			}
			return d.Stats(), err
		}
		buf = body[:0]
		done, err := d.Frame(kind, body)
		if err != nil {
			return d.Stats(), err
		}
		if done {
			return d.Stats(), nil
		}
	}
}

// decodePFNs writes count pfn entries into dst from their encoding at the
// start of b and returns the rest of b.
func decodePFNs(dst, b []byte, count int) ([]byte, error) {
	enc, b := b[0], b[1:]
	switch enc {
	case pfnsRaw:
		if len(b) < 8*count {
			return nil, fmt.Errorf("%w: PAGES frame: pfn array cut short", ErrBadFrame)
		}
		copy(dst, b[:8*count])
		return b[8*count:], nil
	case pfnsRuns:
		if len(b) < 4 {
			return nil, fmt.Errorf("%w: PAGES frame: run count missing", ErrBadFrame)
		}
		runs := int(le.Uint32(b))
		b = b[4:]
		if runs > count || len(b) < 12*runs {
			return nil, fmt.Errorf("%w: PAGES frame: %d pfn runs for %d pfns", ErrBadFrame, runs, count)
		}
		i := 0
		for r := 0; r < runs; r++ {
			e, n := le.Uint64(b), int(le.Uint32(b[8:]))
			b = b[12:]
			if n == 0 || n > count-i {
				return nil, fmt.Errorf("%w: PAGES frame: pfn run of %d at entry %d of %d", ErrBadFrame, n, i, count)
			}
			for k := 0; k < n; k++ {
				le.PutUint64(dst[8*i:], e+uint64(k))
				i++
			}
		}
		if i != count {
			return nil, fmt.Errorf("%w: PAGES frame: pfn runs cover %d of %d pfns", ErrBadFrame, i, count)
		}
		return b, nil
	}
	return nil, fmt.Errorf("%w: PAGES frame: pfn encoding %d", ErrBadFrame, enc)
}
