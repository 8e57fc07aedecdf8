package wire

import (
	"fmt"
	"time"

	"github.com/klauspost/compress/zstd"
)

// Compressor chooses, batch by batch, how page data goes on a link of a
// known rate: raw, or one zstd frame at the fastest level or the default
// (level 3) one. It pays only when the time to compress and send the
// frame is shorter than the time to send the data raw:
//
//	size/cpu + size×ratio/link < size/link
//
// where ratio is the frame's size over the data's and cpu the encoder's
// rate, both measured on this stream's own recent batches (exponentially
// weighted). Page contents change along memory (zero-rich kernel
// structures, text, random-looking heaps), so while it sends raw it still
// compresses one batch in probeEvery to keep the estimates current; a
// probe that pays is sent compressed. On an unlimited link (rate 0) it
// never compresses: there the CPU is the bottleneck.
//
// The receiver needs nothing new: a compressed batch is a PAGES record
// with PagesZstd (NewPagesDecoder, DecodePages). Not safe for concurrent
// use: one per stream.
type Compressor struct {
	link  float64 // bytes/s; 0: unlimited
	encs  [2]*zstd.Encoder
	est   [2]levelEstimate
	n     uint64 // batches seen
	stats CompressorStats
}

// CompressorStats counts what a Compressor did.
type CompressorStats struct {
	Batches    uint64 `json:"batches"`
	Compressed uint64 `json:"compressed"` // sent as a zstd frame
	Probes     uint64 `json:"probes"`     // compressed only to measure
	RawBytes   int64  `json:"rawBytes"`   // data offered
	SentBytes  int64  `json:"sentBytes"`  // data sent (frames or raw)
}

// levelEstimate is one level's measured ratio and rate.
type levelEstimate struct {
	ratio float64 // compressed / raw, 0 until measured
	cpu   float64 // raw bytes compressed per second
}

// probeEvery: while raw pays, one batch in this many is compressed anyway.
const probeEvery = 16

// ewma weight of a new measurement.
const ewmaWeight = 0.25

// NewCompressor returns a compressor for a link of linkBytesPerSec (0:
// unlimited).
func NewCompressor(linkBytesPerSec int64) (*Compressor, error) {
	c := &Compressor{link: float64(max(linkBytesPerSec, 0))}
	for i, lvl := range []zstd.EncoderLevel{zstd.SpeedFastest, zstd.SpeedDefault} {
		e, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(lvl), zstd.WithEncoderConcurrency(1),
			zstd.WithZeroFrames(true), zstd.WithLowerEncoderMem(true))
		if err != nil {
			c.Close()
			return nil, fmt.Errorf("wire: create zstd encoder (%v): %w", lvl, err)
		}
		c.encs[i] = e
	}
	return c, nil
}

// Close releases the encoders.
func (c *Compressor) Close() {
	for _, e := range c.encs {
		if e != nil {
			_ = e.Close()
		}
	}
}

// Stats returns the counters so far.
func (c *Compressor) Stats() CompressorStats { return c.stats }

// Compress returns what to send for data: a zstd frame appended to
// dst[:0] and true, or data itself and false (send it raw).
func (c *Compressor) Compress(dst, data []byte) ([]byte, bool) {
	c.n++
	c.stats.Batches++
	c.stats.RawBytes += int64(len(data))
	if c.link <= 0 || len(data) == 0 {
		c.stats.SentBytes += int64(len(data))
		return data, false
	}
	lvl, pays := c.choose()
	probe := !pays && c.n%probeEvery == 0
	if !pays && !probe {
		c.stats.SentBytes += int64(len(data))
		return data, false
	}
	if probe {
		// Probe the level least recently useful: alternate.
		lvl = int(c.n/probeEvery) % len(c.encs)
		c.stats.Probes++
	}
	t0 := time.Now()
	out := c.encs[lvl].EncodeAll(data, dst[:0])
	d := time.Since(t0)
	c.observe(lvl, float64(len(out))/float64(len(data)), float64(len(data))/max(d.Seconds(), 1e-9))
	if len(out) < len(data) { // the CPU is spent: fewer bytes are sooner sent
		c.stats.Compressed++
		c.stats.SentBytes += int64(len(out))
		return out, true
	}
	c.stats.SentBytes += int64(len(data))
	return data, false
}

// choose returns the level with the shortest estimated time to send a
// batch, and whether it beats sending raw. Unmeasured levels are tried.
func (c *Compressor) choose() (int, bool) {
	best, bestT := -1, 1.0/c.link // per raw byte
	for i := range c.encs {
		if c.est[i].ratio == 0 {
			return i, true // measure it
		}
		if t := c.sendTime(i, 1); t < bestT {
			best, bestT = i, t
		}
	}
	if best < 0 {
		return 0, false
	}
	return best, true
}

// sendTime estimates the seconds to compress and send n raw bytes at a
// level.
func (c *Compressor) sendTime(lvl, n int) float64 {
	e := c.est[lvl]
	t := float64(n) * e.ratio / c.link
	if e.cpu > 0 {
		t += float64(n) / e.cpu
	}
	return t
}

func (c *Compressor) observe(lvl int, ratio, cpu float64) {
	e := &c.est[lvl]
	if e.ratio == 0 {
		e.ratio, e.cpu = ratio, cpu
		return
	}
	e.ratio += ewmaWeight * (ratio - e.ratio)
	e.cpu += ewmaWeight * (cpu - e.cpu)
}
