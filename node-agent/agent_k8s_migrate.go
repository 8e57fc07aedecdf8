package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/postcopy"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

type role int

const (
	roleSource role = iota + 1
	roleTarget
)

// run is this agent's half of one migration.
type run struct {
	key  types.NamespacedName
	uid  string
	role role
	// domain is the backend's name of the domain on this host (source).
	domain string

	// mu protects the fields below.
	mu sync.Mutex
	// target side
	token                   []byte
	prepared, resumed, done bool
	failed, aborted         bool
	// discarded: the receiver destroyed the domain after it had resumed
	// here, and told the source so.
	discarded  bool
	resumeTime time.Time
	message    string
	// source side
	cancel   context.CancelFunc
	start    time.Time
	phase    engine.Phase
	progress engine.Progress
	result   *engine.Result
	finished bool
	// committed: the engine committed the domain to the target (go); from
	// then on this agent never cancels the transfer nor resumes the domain
	// without the target's verdict.
	committed bool
	// dom is the source handle of a transfer that failed after go without
	// a verdict: the domain stays paused here, held, until the target's
	// half says discarded (Reclaim) or that it runs the domain with
	// verified memory (Release). nil otherwise.
	dom heldDomain
	// verifiedBeforeGo: the target verified every page before go (a
	// stop-and-copy), so its "resumed" alone proves it runs a good copy.
	verifiedBeforeGo bool
	// awaitLogged: the wait for a verdict was logged once.
	awaitLogged bool
	// changed is set when the half differs from what was last written.
	changed   bool
	lastWrite time.Time
	// lastPhase is the phase last written, so a phase change is written at once.
	lastPhase string
}

// heldDomain is a committed domain held here until the target's verdict:
// an engine source handle, or what xl left suspended (xlHeld).
type heldDomain interface {
	Info() xenmem.DomainInfo
	Reclaim(reason string) error
	Release() error
	Close() error
}

func (a *Agent) setupReconciler(mgr ctrl.Manager) error {
	mine := predicate.NewPredicateFuncs(func(o client.Object) bool {
		m, ok := o.(*v1.VMMigration)
		return ok && (m.Status.SourceHost == a.cfg.Host || m.Status.TargetHost == a.cfg.Host)
	})
	skip := true
	err := ctrl.NewControllerManagedBy(mgr).
		Named("agent-migrations").
		For(&v1.VMMigration{}, builder.WithPredicates(mine)).
		WatchesRawSource(source.Channel(a.wake, &handler.EnqueueRequestForObject{})).
		WithOptions(controller.Options{MaxConcurrentReconciles: 2, SkipNameValidation: &skip}).
		Complete(reconcile.Func(a.reconcile))
	if err != nil {
		return fmt.Errorf("agent %s: set up migration reconciler: %w", a.cfg.Host, err)
	}
	a.reportHeld()
	return nil
}

func (a *Agent) lookup(uid string) *run {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.runs[uid]
}

func (a *Agent) addRun(r *run) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.runs[r.uid] = r
}

func (a *Agent) dropRun(uid string) {
	r := a.lookup(uid)
	gone := false
	if r != nil && r.role == roleSource && r.domain != "" {
		r.mu.Lock()
		gone = r.done || r.committed // the domain went to the target
		r.mu.Unlock()
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	if gone {
		a.departed[r.domain] = time.Now()
	}
	delete(a.runs, uid)
}

// forget handles a deleted migration: an outgoing transfer that has not
// reached the point of no return is cancelled (the domain stays here), an
// incoming one stops being authorised.
func (a *Agent) forget(key types.NamespacedName) {
	a.mu.Lock()
	var found []*run
	for _, r := range a.runs {
		if r.key == key {
			found = append(found, r)
		}
	}
	a.mu.Unlock()
	for _, r := range found {
		r.mu.Lock()
		past := r.pastNoReturn()
		r.aborted = true
		if r.cancel != nil && !past && !r.finished {
			r.cancel()
		}
		finished := r.finished || r.role == roleTarget
		held := r.dom
		r.dom = nil
		r.mu.Unlock()
		if held != nil {
			// No verdict can come any more: the domain stays paused here
			// (Close never resumes a committed domain) for an operator.
			_ = held.Close()
			a.log.Error(nil, "Migration deleted before the target's verdict; the committed domain stays paused on this host: "+
				"resume it here only after checking that the target does not run it", "migration", key, "domain", held.Info().Name)
		}
		if finished {
			a.dropRun(r.uid)
			a.forgetState(r.uid)
		}
		a.log.Info("Migration deleted; dropped its half", "migration", key, "pastPointOfNoReturn", past)
	}
}

// reconcile looks at one migration of this host; it never blocks on the
// data path: transfers run in goroutines and report through the run.
func (a *Agent) reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	mig := &v1.VMMigration{}
	if err := a.c.Get(ctx, req.NamespacedName, mig); err != nil {
		if apierrors.IsNotFound(err) {
			a.forget(req.NamespacedName)
			return reconcile.Result{}, nil
		}
		return reconcile.Result{}, fmt.Errorf("get VMMigration %s: %w", req.NamespacedName, err)
	}
	switch a.cfg.Host {
	case mig.Status.TargetHost:
		return a.reconcileTarget(ctx, mig)
	case mig.Status.SourceHost:
		return a.reconcileSource(ctx, mig)
	}
	return reconcile.Result{}, nil
}

// stopping reports why the agents must stop, or "" to go on.
func stopping(m *v1.VMMigration) string {
	switch {
	case m.Status.Phase == v1.MigrationSucceeded:
		return ""
	case m.Status.Phase.IsFinal():
		return fmt.Sprintf("the migration is %s", m.Status.Phase)
	case m.Status.AbortRequested:
		return "abort requested: " + m.Status.FailureReason
	case !m.DeletionTimestamp.IsZero():
		return "the migration is being deleted"
	}
	return ""
}

func (a *Agent) readToken(_ context.Context, m *v1.VMMigration) ([]byte, error) {
	return a.openToken(m)
}

// ---- target half ----

func (a *Agent) reconcileTarget(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	uid := string(m.UID)
	r := a.lookup(uid)
	half := m.Status.Target
	if half != nil && half.Host != a.cfg.Host {
		half = nil
	}
	stop := stopping(m)
	if r == nil {
		if m.Status.Phase.IsFinal() {
			return reconcile.Result{}, nil
		}
		if stop != "" || m.Status.Phase != v1.MigrationPreparingTarget && half == nil {
			if half != nil && !half.Failed && !half.Completed {
				return reconcile.Result{}, a.writeTarget(ctx, m, v1.TargetState{Host: a.cfg.Host, AgentID: a.id, Failed: true,
					Message: "nothing to clean up on the target: " + stop})
			}
			return reconcile.Result{}, nil
		}
		if half != nil && half.Completed && !half.Failed {
			// Every page arrived and was verified (before a restart of this
			// agent, if the agent ID differs): that stays true, and the
			// source may be waiting for it to release its paused copy.
			if half.AgentID == a.id {
				return reconcile.Result{}, nil
			}
			h := *half
			h.AgentID = a.id
			a.log.Info("Keeping a completed incoming migration of this agent's previous process", "migration", klogKey(m), "previousAgent", half.AgentID)
			return reconcile.Result{}, a.writeTarget(ctx, m, h)
		}
		if half != nil && half.AgentID == a.id && half.Failed {
			// This process ended the half (a settled restart says
			// discarded): it is the target's verdict, which the source
			// waits for; preparing again would erase it.
			return reconcile.Result{}, nil
		}
		if half != nil && half.AgentID != a.id && a.usesXL() && !half.Failed && (half.Prepared || half.Resumed) {
			// xl, not this process, creates and starts the domain here:
			// what runs now is the verdict.
			return a.adoptXLTarget(ctx, m, half)
		}
		if half != nil && half.AgentID != a.id && half.Resumed && !half.Failed {
			return reconcile.Result{}, a.adoptResumedTarget(ctx, m, half)
		}
		if half != nil && half.AgentID != a.id {
			started := m.Status.Source != nil && m.Status.Source.StartTime != nil
			if half.Resumed || half.Prepared || started {
				msg := "the target agent restarted during the transfer and lost the incoming domain; the domain keeps running on the source"
				if half.Resumed {
					msg = "the target agent restarted after the domain resumed here; the domain's state on this host is lost"
				}
				a.log.Info("Failing a migration this agent's previous process was receiving", "migration", klogKey(m), "previousAgent", half.AgentID)
				return reconcile.Result{}, a.writeTarget(ctx, m, v1.TargetState{Host: a.cfg.Host, AgentID: a.id, Failed: true, Message: msg})
			}
			// Prepared by a previous process but not used yet: prepare again.
			a.log.Info("Picking up a migration prepared by this agent's previous process", "migration", klogKey(m), "previousAgent", half.AgentID)
		}
		tok, err := a.readToken(ctx, m)
		if err != nil {
			return reconcile.Result{}, err
		}
		r = &run{key: client.ObjectKeyFromObject(m), uid: uid, role: roleTarget, token: tok}
		a.addRun(r)
		a.log.Info("Prepared to receive a migration", "migration", klogKey(m), "domain", m.Spec.Domain, "from", m.Status.SourceHost)
		r.mu.Lock()
		st := a.targetHalf(r)
		r.mu.Unlock()
		return reconcile.Result{}, a.writeTarget(ctx, m, st)
	}

	r.mu.Lock()
	if stop != "" && !r.resumed {
		r.aborted = true
		if !r.prepared && !r.failed {
			// No data arrived: nothing was created here.
			r.failed, r.message, r.changed = true, "stopped before any data arrived: "+stop, true
		}
	}
	terminal := r.failed || r.done || (r.aborted && !r.prepared)
	r.mu.Unlock()
	res, err := a.flushTarget(ctx, m, r)
	if err == nil && m.Status.Phase.IsFinal() && terminal {
		a.dropRun(uid)
	}
	return res, err
}

func (a *Agent) targetHalf(r *run) v1.TargetState {
	now := metav1.Now()
	st := v1.TargetState{
		Host: a.cfg.Host, AgentID: a.id, Address: a.DataAddress(),
		Ready: !r.aborted && !r.failed, Prepared: r.prepared, Resumed: r.resumed,
		Completed: r.done, Failed: r.failed, Discarded: r.discarded, Message: r.message, LastUpdateTime: &now,
	}
	if r.resumed {
		st.ResumeTime = &metav1.Time{Time: r.resumeTime}
	}
	return st
}

// flushTarget writes the target half when it changed; phase-like changes
// (prepared, resumed, done, failed) are written at once.
func (a *Agent) flushTarget(ctx context.Context, m *v1.VMMigration, r *run) (reconcile.Result, error) {
	r.mu.Lock()
	if !r.changed {
		r.mu.Unlock()
		return reconcile.Result{}, nil
	}
	st := a.targetHalf(r)
	r.changed = false
	r.mu.Unlock()
	if err := a.writeTarget(ctx, m, st); err != nil {
		r.mu.Lock()
		r.changed = true
		r.mu.Unlock()
		return reconcile.Result{}, err
	}
	return reconcile.Result{}, nil
}

// ---- source half ----

func (a *Agent) reconcileSource(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	uid := string(m.UID)
	r := a.lookup(uid)
	half := m.Status.Source
	if half != nil && half.Host != a.cfg.Host {
		half = nil
	}
	stop := stopping(m)
	if r == nil {
		rec, err := readInflight(a.stateDir(), uid)
		if err != nil {
			a.log.Error(err, "Ignored this migration's persisted state", "migration", klogKey(m))
			rec = nil
		}
		unresolved := rec != nil && rec.Role == roleSourceName && rec.Committed && rec.Phase != phaseReleased && rec.Phase != phaseReclaimed
		if unresolved || half != nil && half.Committed && half.AgentID != a.id && !half.Failed && !half.Completed {
			// A previous process of this agent committed the domain: resolve
			// from facts, even if the migration is final by now.
			return a.adoptCommitted(ctx, m, half, rec)
		}
		if m.Status.Phase.IsFinal() {
			if rec != nil {
				if rec.Role == roleSourceName && !rec.Committed {
					// The previous process died after pausing the domain for a
					// switch-over it never committed (it persists the commit
					// before go), and the migration ended before this process
					// came up. The target never got go, so the domain runs
					// nowhere else: nobody but this agent will resume it.
					if err := a.resumeAbandoned(ctx, rec.Domain); err != nil {
						return reconcile.Result{}, fmt.Errorf("migration %s ended while the previous agent process held domain %s paused before go: %w", klogKey(m), rec.Domain, err)
					}
				}
				a.forgetState(uid)
			}
			return reconcile.Result{}, nil
		}
		if half != nil && half.StartTime != nil && half.AgentID != a.id && !half.Failed && !half.Completed {
			// A previous process of this agent was sending: that stream is
			// gone, and it never sent go (it persists that before go).
			a.log.Info("Failing a migration this agent's previous process was sending", "migration", klogKey(m), "previousAgent", half.AgentID)
			h := *half
			h.AgentID, h.Failed = a.id, true
			h.Message = "the source agent restarted during the transfer; the stream was lost and the domain keeps running on the source"
			if rec != nil {
				if err := a.resumeAbandoned(ctx, rec.Domain); err != nil {
					h.Message = "the source agent restarted during the transfer, before go; resuming the domain here failed: " + err.Error()
				}
			} else {
				h.Message += " (no persisted state: if the domain is paused here, check that the target does not run it before resuming it)"
			}
			if err := a.writeSource(ctx, m, h); err != nil {
				return reconcile.Result{}, err
			}
			a.forgetState(uid)
			return reconcile.Result{}, nil
		}
		if stop != "" || half != nil {
			return reconcile.Result{}, nil
		}
		tgt := m.Status.Target
		if m.Status.Phase != v1.MigrationTargetReady || tgt == nil || tgt.Host != m.Status.TargetHost || !tgt.Ready || tgt.Address == "" {
			return reconcile.Result{}, nil // the controller has not confirmed a ready target yet
		}
		return a.startSource(ctx, m)
	}

	r.mu.Lock()
	past := r.pastNoReturn() || (m.Status.Target != nil && m.Status.Target.Resumed)
	if stop != "" && !past && !r.finished && !r.aborted {
		r.aborted = true
		a.log.Info("Aborting an outgoing migration", "migration", klogKey(m), "why", stop)
		r.cancel()
	}
	r.mu.Unlock()
	a.resolveCommitted(m, r)
	r.mu.Lock()
	held := r.dom != nil
	finished := r.finished && !held
	r.mu.Unlock()
	res, err := a.flushSource(ctx, m, r)
	if err == nil && finished && m.Status.Phase.IsFinal() {
		a.dropRun(uid)
		a.forgetState(uid)
	}
	if held && res.RequeueAfter == 0 {
		// The target's half changing wakes this up; look again anyway.
		res.RequeueAfter = 5 * a.cfg.StatusInterval
	}
	return res, err
}

// pastNoReturn reports whether the source half is past the point of no
// return: the engine committed the domain (go sent), whatever its phase
// (StopAndCopy included), or the domain already runs at the target.
// Callers hold r.mu.
func (r *run) pastNoReturn() bool {
	return r.committed || r.resumed || r.phase == engine.PhasePostCopy || r.phase == engine.PhaseDone || r.phase == engine.PhaseRecovering
}

// resolveCommitted ends the wait of a transfer that failed after go, on
// an explicit verdict in the target's half only: discarded (the target
// destroyed its copy) resumes the domain here; completed (every page
// verified there), or resumed after a verified stop-and-copy, releases it.
// Anything else keeps the domain paused here.
func (a *Agent) resolveCommitted(m *v1.VMMigration, r *run) {
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
			a.log.Error(err, "Could not resume the domain the target discarded; it stays paused here", "migration", r.key, "domain", name)
			r.message = fmt.Sprintf("the target discarded the domain but resuming it here failed (%v); it stays paused on %s", err, a.cfg.Host)
			r.changed = true
			return
		}
		_ = r.dom.Close()
		r.dom = nil
		r.failed, r.changed = true, true
		r.message = fmt.Sprintf("the target %s discarded the domain after it had resumed it (%s); the domain runs on the source %s again", dst.Host, dst.Message, a.cfg.Host)
		a.log.Info("Target discarded the domain; resumed it here", "migration", r.key, "domain", name)
	case dst != nil && (dst.Completed || dst.Resumed && r.verifiedBeforeGo):
		if err := r.dom.Release(); err != nil {
			a.log.Error(err, "Could not release the domain that runs on the target", "migration", r.key, "domain", name)
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
		a.log.Info("Target runs the domain with verified memory; released it here", "migration", r.key, "domain", name)
	default:
		if !r.awaitLogged {
			r.awaitLogged = true
			a.log.Info("Holding the committed domain paused until the target's verdict", "migration", r.key, "domain", name)
		}
		return
	}
	if a.cfg.DurableDir != "" {
		// Either verdict means nobody reads this migration's mirror again.
		postcopy.RemoveMirror(a.cfg.DurableDir, r.uid)
	}
	a.kickPublish()
	a.saveStateLocked(r)
}

// startSource announces the transfer in status.source before starting it,
// and starts only if that write shows no abort: a controller that aborts
// afterwards is then sure to see the announcement.
func (a *Agent) startSource(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	now := time.Now()
	r := &run{key: client.ObjectKeyFromObject(m), uid: string(m.UID), role: roleSource, start: now, phase: engine.PhaseConnecting}
	fail := func(err error) (reconcile.Result, error) {
		a.log.Error(err, "Outgoing migration could not start", "migration", klogKey(m))
		r.mu.Lock()
		r.failed, r.finished, r.message, r.changed = true, true, err.Error(), true
		r.mu.Unlock()
		return a.flushSource(ctx, m, r)
	}
	tok, err := a.readToken(ctx, m)
	if err != nil {
		return reconcile.Result{}, err
	}
	dom := &v1.XenDomain{}
	if err := a.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, dom); err != nil {
		return reconcile.Result{}, fmt.Errorf("get XenDomain %s/%s: %w", m.Namespace, m.Spec.Domain, err)
	}
	r.domain = dom.Spec.DomainName
	a.addRun(r)
	r.mu.Lock()
	st := a.sourceHalf(r)
	r.changed = false
	a.saveStateLocked(r)
	r.mu.Unlock()
	if err := a.writeSource(ctx, m, st); err != nil {
		a.dropRun(r.uid)
		return reconcile.Result{}, err
	}
	if why := stopping(m); why != "" {
		r.mu.Lock()
		r.failed, r.finished, r.message, r.changed = true, true, "not started: "+why, true
		r.mu.Unlock()
		return a.flushSource(ctx, m, r)
	}
	p := m.Status.Parameters
	if p == nil {
		return fail(fmt.Errorf("VMMigration %s/%s has no resolved parameters", m.Namespace, m.Name))
	}
	if a.usesXL() {
		return a.startSourceXL(ctx, m, r, dom.Spec.DomainName, tok)
	}
	sd, err := a.host.OpenSource(ctx, dom.Spec.DomainName)
	if err != nil {
		return fail(fmt.Errorf("open domain %s on %s: %w", dom.Spec.DomainName, a.cfg.Host, err))
	}
	sd = failpointSource(sd) // hack/faults: named hold points; a no-op unless XENFERRY_FAILPOINTS* is set
	opts := engine.Options{
		Strategy:          engine.Strategy(p.EngineStrategy),
		LinkBytesPerSec:   p.BandwidthBytesPerSecond,
		MaxDowntime:       p.MaxDowntime.Duration,
		CompletionTimeout: p.SwitchToPostCopyAfter.Duration,
		MigrationID:       string(m.UID),
		Token:             tok,
		DurableDir:        a.cfg.DurableDir,
		RecoveryTimeout:   a.cfg.RecoveryTimeout,
		Dial:              a.dialer(m.Status.TargetHost),
	}
	hooks := engine.Hooks{Log: a.log.WithName("source").WithValues("migration", klogKey(m))}
	if hasDedup(opts.Strategy) {
		cat, err := a.catalog(ctx, sd.Info().Disks)
		if err != nil {
			a.log.Error(err, "Dedup disabled for this migration: disk index unavailable", "migration", klogKey(m))
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
			a.wakeUp(r)
		}
	}
	hooks.Committed = func() {
		r.mu.Lock()
		r.committed, r.changed = true, true
		a.saveStateLocked(r)
		r.mu.Unlock()
		a.wakeUp(r)
	}
	rctx, cancel := context.WithCancel(a.baseCtx())
	r.mu.Lock()
	r.cancel = cancel
	r.mu.Unlock()
	addr := m.Status.Target.Address
	a.log.Info("Starting outgoing migration", "migration", klogKey(m), "domain", dom.Spec.DomainName, "to", m.Status.TargetHost, "addr", addr, "strategy", opts.Strategy)
	a.transfers.Add(1)
	go func() {
		defer a.transfers.Done()
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
		a.saveStateLocked(r)
		r.mu.Unlock()
		switch {
		case err == nil:
			a.log.Info("Outgoing migration done", "migration", r.key, "total", res.Total, "downtime", res.Downtime, "wireBytes", res.WireBytes)
			a.recordLinkRate(res.WireBytes, res.Total)
		case hold:
			a.log.Error(err, "Outgoing migration failed after go; holding the domain paused for the target's verdict", "migration", r.key)
		default:
			a.log.Error(err, "Outgoing migration failed", "migration", r.key)
		}
		a.kickPublish()
		a.wakeUp(r)
	}()
	return reconcile.Result{RequeueAfter: a.cfg.StatusInterval}, nil
}

func hasDedup(s engine.Strategy) bool {
	return s == engine.StrategyPreCopyDedup || s == engine.StrategyHybridDedup
}

// catalog returns the dedup catalog of a domain's disks from the agent's
// index cache (built ahead of need by the indexer, else now).
func (a *Agent) catalog(ctx context.Context, disks []xenmem.Disk) (*dedup.Catalog, error) {
	if len(disks) == 0 {
		return nil, fmt.Errorf("the domain has no disk to deduplicate against")
	}
	return a.indexes.catalog(ctx, disks, telemetry.indexProgress)
}

func (a *Agent) sourceHalf(r *run) v1.SourceState {
	now := metav1.Now()
	st := v1.SourceState{
		Host: a.cfg.Host, AgentID: a.id, Phase: string(r.phase),
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
func (a *Agent) flushSource(ctx context.Context, m *v1.VMMigration, r *run) (reconcile.Result, error) {
	r.mu.Lock()
	next := reconcile.Result{}
	if !r.finished {
		next.RequeueAfter = a.cfg.StatusInterval
	}
	if !r.changed {
		r.mu.Unlock()
		return next, nil
	}
	urgent := string(r.phase) != r.lastPhase || r.finished
	if wait := a.cfg.StatusInterval - time.Since(r.lastWrite); !urgent && wait > 0 {
		r.mu.Unlock()
		return reconcile.Result{RequeueAfter: wait}, nil
	}
	st := a.sourceHalf(r)
	r.changed, r.lastWrite, r.lastPhase = false, time.Now(), string(r.phase)
	r.mu.Unlock()
	if err := a.writeSource(ctx, m, st); err != nil {
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

// ---- status writes: each agent replaces only its own half ----

type jsonPatchOp struct {
	Op    string `json:"op"`
	Path  string `json:"path"`
	Value any    `json:"value"`
}

func (a *Agent) writeHalf(ctx context.Context, m *v1.VMMigration, path string, half any) error {
	body, err := json.Marshal([]jsonPatchOp{{Op: "add", Path: path, Value: half}})
	if err != nil {
		return fmt.Errorf("encode %s of VMMigration %s/%s: %w", path, m.Namespace, m.Name, err)
	}
	// JSON patch "add" replaces the whole half (a merge patch could not
	// clear fields) and leaves the controller's fields and the other half alone.
	if err := a.c.Status().Patch(ctx, m, client.RawPatch(types.JSONPatchType, body)); err != nil {
		return fmt.Errorf("write %s of VMMigration %s/%s: %w", path, m.Namespace, m.Name, err)
	}
	return nil
}

func (a *Agent) writeSource(ctx context.Context, m *v1.VMMigration, st v1.SourceState) error {
	return a.writeHalf(ctx, m, "/status/source", st)
}

func (a *Agent) writeTarget(ctx context.Context, m *v1.VMMigration, st v1.TargetState) error {
	return a.writeHalf(ctx, m, "/status/target", st)
}

func klogKey(m *v1.VMMigration) string { return m.Namespace + "/" + m.Name }

// adoptCommitted takes over a source half whose domain a previous process
// of this agent committed to the target, from facts: the domain's state on
// this host and the target's half. A paused domain is held (a handle that
// never resumes it) until the target's verdict; an absent one was released
// or lost; a running one is reported, never touched.
func (a *Agent) adoptCommitted(ctx context.Context, m *v1.VMMigration, half *v1.SourceState, rec *inflight) (reconcile.Result, error) {
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
		if err := a.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, dom); err != nil {
			return reconcile.Result{}, fmt.Errorf("adopt committed migration %s: get XenDomain %s/%s: %w", klogKey(m), m.Namespace, m.Spec.Domain, err)
		}
		r.domain = dom.Spec.DomainName
	}
	doms, err := a.host.Domains(ctx)
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
			r.message = fmt.Sprintf("the source agent restarted after go; the domain is no longer on %s and runs on the target %s", a.cfg.Host, dst.Host)
		} else {
			r.failed = true
			r.message = fmt.Sprintf("the source agent restarted after go and the domain %s is no longer on %s, while the target does not report running it: check the target", r.domain, a.cfg.Host)
		}
	case info.State == xenmem.StateRunning:
		r.failed = true
		r.message = fmt.Sprintf("the source agent restarted after go and finds the domain %s running on %s: it was resumed outside xenferry; check that the target does not run it too", r.domain, a.cfg.Host)
	case a.usesXL():
		// xl left it suspended as NAME--migratedaway: hold it for the
		// target's verdict, as the process that ran xl would have.
		r.dom = &xlHeld{a: a, name: r.domain}
		r.message = "the source agent restarted after xl's permission to go; the domain is held suspended here until the target's verdict"
	default:
		sd, err := a.host.OpenSource(ctx, r.domain)
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
		if dst != nil && dst.Resumed && !dst.Completed && !dst.Discarded && !r.verifiedBeforeGo && a.cfg.DurableDir != "" {
			// The target runs the domain in post-copy and waits for a source
			// that will not reconnect (the stream died with the previous
			// process), then finishes from the durable mirror, which the
			// previous process may not have completed.
			go a.rewriteMirror(r, sd)
		}
	}
	a.log.Info("Adopted a migration this agent's previous process had committed", "migration", klogKey(m), "domain", r.domain,
		"held", r.dom != nil, "done", r.done, "failed", r.failed)
	a.addRun(r)
	r.mu.Lock()
	a.saveStateLocked(r)
	r.mu.Unlock()
	a.resolveCommitted(m, r)
	res, err := a.flushSource(ctx, m, r)
	r.mu.Lock()
	settled := r.dom == nil
	r.mu.Unlock()
	if err == nil && settled && m.Status.Phase.IsFinal() {
		a.dropRun(r.uid)
		a.forgetState(r.uid)
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
func (a *Agent) rewriteMirror(r *run, sd xenmem.SourceDomain) {
	_, _, done := postcopy.MirrorPaths(a.cfg.DurableDir, r.uid)
	if _, err := os.Stat(done); err == nil {
		return
	}
	const chunk = 64
	n := sd.NumPages()
	err := func() error {
		m, err := postcopy.CreateMirror(a.cfg.DurableDir, r.uid, n)
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
		a.log.Error(err, "Could not rewrite the durable post-copy mirror of an adopted committed domain", "migration", r.key, "dir", a.cfg.DurableDir)
		return
	}
	a.log.Info("Rewrote the durable post-copy mirror from the adopted paused domain: the target can finish from it", "migration", r.key, "pages", n)
}

// resumeAbandoned resumes a domain that a previous process of this agent
// paused for a switch-over it never committed (no go left): absent or
// running domains are left alone.
func (a *Agent) resumeAbandoned(ctx context.Context, name string) error {
	if name == "" {
		return nil
	}
	doms, err := a.host.Domains(ctx)
	if err != nil {
		return fmt.Errorf("list domains: %w", err)
	}
	for _, d := range doms {
		if d.Name != name || d.State != xenmem.StatePaused {
			continue
		}
		sd, err := a.host.OpenSource(ctx, name)
		if err != nil {
			return fmt.Errorf("open domain %s: %w", name, err)
		}
		defer sd.Close()
		if err := sd.Resume(); err != nil {
			return fmt.Errorf("resume domain %s: %w", name, err)
		}
		a.log.Info("Resumed a domain the previous agent process paused before go", "domain", name)
	}
	return nil
}

// closeHeld drops the handles of committed domains still waiting for a
// verdict when the agent stops: the domains stay paused (Close never
// resumes a committed domain) and the next agent process adopts them.
func (a *Agent) closeHeld() {
	a.mu.Lock()
	runs := make([]*run, 0, len(a.runs))
	for _, r := range a.runs {
		runs = append(runs, r)
	}
	a.mu.Unlock()
	for _, r := range runs {
		r.mu.Lock()
		held := r.dom
		r.dom = nil
		r.mu.Unlock()
		if held != nil {
			_ = held.Close()
			a.log.Info("Agent stopping; the committed domain stays paused for the next agent process", "migration", r.key, "domain", held.Info().Name)
		}
	}
}

// adoptResumedTarget settles the target half of a migration whose domain
// resumed here under a previous process of this agent, from facts: the
// domain on this host, and whether its memory was complete when it resumed
// (a stop-and-copy verifies every page before go). A complete domain that
// runs here is the migration's result: the half says completed, and the
// source releases its paused copy. A post-copy domain lost its page server
// with the old process and can never complete: it is destroyed, and the
// half says discarded, so the source resumes its copy. An absent domain
// never runs here again: discarded too.
func (a *Agent) adoptResumedTarget(ctx context.Context, m *v1.VMMigration, half *v1.TargetState) error {
	xd := &v1.XenDomain{}
	if err := a.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, xd); err != nil {
		return fmt.Errorf("settle the resumed half of %s: get XenDomain %s/%s: %w", klogKey(m), m.Namespace, m.Spec.Domain, err)
	}
	name := xd.Spec.DomainName
	doms, err := a.host.Domains(ctx)
	if err != nil {
		return fmt.Errorf("settle the resumed half of %s: list domains: %w", klogKey(m), err)
	}
	var info *xenmem.DomainInfo
	for i := range doms {
		if doms[i].Name == name {
			info = &doms[i]
		}
	}
	src := m.Status.Source
	// Complete: a stop-and-copy verified every page before go, or this
	// host recorded, before it sent "done", that a post-copy verified
	// every page (the source may have released its copy since).
	complete := src != nil && src.Host == m.Status.SourceHost && src.Phase == string(engine.PhaseStopAndCopy)
	if rec, err := readInflight(a.stateDir(), string(m.UID)); err == nil && rec != nil && rec.Role == roleTargetName && rec.Phase == phaseVerified {
		complete = true
	}
	now := metav1.Now()
	st := v1.TargetState{Host: a.cfg.Host, AgentID: a.id, Address: half.Address, Prepared: half.Prepared, Resumed: true,
		ResumeTime: half.ResumeTime, LastUpdateTime: &now}
	switch {
	case info != nil && complete && info.State != xenmem.StateShutdown:
		st.Completed = true
		st.Message = "the target agent restarted; the domain runs here with the memory verified before it resumed"
	case info != nil:
		sd, err := a.host.OpenSource(ctx, name)
		if err != nil {
			return fmt.Errorf("settle the resumed half of %s: open the incomplete domain %s: %w", klogKey(m), name, err)
		}
		err = sd.Release()
		_ = sd.Close()
		if err != nil {
			return fmt.Errorf("settle the resumed half of %s: destroy the incomplete domain %s: %w", klogKey(m), name, err)
		}
		st.Failed, st.Discarded = true, true
		st.Message = "the target agent restarted during post-copy; the domain here could never get its missing pages and was destroyed: the source may resume its copy"
	default:
		st.Failed, st.Discarded = true, true
		st.Message = "the target agent restarted after the domain resumed here, and the domain is gone from this host: the source may resume its copy"
	}
	a.log.Info("Settled the resumed half of this agent's previous process from facts", "migration", klogKey(m), "domain", name,
		"present", info != nil, "complete", complete, "completed", st.Completed, "discarded", st.Discarded)
	return a.writeTarget(ctx, m, st)
}
