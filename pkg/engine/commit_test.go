package engine_test

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/wire"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// rewriter sits between a source and a real receiver and speaks the wire
// protocol on the way back: every control message the destination sends
// passes through edit, which may forward it changed, drop it, or cut
// every connection instead (a link failure at that exact message). The
// source's records pass untouched.
type rewriter struct {
	ln     net.Listener
	mu     sync.Mutex
	conns  []net.Conn
	edit   func(m *wire.Control) (forward, cut bool)
	edited atomic.Int32
	// corruptPages, when set before the first connection, re-frames the
	// source's records too and flips the last byte of every raw PAGES
	// record (its CRC recomputed): corruption the CRC cannot see.
	corruptPages bool
	corrupted    atomic.Int32
}

func newRewriter(t *testing.T, target string, edit func(m *wire.Control) (forward, cut bool)) *rewriter {
	t.Helper()
	return newRewriterWith(t, target, edit, false)
}

func newRewriterWith(t *testing.T, target string, edit func(m *wire.Control) (forward, cut bool), corruptPages bool) *rewriter {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rw := &rewriter{ln: ln, edit: edit, corruptPages: corruptPages}
	t.Cleanup(func() { ln.Close(); rw.cut() })
	go func() {
		for {
			in, err := ln.Accept()
			if err != nil {
				return
			}
			out, err := net.Dial("tcp", target)
			if err != nil {
				in.Close()
				continue
			}
			rw.mu.Lock()
			rw.conns = append(rw.conns, in, out)
			rw.mu.Unlock()
			go func() {
				if rw.corruptPages {
					rw.forth(in, out)
				} else {
					_, _ = io.Copy(out, in)
				}
				out.Close()
			}()
			go func() { rw.back(in, out); in.Close() }()
		}
	}()
	return rw
}

func (rw *rewriter) addr() string { return rw.ln.Addr().String() }

func (rw *rewriter) cut() {
	rw.mu.Lock()
	defer rw.mu.Unlock()
	for _, c := range rw.conns {
		c.Close()
	}
	rw.conns = nil
}

// back copies the destination's records to the source, re-framed.
func (rw *rewriter) back(src, dst net.Conn) {
	r, w := wire.NewReader(dst), wire.NewWriter(src)
	if r.ReadStreamHeader() != nil || w.WriteStreamHeader() != nil || w.Flush() != nil {
		return
	}
	for {
		rec, err := r.Next()
		if err != nil {
			return
		}
		body := rec.Body
		if rec.Type == wire.TypeControl {
			m, err := wire.ParseControl(rec.Body)
			if err != nil {
				return
			}
			if m.Kind != "hello" {
				before := m
				forward, cut := rw.edit(&m)
				if cut {
					rw.edited.Add(1)
					rw.cut()
					return
				}
				if !forward {
					rw.edited.Add(1)
					continue
				}
				if m.Kind != before.Kind || string(m.Data) != string(before.Data) || m.Message != before.Message {
					rw.edited.Add(1)
				}
				if body, err = wire.MarshalControl(nil, &m); err != nil {
					return
				}
			}
		}
		if w.Write(rec.Type, body) != nil || w.Flush() != nil {
			return
		}
	}
}

// forth copies the source's records to the destination, re-framed, with
// every uncompressed page batch's last byte flipped.
func (rw *rewriter) forth(src, dst net.Conn) {
	r, w := wire.NewReader(src), wire.NewWriter(dst)
	if r.ReadStreamHeader() != nil || w.WriteStreamHeader() != nil || w.Flush() != nil {
		return
	}
	for {
		rec, err := r.Next()
		if err != nil {
			return
		}
		body := rec.Body
		if rec.Type == wire.TypePages {
			if _, flags, data, err := wire.ParsePages(rec.Body, nil); err == nil && flags&wire.PagesZstd == 0 && len(data) > 0 {
				body = append([]byte(nil), rec.Body...)
				body[len(body)-1] ^= 0x5a
				rw.corrupted.Add(1)
			}
		}
		if w.Write(rec.Type, body) != nil || w.Flush() != nil {
			return
		}
	}
}

// unverified rewrites the statistics of m to say that pages mismatched.
func unverified(m *wire.Control) {
	var st map[string]any
	_ = json.Unmarshal(m.Data, &st)
	if st == nil {
		st = map[string]any{}
	}
	st["verified"], st["mismatches"] = false, 3
	m.Data, _ = json.Marshal(st)
}

// closeAndCheckSource closes the source handle as every caller does and
// reports where the domain runs afterwards.
func closeAndCheckSource(t *testing.T, e *env, dom interface{ Close() error }, name string) (present, paused, running bool) {
	t.Helper()
	if err := dom.Close(); err != nil {
		t.Fatalf("Close of the source handle: %v", err)
	}
	d, ok := e.src.Domain(name)
	if !ok {
		return false, false, false
	}
	return true, d.Paused(), runningAt(t, e.src, name)
}

var quietProfile = sim.Profile{Zero: 0.2, Disk: 0.3, DirtyMiBps: 8, ReadMiBps: 30, Seed: 41}

// migrateThrough runs one migration of a new domain through rw.
func migrateThrough(t *testing.T, e *env, rw *rewriter, name string, opts engine.Options, ctx context.Context) (engine.Result, error, interface{ Close() error }) {
	t.Helper()
	_, dom := e.domain(name, "16Mi", quietProfile)
	opts.MigrationID = name
	if opts.LinkBytesPerSec == 0 {
		opts.LinkBytesPerSec = 64 << 20
	}
	res, err := engine.Migrate(ctx, dom, rw.addr(), opts, engine.Hooks{Log: testlog.New(t)})
	return res, err, dom
}

// TestLostResumedReplyLeavesSourcePaused: the link breaks right when the
// destination reports that it resumed the domain. The source cannot know
// whether it runs there, so after Migrate and Close it stays paused here:
// the domain runs on exactly one host (the destination).
func TestLostResumedReplyLeavesSourcePaused(t *testing.T) {
	e := newEnv(t, nil)
	rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) { return true, m.Kind == "resumed" })
	var dials atomic.Int32
	dial := func(ctx context.Context, addr string) (net.Conn, error) {
		dials.Add(1)
		var d net.Dialer
		return d.DialContext(ctx, "tcp", addr)
	}
	var committed atomic.Bool
	_, dom := e.domain("lost", "16Mi", quietProfile)
	_, err := engine.Migrate(context.Background(), dom, rw.addr(), engine.Options{Strategy: engine.StrategyPreCopy, LinkBytesPerSec: 64 << 20,
		MigrationID: "lost", Streams: 2, Dial: dial}, engine.Hooks{Log: testlog.New(t), Progress: func(p engine.Progress) {
		if p.Committed {
			committed.Store(true)
		}
	}})
	if err == nil || rw.edited.Load() == 0 {
		t.Fatalf("migration did not fail at the lost reply (err %v, cut %d)", err, rw.edited.Load())
	}
	if !errors.Is(err, engine.ErrCommittedFailure) || !strings.Contains(err.Error(), "paused on the source") {
		t.Fatalf("error does not say the domain is committed and paused here: %v", err)
	}
	if !committed.Load() {
		t.Error("progress never reported Committed")
	}
	if n := dials.Load(); n != 4 {
		t.Errorf("Options.Dial opened %d connections, want 4 (main, 2 data, priority)", n)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "lost")
	if !present || !paused || running {
		t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want present and paused", present, paused, running)
	}
	if !runningAt(t, e.dst, "lost") {
		t.Fatal("the domain does not run at the destination")
	}
}

// TestDestinationErrorAfterGo: the destination answers go with an error.
// The source keeps its copy paused, through Close.
func TestDestinationErrorAfterGo(t *testing.T) {
	e := newEnv(t, nil)
	rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) {
		if m.Kind == "resumed" {
			*m = wire.Control{Kind: "error", Message: "injected failure after go"}
		}
		return true, false
	})
	_, err, dom := migrateThrough(t, e, rw, "errgo", engine.Options{Strategy: engine.StrategyPreCopy}, context.Background())
	if err == nil || !errors.Is(err, engine.ErrCommittedFailure) {
		t.Fatalf("want a committed failure, got %v", err)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "errgo")
	if !present || !paused || running {
		t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want present and paused", present, paused, running)
	}
}

// TestAbortDuringStopAndCopyAfterGo: the caller cancels while the source
// waits for "resumed" after go (an abort request during StopAndCopy). The
// domain may already run at the destination; the source keeps it paused.
func TestAbortDuringStopAndCopyAfterGo(t *testing.T) {
	e := newEnv(t, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) {
		if m.Kind == "resumed" {
			cancel()
			time.Sleep(300 * time.Millisecond) // the abort wins the race
		}
		return true, false
	})
	_, err, dom := migrateThrough(t, e, rw, "abort", engine.Options{Strategy: engine.StrategyPreCopy}, ctx)
	if !errors.Is(err, context.Canceled) || !errors.Is(err, engine.ErrCommittedFailure) {
		t.Fatalf("want a cancelled, committed failure, got %v", err)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "abort")
	if !present || !paused || running {
		t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want present and paused", present, paused, running)
	}
	if !runningAt(t, e.dst, "abort") {
		t.Fatal("the domain does not run at the destination")
	}
}

// TestUnverifiedDoneKeepsSourceCopy: a post-copy destination answers done
// with verified=false (as a corrupted page would make it). The source must
// not report success nor release its domain: the paused copy here is the
// only good one, and Close keeps it.
func TestUnverifiedDoneKeepsSourceCopy(t *testing.T) {
	e := newEnv(t, nil)
	rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) {
		if m.Kind == "done" {
			unverified(m)
		}
		return true, false
	})
	res, err, dom := migrateThrough(t, e, rw, "corrupt", engine.Options{Strategy: engine.StrategyPostCopy}, context.Background())
	if err == nil {
		t.Fatal("an unverified post-copy was reported as a success")
	}
	if rw.edited.Load() == 0 {
		t.Fatal("the rewriter never saw done: the test proved nothing")
	}
	if res.Verified || errors.Is(err, engine.ErrDiscarded) || !errors.Is(err, engine.ErrCommittedFailure) {
		t.Fatalf("result verified=%v, error %v; want an unverified, committed failure", res.Verified, err)
	}
	if !strings.Contains(err.Error(), "reclaim") {
		t.Errorf("the error does not tell the operator what to do: %v", err)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "corrupt")
	if !present || !paused || running {
		t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want the good copy kept, paused", present, paused, running)
	}
}

// TestUnverifiedReadyNeverSendsGo: a stop-and-copy destination answers
// ready with verified=false; the source never tells it to run the domain
// and the domain keeps running here, nothing left at the destination.
func TestUnverifiedReadyNeverSendsGo(t *testing.T) {
	e := newEnv(t, nil)
	rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) {
		if m.Kind == "ready" {
			unverified(m)
		}
		return true, false
	})
	_, err, dom := migrateThrough(t, e, rw, "notready", engine.Options{Strategy: engine.StrategyPreCopy}, context.Background())
	if err == nil || errors.Is(err, engine.ErrCommittedFailure) {
		t.Fatalf("want a failure before the point of no return, got %v", err)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "notready")
	if !present || paused || !running {
		t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want it running here", present, paused, running)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := e.dst.Domain("notready"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the destination kept its half-built domain")
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestDiscardedAfterGoReclaims: the destination says it destroyed the
// domain it had resumed ("discarded"), in post-copy instead of done and in
// stop-and-copy instead of resumed. The source resumes its copy and
// reports ErrDiscarded; Close keeps it running.
func TestDiscardedAfterGoReclaims(t *testing.T) {
	e := newEnv(t, nil)
	for _, tc := range []struct {
		name, at string
		st       engine.Strategy
	}{{"disc-post", "done", engine.StrategyPostCopy}, {"disc-stop", "resumed", engine.StrategyPreCopy}} {
		t.Run(string(tc.st), func(t *testing.T) {
			rw := newRewriter(t, e.addr, func(m *wire.Control) (bool, bool) {
				if m.Kind == tc.at {
					*m = wire.Control{Kind: "discarded", Message: "verification failed; destroyed here"}
				}
				return true, false
			})
			_, err, dom := migrateThrough(t, e, rw, tc.name, engine.Options{Strategy: tc.st}, context.Background())
			if !errors.Is(err, engine.ErrDiscarded) {
				t.Fatalf("want ErrDiscarded, got %v", err)
			}
			present, paused, running := closeAndCheckSource(t, e, dom, tc.name)
			if !present || paused || !running {
				t.Fatalf("after Close the source domain is present=%v paused=%v running=%v; want it running here", present, paused, running)
			}
			// The destination really runs its copy in this test (the
			// rewriter invented the verdict); stop it so the hosts stay
			// apart for the next case.
			if d, ok := e.dst.Domain(tc.name); ok {
				_ = d.Pause()
			}
		})
	}
}

// TestCorruptedPostCopyKeepsSourceCopy: page data corrupted on the wire
// with valid CRCs (as a flipped bit the link's checksum missed) during a
// post-copy. The destination's verification fails after the domain runs
// there; the source must neither report success nor release the only good
// copy: it either keeps it paused (no verdict) or runs it again on the
// destination's "discarded".
func TestCorruptedPostCopyKeepsSourceCopy(t *testing.T) {
	e := newEnv(t, nil)
	rw := newRewriterWith(t, e.addr, func(m *wire.Control) (bool, bool) { return true, false }, true)
	res, err, dom := migrateThrough(t, e, rw, "flipped", engine.Options{Strategy: engine.StrategyPostCopy}, context.Background())
	if rw.corrupted.Load() == 0 {
		t.Fatal("no page was corrupted: the test proved nothing")
	}
	if err == nil || res.Verified {
		t.Fatalf("a post-copy with %d corrupted batches was reported as a success (verified=%v)", rw.corrupted.Load(), res.Verified)
	}
	discarded := errors.Is(err, engine.ErrDiscarded)
	if !discarded && !errors.Is(err, engine.ErrCommittedFailure) {
		t.Fatalf("want a committed failure or a discard, got %v", err)
	}
	present, paused, running := closeAndCheckSource(t, e, dom, "flipped")
	switch {
	case !present:
		t.Fatal("the source released the only good copy of the domain")
	case discarded && (paused || !running):
		t.Fatalf("discarded, but the source domain is paused=%v running=%v", paused, running)
	case !discarded && (!paused || running):
		t.Fatalf("no verdict, but the source domain is paused=%v running=%v: it may run on both hosts", paused, running)
	}
	t.Logf("corrupted %d batches; source kept its copy (discarded=%v): %v", rw.corrupted.Load(), discarded, err)
}
