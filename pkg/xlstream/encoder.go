package xlstream

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"time"

	"github.com/zeebo/xxh3"

	"github.com/xenferry/xenferry/pkg/wire"
)

// PageIndex finds pages of guest memory on the shared disks (source side).
// Lookup may be called from one goroutine at a time.
type PageIndex interface {
	// Lookup returns where page (PageSize bytes) is stored on a shared
	// disk, or false.
	Lookup(page []byte) (Ref, bool)
}

// EncodeStats counts what an Encoder did.
type EncodeStats struct {
	PageRecords   int64 // PAGE_DATA records rewritten
	ZeroPages     int64 // pages sent as ZERO
	RefPages      int64 // pages sent as REF
	DataPages     int64 // pages sent in full
	FallbackPages int64 // REF pages sent again on request
	InBytes       int64 // bytes of the original stream
	OutBytes      int64 // bytes of frames written
	// Compression (EnableCompression): records whose payload went as a
	// zstd frame, and the payload bytes offered and sent.
	CompressedRecords int64
	PayloadBytes      int64
	PayloadSentBytes  int64
	// Compressor: the compressor's counters and estimates.
	Compressor wire.CompressorStats
}

// MinWindow is the smallest REF window, in pages (16 MiB): the destination
// acknowledges REFs per record, so a whole record's REFs must fit.
const MinWindow = MaxPageRecord / PageSize

// Encoder writes the compact transport of a stream (source side). WriteToken
// is called by one goroutine; Ack, Fallback and Abort may be called from
// another (the one reading the destination's replies).
type Encoder struct {
	idx PageIndex

	// wmu serialises frame writes and protects w, meter and stats.
	wmu   sync.Mutex
	w     *bufio.Writer
	meter *linkMeter
	stats EncodeStats

	// Compression, used by the WriteToken goroutine only.
	comp   *wire.Compressor
	link   float64       // configured link rate; 0: measured
	wait   time.Duration // input wait since the last PAGES record
	waitIn int64         // input bytes since the last PAGES record
	idle   ewma          // input wait per input byte
	zbuf   []byte

	// mu protects the REF window below.
	mu      sync.Mutex
	cond    *sync.Cond
	window  []byte // len = slots*PageSize; REF seq s lives in slot s%slots
	slots   uint64
	nextSeq uint64 // seq of the next REF
	acked   uint64 // every REF below acked is resolved
	aborted error

	body []byte
	refs []Ref
}

// NewEncoder returns an Encoder writing frames to w. idx may be nil (zero
// pages are still elided); window is the REF window in pages (at least MinWindow).
func NewEncoder(w io.Writer, idx PageIndex, window int) *Encoder {
	if window < MinWindow {
		window = MinWindow
	}
	e := &Encoder{meter: &linkMeter{w: w}, slots: uint64(window)}
	e.w = bufio.NewWriterSize(e.meter, 1<<20)
	e.cond = sync.NewCond(&e.mu)
	e.SetIndex(idx)
	return e
}

// SetIndex sets the PageIndex for the records that follow (e.g. once the
// domain's disks are known from xl's header). Called from the goroutine
// that calls WriteToken.
func (e *Encoder) SetIndex(idx PageIndex) {
	e.idx = idx
	if idx != nil && e.window == nil {
		e.mu.Lock()
		e.window = make([]byte, e.slots*PageSize)
		e.mu.Unlock()
	}
}

// EnableCompression makes the records that follow carry their pages as
// zstd frames when that pays (wire.Compressor decides per record): the
// destination must decode FramePagesZ. linkBytesPerSec is the link's rate
// if known (a configured cap); 0 measures it from how long writes to the
// connection block. always sends every record that shrinks compressed
// (wire.Compressor.SetAlways). Call before the first WriteToken; Close
// releases it.
func (e *Encoder) EnableCompression(linkBytesPerSec int64, always bool) error {
	c, err := wire.NewCompressor(linkBytesPerSec)
	if err != nil {
		return fmt.Errorf("xlstream: %w", err)
	}
	c.SetAlways(always)
	e.comp, e.link = c, float64(max(linkBytesPerSec, 0))
	return nil
}

// Close releases the compressor, if any; WriteToken must not follow.
func (e *Encoder) Close() {
	if e.comp != nil {
		e.comp.Close()
		e.comp = nil
	}
}

// noteWait records that the caller waited d for the input of a token
// (the time xl took to produce it): the compressor may use a share of it.
func (e *Encoder) noteWait(d time.Duration) { e.wait += d }

// Stats returns the counters so far.
func (e *Encoder) Stats() EncodeStats {
	e.wmu.Lock()
	defer e.wmu.Unlock()
	return e.stats
}

func (e *Encoder) frame(kind byte, flush bool, parts ...[]byte) error {
	e.wmu.Lock()
	defer e.wmu.Unlock()
	n, err := writeFrame(e.w, kind, parts...)
	e.stats.OutBytes += int64(n)
	if err == nil && flush {
		err = e.w.Flush()
	}
	if err != nil {
		return fmt.Errorf("xlstream: write frame: %w", err)
	}
	return nil
}

// Flush writes buffered frames out.
func (e *Encoder) Flush() error {
	e.wmu.Lock()
	defer e.wmu.Unlock()
	if err := e.w.Flush(); err != nil {
		return fmt.Errorf("xlstream: flush: %w", err)
	}
	return nil
}

// WriteToken encodes one token of a Reader.
func (e *Encoder) WriteToken(t Token) error {
	e.wmu.Lock()
	e.stats.InBytes += int64(len(t.Raw))
	e.wmu.Unlock()
	e.waitIn += int64(len(t.Raw))
	if t.Kind != TokPages {
		return e.frame(FrameRaw, false, t.Raw)
	}
	p := t.Page
	need := 16 + 1 + 12*len(p.Entries) + 8 + p.NData + p.NData*PageSize
	if cap(e.body) < need {
		e.body = make([]byte, 0, need)
	}
	b := append(e.body[:0], p.Raw[:16]...)
	b = appendPFNs(b, p.Entries)
	b = binary.LittleEndian.AppendUint64(b, xxh3.Hash(p.Raw))
	kstart := len(b)
	b = append(b, make([]byte, p.NData)...)
	kinds := b[kstart:]
	var zero, ref, data int64
	e.refs = e.refs[:0]
	for i := 0; i < p.NData; i++ {
		pg := p.Data(i)
		if isZero(pg) {
			kinds[i] = KindZero
			zero++
			continue
		}
		if e.idx != nil {
			if r, ok := e.idx.Lookup(pg); ok {
				kinds[i] = KindRef
				e.refs = append(e.refs, r)
				ref++
				continue
			}
		}
		kinds[i] = KindData
		data++
	}
	if ref > 0 {
		if err := e.reserve(uint64(ref)); err != nil {
			return err
		}
	}
	j := 0
	payloadAt := len(b)
	for i := 0; i < p.NData; i++ {
		switch kinds[i] {
		case KindRef:
			e.keep(p.Data(i))
			var rb [refLen]byte
			putRef(rb[:], e.refs[j])
			j++
			b = append(b, rb[:]...)
		case KindData:
			b = append(b, p.Data(i)...)
		}
	}
	e.body = b
	kind, parts := byte(FramePages), [][]byte{b}
	payload := b[payloadAt:]
	compressed := false
	if e.comp != nil && data > 0 {
		e.tuneCompressor()
		var z []byte
		if z, compressed = e.comp.Compress(e.zbuf, payload); compressed {
			e.zbuf = z
			kind, parts = FramePagesZ, [][]byte{b[:payloadAt], z}
		}
	}
	if err := e.frame(kind, false, parts...); err != nil {
		return err
	}
	e.wmu.Lock()
	if e.comp != nil {
		e.stats.Compressor = e.comp.Stats()
		e.stats.PayloadBytes += int64(len(payload))
		if compressed {
			e.stats.CompressedRecords++
			e.stats.PayloadSentBytes += int64(len(parts[1]))
		} else {
			e.stats.PayloadSentBytes += int64(len(payload))
		}
	}
	e.stats.PageRecords++
	e.stats.ZeroPages += zero
	e.stats.RefPages += ref
	e.stats.DataPages += data
	e.wmu.Unlock()
	return nil
}

// tuneCompressor gives the compressor the link's rate (configured, or as
// the connection's writes measure it) and the input wait per input byte
// since the previous record.
func (e *Encoder) tuneCompressor() {
	e.comp.SetLink(e.linkRate(e.link))
	if e.waitIn > 0 {
		e.idle.add(e.wait.Seconds(), float64(e.waitIn))
	}
	e.wait, e.waitIn = 0, 0
	e.comp.SetIdle(e.idle.value())
}

// linkRate returns configured when it is set, else the link's rate as the
// connection's writes measure it (0: not measured yet).
func (e *Encoder) linkRate(configured float64) float64 {
	if configured > 0 {
		return configured
	}
	e.wmu.Lock()
	defer e.wmu.Unlock()
	return e.meter.rate()
}

// ewma is a decaying ratio of two sums (seconds over bytes, bytes over
// seconds): each new sample weighs a quarter.
type ewma struct{ num, den float64 }

func (a *ewma) add(num, den float64) {
	a.num = 0.75*a.num + num
	a.den = 0.75*a.den + den
}

func (a *ewma) value() float64 {
	if a.den <= 0 {
		return 0
	}
	return a.num / a.den
}

// linkMeter measures the link by how long the connection's writes take:
// a write that fits the socket's buffer returns at memory speed, one that
// does not waits for the link. Writes of less than minMeteredWrite say
// little and are not counted. Guarded by the Encoder's wmu.
type linkMeter struct {
	w   io.Writer
	est ewma // bytes over seconds
}

const minMeteredWrite = 64 << 10

func (m *linkMeter) Write(p []byte) (int, error) {
	t0 := time.Now()
	n, err := m.w.Write(p)
	if n >= minMeteredWrite {
		m.est.add(float64(n), max(time.Since(t0).Seconds(), 1e-9))
	}
	return n, err
}

// rate returns the measured link rate in bytes per second (0: nothing
// measured yet, taken as unlimited).
func (m *linkMeter) rate() float64 { return m.est.value() }

// reserve waits until n more REF pages fit in the window (after flushing,
// so that the destination can see the REFs it has to acknowledge).
func (e *Encoder) reserve(n uint64) error {
	e.mu.Lock()
	full := e.nextSeq+n-e.acked > e.slots
	e.mu.Unlock()
	if full {
		if err := e.Flush(); err != nil {
			return err
		}
	}
	e.mu.Lock()
	defer e.mu.Unlock()
	for e.nextSeq+n-e.acked > e.slots && e.aborted == nil {
		e.cond.Wait()
	}
	return e.aborted
}

// keep stores the next REF page in the window; reserve made room for it.
func (e *Encoder) keep(pg []byte) {
	e.mu.Lock()
	defer e.mu.Unlock()
	s := e.nextSeq % e.slots
	copy(e.window[s*PageSize:(s+1)*PageSize], pg)
	e.nextSeq++
}

// Ack records that every REF below seq is resolved at the destination.
func (e *Encoder) Ack(seq uint64) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if seq > e.nextSeq {
		return fmt.Errorf("%w: ACK of REF %d but only %d sent", ErrBadFrame, seq, e.nextSeq)
	}
	if seq > e.acked {
		e.acked = seq
		e.cond.Broadcast()
	}
	return nil
}

// Fallback sends REF page seq in full (the destination could not verify it).
func (e *Encoder) Fallback(seq uint64) error {
	e.mu.Lock()
	if seq < e.acked || seq >= e.nextSeq {
		acked, next := e.acked, e.nextSeq
		e.mu.Unlock()
		return fmt.Errorf("%w: NEED for REF %d outside the window [%d, %d)", ErrFallbackFailed, seq, acked, next)
	}
	var b [8 + PageSize]byte
	binary.LittleEndian.PutUint64(b[:], seq)
	s := seq % e.slots
	copy(b[8:], e.window[s*PageSize:(s+1)*PageSize])
	e.mu.Unlock()
	if err := e.frame(FrameFallback, true, b[:]); err != nil {
		return err
	}
	e.wmu.Lock()
	e.stats.FallbackPages++
	e.wmu.Unlock()
	return nil
}

// Abort wakes a WriteToken waiting for the window; it then returns err.
func (e *Encoder) Abort(err error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.aborted == nil {
		e.aborted = err
	}
	e.cond.Broadcast()
}

// End writes the END frame and flushes.
func (e *Encoder) End() error { return e.frame(FrameEnd, true) }

// Encode reads a whole stream from r and writes its frames to w, without
// fallback (for files and tests): REFs are acknowledged as they are made.
func Encode(r io.Reader, w io.Writer, idx PageIndex) (EncodeStats, ReaderStats, error) {
	return encode(r, NewEncoder(w, idx, 0))
}

func encode(r io.Reader, e *Encoder) (EncodeStats, ReaderStats, error) {
	defer e.Close()
	rd := NewReader(r)
	for {
		t, err := rd.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return e.Stats(), rd.Stats(), err
		}
		if err := e.WriteToken(t); err != nil {
			return e.Stats(), rd.Stats(), err
		}
		e.mu.Lock()
		e.acked = e.nextSeq
		e.mu.Unlock()
	}
	if !rd.Complete() {
		return e.Stats(), rd.Stats(), fmt.Errorf("%w: stream ended before its END record", ErrTruncated)
	}
	err := e.End()
	return e.Stats(), rd.Stats(), err
}

func isZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}

// PFN array encodings in a PAGES frame.
const (
	pfnsRaw  = 0 // count entries of 8 bytes, as in the record
	pfnsRuns = 1 // u32 number of runs, then {first entry u64, length u32}
)

// appendPFNs appends the shorter encoding of a record's pfn entries: as
// they are, or as runs of consecutive entries (libxc sends pfns in order,
// and HVM streams describe large holes as runs of XTAB).
func appendPFNs(b []byte, ents []uint64) []byte {
	runs := 0
	for i := range ents {
		if i == 0 || ents[i] != ents[i-1]+1 {
			runs++
		}
	}
	if 4+12*runs >= 8*len(ents) {
		b = append(b, pfnsRaw)
		for _, e := range ents {
			b = binary.LittleEndian.AppendUint64(b, e)
		}
		return b
	}
	b = append(b, pfnsRuns)
	b = binary.LittleEndian.AppendUint32(b, uint32(runs))
	for i := 0; i < len(ents); {
		j := i + 1
		for j < len(ents) && ents[j] == ents[j-1]+1 {
			j++
		}
		b = binary.LittleEndian.AppendUint64(b, ents[i])
		b = binary.LittleEndian.AppendUint32(b, uint32(j-i))
		i = j
	}
	return b
}
