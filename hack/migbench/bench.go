package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// scenario is a guest to migrate: a memory profile and workload, or a real
// memory image with its disk.
type scenario struct {
	name    string
	profile sim.Profile
	// dirtyLinkFactor, if set, makes the dirty rate this multiple of the
	// link rate (memheavy).
	dirtyLinkFactor float64
	image, disk     string
}

// The benchmark's scenarios. Pages the workload writes get new content that
// is neither zero nor on disk.
var builtin = map[string]scenario{
	"idle":      {name: "idle", profile: sim.Profile{Zero: 0.70, Disk: 0.15, DirtyMiBps: 1, ReadMiBps: 4, Seed: 1}},
	"web":       {name: "web", profile: sim.Profile{Zero: 0.15, Disk: 0.45, DirtyMiBps: 30, HotFraction: 1.0 / 16, HotWriteShare: 0.9, ReadMiBps: 200, Seed: 2}},
	"pagecache": {name: "pagecache", profile: sim.Profile{Zero: 0.05, Disk: 0.75, DirtyMiBps: 10, HotFraction: 1.0 / 32, HotWriteShare: 0.9, ReadMiBps: 200, Seed: 3}},
	"memheavy":  {name: "memheavy", profile: sim.Profile{Zero: 0.10, Disk: 0.10, HotFraction: 1.0 / 4, HotWriteShare: 0.7, ReadMiBps: 100, Seed: 4}, dirtyLinkFactor: 1.6},
}

func parseScenarios(list string) ([]scenario, error) {
	var out []scenario
	// image:MEM,DISK contains a comma: rejoin it.
	parts := splitList(list)
	for i := 0; i < len(parts); i++ {
		p := parts[i]
		if strings.HasPrefix(p, "image:") {
			if i+1 >= len(parts) {
				return nil, fmt.Errorf("-scenario %s: want image:MEM,DISK", p)
			}
			mem, disk := strings.TrimPrefix(p, "image:"), parts[i+1]
			i++
			for _, f := range []string{mem, disk} {
				if _, err := os.Stat(f); err != nil {
					return nil, fmt.Errorf("-scenario image: %w", err)
				}
			}
			out = append(out, scenario{name: "image:" + filepath.Base(mem), image: mem, disk: disk, profile: sim.Profile{DirtyMiBps: 1, ReadMiBps: 4, Seed: 5}})
			continue
		}
		sc, ok := builtin[p]
		if !ok {
			return nil, fmt.Errorf("-scenario: unknown scenario %q (want idle, web, pagecache, memheavy or image:MEM,DISK)", p)
		}
		out = append(out, sc)
	}
	return out, nil
}

type runConfig struct {
	scenario scenario
	strategy engine.Strategy
	memory   uint64
	link     int64
	streams  int
	compress bool
	// compressAlways: every batch that shrinks (engine Options.CompressAlways).
	compressAlways bool
	vcpus          int
	demand         engine.DemandPath
}

// bench holds the two simulated hosts and the receiver between runs.
type bench struct {
	dir      string
	log      logr.Logger
	src, dst *sim.Host // dst is nil when the destination runs in its own process
	proc     *dstProc
	addr     string // the receiver's address
	ln       net.Listener
	cancel   context.CancelFunc
	wg       sync.WaitGroup
	n        int
	indexes  map[string]*dedup.Index // by disk path, few entries
}

func newBench(ctx context.Context, dir string, log logr.Logger, dstProcess, verbose bool) (*bench, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("work dir: %w", err)
	}
	b := &bench{dir: dir, log: log, indexes: map[string]*dedup.Index{}}
	var err error
	host := func(name string) (*sim.Host, error) {
		return sim.NewHost(sim.Config{Name: name, Memory: "64Gi", CPUs: 2, StateDir: filepath.Join(dir, name)}, log.WithName(name))
	}
	if b.src, err = host("src"); err != nil {
		return nil, err
	}
	if dstProcess {
		if b.proc, err = startDstProc(dir, verbose); err != nil {
			b.src.Close()
			return nil, err
		}
		b.addr = b.proc.addr
		return b, nil
	}
	if b.dst, err = host("dst"); err != nil {
		b.src.Close()
		return nil, err
	}
	if b.ln, err = net.Listen("tcp", "127.0.0.1:0"); err != nil {
		b.close()
		return nil, fmt.Errorf("listen on loopback: %w", err)
	}
	sctx, cancel := context.WithCancel(ctx)
	b.cancel = cancel
	b.addr = b.ln.Addr().String()
	recv := &engine.Receiver{Host: b.dst, Log: log.WithName("receiver")}
	b.wg.Add(1)
	go func() { defer b.wg.Done(); _ = recv.Serve(sctx, b.ln) }()
	return b, nil
}

func (b *bench) close() {
	if b.cancel != nil {
		b.cancel()
		b.wg.Wait()
	}
	for _, ix := range b.indexes {
		ix.Close()
	}
	if b.proc != nil {
		b.proc.close()
	}
	if b.dst != nil {
		b.dst.Close()
	}
	if b.src != nil {
		b.src.Close()
	}
}

// disk returns a generated disk image for a memory size, cached.
func (b *bench) disk(memory uint64, seed int64) (string, error) {
	path := filepath.Join(b.dir, fmt.Sprintf("disk-%d-%d.img", memory>>20, seed))
	if err := sim.GenerateDisk(path, int64(memory), seed); err != nil {
		return "", fmt.Errorf("generate disk image: %w", err)
	}
	return path, nil
}

func (b *bench) index(ctx context.Context, path string) (*dedup.Index, error) {
	if ix, ok := b.indexes[path]; ok {
		return ix, nil
	}
	ix, err := dedup.Open(ctx, path, dedup.Options{StateDir: filepath.Join(b.dir, "index"), Log: b.log})
	if err != nil {
		return nil, fmt.Errorf("index %s: %w", path, err)
	}
	b.indexes[path] = ix
	return ix, nil
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// run migrates one fresh domain and returns its line.
func (b *bench) run(ctx context.Context, rc runConfig) (Line, error) {
	sc := rc.scenario
	b.n++
	name := fmt.Sprintf("%s-%s-%d", strings.NewReplacer(":", "-", "+", "-", ".", "-").Replace(sc.name), strings.ReplaceAll(string(rc.strategy), "+", "-"), b.n)
	prof := sc.profile
	if sc.dirtyLinkFactor > 0 {
		rate := float64(rc.link)
		if rate == 0 {
			rate = 125e6 // 1 Gbit when uncapped
		}
		prof.DirtyMiBps = sc.dirtyLinkFactor * rate / (1 << 20)
	}
	spec := sim.DomainSpec{Name: name, VCPUs: rc.vcpus, Profile: prof}
	diskPath := sc.disk
	if sc.image != "" {
		spec.Image = sc.image
		st, err := os.Stat(sc.image)
		if err != nil {
			return Line{}, err
		}
		spec.Memory = fmt.Sprint(st.Size())
	} else {
		spec.Memory = fmt.Sprint(rc.memory)
		var err error
		if diskPath, err = b.disk(rc.memory, prof.Seed); err != nil {
			return Line{}, err
		}
	}
	spec.Disks = []sim.DiskSpec{{ID: "xvda", Path: diskPath}}
	var hooks engine.Hooks
	hooks.Log = b.log.WithName("source")
	if strings.HasSuffix(string(rc.strategy), "+dedup") {
		ix, err := b.index(ctx, diskPath)
		if err != nil {
			return Line{}, err
		}
		hooks.Disks = dedup.NewCatalog(ix)
	}
	if _, err := b.src.CreateDomain(ctx, spec); err != nil {
		return Line{}, fmt.Errorf("create domain: %w", err)
	}
	dom, err := b.src.OpenSource(ctx, name)
	if err != nil {
		return Line{}, err
	}
	// Close never resumes a domain the engine committed (go sent): after a
	// failure past that point it stays paused on the source host, and the
	// run's error says so (engine.ErrCommittedFailure).
	defer dom.Close()
	// The workload's rate before the migration, for the slowdown during
	// post-copy. Only strategies that may end in post-copy report it: the
	// others start at once, so the scenario's memory is as it was built.
	var opsBefore float64
	if rc.strategy == engine.StrategyPostCopy || strings.HasPrefix(string(rc.strategy), "hybrid") {
		ops0, t0 := dom.Ops(), time.Now()
		time.Sleep(300 * time.Millisecond)
		opsBefore = float64(dom.Ops()-ops0) / time.Since(t0).Seconds()
	}

	opts := engine.Options{Strategy: rc.strategy, LinkBytesPerSec: rc.link, Streams: rc.streams, Compress: rc.compress || rc.compressAlways, CompressAlways: rc.compressAlways, MigrationID: name, DemandPath: rc.demand}
	res, err := engine.Migrate(ctx, dom, b.addr, opts, hooks)
	if err != nil {
		return Line{}, err
	}
	// Free the destination's copy for the next run.
	if b.proc != nil {
		if err := b.proc.release(name); err != nil {
			return Line{}, err
		}
	} else if err := releaseDomain(ctx, b.dst, name); err != nil {
		return Line{}, fmt.Errorf("release %s at the destination: %w", name, err)
	}
	line := Line{
		Scenario: sc.name, Strategy: string(rc.strategy), MemoryBytes: res.MemoryBytes, LinkBytesPerSec: rc.link,
		TotalSeconds: res.Total.Seconds(), DowntimeMs: float64(res.Downtime.Microseconds()) / 1000, ResumeSeconds: res.Resume.Seconds(),
		WireBytes: res.WireBytes, Iterations: res.Iterations, Pages: res.Pages,
		FaultP50Us: float64(res.FaultP50.Microseconds()), FaultP99Us: float64(res.FaultP99.Microseconds()), Verified: res.Verified,
		PostCopy: res.PostCopy, StopReason: res.StopReason,
		ConnectMs: ms(res.Costs.Connect), HandshakeMs: ms(res.Costs.Handshake), DrainMs: ms(res.Costs.Drain),
		ManifestMs: ms(res.Costs.Manifest), CompleteMs: ms(res.Costs.Complete), ReleaseMs: ms(res.Costs.Release),
	}
	if c := res.Compression; c.RawBytes > 0 {
		line.CompressedRatio = float64(c.SentBytes) / float64(c.RawBytes)
		line.CompressedBatches = float64(c.Compressed) / float64(c.Batches)
	}
	if res.PostCopy && opsBefore > 0 && res.OpsPostCopy > 0 {
		line.WorkloadSlowdown = max(0, 1-res.OpsPostCopy/opsBefore)
	}
	fmt.Fprintf(os.Stderr, "migbench: %s / %s: %s (%d rounds), %.2fs total, %.0f ms downtime, %.0f MB/s on the wire while streaming pre-copy rounds; connect %.1f, handshake %.1f, drain %.1f, manifest %.1f, complete %.1f, release %.1f ms\n",
		sc.name, rc.strategy, res.StopReason, res.Iterations, line.TotalSeconds, line.DowntimeMs, res.StreamBytesPerSec/1e6,
		line.ConnectMs, line.HandshakeMs, line.DrainMs, line.ManifestMs, line.CompleteMs, line.ReleaseMs)
	return line, nil
}
