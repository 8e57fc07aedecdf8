package engine_test

import (
	"context"
	"errors"
	"io"
	"net"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

var mirrorDoneFile = postcopy.MirrorPaths

// cutter is a TCP proxy whose current connections can all be cut at once,
// as a link failure would; later connections pass.
type cutter struct {
	ln     net.Listener
	target string
	mu     sync.Mutex
	conns  []net.Conn
	cuts   atomic.Int32
}

func newCutter(t *testing.T, target string) *cutter {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &cutter{ln: ln, target: target}
	t.Cleanup(func() { ln.Close(); c.cut() })
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
			c.mu.Lock()
			c.conns = append(c.conns, in, out)
			c.mu.Unlock()
			go func() { _, _ = io.Copy(out, in); out.Close() }()
			go func() { _, _ = io.Copy(in, out); in.Close() }()
		}
	}()
	return c
}

func (c *cutter) addr() string { return c.ln.Addr().String() }

func (c *cutter) cut() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, x := range c.conns {
		x.Close()
	}
	c.conns = nil
	c.cuts.Add(1)
}

// TestPostCopySurvivesLinkCut cuts every connection in the middle of the
// post-copy push: the destination keeps the domain running, the source
// reconnects and continues from the destination's received bitmap, and the
// destination memory matches the manifest.
func TestPostCopySurvivesLinkCut(t *testing.T) {
	var recovering atomic.Bool
	e := newEnv(t, nil)
	inner := e.recv.Events
	e.recv.Events = func(id string, ev engine.Event) {
		if ev.Kind == engine.EventRecovering {
			recovering.Store(true)
		}
		inner(id, ev)
	}
	px := newCutter(t, e.addr)
	_, dom := e.domain("cut", "64Mi", sim.Profile{Zero: 0.1, Disk: 0.3, DirtyMiBps: 10, HotFraction: 0.1, HotWriteShare: 0.9, ReadMiBps: 50, Seed: 31})
	var once sync.Once
	var sawRecovering atomic.Bool
	hooks := engine.Hooks{Log: testlog.New(t), Progress: func(p engine.Progress) {
		if p.Phase == engine.PhaseRecovering {
			sawRecovering.Store(true)
		}
		if p.Phase == engine.PhasePostCopy && p.Percent > 30 {
			once.Do(px.cut)
		}
	}}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	res, err := engine.Migrate(ctx, dom, px.addr(), engine.Options{Strategy: engine.StrategyPostCopy, LinkBytesPerSec: 24 << 20, MigrationID: "cut"}, hooks)
	if err != nil {
		t.Fatal(err)
	}
	if px.cuts.Load() == 0 {
		t.Fatal("the link was never cut: the test proved nothing")
	}
	if !res.Verified {
		t.Fatal("after recovery the destination memory does not match the manifest")
	}
	if !recovering.Load() {
		t.Error("the destination never reported Recovering")
	}
	if !runningAt(t, e.dst, "cut") {
		t.Fatal("the domain does not run at the destination")
	}
	t.Logf("recovered: %+v, source saw Recovering: %v", res.Pages, sawRecovering.Load())
}

// TestPostCopyRecoveryTimesOut: the destination never comes back; the
// source gives up after its recovery timeout and never resumes the domain.
func TestPostCopyRecoveryTimesOut(t *testing.T) {
	e := newEnv(t, nil)
	px := newCutter(t, e.addr)
	_, dom := e.domain("gone", "32Mi", sim.Profile{Zero: 0.1, Disk: 0.3, DirtyMiBps: 10, ReadMiBps: 50, Seed: 32})
	var once sync.Once
	hooks := engine.Hooks{Log: testlog.New(t), Progress: func(p engine.Progress) {
		if p.Phase == engine.PhasePostCopy && p.Percent > 20 {
			once.Do(func() { px.ln.Close(); px.cut() }) // and no way back
		}
	}}
	_, err := engine.Migrate(context.Background(), dom, px.addr(), engine.Options{Strategy: engine.StrategyPostCopy, LinkBytesPerSec: 16 << 20, MigrationID: "gone", RecoveryTimeout: 2 * time.Second}, hooks)
	if err == nil {
		t.Fatal("migration succeeded with the destination gone")
	}
	t.Logf("failed as expected: %v", err)
	if !errors.Is(err, engine.ErrCommittedFailure) {
		t.Errorf("the error does not say the domain is committed: %v", err)
	}
	// Every caller closes the handle next; that must not resume it either.
	if err := dom.Close(); err != nil {
		t.Fatal(err)
	}
	d, ok := e.src.Domain("gone")
	if !ok {
		t.Fatal("the source lost the domain")
	}
	if !d.Paused() || runningAt(t, e.src, "gone") {
		t.Fatal("the source resumed a domain that runs at the destination")
	}
}

// TestDurablePostCopyFinishesWithoutSource: the source mirrors the pages
// the destination lacks to shared storage; the link then breaks for good
// (as if the source host died) and the destination finishes the migration
// from the mirror, its memory verified against the mirrored manifest.
func TestDurablePostCopyFinishesWithoutSource(t *testing.T) {
	shared := t.TempDir()
	done := make(chan engine.Event, 4)
	e := newEnv(t, func(r *engine.Receiver) {
		r.DurableDir = shared
		r.RecoveryTimeout = time.Second
	})
	inner := e.recv.Events
	e.recv.Events = func(id string, ev engine.Event) {
		if ev.Kind == engine.EventDone || ev.Kind == engine.EventFailed {
			done <- ev
		}
		inner(id, ev)
	}
	px := newCutter(t, e.addr)
	_, dom := e.domain("durable", "32Mi", sim.Profile{Zero: 0.1, Disk: 0.3, DirtyMiBps: 10, ReadMiBps: 50, Seed: 33})
	_, _, doneFile := mirrorDoneFile(shared, "durable")
	var once sync.Once
	hooks := engine.Hooks{Log: testlog.New(t), Progress: func(p engine.Progress) {
		if p.Phase == engine.PhasePostCopy && p.Percent > 20 {
			if _, err := os.Stat(doneFile); err == nil {
				once.Do(func() { px.ln.Close(); px.cut() }) // the source is gone for good
			}
		}
	}}
	_, err := engine.Migrate(context.Background(), dom, px.addr(), engine.Options{Strategy: engine.StrategyPostCopy, LinkBytesPerSec: 8 << 20,
		MigrationID: "durable", DurableDir: shared, RecoveryTimeout: 3 * time.Second}, hooks)
	if px.cuts.Load() == 0 {
		t.Fatal("the link was never cut: the test proved nothing")
	}
	if err == nil {
		t.Fatal("the source reported success although it lost the destination")
	}
	select {
	case ev := <-done:
		if ev.Kind != engine.EventDone {
			t.Fatalf("the destination did not finish from the mirror: %v", ev.Err)
		}
		// A post-copy reports its fault latency histogram (the agent's
		// metrics read it); bucket counts add up to the total.
		if h := ev.Stats.FaultLatency; h == nil {
			t.Error("a post-copy's done event carries no fault latency histogram")
		} else if counts, _, n := h.Cumulative([]time.Duration{10 * time.Second}); n != h.Count() || counts[0] != n {
			t.Errorf("fault histogram: %d observations, %d in buckets, %d at or below 10s", h.Count(), n, counts[0])
		}
	case <-time.After(30 * time.Second):
		t.Fatal("the destination did not finish")
	}
	if !runningAt(t, e.dst, "durable") {
		t.Fatal("the domain does not run at the destination")
	}
	if err := dom.Close(); err != nil {
		t.Fatal(err)
	}
	if d, ok := e.src.Domain("durable"); ok && (!d.Paused() || runningAt(t, e.src, "durable")) {
		t.Fatal("the source resumed the domain")
	}
}
