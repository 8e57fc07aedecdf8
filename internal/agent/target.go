package agent

import (
	"context"
	"fmt"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// The target half of a VMMigration, after KubeVirt's migration target
// controller: the TargetReconciler prepares this host to receive the
// domain, authorizes only the migration the controller granted (token and
// peer), receives it (engine receiver or xl migrate-receive), reports it
// in status.target — the only part of the VMMigration it writes — and
// settles from the facts on this host what a previous process of this
// agent was receiving.

// TargetReconciler owns this host's target halves (status.target).
type TargetReconciler struct {
	*Agent
}

func (tr *TargetReconciler) reconcile(ctx context.Context, m *v1.VMMigration) (reconcile.Result, error) {
	uid := string(m.UID)
	r := tr.lookup(uid)
	half := m.Status.Target
	if half != nil && half.Host != tr.cfg.Host {
		half = nil
	}
	stop := stopping(m)
	if r == nil {
		if m.Status.Phase.IsFinal() {
			return reconcile.Result{}, nil
		}
		// The controller's Scheduled condition hands the migration to this
		// target (a slot, a token sealed to it): the gate is that
		// condition, not the phase it computes from it.
		if stop != "" || !meta.IsStatusConditionTrue(m.Status.Conditions, v1.ScheduledCondition) && half == nil {
			if half != nil && !half.Failed && !half.Completed {
				return reconcile.Result{}, tr.writeTarget(ctx, m, v1.TargetState{Host: tr.cfg.Host, AgentID: tr.id, Failed: true,
					Message: "nothing to clean up on the target: " + stop})
			}
			return reconcile.Result{}, nil
		}
		if half != nil && half.Completed && !half.Failed {
			// Every page arrived and was verified (before a restart of this
			// agent, if the agent ID differs): that stays true, and the
			// source may be waiting for it to release its paused copy.
			if half.AgentID == tr.id {
				return reconcile.Result{}, nil
			}
			h := *half
			h.AgentID = tr.id
			tr.log.Info("Keeping a completed incoming migration of this agent's previous process", "migration", klogKey(m), "previousAgent", half.AgentID)
			return reconcile.Result{}, tr.writeTarget(ctx, m, h)
		}
		if half != nil && half.AgentID == tr.id && half.Failed {
			// This process ended the half (a settled restart says
			// discarded): it is the target's verdict, which the source
			// waits for; preparing again would erase it.
			return reconcile.Result{}, nil
		}
		if half != nil && half.AgentID != tr.id && tr.usesXL() && !half.Failed && (half.Prepared || half.Resumed) {
			// xl, not this process, creates and starts the domain here:
			// what runs now is the verdict.
			return tr.adoptXLTarget(ctx, m, half)
		}
		if half != nil && half.AgentID != tr.id && half.Resumed && !half.Failed {
			return reconcile.Result{}, tr.adoptResumedTarget(ctx, m, half)
		}
		if half != nil && half.AgentID != tr.id {
			started := m.Status.Source != nil && m.Status.Source.StartTime != nil
			if half.Resumed || half.Prepared || started {
				msg := "the target agent restarted during the transfer and lost the incoming domain; the domain keeps running on the source"
				if half.Resumed {
					msg = "the target agent restarted after the domain resumed here; the domain's state on this host is lost"
				}
				tr.log.Info("Failing a migration this agent's previous process was receiving", "migration", klogKey(m), "previousAgent", half.AgentID)
				return reconcile.Result{}, tr.writeTarget(ctx, m, v1.TargetState{Host: tr.cfg.Host, AgentID: tr.id, Failed: true, Message: msg})
			}
			// Prepared by a previous process but not used yet: prepare again.
			tr.log.Info("Picking up a migration prepared by this agent's previous process", "migration", klogKey(m), "previousAgent", half.AgentID)
		}
		tok, err := tr.readToken(ctx, m)
		if err != nil {
			return reconcile.Result{}, err
		}
		r = &run{key: client.ObjectKeyFromObject(m), uid: uid, role: roleTarget, token: tok}
		tr.addRun(r)
		tr.log.Info("Prepared to receive a migration", "migration", klogKey(m), "domain", m.Spec.Domain, "from", m.Status.SourceHost)
		r.mu.Lock()
		st := tr.targetHalf(r)
		r.mu.Unlock()
		return reconcile.Result{}, tr.writeTarget(ctx, m, st)
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
	res, err := tr.flushTarget(ctx, m, r)
	if err == nil && m.Status.Phase.IsFinal() && terminal {
		tr.dropRun(uid)
	}
	return res, err
}

func (tr *TargetReconciler) targetHalf(r *run) v1.TargetState {
	now := metav1.Now()
	st := v1.TargetState{
		Host: tr.cfg.Host, AgentID: tr.id, Address: tr.DataAddress(),
		Ready: !r.aborted && !r.failed, Prepared: r.prepared, Resumed: r.resumed,
		Completed: r.done, Failed: r.failed, Discarded: r.discarded, Message: r.message, LastUpdateTime: &now,
		PostCopy: r.postCopy,
	}
	if r.resumed {
		st.ResumeTime = &metav1.Time{Time: r.resumeTime}
	}
	return st
}

// flushTarget writes the target half when it changed; phase-like changes
// (prepared, resumed, done, failed) are written at once.
func (tr *TargetReconciler) flushTarget(ctx context.Context, m *v1.VMMigration, r *run) (reconcile.Result, error) {
	r.mu.Lock()
	if !r.changed {
		r.mu.Unlock()
		return reconcile.Result{}, nil
	}
	st := tr.targetHalf(r)
	r.changed = false
	r.mu.Unlock()
	if err := tr.writeTarget(ctx, m, st); err != nil {
		r.mu.Lock()
		r.changed = true
		r.mu.Unlock()
		return reconcile.Result{}, err
	}
	return reconcile.Result{}, nil
}

func (tr *TargetReconciler) writeTarget(ctx context.Context, m *v1.VMMigration, st v1.TargetState) error {
	return tr.writeHalf(ctx, m, "/status/target", st)
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
func (tr *TargetReconciler) adoptResumedTarget(ctx context.Context, m *v1.VMMigration, half *v1.TargetState) error {
	xd := &v1.XenDomain{}
	if err := tr.c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, xd); err != nil {
		return fmt.Errorf("settle the resumed half of %s: get XenDomain %s/%s: %w", klogKey(m), m.Namespace, m.Spec.Domain, err)
	}
	name := xd.Spec.DomainName
	doms, err := tr.host.Domains(ctx)
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
	if rec, err := readInflight(tr.stateDir(), string(m.UID)); err == nil && rec != nil && rec.Role == roleTargetName && rec.Phase == phaseVerified {
		complete = true
	}
	now := metav1.Now()
	st := v1.TargetState{Host: tr.cfg.Host, AgentID: tr.id, Address: half.Address, Prepared: half.Prepared, Resumed: true,
		ResumeTime: half.ResumeTime, LastUpdateTime: &now}
	switch {
	case info != nil && complete && info.State != xenmem.StateShutdown:
		st.Completed = true
		st.Message = "the target agent restarted; the domain runs here with the memory verified before it resumed"
	case info != nil:
		sd, err := tr.host.OpenSource(ctx, name)
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
	tr.log.Info("Settled the resumed half of this agent's previous process from facts", "migration", klogKey(m), "domain", name,
		"present", info != nil, "complete", complete, "completed", st.Completed, "discarded", st.Discarded)
	return tr.writeTarget(ctx, m, st)
}

// onReceiverEvent records what the receiver reports and wakes the
// reconciler to write it; it never blocks the data path.
func (tr *TargetReconciler) onReceiverEvent(migrationID string, ev engine.Event) {
	telemetry.targetEvent(ev)
	tr.mu.Lock()
	r := tr.runs[migrationID]
	tr.mu.Unlock()
	if r == nil {
		tr.log.Info("Receiver event for an unknown migration", "migration", migrationID, "kind", ev.Kind)
		return
	}
	r.mu.Lock()
	now := time.Now()
	switch ev.Kind {
	case engine.EventPrepared:
		r.prepared = true
	case engine.EventResumed:
		if !r.resumed { // an early resume reports it before the end too
			r.resumed, r.resumeTime = true, now
		}
	case engine.EventDone:
		r.done = true
		if st := ev.Stats; st.Demand > 0 || st.FaultLatency != nil {
			r.postCopy = &v1.PostCopyStats{DemandPages: int64(st.Demand),
				FaultP50: metav1.Duration{Duration: st.FaultP50}, FaultP99: metav1.Duration{Duration: st.FaultP99}}
		}
	case engine.EventFailed:
		r.failed = true
		if ev.Err != nil {
			r.message = ev.Err.Error()
		} else {
			r.message = "the receiver aborted the migration"
		}
	case engine.EventDiscarded:
		// The domain resumed here failed verification and was destroyed
		// here; the source was told it may resume its copy.
		r.discarded, r.failed = true, true
		r.message = "discarded: the domain failed verification here and was destroyed; the source may resume it"
		if ev.Err != nil {
			r.message = "discarded: " + ev.Err.Error()
		}
	}
	r.changed = true
	r.mu.Unlock()
	tr.log.Info("Incoming migration event", "migration", r.key, "kind", ev.Kind)
	if ev.Kind == engine.EventResumed || ev.Kind == engine.EventDone {
		tr.kickPublish()
	}
	tr.wakeUp(r)
}
