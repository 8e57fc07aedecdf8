package main

import (
	"context"
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
	"github.com/xenferry/xenferry/pkg/dedup"
)

// The matrix.
var (
	faults = []string{"kill-source-agent", "kill-target-agent", "kill-controller", "partition", "corrupt-byte", "truncate", "stale-block"}
	phases = []string{"precopy", "stopandcopy", "postcopy", "release"}
)

// Cell parameters. The bandwidth cap stretches pre-copy and the post-copy
// push to seconds; failpoints hold the short phases open.
const (
	cellMemMiB     = 48
	cellBandwidth  = "6Mi"
	holdPhase      = 5 * time.Second  // failpoint sleep in stopandcopy and release
	partitionFor   = 12 * time.Second // how long a partition lasts: past the controller's heartbeat timeout
	quiesceWait    = 30 * time.Second // after the final phase, for the agents' halves to end too
	phaseWait      = 60 * time.Second // until the migration is in the cell's phase
	terminalWait   = 150 * time.Second
	settle         = 3 * time.Second // after the final phase: agents publish what they have
	runningProbe   = 500 * time.Millisecond
	restartDelayOp = time.Second // an operator restarting a killed process
)

// cellResult is one line of the matrix.
type cellResult struct {
	Fault         string  `json:"fault"`
	Phase         string  `json:"phase"`
	OK            bool    `json:"ok"`
	DomainHosts   int     `json:"domainHosts"`
	WrongPages    int     `json:"wrongPages"`
	HalfCreated   int     `json:"halfCreated"`
	TerminalPhase string  `json:"terminalPhase"`
	DetectSeconds float64 `json:"detectSeconds"`
	Reason        string  `json:"reason"`
	Seconds       float64 `json:"seconds"`
}

// strategyFor picks the strategy that passes through the phase for sure.
func strategyFor(phase string) (v1.MigrationStrategy, string) {
	switch phase {
	case "stopandcopy":
		return v1.StrategyPreCopy, "savestate=sleep:" + holdPhase.String()
	case "postcopy":
		return v1.StrategyHybrid, ""
	case "release":
		return v1.StrategyHybrid, "release=sleep:" + holdPhase.String()
	}
	return v1.StrategyPreCopy, ""
}

// runFaultCell runs one fault x phase cell from fresh agents to verdict.
func (l *lab) runFaultCell(ctx context.Context, idx int, fault, phase string) (res cellResult) {
	t0 := time.Now()
	res = cellResult{Fault: fault, Phase: phase, DomainHosts: -1, WrongPages: -1, HalfCreated: -1}
	defer func() { res.Seconds = labkit.Round1(time.Since(t0).Seconds()) }()
	var notes []string
	note := func(f string, a ...any) { notes = append(notes, fmt.Sprintf(f, a...)) }
	fail := func(f string, a ...any) cellResult {
		res.Reason = strings.Join(append([]string{fmt.Sprintf(f, a...)}, notes...), "; ")
		return res
	}

	name := fmt.Sprintf("vm-%02d", idx)
	cellDir := filepath.Join(l.work, "cells", name)
	if err := os.MkdirAll(cellDir, 0o755); err != nil {
		return fail("harness: %v", err)
	}
	defer os.Remove(filepath.Join(l.work, "disks", name+".img"))
	l.resetHosts()
	cfgA, cfgB := filepath.Join(cellDir, "a.yaml"), filepath.Join(cellDir, "b.yaml")
	if err := l.writeSimConfig(cfgA, hostA, []domSpec{{name: name, memMiB: cellMemMiB, seed: 100 + idx, dirty: 2}}); err != nil {
		return fail("harness: %v", err)
	}
	if err := l.writeSimConfig(cfgB, hostB, nil); err != nil {
		return fail("harness: %v", err)
	}
	advertise := ""
	if fault == "corrupt-byte" || fault == "truncate" {
		advertise = l.proxy.addr()
	}
	a := l.agents[hostA]
	if err := l.startAgent(ctx, hostA, cfgA, ""); err != nil {
		return fail("harness: start %s: %v", hostA, err)
	}
	if err := l.startAgent(ctx, hostB, cfgB, advertise); err != nil {
		return fail("harness: start %s: %v", hostB, err)
	}
	if err := l.waitDomain(ctx, name, hostA); err != nil {
		return fail("harness: XenDomain %s not published by %s: %v", name, hostA, err)
	}
	nsA, _ := netnsInode(l.net.hosts[hostA].ns)
	nsB, _ := netnsInode(l.net.hosts[hostB].ns)
	gs := findGuests(name, nsA)
	if len(gs) != 1 {
		return fail("harness: %d guest processes of %s on %s, want 1", len(gs), name, hostA)
	}
	orig := gs[0]
	ctl, err := labkit.ReadCtl(orig.PID)
	if err != nil {
		return fail("harness: %v", err)
	}
	mem0, err := labkit.ReadMemory(orig.PID)
	if err != nil {
		return fail("harness: read memory of %s: %v", name, err)
	}

	strategy, fp := strategyFor(phase)
	if err := a.setFailpoints(fp); err != nil {
		return fail("harness: %v", err)
	}
	bw := resource.MustParse(cellBandwidth)
	mig := &v1.VMMigration{
		ObjectMeta: metav1.ObjectMeta{Namespace: "default", Name: name},
		Spec: v1.VMMigrationSpec{Domain: name, TargetHost: hostB, Strategy: strategy,
			MigrationParameters: v1.MigrationParameters{Bandwidth: &bw, MaxDowntime: &metav1.Duration{Duration: 2 * time.Second}}},
	}
	if err := l.c.Create(ctx, mig); err != nil {
		return fail("harness: create VMMigration: %v", err)
	}

	// Wait until the migration is in the phase, as the API shows it (the
	// release step has no phase of its own: the source agent's failpoint
	// marker says it is there).
	var reached *v1.VMMigration
	err = waitFor(ctx, phaseWait, 100*time.Millisecond, func() (bool, error) {
		m, err := l.getMig(ctx, name)
		if err != nil {
			return false, err
		}
		reached = m
		if m.Status.Phase.IsFinal() {
			return true, nil
		}
		src := m.Status.Source
		switch phase {
		case "precopy":
			return src != nil && src.Phase == "PreCopy" && src.Progress != nil && src.Progress.BytesSent > 0, nil
		case "stopandcopy":
			return src != nil && src.Phase == "StopAndCopy", nil
		case "postcopy":
			return src != nil && src.Phase == "PostCopy", nil
		case "release":
			return a.hit("release"), nil
		}
		return false, fmt.Errorf("unknown phase %q", phase)
	})
	if err != nil {
		return fail("phase %s not reached: %v (migration phase %s)", phase, err, labkit.PhaseOf(reached))
	}
	if reached.Status.Phase.IsFinal() {
		note("migration ended %s before the phase %s was seen", reached.Status.Phase, phase)
		res.TerminalPhase = string(reached.Status.Phase)
		return l.verdict(ctx, res, name, orig, ctl, mem0, nsA, nsB, notes, labkit.CtlView{})
	}

	// The source's pause word when the fault strikes: a copy paused for the
	// switch-over that runs again at the end was resumed after the fault.
	atInject, _ := labkit.ReadCtl(orig.PID)
	tInject := time.Now()
	// Watch for the final phase from the injection on, while faults that
	// last (a partition, a kill and restart) are still in progress.
	type seen struct {
		m   *v1.VMMigration
		at  time.Time
		err error
	}
	watch := make(chan seen, 1)
	go func() {
		var last *v1.VMMigration
		err := waitFor(ctx, terminalWait, 200*time.Millisecond, func() (bool, error) {
			m, err := l.getMig(ctx, name)
			if err != nil {
				return false, err
			}
			last = m
			return m.Status.Phase.IsFinal(), nil
		})
		watch <- seen{last, time.Now(), err}
	}()
	if err := l.inject(ctx, fault, name, mem0, ctl, note); err != nil {
		<-watch
		return fail("harness: inject %s: %v", fault, err)
	}
	w := <-watch
	last, werr := w.m, w.err
	if werr != nil {
		note("no final phase %v after the fault (phase %s, source %s, target %s)", terminalWait, labkit.PhaseOf(last), halfText(last, true), halfText(last, false))
		res.TerminalPhase = labkit.PhaseOf(last)
	} else {
		res.TerminalPhase = string(last.Status.Phase)
		res.DetectSeconds = labkit.Round1(w.at.Sub(tInject).Seconds())
		// A final phase is the controller's word; the agents may still be
		// moving the domain (a post-copy recovering after a partition).
		// Judge the state they leave, once both halves have ended.
		if err := waitFor(ctx, quiesceWait, 250*time.Millisecond, func() (bool, error) {
			m, err := l.getMig(ctx, name)
			if err != nil {
				return false, err
			}
			last = m
			return l.halvesEnded(m), nil
		}); err != nil {
			note("the agents' halves had not ended %v after the final phase (source %s; target %s)", quiesceWait, halfText(last, true), halfText(last, false))
		}
	}
	return l.verdict(ctx, res, name, orig, ctl, mem0, nsA, nsB, notes, atInject)
}

// inject applies a fault and, for the faults that end, ends it.
func (l *lab) inject(ctx context.Context, fault, name string, mem0 []byte, ctl labkit.CtlView, note func(string, ...any)) error {
	switch fault {
	case "kill-source-agent", "kill-target-agent":
		host := hostA
		if fault == "kill-target-agent" {
			host = hostB
		}
		ag := l.agents[host]
		ag.p.Kill()
		labkit.SleepCtx(ctx, restartDelayOp)
		_ = ag.setFailpoints("")
		if err := l.startAgent(ctx, host, ag.cfg, ag.advertise); err != nil {
			note("restarted agent %s did not register: %v", host, err)
		}
	case "kill-controller":
		l.controller.Kill()
		labkit.SleepCtx(ctx, restartDelayOp)
		if err := l.startController(); err != nil {
			return err
		}
	case "partition":
		if err := l.net.partition(ctx, hostB); err != nil {
			return err
		}
		labkit.SleepCtx(ctx, partitionFor)
		if err := l.net.heal(context.Background(), hostB); err != nil {
			return err
		}
	case "corrupt-byte":
		if !l.proxy.corruptNext(10 * time.Second) {
			note("no byte crossed the proxy within 10s of the injection: nothing was corrupted")
		}
	case "truncate":
		if n := l.proxy.cut(); n == 0 {
			note("no open connection to cut")
		} else {
			note("cut %d connections", n)
		}
	case "stale-block":
		n, err := staleBlocks(filepath.Join(l.work, "disks", name+".img"), mem0, ctl)
		if err != nil {
			return err
		}
		note("changed %d disk blocks that equal pages of the domain", n)
	default:
		return fmt.Errorf("unknown fault %q", fault)
	}
	return nil
}

// staleBlocks overwrites every block of the disk that equals a page of
// the domain outside its hot set: references to those blocks go stale.
func staleBlocks(disk string, mem0 []byte, ctl labkit.CtlView) (int, error) {
	want := map[dedup.Hash]bool{}
	zero := dedup.HashPage(make([]byte, labkit.PageSize))
	for p := uint64(0); p < uint64(len(mem0)/labkit.PageSize); p++ {
		if p >= ctl.HotStart && p < ctl.HotStart+ctl.HotPages {
			continue
		}
		if h := dedup.HashPage(mem0[p*labkit.PageSize : (p+1)*labkit.PageSize]); h != zero {
			want[h] = true
		}
	}
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return 0, err
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		return 0, err
	}
	blk := make([]byte, labkit.PageSize)
	n := 0
	for off := int64(0); off+labkit.PageSize <= st.Size(); off += labkit.PageSize {
		if _, err := f.ReadAt(blk, off); err != nil {
			return n, err
		}
		if !want[dedup.HashPage(blk)] {
			continue
		}
		if _, err := rand.Read(blk); err != nil {
			return n, err
		}
		if _, err := f.WriteAt(blk, off); err != nil {
			return n, err
		}
		n++
	}
	return n, f.Sync()
}

// verdict observes where the domain runs and whether the migration's final
// word is true. Facts come from /proc (guest processes, their control
// pages and memory); the API's claims are checked against them.
func (l *lab) verdict(ctx context.Context, res cellResult, name string, orig labkit.Guest, ctl labkit.CtlView, mem0 []byte, nsA, nsB uint64, notes []string, atInject labkit.CtlView) cellResult {
	note := func(f string, a ...any) { notes = append(notes, fmt.Sprintf(f, a...)) }
	labkit.SleepCtx(ctx, settle)
	type copyOf struct {
		host  string
		g     labkit.Guest
		rs    runState
		fresh bool // booted afresh, not the original nor a migrated copy
	}
	var running, stopped []copyOf
	for _, hc := range []struct {
		host string
		ns   uint64
	}{{hostA, nsA}, {hostB, nsB}} {
		for _, g := range findGuests(name, hc.ns) {
			rs, err := observeRun(g.PID, runningProbe)
			if err != nil {
				continue // exited meanwhile
			}
			c := copyOf{hc.host, g, rs, false}
			if hc.host == hostA && g.ID() != orig.ID() {
				// A new guest on the source is the restarted agent's sim
				// configuration booting the domain afresh: same domain,
				// same disk, but none of the state it had.
				c.fresh = true
				note("%s: a fresh instance of the domain (guest %s, not the original %s) was booted from the host's configuration", hostA, g.ID(), orig.ID())
			}
			if !c.fresh && hc.host == hostA && rs.running && atInject.Paused && rs.ctl.PauseWord != atInject.PauseWord {
				note("the source resumed the copy it had paused for the switch-over")
			}
			if rs.running {
				if !rs.progressing {
					note("the copy on %s runs but makes no progress (its vCPUs wait, e.g. for pages that never come)", hc.host)
				}
				running = append(running, c)
			} else {
				stopped = append(stopped, c)
			}
		}
	}
	// Every running instance counts, fresh boots included: two instances of
	// one domain on one shared disk is the split brain the invariant forbids.
	hosts := map[string]bool{}
	for _, c := range running {
		hosts[c.host] = true
	}
	res.DomainHosts = len(hosts)
	res.HalfCreated = 0
	for _, c := range stopped {
		switch {
		case c.host == hostB:
			res.HalfCreated++
		case c.fresh:
			note("the fresh instance on %s is paused", c.host)
		default:
			note("the source keeps a paused copy")
		}
	}
	if len(running) == 0 && len(stopped) == 0 {
		note("the domain runs nowhere")
	}
	// Memory of the copy that runs (or of the paused copies if none runs).
	check := running
	if len(check) == 0 {
		check = stopped
	}
	res.WrongPages = 0
	stateful := 0
	for _, c := range check {
		if c.fresh {
			continue
		}
		stateful++
		mem, err := labkit.ReadMemory(c.g.PID)
		if err != nil {
			note("read memory of %s on %s: %v", name, c.host, err)
			continue
		}
		n, first := wrongPages(mem0, mem, ctl.HotStart, ctl.HotPages)
		if n > 0 {
			note("%d pages of the copy on %s differ from the source's (first pfns %v)", n, c.host, first)
		}
		res.WrongPages = max(res.WrongPages, n)
	}

	if stateful == 0 && len(check) > 0 {
		// Only a fresh boot is left: every page of the domain's state is gone.
		res.WrongPages = len(mem0) / labkit.PageSize
		note("the domain's state is lost: only a fresh boot runs (wrongPages counts every page)")
	}
	// Where the domain runs, for the claims below: a fresh boot is not the
	// domain a migration could truthfully say "keeps running".
	actual := ""
	var live []copyOf
	for _, c := range running {
		if !c.fresh {
			live = append(live, c)
		}
	}
	if len(live) == 1 {
		actual = live[0].host
	} else if len(live) > 1 {
		actual = "both"
	}
	if len(running) > 1 {
		note("the domain runs on both hosts")
	}
	m, err := l.getMig(ctx, name)
	if err != nil {
		note("read VMMigration: %v", err)
		res.Reason = strings.Join(notes, "; ")
		return res
	}
	claimed := m.Status.DomainHost
	if claimed == "" && m.Status.Phase == v1.MigrationSucceeded {
		claimed = m.Status.TargetHost
	}
	truthful := claimed == actual
	xd := &v1.XenDomain{}
	xdHost := ""
	if err := l.c.Get(ctx, types.NamespacedName{Namespace: "default", Name: name}, xd); err == nil {
		xdHost = xd.Status.Host
		if xd.Status.State != "" && xd.Status.State != "Running" {
			xdHost += "(" + xd.Status.State + ")"
		}
	}
	apiAgrees := xdHost == actual
	// Each agent's inventory must list at least the guests that run on its
	// host (all domains: any other would be a leftover too).
	for _, hc := range []struct {
		host string
		ns   uint64
	}{{hostA, nsA}, {hostB, nsB}} {
		n := 0
		for _, g := range findGuests("", hc.ns) {
			if rs, err := labkit.ReadCtl(g.PID); err == nil && !rs.Paused {
				n++
			}
		}
		h := &v1.XenHost{}
		if err := l.c.Get(ctx, types.NamespacedName{Name: hc.host}, h); err == nil && int(h.Status.Domains) < n {
			apiAgrees = false
			note("XenHost %s lists %d domains, %d guests run there", hc.host, h.Status.Domains, n)
		}
	}
	final := m.Status.Phase.IsFinal()
	withReason := m.Status.Phase == v1.MigrationSucceeded || m.Status.FailureReason != ""

	res.OK = final && withReason && truthful && apiAgrees
	head := labkit.PhaseOf(m)
	if r := m.Status.Result; r != nil {
		head += fmt.Sprintf(" (postCopy=%v verified=%v diskRefs=%d diskFallbacks=%d)", r.PostCopy, r.Verified, r.Pages.Disk, r.Pages.DiskFallback)
	}
	if m.Status.FailureReason != "" {
		head += ": " + labkit.Clip(m.Status.FailureReason, 220)
	}
	if !truthful {
		note("the migration says the domain runs on %q, it runs on %q", claimed, actual)
	}
	if !apiAgrees {
		note("XenDomain says %q, the domain runs on %q", xdHost, actual)
	}
	if final && !withReason {
		note("final phase without a failure reason")
	}
	res.Reason = strings.Join(append([]string{head}, notes...), "; ")
	return res
}

// halvesEnded: each agent's half says it finished, never started, or was
// written by an agent process that is gone (it moves nothing any more).
func (l *lab) halvesEnded(m *v1.VMMigration) bool {
	gone := func(host, id string) bool {
		a := l.agents[host]
		return a == nil || a.p == nil || !a.p.Alive() || id != a.id
	}
	src, dst := m.Status.Source, m.Status.Target
	srcDone := src == nil || src.StartTime == nil || src.Completed || src.Failed || gone(src.Host, src.AgentID)
	dstDone := dst == nil || !dst.Prepared || dst.Completed || dst.Failed || gone(dst.Host, dst.AgentID)
	return srcDone && dstDone
}

func halfText(m *v1.VMMigration, source bool) string {
	if m == nil {
		return "-"
	}
	if source {
		if s := m.Status.Source; s != nil {
			return fmt.Sprintf("%s failed=%v completed=%v %s", s.Phase, s.Failed, s.Completed, labkit.Clip(s.Message, 100))
		}
		return "-"
	}
	if t := m.Status.Target; t != nil {
		return fmt.Sprintf("prepared=%v resumed=%v completed=%v failed=%v %s", t.Prepared, t.Resumed, t.Completed, t.Failed, labkit.Clip(t.Message, 100))
	}
	return "-"
}
