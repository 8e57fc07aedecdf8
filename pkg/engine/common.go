package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Stream roles, carried in the hello of every connection.
const (
	roleMain    = "main"    // control, state, manifest; requests back
	roleData    = "data"    // page batches of one pfn partition
	rolePrio    = "prio"    // demand and fallback requests and their answers
	roleRecover = "recover" // main connection of a post-copy recovery
)

// Control message kinds.
const (
	ctlHello     = "hello"
	ctlPrepared  = "prepared"  // dst: target domain created
	ctlFlush     = "flush"     // src, on each data stream: all before it was sent
	ctlDrain     = "drain"     // src, domain still running: confirm when all sent so far is installed
	ctlDrained   = "drained"   // dst: every page sent before the drain markers is in place
	ctlComplete  = "complete"  // src: stop-and-copy data, state and manifest sent
	ctlPostCopy  = "postcopy"  // src: state and missing bitmap sent, switch
	ctlReady     = "ready"     // dst: verified (stop-and-copy) or armed (post-copy)
	ctlGo        = "go"        // src: resume now; the source never resumes after this
	ctlResumed   = "resumed"   // dst: the domain runs at the destination
	ctlPushed    = "pushed"    // src: every missing page pushed, manifest sent
	ctlDone      = "done"      // dst: every page present and verified
	ctlError     = "error"     // either side: aborting, Message says why
	ctlState     = "state"     // dst during recovery: what it knows
	ctlRecovered = "recovered" // src: recovery connection set up
	// ctlDiscarded (dst, main connection): the domain, resumed here, is
	// destroyed here and will never run here again; the source may resume
	// its copy (contract C2).
	ctlDiscarded = "discarded"
)

// partitionShift: pages travel in chunks of 256 (1 MiB); chunk c always goes
// over data stream c % streams, so every version of a page crosses the same
// TCP connection and arrives in order.
const partitionShift = 8

func partition(pfn uint64, streams int) int { return int((pfn >> partitionShift) % uint64(streams)) }

var zeroPage = make([]byte, xenmem.PageSize)
var zeroHash = dedup.HashPage(zeroPage)

// atomic bitmap helpers on xenmem.Bitmap words, for bitmaps shared between
// goroutines.
func aset(b *xenmem.Bitmap, i uint64) {
	atomic.OrUint64(&b.Words()[i>>6], 1<<(i&63))
}

func atest(b *xenmem.Bitmap, i uint64) bool {
	return atomic.LoadUint64(&b.Words()[i>>6])&(1<<(i&63)) != 0
}

// aor sets in b every bit set in o (same length), word by word atomically:
// b is shared with the progress reporter and the priority path.
func aor(b, o *xenmem.Bitmap) {
	bw := b.Words()
	for i, w := range o.Words() {
		if w != 0 {
			atomic.OrUint64(&bw[i], w)
		}
	}
}

// asetAll sets every bit of b atomically (the bits past its length stay clear).
func asetAll(b *xenmem.Bitmap) {
	all := xenmem.NewBitmap(b.Len())
	all.SetAll()
	aor(b, all)
}

// aclear clears bit i and reports whether it was set.
func aclear(b *xenmem.Bitmap, i uint64) bool {
	m := uint64(1) << (i & 63)
	return atomic.AndUint64(&b.Words()[i>>6], ^m)&m != 0
}

// asetNew sets bit i and reports whether it was clear before.
func asetNew(b *xenmem.Bitmap, i uint64) bool {
	m := uint64(1) << (i & 63)
	return atomic.OrUint64(&b.Words()[i>>6], m)&m == 0
}

// acount counts the set bits of a bitmap that other goroutines modify.
func acount(b *xenmem.Bitmap) uint64 {
	var n int
	for i := range b.Words() {
		n += bits.OnesCount64(atomic.LoadUint64(&b.Words()[i]))
	}
	return uint64(n)
}

// conn is one framed TCP connection. Writes are serialised by mu.
type conn struct {
	c    net.Conn
	cc   *countingReader
	r    *wire.Reader
	mu   sync.Mutex
	w    *wire.Writer
	lim  *limiter
	prio bool
	// wto, if set, bounds each record written (the destination's write
	// deadline): a peer that stops reading fails the write.
	wto time.Duration
	// busy: the connection's reader is working on what it read (the
	// destination's watchdog counts it as active).
	busy atomic.Bool
	// closed: close was called; woken: the watchdog set a read deadline
	// to wake the reader. Either ends a pollReader's own waiting.
	closed, woken atomic.Bool
}

// pollReads makes the reader of c wait for data in poll(2) on its own
// thread instead of in the Go runtime's poller: on a thread locked by
// postcopy.PinRealtime the kernel then wakes the reader itself, ahead of
// the push, instead of a scheduler thread that must first get a core and
// then hand the goroutine over. Plain TCP only (a TLS connection may
// hold decrypted bytes that poll(2) cannot see). Call it from the
// goroutine that reads c, before it reads.
func (c *conn) pollReads() {
	tc, ok := c.c.(*net.TCPConn)
	if !ok {
		return
	}
	rc, err := tc.SyscallConn()
	if err != nil {
		return
	}
	fd := -1
	_ = rc.Control(func(f uintptr) { fd = int(f) })
	if fd >= 0 {
		c.cc.r = &pollReader{c: c, fd: fd}
	}
}

// pollReader waits in poll(2) until its socket is readable, then reads
// through the net.Conn (which then has data and returns at once). It looks
// at the connection's closed and woken flags every pollSlice and, once one
// is set, leaves the waiting to the net.Conn, whose close and deadlines
// wake it: the fd number is not its own once the connection is closed.
type pollReader struct {
	c  *conn
	fd int
}

const pollSlice = 20 // ms

func (p *pollReader) Read(b []byte) (int, error) {
	fds := []unix.PollFd{{Fd: int32(p.fd), Events: unix.POLLIN}}
	for !p.c.closed.Load() && !p.c.woken.Load() {
		fds[0].Revents = 0
		n, err := unix.Poll(fds, pollSlice)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n > 0 {
			break
		}
	}
	return p.c.c.Read(b)
}

// TCPConn returns the TCP connection under c, plain or TLS (whose
// records it carries), if any: socket options belong there.
func TCPConn(c net.Conn) *net.TCPConn {
	if tc, ok := c.(*net.TCPConn); ok {
		return tc
	}
	if t, ok := c.(interface{ NetConn() net.Conn }); ok {
		tc, _ := t.NetConn().(*net.TCPConn)
		return tc
	}
	return nil
}

func newConn(c net.Conn, lim *limiter, prio bool) *conn {
	if tc := TCPConn(c); tc != nil {
		// No Nagle on any connection: every record is flushed whole, and
		// a small control record held back behind unacknowledged data
		// waits for the peer's delayed ACK: 40 ms of every switch-over's
		// "complete" → "ready" on loopback before this.
		_ = tc.SetNoDelay(true)
		if !prio {
			_ = tc.SetWriteBuffer(4 << 20)
			_ = tc.SetReadBuffer(4 << 20)
		} else {
			// Room for many answers: a write that finds the buffer full
			// parks its real-time thread in the Go poller, whose wake-up
			// waits for an ordinary thread to get a core.
			_ = tc.SetWriteBuffer(1 << 20)
			_ = tc.SetReadBuffer(1 << 20)
		}
	}
	cc := &countingReader{r: c}
	cc.last.Store(time.Now().UnixNano())
	// The writer gets the bare connection, so large parts go out in one
	// vectored write; it counts its own bytes.
	return &conn{c: c, cc: cc, r: wire.NewReader(cc), w: wire.NewWriter(c), lim: lim, prio: prio}
}

// countingReader counts the bytes read from a connection and notes when
// the last ones came, readable from any goroutine.
type countingReader struct {
	r    io.Reader
	n    atomic.Int64
	last atomic.Int64 // unix nanoseconds of the last byte (or of creation)
}

func (c *countingReader) Read(p []byte) (int, error) {
	n, err := c.r.Read(p)
	if n > 0 {
		c.n.Add(int64(n))
		c.last.Store(time.Now().UnixNano())
	}
	return n, err
}

// send writes one record and flushes it, after drawing its size from the
// bandwidth bucket.
func (c *conn) send(ctx context.Context, t wire.Type, parts ...[]byte) error {
	return c.sendAs(ctx, c.prio, t, parts...)
}

// sendAs is send with an explicit priority: small control records that a
// switch-over waits for (markers, state, commands) take their bandwidth
// without queueing behind the bucket's debt.
func (c *conn) sendAs(ctx context.Context, prio bool, t wire.Type, parts ...[]byte) error {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	size := int(wire.RecordSize(n))
	if prio {
		c.lim.takeNow(size)
	} else if err := c.lim.take(ctx, size); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.setWriteDeadline(); err != nil {
		return fmt.Errorf("%w: %w", errConnLost, err)
	}
	err := c.w.Write(t, parts...)
	if err == nil {
		err = c.w.Flush()
	}
	if err != nil {
		return fmt.Errorf("%w: %w", errConnLost, err)
	}
	return nil
}

// sendBatch writes several records of one type and flushes once, after
// drawing their size from the bandwidth bucket.
func (c *conn) sendBatch(ctx context.Context, t wire.Type, bodies [][]byte) error {
	size := 0
	for _, b := range bodies {
		size += int(wire.RecordSize(len(b)))
	}
	if c.prio {
		c.lim.takeNow(size)
	} else if err := c.lim.take(ctx, size); err != nil {
		return err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if err := c.setWriteDeadline(); err != nil {
		return fmt.Errorf("%w: %w", errConnLost, err)
	}
	for _, b := range bodies {
		if err := c.w.Write(t, b); err != nil {
			return fmt.Errorf("%w: %w", errConnLost, err)
		}
	}
	if err := c.w.Flush(); err != nil {
		return fmt.Errorf("%w: %w", errConnLost, err)
	}
	return nil
}

// setWriteDeadline renews the write deadline before a record, when the
// connection has one. c.mu is held.
func (c *conn) setWriteDeadline() error {
	if c.wto <= 0 {
		return nil
	}
	return c.c.SetWriteDeadline(time.Now().Add(c.wto))
}

func (c *conn) sendControl(ctx context.Context, m *wire.Control) error {
	b, err := wire.MarshalControl(nil, m)
	if err != nil {
		return err
	}
	return c.sendAs(ctx, true, wire.TypeControl, b)
}

// bytes is what crossed the connection so far, both ways.
func (c *conn) bytes() int64 {
	c.mu.Lock()
	w := c.w.Bytes()
	c.mu.Unlock()
	return w + c.cc.n.Load()
}

func (c *conn) close() {
	c.closed.Store(true)
	_ = c.c.Close()
}

// dialStream opens one connection with dial and sends its hello.
func dialStream(ctx context.Context, dial func(context.Context, string) (net.Conn, error), addr string, lim *limiter, hello wire.Control) (*conn, error) {
	nc, err := dial(ctx, addr)
	if err != nil {
		return nil, fmt.Errorf("dial %s (%s stream): %w", addr, hello.Message, err)
	}
	c := newConn(nc, lim, hello.Message == rolePrio)
	c.mu.Lock()
	err = c.w.WriteStreamHeader()
	c.mu.Unlock()
	if err == nil {
		err = c.sendControl(ctx, &hello)
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("hello to %s: %w", addr, err)
	}
	// The receiver answers every hello: welcome, or why not.
	_ = nc.SetReadDeadline(time.Now().Add(handshakeTimeout))
	if err = c.r.ReadStreamHeader(); err == nil {
		var m wire.Control
		if m, err = readControl(c); err == nil && m.Kind != ctlHello {
			err = remoteError(m)
		}
	}
	if err != nil {
		nc.Close()
		return nil, fmt.Errorf("%s stream to %s: %w", hello.Message, addr, err)
	}
	_ = nc.SetReadDeadline(time.Time{})
	return c, nil
}

// readControl reads records until a control message, returning it. Other
// record types are an error here.
func readControl(c *conn) (wire.Control, error) {
	rec, err := c.r.Next()
	if err != nil {
		return wire.Control{}, err
	}
	if rec.Type != wire.TypeControl {
		return wire.Control{}, fmt.Errorf("expected a control record, got %v: %w", rec.Type, wire.ErrMalformed)
	}
	return wire.ParseControl(rec.Body)
}

// errConnLost marks a broken connection (as opposed to a refusal or a
// protocol error): post-copy recovers from it.
var errConnLost = errors.New("connection lost")

// ErrRemote is wrapped by errors the other side reported.
var ErrRemote = errors.New("engine: remote side failed")

// ErrProtocol is wrapped by errors about a message that the protocol does
// not allow where it came (a record or control kind out of order, a count
// or range beyond what was announced or authorised). It fails that
// migration only.
var ErrProtocol = errors.New("engine: protocol violation")

// ErrInternal is wrapped by a panic recovered at a connection's boundary:
// it fails that migration only.
var ErrInternal = errors.New("engine: internal error")

// ErrDiscarded: the destination destroyed the domain it had resumed,
// because its memory failed verification, and will never run it; the
// source may resume its copy (contract C2).
var ErrDiscarded = errors.New("engine: the destination discarded the domain")

// remoteError turns an error control message into an error.
func remoteError(m wire.Control) error {
	return fmt.Errorf("%w: %s", ErrRemote, m.Message)
}

// dstStats is what the destination reports back in done/resumed.
type dstStats struct {
	Verified     bool    `json:"verified"`
	Mismatches   uint64  `json:"mismatches,omitempty"`
	Demand       uint64  `json:"demand"`
	DiskResolved uint64  `json:"diskResolved"`
	DiskFallback uint64  `json:"diskFallback"`
	FaultP50Us   float64 `json:"faultP50Us"`
	FaultP99Us   float64 `json:"faultP99Us"`
	OpsPerSec    float64 `json:"opsPerSec"`
	Duplicates   uint64  `json:"duplicates"`
}

func mustJSON(v any) json.RawMessage {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only plain structs are marshalled here
	}
	return b
}
