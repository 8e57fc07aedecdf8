package controllers

import (
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// After the resume, a target's failure and the source's completion may reach
// the controller in either order; the outcome must not depend on it.
func TestObserveTargetFailureAfterResume(t *testing.T) {
	now := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	r := &VMMigrationReconciler{HeartbeatTimeout: 30 * time.Second, AbortGrace: time.Minute}
	fresh := func(name string) *v1.XenHost {
		h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}}
		h.Status.HeartbeatTime = &metav1.Time{Time: now}
		return h
	}
	mig := func(srcCompleted bool, dstReported time.Time) *v1.VMMigration {
		m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Name: "m", Namespace: "ns"}}
		m.Status.Phase = v1.MigrationPostCopy
		m.Status.SourceHost, m.Status.TargetHost = "a", "b"
		m.Status.Source = &v1.SourceState{Host: "a", Phase: "PostCopy", StartTime: &metav1.Time{Time: now.Add(-5 * time.Second)},
			Completed: srcCompleted, Result: &v1.MigrationResult{Verified: true}}
		m.Status.Target = &v1.TargetState{Host: "b", Address: "127.0.0.1:1", Prepared: true, Resumed: true,
			Failed: true, Message: "install page 7: lazy loading is closed", LastUpdateTime: &metav1.Time{Time: dstReported}}
		return m
	}
	cases := []struct {
		name      string
		mig       *v1.VMMigration
		want      v1.VMMigrationPhase
		wantReady metav1.ConditionStatus
	}{
		{"a target failure reported before the source's verdict waits for it", mig(false, now.Add(-time.Second)), v1.MigrationPostCopy, metav1.ConditionFalse},
		{"the source's completion after the resume is the verdict", mig(true, now.Add(-time.Second)), v1.MigrationSucceeded, metav1.ConditionFalse},
		{"a source silent for the abort grace after the target failed fails the migration", mig(false, now.Add(-2*time.Minute)), v1.MigrationFailed, metav1.ConditionFalse},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			s := &scope{mig: c.mig, now: now, src: fresh("a"), dst: fresh("b")}
			r.observe(s)
			if got := c.mig.Status.Phase; got != c.want {
				t.Fatalf("phase %s, want %s (failure reason %q)", got, c.want, c.mig.Status.FailureReason)
			}
			if c.want == v1.MigrationFailed && c.mig.Status.DomainHost != "b" {
				t.Errorf("domainHost %q after the resume, want the target b", c.mig.Status.DomainHost)
			}
			cond := meta.FindStatusCondition(c.mig.Status.Conditions, v1.TargetReadyCondition)
			if cond == nil || cond.Status != c.wantReady || cond.Reason != v1.ReasonTargetFailed {
				t.Errorf("TargetReady %+v, want %s with reason %s (the target's report stays visible)", cond, c.wantReady, v1.ReasonTargetFailed)
			}
		})
	}
}

// The completion-timeout backstop for a migration allowed to switch to
// post-copy leaves the data path time to switch, however small the domain.
func TestCompletionBackstopLeavesTimeToSwitch(t *testing.T) {
	start := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	cases := []struct {
		name      string
		postCopy  bool
		timeout   time.Duration
		elapsed   time.Duration
		wantAbort bool
	}{
		{"pre-copy only is aborted at the timeout", false, 2 * time.Second, 2 * time.Second, true},
		{"a small domain allowed to switch is not aborted at twice its timeout", true, 2 * time.Second, 4 * time.Second, false},
		{"a small domain allowed to switch is aborted once the slack passed", true, 2 * time.Second, 2*time.Second + minSwitchSlack, true},
		{"a large domain allowed to switch is aborted at twice its timeout", true, 5 * time.Minute, 10 * time.Minute, true},
		{"a large domain allowed to switch is not aborted before twice its timeout", true, 5 * time.Minute, 9 * time.Minute, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := &v1.VMMigration{}
			m.Status.Phase = v1.MigrationPreCopy
			m.Status.Parameters = &v1.ResolvedParameters{AllowPostCopy: c.postCopy, CompletionTimeout: metav1.Duration{Duration: c.timeout}}
			src := &v1.SourceState{Host: "a", StartTime: &metav1.Time{Time: start}}
			s := &scope{mig: m, now: start.Add(c.elapsed)}
			(&VMMigrationReconciler{}).checkTimeouts(s, src)
			if m.Status.AbortRequested != c.wantAbort {
				t.Fatalf("abort requested %v after %s (timeout %s, post-copy %v), want %v", m.Status.AbortRequested, c.elapsed, c.timeout, c.postCopy, c.wantAbort)
			}
		})
	}
}

// A source that committed the domain (go sent) and failed without a verdict
// holds it paused: the controller neither reports it on the source nor lets
// a cancel abort it, and a target that discarded its copy hands the domain
// back to the source once the source reports that it resumed it.
func TestObserveCommittedSourceAwaitsVerdict(t *testing.T) {
	now := time.Date(2026, 12, 4, 9, 0, 0, 0, time.UTC)
	r := &VMMigrationReconciler{HeartbeatTimeout: 30 * time.Second, AbortGrace: time.Minute}
	fresh := func(name string) *v1.XenHost {
		h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}}
		h.Status.HeartbeatTime = &metav1.Time{Time: now}
		return h
	}
	mig := func(mod func(*v1.SourceState, *v1.TargetState)) *v1.VMMigration {
		m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Name: "m", Namespace: "ns"}}
		m.Status.Phase = v1.MigrationStopAndCopy
		m.Status.SourceHost, m.Status.TargetHost = "a", "b"
		m.Status.Source = &v1.SourceState{Host: "a", Phase: "StopAndCopy", Committed: true,
			StartTime: &metav1.Time{Time: now.Add(-5 * time.Second)}, LastUpdateTime: &metav1.Time{Time: now}}
		m.Status.Target = &v1.TargetState{Host: "b", Address: "127.0.0.1:1", Ready: true, Prepared: true,
			LastUpdateTime: &metav1.Time{Time: now}}
		mod(m.Status.Source, m.Status.Target)
		return m
	}
	cases := []struct {
		name     string
		mig      *v1.VMMigration
		want     v1.VMMigrationPhase
		wantHost string
	}{
		{"a held source with a silent target is not aborted by a cancel", mig(func(_ *v1.SourceState, _ *v1.TargetState) {}), v1.MigrationStopAndCopy, ""},
		{"a target that discarded its copy waits for the source to resume it", mig(func(_ *v1.SourceState, d *v1.TargetState) {
			d.Resumed, d.Discarded, d.Failed, d.Message = true, true, true, "page 9 does not match"
		}), v1.MigrationStopAndCopy, ""},
		{"the source resumed the discarded domain: failed, on the source", mig(func(s *v1.SourceState, d *v1.TargetState) {
			d.Resumed, d.Discarded, d.Failed = true, true, true
			s.Failed, s.Message = true, "the target discarded the domain; it runs on the source again"
		}), v1.MigrationFailed, "a"},
		{"a target that failed without a verdict for the abort grace: failed, host unknown", mig(func(_ *v1.SourceState, d *v1.TargetState) {
			d.Failed, d.Message, d.LastUpdateTime = true, "receiver crashed", &metav1.Time{Time: now.Add(-2 * time.Minute)}
		}), v1.MigrationFailed, ""},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			c.mig.Spec.Cancel = true
			s := &scope{mig: c.mig, now: now, src: fresh("a"), dst: fresh("b")}
			r.observe(s)
			if got := c.mig.Status.Phase; got != c.want {
				t.Fatalf("phase %s, want %s (failure reason %q)", got, c.want, c.mig.Status.FailureReason)
			}
			if c.mig.Status.AbortRequested && c.want != v1.MigrationFailed {
				t.Errorf("a committed migration was aborted: %q", c.mig.Status.AbortReason)
			}
			if c.want.IsFinal() && c.mig.Status.DomainHost != c.wantHost {
				t.Errorf("domainHost %q, want %q (%s)", c.mig.Status.DomainHost, c.wantHost, c.mig.Status.FailureReason)
			}
		})
	}
}

// A migration failed for a silent source agent whose target then reports
// the resume states where the domain runs from the facts, not the guess.
func TestFailedMigrationFollowsALateResume(t *testing.T) {
	r := &VMMigrationReconciler{HeartbeatTimeout: 30 * time.Second, AbortGrace: time.Minute}
	m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Name: "m", Namespace: "ns"}}
	m.Status.Phase, m.Status.SourceHost, m.Status.TargetHost, m.Status.DomainHost = v1.MigrationFailed, "a", "b", "a"
	s := &scope{mig: m, now: time.Now()}
	r.correctDomainHost(s)
	if m.Status.DomainHost != "a" {
		t.Fatalf("domainHost moved to %q without a resume", m.Status.DomainHost)
	}
	m.Status.Target = &v1.TargetState{Host: "b", Resumed: true}
	r.correctDomainHost(s)
	if m.Status.DomainHost != "b" || !meta.IsStatusConditionTrue(m.Status.Conditions, v1.ResumedOnTargetCondition) {
		t.Errorf("domainHost %q, conditions %+v; want b and ResumedOnTarget", m.Status.DomainHost, m.Status.Conditions)
	}
	m.Status.Target.Discarded = true
	m.Status.DomainHost = "a"
	r.correctDomainHost(s)
	if m.Status.DomainHost != "a" {
		t.Errorf("a discarded copy moved domainHost to %q", m.Status.DomainHost)
	}
}
