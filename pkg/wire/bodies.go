package wire

import (
	"encoding/binary"
	"encoding/json"
	"fmt"
	"math/bits"
)

var le = binary.LittleEndian

// Header flags.
const (
	FlagCompress = 1 << 0 // PAGES records may be zstd-compressed
	FlagDedup    = 1 << 1 // DISK_REFS records may appear
	FlagPostCopy = 1 << 2 // the destination resumes before all pages arrived
	FlagXenMode  = 1 << 3 // stock-libxc behaviour (zero pages sent in full)

	knownHeaderFlags = FlagCompress | FlagDedup | FlagPostCopy | FlagXenMode
)

// MaxConfig bounds the domain configuration carried in a Header.
const MaxConfig = 1 << 20

// Header is the body of a HEADER record: what the destination needs to
// create the receiving domain.
type Header struct {
	Version   uint32 // format version, = Version
	PageShift uint32 // = PageShift (12)
	NumPages  uint64 // guest memory size in pages
	Flags     uint64 // Flag* bits
	Config    []byte // opaque domain configuration
}

const headerFixed = 32

// Marshal appends the encoded header to dst.
func (h *Header) Marshal(dst []byte) []byte {
	dst = le.AppendUint32(dst, h.Version)
	dst = le.AppendUint32(dst, h.PageShift)
	dst = le.AppendUint64(dst, h.NumPages)
	dst = le.AppendUint64(dst, h.Flags)
	dst = le.AppendUint32(dst, uint32(len(h.Config)))
	dst = le.AppendUint32(dst, 0)
	return append(dst, h.Config...)
}

// ParseHeader decodes a HEADER body. Config is a copy (it does not alias b).
func ParseHeader(b []byte) (Header, error) {
	if len(b) < headerFixed {
		return Header{}, fmt.Errorf("header body of %d bytes, need %d: %w", len(b), headerFixed, ErrMalformed)
	}
	h := Header{
		Version:   le.Uint32(b[0:]),
		PageShift: le.Uint32(b[4:]),
		NumPages:  le.Uint64(b[8:]),
		Flags:     le.Uint64(b[16:]),
	}
	clen := le.Uint32(b[24:])
	if res := le.Uint32(b[28:]); res != 0 {
		return Header{}, fmt.Errorf("header reserved field %#x: %w", res, ErrMalformed)
	}
	if h.Version != Version {
		return Header{}, fmt.Errorf("header version %d, this agent speaks %d: %w", h.Version, Version, ErrVersion)
	}
	if h.PageShift != PageShift {
		return Header{}, fmt.Errorf("header page shift %d, only %d is supported: %w", h.PageShift, PageShift, ErrMalformed)
	}
	if h.Flags&^knownHeaderFlags != 0 {
		return Header{}, fmt.Errorf("header flags %#x include unknown bits %#x: %w", h.Flags, h.Flags&^knownHeaderFlags, ErrMalformed)
	}
	if h.NumPages > 1<<(64-PageShift-1) {
		return Header{}, fmt.Errorf("header claims %d pages: %w", h.NumPages, ErrMalformed)
	}
	if clen > MaxConfig || uint64(clen) != uint64(len(b)-headerFixed) {
		return Header{}, fmt.Errorf("header config length %d, body holds %d: %w", clen, len(b)-headerFixed, ErrMalformed)
	}
	if clen > 0 {
		h.Config = append([]byte(nil), b[headerFixed:]...)
	}
	return h, nil
}

// PAGES flags.
const (
	PagesZstd = 1 // page data is one zstd frame

	knownPagesFlags = PagesZstd
)

// PagesPrefix appends the prefix of a PAGES body ({count, flags, pfns}) to
// dst. The page data (len(pfns)*PageSize raw bytes, or a zstd frame) is the
// record's second part: w.Write(TypePages, prefix, data).
func PagesPrefix(dst []byte, pfns []uint64, flags uint32) []byte {
	dst = le.AppendUint32(dst, uint32(len(pfns)))
	dst = le.AppendUint32(dst, flags)
	for _, p := range pfns {
		dst = le.AppendUint64(dst, p)
	}
	return dst
}

// ParsePages decodes a PAGES body. The pfns are appended to pfns[:0]
// (reusing its storage); data is the tail of b (aliases it). Without
// PagesZstd, len(data) must be exactly count*PageSize; with it, data must
// be non-empty and the caller bounds decompression to count*PageSize (see
// DecodePages).
func ParsePages(b []byte, pfns []uint64) (pfnsOut []uint64, flags uint32, data []byte, err error) {
	if len(b) < 8 {
		return pfns[:0], 0, nil, fmt.Errorf("pages body of %d bytes: %w", len(b), ErrMalformed)
	}
	count := le.Uint32(b[0:])
	flags = le.Uint32(b[4:])
	if count == 0 || count > MaxBatchPages {
		return pfns[:0], 0, nil, fmt.Errorf("pages batch of %d pages (1..%d allowed): %w", count, MaxBatchPages, ErrMalformed)
	}
	if flags&^knownPagesFlags != 0 {
		return pfns[:0], 0, nil, fmt.Errorf("pages flags %#x: %w", flags, ErrMalformed)
	}
	prefix := 8 + 8*int(count)
	if len(b) < prefix {
		return pfns[:0], 0, nil, fmt.Errorf("pages body of %d bytes cannot hold %d pfns: %w", len(b), count, ErrMalformed)
	}
	data = b[prefix:]
	if flags&PagesZstd == 0 {
		if len(data) != int(count)*PageSize {
			return pfns[:0], 0, nil, fmt.Errorf("pages batch of %d pages carries %d data bytes, want %d: %w", count, len(data), int(count)*PageSize, ErrMalformed)
		}
	} else if len(data) == 0 {
		return pfns[:0], 0, nil, fmt.Errorf("compressed pages batch of %d pages has no data: %w", count, ErrMalformed)
	}
	pfnsOut = readPFNs(pfns[:0], b[8:prefix])
	return pfnsOut, flags, data, nil
}

func readPFNs(dst []uint64, b []byte) []uint64 {
	for i := 0; i+8 <= len(b); i += 8 {
		dst = append(dst, le.Uint64(b[i:]))
	}
	return dst
}

// MarshalPFNs appends a ZERO_PAGES body to dst.
func MarshalPFNs(dst []byte, pfns []uint64) []byte {
	dst = le.AppendUint32(dst, uint32(len(pfns)))
	dst = le.AppendUint32(dst, 0)
	for _, p := range pfns {
		dst = le.AppendUint64(dst, p)
	}
	return dst
}

// ParsePFNs decodes a ZERO_PAGES body, appending the pfns to pfns[:0].
func ParsePFNs(b []byte, pfns []uint64) ([]uint64, error) {
	if len(b) < 8 {
		return pfns[:0], fmt.Errorf("pfn list body of %d bytes: %w", len(b), ErrMalformed)
	}
	count := le.Uint32(b[0:])
	if res := le.Uint32(b[4:]); res != 0 {
		return pfns[:0], fmt.Errorf("pfn list reserved field %#x: %w", res, ErrMalformed)
	}
	if count > MaxBatchPages {
		return pfns[:0], fmt.Errorf("pfn list of %d entries (max %d): %w", count, MaxBatchPages, ErrMalformed)
	}
	if uint64(len(b)-8) != 8*uint64(count) {
		return pfns[:0], fmt.Errorf("pfn list of %d entries in a %d-byte body: %w", count, len(b), ErrMalformed)
	}
	return readPFNs(pfns[:0], b[8:]), nil
}

// DiskRef says that a page equals a block of one of the domain's disks:
// the destination reads PageSize bytes at Offset of disk Disk and checks
// them against Hash.
type DiskRef struct {
	PFN    uint64
	Disk   uint32
	Offset uint64
	Hash   [16]byte
}

const diskRefSize = 40

// MarshalDiskRefs appends a DISK_REFS body to dst.
func MarshalDiskRefs(dst []byte, refs []DiskRef) []byte {
	dst = le.AppendUint32(dst, uint32(len(refs)))
	dst = le.AppendUint32(dst, 0)
	for i := range refs {
		r := &refs[i]
		dst = le.AppendUint64(dst, r.PFN)
		dst = le.AppendUint32(dst, r.Disk)
		dst = le.AppendUint32(dst, 0)
		dst = le.AppendUint64(dst, r.Offset)
		dst = append(dst, r.Hash[:]...)
	}
	return dst
}

// ParseDiskRefs decodes a DISK_REFS body, appending to refs[:0].
func ParseDiskRefs(b []byte, refs []DiskRef) ([]DiskRef, error) {
	refs = refs[:0]
	if len(b) < 8 {
		return refs, fmt.Errorf("disk refs body of %d bytes: %w", len(b), ErrMalformed)
	}
	count := le.Uint32(b[0:])
	if res := le.Uint32(b[4:]); res != 0 {
		return refs, fmt.Errorf("disk refs reserved field %#x: %w", res, ErrMalformed)
	}
	if count > MaxBatchPages {
		return refs, fmt.Errorf("%d disk refs in one record (max %d): %w", count, MaxBatchPages, ErrMalformed)
	}
	if uint64(len(b)-8) != diskRefSize*uint64(count) {
		return refs, fmt.Errorf("%d disk refs in a %d-byte body: %w", count, len(b), ErrMalformed)
	}
	for e := b[8:]; len(e) >= diskRefSize; e = e[diskRefSize:] {
		if res := le.Uint32(e[12:]); res != 0 {
			return refs[:0], fmt.Errorf("disk ref %d reserved field %#x: %w", len(refs), res, ErrMalformed)
		}
		r := DiskRef{PFN: le.Uint64(e[0:]), Disk: le.Uint32(e[8:]), Offset: le.Uint64(e[16:])}
		copy(r.Hash[:], e[24:40])
		refs = append(refs, r)
	}
	return refs, nil
}

// MaxManifestHashes is the most hashes one MANIFEST record may carry.
const MaxManifestHashes = 1 << 16

// ManifestRange returns the pfn range a MANIFEST body covers without
// decoding (or allocating for) its hashes, so that a receiver can check
// the range first. ParseManifestInto checks the rest.
func ManifestRange(b []byte) (first uint64, count uint32, err error) {
	if len(b) < 16 {
		return 0, 0, fmt.Errorf("manifest body of %d bytes: %w", len(b), ErrMalformed)
	}
	first, count = le.Uint64(b[0:]), le.Uint32(b[8:])
	if count > MaxManifestHashes {
		return 0, 0, fmt.Errorf("manifest of %d hashes (max %d): %w", count, MaxManifestHashes, ErrMalformed)
	}
	return first, count, nil
}

// MarshalManifest appends a MANIFEST body (hashes of pages first,
// first+1, ...) to dst.
func MarshalManifest(dst []byte, first uint64, hashes [][16]byte) []byte {
	dst = le.AppendUint64(dst, first)
	dst = le.AppendUint32(dst, uint32(len(hashes)))
	dst = le.AppendUint32(dst, 0)
	for i := range hashes {
		dst = append(dst, hashes[i][:]...)
	}
	return dst
}

// ParseManifest decodes a MANIFEST body into a new slice.
func ParseManifest(b []byte) (first uint64, hashes [][16]byte, err error) {
	return ParseManifestInto(b, nil)
}

// ParseManifestInto decodes a MANIFEST body, copying the hashes into
// hashes[:0] (reusing its storage).
func ParseManifestInto(b []byte, hashes [][16]byte) (first uint64, out [][16]byte, err error) {
	out = hashes[:0]
	if len(b) < 16 {
		return 0, out, fmt.Errorf("manifest body of %d bytes: %w", len(b), ErrMalformed)
	}
	first = le.Uint64(b[0:])
	count := le.Uint32(b[8:])
	if res := le.Uint32(b[12:]); res != 0 {
		return 0, out, fmt.Errorf("manifest reserved field %#x: %w", res, ErrMalformed)
	}
	if count > MaxManifestHashes {
		return 0, out, fmt.Errorf("manifest of %d hashes (max %d): %w", count, MaxManifestHashes, ErrMalformed)
	}
	if uint64(len(b)-16) != 16*uint64(count) {
		return 0, out, fmt.Errorf("manifest of %d hashes in a %d-byte body: %w", count, len(b), ErrMalformed)
	}
	if _, carry := bits.Add64(first, uint64(count), 0); carry != 0 {
		return 0, out, fmt.Errorf("manifest pfn range %d+%d overflows: %w", first, count, ErrMalformed)
	}
	if cap(out) < int(count) {
		out = make([][16]byte, 0, count)
	}
	for e := b[16:]; len(e) >= 16; e = e[16:] {
		out = append(out, [16]byte(e[:16]))
	}
	return first, out, nil
}

// REQUEST reasons.
const (
	ReasonFallback = 1 // a disk reference failed verification; send the page
	ReasonDemand   = 2 // the resumed guest faulted on the page
	ReasonRecover  = 3 // re-request after a reconnect
)

// MarshalRequest appends a REQUEST body to dst.
func MarshalRequest(dst []byte, reason uint32, pfns []uint64) []byte {
	dst = le.AppendUint32(dst, reason)
	dst = le.AppendUint32(dst, uint32(len(pfns)))
	for _, p := range pfns {
		dst = le.AppendUint64(dst, p)
	}
	return dst
}

// ParseRequest decodes a REQUEST body, appending the pfns to pfns[:0].
func ParseRequest(b []byte, pfns []uint64) (reason uint32, out []uint64, err error) {
	out = pfns[:0]
	if len(b) < 8 {
		return 0, out, fmt.Errorf("request body of %d bytes: %w", len(b), ErrMalformed)
	}
	reason = le.Uint32(b[0:])
	count := le.Uint32(b[4:])
	if reason < ReasonFallback || reason > ReasonRecover {
		return 0, out, fmt.Errorf("request reason %d: %w", reason, ErrMalformed)
	}
	if count > MaxBatchPages {
		return 0, out, fmt.Errorf("request of %d pfns (max %d): %w", count, MaxBatchPages, ErrMalformed)
	}
	if uint64(len(b)-8) != 8*uint64(count) {
		return 0, out, fmt.Errorf("request of %d pfns in a %d-byte body: %w", count, len(b), ErrMalformed)
	}
	return reason, readPFNs(out, b[8:]), nil
}

// MarshalBitmap appends a BITMAP body to dst: bit i of words (word i/64,
// bit i%64) stands for pfn first+i, for i < nbits. ceil(nbits/64) words
// are written: bits past nbits, and words past len(words), as zero.
func MarshalBitmap(dst []byte, first uint64, nbits uint64, words []uint64) []byte {
	dst = le.AppendUint64(dst, first)
	dst = le.AppendUint64(dst, nbits)
	nw := bitmapWords(nbits)
	for i := uint64(0); i < nw; i++ {
		var w uint64
		if i < uint64(len(words)) {
			w = words[i]
		}
		if i == nw-1 && nbits%64 != 0 {
			w &= 1<<(nbits%64) - 1
		}
		dst = le.AppendUint64(dst, w)
	}
	return dst
}

// BitmapSize is the size of a BITMAP body of nbits bits, so that a
// receiver that knows nbits can check a body before parsing it.
func BitmapSize(nbits uint64) int { return 16 + 8*int(bitmapWords(nbits)) }

func bitmapWords(nbits uint64) uint64 {
	n := nbits / 64
	if nbits%64 != 0 {
		n++
	}
	return n
}

// ParseBitmap decodes a BITMAP body into a new slice.
func ParseBitmap(b []byte) (first, nbits uint64, words []uint64, err error) {
	return ParseBitmapInto(b, nil)
}

// ParseBitmapInto decodes a BITMAP body, appending the words to words[:0].
func ParseBitmapInto(b []byte, words []uint64) (first, nbits uint64, out []uint64, err error) {
	out = words[:0]
	if len(b) < 16 {
		return 0, 0, out, fmt.Errorf("bitmap body of %d bytes: %w", len(b), ErrMalformed)
	}
	first = le.Uint64(b[0:])
	nbits = le.Uint64(b[8:])
	nw := bitmapWords(nbits)
	if uint64(len(b)-16)/8 != nw || (len(b)-16)%8 != 0 {
		return 0, 0, out, fmt.Errorf("bitmap of %d bits in a %d-byte body: %w", nbits, len(b), ErrMalformed)
	}
	if _, carry := bits.Add64(first, nbits, 0); carry != 0 {
		return 0, 0, out, fmt.Errorf("bitmap pfn range %d+%d overflows: %w", first, nbits, ErrMalformed)
	}
	if nw > 0 && nbits%64 != 0 {
		if last := le.Uint64(b[len(b)-8:]); last>>(nbits%64) != 0 {
			return 0, 0, out, fmt.Errorf("bitmap has bits set past its %d bits: %w", nbits, ErrMalformed)
		}
	}
	if uint64(cap(out)) < nw {
		out = make([]uint64, 0, nw)
	}
	return first, nbits, readPFNs(out, b[16:]), nil
}

// Control is a low-rate control or handshake message (JSON body of a
// CONTROL record). Kind says what it is; the other fields are used as the
// kind needs them.
type Control struct {
	Kind        string          `json:"kind"`
	MigrationID string          `json:"migrationID,omitempty"`
	Token       []byte          `json:"token,omitempty"`
	Stream      int             `json:"stream,omitempty"`
	Streams     int             `json:"streams,omitempty"`
	Message     string          `json:"message,omitempty"`
	Data        json.RawMessage `json:"data,omitempty"`
}

// MaxControl bounds a CONTROL body.
const MaxControl = 1 << 20

// MarshalControl appends the JSON encoding of c to dst.
func MarshalControl(dst []byte, c *Control) ([]byte, error) {
	if c == nil || c.Kind == "" {
		return dst, fmt.Errorf("marshal control message: empty kind: %w", ErrMalformed)
	}
	j, err := json.Marshal(c)
	if err != nil {
		return dst, fmt.Errorf("marshal control message %q: %w", c.Kind, err)
	}
	if len(j) > MaxControl {
		return dst, fmt.Errorf("control message %q of %d bytes (max %d): %w", c.Kind, len(j), MaxControl, ErrTooLong)
	}
	return append(dst, j...), nil
}

// ParseControl decodes a CONTROL body. The result does not alias b.
func ParseControl(b []byte) (Control, error) {
	if len(b) > MaxControl {
		return Control{}, fmt.Errorf("control message of %d bytes (max %d): %w", len(b), MaxControl, ErrTooLong)
	}
	var c Control
	if err := json.Unmarshal(b, &c); err != nil {
		return Control{}, fmt.Errorf("control message: %w: %w", ErrMalformed, err)
	}
	if c.Kind == "" {
		return Control{}, fmt.Errorf("control message without kind: %w", ErrMalformed)
	}
	return c, nil
}
