package wire

import (
	"errors"
	"fmt"
	"hash/crc32"
)

// Version is the stream format version written in the stream header and
// expected in the HEADER record.
const Version = 1

// MaxBody is the largest record body accepted: a full PAGES batch
// (MaxBatchPages pages of 4 KiB plus its pfn list) with room to spare.
const MaxBody = 8<<20 + 64<<10

// MaxBatchPages is the most pages one PAGES record may carry.
const MaxBatchPages = 1024

// PageShift and PageSize describe the only page size the format carries.
const (
	PageShift = 12
	PageSize  = 1 << PageShift
)

// Sizes of the fixed framing parts.
const (
	StreamHeaderSize = 16
	RecordHeaderSize = 16
	// Align is the record alignment; bodies are zero-padded to it.
	Align = 8
)

// magic opens every stream.
var magic = [8]byte{'X', 'F', 'E', 'R', 'R', 'Y', '\r', '\n'}

// Type identifies a record. Bit 31 (Optional) marks records that a reader
// which does not know them may skip.
type Type uint32

// Optional is the type bit that makes an unknown record skippable.
const Optional Type = 1 << 31

// Record types.
const (
	TypeHeader    Type = 1             // Header
	TypePages     Type = 2             // page batch: prefix + page data
	TypeZeroPages Type = 3             // pfn list
	TypeDiskRefs  Type = 4             // []DiskRef
	TypeState     Type = 5             // opaque vCPU/device state
	TypeManifest  Type = 6             // Manifest chunk
	TypeControl   Type = 7             // Control (JSON body): low-rate control/handshake messages
	TypeEnd       Type = 8             // empty body
	TypeRequest   Type = 9             // Request: pages the destination asks for
	TypeBitmap    Type = 10            // Bitmap chunk
	TypeRoundEnd  Type = 11 | Optional // JSON body with round statistics
)

var typeNames = [...]string{
	TypeHeader:    "Header",
	TypePages:     "Pages",
	TypeZeroPages: "ZeroPages",
	TypeDiskRefs:  "DiskRefs",
	TypeState:     "State",
	TypeManifest:  "Manifest",
	TypeControl:   "Control",
	TypeEnd:       "End",
	TypeRequest:   "Request",
	TypeBitmap:    "Bitmap",
}

// Known reports whether this package knows the record type.
func (t Type) Known() bool {
	if t == TypeRoundEnd {
		return true
	}
	return t >= TypeHeader && t <= TypeBitmap
}

// IsOptional reports whether the Optional bit is set.
func (t Type) IsOptional() bool { return t&Optional != 0 }

// String names the type, e.g. "Pages" or "Unknown(0x80000020)".
func (t Type) String() string {
	if t == TypeRoundEnd {
		return "RoundEnd"
	}
	if t.Known() {
		return typeNames[t]
	}
	return fmt.Sprintf("Unknown(%#x)", uint32(t))
}

// Sentinel errors. Decoding errors wrap one of these with context (record
// type, stream offset); test with errors.Is.
var (
	ErrBadMagic         = errors.New("wire: bad stream magic (not a xenferry migration stream)")
	ErrVersion          = errors.New("wire: unsupported stream version")
	ErrTooLong          = errors.New("wire: record body longer than MaxBody")
	ErrChecksum         = errors.New("wire: record checksum mismatch")
	ErrUnknownMandatory = errors.New("wire: unknown mandatory record type")
	ErrPadding          = errors.New("wire: non-zero record padding")
	ErrMalformed        = errors.New("wire: malformed record")
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// headerCRC starts the record checksum: CRC-32C over type and bodyLen (8
// bytes, little-endian). It is computed bytewise from the table so no
// scratch buffer escapes to the heap; crc32.Update continues it.
func headerCRC(t Type, bodyLen uint32) uint32 {
	v := uint64(t) | uint64(bodyLen)<<32
	crc := ^uint32(0)
	for i := 0; i < 8; i++ {
		crc = castagnoli[byte(crc)^byte(v>>(8*i))] ^ crc>>8
	}
	return ^crc
}

// padLen is the number of zero bytes that follow a body of n bytes.
func padLen(n int) int { return (Align - n%Align) % Align }

var zeroPad [Align]byte
