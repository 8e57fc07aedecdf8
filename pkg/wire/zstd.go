package wire

import (
	"fmt"

	"github.com/klauspost/compress/zstd"
)

// NewPagesDecoder returns a zstd decoder for PAGES data whose output is
// capped at one full batch (MaxBatchPages pages), so a hostile frame cannot
// make the destination allocate more than that. Close it when done.
func NewPagesDecoder() (*zstd.Decoder, error) {
	d, err := zstd.NewReader(nil,
		zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxMemory(MaxBatchPages*PageSize),
		zstd.WithDecoderLowmem(true))
	if err != nil {
		return nil, fmt.Errorf("wire: create zstd decoder: %w", err)
	}
	return d, nil
}

// NewPagesEncoder returns a zstd encoder for PAGES data (fastest level,
// one goroutine per EncodeAll). Close it when done.
func NewPagesEncoder() (*zstd.Encoder, error) {
	e, err := zstd.NewWriter(nil,
		zstd.WithEncoderLevel(zstd.SpeedFastest),
		zstd.WithEncoderConcurrency(1),
		zstd.WithZeroFrames(true))
	if err != nil {
		return nil, fmt.Errorf("wire: create zstd encoder: %w", err)
	}
	return e, nil
}

// EncodePages appends one zstd frame holding data (count pages) to dst.
func EncodePages(e *zstd.Encoder, dst, data []byte) []byte {
	return e.EncodeAll(data, dst)
}

// DecodePages decompresses the data of a PAGES record with PagesZstd set,
// appending it to dst[:0], and checks that it is exactly count pages. Use
// a decoder from NewPagesDecoder so the output is bounded.
func DecodePages(d *zstd.Decoder, data []byte, count int, dst []byte) ([]byte, error) {
	out, err := d.DecodeAll(data, dst[:0])
	if err != nil {
		return out[:0], fmt.Errorf("decompress %d-page batch: %w: %w", count, ErrMalformed, err)
	}
	if len(out) != count*PageSize {
		return out[:0], fmt.Errorf("compressed batch of %d pages decompressed to %d bytes, want %d: %w", count, len(out), count*PageSize, ErrMalformed)
	}
	return out, nil
}
