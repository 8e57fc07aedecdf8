package wire

import (
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
	"net"
)

// WriterBufferSize is the size of the Writer's own buffer.
const WriterBufferSize = 256 << 10

// writeThrough is the part size from which Write stops copying a part into
// its buffer: such parts go to the underlying writer as they are, together
// with what is buffered in one vectored write (writev on a net.Conn).
const writeThrough = 32 << 10

// Writer encodes records onto an io.Writer. It buffers small records
// (WriterBufferSize) and writes large parts through without copying them;
// call Flush to push buffered records out. A Writer is not safe for
// concurrent use. After a write error every later call returns that error.
type Writer struct {
	dst  io.Writer
	buf  []byte // len(buf) bytes are buffered; cap is WriterBufferSize
	n    int64
	err  error
	vec  [2][]byte
	bufs net.Buffers
	hdr  [RecordHeaderSize]byte // scratch, kept here so it never escapes per call
}

// NewWriter returns a Writer that buffers onto w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{dst: w, buf: make([]byte, 0, WriterBufferSize)}
}

// Reset discards any buffered data, the byte count and a sticky error, and
// makes the Writer write to dst, reusing its buffer.
func (w *Writer) Reset(dst io.Writer) {
	w.dst = dst
	w.buf = w.buf[:0]
	w.n = 0
	w.err = nil
}

// WriteStreamHeader writes the 16-byte stream header. Call it once, first.
func (w *Writer) WriteStreamHeader() error {
	if w.err != nil {
		return w.err
	}
	var h [StreamHeaderSize]byte
	copy(h[:8], magic[:])
	binary.LittleEndian.PutUint32(h[8:], Version)
	binary.LittleEndian.PutUint32(h[12:], 0)
	return w.write(h[:])
}

// Write writes one record of type t whose body is the concatenation of
// parts. The parts are checksummed in place; small ones are copied into the
// buffer, large ones (>= 32 KiB) are written through to the underlying
// writer, so callers need not assemble a body. A body longer than MaxBody
// is refused with ErrTooLong and nothing is written.
func (w *Writer) Write(t Type, parts ...[]byte) error {
	if w.err != nil {
		return w.err
	}
	total := 0
	for _, p := range parts {
		total += len(p)
		if total > MaxBody {
			return fmt.Errorf("write %s record of more than %d bytes: %w", t, MaxBody, ErrTooLong)
		}
	}
	crc := headerCRC(t, uint32(total))
	for _, p := range parts {
		crc = crc32.Update(crc, castagnoli, p)
	}
	binary.LittleEndian.PutUint32(w.hdr[0:], uint32(t))
	binary.LittleEndian.PutUint32(w.hdr[4:], uint32(total))
	binary.LittleEndian.PutUint32(w.hdr[8:], crc)
	binary.LittleEndian.PutUint32(w.hdr[12:], 0)
	if err := w.write(w.hdr[:]); err != nil {
		return err
	}
	for _, p := range parts {
		if err := w.write(p); err != nil {
			return err
		}
	}
	return w.write(zeroPad[:padLen(total)])
}

// write appends p to the buffer, or writes the buffer and p through.
func (w *Writer) write(p []byte) error {
	if len(p) <= cap(w.buf)-len(w.buf) {
		w.buf = append(w.buf, p...)
		w.n += int64(len(p))
		return nil
	}
	if len(p) < writeThrough {
		if err := w.flush(); err != nil {
			return err
		}
		w.buf = append(w.buf, p...)
		w.n += int64(len(p))
		return nil
	}
	// One vectored write of the buffered bytes and p; net.Buffers turns it
	// into writev on connections and into two Writes elsewhere.
	w.vec[0], w.vec[1] = w.buf, p
	w.bufs = w.vec[:]
	if len(w.buf) == 0 {
		w.bufs = w.vec[1:]
	}
	_, err := w.bufs.WriteTo(w.dst)
	w.vec[0], w.vec[1] = nil, nil
	w.buf = w.buf[:0]
	if err != nil {
		w.err = fmt.Errorf("wire: write stream at offset %d: %w", w.n, err)
		return w.err
	}
	w.n += int64(len(p))
	return nil
}

func (w *Writer) flush() error {
	if len(w.buf) == 0 {
		return nil
	}
	m, err := w.dst.Write(w.buf)
	if err == nil && m < len(w.buf) {
		err = io.ErrShortWrite
	}
	w.buf = w.buf[:0]
	if err != nil {
		w.err = fmt.Errorf("wire: write stream at offset %d: %w", w.n, err)
		return w.err
	}
	return nil
}

// Flush writes any buffered data to the underlying writer.
func (w *Writer) Flush() error {
	if w.err != nil {
		return w.err
	}
	return w.flush()
}

// Bytes returns the number of stream bytes accepted so far, framing
// included (buffered bytes count; Flush to put them on the wire).
func (w *Writer) Bytes() int64 { return w.n }

// Buffered returns the number of bytes waiting in the buffer.
func (w *Writer) Buffered() int { return len(w.buf) }

// RecordSize returns the number of stream bytes a record with a body of
// bodyLen bytes occupies: header, body and padding.
func RecordSize(bodyLen int) int64 {
	return int64(RecordHeaderSize + bodyLen + padLen(bodyLen))
}
