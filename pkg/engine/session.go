package engine

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// state is where an incoming migration is in the protocol; doc.go gives
// the message sequence. The main loop moves it; anything a connection
// carries that its state does not allow is a protocol error that fails
// this migration only.
type state int32

const (
	stAwaitHeader state = iota // main welcomed; the header comes first
	stPreparing                // creating the target domain
	stReceiving                // pre-copy: streams carry pages; main waits for a switch
	stDraining                 // drain: waiting for every stream's drain marker
	stVerifying                // complete: waiting for the markers, then checking
	stVerified                 // stop-and-copy verified, "ready" sent; waits for "go"
	stArming                   // postcopy: waiting for the markers, then arming
	stArmed                    // lazy loading armed, "ready" sent; waits for "go"
	stResumed                  // runs here after a stop-and-copy; waits for the end
	stPostCopy                 // runs here on lazy memory; receives the push
	stRecovering               // post-copy link broke; waits for the source
	stCompleting               // pushed: fetching stragglers, checking
	stFinished                 // post-copy verified, "done" sent; waits for the end
	stDone                     // ended well
	stFailed                   // ended badly
)

var stateNames = [...]string{"awaitHeader", "preparing", "receiving", "draining", "verifying", "verified",
	"arming", "armed", "resumed", "postCopy", "recovering", "completing", "finished", "done", "failed"}

func (st state) String() string {
	if st >= 0 && int(st) < len(stateNames) {
		return stateNames[st]
	}
	return fmt.Sprintf("state(%d)", int32(st))
}

// allowed is what the main connection may carry in one state.
type allowed struct {
	types []wire.Type
	kinds []string // control kinds; ctlError is allowed everywhere
}

func (a allowed) typ(t wire.Type) bool {
	for _, x := range a.types {
		if x == t {
			return true
		}
	}
	return false
}

func (a allowed) kind(k string) bool {
	if k == ctlError {
		return true
	}
	for _, x := range a.kinds {
		if x == k {
			return true
		}
	}
	return false
}

// mainAllowed is the destination's table of the main connection: the
// record types and control kinds each state accepts. States missing here
// (preparing, draining, verifying, arming, recovering, completing, done,
// failed) do not read the main connection.
var mainAllowed = map[state]allowed{
	stAwaitHeader: {types: []wire.Type{wire.TypeHeader}},
	stReceiving: {types: []wire.Type{wire.TypeState, wire.TypeManifest, wire.TypeBitmap, wire.TypeControl},
		kinds: []string{ctlDrain, ctlComplete, ctlPostCopy}},
	stVerified: {types: []wire.Type{wire.TypeControl}, kinds: []string{ctlGo}},
	stArmed:    {types: []wire.Type{wire.TypeControl}, kinds: []string{ctlGo}},
	stResumed:  {types: []wire.Type{wire.TypeControl, wire.TypeEnd}},
	stPostCopy: {types: []wire.Type{wire.TypeManifest, wire.TypeControl}, kinds: []string{ctlPushed}},
	stFinished: {types: []wire.Type{wire.TypeControl, wire.TypeEnd}},
}

// dataState reports whether the data and priority streams may carry
// pages in state st.
func dataState(st state) bool {
	switch st {
	case stReceiving, stDraining, stVerifying, stArming, stPostCopy, stRecovering, stCompleting:
		return true
	}
	return false
}

// watched reports whether in state st the destination waits for the
// source, so that the source's silence means it is gone. In the other
// states the destination works (preparing, verifying) or the domain runs
// here and nothing is at stake on the source's side (resumed, finished),
// or recovery has its own timeout.
func watched(st state) bool {
	switch st {
	case stAwaitHeader, stReceiving, stDraining, stVerifying, stVerified, stArming, stArmed, stPostCopy, stCompleting:
		return true
	}
	return false
}

func (s *session) setState(st state) { s.st.Store(int32(st)) }
func (s *session) current() state    { return state(s.st.Load()) }

// allowedOnMain checks a main-connection record against the state table.
func (s *session) allowedOnMain(rec wire.Record) error {
	st := s.current()
	if !mainAllowed[st].typ(rec.Type) {
		return protocolError("%v record on the main connection in state %s", rec.Type, st)
	}
	return nil
}

// watch fails the session when the source has sent nothing, on any of its
// connections, for the idle timeout while the destination waits for it.
// A connection whose reader is busy with what it received (disk reads,
// installs) counts as active: the silence is then the destination's own.
func (s *session) watch(ctx context.Context) {
	defer func() {
		if p := recover(); p != nil {
			s.fail(s.r.recovered(p, "watch the source", s.log()...))
		}
	}()
	idle := s.r.idleTimeout()
	t := time.NewTicker(max(idle/4, 10*time.Millisecond))
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-s.stop:
			return
		case <-t.C:
		}
		if !watched(s.current()) || s.own.Load() > 0 {
			continue
		}
		conns := s.conns()
		last := int64(0)
		for _, c := range conns {
			if c.busy.Load() {
				last = time.Now().UnixNano()
				break
			}
			last = max(last, c.cc.last.Load())
		}
		if silent := time.Since(time.Unix(0, last)); silent > idle {
			fired := s.current()
			s.fail(fmt.Errorf("%w: the source sent nothing for %v in state %s", errConnLost, silent.Round(time.Millisecond), fired))
			// Wake every reader; the connections stay open for the
			// error sent back on main.
			for _, c := range conns {
				c.woken.Store(true)
				_ = c.c.SetReadDeadline(time.Now())
			}
			// Post-copy goes on with a recovery (its own timeout), which
			// moves the state; else the session fails.
			for s.current() == fired {
				select {
				case <-ctx.Done():
					return
				case <-s.stop:
					return
				case <-t.C:
				}
			}
		}
	}
}

// conns lists the session's current connections.
func (s *session) conns() []*conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*conn, 0, len(s.data)+2)
	if s.main != nil {
		out = append(out, s.main)
	}
	for _, c := range s.data {
		if c != nil {
			out = append(out, c)
		}
	}
	if s.prio != nil {
		out = append(out, s.prio)
	}
	return out
}

// targetInfo checks the header against the limits and the grant, before
// anything is allocated for it, and returns the sender's description of
// the domain and the one to create here: the grant's, or in anonymous
// mode the sender's.
func targetInfo(h wire.Header, grant *Grant, maxPages uint64) (sender, target xenmem.DomainInfo, err error) {
	if h.NumPages == 0 || h.NumPages > maxPages {
		return sender, target, protocolError("header claims %d pages; this receiver takes 1..%d", h.NumPages, maxPages)
	}
	if grant != nil && h.NumPages*xenmem.PageSize != grant.Domain.MemoryBytes {
		return sender, target, protocolError("header claims %d pages (%d bytes), the migration was authorised for %d bytes", h.NumPages, h.NumPages*xenmem.PageSize, grant.Domain.MemoryBytes)
	}
	if sender, err = decodeInfo(h); err != nil {
		return sender, target, err
	}
	if grant == nil {
		return sender, sender, nil
	}
	if sender.Name != grant.Domain.Name {
		return sender, target, protocolError("the sender names domain %q, the migration was authorised for %q", sender.Name, grant.Domain.Name)
	}
	target = grant.Domain
	target.Disks = append([]xenmem.Disk(nil), grant.Domain.Disks...)
	if len(target.Config) == 0 {
		// The backend's opaque configuration (the sim's workload); the
		// backend takes disks, memory and vCPUs from target, not from it.
		target.Config = sender.Config
	}
	return sender, target, nil
}

// diskPaths returns, in the sender's disk order (which references index),
// this host's path of each disk and whether references may name it. With
// a grant a disk is the grant's disk of the same ID, and a disk the grant
// lacks may not be named (its path is never opened); in anonymous mode it
// is the sender's path, mapped by DiskPath.
func (s *session) diskPaths(sender xenmem.DomainInfo) ([]string, []bool) {
	paths := make([]string, len(sender.Disks))
	ok := make([]bool, len(sender.Disks))
	for i, d := range sender.Disks {
		if s.grant == nil {
			paths[i], ok[i] = d.Path, true
			if s.r.DiskPath != nil {
				paths[i] = s.r.DiskPath(sender.Name, d)
			}
			continue
		}
		for _, g := range s.grant.Domain.Disks {
			if g.ID != "" && g.ID == d.ID {
				paths[i], ok[i] = g.Path, true
				break
			}
		}
	}
	return paths, ok
}

// protocolError is a message the protocol does not allow where it came:
// it fails this migration only.
func protocolError(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrProtocol, fmt.Sprintf(format, args...))
}

// flush is a flush marker seen on a data stream of a generation.
type flush struct {
	gen   int32
	phase string
}

// session is one incoming migration at the destination.
type session struct {
	r       *Receiver
	id      string
	streams int
	grant   *Grant // nil in anonymous mode

	// st is the protocol state (see doc.go and mainAllowed); written by
	// the main loop only, read by the stream readers and the watchdog.
	st atomic.Int32
	// own counts the main loop's own work in progress (creating, checking,
	// resuming the domain): the source is silent then by design.
	own atomic.Int32
	// stop is closed when the session ends: readers blocked on the session
	// give up.
	stop     chan struct{}
	stopOnce sync.Once
	// diskIDs maps the index a reference names (the sender's disk order)
	// to whether that disk is one the migration may read here.
	diskOK []bool

	main     *conn
	mu       sync.Mutex
	data     []*conn
	prio     *conn
	attached chan struct{} // closed when every stream is attached

	info     xenmem.DomainInfo
	dom      xenmem.TargetDomain
	numPages uint64
	resolver *dedup.Resolver
	// prioResolver serves the priority connection's reader alone.
	prioResolver *dedup.Resolver
	lazy         xenmem.Lazy
	lazyOn       atomic.Bool
	tracker      *postcopy.Tracker

	have     *xenmem.Bitmap // pages whose current content is installed
	pendFB   *xenmem.Bitmap // pages asked for after a failed disk reference
	pending  atomic.Int64   // count of pendFB
	hashes   []dedup.Hash   // hash of each installed page
	manifest []dedup.Hash   // the source's hashes at the switch-over
	state    []byte
	mbuf     [][16]byte // manifest chunk being parsed (reused)
	missing  []uint64   // words of the bitmap of pages still to come at the switch

	flushes   chan flush
	gen       atomic.Int32   // generation of the data connections (post-copy recovery)
	recoverCh chan *conn     // a reconnecting source's main connection
	readers   sync.WaitGroup // data and priority readers: they write guest memory
	errs      chan error

	demand, diskResolved, diskFallback, duplicates atomic.Uint64
	resumed                                        atomic.Bool
	resumeOps                                      uint64
	resumeAt                                       time.Time
}

func newSession(r *Receiver, hello wire.Control, grant *Grant) *session {
	return &session{r: r, id: hello.MigrationID, streams: hello.Streams, grant: grant, stop: make(chan struct{}),
		data: make([]*conn, hello.Streams), attached: make(chan struct{}),
		flushes: make(chan flush, 4*hello.Streams), errs: make(chan error, 8), recoverCh: make(chan *conn, 1)}
}

// attach adds a data or priority connection.
func (s *session) attach(c *conn, hello wire.Control) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	switch hello.Message {
	case roleData:
		if hello.Stream < 0 || hello.Stream >= s.streams || s.data[hello.Stream] != nil {
			return false
		}
		s.data[hello.Stream] = c
	case rolePrio:
		if s.prio != nil {
			return false
		}
		s.prio = c
	}
	if s.prio != nil {
		for _, d := range s.data {
			if d == nil {
				return true
			}
		}
		close(s.attached)
	}
	return true
}

func (s *session) log() []any { return []any{"migration", s.id, "domain", s.info.Name} }

func (s *session) fail(err error) {
	select {
	case s.errs <- err:
	default:
	}
}

// run is the destination's phase list for one migration. A panic
// anywhere in it fails this migration only.
func (s *session) run(ctx context.Context) {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go s.watch(ctx)
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = s.r.recovered(p, "receive a migration", s.log()...)
			}
		}()
		return s.receive(ctx)
	}()
	s.cleanup(ctx, err)
}

// cleanup runs exactly once. Before the domain resumed here, a failure
// destroys everything created for it (the source keeps running it); after,
// the domain stays here and the failure is reported.
func (s *session) cleanup(ctx context.Context, err error) {
	discarded := errors.Is(err, ErrDiscarded) // told and reported already
	if err != nil {
		s.setState(stFailed)
		if !discarded {
			_ = s.main.sendControl(ctx, &wire.Control{Kind: ctlError, Message: err.Error()})
		}
	} else {
		s.setState(stDone)
	}
	// Stop the readers before the memory they write goes away.
	s.stopOnce.Do(func() { close(s.stop) })
	s.closeStreams()
	s.readers.Wait()
	if s.lazy != nil && (err == nil || !s.resumed.Load()) {
		_ = s.lazy.Close()
	}
	if s.resolver != nil {
		_ = s.resolver.Close()
	}
	if s.prioResolver != nil {
		_ = s.prioResolver.Close()
	}
	if err != nil {
		if !s.resumed.Load() && s.dom != nil {
			if derr := s.dom.Destroy(); derr != nil {
				err = errors.Join(err, fmt.Errorf("destroy the half-received domain: %w", derr))
			}
		}
		if !discarded {
			s.r.Log.Error(err, "Incoming migration failed", s.log()...)
			s.r.emit(s.id, Event{Kind: EventFailed, Domain: s.info.Name, Err: err, Stats: s.stats()})
		}
	} else {
		s.r.emit(s.id, Event{Kind: EventDone, Domain: s.info.Name, Stats: s.stats()})
	}
	if s.dom != nil {
		_ = s.dom.Close()
	}
	s.r.drop(s.id)
}

// prioConn is the current priority connection (recovery replaces it).
func (s *session) prioConn() *conn {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.prio
}

// sendPrio sends a request on the priority connection. While the session
// recovers from a broken link there is none, or it is broken: the request
// is dropped without an error, so that the demand path outlives the break,
// and what it asked for is asked again once the streams are back (faulted
// pages by Tracker.Rerequest, everything else by the source's push of all
// that the received bitmap lacks). Before it used to end the demand path
// (faults after a recovery waited for the push), or, with no connection at
// all, to dereference nil.
func (s *session) sendPrio(ctx context.Context, body []byte) error {
	c := s.prioConn()
	if c == nil {
		return nil
	}
	err := c.send(ctx, wire.TypeRequest, body)
	if err != nil && errors.Is(err, errConnLost) && s.recoverable() {
		return nil
	}
	return err
}

// closeData closes the data and priority connections.
func (s *session) closeData() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, c := range s.data {
		if c != nil {
			c.close()
		}
	}
	if s.prio != nil {
		s.prio.close()
	}
}

// closeStreams closes every connection of the session.
func (s *session) closeStreams() {
	s.main.close()
	s.closeData()
}

func (s *session) receive(ctx context.Context) error {
	rec, err := s.main.r.Next()
	if err != nil {
		select {
		case why := <-s.errs: // the watchdog woke the read
			return why
		default:
		}
		return fmt.Errorf("read header: %w", err)
	}
	if err := s.allowedOnMain(rec); err != nil {
		return err
	}
	h, err := wire.ParseHeader(rec.Body)
	if err != nil {
		return err
	}
	// Every check on what the header claims comes before anything is
	// allocated for it.
	sender, info, err := targetInfo(h, s.grant, s.r.maxPages())
	if err != nil {
		return err
	}
	s.info = info
	s.setState(stPreparing)
	if err := s.prepare(ctx, h, sender); err != nil {
		return err
	}
	s.setState(stReceiving)
	select {
	case <-s.attached:
	case <-time.After(handshakeTimeout):
		return fmt.Errorf("the source did not open its %d data streams and priority stream within %v", s.streams, handshakeTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
	s.startReaders(ctx)
	return s.readMain(ctx)
}

// prepare creates the paused target domain and the per-page state. sender
// is the domain as the sender's header describes it: its disk order is
// what references index.
func (s *session) prepare(ctx context.Context, h wire.Header, sender xenmem.DomainInfo) error {
	n := h.NumPages
	s.numPages = n
	s.have, s.pendFB = xenmem.NewBitmap(n), xenmem.NewBitmap(n)
	s.hashes, s.manifest = make([]dedup.Hash, n), make([]dedup.Hash, n)
	if paths, ok := s.diskPaths(sender); len(paths) > 0 {
		s.diskOK = ok
		s.resolver = dedup.OpenResolver(paths, 4)
		// The demand path's own: one worker, so that it reads on the
		// caller's (real-time) thread and never waits for a buffer the
		// push's resolvers hold.
		s.prioResolver = dedup.OpenResolver(paths, 1)
	}
	s.own.Add(1)
	defer s.own.Add(-1)
	dom, err := s.r.Host.CreateTarget(ctx, s.info)
	if err != nil {
		return fmt.Errorf("create target domain %s: %w", s.info.Name, err)
	}
	s.dom = dom
	s.r.Log.Info("Receiving a domain", append(s.log(), "memoryBytes", s.info.MemoryBytes, "streams", s.streams)...)
	s.r.emit(s.id, Event{Kind: EventPrepared, Domain: s.info.Name})
	return s.main.sendControl(ctx, &wire.Control{Kind: ctlPrepared})
}

// readMain follows the source's main connection to the end.
func (s *session) readMain(ctx context.Context) error {
	for {
		err := s.followMain(ctx, s.main)
		if err == nil || !errors.Is(err, errConnLost) || !s.recoverable() {
			return err
		}
		// Post-copy and the link broke: the domain runs here, vCPUs that
		// touch missing pages wait; the source reconnects and resumes the
		// push from what we have.
		s.setState(stRecovering)
		s.r.Log.Info("Lost the source during post-copy; waiting for it to reconnect", append(s.log(), "error", err.Error(), "timeout", s.r.recoveryTimeout())...)
		s.r.emit(s.id, Event{Kind: EventRecovering, Domain: s.info.Name, Err: err})
		if rerr := s.awaitRecovery(ctx); rerr != nil {
			if s.r.DurableDir == "" {
				return fmt.Errorf("post-copy recovery failed: %w (connection lost: %v)", rerr, err)
			}
			// The source is gone: finish from its mirror on shared storage.
			s.own.Add(1)
			derr := s.finishFromMirror()
			s.own.Add(-1)
			if derr != nil {
				return fmt.Errorf("post-copy recovery failed: %w; durable mirror: %w (connection lost: %v)", rerr, derr, err)
			}
			return nil
		}
		s.r.Log.Info("Source reconnected; post-copy continues", s.log()...)
		// The reconnected source pushes what is missing and sends the
		// manifest and "pushed" again, whatever it had sent before.
	}
}

// followMain reads one main connection until END or an error.
func (s *session) followMain(ctx context.Context, main *conn) error {
	recs := make(chan wire.Record)
	next := make(chan struct{})
	rerr := make(chan error, 1)
	stop := make(chan struct{})
	defer close(stop)
	go func() {
		defer func() {
			if p := recover(); p != nil {
				rerr <- s.r.recovered(p, "read the main connection", s.log()...)
			}
		}()
		for {
			rec, err := main.r.Next()
			if err != nil {
				rerr <- err
				return
			}
			select {
			case recs <- rec:
			case <-stop:
				return
			}
			select {
			case <-next:
			case <-stop:
				return
			}
		}
	}()
	for {
		var rec wire.Record
		select {
		case rec = <-recs:
		case err := <-rerr:
			select {
			case why := <-s.errs: // e.g. the watchdog, which closed it
				return why
			default:
			}
			return fmt.Errorf("main connection: %w: %w", errConnLost, err)
		case err := <-s.errs:
			return err
		case <-ctx.Done():
			return ctx.Err()
		}
		done, err := s.onMain(ctx, rec)
		if err != nil || done {
			return err
		}
		select {
		case next <- struct{}{}:
		case err := <-rerr:
			return fmt.Errorf("main connection: %w: %w", errConnLost, err)
		}
	}
}

// finishFromMirror loads every missing page from the source's durable
// mirror, checks the whole memory against the mirror's manifest and ends
// the migration without the source.
func (s *session) finishFromMirror() error {
	m, err := postcopy.OpenMirror(s.r.DurableDir, s.id, s.numPages)
	if err != nil {
		return err
	}
	defer m.Close()
	page := make([]byte, xenmem.PageSize)
	in := &installer{s: s}
	pfn, hash := make([]uint64, 1), make([]dedup.Hash, 1)
	loaded := 0
	for p := range s.numPages {
		h, err := m.Hash(p)
		if err != nil {
			return err
		}
		s.manifest[p] = h
		if atest(s.have, p) {
			continue
		}
		if err := m.ReadPage(p, page); err != nil {
			return err
		}
		pfn[0], hash[0] = p, h
		if err := in.installBatch(pfn, page, hash); err != nil {
			return err
		}
		loaded++
	}
	if err := s.verify(); err != nil {
		return err
	}
	s.r.Log.Info("Finished post-copy from the durable mirror without the source", append(s.log(), "pagesLoaded", loaded)...)
	return nil
}

// errWelcomed marks a failure of beginRecovery after the connection was
// welcomed: the caller closes it without sending an error.
var errWelcomed = errors.New("connection already welcomed")

// recoverable: the domain runs here on lazily loaded memory.
func (s *session) recoverable() bool { return s.resumed.Load() && s.lazyOn.Load() }

// beginRecovery takes a reconnecting source's main connection: the old
// streams are closed and the stream slots freed for the new generation.
//
// It welcomes c itself, before the session may write on it (the received
// bitmap comes next; a welcome sent after it by the caller reached the
// source second: TestPostCopySurvivesLinkCut failed 1 run in 3-6 under
// -race). An error wrapping errWelcomed means c was welcomed and is to be
// closed without an answer.
func (s *session) beginRecovery(ctx context.Context, c *conn) error {
	if !s.recoverable() {
		return fmt.Errorf("migration %q is not in post-copy; nothing to recover", s.id)
	}
	if len(s.recoverCh) > 0 {
		return fmt.Errorf("migration %q is already recovering", s.id)
	}
	s.mu.Lock()
	old := append([]*conn{s.prio}, s.data...)
	s.data = make([]*conn, s.streams)
	s.prio = nil
	s.attached = make(chan struct{})
	s.gen.Add(1)
	s.mu.Unlock()
	for _, o := range old {
		if o != nil {
			o.close()
		}
	}
	if err := c.sendControl(ctx, &wire.Control{Kind: ctlHello, MigrationID: s.id}); err != nil {
		return fmt.Errorf("welcome the recovering source: %w: %w", errWelcomed, err)
	}
	select {
	case s.recoverCh <- c:
	default:
		return fmt.Errorf("migration %q is already recovering: %w", s.id, errWelcomed)
	}
	// Wake the main loop wherever it waits.
	s.fail(fmt.Errorf("%w: the source reconnected", errConnLost))
	return nil
}

// awaitRecovery waits for the source to come back, tells it what is here,
// and restarts the streams.
func (s *session) awaitRecovery(ctx context.Context) error {
	s.main.close()
	var c *conn
	select {
	case c = <-s.recoverCh:
	case <-time.After(s.r.recoveryTimeout()):
		return fmt.Errorf("the source did not reconnect within %v; the domain keeps running here, waiting on %d missing pages", s.r.recoveryTimeout(), s.numPages-acount(s.have))
	case <-ctx.Done():
		return ctx.Err()
	}
	s.mu.Lock()
	s.main = c
	s.mu.Unlock()
	// Drop errors of the broken generation.
	for len(s.errs) > 0 {
		<-s.errs
	}
	have := xenmem.NewBitmap(s.numPages)
	for i := range have.Words() {
		have.Words()[i] = atomic.LoadUint64(&s.have.Words()[i])
	}
	if err := c.sendAs(ctx, true, wire.TypeBitmap, wire.MarshalBitmap(nil, 0, s.numPages, have.Words())); err != nil {
		return fmt.Errorf("send the received bitmap: %w", err)
	}
	s.mu.Lock()
	attached := s.attached
	s.mu.Unlock()
	select {
	case <-attached:
	case <-time.After(handshakeTimeout):
		return fmt.Errorf("the source reconnected but did not reopen its streams within %v", handshakeTimeout)
	case <-ctx.Done():
		return ctx.Err()
	}
	s.setState(stPostCopy)
	s.startReaders(ctx)
	// Demand requests in flight died with the old priority connection.
	if again := s.tracker.Rerequest(nil); len(again) > 0 {
		for i := 0; i < len(again); i += 1024 {
			body := wire.MarshalRequest(nil, wire.ReasonDemand, again[i:min(i+1024, len(again))])
			if err := s.sendPrio(ctx, body); err != nil {
				return err
			}
		}
	}
	return nil
}

func (s *session) onMain(ctx context.Context, rec wire.Record) (done bool, err error) {
	if err := s.allowedOnMain(rec); err != nil {
		return false, err
	}
	switch rec.Type {
	case wire.TypeState:
		s.state = append(s.state[:0], rec.Body...)
	case wire.TypeManifest:
		first, count, err := wire.ManifestRange(rec.Body)
		if err != nil {
			return false, err
		}
		if first > s.numPages || uint64(count) > s.numPages-first {
			return false, protocolError("manifest for pfns %d+%d beyond %d pages", first, count, s.numPages)
		}
		_, hs, err := wire.ParseManifestInto(rec.Body, s.mbuf[:0])
		if err != nil {
			return false, err
		}
		s.mbuf = hs
		for i, h := range hs {
			s.manifest[first+uint64(i)] = h
		}
	case wire.TypeBitmap:
		// The missing-page bitmap covers the whole domain: its size is
		// known before it is parsed.
		if want := wire.BitmapSize(s.numPages); len(rec.Body) != want {
			return false, protocolError("missing-page bitmap of %d bytes, want %d for %d pages", len(rec.Body), want, s.numPages)
		}
		first, nbits, words, err := wire.ParseBitmapInto(rec.Body, s.missing[:0])
		if err != nil {
			return false, err
		}
		if first != 0 || nbits != s.numPages {
			return false, protocolError("missing-page bitmap covers %d+%d, want 0+%d", first, nbits, s.numPages)
		}
		// Pages to come after the switch; applied once every data stream
		// has delivered what it carried before the switch.
		s.missing = words
	case wire.TypeControl:
		m, err := wire.ParseControl(rec.Body)
		if err != nil {
			return false, err
		}
		return s.onControl(ctx, m)
	case wire.TypeEnd:
		return true, nil
	}
	return false, nil
}

func (s *session) onControl(ctx context.Context, m wire.Control) (bool, error) {
	st := s.current()
	if !mainAllowed[st].kind(m.Kind) {
		return false, protocolError("control %q on the main connection in state %s", m.Kind, st)
	}
	switch m.Kind {
	case ctlError:
		return false, remoteError(m)
	case ctlDrain:
		// Everything the source sent so far (pages, references to resolve
		// from disk, fallbacks) is installed before the source pauses the
		// domain, so the downtime does not wait for that backlog.
		s.setState(stDraining)
		t0 := time.Now()
		if err := s.waitFlushes(ctx, ctlDrain, 5*time.Minute); err != nil {
			return false, err
		}
		s.r.Log.V(2).Info("Drained", append(s.log(), "waitedMs", time.Since(t0).Milliseconds())...)
		s.setState(stReceiving)
		return false, s.main.sendControl(ctx, &wire.Control{Kind: ctlDrained})
	case ctlComplete:
		s.setState(stVerifying)
		if err := s.finishStopAndCopy(ctx); err != nil {
			return false, err
		}
		s.setState(stVerified)
		return false, nil
	case ctlPostCopy:
		s.setState(stArming)
		if err := s.startPostCopy(ctx); err != nil {
			return false, err
		}
		s.setState(stArmed)
		return false, nil
	case ctlGo:
		return false, s.resume(ctx, st == stArmed)
	case ctlPushed:
		s.setState(stCompleting)
		if err := s.finishPostCopy(ctx); err != nil {
			return false, err
		}
		s.setState(stFinished)
		return false, nil
	}
	return false, protocolError("control %q on the main connection in state %s", m.Kind, st)
}

// waitFlushes waits for the flush marker of a phase on every data stream,
// then for every pending fallback page.
func (s *session) waitFlushes(ctx context.Context, phase string, timeout time.Duration) error {
	deadline := time.After(timeout)
	for got := 0; got < s.streams; {
		select {
		case f := <-s.flushes:
			if f.gen != s.gen.Load() {
				continue // from a connection that broke
			}
			if f.phase != phase {
				return fmt.Errorf("flush marker %q while waiting for %q: %w", f.phase, phase, wire.ErrMalformed)
			}
			got++
		case err := <-s.errs:
			return err
		case <-deadline:
			return fmt.Errorf("data streams not flushed within %v", timeout)
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	for s.pending.Load() > 0 {
		select {
		case err := <-s.errs:
			return err
		case <-deadline:
			return fmt.Errorf("%d fallback pages still missing after %v", s.pending.Load(), timeout)
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(time.Millisecond):
		}
	}
	return nil
}

// verify checks every page against the source's manifest.
func (s *session) verify() error {
	var bad uint64
	first := uint64(0)
	for p := range s.numPages {
		if !atest(s.have, p) || s.hashes[p] != s.manifest[p] {
			if bad == 0 {
				first = p
			}
			bad++
		}
	}
	if bad > 0 {
		return fmt.Errorf("%d of %d pages do not match the source's manifest (first: pfn %d)", bad, s.numPages, first)
	}
	return nil
}

func (s *session) finishStopAndCopy(ctx context.Context) error {
	if err := s.waitFlushes(ctx, ctlComplete, 5*time.Minute); err != nil {
		return err
	}
	s.own.Add(1)
	defer s.own.Add(-1)
	if err := s.verify(); err != nil {
		return err
	}
	if err := s.dom.LoadState(s.state); err != nil {
		return fmt.Errorf("load vCPU state: %w", err)
	}
	st := s.wireStats(true)
	return s.main.sendControl(ctx, &wire.Control{Kind: ctlReady, Data: mustJSON(st)})
}

// startPostCopy arms lazy loading for every page not here yet.
func (s *session) startPostCopy(ctx context.Context) error {
	t0 := time.Now()
	if err := s.waitFlushes(ctx, ctlPostCopy, 5*time.Minute); err != nil {
		return err
	}
	tFlushed := time.Now()
	if uint64(len(s.missing)) != (s.numPages+63)/64 {
		return protocolError("post-copy without the missing-page bitmap")
	}
	s.own.Add(1)
	defer s.own.Add(-1)
	// Pages to come after the switch: drop what we have of them (a stale copy).
	for w, word := range s.missing {
		atomicAndNot(&s.have.Words()[w], word)
	}
	present := xenmem.NewBitmap(s.numPages)
	present.CopyFrom(s.have)
	s.tracker = postcopy.NewTracker(s.numPages, s.have, postcopy.DefaultPrefetch)
	lazy, err := s.dom.StartLazy(present)
	if err != nil {
		return fmt.Errorf("arm lazy loading: %w", err)
	}
	s.lazy = lazy
	s.lazyOn.Store(true)
	if err := s.dom.LoadState(s.state); err != nil {
		return fmt.Errorf("load vCPU state: %w", err)
	}
	s.r.Log.V(2).Info("Post-copy armed", append(s.log(), "flushMs", tFlushed.Sub(t0).Milliseconds(), "armMs", time.Since(tFlushed).Milliseconds())...)
	var buf []byte
	request := func(pfns []uint64) error {
		buf = wire.MarshalRequest(buf[:0], wire.ReasonDemand, pfns)
		return s.sendPrio(ctx, buf)
	}
	if fh, ok := lazy.(interface{ SetFaultHandler(func(xenmem.Fault)) }); ok {
		// The request leaves from the backend's fault thread, which the
		// kernel woke for the fault: no goroutine hand-off on the way.
		var failed atomic.Bool
		fh.SetFaultHandler(func(f xenmem.Fault) {
			if failed.Load() {
				return
			}
			defer func() {
				if p := recover(); p != nil {
					failed.Store(true)
					s.fail(s.r.recovered(p, "serve post-copy faults", s.log()...))
				}
			}()
			if err := s.tracker.Handle(f, request); err != nil && ctx.Err() == nil {
				failed.Store(true)
				s.fail(fmt.Errorf("demand path: %w", err))
			}
		})
	} else {
		go func() {
			defer func() {
				if p := recover(); p != nil {
					s.fail(s.r.recovered(p, "serve post-copy faults", s.log()...))
				}
			}()
			if err := s.tracker.Serve(ctx, lazy.Faults(), request); err != nil && ctx.Err() == nil {
				s.fail(fmt.Errorf("demand path: %w", err))
			}
		}()
	}
	return s.main.sendControl(ctx, &wire.Control{Kind: ctlReady})
}

// resume runs the domain here. After this the source never resumes it.
// The state moves first: the push and the demand answers that follow the
// resume are welcome from its first fault on.
func (s *session) resume(ctx context.Context, postCopy bool) error {
	if postCopy {
		s.setState(stPostCopy)
	} else {
		s.setState(stResumed)
	}
	s.own.Add(1)
	err := s.dom.Resume()
	s.own.Add(-1)
	if err != nil {
		return fmt.Errorf("resume the domain: %w", err)
	}
	s.resumed.Store(true)
	s.resumeAt, s.resumeOps = time.Now(), s.dom.Ops()
	s.r.Log.Info("Domain resumed at the destination", append(s.log(), "postCopy", s.lazyOn.Load())...)
	s.r.emit(s.id, Event{Kind: EventResumed, Domain: s.info.Name})
	return s.main.sendControl(ctx, &wire.Control{Kind: ctlResumed, Data: mustJSON(s.wireStats(!s.lazyOn.Load()))})
}

// finishPostCopy waits until every page is here, fetching stragglers, and
// verifies the manifest.
func (s *session) finishPostCopy(ctx context.Context) error {
	if err := s.waitFlushes(ctx, ctlPushed, 5*time.Minute); err != nil {
		return err
	}
	deadline := time.Now().Add(time.Minute)
	var missing []uint64
	var buf []byte
	var asked time.Time
	for {
		missing = missing[:0]
		for p := range s.numPages {
			if !atest(s.have, p) {
				missing = append(missing, p)
			}
		}
		if len(missing) == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%d pages still missing after the push", len(missing))
		}
		// Most stragglers are demand answers already on their way: look
		// again every millisecond, and ask for what is still missing
		// after 50 ms.
		if asked.IsZero() || time.Since(asked) >= 50*time.Millisecond {
			for i := 0; i < len(missing); i += 1024 {
				buf = wire.MarshalRequest(buf[:0], wire.ReasonRecover, missing[i:min(i+1024, len(missing))])
				if err := s.sendPrio(ctx, buf); err != nil {
					return err
				}
			}
			asked = time.Now()
		}
		select {
		case err := <-s.errs:
			return err
		case <-time.After(time.Millisecond):
		}
	}
	verr := s.verify()
	if verr != nil {
		return s.discard(ctx, verr)
	}
	st := s.wireStats(true)
	if d := time.Since(s.resumeAt).Seconds(); d > 0 {
		st.OpsPerSec = float64(s.dom.Ops()-s.resumeOps) / d
	}
	_ = s.lazy.Close()
	if s.r.Verified != nil {
		if err := s.r.Verified(s.id); err != nil {
			// The domain runs here, complete and verified: the failure
			// only withholds "done", and the source holds its copy.
			return fmt.Errorf("record that every page was verified before telling the source: %w", err)
		}
	}
	return s.main.sendControl(ctx, &wire.Control{Kind: ctlDone, Data: mustJSON(st)})
}

// discard destroys a domain that resumed here but whose memory is not the
// source's (contract C2): it never runs here again, and the source, told
// "discarded", may resume its paused copy. The session then ends as failed
// with nothing left here.
func (s *session) discard(ctx context.Context, why error) error {
	s.own.Add(1)
	defer s.own.Add(-1)
	s.setState(stFailed)
	// Destroying stops the vCPUs (a paused domain is destroyed the same
	// way); the readers stop before the lazy memory they install into
	// goes away.
	derr := s.dom.Destroy()
	if derr != nil {
		// Not destroyed: it may still run here, so the source must not
		// resume its copy. Report the failure without the verdict.
		return fmt.Errorf("%w; destroying the domain here failed, so the source must keep its copy paused: %w", why, derr)
	}
	s.resumed.Store(false) // nothing runs here any more: cleanup destroys what is left
	s.stopOnce.Do(func() { close(s.stop) })
	s.closeData()
	s.readers.Wait()
	if s.lazy != nil {
		_ = s.lazy.Close()
		s.lazy = nil
	}
	err := fmt.Errorf("%w: %w; the domain was destroyed here and the source was told it may resume its copy", ErrDiscarded, why)
	s.r.Log.Error(err, "Discarded an incoming domain that resumed here", s.log()...)
	s.r.emit(s.id, Event{Kind: EventDiscarded, Domain: s.info.Name, Err: err, Stats: s.stats()})
	st := s.wireStats(false)
	if serr := s.main.sendControl(ctx, &wire.Control{Kind: ctlDiscarded, Message: why.Error(), Data: mustJSON(st)}); serr != nil {
		return fmt.Errorf("%w (telling the source failed: %w)", err, serr)
	}
	return err
}

func (s *session) wireStats(verified bool) dstStats {
	st := dstStats{Verified: verified, Demand: s.demand.Load(), DiskResolved: s.diskResolved.Load(),
		DiskFallback: s.diskFallback.Load(), Duplicates: s.duplicates.Load()}
	if s.tracker != nil {
		h := s.tracker.Latency()
		st.FaultP50Us = float64(h.Quantile(0.50).Microseconds())
		st.FaultP99Us = float64(h.Quantile(0.99).Microseconds())
	}
	return st
}

func (s *session) stats() ReceiveStats {
	w := s.wireStats(false)
	rs := ReceiveStats{Pages: s.numPages, Demand: w.Demand, DiskResolved: w.DiskResolved, DiskFallback: w.DiskFallback,
		FaultP50: time.Duration(w.FaultP50Us) * time.Microsecond, FaultP99: time.Duration(w.FaultP99Us) * time.Microsecond}
	if s.tracker != nil {
		rs.FaultLatency = s.tracker.Latency()
	}
	return rs
}

// startReaders starts a reader per data stream and one for the priority
// stream, for the current generation of connections.
func (s *session) startReaders(ctx context.Context) {
	s.mu.Lock()
	data, prio, gen := append([]*conn(nil), s.data...), s.prio, s.gen.Load()
	s.mu.Unlock()
	for i, c := range data {
		s.readers.Add(1)
		go func() { defer s.readers.Done(); s.readData(ctx, i, c, gen) }()
	}
	s.readers.Add(1)
	go func() { defer s.readers.Done(); s.readData(ctx, -1, prio, gen) }()
}

// readData installs what one data stream (or, for idx -1, the priority
// stream) carries, in stream order.
func (s *session) readData(ctx context.Context, idx int, c *conn, gen int32) {
	if idx < 0 {
		// Demand answers: from the socket to UFFDIO_COPY on one real-time
		// thread, which the kernel wakes itself (the goroutine ends with
		// the connection, and the thread with it).
		postcopy.PinRealtime(s.r.Log, "demand answer reader")
		c.pollReads()
	}
	rd := &installer{s: s, c: c, prio: idx < 0, gen: gen}
	err := func() (err error) {
		defer func() {
			if p := recover(); p != nil {
				err = s.r.recovered(p, "read a data stream", append(s.log(), "stream", idx)...)
			}
		}()
		return rd.loop(ctx)
	}()
	if err != nil && ctx.Err() == nil && s.gen.Load() == gen {
		s.fail(fmt.Errorf("stream %d: %w", idx, err))
	}
}

// installer turns records into installed pages.
type installer struct {
	s      *session
	c      *conn
	gen    int32
	prio   bool
	pfns   []uint64
	refs   []wire.DiskRef
	hs     []dedup.Hash
	dec    *zstd.Decoder
	zbuf   []byte
	tmp    []byte
	fb     []uint64
	req    []byte
	rr     *refResolver // data streams during post-copy
	exists []bool
	// marker is the last flush marker this stream carried: after
	// "complete", and after "postcopy" until the domain runs here, a
	// stream may carry only the pages the destination asked for (answers
	// to fallback requests: restrict).
	marker   string
	restrict bool
}

// dataAllowed checks a page-carrying record against the session's state
// and the stream's last marker, and sets in.restrict for the record.
func (in *installer) dataAllowed(t wire.Type) error {
	st := in.s.current()
	if !dataState(st) {
		return protocolError("%v record on a data stream in state %s", t, st)
	}
	in.restrict = in.marker == ctlComplete ||
		in.marker == ctlPostCopy && st != stPostCopy && st != stCompleting && st != stRecovering
	return nil
}

// asked checks, for a record after a restricting marker, that the
// destination asked for pfn.
func (in *installer) asked(pfn uint64) error {
	if in.restrict && (pfn >= in.s.numPages || !atest(in.s.pendFB, pfn)) {
		return protocolError("page %d on a data stream after its %q marker, not asked for", pfn, in.marker)
	}
	return nil
}

func (in *installer) loop(ctx context.Context) error {
	defer in.stopResolver()
	defer in.c.busy.Store(false)
	for {
		in.c.busy.Store(false)
		rec, err := in.c.r.Next()
		if err != nil {
			return fmt.Errorf("%w: %w", errConnLost, err)
		}
		in.c.busy.Store(true)
		switch rec.Type {
		case wire.TypePages, wire.TypeZeroPages, wire.TypeDiskRefs:
			if err := in.dataAllowed(rec.Type); err != nil {
				return err
			}
		default:
			in.restrict = false
		}
		switch rec.Type {
		case wire.TypePages:
			err = in.pages(rec.Body)
		case wire.TypeZeroPages:
			in.pfns, err = wire.ParsePFNs(rec.Body, in.pfns[:0])
			if err == nil && in.s.lazyOn.Load() {
				err = in.installBatch(in.pfns, nil, nil)
			} else if err == nil {
				for _, p := range in.pfns {
					if err = in.writeZero(p); err != nil {
						break
					}
				}
			}
		case wire.TypeDiskRefs:
			err = in.diskRefs(ctx, rec.Body)
		case wire.TypeControl:
			var m wire.Control
			if m, err = wire.ParseControl(rec.Body); err == nil {
				if m.Kind != ctlFlush {
					return protocolError("control %q on a data stream", m.Kind)
				}
				switch m.Message {
				case ctlDrain, ctlComplete, ctlPostCopy, ctlPushed:
				default:
					return protocolError("flush marker for unknown phase %q", m.Message)
				}
				if in.marker == ctlComplete {
					return protocolError("flush marker %q after the stream's %q marker", m.Message, in.marker)
				}
				if err = in.settle(); err != nil {
					break
				}
				in.marker = m.Message
				// The main loop takes markers only while it waits for
				// them: a source that sends more blocks here, until the
				// session ends. Blocked here the reader waits on the
				// source, not on its own work (the watchdog's view).
				in.c.busy.Store(false)
				select {
				case in.s.flushes <- flush{gen: in.gen, phase: m.Message}:
				case <-in.s.stop:
					return nil
				case <-ctx.Done():
					return ctx.Err()
				}
			}
		case wire.TypeEnd:
			return in.settle()
		default:
			return protocolError("%v record on a data stream", rec.Type)
		}
		if err != nil {
			return err
		}
		if !in.prio && in.s.lazyOn.Load() {
			runtime.Gosched() // the demand path first (see sender.yield)
		}
	}
}

func (in *installer) pages(body []byte) error {
	pfns, flags, data, err := wire.ParsePages(body, in.pfns[:0])
	in.pfns = pfns
	if err != nil {
		return err
	}
	if flags&wire.PagesZstd != 0 {
		if in.dec == nil {
			if in.dec, err = wire.NewPagesDecoder(); err != nil {
				return err
			}
		}
		if data, err = wire.DecodePages(in.dec, data, len(pfns), in.zbuf[:0]); err != nil {
			return err
		}
		in.zbuf = data
	}
	return in.installBatch(pfns, data, nil)
}

// installBatch installs a batch of pages: before post-copy with one
// WritePages call; after it with one InstallRun per run of consecutive
// pfns (data nil: zero pages), which leaves a page already present alone
// (a duplicate). Each page's hash is recorded (hashes[i] when given, else
// computed from data) before the page counts as here (landed).
//
// In post-copy the path whose install won a page is the only one that
// records its hash and marks it here: a duplicate arriving on another
// path, however early, never does (see duplicate). Were it otherwise, a
// duplicate could mark a page here while its winner had not yet recorded
// the hash, and the check against the manifest would see the wrong one.
func (in *installer) installBatch(pfns []uint64, data []byte, hashes []dedup.Hash) error {
	s := in.s
	for _, p := range pfns {
		if p >= s.numPages {
			return protocolError("page %d beyond %d pages", p, s.numPages)
		}
		if err := in.asked(p); err != nil {
			return err
		}
	}
	if !s.lazyOn.Load() {
		if err := s.dom.WritePages(pfns, data); err != nil {
			return fmt.Errorf("install %d pages: %w", len(pfns), err)
		}
		in.record(pfns, data, hashes, nil)
		return nil
	}
	if cap(in.exists) < len(pfns) {
		in.exists = make([]bool, len(pfns))
	}
	exists := in.exists[:len(pfns)]
	// Each run is accounted as soon as it is installed: the pages it won
	// are not left unaccounted behind a later run (or its error).
	return xenmem.Runs(pfns, func(i, j int) error {
		var run []byte
		if data != nil {
			run = data[i*xenmem.PageSize : j*xenmem.PageSize]
		}
		if err := s.lazy.InstallRun(pfns[i], j-i, run, exists[i:j]); err != nil {
			return fmt.Errorf("install pages %d-%d: %w", pfns[i], pfns[j-1], err)
		}
		if f := testAfterInstall.Load(); f != nil {
			(*f)(in.prio, pfns[i:j])
		}
		var h []dedup.Hash
		if hashes != nil {
			h = hashes[i:j]
		}
		in.record(pfns[i:j], run, h, exists[i:j])
		return nil
	})
}

// record accounts for installed pages: it records the hash of each page
// this path installed and marks it landed; a page whose exists flag is set
// was installed by another path and is only a duplicate here.
func (in *installer) record(pfns []uint64, data []byte, hashes []dedup.Hash, exists []bool) {
	s := in.s
	for i, p := range pfns {
		if exists != nil && exists[i] {
			in.duplicate(p)
			continue
		}
		if exists != nil && in.prio {
			s.demand.Add(1)
		}
		switch {
		case hashes != nil:
			s.hashes[p] = hashes[i]
		case data == nil:
			s.hashes[p] = zeroHash
		default:
			s.hashes[p] = dedup.HashPage(data[i*xenmem.PageSize : (i+1)*xenmem.PageSize])
		}
		in.landed(p)
	}
}

// testAfterInstall, when set (tests only), runs after each post-copy
// InstallRun and before its pages are accounted: a test holds one path
// there to force the interleaving of two paths installing the same page.
var testAfterInstall atomic.Pointer[func(prio bool, pfns []uint64)]

// writeZero installs a zero page before post-copy. Memory reads as zero
// until written, so only a page that had other content (the guest cleared
// it after it was sent) is written.
func (in *installer) writeZero(pfn uint64) error {
	s := in.s
	if pfn >= s.numPages {
		return protocolError("zero page %d beyond %d pages", pfn, s.numPages)
	}
	if err := in.asked(pfn); err != nil {
		return err
	}
	if s.hashes[pfn] != zeroHash && s.hashes[pfn] != (dedup.Hash{}) {
		if err := s.dom.WritePages([]uint64{pfn}, zeroPage); err != nil {
			return fmt.Errorf("install zero page %d: %w", pfn, err)
		}
	}
	s.hashes[pfn] = zeroHash
	in.landed(pfn)
	return nil
}

// duplicate accounts for a page that was present already (post-copy):
// another path installed it. A fallback still waiting for it is settled
// (without this a fallback answer that lost the race to a demand answer
// left the session waiting for it forever), but the page is not marked
// here: only the path that installed it does that, once it has recorded
// the page's hash, which it may not have done yet.
func (in *installer) duplicate(pfn uint64) {
	s := in.s
	s.duplicates.Add(1)
	if aclear(s.pendFB, pfn) {
		s.pending.Add(-1)
	}
	if s.tracker != nil {
		s.tracker.Installed(pfn)
	}
}

// landed marks pfn installed and settles a pending fallback or fault.
func (in *installer) landed(pfn uint64) {
	s := in.s
	aset(s.have, pfn)
	if aclear(s.pendFB, pfn) {
		s.pending.Add(-1)
	}
	if s.tracker != nil {
		s.tracker.Installed(pfn)
	}
}

// diskRefs resolves references from this host's view of the shared disks,
// verified by hash; what cannot be resolved is asked from the source.
func (in *installer) diskRefs(ctx context.Context, body []byte) error {
	s := in.s
	refs, err := wire.ParseDiskRefs(body, in.refs[:0])
	in.refs = refs
	if err != nil {
		return err
	}
	for _, r := range refs {
		if r.PFN >= s.numPages {
			return protocolError("disk reference for page %d beyond %d pages", r.PFN, s.numPages)
		}
		if err := in.asked(r.PFN); err != nil {
			return err
		}
		// Only the domain's own disks may be read, and only those the
		// grant gives: a reference to any other is refused before any
		// disk is touched.
		if int(r.Disk) >= len(s.diskOK) || !s.diskOK[r.Disk] {
			return fmt.Errorf("%w: %w", protocolError("disk reference for page %d names disk %d, not one of the domain's %d granted disks", r.PFN, r.Disk, countTrue(s.diskOK)), dedup.ErrOutOfBounds)
		}
	}
	if !in.prio && s.lazyOn.Load() && !in.awaited(refs) {
		return in.queueRefs(ctx, refs)
	}
	return in.resolveRefs(ctx, refs)
}

// awaited reports whether a vCPU waits for one of refs' pages: such a
// batch is resolved at once, not queued behind the stream's others.
func (in *installer) awaited(refs []wire.DiskRef) bool {
	t := in.s.tracker
	if t == nil {
		return false
	}
	for _, r := range refs {
		if t.Waited(r.PFN) {
			return true
		}
	}
	return false
}

// refQueueDepth bounds the batches of references a data stream's resolver
// holds: queued ones plus the one being resolved.
const refQueueDepth = 64

// refResolver resolves the references of one data stream during
// post-copy, beside the stream's reader, so that reading the disk does not
// stop the stream: the reader goes on to the full pages behind the
// references and the wire stays busy (the push sends references first).
type refResolver struct {
	in   *installer // own scratch buffers, same session and stream
	jobs chan []wire.DiskRef
	free chan []wire.DiskRef // refQueueDepth buffers, reused
	busy sync.WaitGroup      // batches queued and not resolved yet
	done chan struct{}
	err  atomic.Pointer[error] // the first batch that failed
}

func (rr *refResolver) failed() error {
	if e := rr.err.Load(); e != nil {
		return *e
	}
	return nil
}

// queueRefs hands a batch to the stream's resolver (started on first use),
// waiting while refQueueDepth batches are in its hands.
func (in *installer) queueRefs(ctx context.Context, refs []wire.DiskRef) error {
	rr := in.rr
	if rr == nil {
		rr = &refResolver{in: &installer{s: in.s, c: in.c, gen: in.gen},
			jobs: make(chan []wire.DiskRef, refQueueDepth), free: make(chan []wire.DiskRef, refQueueDepth), done: make(chan struct{})}
		for range refQueueDepth {
			rr.free <- nil
		}
		in.rr = rr
		go rr.run(ctx)
	}
	if err := rr.failed(); err != nil {
		return err
	}
	var buf []wire.DiskRef
	select {
	case buf = <-rr.free:
	case <-ctx.Done():
		return ctx.Err()
	}
	rr.busy.Add(1)
	rr.jobs <- append(buf[:0], refs...) // never blocks: a free buffer means a free slot
	return nil
}

func (rr *refResolver) run(ctx context.Context) {
	defer close(rr.done)
	for refs := range rr.jobs {
		if rr.failed() == nil {
			if err := rr.resolve(ctx, refs); err != nil {
				rr.err.Store(&err)
			}
		}
		rr.free <- refs
		rr.busy.Done()
	}
}

// resolve resolves one batch; a panic fails the stream, not the agent.
func (rr *refResolver) resolve(ctx context.Context, refs []wire.DiskRef) (err error) {
	defer func() {
		if p := recover(); p != nil {
			err = rr.in.s.r.recovered(p, "resolve disk references", rr.in.s.log()...)
		}
	}()
	return rr.in.resolveRefs(ctx, refs)
}

// settle waits until every queued batch is resolved (before a flush marker
// is passed on: the marker promises everything before it is installed or
// asked for), and returns the resolver's error.
func (in *installer) settle() error {
	if in.rr == nil {
		return nil
	}
	in.rr.busy.Wait()
	return in.rr.failed()
}

// stopResolver ends the stream's resolver and waits for it.
func (in *installer) stopResolver() {
	if in.rr != nil {
		close(in.rr.jobs)
		<-in.rr.done
	}
}

// resolveRefs resolves one batch of references, checked against the
// domain's size.
func (in *installer) resolveRefs(ctx context.Context, refs []wire.DiskRef) error {
	s := in.s
	lazy := s.lazyOn.Load()
	if cap(in.tmp) < len(refs)*xenmem.PageSize {
		in.tmp = make([]byte, len(refs)*xenmem.PageSize)
	}
	in.fb = in.fb[:0]
	failed := make([]bool, len(refs))
	var protoErr error
	res := s.resolver
	if in.prio {
		res = s.prioResolver
	}
	if res == nil {
		for i := range refs {
			failed[i] = true
		}
	} else {
		drefs := make([]dedup.Ref, len(refs))
		for i, r := range refs {
			drefs[i] = dedup.Ref{Disk: r.Disk, Offset: int64(r.Offset), Hash: r.Hash}
		}
		err := res.ResolveBatch(ctx, drefs, func(i int) []byte {
			return in.tmp[i*xenmem.PageSize : (i+1)*xenmem.PageSize]
		}, func(i int, err error) {
			failed[i] = true
			if errors.Is(err, dedup.ErrOutOfBounds) && protoErr == nil {
				protoErr = fmt.Errorf("disk reference for page %d (disk %d, offset %d): %w", refs[i].PFN, refs[i].Disk, refs[i].Offset, err)
			}
		})
		if err != nil {
			return err
		}
	}
	if protoErr != nil && !s.resumed.Load() {
		return fmt.Errorf("%w: %w", ErrProtocol, protoErr)
	}
	// The resolved pages go in as one batch: compact them to the front of
	// tmp (in place; nothing moves unless a ref failed).
	in.pfns, in.hs = in.pfns[:0], in.hs[:0]
	for i, r := range refs {
		if failed[i] {
			if lazy && s.lazy.Present(r.PFN) {
				// Installed meanwhile (a demand answer): nothing to fetch.
				in.duplicate(r.PFN)
				continue
			}
			if !lazy {
				// The older copy here is not the page any more.
				aclear(s.have, r.PFN)
			}
			// In post-copy the page is not here (not present) unless it
			// was installed since the check above, by a path that marks
			// it here itself: clearing the mark could undo that.
			if asetNew(s.pendFB, r.PFN) {
				s.pending.Add(1)
			}
			s.diskFallback.Add(1)
			in.fb = append(in.fb, r.PFN)
			continue
		}
		s.diskResolved.Add(1)
		page := in.tmp[i*xenmem.PageSize : (i+1)*xenmem.PageSize]
		if k := len(in.pfns); k != i {
			copy(in.tmp[k*xenmem.PageSize:], page)
		}
		in.pfns, in.hs = append(in.pfns, r.PFN), append(in.hs, r.Hash)
	}
	if len(in.pfns) > 0 {
		if err := in.installBatch(in.pfns, in.tmp[:len(in.pfns)*xenmem.PageSize], in.hs); err != nil {
			return err
		}
	}
	if len(in.fb) == 0 {
		return nil
	}
	// Fallbacks go back on the main connection, answered in stream order
	// by the page's data stream; once the domain runs here, on the priority
	// connection, as a vCPU may be waiting.
	in.req = wire.MarshalRequest(in.req[:0], wire.ReasonFallback, in.fb)
	if lazy {
		return s.sendPrio(ctx, in.req)
	}
	return s.main.send(ctx, wire.TypeRequest, in.req)
}

func atomicAndNot(w *uint64, mask uint64) { atomic.AndUint64(w, ^mask) }

func countTrue(b []bool) int {
	n := 0
	for _, x := range b {
		if x {
			n++
		}
	}
	return n
}
