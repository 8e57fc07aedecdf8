// Package controllers holds xenferry's cluster-wide controller: the
// VMMigrationReconciler validates migrations, chooses targets, enforces
// concurrency limits and timeouts, and summarises the facts the node agents
// report into phase and conditions. It never touches the data path.
package controllers

import (
	"context"
	"crypto/rand"
	"fmt"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	kerrors "k8s.io/apimachinery/pkg/util/errors"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/pki"
)

// VMMigrationReconciler drives VMMigrations. Run it with one worker: the
// concurrency limits are decided on a fresh list from the API server, one
// migration at a time.
type VMMigrationReconciler struct {
	Client ctrl.Client
	// APIReader reads around the cache, for slot decisions.
	APIReader ctrl.Reader
	Recorder  events.EventRecorder
	// Clock can be faked in tests.
	Clock    clock.PassiveClock
	Limits   Limits
	Defaults Defaults
	// HeartbeatTimeout after which an agent whose XenHost heartbeat has not
	// moved counts as gone.
	HeartbeatTimeout time.Duration
	// AbortGrace bounds the wait for agents to confirm an abort or a deletion;
	// after it the controller decides alone, so a finalizer never hangs.
	AbortGrace time.Duration
	Metrics    *Metrics
	// PKI holds the hosts' certified keys that tokens are sealed to;
	// without it no migration gets past scheduling.
	PKI *PKIReconciler
}

// scope is everything one reconcile reads about one migration.
type scope struct {
	mig *v1.VMMigration
	now time.Time
	// src and dst are the XenHosts of status.sourceHost/targetHost; set by
	// loadHosts in the phases after scheduling (nil when absent).
	src, dst *v1.XenHost
	// requeue is the earliest time this migration needs another look.
	requeue time.Duration
}

func (s *scope) requeueAfter(d time.Duration) {
	if d <= 0 {
		d = 100 * time.Millisecond
	}
	if s.requeue == 0 || d < s.requeue {
		s.requeue = d
	}
}

// The RBAC markers are in rbac.go.

// Reconcile moves one VMMigration forward on the facts it finds.
func (r *VMMigrationReconciler) Reconcile(ctx context.Context, req reconcile.Request) (res reconcile.Result, reterr error) {
	mig := &v1.VMMigration{}
	if err := r.Client.Get(ctx, req.NamespacedName, mig); err != nil {
		return reconcile.Result{}, ctrl.IgnoreNotFound(err)
	}
	if r.Metrics != nil {
		r.Metrics.Reconciles.Inc()
	}
	// Add the finalizer first, so that a deletion always finds it.
	if mig.DeletionTimestamp.IsZero() && !controllerutil.ContainsFinalizer(mig, v1.Finalizer) {
		patch := ctrl.MergeFromWithOptions(mig.DeepCopy(), ctrl.MergeFromWithOptimisticLock{})
		controllerutil.AddFinalizer(mig, v1.Finalizer)
		if err := r.Client.Patch(ctx, mig, patch); err != nil {
			return reconcile.Result{}, fmt.Errorf("add finalizer to VMMigration %s: %w", klog.KObj(mig), err)
		}
		return reconcile.Result{}, nil
	}

	orig := mig.DeepCopy()
	s := &scope{mig: mig, now: r.Clock.Now()}
	defer func() {
		if reterr == nil {
			mig.Status.ObservedGeneration = mig.Generation
		}
		if !equality.Semantic.DeepEqual(orig.Status, mig.Status) {
			// A merge patch of the fields this controller changed: the
			// agents' halves (status.source, status.target) are never sent.
			if err := r.Client.Status().Patch(ctx, mig, ctrl.MergeFrom(orig)); err != nil && !apierrors.IsNotFound(err) {
				reterr = kerrors.NewAggregate([]error{reterr, fmt.Errorf("patch status of VMMigration %s: %w", klog.KObj(mig), err)})
				return
			}
			if !orig.Status.Phase.IsFinal() && mig.Status.Phase.IsFinal() && r.Metrics != nil {
				r.Metrics.observeFinal(mig)
			}
		}
		if reterr == nil && s.requeue > 0 {
			res.RequeueAfter = s.requeue
		}
	}()

	if !mig.DeletionTimestamp.IsZero() {
		return reconcile.Result{}, r.reconcileDelete(ctx, s)
	}
	if mig.Status.Phase.IsFinal() {
		r.correctDomainHost(s)
		return reconcile.Result{}, r.deleteToken(ctx, mig)
	}
	return reconcile.Result{}, r.reconcileActive(ctx, s)
}

// reconcileActive handles a migration that is neither final nor deleted.
func (r *VMMigrationReconciler) reconcileActive(ctx context.Context, s *scope) error {
	m := s.mig
	if m.Status.Phase == "" {
		m.Status.StartTime = &metav1.Time{Time: s.now}
		r.setPhase(s, v1.MigrationPending)
		setCondition(m, v1.CompletedCondition, metav1.ConditionFalse, v1.ReasonInProgress, "The migration has not finished")
	}
	switch m.Status.Phase {
	case v1.MigrationPending, v1.MigrationScheduling:
		if m.Spec.Cancel {
			// No agent is involved yet: nothing to undo.
			r.finish(s, v1.MigrationCancelled, v1.ReasonCancelled, "Cancelled before a target was prepared; the domain did not move", "")
			return nil
		}
		return r.reconcileSchedule(ctx, s)
	}
	if err := r.loadHosts(ctx, s); err != nil {
		return err
	}
	r.observe(s)
	return nil
}

// loadHosts reads the source and target XenHosts into the scope.
func (r *VMMigrationReconciler) loadHosts(ctx context.Context, s *scope) error {
	get := func(name string) (*v1.XenHost, error) {
		if name == "" {
			return nil, nil
		}
		h := &v1.XenHost{}
		if err := r.Client.Get(ctx, types.NamespacedName{Name: name}, h); err != nil {
			if apierrors.IsNotFound(err) {
				return nil, nil
			}
			return nil, fmt.Errorf("get XenHost %s: %w", name, err)
		}
		return h, nil
	}
	var err error
	if s.src, err = get(s.mig.Status.SourceHost); err != nil {
		return err
	}
	s.dst, err = get(s.mig.Status.TargetHost)
	return err
}

// resumed reports whether the target agent said the domain runs there: the
// point of no return.
func resumed(m *v1.VMMigration) bool {
	return m.Status.Target != nil && m.Status.Target.Host == m.Status.TargetHost && m.Status.Target.Resumed
}

func sourceHalf(m *v1.VMMigration) *v1.SourceState {
	if m.Status.Source != nil && m.Status.Source.Host == m.Status.SourceHost {
		return m.Status.Source
	}
	return nil
}

func targetHalf(m *v1.VMMigration) *v1.TargetState {
	if m.Status.Target != nil && m.Status.Target.Host == m.Status.TargetHost {
		return m.Status.Target
	}
	return nil
}

// agentLost says whether host h's agent is gone (no XenHost, stale
// heartbeat) or was replaced by a new process that does not own half.
func (r *VMMigrationReconciler) agentLost(s *scope, h *v1.XenHost, name, halfAgentID string, halfActive bool, halfUpdated *metav1.Time) (bool, string) {
	if h == nil {
		return true, fmt.Sprintf("XenHost %s disappeared", name)
	}
	if !hostFresh(h, s.now, r.HeartbeatTimeout) {
		age := "never"
		if h.Status.HeartbeatTime != nil {
			age = s.now.Sub(h.Status.HeartbeatTime.Time).Round(time.Second).String() + " ago"
		}
		return true, fmt.Sprintf("the agent of %s stopped heartbeating (last heartbeat %s, timeout %s)", name, age, r.HeartbeatTimeout)
	}
	if halfActive && halfAgentID != "" && h.Status.AgentID != "" && h.Status.AgentID != halfAgentID &&
		(halfUpdated == nil || s.now.Sub(halfUpdated.Time) > r.HeartbeatTimeout) {
		// The new agent process fails or picks up the half itself; this
		// is the backstop when it has done neither for a heartbeat timeout.
		return true, fmt.Sprintf("the agent of %s restarted (was %s, now %s) and did not pick the migration up", name, halfAgentID, h.Status.AgentID)
	}
	return false, ""
}

// observe derives phase, progress and the final outcome from the agents'
// halves, and applies cancel, timeouts and lost agents.
func (r *VMMigrationReconciler) observe(s *scope) {
	m := s.mig
	src, dst := sourceHalf(m), targetHalf(m)
	// A target that discarded the domain destroyed its copy after running
	// it: the source's paused copy is the domain again.
	discarded := dst != nil && dst.Discarded
	past := resumed(m) && !discarded
	// held: the source told the target to run the domain and failed
	// without a verdict; it keeps the domain paused, never resumes it by
	// itself, and resolves it only from the target's half.
	held := src != nil && src.Committed && !src.Completed && !src.Failed
	srcDesc := fmt.Sprintf("the domain stays on the source %s", m.Status.SourceHost)
	switch {
	case discarded:
		srcDesc = fmt.Sprintf("the target %s discarded its copy; the domain runs again from its paused copy on the source %s", m.Status.TargetHost, m.Status.SourceHost)
	case past:
		srcDesc = fmt.Sprintf("the domain already runs on the target %s", m.Status.TargetHost)
	case held:
		srcDesc = fmt.Sprintf("the domain is paused on the source %s, committed to the target %s; it waits for the target's verdict "+
			"(node-agent resolve --reclaim on %s once the target is known not to run it)", m.Status.SourceHost, m.Status.TargetHost, m.Status.SourceHost)
	}

	// Conditions that mirror what the agents reported.
	switch {
	case dst != nil && dst.Failed:
		setCondition(m, v1.TargetReadyCondition, metav1.ConditionFalse, v1.ReasonTargetFailed,
			fmt.Sprintf("The agent of %s reported a failure: %s", dst.Host, dst.Message))
	case dst != nil && dst.Address != "" && (dst.Ready || dst.Resumed || dst.Completed):
		setCondition(m, v1.TargetReadyCondition, metav1.ConditionTrue, v1.ReasonReceiverListening,
			fmt.Sprintf("Target %s accepts this migration at %s", dst.Host, dst.Address))
	default:
		setCondition(m, v1.TargetReadyCondition, metav1.ConditionFalse, v1.ReasonWaitingForTargetAgent,
			fmt.Sprintf("Waiting for the agent of %s to prepare the receiver", m.Status.TargetHost))
	}
	if past {
		msg := fmt.Sprintf("The domain runs on %s; the migration can no longer be cancelled", m.Status.TargetHost)
		if !meta.IsStatusConditionTrue(m.Status.Conditions, v1.ResumedOnTargetCondition) {
			r.event(m, corev1.EventTypeNormal, v1.ReasonResumed, "Resume", msg)
		}
		setCondition(m, v1.ResumedOnTargetCondition, metav1.ConditionTrue, v1.ReasonResumed, msg)
	} else {
		setCondition(m, v1.ResumedOnTargetCondition, metav1.ConditionFalse, v1.ReasonNotResumed, "The domain has not run on the target yet")
	}
	r.copyProgress(s, src)

	// 1. Success: the source released the domain after the target resumed it.
	if src != nil && src.Completed && past {
		m.Status.Result = src.Result.DeepCopy()
		m.Status.Actual = actualCost(m.Status.Result)
		setCondition(m, v1.TransferringCondition, metav1.ConditionFalse, v1.ReasonTransferDone, "The source released the domain")
		if m.Status.Progress != nil {
			m.Status.Progress.Percent = 100
			m.Status.ProgressText = progressText(m.Status.Progress)
		}
		r.finish(s, v1.MigrationSucceeded, v1.ReasonSucceeded,
			fmt.Sprintf("Domain %s moved from %s to %s%s%s", m.Spec.Domain, m.Status.SourceHost, m.Status.TargetHost, resultSummary(m.Status.Result),
				predictionText(m.Status.Predicted, m.Status.Actual)),
			m.Status.TargetHost)
		return
	}

	// 2. Failures the agents reported.
	if src != nil && src.Failed && !m.Status.AbortRequested {
		m.Status.AbortRequested = true
		r.finish(s, v1.MigrationFailed, v1.ReasonSourceFailed,
			fmt.Sprintf("The source agent on %s failed: %s; %s", src.Host, src.Message, srcDesc), domainHost(m, past))
		return
	}
	if dst != nil && dst.Failed && !m.Status.AbortRequested && !r.awaitSourceVerdict(s, src, dst, past || held || discarded) {
		m.Status.AbortRequested = true
		r.finish(s, v1.MigrationFailed, v1.ReasonTargetFailed,
			fmt.Sprintf("The target agent on %s failed: %s; %s", dst.Host, dst.Message, srcDesc), domainHost(m, past))
		return
	}

	// 3. Agents that vanished: fail safe, the domain stays where it is known to run.
	srcActive := src != nil && !src.Completed && !src.Failed
	dstActive := dst != nil && !dst.Completed && !dst.Failed
	srcAgentID, dstAgentID := "", ""
	var srcUpdated, dstUpdated *metav1.Time
	if src != nil {
		srcAgentID, srcUpdated = src.AgentID, src.LastUpdateTime
	}
	if dst != nil {
		dstAgentID, dstUpdated = dst.AgentID, dst.LastUpdateTime
	}
	if lost, why := r.agentLost(s, s.src, m.Status.SourceHost, srcAgentID, srcActive, srcUpdated); lost {
		m.Status.AbortRequested = true
		reason := v1.ReasonSourceAgentLost
		if s.src != nil && hostFresh(s.src, s.now, r.HeartbeatTimeout) {
			reason = v1.ReasonAgentRestarted
		}
		r.finish(s, v1.MigrationFailed, reason, fmt.Sprintf("Failed safe: %s; %s", why, srcDesc), domainHost(m, past))
		return
	}
	if lost, why := r.agentLost(s, s.dst, m.Status.TargetHost, dstAgentID, dstActive, dstUpdated); lost {
		m.Status.AbortRequested = true
		reason := v1.ReasonTargetAgentLost
		if s.dst != nil && hostFresh(s.dst, s.now, r.HeartbeatTimeout) {
			reason = v1.ReasonAgentRestarted
		}
		if past {
			why += fmt.Sprintf("; the domain was resumed on %s before, check it there", m.Status.TargetHost)
		}
		r.finish(s, v1.MigrationFailed, reason, fmt.Sprintf("Failed safe: %s; %s", why, srcDesc), domainHost(m, past))
		return
	}

	// 4. Cancel, timeouts, and the wait for agents to confirm an abort.
	if !past && !held {
		if m.Spec.Cancel && !m.Status.AbortRequested {
			r.startAbort(s, v1.ReasonCancelled, "Cancel requested by spec.cancel")
		}
		if by := m.Annotations[v1.PreemptedByAnnotation]; by != "" && preemptible(m) {
			r.startAbort(s, v1.ReasonPreempted, fmt.Sprintf("Preempted before the switch-over: evacuation %s needs this slot; the rebalancing planner may try again later", by))
		}
		if !m.Status.AbortRequested {
			r.checkTimeouts(s, src)
		}
		if m.Status.AbortRequested {
			r.waitAbort(s, src, dst)
			return
		}
	} else if m.Spec.Cancel && !meta.IsStatusConditionTrue(m.Status.Conditions, "CancelIgnored") {
		msg := fmt.Sprintf("Cancel ignored: the domain already runs on %s and its memory is being completed there", m.Status.TargetHost)
		if !past {
			msg = fmt.Sprintf("Cancel ignored: the source %s committed the domain to %s; only the target's verdict resolves it", m.Status.SourceHost, m.Status.TargetHost)
		}
		setCondition(m, "CancelIgnored", metav1.ConditionTrue, v1.ReasonCancelIgnored, msg)
		r.event(m, corev1.EventTypeWarning, v1.ReasonCancelIgnored, "Cancel", msg)
	}

	// 5. Phase from facts, forward only.
	next := m.Status.Phase
	if dst != nil && dst.Ready && dst.Address != "" {
		next = v1.MigrationTargetReady
	}
	if src != nil {
		switch src.Phase {
		case "PreCopy":
			next = v1.MigrationPreCopy
		case "StopAndCopy":
			next = v1.MigrationStopAndCopy
		case "PostCopy", "Recovering":
			next = v1.MigrationPostCopy
		}
	}
	if past && next != v1.MigrationStopAndCopy {
		next = v1.MigrationPostCopy
	}
	if phaseRank(next) > phaseRank(m.Status.Phase) {
		r.setPhase(s, next)
	}
	if src != nil && src.StartTime != nil {
		setCondition(m, v1.TransferringCondition, metav1.ConditionTrue, v1.ReasonTransferring,
			fmt.Sprintf("The source %s transfers memory (%s)", src.Host, src.Phase))
	} else {
		setCondition(m, v1.TransferringCondition, metav1.ConditionFalse, v1.ReasonWaitingForSourceAgent,
			fmt.Sprintf("Waiting for the agent of %s to start the transfer", m.Status.SourceHost))
	}
	// Look again before the agents could be declared lost.
	s.requeueAfter(r.HeartbeatTimeout / 2)
}

// awaitSourceVerdict reports whether a target failure after the resume
// waits for the source's report. Past the point of no return the source
// completes only on the target's verified "done" and fails when the target
// sends it an error, so its report is the verdict; deciding on the target's
// half alone would make the outcome depend on which agent's write the cache
// shows first. The wait is bounded by AbortGrace from the target's report.
func (r *VMMigrationReconciler) awaitSourceVerdict(s *scope, src *v1.SourceState, dst *v1.TargetState, past bool) bool {
	if !past || src == nil || src.Completed || src.Failed {
		return false
	}
	if dst.LastUpdateTime != nil && s.now.Sub(dst.LastUpdateTime.Time) >= r.AbortGrace {
		return false
	}
	s.requeueAfter(time.Second)
	return true
}

// domainHost is where the domain is known to run when the migration ends:
// nowhere known ("") while the source holds a committed, paused copy
// without the target's verdict.
func domainHost(m *v1.VMMigration, past bool) string {
	if past {
		return m.Status.TargetHost
	}
	if src := sourceHalf(m); src != nil && src.Committed && !src.Completed && !src.Failed {
		return ""
	}
	return m.Status.SourceHost
}

// correctDomainHost amends a failed migration's statement of where the
// domain runs when the target reports, after the end, that it resumed the
// domain: an agent starved of CPU can report the resume after the
// controller failed the migration for its silence. The phase stays final;
// the statement follows the facts.
func (r *VMMigrationReconciler) correctDomainHost(s *scope) {
	m := s.mig
	dst := targetHalf(m)
	if m.Status.Phase != v1.MigrationFailed || !resumed(m) || dst == nil || dst.Discarded || m.Status.DomainHost == m.Status.TargetHost {
		return
	}
	msg := fmt.Sprintf("The target %s reported after the migration ended that the domain was resumed there: it runs on %s, not on %q as stated when the migration failed",
		m.Status.TargetHost, m.Status.TargetHost, m.Status.DomainHost)
	m.Status.DomainHost = m.Status.TargetHost
	setCondition(m, v1.ResumedOnTargetCondition, metav1.ConditionTrue, v1.ReasonResumed, msg)
	r.event(m, corev1.EventTypeWarning, "DomainHostCorrected", "Observe", msg)
}

// phaseRank orders the non-final phases; StopAndCopy and PostCopy are alternatives.
func phaseRank(p v1.VMMigrationPhase) int {
	switch p {
	case v1.MigrationPending:
		return 0
	case v1.MigrationScheduling:
		return 1
	case v1.MigrationPreparingTarget:
		return 2
	case v1.MigrationTargetReady:
		return 3
	case v1.MigrationPreCopy:
		return 4
	case v1.MigrationStopAndCopy, v1.MigrationPostCopy:
		return 5
	}
	return 9
}

// copyProgress summarises the source's progress; percent never decreases
// and lastProgressTime moves only when bytes sent grow.
func (r *VMMigrationReconciler) copyProgress(s *scope, src *v1.SourceState) {
	m := s.mig
	if src == nil || src.Progress == nil {
		return
	}
	p := src.Progress.DeepCopy()
	prev := m.Status.Progress
	if prev != nil {
		if p.Percent < prev.Percent {
			p.Percent = prev.Percent
		}
		if p.BytesSent > prev.BytesSent {
			m.Status.LastProgressTime = &metav1.Time{Time: s.now}
		}
	} else {
		m.Status.LastProgressTime = &metav1.Time{Time: s.now}
	}
	if p.Percent > 100 {
		p.Percent = 100
	}
	m.Status.Progress = p
	m.Status.ProgressText = progressText(p)
}

func progressText(p *v1.MigrationProgress) string {
	if p == nil {
		return ""
	}
	return fmt.Sprintf("%d%%", p.Percent)
}

// actualCost states a result in the terms of a prediction.
func actualCost(res *v1.MigrationResult) *v1.MigrationCost {
	if res == nil {
		return nil
	}
	return &v1.MigrationCost{Bytes: res.BytesSent, Time: res.TotalTime, Pages: res.Pages.Total, ZeroPages: res.Pages.Zero, DiskPages: res.Pages.Disk}
}

// predictionText compares the predicted with the actual cost.
func predictionText(pred, act *v1.MigrationCost) string {
	if pred == nil || act == nil || pred.Bytes <= 0 || pred.Time.Duration <= 0 {
		return ""
	}
	return fmt.Sprintf("; predicted %s in %s, took %s in %s (%.2fx bytes, %.2fx time)", mib(pred.Bytes), pred.Time.Duration.Round(time.Millisecond),
		mib(act.Bytes), act.Time.Duration.Round(time.Millisecond), float64(act.Bytes)/float64(pred.Bytes), act.Time.Seconds()/pred.Time.Seconds())
}

func resultSummary(res *v1.MigrationResult) string {
	if res == nil {
		return ""
	}
	return fmt.Sprintf(" in %s (downtime %s, %s sent, %s saved by dedup)",
		res.TotalTime.Duration.Round(time.Millisecond), res.Downtime.Duration.Round(time.Microsecond),
		mib(res.BytesSent), mib(res.DedupSavedBytes))
}

func mib(b int64) string { return fmt.Sprintf("%.1f MiB", float64(b)/float64(1<<20)) }

// minSwitchSlack is the least time the backstop gives the data path to
// switch to post-copy after the completion timeout: the switch (pause, vCPU
// state, resume on the target, the agents' reports) does not shrink with
// the domain's memory, and on a loaded host it took more than the 2 s a
// twice-the-timeout backstop left a 64 MiB domain.
const minSwitchSlack = 30 * time.Second

// checkTimeouts enforces the progress and completion timeouts before the
// point of no return. The data path switches to post-copy by itself at the
// completion timeout when allowed; the controller aborts when it is not,
// and as a backstop when it is: at twice the timeout, and no sooner than
// minSwitchSlack after it.
func (r *VMMigrationReconciler) checkTimeouts(s *scope, src *v1.SourceState) {
	m := s.mig
	p := m.Status.Parameters
	if p == nil {
		return
	}
	if pt := p.ProgressTimeout.Duration; pt > 0 {
		last := m.Status.LastProgressTime
		if last == nil {
			last = transitionTime(m, v1.MigrationPreparingTarget)
		}
		if last != nil {
			if idle := s.now.Sub(last.Time); idle >= pt {
				r.startAbort(s, v1.ReasonProgressTimeout,
					fmt.Sprintf("No progress for %s (progressTimeout %s) in phase %s", idle.Round(time.Second), pt, m.Status.Phase))
				return
			} else {
				s.requeueAfter(pt - idle)
			}
		}
	}
	ct := p.CompletionTimeout.Duration
	if ct <= 0 || src == nil || src.StartTime == nil {
		return
	}
	limit := ct
	if p.AllowPostCopy {
		limit = ct + max(ct, minSwitchSlack)
	}
	if el := s.now.Sub(src.StartTime.Time); el >= limit {
		msg := fmt.Sprintf("Not finished after %s (completion timeout %s for %s of memory", el.Round(time.Second), ct, gib(m.Status.DomainMemoryBytes))
		if p.AllowPostCopy {
			msg += "; the switch to post-copy did not happen in time)"
		} else {
			msg += "; post-copy is not allowed)"
		}
		r.startAbort(s, v1.ReasonCompletionTimeout, msg)
	} else {
		s.requeueAfter(limit - el)
	}
}

func transitionTime(m *v1.VMMigration, p v1.VMMigrationPhase) *metav1.Time {
	for i := range m.Status.PhaseTransitionTimestamps {
		if m.Status.PhaseTransitionTimestamps[i].Phase == p {
			t := m.Status.PhaseTransitionTimestamps[i].Time
			return &t
		}
	}
	return nil
}

// startAbort asks the agents to stop. The outcome is decided on a later
// reconcile, once the cache shows the request persisted (so every agent
// write before it is visible too).
func (r *VMMigrationReconciler) startAbort(s *scope, reason, msg string) {
	m := s.mig
	m.Status.AbortRequested = true
	m.Status.AbortReason = reason
	m.Status.AbortTime = &metav1.Time{Time: s.now}
	m.Status.FailureReason = msg
	setCondition(m, v1.CompletedCondition, metav1.ConditionFalse, reason, "Aborting: "+msg+"; waiting for the agents to clean up")
	r.event(m, corev1.EventTypeWarning, reason, "Abort", msg)
	s.requeueAfter(time.Second)
}

// released reports whether both agents let go of the migration.
func released(src *v1.SourceState, dst *v1.TargetState) (bool, string) {
	var wait []string
	if src != nil && !src.Failed && !src.Completed {
		wait = append(wait, "source "+src.Host)
	}
	if dst != nil && !dst.Failed && !dst.Completed {
		wait = append(wait, "target "+dst.Host)
	}
	if len(wait) == 0 {
		return true, ""
	}
	return false, fmt.Sprint(wait)
}

// waitAbort ends an aborted migration once both agents confirmed, or after
// AbortGrace, so that it can never hang.
func (r *VMMigrationReconciler) waitAbort(s *scope, src *v1.SourceState, dst *v1.TargetState) {
	m := s.mig
	final, reason := v1.MigrationFailed, m.Status.AbortReason
	if reason == v1.ReasonCancelled || reason == v1.ReasonPreempted {
		final = v1.MigrationCancelled
	}
	msg := m.Status.FailureReason
	ok, waiting := released(src, dst)
	started := m.Status.AbortTime
	switch {
	case ok:
		r.finish(s, final, reason, msg+"; the agents cleaned up and the domain stays on "+m.Status.SourceHost, m.Status.SourceHost)
	case started != nil && s.now.Sub(started.Time) >= r.AbortGrace:
		r.finish(s, final, reason, fmt.Sprintf("%s; %s did not confirm the abort within %s, the domain is expected on %s",
			msg, waiting, r.AbortGrace, m.Status.SourceHost), m.Status.SourceHost)
	default:
		s.requeueAfter(time.Second)
	}
}

// finish moves the migration to a final phase, once.
func (r *VMMigrationReconciler) finish(s *scope, phase v1.VMMigrationPhase, reason, msg, domainHost string) {
	m := s.mig
	if m.Status.Phase.IsFinal() {
		return
	}
	r.setPhase(s, phase)
	m.Status.CompletionTime = &metav1.Time{Time: s.now}
	m.Status.DomainHost = domainHost
	if phase != v1.MigrationSucceeded {
		m.Status.FailureReason = msg
	} else {
		m.Status.FailureReason = ""
	}
	setCondition(m, v1.CompletedCondition, metav1.ConditionTrue, reason, msg)
	typ := corev1.EventTypeNormal
	if phase != v1.MigrationSucceeded {
		typ = corev1.EventTypeWarning
	}
	r.event(m, typ, reason, string(phase), msg)
	s.requeue = 0
}

// setPhase records a phase change with its timestamp.
func (r *VMMigrationReconciler) setPhase(s *scope, p v1.VMMigrationPhase) {
	m := s.mig
	if m.Status.Phase == p {
		return
	}
	m.Status.Phase = p
	m.Status.PhaseTransitionTimestamps = append(m.Status.PhaseTransitionTimestamps, v1.PhaseTransition{Phase: p, Time: metav1.Time{Time: s.now}})
}

func setCondition(m *v1.VMMigration, typ string, st metav1.ConditionStatus, reason, msg string) {
	meta.SetStatusCondition(&m.Status.Conditions, metav1.Condition{
		Type: typ, Status: st, Reason: reason, Message: msg, ObservedGeneration: m.Generation,
	})
}

func (r *VMMigrationReconciler) event(m *v1.VMMigration, typ, reason, action, msg string) {
	if r.Recorder != nil {
		r.Recorder.Eventf(m, nil, typ, reason, action, "%s", msg)
	}
}

// reconcileDelete asks the agents to stop and removes the finalizer once
// they confirmed or AbortGrace passed since the deletion began.
func (r *VMMigrationReconciler) reconcileDelete(ctx context.Context, s *scope) error {
	m := s.mig
	if !controllerutil.ContainsFinalizer(m, v1.Finalizer) {
		return nil
	}
	if !m.Status.Phase.IsFinal() && phaseRank(m.Status.Phase) >= phaseRank(v1.MigrationPreparingTarget) {
		if err := r.loadHosts(ctx, s); err != nil {
			return err
		}
		src, dst := sourceHalf(m), targetHalf(m)
		deadline := m.DeletionTimestamp.Add(r.AbortGrace)
		if !resumed(m) && !m.Status.AbortRequested {
			m.Status.AbortRequested = true
			m.Status.AbortReason = v1.ReasonCancelled
			m.Status.AbortTime = &metav1.Time{Time: s.now}
			m.Status.FailureReason = "The VMMigration is being deleted"
			r.event(m, corev1.EventTypeNormal, "Deleting", "Abort", "Deletion requested: asking the agents to stop and clean up")
			s.requeueAfter(time.Second)
			return nil
		}
		ok, waiting := released(src, dst)
		if resumed(m) {
			ok = src == nil || src.Completed || src.Failed
			waiting = "the source finishing post-copy"
		}
		srcGone, _ := r.agentLost(s, s.src, m.Status.SourceHost, "", false, nil)
		dstGone, _ := r.agentLost(s, s.dst, m.Status.TargetHost, "", false, nil)
		if !ok && !(srcGone && dstGone) && s.now.Before(deadline) {
			s.requeueAfter(min(time.Second, deadline.Sub(s.now)))
			return nil
		}
		if !ok {
			r.event(m, corev1.EventTypeWarning, "FinalizerForced", "Delete",
				fmt.Sprintf("Removed the finalizer without confirmation from %s after %s", waiting, r.AbortGrace))
		}
	}
	if err := r.deleteToken(ctx, m); err != nil {
		return err
	}
	patch := ctrl.MergeFromWithOptions(m.DeepCopy(), ctrl.MergeFromWithOptimisticLock{})
	controllerutil.RemoveFinalizer(m, v1.Finalizer)
	if err := r.Client.Patch(ctx, m, patch); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("remove finalizer of VMMigration %s: %w", klog.KObj(m), err)
	}
	return nil
}

// ensureToken gives the migration its token: 32 random bytes sealed once to
// the source's and once to the target's certified key, each bound to this
// migration, its domain, both hosts and the recipient's role. The cleartext
// lives only in this call; afterwards only the two agents can recover it.
// An error wraps errNoCertificate while a host has no usable certificate.
func (r *VMMigrationReconciler) ensureToken(ctx context.Context, m *v1.VMMigration, src, dst *v1.XenHost) error {
	if m.Status.Tokens != nil {
		return nil
	}
	if r.PKI == nil {
		return fmt.Errorf("%w: the controller has no certificate authority configured", errNoCertificate)
	}
	srcKey, srcSerial, err := r.PKI.HostKey(ctx, src)
	if err != nil {
		return err
	}
	dstKey, dstSerial, err := r.PKI.HostKey(ctx, dst)
	if err != nil {
		return err
	}
	tok := make([]byte, 32)
	defer clear(tok)
	if _, err := rand.Read(tok); err != nil {
		return fmt.Errorf("generate token for VMMigration %s: %w", klog.KObj(m), err)
	}
	uid := string(m.UID)
	forSrc, err := pki.Seal(srcKey, tok, pki.Binding(uid, m.Spec.Domain, src.Name, dst.Name, v1.TokenRoleSource))
	if err != nil {
		return fmt.Errorf("seal token of VMMigration %s for %s: %w", klog.KObj(m), src.Name, err)
	}
	forDst, err := pki.Seal(dstKey, tok, pki.Binding(uid, m.Spec.Domain, src.Name, dst.Name, v1.TokenRoleTarget))
	if err != nil {
		return fmt.Errorf("seal token of VMMigration %s for %s: %w", klog.KObj(m), dst.Name, err)
	}
	m.Status.Tokens = &v1.SealedTokens{Source: forSrc, Target: forDst, SourceCertSerial: srcSerial, TargetCertSerial: dstSerial}
	return nil
}

// deleteToken forgets the sealed token once the migration ended, so that
// nothing can open it afterwards even with an agent's key.
func (r *VMMigrationReconciler) deleteToken(_ context.Context, m *v1.VMMigration) error {
	m.Status.Tokens = nil
	return nil
}
