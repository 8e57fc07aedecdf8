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
// never compresses for the link's sake: there the CPU is the bottleneck.
//
// SetAlways trades the sender's CPU time for bytes: every batch that
// shrinks goes compressed.
//
// A sender whose input comes slower than it can send it (a toolstack that
// produces the stream at a few MB/s) has time to spare: SetIdle tells the
// compressor how long the sender waits for each byte of input, and a
// level whose measured cost is at most idleShare of that wait is used
// even when the link alone would not call for it. The bytes on the
// network then shrink at a bounded cost: none with a CPU to spare, and at
// most idleShare of the producer's time when the producer shares the one
// CPU (as in a dom0 with a single vCPU).
//
// The receiver needs nothing new: a compressed batch is a PAGES record
// with PagesZstd (NewPagesDecoder, DecodePages). Not safe for concurrent
// use: one per stream.
type Compressor struct {
	link float64 // bytes/s; 0: unlimited
	idle float64 // seconds the sender waits per byte of input; 0: none
	// always: every batch that shrinks goes compressed (SetAlways).
	always bool
	encs   [2]*zstd.Encoder
	est    [2]levelEstimate
	n      uint64 // batches seen
	stats  CompressorStats
}

// CompressorStats counts what a Compressor did.
type CompressorStats struct {
	Batches    uint64 `json:"batches"`
	Compressed uint64 `json:"compressed"` // sent as a zstd frame
	Probes     uint64 `json:"probes"`     // compressed only to measure
	RawBytes   int64  `json:"rawBytes"`   // data offered
	SentBytes  int64  `json:"sentBytes"`  // data sent (frames or raw)
	// What the decisions rest on, as last seen: the link's rate (bytes/s,
	// 0: unlimited), the sender's wait per input byte (seconds), and per
	// level (fastest, default) the measured ratio and rate (bytes/s).
	Link    float64    `json:"link"`
	Idle    float64    `json:"idle"`
	Ratio   [2]float64 `json:"ratio"`
	CPURate [2]float64 `json:"cpuRate"`
}

// levelEstimate is one level's measured ratio and rate.
type levelEstimate struct {
	ratio float64 // compressed / raw, 0 until measured
	cpu   float64 // raw bytes compressed per second
	n     int     // batches measured
}

// warmBatches: a level's first batch also pays for its encoder's tables
// and cold caches (20x its later rate under emulation), so each level
// is measured on this many batches before the estimates decide, and its
// rate is taken from the second.
const warmBatches = 2

// probeEvery: while raw pays, one batch in this many is compressed anyway.
const probeEvery = 16

// ewma weight of a new measurement.
const ewmaWeight = 0.25

// alwaysMinGain: with SetAlways, data that shrinks by less is not worth
// the CPU.
const alwaysMinGain = 0.02

// idleShare is the share of the sender's wait for input that compression
// may use when the link does not call for it.
const idleShare = 0.125

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
func (c *Compressor) Stats() CompressorStats {
	st := c.stats
	st.Link, st.Idle = c.link, c.idle
	for i, e := range c.est {
		st.Ratio[i], st.CPURate[i] = e.ratio, e.cpu
	}
	return st
}

// SetLink sets the link's rate in bytes per second, as configured or
// measured (0: unlimited).
func (c *Compressor) SetLink(bytesPerSec float64) { c.link = max(bytesPerSec, 0) }

// SetAlways makes every batch that shrinks go compressed, at the level
// the link's rate favours (the fastest when it is unknown): for links
// where bytes cost more than the sender's CPU time.
func (c *Compressor) SetAlways(on bool) { c.always = on }

// SetIdle sets how long the sender waits for its input per byte of it
// (measured; 0: it never waits).
func (c *Compressor) SetIdle(secondsPerByte float64) { c.idle = max(secondsPerByte, 0) }

// Compress returns what to send for data: a zstd frame appended to
// dst[:0] and true, or data itself and false (send it raw).
func (c *Compressor) Compress(dst, data []byte) ([]byte, bool) {
	c.n++
	c.stats.Batches++
	c.stats.RawBytes += int64(len(data))
	if (c.link <= 0 && c.idle <= 0 && !c.always) || len(data) == 0 {
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

// choose returns the level to use for a batch and whether compressing
// beats sending raw. Unmeasured levels are tried. The idle time comes
// first: among the levels that fit in its share, the one that compresses
// best (the bytes are saved for free); otherwise the level with the
// shortest estimated time to compress and send, if it beats raw.
func (c *Compressor) choose() (int, bool) {
	for i := range c.encs {
		if c.est[i].n < warmBatches {
			return i, true // measure it
		}
	}
	if c.idle > 0 {
		best := -1
		for i, e := range c.est {
			if e.cpu > 0 && 1/e.cpu <= idleShare*c.idle && e.ratio < 1 && (best < 0 || e.ratio < c.est[best].ratio) {
				best = i
			}
		}
		if best >= 0 {
			return best, true
		}
	}
	if c.always {
		return c.alwaysLevel()
	}
	if c.link <= 0 {
		return 0, false
	}
	best, bestT := -1, 1.0/c.link // per raw byte
	for i := range c.encs {
		if t := c.sendTime(i); t < bestT {
			best, bestT = i, t
		}
	}
	if best < 0 {
		return 0, false
	}
	return best, true
}

// alwaysLevel is choose's answer with SetAlways: among the levels that
// shrink this stream's data (by more than alwaysMinGain), the one the
// link favours, or the fastest on a link of unknown rate. Data that does
// not shrink goes raw, but for the probes.
func (c *Compressor) alwaysLevel() (int, bool) {
	best := -1
	for i, e := range c.est {
		if e.ratio > 1-alwaysMinGain {
			continue
		}
		if best < 0 || c.link > 0 && c.sendTime(i) < c.sendTime(best) {
			best = i
		}
	}
	return max(best, 0), best >= 0
}

// sendTime estimates the seconds to compress and send a raw byte at a
// level (on a link of c.link > 0).
func (c *Compressor) sendTime(lvl int) float64 {
	e := c.est[lvl]
	t := e.ratio / c.link
	if e.cpu > 0 {
		t += 1 / e.cpu
	}
	return t
}

func (c *Compressor) observe(lvl int, ratio, cpu float64) {
	e := &c.est[lvl]
	e.n++
	switch e.n {
	case 1:
		e.ratio, e.cpu = ratio, cpu
	case warmBatches:
		e.ratio += ewmaWeight * (ratio - e.ratio)
		e.cpu = cpu // the first was cold
	default:
		e.ratio += ewmaWeight * (ratio - e.ratio)
		e.cpu += ewmaWeight * (cpu - e.cpu)
	}
}
