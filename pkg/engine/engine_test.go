package engine_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/xenferry/xenferry/internal/testlog"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// receiverEnv makes the test binary a standalone destination agent (a
// process the tests can kill).
const receiverEnv = "XENFERRY_TEST_RECEIVER_ADDR_FILE"

func TestMain(m *testing.M) {
	if f := os.Getenv(receiverEnv); f != "" {
		os.Exit(runReceiverProcess(f))
	}
	os.Exit(m.Run())
}

func runReceiverProcess(addrFile string) int {
	dir := filepath.Dir(addrFile)
	h, err := sim.NewHost(sim.Config{Name: "dst-proc", Memory: "8Gi", CPUs: 2, StateDir: filepath.Join(dir, "dst-proc")}, logr.Discard())
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if err := os.WriteFile(addrFile+".tmp", []byte(ln.Addr().String()), 0o600); err != nil {
		return 1
	}
	_ = os.Rename(addrFile+".tmp", addrFile)
	r := &engine.Receiver{Host: h}
	_ = r.Serve(context.Background(), ln)
	return 0
}

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("the simulated host needs userfaultfd, which needs root here (vm.unprivileged_userfaultfd=0); run as root (CI does)")
	}
}

// env is a source host, a destination host and a receiver on loopback.
type env struct {
	t        *testing.T
	dir      string
	src, dst *sim.Host
	addr     string
	recv     *engine.Receiver
	events   chan engine.Event
}

func newEnv(t *testing.T, configure func(r *engine.Receiver)) *env {
	requireRoot(t)
	dir := t.TempDir()
	log := testlog.New(t)
	src, err := sim.NewHost(sim.Config{Name: "src", Memory: "8Gi", CPUs: 2, StateDir: filepath.Join(dir, "src")}, log.WithName("src"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { src.Close() })
	dst, err := sim.NewHost(sim.Config{Name: "dst", Memory: "8Gi", CPUs: 2, StateDir: filepath.Join(dir, "dst")}, log.WithName("dst"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { dst.Close() })
	e := &env{t: t, dir: dir, src: src, dst: dst, events: make(chan engine.Event, 64)}
	e.recv = &engine.Receiver{Host: dst, Log: log.WithName("receiver"), Events: func(_ string, ev engine.Event) {
		select {
		case e.events <- ev:
		default:
		}
	}}
	if configure != nil {
		configure(e.recv)
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	var wg sync.WaitGroup
	wg.Add(1)
	go func() { defer wg.Done(); _ = e.recv.Serve(ctx, ln) }()
	t.Cleanup(func() { cancel(); wg.Wait() })
	e.addr = ln.Addr().String()
	return e
}

// domain creates a running domain with a generated disk.
func (e *env) domain(name string, mem string, p sim.Profile) (string, xenmem.SourceDomain) {
	e.t.Helper()
	disk := filepath.Join(e.dir, name+".img")
	size, _ := sim.ParseBytes(mem)
	if err := sim.GenerateDisk(disk, int64(size), p.Seed); err != nil {
		e.t.Fatal(err)
	}
	if _, err := e.src.CreateDomain(context.Background(), sim.DomainSpec{Name: name, Memory: mem, VCPUs: 2,
		Disks: []sim.DiskSpec{{ID: "xvda", Path: disk}}, Profile: p}); err != nil {
		e.t.Fatal(err)
	}
	dom, err := e.src.OpenSource(context.Background(), name)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { dom.Close() })
	return disk, dom
}

func (e *env) catalog(disk string) *dedup.Catalog {
	e.t.Helper()
	ix, err := dedup.Open(context.Background(), disk, dedup.Options{StateDir: filepath.Join(e.dir, "index")})
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { ix.Close() })
	return dedup.NewCatalog(ix)
}

var webProfile = sim.Profile{Zero: 0.15, Disk: 0.45, DirtyMiBps: 20, HotFraction: 1.0 / 16, HotWriteShare: 0.9, ReadMiBps: 50, Seed: 11}

// runningAt reports whether a domain runs on a host (its workload makes progress).
func runningAt(t *testing.T, h *sim.Host, name string) bool {
	t.Helper()
	d, ok := h.Domain(name)
	if !ok {
		return false
	}
	ops := d.Ops()
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
		if d.Ops() > ops {
			return true
		}
	}
	return false
}

func TestMigrateEveryStrategy(t *testing.T) {
	e := newEnv(t, nil)
	for i, st := range engine.Strategies {
		t.Run(string(st), func(t *testing.T) {
			name := fmt.Sprintf("dom-%d", i)
			disk, dom := e.domain(name, "32Mi", webProfile)
			hooks := engine.Hooks{Log: testlog.New(t)}
			if strings.HasSuffix(string(st), "+dedup") {
				hooks.Disks = e.catalog(disk)
			}
			var lastPct float64
			hooks.Progress = func(p engine.Progress) {
				if p.Percent < lastPct {
					t.Errorf("progress ran backwards: %.1f%% after %.1f%%", p.Percent, lastPct)
				}
				lastPct = p.Percent
			}
			res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: st, LinkBytesPerSec: 200 << 20, MigrationID: name}, hooks)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Verified {
				t.Fatal("destination memory did not match the manifest")
			}
			if lastPct != 100 {
				t.Errorf("final progress %.1f%%, want 100%%", lastPct)
			}
			if _, ok := e.src.Domain(name); ok {
				t.Error("the source still has the domain after a successful migration")
			}
			if !runningAt(t, e.dst, name) {
				t.Error("the domain does not run at the destination")
			}
			p := res.Pages
			if p.Full+p.Zero+p.Disk < p.Total {
				t.Errorf("only %d of %d pages sent", p.Full+p.Zero+p.Disk, p.Total)
			}
			if st == engine.StrategyXen && (p.Zero != 0 || p.Disk != 0) {
				t.Errorf("xen strategy elided pages: %+v", p)
			}
			if hooks.Disks != nil && p.Disk == 0 {
				t.Errorf("dedup strategy sent no disk references: %+v", p)
			}
			if res.PostCopy != (st == engine.StrategyPostCopy || (res.PostCopy && strings.HasPrefix(string(st), "hybrid"))) {
				t.Errorf("post-copy %v for strategy %s", res.PostCopy, st)
			}
		})
	}
}

// TestCompressedPlans: with Options.Compress the data streams may send
// batches as zstd frames (whenever the adaptive compressor finds that it
// pays); every plan still arrives page for page, in pre-copy and in the
// post-copy push.
func TestCompressedPlans(t *testing.T) {
	e := newEnv(t, nil)
	for i, st := range []engine.Strategy{engine.StrategyPreCopy, engine.StrategyPostCopy} {
		t.Run(string(st), func(t *testing.T) {
			name := fmt.Sprintf("zdom-%d", i)
			_, dom := e.domain(name, "32Mi", webProfile)
			res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: st, LinkBytesPerSec: 20 << 20,
				Compress: true, MigrationID: name}, engine.Hooks{Log: testlog.New(t)})
			if err != nil {
				t.Fatal(err)
			}
			if !res.Verified {
				t.Fatal("destination memory did not match the manifest")
			}
			if res.Compression.Batches == 0 || res.Compression.RawBytes == 0 {
				t.Fatalf("no batch went through the compressor: %+v", res.Compression)
			}
			t.Logf("compression %+v", res.Compression)
		})
	}
}

// TestInlineDemandPath: post-copy with demand answers on the data streams
// (strict priority) instead of the priority connection: the guest faults,
// pages go on demand, and the destination matches the manifest.
func TestInlineDemandPath(t *testing.T) {
	e := newEnv(t, nil)
	disk, dom := e.domain("inline", "32Mi", webProfile)
	hooks := engine.Hooks{Log: testlog.New(t), Disks: e.catalog(disk)}
	res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: engine.StrategyPostCopy,
		LinkBytesPerSec: 50 << 20, MigrationID: "inline", DemandPath: engine.DemandInline}, hooks)
	if err != nil {
		t.Fatal(err)
	}
	if !res.Verified || !res.PostCopy {
		t.Fatalf("verified %v, post-copy %v", res.Verified, res.PostCopy)
	}
	if res.Pages.Demand == 0 {
		t.Errorf("no page went on demand: %+v", res.Pages)
	}
	if !runningAt(t, e.dst, "inline") {
		t.Error("the domain does not run at the destination")
	}
}

// TestDestinationKilledLeavesSourceRunning kills the destination agent (a
// separate process) in the middle of pre-copy: the migration fails with a
// clear error and the domain keeps running on the source, and can be
// migrated again.
func TestDestinationKilledLeavesSourceRunning(t *testing.T) {
	e := newEnv(t, nil)
	addrFile := filepath.Join(e.dir, "dst-addr")
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), receiverEnv+"="+addrFile)
	cmd.Stderr = os.Stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	var addr []byte
	for deadline := time.Now().Add(20 * time.Second); ; {
		b, err := os.ReadFile(addrFile)
		if err == nil {
			addr = b
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("destination agent did not start")
		}
		time.Sleep(20 * time.Millisecond)
	}
	_, dom := e.domain("victim", "64Mi", webProfile)
	// 64 MiB at 32 MiB/s: about two seconds of pre-copy.
	var once sync.Once
	hooks := engine.Hooks{Log: testlog.New(t), Progress: func(p engine.Progress) {
		if p.Phase == engine.PhasePreCopy && p.WireBytes > 8<<20 {
			once.Do(func() { _ = cmd.Process.Signal(syscall.SIGKILL) })
		}
	}}
	_, err := engine.Migrate(context.Background(), dom, string(addr), engine.Options{Strategy: engine.StrategyPreCopy, LinkBytesPerSec: 32 << 20, MigrationID: "victim"}, hooks)
	if err == nil {
		t.Fatal("migration to a killed destination succeeded")
	}
	t.Logf("migration failed as expected: %v", err)
	if !runningAt(t, e.src, "victim") {
		t.Fatal("the domain does not run on the source after the destination died")
	}
	// Unharmed: it migrates fine to a live destination afterwards.
	res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: engine.StrategyPreCopy, MigrationID: "victim-2"}, engine.Hooks{Log: testlog.New(t)})
	if err != nil || !res.Verified {
		t.Fatalf("second migration: verified=%v err=%v", res.Verified, err)
	}
}

// TestStaleDiskBlocksFallBack modifies disk blocks after the index was built
// and while references are in flight: those references fail verification
// at the destination, the source sends the pages, and the destination
// memory matches the manifest.
func TestStaleDiskBlocksFallBack(t *testing.T) {
	e := newEnv(t, nil)
	// hybrid+dedup sends its references in the post-copy push, where the
	// destination resolves them beside the data stream and asks for the
	// fallbacks on the priority connection while the domain runs.
	// The second plan goes to post-copy at once: the policy would finish
	// this slowly dirtied domain with a stop-and-copy.
	postDedup := engine.Plan{Policy: engine.PolicyAdaptive, ElideZero: true, Dedup: true, PostCopy: engine.PostCopyImmediate}
	for i, st := range []engine.Strategy{engine.StrategyPreCopyDedup, engine.StrategyHybridDedup} {
		t.Run(string(st), func(t *testing.T) {
			opts := engine.Options{Strategy: st, LinkBytesPerSec: 16 << 20, MigrationID: fmt.Sprintf("stale-%d", i)}
			if st == engine.StrategyHybridDedup {
				opts.Strategy, opts.Plan = "", postDedup
			}
			name := fmt.Sprintf("stale-%d", i)
			disk, dom := e.domain(name, "32Mi", sim.Profile{Zero: 0.1, Disk: 0.6, DirtyMiBps: 2, Seed: 21 + int64(i)})
			cat := e.catalog(disk)
			scribble := func(from, to int64) {
				f, err := os.OpenFile(disk, os.O_RDWR, 0)
				if err != nil {
					t.Error(err)
					return
				}
				defer f.Close()
				junk := make([]byte, 4096)
				for off := from; off < to; off += 8 * 4096 { // every 8th block
					junk[0], junk[1] = byte(off>>12), byte(off>>20)
					junk[2] = 0xA5
					if _, err := f.WriteAt(junk, off); err != nil {
						t.Error(err)
						return
					}
				}
			}
			scribble(0, 8<<20) // after the index was built
			var once sync.Once
			hooks := engine.Hooks{Log: testlog.New(t), Disks: cat, Progress: func(p engine.Progress) {
				if p.Pages.Disk > 0 {
					once.Do(func() { scribble(8<<20, 32<<20) }) // after references were sent
				}
			}}
			res, err := engine.Migrate(context.Background(), dom, e.addr, opts, hooks)
			if err != nil {
				t.Fatal(err)
			}
			if !res.Verified {
				t.Fatal("destination memory does not match the manifest")
			}
			if res.Pages.DiskFallback == 0 {
				t.Fatalf("no fallback counted although disk blocks changed: %+v", res.Pages)
			}
			if st == engine.StrategyHybridDedup && !res.PostCopy {
				t.Fatalf("post-copy with dedup did not switch to post-copy: the post-copy fallback path was not tested")
			}
			t.Logf("pages: %+v", res.Pages)
		})
	}
}

// TestSharedDiskMissingAtDestination: the destination cannot see the disk;
// every reference falls back to the source and the migration completes.
func TestSharedDiskMissingAtDestination(t *testing.T) {
	e := newEnv(t, func(r *engine.Receiver) {
		r.DiskPath = func(string, xenmem.Disk) string { return "/nonexistent/xenferry-test-disk.img" }
	})
	disk, dom := e.domain("nodisk", "32Mi", sim.Profile{Zero: 0.1, Disk: 0.5, DirtyMiBps: 2, Seed: 22})
	res, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: engine.StrategyPreCopyDedup, MigrationID: "nodisk"}, engine.Hooks{Log: testlog.New(t), Disks: e.catalog(disk)})
	if err != nil {
		t.Fatal(err)
	}
	if !res.Verified || res.Pages.Disk == 0 || res.Pages.DiskFallback != res.Pages.Disk {
		t.Fatalf("want every disk reference to fall back and memory verified: verified=%v %+v", res.Verified, res.Pages)
	}
}

// TestReferenceOutsideDiskRejected: the destination's view of the disk is
// shorter than the references (as if the source referenced blocks outside
// the domain's disk): a protocol error, the source keeps the domain.
func TestReferenceOutsideDiskRejected(t *testing.T) {
	var short string
	e := newEnv(t, func(r *engine.Receiver) {
		r.DiskPath = func(string, xenmem.Disk) string { return short }
	})
	disk, dom := e.domain("oob", "32Mi", sim.Profile{Zero: 0.1, Disk: 0.5, DirtyMiBps: 2, Seed: 23})
	short = disk + ".short"
	if err := sim.GenerateDisk(short, 4096*16, 99); err != nil {
		t.Fatal(err)
	}
	_, err := engine.Migrate(context.Background(), dom, e.addr, engine.Options{Strategy: engine.StrategyPreCopyDedup, MigrationID: "oob"}, engine.Hooks{Log: testlog.New(t), Disks: e.catalog(disk)})
	if err == nil {
		t.Fatal("a reference outside the disk was accepted")
	}
	if !errors.Is(err, engine.ErrRemote) || !strings.Contains(err.Error(), "past the end") {
		t.Fatalf("unclear error: %v", err)
	}
	t.Logf("rejected as expected: %v", err)
	if !runningAt(t, e.src, "oob") {
		t.Fatal("the domain does not run on the source after the rejected migration")
	}
	// The destination reports the error first, then tears down what it
	// created: the domain goes within moments, never lingers.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := e.dst.Domain("oob"); !ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the destination kept a half-received domain")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestTargetWithoutMemoryLeavesSourceRunning: the destination cannot create
// the domain; the source keeps it.
func TestTargetWithoutMemoryLeavesSourceRunning(t *testing.T) {
	e := newEnv(t, nil)
	small, err := sim.NewHost(sim.Config{Name: "small", Memory: "16Mi", CPUs: 1, StateDir: filepath.Join(e.dir, "small")}, logr.Discard())
	if err != nil {
		t.Fatal(err)
	}
	defer small.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	go (&engine.Receiver{Host: small}).Serve(ctx, ln)
	_, dom := e.domain("big", "32Mi", webProfile)
	_, err = engine.Migrate(context.Background(), dom, ln.Addr().String(), engine.Options{Strategy: engine.StrategyHybridDedup, MigrationID: "big"}, engine.Hooks{})
	if err == nil || !errors.Is(err, engine.ErrRemote) {
		t.Fatalf("want a remote error, got %v", err)
	}
	t.Logf("refused as expected: %v", err)
	if !runningAt(t, e.src, "big") {
		t.Fatal("the domain does not run on the source")
	}
}

func TestBadOptionsRejected(t *testing.T) {
	for _, o := range []engine.Options{{Strategy: "bogus"}, {Strategy: engine.StrategyPreCopy, LinkBytesPerSec: -1},
		{Strategy: engine.StrategyPostCopy, DemandPath: "sideways"}} {
		if _, err := engine.Migrate(context.Background(), nil, "127.0.0.1:1", o, engine.Hooks{}); err == nil {
			t.Errorf("options %+v accepted", o)
		}
	}
}
