package wire

import (
	"bufio"
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
)

// ReaderBufferSize is the size of the Reader's read-ahead buffer.
const ReaderBufferSize = 256 << 10

// minBodyCap is the body buffer's first allocation; it then doubles as
// data actually arrives, up to MaxBody.
const minBodyCap = 64 << 10

// Record is one decoded record. Body aliases the Reader's buffer and is
// valid until the next call to Next.
type Record struct {
	Type Type
	Body []byte
}

// Reader decodes records from an io.Reader. Its body buffer is reused and
// grows with the data that actually arrives (never past MaxBody), so a
// forged length costs no more memory than the bytes behind it. A Reader is
// not safe for concurrent use. After an error, further calls return it.
type Reader struct {
	br      *bufio.Reader
	n       int64
	maxBody uint32 // 0: MaxBody
	body    []byte
	hdr     [RecordHeaderSize]byte // scratch; fields keep them off the per-call heap
	pad     [Align]byte
	err     error
}

// NewReader returns a buffered Reader on r.
func NewReader(r io.Reader) *Reader {
	return &Reader{br: bufio.NewReaderSize(r, ReaderBufferSize)}
}

// SetMaxBody lowers the longest body Next accepts (0 or more than
// MaxBody: MaxBody), e.g. while a connection is not authorised yet.
func (r *Reader) SetMaxBody(n uint32) {
	if n > MaxBody {
		n = 0
	}
	r.maxBody = n
}

// Reset makes the Reader read from src, keeping its buffers.
func (r *Reader) Reset(src io.Reader) {
	r.br.Reset(src)
	r.n = 0
	r.err = nil
}

// Bytes returns the number of stream bytes consumed so far.
func (r *Reader) Bytes() int64 { return r.n }

// ReadStreamHeader reads and checks the 16-byte stream header.
func (r *Reader) ReadStreamHeader() error {
	if r.err != nil {
		return r.err
	}
	h := r.hdr[:StreamHeaderSize]
	n, err := io.ReadFull(r.br, h)
	r.n += int64(n)
	if err != nil {
		if errors.Is(err, io.EOF) {
			err = io.ErrUnexpectedEOF
		}
		return r.fail(fmt.Errorf("wire: read stream header (%d of %d bytes): %w", n, StreamHeaderSize, err))
	}
	if [8]byte(h[:8]) != magic {
		return r.fail(fmt.Errorf("stream header %q: %w", bytes.Clone(h[:8]), ErrBadMagic))
	}
	if v := binary.LittleEndian.Uint32(h[8:]); v != Version {
		return r.fail(fmt.Errorf("stream version %d, this reader speaks %d: %w", v, Version, ErrVersion))
	}
	if f := binary.LittleEndian.Uint32(h[12:]); f != 0 {
		return r.fail(fmt.Errorf("stream header flags %#x (none defined): %w", f, ErrMalformed))
	}
	return nil
}

// Next returns the next record. It checks length, checksum, reserved field
// and padding, skips unknown optional records and rejects unknown mandatory
// ones. At a clean end of input exactly at a record boundary it returns
// io.EOF; input that ends inside a record yields a wrapped
// io.ErrUnexpectedEOF. An error that leaves the stream between records
// (io.EOF, or a read deadline before the first header byte) is returned
// without poisoning the Reader, so Next may be called again; any other
// error is sticky.
func (r *Reader) Next() (Record, error) {
	for {
		if r.err != nil {
			return Record{}, r.err
		}
		off := r.n
		n, err := io.ReadFull(r.br, r.hdr[:])
		r.n += int64(n)
		if err != nil {
			if n == 0 {
				// Nothing of the record was consumed: a clean end (io.EOF)
				// or, say, a read deadline at a record boundary. Not
				// sticky, so the caller may retry.
				if errors.Is(err, io.EOF) {
					return Record{}, io.EOF
				}
				return Record{}, fmt.Errorf("wire: read record header at offset %d: %w", off, err)
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Record{}, r.fail(fmt.Errorf("wire: read record header at offset %d: %w", off, err))
		}
		t := Type(binary.LittleEndian.Uint32(r.hdr[0:]))
		bodyLen := binary.LittleEndian.Uint32(r.hdr[4:])
		sum := binary.LittleEndian.Uint32(r.hdr[8:])
		if res := binary.LittleEndian.Uint32(r.hdr[12:]); res != 0 {
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d: reserved field %#x: %w", t, off, res, ErrMalformed))
		}
		limit := uint32(MaxBody)
		if r.maxBody > 0 {
			limit = r.maxBody
		}
		if bodyLen > limit {
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d: length %d > %d: %w", t, off, bodyLen, limit, ErrTooLong))
		}
		body, crc, err := r.readBody(int(bodyLen), headerCRC(t, bodyLen))
		if err != nil {
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d: read %d-byte body: %w", t, off, bodyLen, err))
		}
		p := padLen(int(bodyLen))
		r.pad = [Align]byte{}
		n, err = io.ReadFull(r.br, r.pad[:p])
		r.n += int64(n)
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d: read padding: %w", t, off, err))
		}
		if crc != sum {
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d (%d bytes): %w", t, off, bodyLen, ErrChecksum))
		}
		if r.pad != zeroPad {
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d: %w", t, off, ErrPadding))
		}
		if !t.Known() {
			if t.IsOptional() {
				continue
			}
			return Record{}, r.fail(fmt.Errorf("record %s at offset %d (upgrade the receiving agent?): %w", t, off, ErrUnknownMandatory))
		}
		if t == TypeEnd && bodyLen != 0 {
			return Record{}, r.fail(fmt.Errorf("record End at offset %d has a %d-byte body: %w", off, bodyLen, ErrMalformed))
		}
		return Record{Type: t, Body: body}, nil
	}
}

// readBody reads n bytes into the reused body buffer, growing it only as
// the bytes arrive, and continues crc over them chunk by chunk while each
// chunk is still in cache. Chunks are ReaderBufferSize long, so on an empty
// read-ahead buffer bufio reads them straight into the body.
func (r *Reader) readBody(n int, crc uint32) ([]byte, uint32, error) {
	b := r.body[:0]
	for len(b) < n {
		if len(b) == cap(b) {
			c := min(max(2*cap(b), minBodyCap), n)
			nb := make([]byte, len(b), c)
			copy(nb, b)
			b = nb
			r.body = b
		}
		end := min(cap(b), n, len(b)+ReaderBufferSize)
		m, err := io.ReadFull(r.br, b[len(b):end])
		r.n += int64(m)
		crc = crc32.Update(crc, castagnoli, b[len(b):len(b)+m])
		b = b[:len(b)+m]
		if err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return b, crc, err
		}
	}
	return b, crc, nil
}

func (r *Reader) fail(err error) error {
	r.err = err
	return err
}
