// Command fleet plays xenferry's fleet scenarios (issue 12): drains, their
// undoing, load rebalancing and migration priorities, on a fleet of
// simulated hosts driven through a real API server.
//
//	go run ./hack/fleet -scenario drain,undrain,rebalance,priority -json
//
// Each scenario gets a fresh fleet: etcd and kube-apiserver from bin/ (as
// for the demo), the CRDs, the controller and one node agent per host as
// separate processes with API identities of their own, sim hosts on
// loopback with small domains placed as the scenario needs. The scenario
// acts only through the API (XenHost spec.drain, RebalancePolicy,
// VMMigrations) and is judged from what the API server stored (a watch
// on every VMMigration) and from the hosts' real state: the guest
// processes, their memory against a fingerprint taken before the
// scenario, and each sim host's registry. One JSON line per scenario on
// stdout (-json); progress on stderr. See docs/fleet.md.
//
// Needs root (guests' memory through /proc) and bin/etcd and
// bin/kube-apiserver (hack/tools.sh). Everything it starts is stopped, and
// every guest ended, when it ends: on failure, on SIGINT and SIGTERM.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"runtime/debug"
	"strings"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

func main() {
	var (
		list    = flag.String("scenario", strings.Join(scenarioOrder[:4], ","), "comma-separated scenarios: "+strings.Join(scenarioOrder, ", "))
		jsonOut = flag.Bool("json", false, "print one JSON line per scenario on stdout")
		hosts   = flag.Int("hosts", 4, "simulated hosts (at least 4)")
		doms    = flag.Int("domains", 12, "domains (at least 12)")
		keep    = flag.Bool("keep", false, "keep the work directory: logs, agents' state, etcd data")
		timeout = flag.Duration("timeout", 40*time.Minute, "give up (and clean up) after this long")
	)
	flag.Parse()
	ctrllog.SetLogger(logr.Discard()) // envtest's CRD installer logs through it
	ok, err := run(*list, *jsonOut, *hosts, *doms, *keep, *timeout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "fleet:", err)
		os.Exit(2)
	}
	if !ok {
		os.Exit(1)
	}
}

func run(list string, jsonOut bool, nHosts, nDoms int, keep bool, timeout time.Duration) (allOK bool, err error) {
	if os.Geteuid() != 0 {
		return false, errors.New("needs root: it reads the guests' memory through /proc")
	}
	if nHosts < 4 || nDoms < 12 {
		return false, fmt.Errorf("-hosts %d -domains %d: at least 4 hosts and 12 domains", nHosts, nDoms)
	}
	var names []string
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if _, ok := scenarios[n]; !ok {
			return false, fmt.Errorf("-scenario: unknown %q (have %s)", n, strings.Join(scenarioOrder, ", "))
		}
		names = append(names, n)
	}
	root, err := labkit.ProjectRoot()
	if err != nil {
		return false, err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM, syscall.SIGHUP)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[fleet %4.0fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	base := filepath.Join(root, ".xenferry", "fleet")
	work := filepath.Join(base, "work")
	// A run killed outright (SIGKILL) leaves its guests: they outlive
	// their agents by design. End them before their directory goes.
	for _, g := range findGuests(work) {
		logf("ending guest %s of %s left by an earlier run", g.ID(), g.Domain)
		killGuest(g)
	}
	_ = os.RemoveAll(work)
	bin := filepath.Join(base, "bin")
	logf("building the controller and the node agent into %s", bin)
	if err := labkit.BuildBinaries(ctx, root, bin); err != nil {
		return false, err
	}
	allOK = true
	defer func() {
		if keep || !allOK {
			logf("work directory (logs, agents' state) kept in %s", work)
		} else {
			_ = os.RemoveAll(work)
		}
	}()
	for _, name := range names {
		if ctx.Err() != nil {
			return false, fmt.Errorf("stopped before %s: %w", name, context.Cause(ctx))
		}
		line := runScenario(ctx, name, root, filepath.Join(work, name), bin, filepath.Join(base, "disks"), nHosts, nDoms, logf)
		var b strings.Builder
		enc := json.NewEncoder(&b)
		enc.SetEscapeHTML(false) // "->" in reasons
		_ = enc.Encode(line.v)
		if jsonOut {
			fmt.Print(b.String())
		}
		logf("%s", strings.TrimSpace(b.String()))
		if !line.ok {
			allOK = false
		}
		if ctx.Err() != nil {
			return false, fmt.Errorf("interrupted during %s: %w", name, ctx.Err())
		}
	}
	logf("done in %.0fs", time.Since(start).Seconds())
	return allOK, nil
}

type result struct {
	v  any
	ok bool
}

// runScenario plays one scenario on a fresh fleet, which it always takes
// down again.
func runScenario(ctx context.Context, name, root, dir, bin, disks string, nHosts, nDoms int, logf func(string, ...any)) (res result) {
	sc := scenarios[name]
	hs, ds := hostNames(nHosts), domainNames(nDoms)
	c := &common{Scenario: name, Hosts: nHosts, Domains: nDoms,
		invariants: invariants{Lost: -1, RunningTwice: -1, WrongPages: -1, HalfCreated: -1}, Untruthful: -1}
	s := &session{res: c}
	res.v = c
	bw := sc.bandwidth
	if bw == "" {
		bw = fleetBandwidth
	}
	place := sc.placement(hs, ds)
	f := &fleet{spec: fleetSpec{hosts: hs, placement: place, limits: sc.limits, bandwidth: bw, hostMiB: hostMemory(place)},
		root: root, dir: dir, bin: bin, disks: disks,
		log: func(format string, a ...any) { logf("%s: "+format, append([]any{name}, a...)...) }}
	s.f = f
	defer func() {
		if r := recover(); r != nil {
			s.note("harness panic: %v\n%s", r, debug.Stack())
		}
		f.log("stopping the fleet")
		f.down()
		c.OK = s.goal && c.clean() && c.Untruthful == 0 && ctx.Err() == nil
		c.Reason = strings.Join(s.notes, "; ")
		res.ok = c.OK
	}()
	f.log("starting %d hosts of %d MiB, %d domains of %d MiB (placement %v)", nHosts, f.spec.hostMiB, nDoms, domMemMiB, f.spec.placement)
	t0 := time.Now()
	if err := f.up(ctx); err != nil {
		s.note("fleet did not come up: %v", err)
		return res
	}
	f.log("fleet up in %.0fs", time.Since(t0).Seconds())
	s.mo = newMonitor()
	mctx, mcancel := context.WithCancel(ctx)
	defer mcancel()
	go s.mo.run(mctx, f)
	res.v = sc.play(ctx, s)
	if err := f.quiesce(ctx, quiesceWait); err != nil {
		s.note("%v", err)
	}
	iv, obs, notes := f.checkInvariants(ctx)
	c.invariants = iv
	s.notes = append(s.notes, notes...)
	c.Untruthful, notes = f.checkClaims(obs, s.mo.snapshot())
	s.notes = append(s.notes, notes...)
	if gaps := s.mo.heartbeatGaps(noteGap); len(gaps) > 0 {
		s.note("heartbeat gaps (controller timeout %v): %s", heartbeatTO, strings.Join(gaps, ", "))
	}
	if len(s.mo.errs) > 0 {
		s.note("monitor: %s", strings.Join(s.mo.errs, "; "))
	}
	return res
}
