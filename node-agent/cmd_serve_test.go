package main

import (
	"context"
	"errors"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr/testr"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// The standalone agent's migrate path: the destination's "resumed" is
// lost, migrateLocal returns (its deferred Close included) with the domain
// paused here, never running on both hosts, and an error that names the
// resolve command; the operator's release then destroys the paused copy.
func TestServeMigrateKeepsCommittedDomainPaused(t *testing.T) {
	log := testr.NewWithOptions(t, testr.Options{Verbosity: 0})
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
		func(migrateEvent) {}, log)
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
