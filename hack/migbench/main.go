// Command migbench is xenferry's migration benchmark: it migrates simulated
// domains running a workload between two simulated hosts in this process
// (each guest is its own process), over real TCP on loopback with the same
// bandwidth cap for every strategy, and reports one result per (scenario,
// strategy): a table, or with -json one JSON object per line.
//
//	go run ./hack/migbench -scenario idle,web -strategy xen,precopy -memory 256Mi -json
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"

	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
)

// Line is one result, with exactly the fields the benchmark promises.
type Line struct {
	Scenario         string            `json:"scenario"`
	Strategy         string            `json:"strategy"`
	MemoryBytes      uint64            `json:"memoryBytes"`
	LinkBytesPerSec  int64             `json:"linkBytesPerSec"`
	TotalSeconds     float64           `json:"totalSeconds"`
	DowntimeMs       float64           `json:"downtimeMs"`
	ResumeSeconds    float64           `json:"resumeSeconds"`
	WireBytes        int64             `json:"wireBytes"`
	Iterations       int               `json:"iterations"`
	Pages            engine.PageCounts `json:"pages"`
	FaultP50Us       float64           `json:"faultP50Us"`
	FaultP99Us       float64           `json:"faultP99Us"`
	WorkloadSlowdown float64           `json:"workloadSlowdown"`
	Verified         bool              `json:"verified"`
	// PostCopy: the migration ended in post-copy; StopReason says why
	// pre-copy ended (the policy's reason).
	PostCopy   bool   `json:"postCopy"`
	StopReason string `json:"stopReason"`
	// Fixed costs, one by one (engine.Costs), in milliseconds.
	ConnectMs   float64 `json:"connectMs"`
	HandshakeMs float64 `json:"handshakeMs"`
	DrainMs     float64 `json:"drainMs"`
	ManifestMs  float64 `json:"manifestMs"`
	CompleteMs  float64 `json:"completeMs"`
	ReleaseMs   float64 `json:"releaseMs"`
	// With -compress: full-page bytes sent over offered (1: none saved)
	// and the share of batches sent compressed.
	CompressedRatio   float64 `json:"compressedRatio,omitempty"`
	CompressedBatches float64 `json:"compressedBatches,omitempty"`
}

func main() {
	var (
		scenarios      = flag.String("scenario", "idle,web,pagecache,memheavy", "comma list of scenarios: idle, web, pagecache, memheavy, image:MEM,DISK")
		strategies     = flag.String("strategy", "xen,precopy,precopy+dedup,hybrid+dedup", "comma list of strategies: "+strategyNames())
		memory         = flag.String("memory", "1Gi", "guest memory per domain (Ki/Mi/Gi)")
		link           = flag.String("link", "1Gbit", "bandwidth cap for every strategy (e.g. 1Gbit, 500Mbit, 100MB; 0 = none)")
		asJSON         = flag.Bool("json", false, "print one JSON object per line")
		streams        = flag.Int("streams", engine.DefaultStreams, "parallel data connections")
		compress       = flag.Bool("compress", false, "adaptive zstd for batches of full pages, when it pays on the link (not in the xen strategy)")
		compressAlways = flag.Bool("compress-always", false, "zstd for every batch of full pages that shrinks, as compression: Always (implies -compress)")
		demand         = flag.String("demand-path", string(engine.DemandPriorityConn), "where post-copy demand answers travel: priority (a connection of their own) or inline (the page's data stream, strict priority)")
		vcpus          = flag.Int("vcpus", 2, "vCPUs per domain")
		workdir        = flag.String("workdir", filepath.Join(os.TempDir(), "xenferry-migbench"), "where disk images and indexes are cached")
		verbose        = flag.Bool("v", false, "log the engine's decisions to stderr")
		cpuprof        = flag.String("cpuprofile", "", "write a CPU profile of the whole run to this file")
		dstProc        = flag.Bool("dst-process", false, "run the destination host and receiver in a process of their own, as on real hosts (measured on 2 cores: web fault p50 about 25 % worse on a quiet machine, 2x under load; docs/benchmarks.md)")
		dstServe       = flag.Bool("dst-serve", false, "internal: be the destination process")
		rtPrio         = flag.Int("rt-prio", int(postcopy.RealtimePriority.Load()), "SCHED_FIFO priority of the threads that serve post-copy faults on both sides (0: normal class; docs/benchmarks.md)")
		warm           = flag.Bool("warm-ram", true, "touch (and free) the RAM the run will use once before measuring: a VM whose host backs its RAM lazily pays ~2 s/GiB on the first touch since boot, a cost no dom0 has")
	)
	flag.Parse()
	oversubscribeProcs()
	postcopy.RealtimePriority.Store(int32(*rtPrio))
	if *dstServe {
		log := logr.Discard()
		if *verbose {
			log = funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{Verbosity: 2})
		}
		ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
		defer stop()
		if err := serveDestination(ctx, *workdir, log); err != nil {
			fatal(err)
		}
		return
	}
	if *cpuprof != "" {
		f, err := os.Create(*cpuprof)
		if err != nil {
			fatal(err)
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			fatal(err)
		}
		defer pprof.StopCPUProfile()
	}
	memBytes, err := parseSize(*memory)
	if err != nil {
		fatal(fmt.Errorf("-memory: %w", err))
	}
	linkRate, err := parseLink(*link)
	if err != nil {
		fatal(fmt.Errorf("-link: %w", err))
	}
	var strats []engine.Strategy
	for _, s := range splitList(*strategies) {
		st := engine.Strategy(s)
		if !st.Valid() {
			fatal(fmt.Errorf("-strategy: unknown strategy %q (want %s)", s, strategyNames()))
		}
		strats = append(strats, st)
	}
	if !engine.DemandPath(*demand).Valid() {
		fatal(fmt.Errorf("-demand-path: unknown %q (want priority or inline)", *demand))
	}
	scs, err := parseScenarios(*scenarios)
	if err != nil {
		fatal(err)
	}
	log := logr.Discard()
	if *verbose {
		log = funcr.New(func(prefix, args string) { fmt.Fprintln(os.Stderr, prefix, args) }, funcr.Options{Verbosity: 2})
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()

	if *warm {
		// Source and destination memory of one run, and the disk image's page cache.
		warmRAM(3 * memBytes)
	}
	b, err := newBench(ctx, *workdir, log, *dstProc, *verbose)
	if err != nil {
		fatal(err)
	}
	defer b.close()
	var out io.Writer = os.Stdout
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', tabwriter.AlignRight)
	if !*asJSON {
		fmt.Fprintf(tw, "scenario\tstrategy\ttotal s\tdowntime ms\tresume s\twire MiB\trounds\tfull\tzero\tdisk\tfallback\tdemand\tfault p99 µs\tslowdown\tverified\tconnect/handshake/drain/manifest/complete/release ms\t\n")
	}
	failed := false
	for _, sc := range scs {
		for _, st := range strats {
			cfg := runConfig{scenario: sc, strategy: st, memory: memBytes, link: linkRate, streams: *streams, compress: *compress, compressAlways: *compressAlways, vcpus: *vcpus, demand: engine.DemandPath(*demand)}
			fmt.Fprintf(os.Stderr, "migbench: %s / %s: migrating %s...\n", sc.name, st, humanBytes(memBytes))
			line, err := b.run(ctx, cfg)
			if err != nil {
				fmt.Fprintf(os.Stderr, "migbench: %s / %s: %v\n", sc.name, st, err)
				failed = true
				if ctx.Err() != nil {
					os.Exit(1)
				}
				continue
			}
			if *asJSON {
				enc, _ := json.Marshal(line)
				fmt.Println(string(enc))
				continue
			}
			fmt.Fprintf(tw, "%s\t%s\t%.2f\t%.0f\t%.2f\t%.1f\t%d\t%d\t%d\t%d\t%d\t%d\t%.0f\t%.2f\t%v\t%.0f/%.0f/%.0f/%.0f/%.0f/%.0f\t\n",
				line.Scenario, line.Strategy, line.TotalSeconds, line.DowntimeMs, line.ResumeSeconds,
				float64(line.WireBytes)/(1<<20), line.Iterations, line.Pages.Full, line.Pages.Zero, line.Pages.Disk,
				line.Pages.DiskFallback, line.Pages.Demand, line.FaultP99Us, line.WorkloadSlowdown, line.Verified,
				line.ConnectMs, line.HandshakeMs, line.DrainMs, line.ManifestMs, line.CompleteMs, line.ReleaseMs)
			tw.Flush()
		}
	}
	tw.Flush()
	if failed {
		pprof.StopCPUProfile()
		os.Exit(1)
	}
}

func strategyNames() string {
	var s []string
	for _, st := range engine.Strategies {
		s = append(s, string(st))
	}
	return strings.Join(s, ", ")
}

func splitList(s string) []string {
	var out []string
	for _, f := range strings.Split(s, ",") {
		if f = strings.TrimSpace(f); f != "" {
			out = append(out, f)
		}
	}
	return out
}

// parseSize reads 4096, 256Ki, 256Mi, 1Gi (also K, M, G as powers of 1024).
func parseSize(s string) (uint64, error) {
	mult := uint64(1)
	for _, u := range []struct {
		suf string
		m   uint64
	}{{"Ki", 1 << 10}, {"Mi", 1 << 20}, {"Gi", 1 << 30}, {"K", 1 << 10}, {"M", 1 << 20}, {"G", 1 << 30}} {
		if strings.HasSuffix(s, u.suf) {
			s, mult = strings.TrimSuffix(s, u.suf), u.m
			break
		}
	}
	v, err := strconv.ParseFloat(s, 64)
	if err != nil || v <= 0 {
		return 0, fmt.Errorf("bad size %q (want e.g. 256Mi or 1Gi)", s)
	}
	n := uint64(v * float64(mult))
	if n%4096 != 0 {
		return 0, fmt.Errorf("size %q is not a multiple of 4 KiB", s)
	}
	return n, nil
}

// parseLink reads a rate in bits (Kbit, Mbit, Gbit) or bytes (KB, MB, GB,
// MiB, GiB) per second; 0 means no cap.
func parseLink(s string) (int64, error) {
	if s == "0" {
		return 0, nil
	}
	units := []struct {
		suf string
		m   float64
	}{{"Gbit", 1e9 / 8}, {"Mbit", 1e6 / 8}, {"Kbit", 1e3 / 8}, {"GiB", 1 << 30}, {"MiB", 1 << 20}, {"GB", 1e9}, {"MB", 1e6}, {"KB", 1e3}}
	for _, u := range units {
		if strings.HasSuffix(s, u.suf) {
			v, err := strconv.ParseFloat(strings.TrimSuffix(s, u.suf), 64)
			if err != nil || v < 0 {
				break
			}
			return int64(v * u.m), nil
		}
	}
	return 0, fmt.Errorf("bad link rate %q (want e.g. 1Gbit, 500Mbit, 100MB or 0)", s)
}

func humanBytes(n uint64) string {
	switch {
	case n >= 1<<30:
		return fmt.Sprintf("%.1f GiB", float64(n)/(1<<30))
	default:
		return fmt.Sprintf("%.0f MiB", float64(n)/(1<<20))
	}
}

func fatal(err error) {
	fmt.Fprintf(os.Stderr, "migbench: %v\n", err)
	os.Exit(2)
}

// oversubscribeProcs gives the Go scheduler many more Ps than cores
// (unless GOMAXPROCS is set), as node-agent does: the demand path's
// real-time threads, back from poll(2), then find an idle P at once
// instead of queueing for one behind the push's and the installs'
// goroutines, and the kernel arbitrates (docs/benchmarks.md, "The fault
// tail", has the measurements).
func oversubscribeProcs() {
	if os.Getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(max(32, 16*runtime.NumCPU()))
	}
}

// warmRAM makes this VM's host back n bytes of RAM (capped at half of what
// is available) before anything is measured, by allocating them in a memfd
// (fallocate zeroes every page) and freeing them; the kernel hands the same,
// now backed, pages to the domains created next. Measured on the 2-core
// development VM (docs/benchmarks.md): 1 GiB of RAM never touched since boot
// took 2.2-2.5 s to fill, the same GiB again 0.2 s. Best effort: any error
// only skips the warm-up.
func warmRAM(n uint64) {
	if avail := memAvailable(); avail > 0 {
		n = min(n, avail/2)
	}
	fd, err := unix.MemfdCreate("migbench-warm", unix.MFD_CLOEXEC)
	if err != nil {
		return
	}
	defer unix.Close(fd)
	start := time.Now()
	const step = 256 << 20
	for off := uint64(0); off < n; off += step {
		if err := unix.Fallocate(fd, 0, int64(off), int64(min(step, n-off))); err != nil {
			break
		}
	}
	fmt.Fprintf(os.Stderr, "migbench: warmed %s of RAM in %.2fs (-warm-ram=false skips this)\n", humanBytes(n), time.Since(start).Seconds())
}

// memAvailable is MemAvailable from /proc/meminfo in bytes (0 if unknown).
func memAvailable() uint64 {
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "MemAvailable:"); ok {
			var kb uint64
			if _, err := fmt.Sscanf(strings.TrimSpace(rest), "%d kB", &kb); err == nil {
				return kb << 10
			}
		}
	}
	return 0
}
