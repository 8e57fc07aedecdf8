package agent

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/xen/paging"
	"github.com/xenferry/xenferry/pkg/xlstream"
)

// Early resume through `xl migrate` (docs/xen-postcopy.md): xl-send holds
// back the RAM of an HVM/PVH domain (pkg/xlstream's LazySource); here, on
// the destination, the held gfns are paged out before xl's "ready" goes
// back to the source, so that the domain xl unpauses on the go faults on
// them, and this pager fetches each from the source ahead of its push.

// readyMessage is what `xl migrate-receive` writes once the domain is
// restored (paused), before it waits for the permission to go (xl sends
// the C string's NUL after it; the gate does not wait for that byte).
var readyMessage = []byte("domain received, ready to unpause")

// readyGate passes xl's output through and calls gate once, after the
// ready message was read and before any of its bytes are handed on: the
// source's xl cannot give the go before gate returned nil. Bytes that may
// begin the message are held back until it is whole or ruled out.
type readyGate struct {
	r      io.Reader
	gate   func() error
	passed bool
	hold   []byte // a possible beginning of the ready message
	out    []byte // read, cleared to hand on
	err    error  // r's error, returned once out is empty
	buf    []byte
}

func (g *readyGate) Read(p []byte) (int, error) {
	for len(g.out) == 0 {
		if g.err != nil {
			return 0, g.err
		}
		if g.buf == nil {
			g.buf = make([]byte, 32<<10)
		}
		n, err := g.r.Read(g.buf)
		g.err = err
		data := append(g.hold, g.buf[:n]...)
		g.hold = nil
		if g.passed {
			g.out = data
			continue
		}
		if bytes.Contains(data, readyMessage) {
			if gerr := g.gate(); gerr != nil {
				g.err = fmt.Errorf("before letting the domain run here: %w", gerr)
				g.out = nil
				return 0, g.err
			}
			g.passed, g.out = true, data
			continue
		}
		keep := 0
		for k := min(len(readyMessage)-1, len(data)); k > 0; k-- {
			if bytes.HasSuffix(data, readyMessage[:k]) {
				keep = k
				break
			}
		}
		if g.err != nil {
			keep = 0 // the message cannot complete any more
		}
		g.out = data[:len(data)-keep]
		g.hold = slices.Clone(data[len(data)-keep:])
	}
	n := copy(p, g.out)
	g.out = g.out[n:]
	return n, nil
}

// lazyStats is what an early resume did on the destination.
type lazyStats struct {
	Held        int     `json:"held"`
	DemandPages int     `json:"demandPages"`
	PushedPages int     `json:"pushedPages"`
	SpoolPages  int     `json:"spoolPages"`
	EvictSec    float64 `json:"evictSeconds"`
	FaultP50Us  int64   `json:"faultP50Us"`
	FaultP99Us  int64   `json:"faultP99Us"`
	Seconds     float64 `json:"seconds"` // from the go to the last page
	// hist is every demand fault's latency, for the agent's metrics.
	hist *postcopy.Histogram
}

// xlLazySink is the destination's xlstream.LazySink on Xen.
//
// Invariants: held/hashes cover exactly the manifest; a pfn leaves paged
// state only through pager.Install of a page whose hash matched; done is
// closed once, when every held page is in or the sink failed.
type xlLazySink struct {
	ctx      context.Context
	log      logr.Logger
	xlPath   string
	spoolDir string
	domName  func() (string, error)

	mu       sync.Mutex
	name     string
	hashes   []uint64
	held     xenmem.Bitmap
	nHeld    int
	left     int
	pager    *paging.Pager
	faultAt  map[uint64]time.Time
	st       lazyStats
	resumed  time.Time
	done     chan struct{}
	err      error
	finished bool
	queue    chan uint64
}

func newXLLazySink(ctx context.Context, log logr.Logger, xlPath, spoolDir string, domName func() (string, error)) *xlLazySink {
	return &xlLazySink{ctx: ctx, log: log, xlPath: xlPath, spoolDir: spoolDir, domName: domName,
		faultAt: map[uint64]time.Time{}, done: make(chan struct{}), queue: make(chan uint64, 1024)}
}

func (s *xlLazySink) Hello(name string) error {
	if err := paging.Probe(); err != nil {
		return err
	}
	s.mu.Lock()
	s.name = name
	s.mu.Unlock()
	s.log.Info("Early resume: the source holds the domain's RAM back", "spool", name)
	return nil
}

// active: the source asked for early resume.
func (s *xlLazySink) active() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.name != ""
}

func (s *xlLazySink) Start(demand func(uint64) error) {
	go func() {
		for {
			select {
			case pfn := <-s.queue:
				if err := demand(pfn); err != nil {
					s.Abort(fmt.Errorf("ask the source for pfn %#x: %w", pfn, err))
					return
				}
			case <-s.done:
				return
			}
		}
	}()
}

func (s *xlLazySink) Manifest(es []xlstream.LazyEntry) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, e := range es {
		if need := int(e.PFN) + 1; need > len(s.hashes) {
			s.hashes = append(s.hashes, make([]uint64, need-len(s.hashes))...)
		}
		s.held.Grow(e.PFN + 1)
		if !s.held.Test(e.PFN) {
			s.held.Set(e.PFN)
			s.nHeld++
		}
		s.hashes[e.PFN] = e.Hash
	}
	return nil
}

// heldPFNs lists the held pfns in order. The manifest is complete before
// xl's ready, so the list does not change once the domain can run.
func (s *xlLazySink) heldPFNs() []uint64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]uint64, 0, s.nHeld)
	for pfn := s.held.Next(0); pfn < s.held.Len(); pfn = s.held.Next(pfn + 1) {
		out = append(out, pfn)
	}
	return out
}

// beforeReady runs when the restore is done and the domain is paused:
// it enables the paging ring and pages every held gfn out.
func (s *xlLazySink) beforeReady() error {
	gfns := s.heldPFNs()
	nHeld := len(gfns)
	if nHeld == 0 {
		return errors.New("early resume: the source held no page back")
	}
	name, err := s.domName()
	if err != nil {
		return err
	}
	out, err := exec.CommandContext(s.ctx, s.xlPath, "domid", name+"--incoming").Output()
	if err != nil {
		return fmt.Errorf("find the incoming domain %s--incoming: %w", name, err)
	}
	id, err := strconv.ParseUint(strings.TrimSpace(string(out)), 10, 16)
	if err != nil {
		return fmt.Errorf("domid of %s--incoming: %q", name, out)
	}
	t0 := time.Now()
	p, err := paging.Open(uint16(id), gfns[nHeld-1]+1)
	if err != nil {
		return err
	}
	if err := p.Enable(); err != nil {
		p.Close()
		return err
	}
	if n, err := p.Evict(gfns); err != nil {
		// The domain never ran here: xl's failure destroys it and the
		// source resumes it. The gfns already evicted are not installed.
		p.Close()
		return fmt.Errorf("page out the held gfns (%d of %d done): %w", n, len(gfns), err)
	}
	s.mu.Lock()
	s.pager, s.left = p, nHeld
	s.st.Held, s.st.EvictSec = nHeld, time.Since(t0).Seconds()
	s.resumed = time.Now()
	s.mu.Unlock()
	s.log.Info("Held gfns paged out; the domain may run", "domid", id, "gfns", nHeld, "seconds", s.st.EvictSec)
	go func() {
		err := p.Run(func(g uint64) {
			s.mu.Lock()
			if _, ok := s.faultAt[g]; !ok {
				s.faultAt[g] = time.Now()
			}
			s.mu.Unlock()
			select {
			case s.queue <- g:
			default:
				s.Abort(fmt.Errorf("more than %d demands outstanding", cap(s.queue)))
			}
		})
		if err != nil {
			s.Abort(fmt.Errorf("pager: %w", err))
		}
	}()
	return nil
}

func (s *xlLazySink) Page(pfn uint64, page []byte) error {
	return s.install(pfn, page, "link")
}

func (s *xlLazySink) install(pfn uint64, page []byte, from string) error {
	s.mu.Lock()
	p := s.pager
	ok := s.held.Has(pfn)
	want := uint64(0)
	if ok {
		want = s.hashes[pfn]
	}
	s.mu.Unlock()
	if p == nil || !ok {
		return fmt.Errorf("early resume: page for pfn %#x, which is not held back here", pfn)
	}
	if xlstream.PageHash(page) != want {
		return fmt.Errorf("early resume: pfn %#x from the %s does not match the source's hash", pfn, from)
	}
	err := p.Install(pfn, page)
	if errors.Is(err, paging.ErrNotPaged) {
		return nil // demanded and pushed: the first copy is in
	}
	if err != nil {
		return err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.faultAt[pfn]; ok {
		delete(s.faultAt, pfn)
		s.st.DemandPages++
		if s.st.hist == nil {
			s.st.hist = &postcopy.Histogram{}
		}
		s.st.hist.Observe(time.Since(t))
	} else if from == "spool" {
		s.st.SpoolPages++
	} else {
		s.st.PushedPages++
	}
	s.left--
	if s.left == 0 {
		s.finishLocked(nil)
	}
	return nil
}

func (s *xlLazySink) finishLocked(err error) {
	if s.finished {
		return
	}
	s.finished, s.err = true, err
	s.st.Seconds = time.Since(s.resumed).Seconds()
	if h := s.st.hist; h != nil && h.Count() > 0 {
		s.st.FaultP50Us = h.Quantile(0.5).Microseconds()
		s.st.FaultP99Us = h.Quantile(0.99).Microseconds()
	}
	close(s.done)
}

// Abort: the source is gone (or broke the protocol) before every page
// came. The spool, on storage this host shares, still has them.
func (s *xlLazySink) Abort(err error) {
	s.mu.Lock()
	if s.finished || s.pager == nil {
		if !s.finished && s.pager == nil {
			s.finishLocked(err)
		}
		s.mu.Unlock()
		return
	}
	name := s.name
	s.mu.Unlock()
	s.log.Info("Source lost during early resume; loading the rest from the spool", "reason", err.Error(), "spool", name)
	go func() {
		if serr := s.fromSpool(name); serr != nil {
			s.mu.Lock()
			s.finishLocked(fmt.Errorf("%v; and the spool: %w", err, serr))
			s.mu.Unlock()
		}
	}()
}

func (s *xlLazySink) fromSpool(name string) error {
	if s.spoolDir == "" {
		return errors.New("no --spool-dir on this host")
	}
	f, err := os.Open(filepath.Join(s.spoolDir, name))
	if err != nil {
		return fmt.Errorf("open the spool: %w", err)
	}
	defer f.Close()
	page := make([]byte, xlstream.PageSize)
	for _, pfn := range s.heldPFNs() {
		if !s.pager.IsPaged(pfn) {
			continue
		}
		if _, err := f.ReadAt(page, int64(pfn)*xlstream.PageSize); err != nil {
			return fmt.Errorf("read pfn %#x: %w", pfn, err)
		}
		if err := s.install(pfn, page, "spool"); err != nil {
			return err
		}
	}
	return nil
}

// Wait blocks until every held page is in, then hands the ring back.
func (s *xlLazySink) Wait() error {
	<-s.done
	s.mu.Lock()
	p, err, st := s.pager, s.err, s.st
	s.mu.Unlock()
	if p != nil && err == nil {
		s.mu.Lock()
		s.pager = nil // closed here, not again by release
		s.mu.Unlock()
		if cerr := p.Close(); cerr != nil {
			err = cerr
		}
	}
	s.log.Info("Early resume finished", "held", st.Held, "demand", st.DemandPages, "pushed", st.PushedPages,
		"spool", st.SpoolPages, "seconds", st.Seconds, "faultP50Us", st.FaultP50Us, "faultP99Us", st.FaultP99Us, "err", fmt.Sprint(err))
	return err
}

// release closes a pager that Wait did not (the domain never ran here, or
// xl failed after the go and destroyed it): its loop and handles go.
func (s *xlLazySink) release() {
	s.mu.Lock()
	p := s.pager
	s.pager = nil
	s.finishLocked(errors.New("early resume abandoned"))
	s.mu.Unlock()
	if p != nil {
		if err := p.Close(); err != nil {
			s.log.Info("Pager of an abandoned early resume closed", "reason", err.Error())
		}
	}
}

func (s *xlLazySink) stats() lazyStats {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.st
}

// earlyResumeStrategy: the engine strategy resumes the domain before all
// of its memory has arrived (the controller's resolved strategy string).
func earlyResumeStrategy(s string) bool {
	return strings.HasPrefix(s, "hybrid") || strings.HasPrefix(s, "postcopy")
}

// spoolDir is where the held pages of an early resume wait: the durable
// directory on shared storage when the agent has one (then a target can
// finish from it if this host dies after the go), else a local one.
func (a *Agent) spoolDir() string {
	if a.cfg.DurableDir != "" {
		return filepath.Join(a.cfg.DurableDir, "xl-spool")
	}
	return filepath.Join(a.cfg.StateDir, "xl-spool")
}

// receiveStats are the target's figures of an early resume for its
// events (status and metrics); zero without one.
func (st *lazyStats) receiveStats() engine.ReceiveStats {
	if st == nil {
		return engine.ReceiveStats{Verified: true}
	}
	rs := engine.ReceiveStats{Verified: true, Pages: uint64(st.Held), Demand: uint64(st.DemandPages),
		FaultP50: time.Duration(st.FaultP50Us) * time.Microsecond, FaultP99: time.Duration(st.FaultP99Us) * time.Microsecond,
		FaultLatency: st.hist}
	return rs
}
