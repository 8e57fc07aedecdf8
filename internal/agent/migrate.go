package agent

import (
	"context"
	"encoding/json"
	"fmt"
	"sync"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
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
	// postCopy: the target's figures of an early resume (demand pages,
	// fault latency), set at its end.
	postCopy *v1.PostCopyStats
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
		return a.target.reconcile(ctx, mig)
	case mig.Status.SourceHost:
		return a.source.reconcile(ctx, mig)
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

// pastNoReturn reports whether the source half is past the point of no
// return: the engine committed the domain (go sent), whatever its phase
// (StopAndCopy included), or the domain already runs at the target.
// Callers hold r.mu.
func (r *run) pastNoReturn() bool {
	return r.committed || r.resumed || r.phase == engine.PhasePostCopy || r.phase == engine.PhaseDone || r.phase == engine.PhaseRecovering
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

func klogKey(m *v1.VMMigration) string { return m.Namespace + "/" + m.Name }
