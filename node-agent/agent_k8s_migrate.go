package main

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
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

	// mu protects the fields below.
	mu sync.Mutex
	// target side
	token                   []byte
	prepared, resumed, done bool
	failed, aborted         bool
	resumeTime              time.Time
	message                 string
	// source side
	cancel   context.CancelFunc
	start    time.Time
	phase    engine.Phase
	progress engine.Progress
	result   *engine.Result
	finished bool
	// changed is set when the half differs from what was last written.
	changed   bool
	lastWrite time.Time
	// lastPhase is the phase last written, so a phase change is written at once.
	lastPhase string
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
	a.mu.Lock()
	defer a.mu.Unlock()
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
		past := r.resumed || r.phase == engine.PhasePostCopy || r.phase == engine.PhaseDone || r.phase == engine.PhaseRecovering
		r.aborted = true
		if r.cancel != nil && !past && !r.finished {
			r.cancel()
		}
		finished := r.finished || r.role == roleTarget
		r.mu.Unlock()
		if finished {
			a.dropRun(r.uid)
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

func (a *Agent) readToken(ctx context.Context, m *v1.VMMigration) ([]byte, error) {
	if m.Status.TokenSecret == "" {
		return nil, fmt.Errorf("VMMigration %s/%s names no token Secret", m.Namespace, m.Name)
	}
	sec := &corev1.Secret{}
	// Uncached: the agent does not watch Secrets cluster-wide.
	if err := a.api.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Status.TokenSecret}, sec); err != nil {
		return nil, fmt.Errorf("read token Secret %s/%s: %w", m.Namespace, m.Status.TokenSecret, err)
	}
	tok := sec.Data[v1.TokenKey]
	if len(tok) < 16 {
		return nil, fmt.Errorf("token Secret %s/%s: key %q is missing or shorter than 16 bytes", m.Namespace, m.Status.TokenSecret, v1.TokenKey)
	}
	return tok, nil
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
		Completed: r.done, Failed: r.failed, Message: r.message, LastUpdateTime: &now,
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
		if m.Status.Phase.IsFinal() {
			return reconcile.Result{}, nil
		}
		if half != nil && half.StartTime != nil && half.AgentID != a.id && !half.Failed && !half.Completed {
			// A previous process of this agent was sending: that stream is gone.
			a.log.Info("Failing a migration this agent's previous process was sending", "migration", klogKey(m), "previousAgent", half.AgentID)
			h := *half
			h.AgentID, h.Failed = a.id, true
			h.Message = "the source agent restarted during the transfer; the stream was lost and the domain keeps running on the source"
			return reconcile.Result{}, a.writeSource(ctx, m, h)
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
	past := r.phase == engine.PhasePostCopy || r.phase == engine.PhaseDone || r.phase == engine.PhaseRecovering ||
		(m.Status.Target != nil && m.Status.Target.Resumed)
	if stop != "" && !past && !r.finished && !r.aborted {
		r.aborted = true
		a.log.Info("Aborting an outgoing migration", "migration", klogKey(m), "why", stop)
		r.cancel()
	}
	finished := r.finished
	r.mu.Unlock()
	res, err := a.flushSource(ctx, m, r)
	if err == nil && finished && m.Status.Phase.IsFinal() {
		a.dropRun(uid)
	}
	return res, err
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
	a.addRun(r)
	r.mu.Lock()
	st := a.sourceHalf(r)
	r.changed = false
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
		r.mu.Lock()
		phaseChanged := pr.Phase != r.phase
		r.progress, r.phase, r.changed = pr, pr.Phase, true
		r.mu.Unlock()
		if phaseChanged {
			a.wakeUp(r)
		}
	}
	rctx, cancel := context.WithCancel(a.baseCtx())
	r.mu.Lock()
	r.cancel = cancel
	r.mu.Unlock()
	addr := m.Status.Target.Address
	a.log.Info("Starting outgoing migration", "migration", klogKey(m), "domain", dom.Spec.DomainName, "to", m.Status.TargetHost, "addr", addr, "strategy", opts.Strategy)
	go func() {
		defer cancel()
		res, err := engine.Migrate(rctx, sd, addr, opts, hooks)
		_ = sd.Close()
		r.mu.Lock()
		r.finished, r.changed = true, true
		if err != nil {
			r.failed, r.message = true, err.Error()
		} else {
			r.done, r.result, r.phase = true, &res, engine.PhaseDone
		}
		r.mu.Unlock()
		if err != nil {
			a.log.Error(err, "Outgoing migration failed", "migration", r.key)
		} else {
			a.log.Info("Outgoing migration done", "migration", r.key, "total", res.Total, "downtime", res.Downtime, "wireBytes", res.WireBytes)
		}
		a.kickPublish()
		a.wakeUp(r)
	}()
	return reconcile.Result{RequeueAfter: a.cfg.StatusInterval}, nil
}

func hasDedup(s engine.Strategy) bool {
	return s == engine.StrategyPreCopyDedup || s == engine.StrategyHybridDedup
}

// catalog opens (and caches) the dedup indexes of a domain's disks.
func (a *Agent) catalog(ctx context.Context, disks []xenmem.Disk) (*dedup.Catalog, error) {
	var ixs []*dedup.Index
	for _, d := range disks {
		a.mu.Lock()
		ix := a.indexes[d.Path]
		a.mu.Unlock()
		if ix == nil {
			var err error
			ix, err = dedup.Open(ctx, d.Path, dedup.Options{StateDir: a.cfg.StateDir, Log: a.log.WithName("dedup")})
			if err != nil {
				return nil, fmt.Errorf("index disk %s: %w", d.Path, err)
			}
			a.mu.Lock()
			if old := a.indexes[d.Path]; old != nil {
				ix.Close()
				ix = old
			} else {
				a.indexes[d.Path] = ix
			}
			a.mu.Unlock()
		} else if err := ix.Refresh(ctx); err != nil {
			return nil, fmt.Errorf("refresh index of disk %s: %w", d.Path, err)
		}
		ixs = append(ixs, ix)
	}
	if len(ixs) == 0 {
		return nil, fmt.Errorf("the domain has no disk to deduplicate against")
	}
	return dedup.NewCatalog(ixs...), nil
}

func (a *Agent) sourceHalf(r *run) v1.SourceState {
	now := metav1.Now()
	st := v1.SourceState{
		Host: a.cfg.Host, AgentID: a.id, Phase: string(r.phase),
		StartTime: &metav1.Time{Time: r.start}, Completed: r.done, Failed: r.failed,
		Message: r.message, LastUpdateTime: &now,
	}
	if r.progress.Phase != "" || r.progress.WireBytes > 0 {
		p := progressOf(r.progress)
		st.Progress = &p
	}
	if r.result != nil {
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
