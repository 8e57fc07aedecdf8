package xlstream

import (
	"errors"
	"fmt"
)

// PageSize is the size of a guest page in a stream we rewrite (x86).
const PageSize = 4096

// Layer says which level of the stream a token belongs to.
type Layer uint8

const (
	LayerXL      Layer = iota + 1 // xl save header and its optional data
	LayerLibxl                    // libxl header and records
	LayerLibxc                    // libxc headers and records
	LayerTrailer                  // bytes after libxl's END (xl handshake)
)

func (l Layer) String() string {
	switch l {
	case LayerXL:
		return "xl"
	case LayerLibxl:
		return "libxl"
	case LayerLibxc:
		return "libxc"
	case LayerTrailer:
		return "trailer"
	}
	return fmt.Sprintf("layer(%d)", uint8(l))
}

// xl save header.
const (
	xlMagic          = "Xen saved domain, xl format\n \x00 \r"
	xlHeaderLen      = 48
	xlByteOrder      = 0x01020304
	XLFlagJSON       = 1 << 0 // optional data holds the domain config as JSON
	XLFlagStreamV2   = 1 << 1 // a libxl v2 stream follows
	xlKnownMandatory = XLFlagJSON | XLFlagStreamV2
	// MaxXLOptionalData bounds the xl header's optional data (the domain
	// configuration, a few KiB in practice).
	MaxXLOptionalData = 16 << 20
)

// libxl stream.
const (
	libxlIdent      = 0x4c6962786c466d74 // "LibxlFmt"
	libxlHeaderLen  = 16
	libxlOptBigEnd  = 1 << 0
	LibxlEnd        = 0
	LibxlLibxcCtx   = 1
	LibxlEmuXSData  = 2
	LibxlEmuContext = 3
	LibxlCheckpoint = 4
)

// libxc stream.
const (
	libxcMarker       = 0xFFFFFFFFFFFFFFFF
	libxcID           = 0x58454E46 // "XENF"
	libxcIHeaderLen   = 24
	libxcDHeaderLen   = 16
	libxcOptBigEndian = 1 << 0

	RecEnd        = 0x00
	RecPageData   = 0x01
	RecCheckpoint = 0x0e

	// RecOptional marks records a restorer may ignore (both layers).
	RecOptional = 0x80000000
	// MaxRecordLength is libxc's REC_LENGTH_MAX; longer records are invalid.
	MaxRecordLength = 128 << 20

	recAlign = 8
)

// Domain types of the libxc domain header.
const (
	DomainX86PV  = 1
	DomainX86HVM = 2
	DomainX86PVH = 3
	DomainARM    = 4
)

// Page types (bits 60-63 of a PAGE_DATA pfn entry).
const (
	pfnTypeShift = 60
	pfnMask      = 1<<52 - 1
	PageBroken   = 0xd
	PageXAlloc   = 0xe
	PageXTab     = 0xf
)

// PFNType returns the type bits of a PAGE_DATA pfn entry.
func PFNType(e uint64) uint8 { return uint8(e >> pfnTypeShift) }

// PFN returns the frame number of a PAGE_DATA pfn entry.
func PFN(e uint64) uint64 { return e & pfnMask }

// pageTypeValid reports whether t is a defined XEN_DOMCTL_PFINFO type.
func pageTypeValid(t uint8) bool { return t <= 4 || t >= 9 }

// pageHasData reports whether a pfn of type t carries page contents.
func pageHasData(t uint8) bool { return t != PageBroken && t != PageXAlloc && t != PageXTab }

// Errors. Every error the package returns wraps one of these and says where
// in the stream (byte offset, layer, record) it happened.
var (
	ErrBadMagic       = errors.New("xlstream: not an xl/libxl/libxc migration stream")
	ErrUnsupported    = errors.New("xlstream: unsupported stream feature")
	ErrBadHeader      = errors.New("xlstream: invalid header")
	ErrBadRecord      = errors.New("xlstream: invalid record")
	ErrRecordTooLong  = errors.New("xlstream: record longer than the limit")
	ErrTruncated      = errors.New("xlstream: stream truncated")
	ErrBadFrame       = errors.New("xlstream: invalid transport frame")
	ErrChecksum       = errors.New("xlstream: rebuilt record does not match the source's checksum")
	ErrFallbackFailed = errors.New("xlstream: page fallback from the source failed")
	// ErrCommandEnded: the receiving command (xl migrate-receive) closed
	// its output before the stream's end, i.e. it failed.
	ErrCommandEnded = errors.New("xlstream: the receiving command ended before the stream did")
)

func align8(n uint64) uint64 { return (n + recAlign - 1) &^ (recAlign - 1) }
