package xlstream

import (
	"encoding/binary"
	"fmt"
	"io"
	"strings"
)

// Frame kinds, source to destination.
const (
	FrameRaw      = 1 // verbatim bytes of the stream
	FramePages    = 2 // a rewritten PAGE_DATA record
	FrameFallback = 3 // {seq u64, page}: answer to a NEED
	FrameEnd      = 4 // the source's input ended
	// FramePagesZ is a PAGES frame whose payload (the REFs and DATA pages
	// after the kinds) is one zstd frame. The source sends it only to a
	// destination that publishes the zstd capability.
	FramePagesZ = 5
)

// Frame kinds, destination to source.
const (
	FrameBack = 16 // bytes from the destination's xl to the source's xl
	FrameNeed = 17 // {seq u64}: a REF failed verification, send the page
	FrameAck  = 18 // {seq u64}: every REF below seq is resolved
	FrameExit = 19 // {status i32}: the destination's command exited
)

// Page kinds in a FramePages frame.
const (
	KindData = 0
	KindZero = 1
	KindRef  = 2
)

const (
	frameHeaderLen = 5
	refLen         = 25
	// MaxFrame bounds a frame body: a PAGE_DATA record of MaxPageRecord
	// bytes plus kinds and checksum.
	MaxFrame = MaxPageRecord + MaxPageRecord/PageSize + 64
)

// Ref names a page-sized block of a shared disk: Disk is an index into
// the disks both sides agreed on, Offset a byte offset, Hash the page's
// content hash (as the PageIndex computed it).
type Ref struct {
	Disk   uint8
	Offset uint64
	Hash   [16]byte
}

func putRef(b []byte, r Ref) {
	b[0] = r.Disk
	binary.LittleEndian.PutUint64(b[1:], r.Offset)
	copy(b[9:25], r.Hash[:])
}

func getRef(b []byte) (r Ref) {
	r.Disk = b[0]
	r.Offset = binary.LittleEndian.Uint64(b[1:])
	copy(r.Hash[:], b[9:25])
	return r
}

// writeFrame writes one frame header and body parts.
func writeFrame(w io.Writer, kind byte, parts ...[]byte) (int, error) {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n > MaxFrame {
		return 0, fmt.Errorf("%w: frame kind %d of %d bytes (limit %d)", ErrBadFrame, kind, n, MaxFrame)
	}
	var h [frameHeaderLen]byte
	h[0] = kind
	binary.LittleEndian.PutUint32(h[1:], uint32(n))
	total, err := w.Write(h[:])
	if err != nil {
		return total, err
	}
	for _, p := range parts {
		m, err := w.Write(p)
		total += m
		if err != nil {
			return total, err
		}
	}
	return total, nil
}

// readFrame reads one frame into buf (grown as needed) and returns its
// kind and body. io.EOF only before a frame's first byte.
func readFrame(r io.Reader, buf []byte) (byte, []byte, error) {
	var h [frameHeaderLen]byte
	if _, err := io.ReadFull(r, h[:]); err != nil {
		if err == io.ErrUnexpectedEOF {
			return 0, nil, fmt.Errorf("%w: frame header cut short", ErrTruncated)
		}
		return 0, nil, err
	}
	n := binary.LittleEndian.Uint32(h[1:])
	if n > MaxFrame {
		return 0, nil, fmt.Errorf("%w: frame kind %d of %d bytes (limit %d)", ErrBadFrame, h[0], n, MaxFrame)
	}
	if cap(buf) < int(n) {
		buf = make([]byte, n)
	}
	buf = buf[:n]
	if _, err := io.ReadFull(r, buf); err != nil {
		return 0, nil, fmt.Errorf("%w: frame kind %d body: got less than %d bytes: %v", ErrTruncated, h[0], n, err)
	}
	return h[0], buf, nil
}

// FrameHello opens a session: {version u32, argv NUL-separated}: the
// command the source's xl asked to run at the destination.
const FrameHello = 32

// HelloVersion is the session protocol version.
const HelloVersion = 1

// maxHello bounds a hello frame.
const maxHello = 64 << 10

// WriteHello sends the session's hello frame.
func WriteHello(w io.Writer, argv []string) error {
	var b []byte
	b = binary.LittleEndian.AppendUint32(b, HelloVersion)
	for _, a := range argv {
		if strings.IndexByte(a, 0) >= 0 {
			return fmt.Errorf("%w: hello argument %q has a NUL byte", ErrBadFrame, a)
		}
		b = append(append(b, a...), 0)
	}
	if len(b) > maxHello {
		return fmt.Errorf("%w: hello of %d bytes (limit %d)", ErrBadFrame, len(b), maxHello)
	}
	_, err := writeFrame(w, FrameHello, b)
	return err
}

// ReadHello reads the session's hello frame and returns argv.
func ReadHello(r io.Reader) ([]string, error) {
	kind, b, err := readFrame(io.LimitReader(r, frameHeaderLen+maxHello), nil)
	if err != nil {
		return nil, fmt.Errorf("read hello: %w", err)
	}
	if kind != FrameHello || len(b) < 4 {
		return nil, fmt.Errorf("%w: expected a hello frame, got kind %d of %d bytes", ErrBadFrame, kind, len(b))
	}
	if v := binary.LittleEndian.Uint32(b); v != HelloVersion {
		return nil, fmt.Errorf("%w: session protocol version %d (this agent speaks %d)", ErrUnsupported, v, HelloVersion)
	}
	s := string(b[4:])
	if s == "" {
		return nil, nil
	}
	if !strings.HasSuffix(s, "\x00") {
		return nil, fmt.Errorf("%w: hello arguments not NUL-terminated", ErrBadFrame)
	}
	return strings.Split(strings.TrimSuffix(s, "\x00"), "\x00"), nil
}
