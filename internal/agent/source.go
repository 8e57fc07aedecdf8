package agent

import (
	"context"
	"errors"
	"fmt"
	"os"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// The source half of a VMMigration, after KubeVirt's migration source
// controller: the SourceReconciler runs the outgoing transfer of the
// domain this host holds (through the engine or through xl), reports it in
// status.source — the only part of the VMMigration it writes —, holds a
// domain committed to the target until the target's verdict, and adopts
// what a previous process of this agent left, from the facts on this host.

// SourceReconciler owns this host's source halves (status.source).
type SourceReconciler struct {
	*Agent
}

func (sr *SourceReconciler) reconcile(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	uid := string(m.UID)
	r := sr.lookup(uid)
	half := m.Status.Source
	if half != nil && half.Host != sr.cfg.Host {
		half = nil
	}
	stop := stopping(m)
	if r == nil {
		rec, err := readInflight(sr.stateDir(), uid)
		if err != nil {
			sr.log.Error(err, "Ignored this migration's persisted state", "migration", klogKey(m))
			rec = nil
		}
		unresolved := rec != nil && rec.Role == roleSourceName && rec.Committed && rec.Phase != phaseReleased && rec.Phase != phaseReclaimed
		if unresolved || half != nil && half.Committed && half.AgentID != sr.id && !half.Failed && !half.Completed {
			// A previous process of this agent committed the domain: resolve
			// from facts, even if the migration is final by now.
			return sr.adoptCommitted(ctx, m, half, rec)
		}
		if m.Status.Phase.IsFinal() {
			if rec != nil {
				if rec.Role == roleSourceName && !rec.Committed {
					// The previous process died after pausing the domain for a
					// switch-over it never committed (it persists the commit
					// before go), and the migration ended before this process
					// came up. The target never got go, so the domain runs
					// nowhere else: nobody but this agent will resume it.
					if err := sr.resumeAbandoned(ctx, rec.Domain); err != nil {
						return reconcile.Result{}, fmt.Errorf("migration %s ended while the previous agent process held domain %s paused before go: %w", klogKey(m), rec.Domain, err)
					}
				}
				sr.forgetState(uid)
			}
			return reconcile.Result{}, nil
		}
		if half != nil && half.StartTime != nil && half.AgentID != sr.id && !half.Failed && !half.Completed {
			// A previous process of this agent was sending: that stream is
			// gone, and it never sent go (it persists that before go).
			sr.log.Info("Failing a migration this agent's previous process was sending", "migration", klogKey(m), "previousAgent", half.AgentID)
			h := *half
			h.AgentID, h.Failed = sr.id, true
			h.Message = "the source agent restarted during the transfer; the stream was lost and the domain keeps running on the source"
			if rec != nil {
				if err := sr.resumeAbandoned(ctx, rec.Domain); err != nil {
					h.Message = "the source agent restarted during the transfer, before go; resuming the domain here failed: " + err.Error()
				}
			} else {
				h.Message += " (no persisted state: if the domain is paused here, check that the target does not run it before resuming it)"
			}
			if err := sr.writeSource(ctx, m, h); err != nil {
				return reconcile.Result{}, err
			}
			sr.forgetState(uid)
			return reconcile.Result{}, nil
		}
		if stop != "" || half != nil {
			return reconcile.Result{}, nil
		}
		tgt := m.Status.Target
		if !meta.IsStatusConditionTrue(m.Status.Conditions, v1.TargetReadyCondition) || tgt == nil || tgt.Host != m.Status.TargetHost || !tgt.Ready || tgt.Address == "" {
			return reconcile.Result{}, nil // the controller has not confirmed a ready target yet
		}
		return sr.startSource(ctx, m)
	}

	r.mu.Lock()
	past := r.pastNoReturn() || (m.Status.Target != nil && m.Status.Target.Resumed)
	if stop != "" && !past && !r.finished && !r.aborted {
		r.aborted = true
		sr.log.Info("Aborting an outgoing migration", "migration", klogKey(m), "why", stop)
		r.cancel()
	}
	r.mu.Unlock()
	sr.resolveCommitted(m, r)
	r.mu.Lock()
	held := r.dom != nil
	finished := r.finished && !held
	r.mu.Unlock()
	res, err := sr.flushSource(ctx, m, r)
	if err == nil && finished && m.Status.Phase.IsFinal() {
		sr.dropRun(uid)
		sr.forgetState(uid)
	}
	if held && res.RequeueAfter == 0 {
		// The target's half changing wakes this up; look again anyway.
		res.RequeueAfter = 5 * sr.cfg.StatusInterval
	}
	return res, err
}

// resolveCommitted ends the wait of a transfer that failed after go, on
// an explicit verdict in the target's half only: discarded (the target
// destroyed its copy) resumes the domain here; completed (every page
// verified there), or resumed after a verified stop-and-copy, releases it.
// Anything else keeps the domain paused here.
func (sr *SourceReconciler) resolveCommitted(m *v1.VMMigration, r *run) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.dom == nil {
		return
	}
	dst := m.Status.Target
	if dst != nil && dst.Host != m.Status.TargetHost {
		dst = nil
	}
	name := r.dom.Info().Name
	switch {
	case dst != nil && dst.Discarded:
		if err := r.dom.Reclaim("the target " + dst.Host + " reported that it discarded the domain"); err != nil {
			sr.log.Error(err, "Could not resume the domain the target discarded; it stays paused here", "migration", r.key, "domain", name)
			r.message = fmt.Sprintf("the target discarded the domain but resuming it here failed (%v); it stays paused on %s", err, sr.cfg.Host)
			r.changed = true
			return
		}
		_ = r.dom.Close()
		r.dom = nil
		r.failed, r.changed = true, true
		r.message = fmt.Sprintf("the target %s discarded the domain after it had resumed it (%s); the domain runs on the source %s again", dst.Host, dst.Message, sr.cfg.Host)
		sr.log.Info("Target discarded the domain; resumed it here", "migration", r.key, "domain", name)
	case dst != nil && (dst.Completed || dst.Resumed && r.verifiedBeforeGo):
		if err := r.dom.Release(); err != nil {
			sr.log.Error(err, "Could not release the domain that runs on the target", "migration", r.key, "domain", name)
			r.message = fmt.Sprintf("the domain runs verified on %s but releasing it here failed: %v", dst.Host, err)
			r.changed = true
			return
		}
		_ = r.dom.Close()
		r.dom = nil
		r.done, r.changed, r.phase = true, true, engine.PhaseDone
		if r.result != nil {
			r.result.Verified = true
		}
		r.message = fmt.Sprintf("the transfer failed after go, but the target %s runs the domain with verified memory; released it here", dst.Host)
		sr.log.Info("Target runs the domain with verified memory; released it here", "migration", r.key, "domain", name)
	default:
		if !r.awaitLogged {
			r.awaitLogged = true
			sr.log.Info("Holding the committed domain paused until the target's verdict", "migration", r.key, "domain", name)
		}
		return
	}
	if sr.cfg.DurableDir != "" {
		// Either verdict means nobody reads this migration's mirror again.
		postcopy.RemoveMirror(sr.cfg.DurableDir, r.uid)
	}
	sr.kickPublish()
	sr.saveStateLocked(r)
}

// startSource announces the transfer in status.source before starting it,
// and starts only if that write shows no abort: a controller that aborts
// afterwards is then sure to see the announcement.
func (sr *SourceReconciler) startSource(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	now := time.Now()
	r := &run{key: client.ObjectKeyFromObject(m), uid: string(m.UID), role: roleSource, start: now, phase: engine.PhaseConnecting}
	fail := func(err error) (reconcile.Result, error) {
		sr.log.Error(err, "Outgoing migration could not start", "migration", klogKey(m))
		r.mu.Lock()
		r.failed, r.finished, r.message, r.changed = true, true, err.Error(), true
		r.mu.Unlock()
		return sr.flushSource(ctx, m, r)
	}
	tok, err := sr.readToken(ctx, m)
	if err != nil {
		return reconcile.Result{}, err
	}
	dom := &v1.XenDomain{}
	if err := sr.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, dom); err != nil {
		return reconcile.Result{}, fmt.Errorf("get XenDomain %s/%s: %w", m.Namespace, m.Spec.Domain, err)
	}
	r.domain = dom.Spec.DomainName
	sr.addRun(r)
	r.mu.Lock()
	st := sr.sourceHalf(r)
	r.changed = false
	sr.saveStateLocked(r)
	r.mu.Unlock()
	if err := sr.writeSource(ctx, m, st); err != nil {
		sr.dropRun(r.uid)
		return reconcile.Result{}, err
	}
	if why := stopping(m); why != "" {
		r.mu.Lock()
		r.failed, r.finished, r.message, r.changed = true, true, "not started: "+why, true
		r.mu.Unlock()
		return sr.flushSource(ctx, m, r)
	}
	p := m.Status.Parameters
	if p == nil {
		return fail(fmt.Errorf("VMMigration %s/%s has no resolved parameters", m.Namespace, m.Name))
	}
	if sr.usesXL() {
		return sr.startSourceXL(ctx, m, r, dom.Spec.DomainName, tok)
	}
	sd, err := sr.host.OpenSource(ctx, dom.Spec.DomainName)
	if err != nil {
		return fail(fmt.Errorf("open domain %s on %s: %w", dom.Spec.DomainName, sr.cfg.Host, err))
	}
	sd = failpointSource(sd) // hack/faults: named hold points; a no-op unless XENFERRY_FAILPOINTS* is set
	opts := engine.Options{
		Strategy:          engine.Strategy(p.EngineStrategy),
		LinkBytesPerSec:   p.BandwidthBytesPerSecond,
		Compress:          p.Compression == v1.PageCodecZstd,
		CompressAlways:    p.CompressionMode == v1.CompressionAlways,
		MaxDowntime:       p.MaxDowntime.Duration,
		CompletionTimeout: p.SwitchToPostCopyAfter.Duration,
		MigrationID:       string(m.UID),
		Token:             tok,
		DurableDir:        sr.cfg.DurableDir,
		RecoveryTimeout:   sr.cfg.RecoveryTimeout,
		Dial:              sr.dialer(m.Status.TargetHost),
	}
	hooks := engine.Hooks{Log: sr.log.WithName("source").WithValues("migration", klogKey(m))}
	if hasDedup(opts.Strategy) {
		cat, err := sr.catalog(ctx, sd.Info().Disks)
		if err != nil {
			sr.log.Error(err, "Dedup disabled for this migration: disk index unavailable", "migration", klogKey(m))
		} else {
			hooks.Disks = cat
		}
	}
	hooks.Progress = func(pr engine.Progress) {
		telemetry.sourceProgress(r.key.String(), pr)
		r.mu.Lock()
		phaseChanged := pr.Phase != r.phase || pr.Committed && !r.committed
		r.progress, r.phase, r.changed = pr, pr.Phase, true
		r.committed = r.committed || pr.Committed
		r.mu.Unlock()
		if phaseChanged {
			sr.wakeUp(r)
		}
	}
	hooks.Committed = func() {
		r.mu.Lock()
		r.committed, r.changed = true, true
		sr.saveStateLocked(r)
		r.mu.Unlock()
		sr.wakeUp(r)
	}
	rctx, cancel := context.WithCancel(sr.baseCtx())
	r.mu.Lock()
	r.cancel = cancel
	r.mu.Unlock()
	addr := m.Status.Target.Address
	sr.log.Info("Starting outgoing migration", "migration", klogKey(m), "domain", dom.Spec.DomainName, "to", m.Status.TargetHost, "addr", addr, "strategy", opts.Strategy)
	sr.transfers.Add(1)
	go func() {
		defer sr.transfers.Done()
		defer cancel()
		res, err := engine.Migrate(rctx, sd, addr, opts, hooks)
		telemetry.sourceDone(r.key.String(), res, err)
		// After go without a verdict, hold the handle: the domain stays
		// paused (Close would keep it paused too) and the verdict in the
		// target's half decides between Reclaim and Release.
		hold := errors.Is(err, engine.ErrCommittedFailure)
		if !hold {
			_ = sd.Close()
		}
		r.mu.Lock()
		r.finished, r.changed = true, true
		switch {
		case err == nil:
			r.done, r.result, r.phase = true, &res, engine.PhaseDone
		case hold:
			r.committed, r.dom, r.result = true, sd, &res
			r.verifiedBeforeGo = res.Verified && !res.PostCopy
			r.message = "waiting for the target's verdict, the domain paused here: " + err.Error()
		default:
			r.failed, r.message = true, err.Error()
			r.committed = r.committed || errors.Is(err, engine.ErrDiscarded)
		}
		sr.saveStateLocked(r)
		r.mu.Unlock()
		switch {
		case err == nil:
			sr.log.Info("Outgoing migration done", "migration", r.key, "total", res.Total, "downtime", res.Downtime, "wireBytes", res.WireBytes)
			sr.recordLinkRate(res.WireBytes, res.Total)
		case hold:
			sr.log.Error(err, "Outgoing migration failed after go; holding the domain paused for the target's verdict", "migration", r.key)
		default:
			sr.log.Error(err, "Outgoing migration failed", "migration", r.key)
		}
		sr.kickPublish()
		sr.wakeUp(r)
	}()
	return reconcile.Result{RequeueAfter: sr.cfg.StatusInterval}, nil
}

func hasDedup(s engine.Strategy) bool {
	return s == engine.StrategyPreCopyDedup || s == engine.StrategyHybridDedup
}

// catalog returns the dedup catalog of a domain's disks from the agent's
// index cache (built ahead of need by the indexer, else now).
func (sr *SourceReconciler) catalog(ctx context.Context, disks []xenmem.Disk) (*dedup.Catalog, error) {
	if len(disks) == 0 {
		return nil, fmt.Errorf("the domain has no disk to deduplicate against")
	}
	return sr.indexes.catalog(ctx, disks, telemetry.indexProgress)
}

func (sr *SourceReconciler) sourceHalf(r *run) v1.SourceState {
	now := metav1.Now()
	st := v1.SourceState{
		Host: sr.cfg.Host, AgentID: sr.id, Phase: string(r.phase),
		StartTime: &metav1.Time{Time: r.start}, Completed: r.done, Failed: r.failed,
		Committed: r.committed, Message: r.message, LastUpdateTime: &now,
	}
	if r.progress.Phase != "" || r.progress.WireBytes > 0 {
		p := progressOf(r.progress)
		st.Progress = &p
	}
	if r.result != nil && r.done {
		res := resultOf(*r.result)
		st.Result = &res
		if st.Progress == nil {
			st.Progress = &v1.MigrationProgress{}
		}
		st.Progress.Percent = 100
		st.Progress.BytesSent = r.result.WireBytes
		st.Progress.RemainingBytes = 0
	}
	return st
}

// flushSource writes the source half: phase changes and the end at once,
// progress at most every StatusInterval.
func (sr *SourceReconciler) flushSource(ctx context.Context, m *v1.VMMigration, r *run) (reconcile.Result, error) {
	r.mu.Lock()
	next := reconcile.Result{}
	if !r.finished {
		next.RequeueAfter = sr.cfg.StatusInterval
	}
	if !r.changed {
		r.mu.Unlock()
		return next, nil
	}
	urgent := string(r.phase) != r.lastPhase || r.finished
	if wait := sr.cfg.StatusInterval - time.Since(r.lastWrite); !urgent && wait > 0 {
		r.mu.Unlock()
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	st := sr.sourceHalf(r)
	r.changed, r.lastWrite, r.lastPhase = false, time.Now(), string(r.phase)
	r.mu.Unlock()
	if err := sr.writeSource(ctx, m, st); err != nil {
		r.mu.Lock()
		r.changed = true
		r.mu.Unlock()
		return reconcile.Result{}, err
	}
	return next, nil
}

func progressOf(p engine.Progress) v1.MigrationProgress {
	return v1.MigrationProgress{
		Round: int32(p.Round), BytesSent: p.WireBytes, RemainingBytes: p.RemainingBytes,
		DirtyRate: int64(p.DirtyRateBytesPerSec), TransferRate: int64(p.WireBytesPerSec),
		Percent: int32(p.Percent), Pages: pagesOf(p.Pages),
	}
}

func pagesOf(p engine.PageCounts) v1.PageClasses {
	return v1.PageClasses{Total: p.Total, Full: p.Full, Zero: p.Zero, Disk: p.Disk, DiskFallback: p.DiskFallback, Resent: p.Resent, Demand: p.Demand}
}

func resultOf(r engine.Result) v1.MigrationResult {
	return v1.MigrationResult{
		TotalTime: metav1.Duration{Duration: r.Total}, Downtime: metav1.Duration{Duration: r.Downtime},
		ResumeTime: metav1.Duration{Duration: r.Resume}, BytesSent: r.WireBytes, MemoryBytes: int64(r.MemoryBytes),
		DedupSavedBytes: r.DedupSavedBytes, Iterations: int32(r.Iterations), PostCopy: r.PostCopy,
		Verified: r.Verified, StopReason: r.StopReason, Pages: pagesOf(r.Pages),
	}
}

func (sr *SourceReconciler) writeSource(ctx context.Context, m *v1.VMMigration, st v1.SourceState) error {
	return sr.writeHalf(ctx, m, "/status/source", st)
}

// adoptCommitted takes over a source half whose domain a previous process
// of this agent committed to the target, from facts: the domain's state on
// this host and the target's half. A paused domain is held (a handle that
// never resumes it) until the target's verdict; an absent one was released
// or lost; a running one is reported, never touched.
func (sr *SourceReconciler) adoptCommitted(ctx context.Context, m *v1.VMMigration, half *v1.SourceState, rec *inflight) (reconcile.Result, error) {
	r := &run{key: client.ObjectKeyFromObject(m), uid: string(m.UID), role: roleSource, start: time.Now(),
		committed: true, finished: true, changed: true}
	if rec != nil {
		r.domain, r.verifiedBeforeGo, r.phase = rec.Domain, rec.VerifiedBeforeGo, phaseOf(rec)
	}
	if half != nil {
		if half.StartTime != nil {
			r.start = half.StartTime.Time
		}
		if r.phase == "" || r.phase == engine.PhaseConnecting {
			r.phase = engine.Phase(half.Phase)
		}
		if half.Result != nil {
			res := engine.Result{Verified: half.Result.Verified, PostCopy: half.Result.PostCopy}
			r.result = &res
		}
	}
	if r.domain == "" {
		dom := &v1.XenDomain{}
		if err := sr.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, dom); err != nil {
			return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: get XenDomain %s/%s: %w", klogKey(m), m.Namespace, m.Spec.Domain, err)
		}
		r.domain = dom.Spec.DomainName
	}
	doms, err := sr.host.Domains(ctx)
	if err != nil {
		return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: list domains: %w", klogKey(m), err)
	}
	var info *xenmem.DomainInfo
	for i := range doms {
		if doms[i].Name == r.domain {
			info = &doms[i]
		}
	}
	dst := m.Status.Target
	if dst != nil && dst.Host != m.Status.TargetHost {
		dst = nil
	}
	switch {
	case info == nil:
		if dst != nil && (dst.Completed || dst.Resumed) && !dst.Discarded {
			r.done, r.phase = true, engine.PhaseDone
			r.message = fmt.Sprintf("the source agent restarted after go; the domain is no longer on %s and runs on the target %s", sr.cfg.Host, dst.Host)
		} else {
			r.failed = true
			r.message = fmt.Sprintf("the source agent restarted after go and the domain %s is no longer on %s, while the target does not report running it: check the target", r.domain, sr.cfg.Host)
		}
	case info.State == xenmem.StateRunning:
		r.failed = true
		r.message = fmt.Sprintf("the source agent restarted after go and finds the domain %s running on %s: it was resumed outside xenferry; check that the target does not run it too", r.domain, sr.cfg.Host)
	case sr.usesXL():
		// xl left it suspended as NAME--migratedaway: hold it for the
		// target's verdict, as the process that ran xl would have.
		r.dom = &xlHeld{a: sr.Agent, name: r.domain}
		r.message = "the source agent restarted after xl's permission to go; the domain is held suspended here until the target's verdict"
	default:
		sd, err := sr.host.OpenSource(ctx, r.domain)
		if err != nil {
			return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: open domain %s: %w", klogKey(m), r.domain, err)
		}
		if err := sd.Pause(); err != nil {
			_ = sd.Close()
			return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: pause domain %s: %w", klogKey(m), r.domain, err)
		}
		// A backend that remembers the commit refuses a second one; one
		// that does not learns it here, so the handle never resumes it.
		if err := sd.Commit(); err != nil && !errors.Is(err, xenmem.ErrCommitted) {
			_ = sd.Close()
			return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: commit domain %s: %w", klogKey(m), r.domain, err)
		}
		r.dom = sd
		r.message = "the source agent restarted after go; the domain is held paused here until the target's verdict"
		if dst != nil && dst.Resumed && !dst.Completed && !dst.Discarded && !r.verifiedBeforeGo && sr.cfg.DurableDir != "" {
			// The target runs the domain in post-copy and waits for a source
			// that will not reconnect (the stream died with the previous
			// process), then finishes from the durable mirror, which the
			// previous process may not have completed.
			go sr.rewriteMirror(r, sd)
		}
	}
	sr.log.Info("Adopted a migration this agent's previous process had committed", "migration", klogKey(m), "domain", r.domain,
		"held", r.dom != nil, "done", r.done, "failed", r.failed)
	sr.addRun(r)
	r.mu.Lock()
	sr.saveStateLocked(r)
	r.mu.Unlock()
	sr.resolveCommitted(m, r)
	res, err := sr.flushSource(ctx, m, r)
	r.mu.Lock()
	settled := r.dom == nil
	r.mu.Unlock()
	if err == nil && settled && m.Status.Phase.IsFinal() {
		sr.dropRun(r.uid)
		sr.forgetState(r.uid)
	}
	return res, err
}

// rewriteMirror writes a whole durable post-copy mirror of a committed
// domain this process adopted, unless a complete one exists. The domain is
// committed and paused since go, so its memory is its content at the
// switch-over: every page and its hash are what the target must end with.
// It stops when the handle is no longer held (a verdict or the agent's
// stop); pages are read under r.mu, which every path that closes the
// handle holds.
func (sr *SourceReconciler) rewriteMirror(r *run, sd xenmem.SourceDomain) {
	_, _, done := postcopy.MirrorPaths(sr.cfg.DurableDir, r.uid)
	if _, err := os.Stat(done); err == nil {
		return
	}
	const chunk = 64
	n := sd.NumPages()
	err := func() error {
		m, err := postcopy.CreateMirror(sr.cfg.DurableDir, r.uid, n)
		if err != nil {
			return err
		}
		defer m.Close()
		hashes := make([]dedup.Hash, n)
		buf := make([]byte, chunk*xenmem.PageSize)
		for first := uint64(0); first < n; first += chunk {
			cnt := min(chunk, n-first)
			r.mu.Lock()
			if r.dom != sd {
				r.mu.Unlock()
				return errors.New("the domain is no longer held here")
			}
			err := sd.ReadPages(first, buf[:cnt*xenmem.PageSize])
			r.mu.Unlock()
			if err != nil {
				return fmt.Errorf("read pages from %d: %w", first, err)
			}
			for i := range cnt {
				page := buf[i*xenmem.PageSize : (i+1)*xenmem.PageSize]
				hashes[first+i] = dedup.HashPage(page)
				if err := m.WritePage(first+i, page); err != nil {
					return err
				}
			}
		}
		if err := m.WriteHashes(0, hashes); err != nil {
			return err
		}
		all := xenmem.NewBitmap(n)
		all.SetAll()
		return m.Commit(all)
	}()
	if err != nil {
		sr.log.Error(err, "Could not rewrite the durable post-copy mirror of an adopted committed domain", "migration", r.key, "dir", sr.cfg.DurableDir)
		return
	}
	sr.log.Info("Rewrote the durable post-copy mirror from the adopted paused domain: the target can finish from it", "migration", r.key, "pages", n)
}

// resumeAbandoned resumes a domain that a previous process of this agent
// paused for a switch-over it never committed (no go left): absent or
// running domains are left alone.
func (sr *SourceReconciler) resumeAbandoned(ctx context.Context, name string) error {
	if name == "" {
		return nil
	}
	doms, err := sr.host.Domains(ctx)
	if err != nil {
		return fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		if d.Name != name || d.State != xenmem.StatePaused {
			continue
		}
		sd, err := sr.host.OpenSource(ctx, name)
		if err != nil {
			return fmt.Errorf("open domain %s: %w", name, err)
		}
		defer sd.Close()
		if err := sd.Resume(); err != nil {
			return fmt.Errorf("resume domain %s: %w", name, err)
		}
		sr.log.Info("Resumed a domain the previous agent process paused before go", "domain", name)
	}
	return nil
}

// closeHeld drops the handles of committed domains still waiting for a
// verdict when the agent stops: the domains stay paused (Close never
// resumes a committed domain) and the next agent process adopts them.
func (sr *SourceReconciler) closeHeld() {
	sr.mu.Lock()
	runs := make([]*run, 0, len(sr.runs))
	for _, r := range sr.runs {
		runs = append(runs, r)
	}
	sr.mu.Unlock()
	for _, r := range runs {
		r.mu.Lock()
		held := r.dom
		r.dom = nil
		r.mu.Unlock()
		if held != nil {
			_ = held.Close()
			sr.log.Info("Agent stopping; the committed domain stays paused for the next agent process", "migration", r.key, "domain", held.Info().Name)
		}
	}
}
