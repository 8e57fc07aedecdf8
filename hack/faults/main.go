// Command faults runs xenferry's cross-host fault matrix: every fault in
// every phase of a live migration, plus hostile peers on an agent's data
// port, with the controller and two node agents as separate processes on
// hosts that are network namespaces, against a local control plane (etcd
// and kube-apiserver from bin/, as for the demo), on the simulated backend.
//
//	go run ./hack/faults -json        one JSON line per cell on stdout
//	go run ./hack/faults -cells 'partition|hostile'   a subset (regexp on "fault/phase")
//
// Every cell starts from fresh agents and a fresh domain, and is judged on
// facts observed from /proc (which guest processes run, their memory), not
// on what the product reports; see docs/faults.md. Needs root (namespaces,
// tc, reading guests' memory), ip(8) and tc(8), and bin/etcd and
// bin/kube-apiserver (hack/tools.sh). Everything it starts is stopped and
// every namespace it creates is removed when it ends, on failure and on
// Ctrl-C too.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"regexp"
	"runtime/debug"
	"syscall"
	"time"

	"github.com/xenferry/xenferry/hack/internal/labkit"
)

func main() {
	var (
		jsonOut = flag.Bool("json", false, "print one JSON line per cell on stdout")
		cells   = flag.String("cells", "", "run only cells whose \"fault/phase\" (hostile: \"hostile/fault\") matches this regexp")
		budget  = flag.Duration("budget", 40*time.Minute, "stop starting new cells after this long (skipped cells are reported as not ok)")
		keep    = flag.Bool("keep", false, "keep the work directory (logs are kept in any case)")
	)
	flag.Parse()
	if err := run(*jsonOut, *cells, *budget, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "faults:", err)
		os.Exit(1)
	}
}

func run(jsonOut bool, filter string, budget time.Duration, keep bool) (err error) {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: network namespaces, tc and /proc/PID/fd of the guests")
	}
	re, err := regexp.Compile(filter)
	if err != nil {
		return fmt.Errorf("-cells: %w", err)
	}
	root, err := labkit.ProjectRoot()
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	start := time.Now()
	base := filepath.Join(root, ".xenferry", "faults")
	work := filepath.Join(base, "work")
	_ = os.RemoveAll(work)
	for _, d := range []string{work, filepath.Join(work, "logs"), filepath.Join(work, "disks")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	logf := func(format string, args ...any) {
		fmt.Fprintf(os.Stderr, "[faults %4.0fs] %s\n", time.Since(start).Seconds(), fmt.Sprintf(format, args...))
	}
	l := &lab{root: root, work: work, bin: filepath.Join(base, "bin"), log: logf,
		ps: &labkit.Procs{LogDir: filepath.Join(work, "logs")}, agents: map[string]*agent{}}
	l.creds = &tlsCreds{l: l}
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("panic: %v\n%s", r, debug.Stack())
		}
		logf("cleaning up: stopping every process, removing the namespaces")
		l.down()
		if !keep {
			_ = os.RemoveAll(filepath.Join(work, "disks"))
			_ = os.RemoveAll(filepath.Join(work, "cells"))
			_ = os.RemoveAll(filepath.Join(work, "controlplane"))
		}
		logf("logs in %s", filepath.Join(work, "logs"))
	}()

	logf("building the controller and the node agent into %s", l.bin)
	if err := labkit.BuildBinaries(ctx, root, l.bin); err != nil {
		return err
	}
	if err := l.up(ctx); err != nil {
		return err
	}

	emit := func(v any) {
		b, _ := json.Marshal(v)
		if jsonOut {
			fmt.Println(string(b))
		}
		logf("%s", b)
	}
	failed := 0
	idx := 0
	for _, f := range faults {
		for _, ph := range phases {
			idx++
			if !re.MatchString(f + "/" + ph) {
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			var r cellResult
			if time.Since(start) > budget {
				r = cellResult{Fault: f, Phase: ph, DomainHosts: -1, WrongPages: -1, HalfCreated: -1, Reason: "skipped: the run's time budget is spent"}
			} else {
				logf("cell %s x %s", f, ph)
				r = l.runFaultCell(ctx, idx, f, ph)
			}
			if ctx.Err() != nil {
				return fmt.Errorf("interrupted during %s x %s: %w", f, ph, ctx.Err())
			}
			if !r.OK || r.DomainHosts != 1 || r.WrongPages != 0 || r.HalfCreated != 0 {
				failed++
			}
			emit(r)
		}
	}
	for _, f := range hostileFaults {
		idx++
		if !re.MatchString("hostile/" + f) {
			continue
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		var r hostileResult
		if time.Since(start) > budget {
			r = hostileResult{Fault: f, Reason: "skipped: the run's time budget is spent"}
		} else {
			logf("hostile cell %s", f)
			r = l.runHostileCell(ctx, idx, f)
		}
		if ctx.Err() != nil {
			return fmt.Errorf("interrupted during hostile %s: %w", f, ctx.Err())
		}
		if !r.OK || !r.Refused || !r.AgentAlive {
			failed++
		}
		emit(r)
	}
	logf("done in %.0fs; %d cells broke an invariant or were not ok", time.Since(start).Seconds(), failed)
	return nil
}
