package agent

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/xenferry/xenferry/internal/testlog"
	"k8s.io/apimachinery/pkg/types"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// The standalone agent's migrate path: the destination's "resumed" is
// lost, migrateLocal returns (its deferred Close included) with the domain
// paused here, never running on both hosts, and an error that names the
// resolve command; the operator's release then destroys the paused copy.
func TestServeMigrateKeepsCommittedDomainPaused(t *testing.T) {
	log := testlog.New(t)
	dir := t.TempDir()
	disk := filepath.Join(dir, "vm.img")
	src, err := sim.NewHost(sim.Config{Name: "src", Memory: "1Gi", CPUs: 2, StateDir: filepath.Join(dir, "src"),
		Domains: []sim.DomainSpec{simDomain("vm", "default", "16Mi", 4, disk, 5)}}, log.WithName("src"))
	if err != nil {
		t.Fatal(err)
	}
	defer src.Close()
	dst, err := sim.NewHost(sim.Config{Name: "dst", Memory: "1Gi", CPUs: 2, StateDir: filepath.Join(dir, "dst")}, log.WithName("dst"))
	if err != nil {
		t.Fatal(err)
	}
	defer dst.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go func() { _ = (&engine.Receiver{Host: dst, Log: log.WithName("receiver")}).Serve(ctx, ln) }()
	px := newCutProxy(t, "resumed")
	px.target.Store(ln.Addr().String())

	ix := newDiskIndexes(dir, log)
	defer ix.close()
	_, err = migrateLocal(ctx, src, ix, migrateRequest{Domain: "vm", To: px.ln.Addr().String(), Strategy: string(engine.StrategyPreCopy)}, "",
		func(migrateEvent) {}, log, nil)
	if !errors.Is(err, engine.ErrCommittedFailure) || !strings.Contains(err.Error(), "node-agent resolve --domain vm") {
		t.Fatalf("want a committed failure naming the resolve command, got %v", err)
	}
	d, ok := src.Domain("vm")
	if !ok {
		t.Fatal("the source lost the domain")
	}
	ops := d.Ops()
	time.Sleep(300 * time.Millisecond)
	if !d.Paused() || d.Ops() != ops {
		t.Fatal("after migrateLocal returned the domain runs on the source while the destination runs it")
	}
	if dd, ok := dst.Domain("vm"); !ok || dd.Paused() {
		t.Fatal("the domain does not run at the destination")
	}
	if err := resolveLocal(ctx, src, resolveRequest{Domain: "vm", Verdict: "bogus"}, log); err == nil {
		t.Fatal("an unknown verdict was accepted")
	}
	if err := resolveLocal(ctx, src, resolveRequest{Domain: "vm", Verdict: "release"}, log); err != nil {
		t.Fatal(err)
	}
	if _, ok := src.Domain("vm"); ok {
		t.Fatal("release left the domain on the source")
	}
}

// A deleted migration (or an abort) cancels an outgoing transfer only
// before go: once the engine committed the domain, StopAndCopy included,
// cancelling could only strand it.
func TestForgetCancelsOnlyBeforeGo(t *testing.T) {
	for _, c := range []struct {
		phase      engine.Phase
		committed  bool
		wantCancel bool
	}{
		{engine.PhasePreCopy, false, true},
		{engine.PhaseStopAndCopy, false, true},
		{engine.PhaseStopAndCopy, true, false},
		{engine.PhasePostCopy, true, false},
	} {
		a := &Agent{runs: map[string]*run{}, log: testlog.New(t)}
		cancelled := false
		r := &run{key: types.NamespacedName{Namespace: "ns", Name: "m"}, uid: "u1", role: roleSource, phase: c.phase,
			committed: c.committed, cancel: func() { cancelled = true }}
		a.addRun(r)
		a.forget(r.key)
		if cancelled != c.wantCancel {
			t.Errorf("phase %s committed=%v: cancelled=%v, want %v", c.phase, c.committed, cancelled, c.wantCancel)
		}
	}
}
