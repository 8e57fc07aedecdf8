package xlstream

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
)

var le = binary.LittleEndian
var be = binary.BigEndian

// XLHeader is xl's save-file header.
type XLHeader struct {
	MandatoryFlags uint32
	OptionalFlags  uint32
	// Config is the libxl domain configuration (JSON, without its trailing
	// NUL) when MandatoryFlags has XLFlagJSON.
	Config []byte
}

// LibxcHeader holds libxc's image and domain headers.
type LibxcHeader struct {
	Version    uint32 // 2 or 3
	DomainType uint32 // DomainX86PV, ...
	PageShift  uint16
	XenMajor   uint32
	XenMinor   uint32
}

// TokenKind says what a Token holds.
type TokenKind uint8

const (
	// TokRaw is a piece of the stream to be copied verbatim.
	TokRaw TokenKind = iota + 1
	// TokPages is one complete libxc PAGE_DATA record.
	TokPages
)

// Token is one piece of the stream. Its slices are valid until the next
// call to Reader.Next.
type Token struct {
	Kind  TokenKind
	Layer Layer
	// Type is the record type the bytes belong to, or -1 for headers and
	// the trailer.
	Type int64
	// Raw holds the bytes (TokRaw) or the whole record (TokPages).
	Raw  []byte
	Page *PageRecord
}

// PageRecord is a parsed PAGE_DATA record. Raw is the record as it was in
// the stream: 8-byte record header, body, padding.
type PageRecord struct {
	Raw []byte
	// Entries are the pfn entries (type in bits 60-63, see PFN/PFNType).
	Entries []uint64
	// NData is the number of pages with contents (N <= len(Entries)).
	NData int
}

// PrefixLen is the length of Raw before the first page: record header,
// count and reserved word, pfn array.
func (p *PageRecord) PrefixLen() int { return 16 + 8*len(p.Entries) }

// Data returns the contents of the i-th page with data (0 <= i < NData).
func (p *PageRecord) Data(i int) []byte {
	o := p.PrefixLen() + i*PageSize
	return p.Raw[o : o+PageSize]
}

// ReaderStats counts what a Reader has parsed so far.
type ReaderStats struct {
	Bytes       int64 // bytes consumed
	Records     int64 // records of both layers
	PageRecords int64
	PFNs        int64 // pfn entries in PAGE_DATA records
	DataPages   int64 // pages with contents
}

type readState uint8

const (
	stDetect readState = iota
	stLibxlHeader
	stLibxlRecord
	stLibxcHeaders
	stLibxcRecord
	stBody // streaming the rest of a record, then back to bodyNext
	stTrailer
)

// rawChunk is the most a single TokRaw holds.
const rawChunk = 64 << 10

// MaxPageRecord is the largest PAGE_DATA record the Reader parses: libxc
// writes at most 1024 pages per record (4 MiB); this leaves room.
const MaxPageRecord = 16 << 20

// Reader splits an xl, libxl or libxc stream into tokens, validating every
// header and record boundary. It never reads past what the current token
// needs, so it can sit on a live migration connection.
type Reader struct {
	br    *bufio.Reader
	st    readState
	stats ReaderStats

	// top is the outermost layer found at the start.
	top         Layer
	libxcHeader bool // libxc headers were read

	// body streaming
	bodyLeft  uint64 // bytes of the current record still to emit (incl. pad)
	bodyLayer Layer
	bodyType  int64
	bodyNext  readState

	xl    *XLHeader
	libxc *LibxcHeader

	buf     []byte
	entries []uint64
	page    PageRecord
}

// NewReader returns a Reader of r.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, 256<<10), buf: make([]byte, rawChunk)}
}

// XL returns xl's header, or nil (not read yet, or the stream had none).
func (r *Reader) XL() *XLHeader { return r.xl }

// Libxc returns libxc's headers, or nil if not read yet.
func (r *Reader) Libxc() *LibxcHeader { return r.libxc }

// Stats returns what was parsed so far.
func (r *Reader) Stats() ReaderStats { return r.stats }

// Buffered returns how many bytes are read from the source but not yet
// consumed; when 0, the next call to Next may block on the source.
func (r *Reader) Buffered() int { return r.br.Buffered() }

// Complete reports whether the outermost layer's END was read.
func (r *Reader) Complete() bool { return r.st == stTrailer }

func (r *Reader) errf(base error, format string, a ...any) error {
	return fmt.Errorf("%w: %s (at byte %d)", base, fmt.Sprintf(format, a...), r.stats.Bytes)
}

// full reads exactly len(p) bytes; what names the item for errors.
func (r *Reader) full(p []byte, what string) error {
	n, err := io.ReadFull(r.br, p)
	r.stats.Bytes += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return fmt.Errorf("%w: %s: got %d of %d bytes (at byte %d)", ErrTruncated, what, n, len(p), r.stats.Bytes)
		}
		return fmt.Errorf("xlstream: read %s at byte %d: %w", what, r.stats.Bytes, err)
	}
	return nil
}

func (r *Reader) grow(n int) []byte {
	if cap(r.buf) < n {
		r.buf = make([]byte, n)
	}
	return r.buf[:n]
}

// Next returns the next token, io.EOF at the clean end of the stream (after
// the outermost END and any trailer), or an error wrapping one of the
// package's sentinel errors.
func (r *Reader) Next() (Token, error) {
	switch r.st {
	case stDetect:
		return r.detect()
	case stLibxlHeader:
		return r.libxlHeader()
	case stLibxlRecord:
		return r.libxlRecord()
	case stLibxcHeaders:
		return r.libxcHeaders()
	case stLibxcRecord:
		return r.libxcRecord()
	case stBody:
		return r.body()
	case stTrailer:
		n, err := r.br.Read(r.buf[:rawChunk])
		r.stats.Bytes += int64(n)
		if n > 0 {
			return Token{Kind: TokRaw, Layer: LayerTrailer, Type: -1, Raw: r.buf[:n]}, nil
		}
		if err == nil {
			err = io.ErrNoProgress
		}
		return Token{}, err
	}
	return Token{}, fmt.Errorf("xlstream: reader in bad state %d", r.st)
}

func (r *Reader) detect() (Token, error) {
	head, err := r.br.Peek(8)
	if err != nil {
		if len(head) == 0 && errors.Is(err, io.EOF) {
			return Token{}, fmt.Errorf("%w: empty stream", ErrTruncated)
		}
		if errors.Is(err, io.EOF) {
			return Token{}, fmt.Errorf("%w: stream of %d bytes", ErrTruncated, len(head))
		}
		return Token{}, fmt.Errorf("xlstream: read stream start: %w", err)
	}
	switch {
	case bytes.Equal(head, []byte(xlMagic[:8])):
		r.top = LayerXL
		return r.xlHeader()
	case be.Uint64(head) == libxlIdent:
		r.top = LayerLibxl
		return r.libxlHeader()
	case be.Uint64(head) == libxcMarker:
		r.top = LayerLibxc
		return r.libxcHeaders()
	}
	return Token{}, fmt.Errorf("%w: first bytes %x", ErrBadMagic, head)
}

func (r *Reader) xlHeader() (Token, error) {
	h := make([]byte, xlHeaderLen)
	if err := r.full(h, "xl header"); err != nil {
		return Token{}, err
	}
	if string(h[:32]) != xlMagic {
		return Token{}, r.errf(ErrBadMagic, "xl header magic %q", h[:32])
	}
	if bo := le.Uint32(h[32:]); bo != xlByteOrder {
		return Token{}, r.errf(ErrUnsupported, "xl header byte order %#x (only little-endian %#x is supported)", bo, xlByteOrder)
	}
	x := &XLHeader{MandatoryFlags: le.Uint32(h[36:]), OptionalFlags: le.Uint32(h[40:])}
	optLen := le.Uint32(h[44:])
	if x.MandatoryFlags&^xlKnownMandatory != 0 {
		return Token{}, r.errf(ErrUnsupported, "unknown xl mandatory flags %#x", x.MandatoryFlags)
	}
	if x.MandatoryFlags&XLFlagStreamV2 == 0 {
		return Token{}, r.errf(ErrUnsupported, "legacy (pre-v2) xl stream, mandatory flags %#x", x.MandatoryFlags)
	}
	if optLen > MaxXLOptionalData {
		return Token{}, r.errf(ErrRecordTooLong, "xl optional data of %d bytes (limit %d)", optLen, MaxXLOptionalData)
	}
	opt := make([]byte, optLen)
	if err := r.full(opt, "xl optional data"); err != nil {
		return Token{}, err
	}
	if x.MandatoryFlags&XLFlagJSON != 0 {
		if len(opt) < 4 {
			return Token{}, r.errf(ErrBadHeader, "xl optional data of %d bytes has no config length", len(opt))
		}
		cl := le.Uint32(opt)
		if uint64(cl) > uint64(len(opt)-4) {
			return Token{}, r.errf(ErrBadHeader, "xl config length %d exceeds optional data (%d bytes)", cl, len(opt)-4)
		}
		x.Config = bytes.TrimRight(opt[4:4+cl], "\x00")
	}
	r.xl = x
	r.st = stLibxlHeader
	return Token{Kind: TokRaw, Layer: LayerXL, Type: -1, Raw: append(h, opt...)}, nil
}

func (r *Reader) libxlHeader() (Token, error) {
	h := r.grow(libxlHeaderLen)
	if err := r.full(h, "libxl header"); err != nil {
		return Token{}, err
	}
	if id := be.Uint64(h); id != libxlIdent {
		return Token{}, r.errf(ErrBadMagic, "libxl ident %#x", id)
	}
	if v := be.Uint32(h[8:]); v != 2 {
		return Token{}, r.errf(ErrUnsupported, "libxl stream version %d (want 2)", v)
	}
	if o := be.Uint32(h[12:]); o&libxlOptBigEnd != 0 {
		return Token{}, r.errf(ErrUnsupported, "big-endian libxl stream (options %#x)", o)
	}
	r.st = stLibxlRecord
	return Token{Kind: TokRaw, Layer: LayerLibxl, Type: -1, Raw: h}, nil
}

// recordHeader reads a record header and checks its length.
func (r *Reader) recordHeader(l Layer) (typ, length uint32, h []byte, err error) {
	h = make([]byte, 8)
	if err = r.full(h, l.String()+" record header"); err != nil {
		return
	}
	typ, length = le.Uint32(h), le.Uint32(h[4:])
	if length > MaxRecordLength {
		err = r.errf(ErrRecordTooLong, "%s record type %#x of %d bytes (limit %d)", l, typ, length, MaxRecordLength)
	}
	r.stats.Records++
	return
}

func (r *Reader) libxlRecord() (Token, error) {
	typ, length, h, err := r.recordHeader(LayerLibxl)
	if err != nil {
		return Token{}, err
	}
	next := stLibxlRecord
	switch typ {
	case LibxlEnd:
		if length != 0 {
			return Token{}, r.errf(ErrBadRecord, "libxl END with %d-byte body", length)
		}
		next = stTrailer
	case LibxlLibxcCtx:
		if length != 0 {
			return Token{}, r.errf(ErrBadRecord, "libxl LIBXC_CONTEXT with %d-byte body", length)
		}
		next = stLibxcRecord
		if !r.libxcHeader {
			next = stLibxcHeaders
		}
	case LibxlEmuXSData, LibxlEmuContext, LibxlCheckpoint, 5:
	default:
		if typ&RecOptional == 0 {
			return Token{}, r.errf(ErrUnsupported, "unknown mandatory libxl record %#x", typ)
		}
	}
	return r.startBody(LayerLibxl, int64(typ), h, uint64(length), next)
}

// startBody emits the record header and the first part of its body, and
// streams the rest from state stBody.
func (r *Reader) startBody(l Layer, typ int64, h []byte, length uint64, next readState) (Token, error) {
	r.bodyLeft = align8(length)
	r.bodyLayer, r.bodyType, r.bodyNext = l, typ, next
	if r.bodyLeft == 0 {
		r.st = next
		return Token{Kind: TokRaw, Layer: l, Type: typ, Raw: h}, nil
	}
	n := min(r.bodyLeft, rawChunk-8)
	b := r.grow(8 + int(n))
	copy(b, h)
	if err := r.full(b[8:], fmt.Sprintf("%s record %#x body", l, typ)); err != nil {
		return Token{}, err
	}
	r.bodyLeft -= n
	r.st = stBody
	if r.bodyLeft == 0 {
		r.st = next
	}
	return Token{Kind: TokRaw, Layer: l, Type: typ, Raw: b}, nil
}

func (r *Reader) body() (Token, error) {
	n := min(r.bodyLeft, rawChunk)
	b := r.grow(int(n))
	if err := r.full(b, fmt.Sprintf("%s record %#x body", r.bodyLayer, r.bodyType)); err != nil {
		return Token{}, err
	}
	r.bodyLeft -= n
	if r.bodyLeft == 0 {
		r.st = r.bodyNext
	}
	return Token{Kind: TokRaw, Layer: r.bodyLayer, Type: r.bodyType, Raw: b}, nil
}

func (r *Reader) libxcHeaders() (Token, error) {
	h := make([]byte, libxcIHeaderLen+libxcDHeaderLen)
	if err := r.full(h[:libxcIHeaderLen], "libxc image header"); err != nil {
		return Token{}, err
	}
	if m := be.Uint64(h); m != libxcMarker {
		return Token{}, r.errf(ErrBadMagic, "libxc image marker %#x", m)
	}
	if id := be.Uint32(h[8:]); id != libxcID {
		return Token{}, r.errf(ErrBadMagic, "libxc image id %#x (want %#x \"XENF\")", id, libxcID)
	}
	x := &LibxcHeader{Version: be.Uint32(h[12:])}
	if x.Version != 2 && x.Version != 3 {
		return Token{}, r.errf(ErrUnsupported, "libxc stream version %d (want 2 or 3)", x.Version)
	}
	if o := be.Uint16(h[16:]); o&libxcOptBigEndian != 0 {
		return Token{}, r.errf(ErrUnsupported, "big-endian libxc stream (options %#x)", o)
	}
	d := h[libxcIHeaderLen:]
	if err := r.full(d, "libxc domain header"); err != nil {
		return Token{}, err
	}
	x.DomainType = le.Uint32(d)
	x.PageShift = le.Uint16(d[4:])
	x.XenMajor, x.XenMinor = le.Uint32(d[8:]), le.Uint32(d[12:])
	if x.DomainType < DomainX86PV || x.DomainType > DomainARM {
		return Token{}, r.errf(ErrBadHeader, "libxc domain type %d", x.DomainType)
	}
	if x.PageShift != 12 {
		return Token{}, r.errf(ErrUnsupported, "page shift %d (only 4 KiB pages)", x.PageShift)
	}
	r.libxc = x
	r.libxcHeader = true
	r.st = stLibxcRecord
	return Token{Kind: TokRaw, Layer: LayerLibxc, Type: -1, Raw: h}, nil
}

func (r *Reader) libxcRecord() (Token, error) {
	typ, length, h, err := r.recordHeader(LayerLibxc)
	if err != nil {
		return Token{}, err
	}
	next := stLibxcRecord
	switch typ {
	case RecEnd, RecCheckpoint:
		if length != 0 {
			return Token{}, r.errf(ErrBadRecord, "libxc record %#x with %d-byte body", typ, length)
		}
		next = stLibxlRecord
		if r.top == LayerLibxc {
			next = stTrailer
			if typ == RecCheckpoint {
				next = stLibxcRecord
			}
		}
	case RecPageData:
		if length <= MaxPageRecord {
			return r.pageData(h, length)
		}
	default:
		// Types 0x02..0x12 are defined; others are future records. A
		// restorer decides about unknown mandatory ones; we copy them.
	}
	return r.startBody(LayerLibxc, int64(typ), h, uint64(length), next)
}

func (r *Reader) pageData(h []byte, length uint32) (Token, error) {
	at := r.stats.Bytes - 8
	total := 8 + int(align8(uint64(length)))
	b := r.grow(total)
	copy(b, h)
	if err := r.full(b[8:], "libxc PAGE_DATA body"); err != nil {
		return Token{}, err
	}
	if length < 8 {
		return Token{}, fmt.Errorf("%w: PAGE_DATA at byte %d: body of %d bytes has no count", ErrBadRecord, at, length)
	}
	count := le.Uint32(b[8:])
	if count == 0 {
		return Token{}, fmt.Errorf("%w: PAGE_DATA at byte %d: count 0", ErrBadRecord, at)
	}
	if uint64(length) < 8+8*uint64(count) {
		return Token{}, fmt.Errorf("%w: PAGE_DATA at byte %d: %d pfns do not fit in %d bytes", ErrBadRecord, at, count, length)
	}
	if cap(r.entries) < int(count) {
		r.entries = make([]uint64, count)
	}
	ents := r.entries[:count]
	n := 0
	for i := range ents {
		e := le.Uint64(b[16+8*i:])
		t := PFNType(e)
		if !pageTypeValid(t) {
			return Token{}, fmt.Errorf("%w: PAGE_DATA at byte %d: pfn %#x has unknown type %#x", ErrBadRecord, at, PFN(e), t)
		}
		if pageHasData(t) {
			n++
		}
		ents[i] = e
	}
	if want := 8 + 8*uint64(count) + PageSize*uint64(n); uint64(length) != want {
		return Token{}, fmt.Errorf("%w: PAGE_DATA at byte %d: length %d, want %d for %d pfns with %d pages", ErrBadRecord, at, length, want, count, n)
	}
	r.stats.PageRecords++
	r.stats.PFNs += int64(count)
	r.stats.DataPages += int64(n)
	r.page = PageRecord{Raw: b, Entries: ents, NData: n}
	return Token{Kind: TokPages, Layer: LayerLibxc, Type: RecPageData, Raw: b, Page: &r.page}, nil
}
