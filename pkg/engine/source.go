package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"math/bits"
	"net"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// Hooks connect a migration to its caller.
type Hooks struct {
	Log logr.Logger
	// Progress is called a few times per second (at most ~5/s) and once at the end.
	Progress func(Progress)
	// Disks are the indexes of the domain's disks for +dedup strategies
	// (nil: no dedup even if the strategy asks for it).
	Disks *dedup.Catalog
	// Committed, if set, is called once, synchronously, when the domain
	// was committed (dom.Commit) and just before "go" is sent: from then on
	// cancelling the migration no longer brings the domain back here. It
	// must return quickly (the domain is paused meanwhile).
	Committed func()
}

// Defaults.
const (
	DefaultStreams = 4
	// DefaultMaxDowntime aims under 50 ms with room for the noise of a
	// shared host: the policy counts the switch-over's fixed cost in it.
	// With 40 ms, pagecache's stop-and-copy carried ~830 pages and its
	// downtime reached 50 ms under a load of 5 (13-17 ms on a quiet
	// machine).
	DefaultMaxDowntime = 30 * time.Millisecond
	// checkpointEvery: how often the adaptive policy looks at a round in
	// progress (dirty log read, remaining work, rates).
	checkpointEvery = 50 * time.Millisecond
	// switchFixedCost is the part of a stop-and-copy downtime that is
	// neither page data nor manifest: final dirty log, vCPU state, the
	// complete/ready/go/resumed round trips and the destination's check,
	// as measured on the 2-core development VM (5–12 ms).
	switchFixedCost = 10 * time.Millisecond
	// RecoveryTimeout bounds how long a broken post-copy tries to reconnect.
	RecoveryTimeout = 60 * time.Second
)

// counters are the source's page counters, updated by every stream.
type counters struct {
	full, zero, disk, resent, fallbackSent, demand atomic.Uint64
}

// source is the state of one outgoing migration.
type source struct {
	dom      xenmem.SourceDomain
	addr     string
	opts     Options
	plan     Plan
	hooks    Hooks
	log      logr.Logger
	numPages uint64
	mem      []byte
	streams  int
	catalog  *dedup.Catalog
	lim      *limiter
	start    time.Time

	connMu    sync.Mutex // guards main, prio and the senders' conns (swapped by recovery)
	main      *conn
	prio      *conn
	senders   []*sender
	gen       atomic.Int32      // connection generation; readers of an old one stay quiet
	oldBytes  int64             // wire bytes of connections closed by recovery
	ctl       chan wire.Control // control messages from the destination
	results   chan error        // one per sender per forEachSender
	readErr   chan error        // first failure of a reader
	remoteErr atomic.Value      // error: what the destination said when it aborted

	hashes   []dedup.Hash   // per page: hash of the content last sent
	sentOnce *xenmem.Bitmap // pages sent at least once
	need     *xenmem.Bitmap // pages still to send (current round / push)
	hot      *xenmem.Bitmap // pages dirtied in the last round: push first
	cnt      counters

	phase     atomic.Value // Phase
	round     atomic.Int64
	dirtyRate atomic.Uint64
	percent   float64

	paused bool
	// frozen: the domain is paused here, so its memory holds still and
	// senders may classify a page in place instead of copying it first.
	frozen atomic.Bool
	// batchMax caps the full pages of a background batch (wire.MaxBatchPages
	// but during an inline-demand post-copy).
	batchMax atomic.Int64
	prepared bool // the destination created the target domain
	// committed: dom.Commit succeeded and "go" may have left: the source
	// must never resume the domain but on the destination's "discarded".
	committed atomic.Bool
	// discarded: the destination said it destroyed its copy after go.
	discarded atomic.Bool
	// verified: the destination's statistics said every page matched the
	// manifest (stop-and-copy "ready", post-copy "done"); release needs it.
	verified    bool
	preparedAt  atomic.Int64 // unix ns: when "prepared" arrived
	pausedAt    time.Time
	resumedAt   time.Time
	handshakeAt time.Time
	history     []RoundStats
	mirrorDone  chan error // durable post-copy mirror writer's result
	durable     bool       // the mirror was complete
	verdict     Verdict
	dst         dstStats
	costs       Costs
	// manifested: the whole manifest went before the pause; the
	// stop-and-copy then sends only the hashes of the pages it resends.
	manifested bool
}

// ErrCommittedFailure is wrapped by the error of a migration that failed
// after the point of no return without a verdict from the destination:
// the domain stays paused on the source, never resumed by the engine, and
// it is not released.
var ErrCommittedFailure = errors.New("engine: failed after the destination was told to run the domain")

// Migrate moves dom to the receiver at addr. It owns dom's life cycle for
// the migration: on success the source domain is released; on any failure
// before the destination is told to run the domain ("go", preceded by
// dom.Commit), the domain keeps (or resumes) running here. After that
// point a failure leaves it paused here and returns an error wrapping
// ErrCommittedFailure, unless the destination discarded its copy (then
// the domain is reclaimed here and the error wraps ErrDiscarded). The
// source releases the domain only when the destination verified every
// page. The caller closes dom afterwards; Close never resumes a committed
// domain.
func Migrate(ctx context.Context, dom xenmem.SourceDomain, addr string, opts Options, hooks Hooks) (res Result, err error) {
	s, err := newSource(dom, addr, opts, hooks)
	if err != nil {
		return Result{}, err
	}
	defer s.cleanup(&err)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stopProgress := s.reportProgress()
	defer stopProgress()

	steps := []struct {
		name string
		fn   func(context.Context) error
	}{
		{"connect", s.connect},
		{"handshake", s.handshake},
		{"pre-copy", s.precopy},
		{"switchover", s.switchover},
		{"release", s.release},
	}
	for _, st := range steps {
		t0 := time.Now()
		if err := st.fn(ctx); err != nil {
			return s.result(), fmt.Errorf("migrate %s to %s: %s: %w", dom.Info().Name, addr, st.name, err)
		}
		s.log.V(1).Info("Migration step done", "domain", dom.Info().Name, "step", st.name, "seconds", time.Since(t0).Seconds())
	}
	return s.result(), nil
}

func newSource(dom xenmem.SourceDomain, addr string, opts Options, hooks Hooks) (*source, error) {
	plan, err := resolvePlan(opts)
	if err != nil {
		return nil, err
	}
	if opts.LinkBytesPerSec < 0 {
		return nil, fmt.Errorf("engine: negative bandwidth %d", opts.LinkBytesPerSec)
	}
	if opts.Streams <= 0 {
		opts.Streams = DefaultStreams
	}
	if !opts.DemandPath.Valid() {
		return nil, fmt.Errorf("engine: unknown demand path %q (want %q or %q)", opts.DemandPath, DemandPriorityConn, DemandInline)
	}
	if opts.MaxDowntime <= 0 {
		opts.MaxDowntime = DefaultMaxDowntime
	}
	n := dom.NumPages()
	s := &source{
		dom: dom, addr: addr, opts: opts, plan: plan, hooks: hooks, log: hooks.Log,
		numPages: n, mem: dom.Memory(), streams: opts.Streams,
		lim: newLimiter(opts.LinkBytesPerSec), start: time.Now(),
		ctl: make(chan wire.Control, 16), readErr: make(chan error, 4), results: make(chan error, 64),
		hashes: make([]dedup.Hash, n), sentOnce: xenmem.NewBitmap(n),
		need: xenmem.NewBitmap(n), hot: xenmem.NewBitmap(n),
	}
	if plan.Dedup && plan.ElideZero {
		s.catalog = hooks.Disks
	}
	s.batchMax.Store(batchPages)
	s.phase.Store(PhaseConnecting)
	return s, nil
}

// cleanup runs exactly once, on every path: it closes the connections and,
// unless the destination was told to run the domain, leaves the domain
// running here.
func (s *source) cleanup(errp *error) {
	for _, c := range s.conns() {
		c.close()
	}
	for _, sd := range s.senders {
		if sd.comp != nil {
			sd.comp.Close()
		}
	}
	if *errp == nil {
		return
	}
	if s.committed.Load() {
		name := s.dom.Info().Name
		if s.discarded.Load() || errors.Is(*errp, ErrDiscarded) {
			// The destination destroyed its copy and says it never runs
			// it: the paused domain here is the only one.
			if err := s.dom.Reclaim("the destination discarded the domain after go: " + (*errp).Error()); err != nil {
				*errp = fmt.Errorf("%w; reclaiming it here failed, it stays paused on the source: %w", *errp, err)
				return
			}
			s.paused = false
			if !errors.Is(*errp, ErrDiscarded) {
				*errp = fmt.Errorf("%w: %w", ErrDiscarded, *errp)
			}
			s.log.Info("The destination discarded the domain; it runs on the source again", "domain", name, "error", (*errp).Error())
			return
		}
		if errors.Is(*errp, errUnverified) {
			*errp = fmt.Errorf("%w: %w; the domain %s stays paused on the source, the only verified copy: do not release it",
				ErrCommittedFailure, *errp, name)
		} else {
			*errp = fmt.Errorf("%w: %w; the domain %s stays paused on the source and is not released: "+
				"if it runs at the destination with verified memory, release it here; if the destination destroyed it or never resumed it, reclaim it here",
				ErrCommittedFailure, *errp, name)
		}
		s.log.Error(*errp, "Migration failed after the switch-over; the source keeps the domain paused and never resumes it", "domain", name)
		if s.mirrorDone != nil {
			if err := <-s.mirrorDone; err != nil {
				s.log.Error(err, "Durable post-copy mirror failed", "domain", s.dom.Info().Name)
			} else {
				s.log.Info("Durable post-copy mirror is complete: the destination can finish from it", "domain", s.dom.Info().Name, "dir", s.opts.DurableDir)
			}
		}
		return
	}
	_ = s.dom.DisableDirtyLog()
	if s.paused {
		s.frozen.Store(false)
		if err := s.dom.Resume(); err != nil {
			*errp = errors.Join(*errp, fmt.Errorf("resume %s on the source after the failure: %w", s.dom.Info().Name, err))
			return
		}
		s.paused = false
	}
	s.log.Info("Migration failed; the domain keeps running on the source", "domain", s.dom.Info().Name, "error", (*errp).Error())
}

func (s *source) conns() []*conn {
	s.connMu.Lock()
	defer s.connMu.Unlock()
	var cs []*conn
	if s.main != nil {
		cs = append(cs, s.main)
	}
	if s.prio != nil {
		cs = append(cs, s.prio)
	}
	for _, sd := range s.senders {
		cs = append(cs, sd.c)
	}
	return cs
}

// connect opens the main, data and priority connections.
func (s *source) connect(ctx context.Context) error {
	hello := func(role string, i int) wire.Control {
		return wire.Control{Kind: ctlHello, MigrationID: s.opts.MigrationID, Token: s.opts.Token, Stream: i, Streams: s.streams, Message: role}
	}
	// Each connection is registered as soon as it exists, so that cleanup
	// closes it whatever fails next.
	add := func(f func()) {
		s.connMu.Lock()
		f()
		s.connMu.Unlock()
	}
	t0 := time.Now()
	defer func() { s.costs.Connect = time.Since(t0) }()
	// The main connection first (the others attach to its session), then
	// the others at once: each hello is a round trip.
	main, err := dialStream(ctx, s.dial, s.addr, s.lim, hello(roleMain, 0))
	if err != nil {
		return err
	}
	add(func() { s.main = main })
	type dialed struct {
		i   int // stream index; -1 for the priority connection
		c   *conn
		err error
	}
	out := make(chan dialed, s.streams+1)
	for i := -1; i < s.streams; i++ {
		go func() {
			var c *conn
			var err error
			if i < 0 {
				c, err = dialStream(ctx, s.dial, s.addr, s.lim, hello(rolePrio, 0))
			} else {
				c, err = dialStream(ctx, s.dial, s.addr, s.lim, hello(roleData, i))
			}
			out <- dialed{i, c, err}
		}()
	}
	data := make([]*conn, s.streams)
	var prio *conn
	var first error
	for range s.streams + 1 {
		d := <-out
		switch {
		case d.err != nil:
			if first == nil {
				first = d.err
			}
		case d.i < 0:
			prio = d.c
		default:
			data[d.i] = d.c
		}
	}
	if first != nil {
		for _, c := range append(data, prio) {
			if c != nil {
				c.close()
			}
		}
		return first
	}
	for i := range s.streams {
		sd, err := newSender(s, i, data[i])
		if err != nil {
			for _, c := range append(data[i:], prio) {
				c.close()
			}
			return err
		}
		add(func() { s.senders = append(s.senders, sd) })
	}
	add(func() { s.prio = prio })
	for _, sd := range s.senders {
		go sd.loop(ctx)
	}
	go s.readMain(main, 0)
	go s.servePrio(ctx, prio, 0)
	return nil
}

// handshake sends the header; the destination creates the target domain
// meanwhile (awaitPrepared).
func (s *source) handshake(ctx context.Context) error {
	info := s.dom.Info()
	cfg, err := json.Marshal(info)
	if err != nil {
		return fmt.Errorf("encode domain config: %w", err)
	}
	flags := uint64(0)
	if !s.plan.ElideZero {
		flags |= wire.FlagXenMode
	}
	if s.catalog != nil {
		flags |= wire.FlagDedup
	}
	if s.opts.Compress {
		flags |= wire.FlagCompress
	}
	h := wire.Header{Version: wire.Version, PageShift: xenmem.PageShift, NumPages: s.numPages, Flags: flags, Config: cfg}
	s.handshakeAt = time.Now()
	return s.main.send(ctx, wire.TypeHeader, h.Marshal(nil))
}

// awaitPrepared waits until the destination has created the target domain.
// The first round's cheap pass runs before it, while the destination
// prepares: its records wait in the socket buffers.
func (s *source) awaitPrepared(ctx context.Context) error {
	if s.prepared {
		return nil
	}
	if _, err := s.waitControl(ctx, ctlPrepared, 60*time.Second); err != nil {
		return fmt.Errorf("destination did not prepare the domain: %w", err)
	}
	s.prepared = true
	s.costs.Handshake = time.Unix(0, s.preparedAt.Load()).Sub(s.handshakeAt)
	return nil
}

// waitControl waits for a control message of the given kind.
func (s *source) waitControl(ctx context.Context, kind string, timeout time.Duration) (wire.Control, error) {
	t := time.NewTimer(timeout)
	defer t.Stop()
	for {
		select {
		case m := <-s.ctl:
			if m.Kind == ctlError {
				return m, remoteError(m)
			}
			if m.Kind == ctlDiscarded {
				return m, discardedError(m)
			}
			if m.Kind == kind {
				return m, nil
			}
			s.log.V(1).Info("Ignored an unexpected control message", "kind", m.Kind, "waiting", kind)
		case err := <-s.readErr:
			s.fail(err)
			return wire.Control{}, s.explain(err)
		case <-t.C:
			return wire.Control{}, fmt.Errorf("no %q from the destination within %v", kind, timeout)
		case <-ctx.Done():
			return wire.Control{}, ctx.Err()
		}
	}
}

// readMain reads the destination's messages on the main connection.
func (s *source) readMain(main *conn, gen int32) {
	var pfns []uint64
	fail := func(err error) {
		if s.gen.Load() == gen {
			s.fail(err)
		}
	}
	for {
		rec, err := main.r.Next()
		if err != nil {
			fail(fmt.Errorf("main connection: %w: %w", errConnLost, err))
			return
		}
		switch rec.Type {
		case wire.TypeControl:
			m, err := wire.ParseControl(rec.Body)
			if err != nil {
				fail(err)
				return
			}
			switch m.Kind {
			case ctlPrepared:
				s.preparedAt.CompareAndSwap(0, time.Now().UnixNano())
			case ctlError:
				s.remoteErr.Store(remoteError(m))
			case ctlDiscarded:
				// Kept apart from the queue too: whichever step fails
				// next (a push, a reconnect) must not outlive it.
				if s.committed.Load() {
					s.discarded.Store(true)
				}
				s.remoteErr.Store(discardedError(m))
			}
			s.ctl <- m
		case wire.TypeRequest:
			var reason uint32
			reason, pfns, err = wire.ParseRequest(rec.Body, pfns[:0])
			if err != nil {
				fail(err)
				return
			}
			if reason != wire.ReasonFallback {
				fail(fmt.Errorf("request reason %d on the main connection: %w", reason, wire.ErrMalformed))
				return
			}
			if err := s.queueFallback(pfns); err != nil {
				fail(err)
				return
			}
		default:
			fail(fmt.Errorf("unexpected %v record from the destination: %w", rec.Type, wire.ErrMalformed))
			return
		}
	}
}

// queueFallback hands each pfn to the sender of its partition.
func (s *source) queueFallback(pfns []uint64) error {
	per := make([][]uint64, s.streams)
	for _, p := range pfns {
		if p >= s.numPages {
			return fmt.Errorf("fallback request for pfn %d beyond %d pages: %w", p, s.numPages, wire.ErrMalformed)
		}
		i := partition(p, s.streams)
		per[i] = append(per[i], p)
	}
	for i, ps := range per {
		if len(ps) > 0 {
			s.senders[i].fallback <- ps
		}
	}
	return nil
}

func (s *source) fail(err error) {
	select {
	case s.readErr <- err:
	default:
	}
}

// explain prefers the destination's own account of a failure: when it
// aborts it sends an error on the main connection and closes every
// connection, and another reader may see the close first.
func (s *source) explain(err error) error {
	if errors.Is(err, ErrRemote) {
		return err
	}
	for deadline := time.Now().Add(300 * time.Millisecond); time.Now().Before(deadline); time.Sleep(5 * time.Millisecond) {
		if r, _ := s.remoteErr.Load().(error); r != nil {
			return fmt.Errorf("%w (%v)", r, err)
		}
	}
	return err
}

// precopy runs pre-copy rounds until the policy stops them. The policy
// decides at every round's end and, for the adaptive one, at checkpoints
// inside a round (checkpointEvery): it may stop the round where it is,
// to finish with a stop-and-copy or to switch to post-copy.
//
// Every round, the first included, is one classified pass: zero pages
// and disk references travel beside full pages, so the destination
// resolves references while full pages stream, not in a drain or a
// downtime. The source does not wait for the destination to create the
// domain before the first pages: they wait in the socket buffers.
func (s *source) precopy(ctx context.Context) error {
	if s.plan.PostCopy == PostCopyImmediate {
		asetAll(s.need)
		s.verdict = Verdict{SwitchToPostCopy, "post-copy from the start: no pre-copy round"}
		return nil
	}
	t0 := time.Now()
	if err := s.dom.EnableDirtyLog(); err != nil {
		return fmt.Errorf("enable dirty log: %w", err)
	}
	s.log.V(1).Info("Dirty log enabled", "domain", s.dom.Info().Name, "seconds", time.Since(t0).Seconds())
	s.phase.Store(PhasePreCopy)
	policy := PolicyFor(s.plan.Policy)
	asetAll(s.need)
	dirty := xenmem.NewBitmap(s.numPages)
	var stop atomic.Bool
	var decided *Verdict // a checkpoint's verdict, which ended its round
	for r := 0; ; r++ {
		s.round.Store(int64(r))
		before := s.wireBytes()
		sentBefore := s.pagesSent()
		t0 := time.Now()
		s.hot.Reset()
		lastAt := t0
		var tick func(now time.Time)
		if s.plan.Policy == PolicyAdaptive {
			tick = func(now time.Time) {
				if stop.Load() {
					return
				}
				dirty.Reset()
				if err := s.dom.ReadDirty(dirty); err != nil {
					s.log.Error(err, "Read the dirty log at a checkpoint; the round goes on", "domain", s.dom.Info().Name)
					return
				}
				aor(s.need, dirty)
				s.hot.Or(dirty)
				in := s.policyInput(true, t0, now, before, dirty.Count(), now.Sub(lastAt))
				lastAt = now
				if v := policy(in); v.Decision != Continue {
					decided = &v
					stop.Store(true)
					s.log.V(1).Info("Pre-copy checkpoint decided", "round", r, "ms", now.Sub(t0).Milliseconds(), "remainingPages", in.RemainingPages,
						"wireMBps", in.WireRate/1e6, "dirtyMBps", in.DirtyRate/1e6, "decision", v.Decision.String(), "reason", v.Reason)
				}
			}
		}
		if err := s.forEachSenderTick(ctx, func(ctx context.Context, sd *sender) error {
			return sd.sendSet(ctx, s.need, nil, &stop, sendClassified)
		}, tick); err != nil {
			return err
		}
		if r == 0 {
			if err := s.awaitPrepared(ctx); err != nil {
				return err
			}
		}
		dirty.Reset()
		if err := s.dom.ReadDirty(dirty); err != nil {
			return fmt.Errorf("read dirty log: %w", err)
		}
		aor(s.need, dirty)
		s.hot.Or(dirty)
		st := RoundStats{Round: r, PagesSent: s.pagesSent() - sentBefore, WireBytes: s.wireBytes() - before,
			Duration: time.Since(t0), DirtyPages: acount(s.need), Elapsed: time.Since(s.start)}
		s.history = append(s.history, st)
		if st.Duration > 0 {
			s.dirtyRate.Store(uint64(float64(s.hot.Count()*xenmem.PageSize) / st.Duration.Seconds()))
		}
		if decided != nil {
			s.verdict = *decided
			break
		}
		in := s.policyInput(false, t0, time.Now(), before, dirty.Count(), time.Since(lastAt))
		s.verdict = policy(in)
		s.log.V(1).Info("Pre-copy round ended", "round", r, "sent", st.PagesSent, "dirty", st.DirtyPages, "wireBytes", st.WireBytes, "decision", s.verdict.Decision.String(), "reason", s.verdict.Reason)
		if s.verdict.Decision != Continue {
			break
		}
	}
	if s.verdict.Decision == Abort {
		return fmt.Errorf("pre-copy policy aborted: %s", s.verdict.Reason)
	}
	return nil
}

// policyInput describes the migration now for the policy. roundStart and
// roundBytes (the wire bytes when it began) delimit the current round;
// justDirtied pages were dirtied over the last interval.
func (s *source) policyInput(checkpoint bool, roundStart, now time.Time, roundBytes int64, justDirtied uint64, interval time.Duration) PolicyInput {
	in := PolicyInput{History: s.history, NumPages: s.numPages, MaxDowntime: s.opts.MaxDowntime,
		AllowPostCopy: s.plan.PostCopy != PostCopyNever, CompletionTimeout: s.opts.CompletionTimeout,
		Checkpoint: checkpoint, Elapsed: now.Sub(s.start)}
	// The rate of the last round, within the cap; before one ended, the
	// cap. The round in progress is no measure: its first pages wait in
	// socket buffers while the destination creates the domain, and a
	// sender's batch counts as sent before its bytes leave.
	capRate := float64(s.opts.LinkBytesPerSec)
	if n := len(s.history); n > 0 && s.history[n-1].Duration > 0 {
		in.WireRate = float64(s.history[n-1].WireBytes) / s.history[n-1].Duration.Seconds()
	}
	if capRate > 0 && (in.WireRate <= 0 || in.WireRate > capRate) {
		in.WireRate = capRate
	}
	if in.WireRate <= 0 {
		in.WireRate = 1e9
	}
	if interval > 0 {
		in.DirtyRate = float64(justDirtied*xenmem.PageSize) / interval.Seconds()
	}
	// Pages still to send: those never sent cost what the pages sent so
	// far cost on average (zero pages and references are cheap), those
	// sent and dirtied since travel whole.
	var fresh, again uint64
	need, once := s.need.Words(), s.sentOnce.Words()
	for i := range need {
		w := atomic.LoadUint64(&need[i])
		if w == 0 {
			continue
		}
		o := atomic.LoadUint64(&once[i])
		again += uint64(bits.OnesCount64(w & o))
		fresh += uint64(bits.OnesCount64(w &^ o))
	}
	// The wire cost of the pages classified so far, by class (counted
	// when classified, before their batch leaves).
	perPage := float64(xenmem.PageSize + 8)
	full, zero, disk := s.cnt.full.Load(), s.cnt.zero.Load(), s.cnt.disk.Load()
	if n := full + zero + disk; n > 0 {
		perPage = (float64(full)*(xenmem.PageSize+8) + float64(zero)*8 + float64(disk)*40) / float64(n)
	}
	in.RemainingPages, in.UnsentPages = fresh+again, fresh
	in.RemainingBytes = int64(float64(fresh)*perPage) + int64(again)*(xenmem.PageSize+16)
	// What a stop-and-copy adds to the page data: the fixed part and the
	// manifest of the pages it resends (the rest went before the pause).
	in.SwitchCost = switchFixedCost + time.Duration(float64(in.RemainingPages*24)/in.WireRate*float64(time.Second))
	return in
}

// forEachSender runs fn on every sender's goroutine and waits for all of
// them. The first failure (theirs or a reader's) cancels the others.
func (s *source) forEachSender(ctx context.Context, fn func(context.Context, *sender) error) error {
	return s.forEachSenderTick(ctx, fn, nil)
}

// forEachSenderTick is forEachSender that calls tick every
// checkpointEvery while the senders work (nil: never).
func (s *source) forEachSenderTick(ctx context.Context, fn func(context.Context, *sender) error, tick func(time.Time)) error {
	cctx, cancel := context.WithCancel(ctx)
	defer cancel()
	var tc <-chan time.Time
	if tick != nil {
		t := time.NewTicker(checkpointEvery)
		defer t.Stop()
		tc = t.C
	}
	for _, sd := range s.senders {
		select {
		case sd.cmds <- func() error { return fn(cctx, sd) }:
		case err := <-s.readErr:
			s.fail(err)
			return s.explain(err)
		}
	}
	var first error
	for got := 0; got < len(s.senders); {
		select {
		case now := <-tc:
			tick(now)
		case err := <-s.results:
			got++
			if err != nil && first == nil {
				first = err
				cancel()
			}
		case err := <-s.readErr:
			s.fail(err) // keep it for the next waiter
			if first == nil {
				first = err
				cancel()
				// Unblock writes stuck on a peer that stopped reading.
				for _, sd := range s.senders {
					sd.c.close()
				}
			}
			s.drainResults(len(s.senders) - got)
			return s.explain(first)
		}
	}
	if first != nil {
		// A sender's write failed: when the destination refused something,
		// its reason is on the main connection, maybe a moment behind the
		// reset that broke this stream.
		return s.explain(first)
	}
	return nil
}

// drainResults collects what is left of a forEachSender after a failure.
func (s *source) drainResults(n int) {
	t := time.After(10 * time.Second)
	for range n {
		select {
		case <-s.results:
		case <-t:
			return
		}
	}
}

// drain waits, with the domain still running here, until the destination
// has installed everything sent so far. Disk references cost the source 40
// bytes each but the destination a read and a hash; the first round sends
// them ahead of full pages, so at the switch the destination may hold a
// backlog of them. Resolving it before the pause keeps it out of the
// downtime; pages the domain dirties meanwhile are in the final dirty log.
// The same holds for a stop-and-copy: the policy predicted the downtime
// from the dirty set and the link rate, not from the destination's
// backlog. Not in the xen strategy, which replicates libxc (whose receiver
// works through its backlog after the pause).
//
// Before a stop-and-copy the whole manifest goes with the drain, while
// the destination installs: after the pause only the hashes of the pages
// resent then follow (1 MiB per 256 MiB of memory: 8 ms of a 1 Gbit/s
// link, 34 ms at 1 GiB, taken out of the downtime).
func (s *source) drain(ctx context.Context) error {
	if len(s.history) == 0 || s.plan.Policy == PolicyXen {
		return nil
	}
	t0 := time.Now()
	defer func() { s.costs.Drain = time.Since(t0) }()
	if err := s.markers(ctx, ctlDrain); err != nil {
		return err
	}
	markersSent := time.Since(t0)
	// A destination that refused something sent before closes the main
	// connection after saying why: prefer its reason to the broken pipe.
	if s.verdict.Decision == StopAndCopy {
		if err := s.sendManifest(ctx); err != nil {
			return s.explain(err)
		}
		s.manifested = true
	}
	if err := s.main.sendControl(ctx, &wire.Control{Kind: ctlDrain}); err != nil {
		return s.explain(err)
	}
	if _, err := s.waitControl(ctx, ctlDrained, 5*time.Minute); err != nil {
		return fmt.Errorf("destination did not install the pre-copied pages: %w", err)
	}
	s.log.V(2).Info("Destination drained before the pause", "domain", s.dom.Info().Name, "ms", time.Since(t0).Milliseconds(), "markersSentMs", markersSent.Milliseconds())
	return nil
}

// downtimeStep logs how far into the downtime a switch-over step ended.
func (s *source) downtimeStep(step string) {
	s.log.V(2).Info("Switch-over step done", "domain", s.dom.Info().Name, "step", step, "sincePauseMs", float64(time.Since(s.pausedAt).Microseconds())/1000)
}

func (s *source) markers(ctx context.Context, phase string) error {
	return s.forEachSender(ctx, func(ctx context.Context, sd *sender) error { return sd.marker(ctx, phase) })
}

// switchover pauses the domain and hands it over, by stop-and-copy or by
// early resume.
func (s *source) switchover(ctx context.Context) error {
	if err := s.awaitPrepared(ctx); err != nil {
		return err
	}
	if err := s.drain(ctx); err != nil {
		return err
	}
	if err := s.dom.Pause(); err != nil {
		return fmt.Errorf("pause: %w", err)
	}
	s.paused = true
	s.frozen.Store(true)
	s.pausedAt = time.Now()
	if len(s.history) > 0 { // the dirty log is on
		final := xenmem.NewBitmap(s.numPages)
		if err := s.dom.ReadDirty(final); err != nil {
			return fmt.Errorf("read final dirty log: %w", err)
		}
		aor(s.need, final)
		s.hot.Or(final)
		// The dirty log stays on: switching it off walks every page
		// table entry (10-15 ms at 256 MiB here), which the downtime
		// need not pay. A released domain takes it along; a failure
		// before "go" switches it off in cleanup, and Close does after.
		s.downtimeStep("final dirty log")
	}
	if s.verdict.Decision == SwitchToPostCopy {
		return s.postcopy(ctx)
	}
	return s.stopAndCopy(ctx)
}

func (s *source) stopAndCopy(ctx context.Context) error {
	s.phase.Store(PhaseStopAndCopy)
	var resent *xenmem.Bitmap
	if s.manifested {
		resent = xenmem.NewBitmap(s.numPages)
		resent.CopyFrom(s.need)
	}
	if err := s.forEachSender(ctx, func(ctx context.Context, sd *sender) error {
		if err := sd.sendSet(ctx, s.need, nil, nil, sendClassified); err != nil {
			return err
		}
		return sd.marker(ctx, ctlComplete)
	}); err != nil {
		return err
	}
	if err := s.sendState(ctx); err != nil {
		return err
	}
	if resent != nil {
		if err := s.sendManifestOf(ctx, resent); err != nil {
			return err
		}
	} else if err := s.sendManifest(ctx); err != nil {
		return err
	}
	if err := s.main.sendControl(ctx, &wire.Control{Kind: ctlComplete}); err != nil {
		return err
	}
	s.downtimeStep("data, state and manifest sent")
	// The destination resolves references, fetches fallbacks and checks
	// every page against the manifest before it answers.
	tc := time.Now()
	m, err := s.waitControl(ctx, ctlReady, 5*time.Minute)
	s.costs.Complete = time.Since(tc)
	if err != nil {
		return fmt.Errorf("destination did not confirm the memory: %w", err)
	}
	// Not committed yet: a destination that did not verify every page
	// is never told to run the domain, which resumes here.
	if err := s.readVerified(m); err != nil {
		return fmt.Errorf("destination answered ready without verified memory, so it was not told to run the domain: %w", err)
	}
	return s.commit(ctx)
}

// commit tells the destination to run the domain and waits until it does.
// dom.Commit comes first: from the "go" on the source never resumes the
// domain, whatever path closes it; if the answer is lost it stays paused
// for a verdict (the destination's "discarded", or an operator's from
// observed facts), never runs twice.
func (s *source) commit(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return err // cancelled before the point of no return: resume here
	}
	if err := s.dom.Commit(); err != nil {
		return fmt.Errorf("commit the domain before go: %w", err)
	}
	s.committed.Store(true)
	if s.hooks.Committed != nil {
		s.hooks.Committed()
	}
	if err := s.main.sendControl(ctx, &wire.Control{Kind: ctlGo}); err != nil {
		return err
	}
	m, err := s.waitControl(ctx, ctlResumed, 60*time.Second)
	if err != nil {
		return fmt.Errorf("no confirmation that the domain resumed at the destination (the source keeps it paused): %w", err)
	}
	s.resumedAt = time.Now()
	s.readStats(m)
	return nil
}

func (s *source) readStats(m wire.Control) {
	if len(m.Data) > 0 {
		if err := json.Unmarshal(m.Data, &s.dst); err != nil {
			s.log.Error(err, "Ignored malformed destination statistics")
		}
	}
}

// readVerified reads the statistics of a stop-and-copy "ready" or a
// post-copy "done" and fails unless they say that every page matched the
// manifest: only such an answer lets the source release the domain.
func (s *source) readVerified(m wire.Control) error {
	var st dstStats
	if len(m.Data) == 0 {
		return fmt.Errorf("%q carried no statistics", m.Kind)
	}
	if err := json.Unmarshal(m.Data, &st); err != nil {
		return fmt.Errorf("%q statistics: %w: %w", m.Kind, err, wire.ErrMalformed)
	}
	s.dst = st
	if !st.Verified {
		if st.Mismatches > 0 {
			return fmt.Errorf("%w: %q says %d pages do not match the manifest", errUnverified, m.Kind, st.Mismatches)
		}
		return fmt.Errorf("%w: %q does not say that every page matched the manifest", errUnverified, m.Kind)
	}
	s.verified = true
	return nil
}

// errUnverified marks a destination answer that did not verify the memory.
var errUnverified = errors.New("memory not verified at the destination")

// discardedError is the error of a "discarded" from the destination.
func discardedError(m wire.Control) error {
	if m.Message == "" {
		return fmt.Errorf("%w: %w", ErrRemote, ErrDiscarded)
	}
	return fmt.Errorf("%w: %w: %s", ErrRemote, ErrDiscarded, m.Message)
}

// dial opens one connection to the destination: Options.Dial, or plain TCP.
func (s *source) dial(ctx context.Context, addr string) (net.Conn, error) {
	if s.opts.Dial != nil {
		return s.opts.Dial(ctx, addr)
	}
	d := net.Dialer{Timeout: 10 * time.Second}
	return d.DialContext(ctx, "tcp", addr)
}

func (s *source) sendState(ctx context.Context) error {
	st, err := s.dom.SaveState()
	if err != nil {
		return fmt.Errorf("save vCPU state: %w", err)
	}
	return s.main.sendAs(ctx, true, wire.TypeState, st)
}

// sendManifest sends the hash of every page as last sent.
func (s *source) sendManifest(ctx context.Context) error {
	t0 := time.Now()
	defer func() { s.costs.Manifest += time.Since(t0) }()
	const per = 1 << 16
	hs := make([][16]byte, 0, per)
	var body []byte
	for first := uint64(0); first < s.numPages; first += per {
		hs = hs[:0]
		for p := first; p < min(first+per, s.numPages); p++ {
			hs = append(hs, s.hashes[p])
		}
		body = wire.MarshalManifest(body[:0], first, hs)
		if err := s.main.send(ctx, wire.TypeManifest, body); err != nil {
			return err
		}
	}
	return nil
}

// sendManifestOf sends the hashes of the pages set in b, one manifest
// record per run of consecutive pages, flushed once.
func (s *source) sendManifestOf(ctx context.Context, b *xenmem.Bitmap) error {
	t0 := time.Now()
	defer func() { s.costs.Manifest += time.Since(t0) }()
	var bodies [][]byte
	var body []byte
	flush := func() error {
		if len(bodies) == 0 {
			return nil
		}
		err := s.main.sendBatch(ctx, wire.TypeManifest, bodies)
		bodies, body = bodies[:0], nil
		return err
	}
	hs := make([][16]byte, 0, 64)
	for p := b.Next(0); p < s.numPages; {
		q := p
		hs = hs[:0]
		for q < s.numPages && b.Test(q) && len(hs) < 1<<16 {
			hs = append(hs, s.hashes[q])
			q++
		}
		start := len(body)
		body = wire.MarshalManifest(body, p, hs)
		bodies = append(bodies, body[start:])
		if len(body) >= 256<<10 {
			if err := flush(); err != nil {
				return err
			}
		}
		p = b.Next(q)
	}
	return flush()
}

// postcopy resumes the domain at the destination and pushes what is left.
func (s *source) postcopy(ctx context.Context) error {
	s.phase.Store(PhasePostCopy)
	if err := s.markers(ctx, ctlPostCopy); err != nil {
		return err
	}
	s.downtimeStep("data streams drained")
	if err := s.sendState(ctx); err != nil {
		return err
	}
	if s.opts.DurableDir != "" {
		// The mirror must complete even if this migration fails: that is
		// when the destination needs it.
		s.startMirror(context.WithoutCancel(ctx))
	}
	body := wire.MarshalBitmap(nil, 0, s.numPages, s.need.Words())
	if err := s.main.sendAs(ctx, true, wire.TypeBitmap, body); err != nil {
		return err
	}
	if err := s.main.sendControl(ctx, &wire.Control{Kind: ctlPostCopy}); err != nil {
		return err
	}
	if _, err := s.waitControl(ctx, ctlReady, 60*time.Second); err != nil {
		return fmt.Errorf("destination not ready for post-copy: %w", err)
	}
	s.downtimeStep("destination armed lazy loading")
	if err := s.commit(ctx); err != nil {
		return err
	}
	s.downtimeStep("destination resumed")
	// Point of no return. If the link breaks from here on, reconnect and
	// continue from what the destination has.
	var deadline time.Time
	for {
		err := s.pushRest(ctx)
		if err == nil {
			return nil
		}
		if ctx.Err() != nil || !errors.Is(err, errConnLost) || errors.Is(err, ErrRemote) {
			return err
		}
		if s.discarded.Load() {
			// The destination destroyed its copy and closed the link:
			// nothing to reconnect to.
			return fmt.Errorf("%w: %w", ErrDiscarded, err)
		}
		if deadline.IsZero() {
			deadline = time.Now().Add(s.recoveryTimeout())
		}
		s.log.Info("Lost the destination during post-copy; reconnecting", "domain", s.dom.Info().Name, "error", err.Error())
		if rerr := s.reconnect(ctx, deadline); rerr != nil {
			return fmt.Errorf("post-copy recovery: %w (connection lost: %v); the domain stays paused here and runs, waiting on missing pages, at the destination", rerr, err)
		}
		s.log.Info("Reconnected; post-copy continues", "domain", s.dom.Info().Name, "missingPages", acount(s.need))
	}
}

func (s *source) recoveryTimeout() time.Duration {
	if s.opts.RecoveryTimeout > 0 {
		return s.opts.RecoveryTimeout
	}
	return RecoveryTimeout
}

// pushRest pushes every page the destination still needs — the working
// set first, then the rest — while the priority path answers faults ahead
// of the push; then sends the manifest and waits until the destination has
// every page.
func (s *source) pushRest(ctx context.Context) error {
	s.phase.Store(PhasePostCopy)
	if s.opts.DemandPath == DemandInline {
		// An inline answer waits for whatever of the push its stream holds
		// already: keep that to one small batch plus a small socket buffer.
		s.batchMax.Store(inlineBatchPages)
		for _, sd := range s.senders {
			if tc := TCPConn(sd.c.c); tc != nil {
				_ = tc.SetWriteBuffer(inlineSocketBuffer)
			}
		}
	} else {
		s.batchMax.Store(pushBatchPages)
	}
	if err := s.forEachSender(ctx, func(ctx context.Context, sd *sender) error {
		// Zero pages and disk references first: they cost the wire almost
		// nothing, and once there a vCPU touching one of those pages waits
		// for a local install, not for a round trip to this host.
		if err := sd.sendSet(ctx, s.need, s.hot, nil, sendOnlyCheap); err != nil {
			return err
		}
		if err := sd.sendSet(ctx, s.need, s.hot, nil, sendClassified); err != nil {
			return err
		}
		if err := sd.sendSet(ctx, s.need, nil, nil, sendClassified); err != nil {
			return err
		}
		return sd.marker(ctx, ctlPushed)
	}); err != nil {
		return err
	}
	if err := s.sendManifest(ctx); err != nil {
		return err
	}
	if err := s.main.sendControl(ctx, &wire.Control{Kind: ctlPushed}); err != nil {
		return err
	}
	tc := time.Now()
	m, err := s.waitControl(ctx, ctlDone, 5*time.Minute)
	s.costs.Complete = time.Since(tc)
	if err != nil {
		return fmt.Errorf("post-copy did not complete: %w", err)
	}
	if err := s.readVerified(m); err != nil {
		// The destination runs a copy that does not match: the paused one
		// here is the only good copy. A destination that destroys its
		// copy says so next ("discarded"); wait a moment for it.
		if _, werr := s.waitControl(ctx, ctlDiscarded, discardGrace); errors.Is(werr, ErrDiscarded) {
			return werr
		}
		return fmt.Errorf("%w: the destination runs a copy whose memory does not match the source's: "+
			"stop and destroy it there, then reclaim the paused domain here", err)
	}
	return nil
}

// discardGrace is how long a source that got an unverified "done" waits
// for the destination's "discarded" before it gives up on a verdict.
const discardGrace = 5 * time.Second

// servePrio answers demand and fallback requests on the priority
// connection, ahead of every background page.
func (s *source) servePrio(ctx context.Context, prio *conn, gen int32) {
	var pfns []uint64
	fail := func(err error) {
		if s.gen.Load() == gen {
			s.fail(err)
		}
	}
	// Requests: from the socket to the answer's write on one real-time
	// thread that the kernel wakes itself (postcopy.PinRealtime); the
	// goroutine ends with the connection, and the thread with it.
	postcopy.PinRealtime(s.log, "demand request server")
	prio.pollReads()
	sd := newAnswerer(s, prio)
	sd.urgent = false // the priority connection draws without waiting anyway
	inline := s.opts.DemandPath == DemandInline
	for {
		rec, err := prio.r.Next()
		if err != nil {
			fail(fmt.Errorf("priority connection: %w: %w", errConnLost, err))
			return
		}
		if rec.Type != wire.TypeRequest {
			fail(fmt.Errorf("unexpected %v record on the priority connection: %w", rec.Type, wire.ErrMalformed))
			return
		}
		var reason uint32
		reason, pfns, err = wire.ParseRequest(rec.Body, pfns[:0])
		if err != nil {
			fail(err)
			return
		}
		for _, p := range pfns {
			if p >= s.numPages {
				fail(fmt.Errorf("request for pfn %d beyond %d pages: %w", p, s.numPages, wire.ErrMalformed))
				return
			}
		}
		if inline && reason != wire.ReasonFallback {
			// Hand each partition's share to its stream's sender.
			for i := 0; i < len(pfns); {
				j, part := i+1, partition(pfns[i], s.streams)
				for j < len(pfns) && partition(pfns[j], s.streams) == part {
					j++
				}
				select {
				case s.senders[part].demand <- demandReq{reason: reason, pfns: append([]uint64(nil), pfns[i:j]...)}:
				case <-ctx.Done():
					return
				}
				i = j
			}
			continue
		}
		if err := s.answer(ctx, sd, reason, pfns); err != nil {
			fail(err)
			return
		}
	}
}

// batchPages caps the full pages of a background batch: 1 MiB, a few ms
// of the link. When the policy stops a round, each sender still sends the
// batch it has begun, which the drain then waits for, and whose hot pages
// the guest dirties again; with wire.MaxBatchPages (4 MiB) per stream a
// stop sent up to 16 MiB more (web at 256 MiB: 4.4 k pages resent, 18 MB).
const batchPages = 256

// pushBatchPages caps the post-copy push's batches: a page a vCPU faults
// on while it sits in a sender's unsent batch is answered again, whole,
// on the priority connection, so smaller batches resend less; below 128
// the fault tail grew (docs/benchmarks.md, "Close to the physical
// limit", has the runs).
const pushBatchPages = 128

// With DemandInline, the push's batches and the data sockets' send buffers
// shrink to these during post-copy.
const (
	inlineBatchPages   = 64
	inlineSocketBuffer = 256 << 10
)

// demandPages is how many pages went on demand: as the destination counts
// them on the priority connection, or, when answers travel inline on the
// data streams, as this side counts the requests it took pages for.
func (s *source) demandPages() uint64 {
	if s.opts.DemandPath == DemandInline {
		return s.cnt.demand.Load()
	}
	return s.dst.Demand
}

// answer sends the pages a request asks for with sd, and flushes them.
func (s *source) answer(ctx context.Context, sd *sender, reason uint32, pfns []uint64) error {
	for _, p := range pfns {
		// The first taker of a still-needed page owns it (hash,
		// counters); a page already pushed but not yet arrived goes
		// again, whole, so the fault need not wait for the push.
		owner := reason != wire.ReasonFallback && aclear(s.need, p)
		if owner {
			s.cnt.demand.Add(1)
		}
		mode := sendClassified
		switch {
		case reason == wire.ReasonFallback:
			mode = sendFallback
		case !owner:
			mode = sendFull
		}
		if err := sd.addPage(ctx, p, mode); err != nil {
			return err
		}
		if len(sd.pfns) >= 60 || len(sd.refs) >= 60 || len(sd.zeros) >= 60 {
			if err := sd.flush(ctx); err != nil {
				return err
			}
		}
	}
	return sd.flush(ctx)
}

// startMirror writes every page the destination lacks at the switch-over,
// and the manifest, to shared storage, so that the destination can finish
// if this host dies during the push. The domain is paused: the mirror is
// its content at the switch-over.
func (s *source) startMirror(ctx context.Context) {
	missing := xenmem.NewBitmap(s.numPages)
	missing.CopyFrom(s.need)
	hashes := make([]dedup.Hash, s.numPages)
	for p := range s.numPages {
		if !missing.Test(p) {
			hashes[p] = s.hashes[p]
		}
	}
	s.mirrorDone = make(chan error, 1)
	go func() {
		s.mirrorDone <- func() error {
			m, err := postcopy.CreateMirror(s.opts.DurableDir, s.opts.MigrationID, s.numPages)
			if err != nil {
				return err
			}
			defer m.Close()
			page := make([]byte, xenmem.PageSize)
			for p := missing.Next(0); p < s.numPages; p = missing.Next(p + 1) {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				copy(page, s.mem[p*xenmem.PageSize:])
				hashes[p] = dedup.HashPage(page)
				if err := m.WritePage(p, page); err != nil {
					return err
				}
			}
			if err := m.WriteHashes(0, hashes); err != nil {
				return err
			}
			return m.Commit(missing)
		}()
	}()
}

// finishMirror waits for the mirror and, the migration being complete,
// deletes it.
func (s *source) finishMirror() {
	if s.mirrorDone == nil {
		return
	}
	if err := <-s.mirrorDone; err != nil {
		s.log.Error(err, "Durable post-copy mirror failed", "domain", s.dom.Info().Name)
	} else {
		s.durable = true
	}
	postcopy.RemoveMirror(s.opts.DurableDir, s.opts.MigrationID)
}

// reconnect re-opens the streams of a post-copy whose link broke: it asks
// the destination what it has, and needs only the rest.
func (s *source) reconnect(ctx context.Context, deadline time.Time) error {
	s.phase.Store(PhaseRecovering)
	gen := s.gen.Add(1)
	for _, c := range s.conns() {
		c.close()
	}
	s.connMu.Lock()
	for _, c := range append([]*conn{s.main, s.prio}, func() []*conn {
		var cs []*conn
		for _, sd := range s.senders {
			cs = append(cs, sd.c)
		}
		return cs
	}()...) {
		s.oldBytes += c.bytes()
	}
	s.connMu.Unlock()
	for len(s.readErr) > 0 {
		<-s.readErr
	}
	for len(s.ctl) > 0 {
		<-s.ctl
	}
	hello := func(role string, i int) wire.Control {
		return wire.Control{Kind: ctlHello, MigrationID: s.opts.MigrationID, Token: s.opts.Token, Stream: i, Streams: s.streams, Message: role}
	}
	backoff := 100 * time.Millisecond
	for {
		if time.Now().After(deadline) {
			return fmt.Errorf("the destination stayed unreachable for %v", s.recoveryTimeout())
		}
		err := func() error {
			main, err := dialStream(ctx, s.dial, s.addr, s.lim, hello(roleRecover, 0))
			if err != nil {
				return err
			}
			conns := []*conn{main}
			ok := false
			defer func() {
				if !ok {
					for _, c := range conns {
						c.close()
					}
				}
			}()
			_ = main.c.SetReadDeadline(time.Now().Add(handshakeTimeout))
			rec, err := main.r.Next()
			if err != nil {
				return fmt.Errorf("%w: read the received bitmap: %w", errConnLost, err)
			}
			_ = main.c.SetReadDeadline(time.Time{})
			if rec.Type != wire.TypeBitmap {
				return fmt.Errorf("expected the received bitmap, got %v: %w", rec.Type, wire.ErrMalformed)
			}
			first, nbits, words, err := wire.ParseBitmap(rec.Body)
			if err != nil {
				return err
			}
			if first != 0 || nbits != s.numPages {
				return fmt.Errorf("received bitmap covers %d+%d, want 0+%d: %w", first, nbits, s.numPages, wire.ErrMalformed)
			}
			data := make([]*conn, s.streams)
			for i := range s.streams {
				if data[i], err = dialStream(ctx, s.dial, s.addr, s.lim, hello(roleData, i)); err != nil {
					return err
				}
				conns = append(conns, data[i])
			}
			prio, err := dialStream(ctx, s.dial, s.addr, s.lim, hello(rolePrio, 0))
			if err != nil {
				return err
			}
			conns = append(conns, prio)
			// Everything the destination lacks is needed again, whatever
			// was sent before the break.
			need := s.need.Words()
			for i, w := range words {
				atomic.StoreUint64(&need[i], ^w)
			}
			if r := s.numPages & 63; r != 0 {
				atomic.AndUint64(&need[len(need)-1], (1<<r)-1)
			}
			s.connMu.Lock()
			s.main, s.prio = main, prio
			for i, sd := range s.senders {
				sd.c = data[i]
				if sd.dem != nil {
					sd.dem.c = data[i]
				}
			}
			s.connMu.Unlock()
			ok = true
			go s.readMain(main, gen)
			go s.servePrio(ctx, prio, gen)
			return nil
		}()
		if err == nil {
			return nil
		}
		if errors.Is(err, ErrRemote) {
			return err // the destination refused: it is not waiting for us
		}
		s.log.V(1).Info("Reconnect failed; retrying", "error", err.Error(), "backoff", backoff)
		select {
		case <-time.After(backoff):
		case <-ctx.Done():
			return ctx.Err()
		}
		backoff = min(2*backoff, 2*time.Second)
	}
}

// release destroys the source domain once the destination runs it and, for
// post-copy, has every page.
func (s *source) release(ctx context.Context) error {
	if !s.verified {
		return errors.New("the destination never said that every page matched the manifest; the source does not release the domain")
	}
	t0 := time.Now()
	defer func() { s.costs.Release = time.Since(t0) }()
	s.finishMirror()
	if err := s.dom.Release(); err != nil {
		return fmt.Errorf("release the source domain: %w", err)
	}
	for _, c := range s.conns() {
		_ = c.send(ctx, wire.TypeEnd)
	}
	s.phase.Store(PhaseDone)
	return nil
}

func (s *source) wireBytes() int64 {
	s.connMu.Lock()
	n := s.oldBytes
	s.connMu.Unlock()
	for _, c := range s.conns() {
		n += c.bytes()
	}
	return n
}

func (s *source) pagesSent() uint64 {
	return s.cnt.full.Load() + s.cnt.zero.Load() + s.cnt.disk.Load()
}

func (s *source) result() Result {
	total := time.Since(s.start)
	r := Result{
		Strategy: s.opts.Strategy, Plan: s.plan, Costs: s.costs, MemoryBytes: s.numPages * xenmem.PageSize,
		Total: total, WireBytes: s.wireBytes(), Iterations: len(s.history),
		Pages: PageCounts{Total: s.numPages, Full: s.cnt.full.Load(), Zero: s.cnt.zero.Load(), Disk: s.cnt.disk.Load(),
			DiskFallback: s.dst.DiskFallback, Resent: s.cnt.resent.Load(), Demand: s.demandPages()},
		Verified: s.dst.Verified, StopReason: s.verdict.Reason, PostCopy: s.verdict.Decision == SwitchToPostCopy,
		FaultP50:      time.Duration(s.dst.FaultP50Us * float64(time.Microsecond)),
		FaultP99:      time.Duration(s.dst.FaultP99Us * float64(time.Microsecond)),
		OpsPostCopy:   s.dst.OpsPerSec,
		DurableMirror: s.durable,
	}
	if !s.resumedAt.IsZero() {
		r.Resume = s.resumedAt.Sub(s.start)
		r.Downtime = s.resumedAt.Sub(s.pausedAt)
	}
	if r.Strategy == "" {
		r.Strategy = Strategy(s.plan.String())
	}
	for _, sd := range s.senders {
		if sd.comp != nil {
			st := sd.comp.Stats()
			r.Compression.Batches += st.Batches
			r.Compression.Compressed += st.Compressed
			r.Compression.Probes += st.Probes
			r.Compression.RawBytes += st.RawBytes
			r.Compression.SentBytes += st.SentBytes
		}
	}
	r.DedupSavedBytes = int64(r.Pages.Disk-r.Pages.DiskFallback) * xenmem.PageSize
	var wb int64
	var d time.Duration
	for _, h := range s.history {
		wb, d = wb+h.WireBytes, d+h.Duration
	}
	if d > 0 {
		r.StreamBytesPerSec = float64(wb) / d.Seconds()
	}
	return r
}

// reportProgress calls the progress hook five times a second until stopped.
func (s *source) reportProgress() func() {
	if s.hooks.Progress == nil {
		return func() {}
	}
	done := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		t := time.NewTicker(200 * time.Millisecond)
		defer t.Stop()
		var lastBytes int64
		last := time.Now()
		for {
			select {
			case <-done:
				s.hooks.Progress(s.progress(0))
				return
			case now := <-t.C:
				b := s.wireBytes()
				rate := float64(b-lastBytes) / now.Sub(last).Seconds()
				lastBytes, last = b, now
				s.hooks.Progress(s.progress(rate))
			}
		}
	}()
	return func() { close(done); wg.Wait() }
}

// progress is a snapshot; Percent never runs backwards.
func (s *source) progress(rate float64) Progress {
	ph, _ := s.phase.Load().(Phase)
	sent := s.pagesSent()
	rem := acount(s.need) // a popcount over the bitmap: cheap at 5/s
	if ph == PhaseDone {
		s.percent = 100
	} else if sent+rem > 0 {
		p := 99 * float64(sent) / float64(sent+rem)
		if p > s.percent {
			s.percent = p
		}
	}
	return Progress{Phase: ph, Committed: s.committed.Load(), Round: int(s.round.Load()), WireBytes: s.wireBytes(), RemainingBytes: int64(rem) * xenmem.PageSize,
		DirtyRateBytesPerSec: float64(s.dirtyRate.Load()), WireBytesPerSec: rate, Percent: s.percent,
		Pages: PageCounts{Total: s.numPages, Full: s.cnt.full.Load(), Zero: s.cnt.zero.Load(), Disk: s.cnt.disk.Load(), Resent: s.cnt.resent.Load(), Demand: s.cnt.demand.Load()}}
}
