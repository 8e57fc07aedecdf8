package wire

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"io"
)

// WriterBufferSize is the size of the Writer's own buffer.
const WriterBufferSize = 256 << 10

// Writer encodes records onto an io.Writer. It buffers (WriterBufferSize);
// call Flush to push buffered records out. A Writer is not safe for
// concurrent use. After a write error every later call returns that error.
type Writer struct {
	bw  *bufio.Writer
	n   int64
	hdr [RecordHeaderSize]byte
	err error
}

// NewWriter returns a Writer that buffers onto w.
func NewWriter(w io.Writer) *Writer {
	return &Writer{bw: bufio.NewWriterSize(w, WriterBufferSize)}
}

// Reset discards any buffered data and the byte count and makes the Writer
// write to w, reusing its buffer.
func (w *Writer) Reset(dst io.Writer) {
	w.bw.Reset(dst)
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
// parts. The parts are checksummed in place and handed to the buffered
// writer as they are (a part larger than the free buffer space goes
// straight to the underlying writer), so callers need not assemble a body.
// A body longer than MaxBody is refused with ErrTooLong and nothing is
// written.
func (w *Writer) Write(t Type, parts ...[]byte) error {
	if w.err != nil {
		return w.err
	}
	total := 0
	for _, p := range parts {
		total += len(p)
		if total > MaxBody {
			break
		}
	}
	if total > MaxBody {
		return fmt.Errorf("write %s record of more than %d bytes: %w", t, MaxBody, ErrTooLong)
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

func (w *Writer) write(p []byte) error {
	if len(p) == 0 {
		return nil
	}
	n, err := w.bw.Write(p)
	w.n += int64(n)
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
	if err := w.bw.Flush(); err != nil {
		w.err = fmt.Errorf("wire: flush stream at offset %d: %w", w.n, err)
		return w.err
	}
	return nil
}

// Bytes returns the number of stream bytes accepted so far, framing
// included (buffered bytes count; Flush to put them on the wire).
func (w *Writer) Bytes() int64 { return w.n }

// Buffered returns the number of bytes waiting in the buffer.
func (w *Writer) Buffered() int { return w.bw.Buffered() }

// RecordSize returns the number of stream bytes a record with a body of
// bodyLen bytes occupies: header, body and padding.
func RecordSize(bodyLen int) int64 {
	return int64(RecordHeaderSize + bodyLen + padLen(bodyLen))
}
