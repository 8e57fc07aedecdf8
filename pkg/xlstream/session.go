package xlstream

import (
	"bufio"
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/xenferry/xenferry/pkg/pace"
	"github.com/xenferry/xenferry/pkg/wire"
)

// SendStats is what the source side of a session did.
type SendStats struct {
	Reader ReaderStats
	Encode EncodeStats
	// BackBytes were relayed from the destination's xl to ours.
	BackBytes int64
	// ExitStatus is the destination command's exit status (-1: unknown).
	ExitStatus int
	// Early resume: pages held back, then sent on demand and by the push;
	// of the pushed ones, those that went in compressed batches.
	LazyHeld, LazyDemanded, LazyPushed int64
	LazyPushedCompressed               int64
}

// SendOptions tune Send.
type SendOptions struct {
	// Window is the REF window in pages (at least MinWindow).
	Window int
	// Progress, when set, is called about every ProgressEvery with the
	// counters so far, from the sending goroutine.
	Progress      func(SendStats)
	ProgressEvery time.Duration
	// IndexFor, when set, is called once with xl's header (nil for a
	// stream without one) before the first PAGE_DATA record; the PageIndex
	// it returns replaces idx. An error ends the session.
	IndexFor func(*XLHeader) (PageIndex, error)
	// BeforeTrailer, when set, is called once, before the first byte xl
	// wrote after libxl's END is sent. After the stream xl sends only the
	// permission to go, so this is the point of no return of an xl
	// migration: an error ends the session without sending it.
	BeforeTrailer func() error
	// Lazy, when set, holds back the RAM of an HVM or PVH domain for
	// early resume (a PV domain's stream goes unchanged): see lazy.go.
	// Send then serves the destination's demands and pushes the held pages
	// after xl's stream ended, until the destination exits.
	Lazy *LazySource
	// LazyName is the spool's name sent to the destination.
	LazyName string
	// LazyPushing, when set, is called when xl's stream ended and the
	// push of the held pages begins (the domain runs at the destination
	// if xl's migration succeeded).
	LazyPushing func()
	// LazyPushRate paces the push (bytes per second, 0: as fast as the
	// link takes it). Just below the link's rate it keeps the queues on
	// the way empty, so that a demand answer does not wait behind pushed
	// pages.
	LazyPushRate int64
	// Compress sends page records as zstd frames when that pays
	// (Encoder.EnableCompression); only to a destination that decodes
	// FramePagesZ. CompressLink is the link's rate if known (bytes per
	// second; 0: measured from the connection's writes).
	// CompressAlways sends every record that shrinks compressed.
	Compress       bool
	CompressLink   int64
	CompressAlways bool
}

// Send is the source side of a session: it reads xl's migration stream
// from xlIn and writes its frames to conn, relays the destination's bytes
// for xl to xlOut, and answers the destination's NEED/ACK frames. It
// returns when xlIn ended and the destination closed the connection (or
// sent its EXIT frame). idx may be nil. xlOut is closed, when it is an
// io.Closer, once the destination has ended.
func Send(ctx context.Context, conn io.ReadWriter, xlIn io.Reader, xlOut io.Writer, idx PageIndex, opts SendOptions) (SendStats, error) {
	enc := NewEncoder(conn, idx, opts.Window)
	if opts.Compress {
		if err := enc.EnableCompression(opts.CompressLink, opts.CompressAlways); err != nil {
			return SendStats{ExitStatus: -1}, err
		}
	}
	defer enc.Close()
	rd := NewReader(xlIn)
	st := SendStats{ExitStatus: -1}
	var mu sync.Mutex // protects st.BackBytes, st.ExitStatus
	var lazyOn bool   // the destination was told; set once, by the send loop
	var lazySynced bool
	var demanded, pushed, pushedZ int64

	backDone := make(chan error, 1)
	go func() {
		backDone <- func() error {
			br := bufio.NewReaderSize(conn, 64<<10)
			var buf []byte
			var demandErr error
			for {
				kind, body, err := readFrame(br, buf)
				if errors.Is(err, io.EOF) {
					return demandErr
				}
				if err != nil {
					if demandErr != nil {
						return demandErr
					}
					return fmt.Errorf("read from destination: %w", err)
				}
				buf = body[:0]
				switch kind {
				case FrameBack:
					if _, err := xlOut.Write(body); err != nil {
						return fmt.Errorf("relay to xl: %w", err)
					}
					mu.Lock()
					st.BackBytes += int64(len(body))
					mu.Unlock()
				case FrameNeed, FrameAck:
					if len(body) != 8 {
						return fmt.Errorf("%w: frame kind %d of %d bytes", ErrBadFrame, kind, len(body))
					}
					seq := binary.LittleEndian.Uint64(body)
					if kind == FrameAck {
						err = enc.Ack(seq)
					} else {
						err = enc.Fallback(seq)
					}
					if err != nil {
						return err
					}
				case FrameDemand:
					if len(body) != 8 || opts.Lazy == nil {
						return fmt.Errorf("%w: DEMAND frame of %d bytes", ErrBadFrame, len(body))
					}
					pfn := binary.LittleEndian.Uint64(body)
					b, ok, err := opts.Lazy.page(pfn, true)
					if err != nil {
						return err
					}
					if !ok {
						return fmt.Errorf("%w: demand for pfn %#x, which was not held back", ErrBadFrame, pfn)
					}
					// The faulting page, then up to 7 held pages after it
					// not yet sent (a guest touching one page of a run
					// touches the next). A write error is not the end by
					// itself: a destination that got every page from the
					// push exits without waiting for late answers; its EXIT
					// (or the lack of it) decides.
					werr := enc.frame(FrameLazyPage, true, b)
					for q, extra := pfn+1, 0; werr == nil && q <= pfn+64 && extra < 7; q++ {
						nb, ok, err := opts.Lazy.page(q, false)
						if err != nil {
							return err
						}
						if ok {
							werr = enc.frame(FrameLazyPage, false, nb)
							extra++
							mu.Lock()
							pushed++ // sent ahead of a fault, like the push
							mu.Unlock()
						}
					}
					if werr == nil {
						werr = enc.Flush()
					}
					if werr != nil {
						if demandErr == nil {
							demandErr = fmt.Errorf("answer a demand: %w", werr)
						}
						continue
					}
					mu.Lock()
					demanded++
					mu.Unlock()
				case FrameExit:
					if len(body) != 4 {
						return fmt.Errorf("%w: EXIT frame of %d bytes", ErrBadFrame, len(body))
					}
					mu.Lock()
					st.ExitStatus = int(int32(binary.LittleEndian.Uint32(body)))
					mu.Unlock()
					return nil
				default:
					return fmt.Errorf("%w: unexpected frame kind %d from destination", ErrBadFrame, kind)
				}
			}
		}()
		// The destination has said all it will (its EXIT, or the end of
		// the connection). xl may be waiting for a reply that cannot come
		// (its target failed before "ready"): the end of its input tells
		// it so, and it then ends its stream, which ends the loop below.
		if c, ok := xlOut.(io.Closer); ok {
			c.Close()
		}
	}()

	// Cancelling ctx ends the session at once, even while xl is quiet
	// (waiting for the destination): the connection is closed, so the
	// destination's command sees a cut stream, fails, and xl here learns
	// it through the end of its input.
	stopWatch := context.AfterFunc(ctx, func() {
		if c, ok := conn.(io.Closer); ok {
			c.Close()
		}
	})
	defer stopWatch()

	sendErr := func() error {
		last := time.Now()
		for {
			if rd.Buffered() == 0 {
				// The next read may wait for xl (e.g. for the handshake
				// after libxl's END): everything so far must be sent.
				if err := enc.Flush(); err != nil {
					return err
				}
			}
			if err := ctx.Err(); err != nil {
				return err
			}
			t0 := time.Now()
			t, err := rd.Next()
			enc.noteWait(time.Since(t0))
			if errors.Is(err, io.EOF) {
				return enc.End()
			}
			if err != nil {
				return err
			}
			if lazyOn && t.Layer == LayerTrailer && !lazySynced {
				// The go follows: from then on the spool may be the
				// domain's only copy of its held pages.
				if err := opts.Lazy.Sync(); err != nil {
					return err
				}
				lazySynced = true
			}
			if opts.BeforeTrailer != nil && t.Layer == LayerTrailer {
				if err := enc.Flush(); err != nil {
					return err
				}
				if err := opts.BeforeTrailer(); err != nil {
					return err
				}
				opts.BeforeTrailer = nil
			}
			if opts.Lazy != nil && t.Kind == TokPages {
				if x := rd.Libxc(); x != nil && (x.DomainType == DomainX86HVM || x.DomainType == DomainX86PVH) {
					if !lazyOn {
						if err := enc.frame(FrameLazyHello, false, lazyHello(opts.LazyName)); err != nil {
							return err
						}
						lazyOn = true
					}
					p, err := opts.Lazy.Hold(t.Page)
					if err != nil {
						return err
					}
					t.Page, t.Raw = p, p.Raw
				}
			}
			if lazyOn && t.Layer == LayerLibxc && t.Type == RecEnd {
				// Every held pfn is known: the destination gets the
				// manifest before the restore can end.
				for _, m := range opts.Lazy.manifestFrames() {
					if err := enc.frame(FrameLazyManifest, false, m); err != nil {
						return err
					}
				}
			}
			if opts.IndexFor != nil && t.Kind == TokPages {
				idx, err := opts.IndexFor(rd.XL())
				if err != nil {
					return err
				}
				opts.IndexFor = nil
				enc.SetIndex(idx)
			}
			if err := enc.WriteToken(t); err != nil {
				return err
			}
			if opts.Progress != nil && time.Since(last) >= opts.ProgressEvery {
				last = time.Now()
				mu.Lock()
				s := st
				mu.Unlock()
				s.Reader, s.Encode = rd.Stats(), enc.Stats()
				opts.Progress(s)
			}
		}
	}()
	if sendErr != nil && ctx.Err() != nil {
		sendErr = context.Cause(ctx) // why it ended, not the closed connection
	}
	if sendErr != nil {
		enc.Abort(sendErr)
		if c, ok := conn.(io.Closer); ok {
			c.Close()
		}
	}
	var pushErr error
	var backErr error
	if sendErr == nil && lazyOn {
		// xl's stream ended: on success the domain runs at the
		// destination, which now gets the rest, demand first. A failed
		// resume there ends the session (EXIT) and with it the push.
		pushDone := make(chan struct{})
		stopPush := make(chan struct{})
		if opts.LazyPushing != nil {
			opts.LazyPushing()
		}
		go func() {
			defer close(pushDone)
			pushErr = pushHeld(ctx, enc, opts, stopPush, func(pages int, compressed bool) {
				mu.Lock()
				defer mu.Unlock()
				pushed += int64(pages)
				if compressed {
					pushedZ += int64(pages)
				}
			})
		}()
		backErr = <-backDone
		close(stopPush)
		<-pushDone
		if pushErr != nil && backErr == nil && st.ExitStatus != 0 {
			backErr = pushErr
		}
	} else {
		backErr = <-backDone
	}
	if backErr != nil {
		enc.Abort(backErr)
	}
	mu.Lock()
	st.Reader, st.Encode = rd.Stats(), enc.Stats()
	st.LazyDemanded, st.LazyPushed, st.LazyPushedCompressed = demanded, pushed, pushedZ
	if lazyOn {
		st.LazyHeld = int64(opts.Lazy.Held())
	}
	mu.Unlock()
	if sendErr != nil {
		return st, fmt.Errorf("xlstream: send: %w", sendErr)
	}
	if backErr != nil {
		return st, fmt.Errorf("xlstream: send: %w", backErr)
	}
	return st, nil
}

// ReceiveOptions tune Receive.
type ReceiveOptions struct {
	// QueueBytes bounds the frames read ahead while a fallback page is
	// awaited (0: 64 MiB). It must exceed what the network buffers hold.
	QueueBytes int
	// FallbackTimeout bounds the wait for a fallback page (0: 2 minutes).
	FallbackTimeout time.Duration
	// Wait, when set, is called after the command's output ended and
	// returns its exit status, which is sent to the source.
	Wait func() int
	// Progress, when set, is called about every ProgressEvery.
	Progress      func(DecodeStats)
	ProgressEvery time.Duration
	// Lazy takes a domain whose RAM the source holds back (early
	// resume); nil refuses such a migration.
	Lazy LazySink
	// Resumed, when set, is called when the command ended well while held
	// pages are still coming: the domain runs here from then on.
	Resumed func()
}

// Receive is the destination side of a session: it rebuilds the stream
// from conn's frames into cmdIn (closed at the END frame), reading REF
// pages through res and asking the source for those that fail, and relays
// cmdOut (the local `xl migrate-receive`'s output) back to the source.
func Receive(ctx context.Context, conn io.ReadWriter, cmdIn io.WriteCloser, cmdOut io.Reader, res PageResolver, opts ReceiveOptions) (DecodeStats, error) {
	if opts.QueueBytes <= 0 {
		opts.QueueBytes = 64 << 20
	}
	if opts.FallbackTimeout <= 0 {
		opts.FallbackTimeout = 2 * time.Minute
	}
	var wmu sync.Mutex
	bw := bufio.NewWriterSize(conn, 64<<10)
	send := func(kind byte, body []byte) error {
		wmu.Lock()
		defer wmu.Unlock()
		if _, err := writeFrame(bw, kind, body); err != nil {
			return err
		}
		return bw.Flush()
	}
	u64 := func(v uint64) []byte { b := make([]byte, 8); binary.LittleEndian.PutUint64(b, v); return b }

	q := newFrameQueue(opts.QueueBytes)
	falls := make(chan []byte, 4)
	var lazy atomic.Bool // the source holds pages back (LAZYHELLO seen)
	var inflate lazyInflater
	go func() {
		defer inflate.close()
		// It keeps reading after END: fallback pages may follow it. It
		// ends when the connection does.
		br := bufio.NewReaderSize(conn, 1<<20)
		ended := false
		for {
			kind, body, err := readFrame(br, nil)
			if err != nil && lazy.Load() {
				opts.Lazy.Abort(fmt.Errorf("connection to the source: %w", err))
			}
			if err != nil {
				if ended {
					return
				}
				if errors.Is(err, io.EOF) {
					err = fmt.Errorf("%w: source closed the connection before END", ErrTruncated)
				}
				q.fail(err)
				return
			}
			if kind >= FrameLazyHello && kind <= FrameLazyPagesZ && kind != FrameDemand {
				if lerr := receiveLazy(opts.Lazy, kind, body, &lazy, &inflate, func(pfn uint64) error {
					return send(FrameDemand, u64(pfn))
				}); lerr != nil {
					if lazy.Load() {
						opts.Lazy.Abort(lerr)
					}
					q.fail(lerr)
					return
				}
				continue
			}
			if kind == FrameFallback {
				select {
				case falls <- body:
				default:
					q.fail(fmt.Errorf("%w: unrequested fallback pages", ErrBadFrame))
					return
				}
				continue
			}
			if ended {
				q.fail(fmt.Errorf("%w: frame kind %d after END", ErrBadFrame, kind))
				return
			}
			if !q.push(kind, body) {
				if lazy.Load() {
					// xl has its stream; the held pages still come.
					continue
				}
				return
			}
			ended = kind == FrameEnd
		}
	}()

	backDone := make(chan error, 1)
	go func() {
		buf := make([]byte, 64<<10)
		for {
			n, err := cmdOut.Read(buf)
			if n > 0 {
				if err := send(FrameBack, buf[:n]); err != nil {
					backDone <- fmt.Errorf("relay to source: %w", err)
					return
				}
			}
			if err != nil {
				if errors.Is(err, io.EOF) {
					err = nil
				}
				// The command's output ends only after it has the whole
				// stream (and its permission to go), unless it failed:
				// then nothing more is read for it, and the source must
				// learn so instead of waiting for a reply that cannot come.
				q.fail(ErrCommandEnded)
				backDone <- err
				return
			}
		}
	}()

	d := NewDecoder(cmdIn, res)
	defer d.Close()
	d.Ack = func(seq uint64) error { return send(FrameAck, u64(seq)) }
	d.Need = func(seq uint64) ([]byte, error) {
		if err := send(FrameNeed, u64(seq)); err != nil {
			return nil, err
		}
		t := time.NewTimer(opts.FallbackTimeout)
		defer t.Stop()
		select {
		case b := <-falls:
			if len(b) != 8+PageSize || binary.LittleEndian.Uint64(b) != seq {
				return nil, fmt.Errorf("%w: fallback frame of %d bytes does not answer REF %d", ErrBadFrame, len(b), seq)
			}
			return b[8:], nil
		case <-t.C:
			return nil, fmt.Errorf("no fallback page from the source within %v", opts.FallbackTimeout)
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	recvErr := func() error {
		last := time.Now()
		for {
			kind, body, err := q.pop()
			if err != nil {
				return err
			}
			done, err := d.Frame(kind, body)
			if err != nil {
				return err
			}
			if done {
				return nil
			}
			if opts.Progress != nil && time.Since(last) >= opts.ProgressEvery {
				last = time.Now()
				opts.Progress(d.Stats())
			}
		}
	}()
	q.fail(io.EOF) // stop the reader if it still runs
	cerr := cmdIn.Close()
	if errors.Is(recvErr, ErrCommandEnded) {
		// xl ended before the source's END frame came. That is how a
		// migration ends (the source sends END only once its xl has the
		// report and exits); xl's exit status says how it went.
		<-backDone
		st := -1
		if opts.Wait != nil {
			st = opts.Wait()
		}
		if st == 0 {
			return d.Stats(), finishReceive(opts, lazy.Load(), st, send)
		}
		_ = send(FrameExit, binary.LittleEndian.AppendUint32(nil, uint32(int32(st))))
		return d.Stats(), fmt.Errorf("xlstream: receive: %w", recvErr)
	}
	if recvErr != nil {
		// The command sees a cut stream and fails; its output still goes
		// back to the source's xl, which then resumes the domain there.
		<-backDone
		if opts.Wait != nil {
			st := opts.Wait()
			_ = send(FrameExit, binary.LittleEndian.AppendUint32(nil, uint32(int32(st))))
		}
		return d.Stats(), fmt.Errorf("xlstream: receive: %w", recvErr)
	}
	if cerr != nil {
		return d.Stats(), fmt.Errorf("xlstream: receive: close command input: %w", cerr)
	}
	if err := <-backDone; err != nil {
		return d.Stats(), fmt.Errorf("xlstream: receive: %w", err)
	}
	if opts.Wait != nil {
		return d.Stats(), finishReceive(opts, lazy.Load(), opts.Wait(), send)
	}
	return d.Stats(), nil
}

// finishReceive sends the command's exit status, once the held pages of an
// early resume are all in: the EXIT frame ends the source's session.
func finishReceive(opts ReceiveOptions, lazy bool, st int, send func(byte, []byte) error) error {
	exit := binary.LittleEndian.AppendUint32(nil, uint32(int32(st)))
	if st == 0 && opts.Lazy != nil && lazy {
		if opts.Resumed != nil {
			opts.Resumed()
		}
		if err := opts.Lazy.Wait(); err != nil {
			_ = send(FrameExit, exit)
			return fmt.Errorf("xlstream: receive: early resume: %w", err)
		}
	}
	if err := send(FrameExit, exit); err != nil {
		return fmt.Errorf("xlstream: receive: send exit status: %w", err)
	}
	return nil
}

// frameQueue is a FIFO of frames bounded in bytes (one frame always fits).
type frameQueue struct {
	mu    sync.Mutex
	cond  *sync.Cond
	kinds []byte
	items [][]byte
	bytes int
	limit int
	err   error
}

func newFrameQueue(limit int) *frameQueue {
	q := &frameQueue{limit: limit}
	q.cond = sync.NewCond(&q.mu)
	return q
}

func (q *frameQueue) push(kind byte, b []byte) bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) > 0 && q.bytes+len(b) > q.limit && q.err == nil {
		q.cond.Wait()
	}
	if q.err != nil {
		return false
	}
	q.kinds = append(q.kinds, kind)
	q.items = append(q.items, b)
	q.bytes += len(b)
	q.cond.Broadcast()
	return true
}

func (q *frameQueue) pop() (byte, []byte, error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	for len(q.items) == 0 && q.err == nil {
		q.cond.Wait()
	}
	if len(q.items) == 0 {
		return 0, nil, q.err
	}
	k, b := q.kinds[0], q.items[0]
	q.kinds, q.items = q.kinds[1:], q.items[1:]
	q.bytes -= len(b)
	q.cond.Broadcast()
	return k, b, nil
}

func (q *frameQueue) fail(err error) {
	q.mu.Lock()
	defer q.mu.Unlock()
	if q.err == nil {
		q.err = err
	}
	q.cond.Broadcast()
}

// receiveLazy hands an early-resume frame to sink.
func receiveLazy(sink LazySink, kind byte, body []byte, on *atomic.Bool, inf *lazyInflater, demand func(uint64) error) error {
	if sink == nil {
		return fmt.Errorf("%w: this destination cannot take a domain before its memory (no pager)", ErrLazyRefused)
	}
	switch kind {
	case FrameLazyHello:
		if on.Load() {
			return fmt.Errorf("%w: second LAZYHELLO", ErrBadFrame)
		}
		name, err := parseLazyHello(body)
		if err != nil {
			return err
		}
		if err := sink.Hello(name); err != nil {
			return fmt.Errorf("%w: %v", ErrLazyRefused, err)
		}
		on.Store(true)
		sink.Start(demand)
		return nil
	case FrameLazyManifest:
		if !on.Load() {
			return fmt.Errorf("%w: LAZYMANIFEST before LAZYHELLO", ErrBadFrame)
		}
		es, err := parseManifest(body)
		if err != nil {
			return err
		}
		return sink.Manifest(es)
	case FrameLazyPagesZ:
		if !on.Load() {
			return fmt.Errorf("%w: LAZYPAGESZ before LAZYHELLO", ErrBadFrame)
		}
		pfns, pages, err := inf.pages(body)
		if err != nil {
			return err
		}
		for i, pfn := range pfns {
			if err := sink.Page(pfn, pages[i*PageSize:(i+1)*PageSize]); err != nil {
				return err
			}
		}
		return nil
	default: // FrameLazyPage
		if !on.Load() || len(body) != 8+PageSize {
			return fmt.Errorf("%w: LAZYPAGE of %d bytes (early resume on: %v)", ErrBadFrame, len(body), on.Load())
		}
		return sink.Page(binary.LittleEndian.Uint64(body), body[8:])
	}
}

// lazyPusher sends the push's batches of held pages: each batch as one
// LAZYPAGESZ when compression is on and pays (wire.Compressor, on the
// push's rate or the link's as measured), else page by page; paced to
// LazyPushRate by the bytes that go on the link.
type lazyPusher struct {
	ctx    context.Context
	enc    *Encoder
	bucket *pace.Bucket
	comp   *wire.Compressor
	rate   float64 // configured push rate; 0: the link's, as measured

	pfns       []uint64
	frames     [][]byte // {pfn u64, page} as LazySource.page made them
	data, zbuf []byte
	compressed bool // the last batch went compressed
}

// pushHeld sends every held page not yet sent, in pfn order and in
// batches of lazyBatch, until none is left or stop is closed; sent is
// called after each batch. A page demanded meanwhile is skipped (its
// answer went).
func pushHeld(ctx context.Context, enc *Encoder, opts SendOptions, stop <-chan struct{}, sent func(pages int, compressed bool)) error {
	p, err := newLazyPusher(ctx, enc, opts)
	if err != nil {
		return err
	}
	defer p.close()
	var from uint64
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		p.reset()
		for len(p.pfns) < lazyBatch {
			pfn, ok := opts.Lazy.nextUnsent(from)
			if !ok {
				break
			}
			from = pfn + 1
			b, ok, err := opts.Lazy.page(pfn, false)
			if err != nil {
				return err
			}
			if ok {
				p.add(pfn, b)
			}
		}
		if len(p.pfns) == 0 {
			return enc.Flush()
		}
		// Flushed after each batch: a demand answer waits behind what the
		// push has buffered, never more than one batch.
		if err := p.send(); err != nil {
			return fmt.Errorf("push: %w", err)
		}
		sent(len(p.pfns), p.compressed)
	}
}

func newLazyPusher(ctx context.Context, enc *Encoder, opts SendOptions) (*lazyPusher, error) {
	p := &lazyPusher{ctx: ctx, enc: enc, bucket: pace.New(opts.LazyPushRate, 64<<10, true, "early-resume push"),
		rate: float64(max(opts.LazyPushRate, 0))}
	if opts.Compress {
		c, err := wire.NewCompressor(opts.LazyPushRate)
		if err != nil {
			return nil, fmt.Errorf("push: %w", err)
		}
		c.SetAlways(opts.CompressAlways)
		p.comp = c
	}
	return p, nil
}

func (p *lazyPusher) close() {
	if p.comp != nil {
		p.comp.Close()
	}
}

func (p *lazyPusher) reset() {
	p.pfns, p.frames, p.data = p.pfns[:0], p.frames[:0], p.data[:0]
	p.compressed = false
}

func (p *lazyPusher) add(pfn uint64, frame []byte) {
	p.pfns = append(p.pfns, pfn)
	p.frames = append(p.frames, frame)
	if p.comp != nil {
		p.data = append(p.data, frame[8:]...)
	}
}

func (p *lazyPusher) wait(n int) error {
	if p.bucket == nil {
		return nil
	}
	return p.bucket.Wait(p.ctx, n)
}

func (p *lazyPusher) send() error {
	if p.comp != nil {
		p.comp.SetLink(p.enc.linkRate(p.rate))
		if z, ok := p.comp.Compress(p.zbuf, p.data); ok {
			p.zbuf = z
			head := binary.LittleEndian.AppendUint32(make([]byte, 0, 4+8*len(p.pfns)), uint32(len(p.pfns)))
			for _, pfn := range p.pfns {
				head = binary.LittleEndian.AppendUint64(head, pfn)
			}
			if err := p.wait(len(head) + len(z)); err != nil {
				return err
			}
			p.compressed = true
			return p.enc.frame(FrameLazyPagesZ, true, head, z)
		}
	}
	for i, b := range p.frames {
		if err := p.wait(len(b)); err != nil {
			return err
		}
		if err := p.enc.frame(FrameLazyPage, i == len(p.frames)-1, b); err != nil {
			return err
		}
	}
	return nil
}

// lazyInflater decompresses LAZYPAGESZ frames (the destination's reading
// goroutine only): at most maxLazyBatch pages, exactly those the frame
// names.
type lazyInflater struct {
	z    inflater
	pfns []uint64
}

func (l *lazyInflater) pages(body []byte) ([]uint64, []byte, error) {
	if len(body) < 4 {
		return nil, nil, fmt.Errorf("%w: LAZYPAGESZ of %d bytes", ErrBadFrame, len(body))
	}
	n := int(binary.LittleEndian.Uint32(body))
	if n == 0 || n > maxLazyBatch || len(body) < 4+8*n {
		return nil, nil, fmt.Errorf("%w: LAZYPAGESZ of %d pages in %d bytes (at most %d pages)", ErrBadFrame, n, len(body), maxLazyBatch)
	}
	l.pfns = l.pfns[:0]
	for i := 0; i < n; i++ {
		l.pfns = append(l.pfns, binary.LittleEndian.Uint64(body[4+8*i:]))
	}
	l.z.max = maxLazyBatch * PageSize
	out, err := l.z.inflate(body[4+8*n:], n*PageSize, "LAZYPAGESZ")
	if err != nil {
		return nil, nil, err
	}
	return l.pfns, out, nil
}

func (l *lazyInflater) close() { l.z.close() }
