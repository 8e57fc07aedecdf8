package agent

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/controllers"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// setCancel sets spec.cancel with a merge patch, as `kubectl patch --type
// merge` does: no resourceVersion precondition, so the agents' concurrent
// status writes cannot make it conflict.
func setCancel(t *testing.T, ns, name string) {
	t.Helper()
	m := getMig(t, ns, name)
	orig := m.DeepCopy()
	m.Spec.Cancel = true
	if err := k8s.Patch(context.Background(), m, client.MergeFrom(orig)); err != nil {
		t.Fatalf("cancel %s: %v", name, err)
	}
}

func bandwidth(q string) func(*v1.VMMigration) {
	return func(m *v1.VMMigration) { b := resource.MustParse(q); m.Spec.Bandwidth = &b }
}

func strategy(s v1.MigrationStrategy) func(*v1.VMMigration) {
	return func(m *v1.VMMigration) { m.Spec.Strategy = s }
}

// domainRunning checks that a simulated domain runs on host.
func domainRunning(t *testing.T, a *testAgent, name string) {
	t.Helper()
	doms, err := a.host.Domains(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range doms {
		if d.Name == name {
			if d.State != xenmem.StateRunning {
				t.Fatalf("domain %s on %s is %s, want Running", name, a.name, d.State)
			}
			return
		}
	}
	t.Fatalf("domain %s is not on %s", name, a.name)
}

func noDomain(t *testing.T, a *testAgent, name string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("no domain %s on %s", name, a.name), 10*time.Second, func() (bool, string) {
		doms, _ := a.host.Domains(context.Background())
		for _, d := range doms {
			if d.Name == name {
				return false, string(d.State)
			}
		}
		return true, ""
	})
}

// Cancel is honoured in every phase before the point of no return, and
// ignored (with a condition and an event saying so) after it.
func TestCancelInEachPhase(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	startController(t, ctrlOpts{limits: controllers.Limits{Cluster: 1, OutboundPerHost: 1, InboundPerHost: 1}})
	ghost, ghostTarget := ns+"-ghost", ns+"-noagent"
	fakeHost(t, ghost, "sim", 8<<30, 8<<30)
	fakeHost(t, ghostTarget, "sim", 8<<30, 8<<30)
	fakeDomain(t, ns, "remote", ghost, 32<<20)
	fakeDomain(t, ns, "remote2", ghost, 32<<20)
	a := startAgent(t, ns+"-a", "1Gi", simDomain("web", ns, "64Mi", 20, sharedDisk(t, disks, "web"), 3))
	b := startAgent(t, ns+"-b", "1Gi")
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)

	t.Run("pending: cancelled before anything happened", func(t *testing.T) {
		create(t, migration(ns, "c-pending", "web", b.name, func(m *v1.VMMigration) { m.Spec.Cancel = true }))
		m := waitPhase(t, ns, "c-pending", 10*time.Second, v1.MigrationCancelled)
		if m.Status.TargetHost != "" {
			t.Fatalf("a migration cancelled while pending chose target %s", m.Status.TargetHost)
		}
	})
	t.Run("preparing target and scheduling: the slot holder and the queued one", func(t *testing.T) {
		// The target has no agent: the migration stays in PreparingTarget
		// and holds the only cluster slot; the next one queues in Scheduling.
		create(t, migration(ns, "c-preparing", "remote", ghostTarget))
		waitPhase(t, ns, "c-preparing", 10*time.Second, v1.MigrationPreparingTarget)
		create(t, migration(ns, "c-scheduling", "remote2", b.name))
		waitFor(t, "c-scheduling queued", 10*time.Second, func() (bool, string) {
			m := getMig(t, ns, "c-scheduling")
			c := condition(m, v1.ScheduledCondition)
			return m.Status.Phase == v1.MigrationScheduling && c != nil && c.Reason == v1.ReasonWaitingForSlot, describe(m)
		})
		setCancel(t, ns, "c-scheduling")
		waitPhase(t, ns, "c-scheduling", 10*time.Second, v1.MigrationCancelled)
		setCancel(t, ns, "c-preparing")
		m := waitPhase(t, ns, "c-preparing", 10*time.Second, v1.MigrationCancelled)
		if m.Status.DomainHost != ghost {
			t.Fatalf("domainHost %q, want the source %s", m.Status.DomainHost, ghost)
		}
	})
	t.Run("target ready: the target agent cleans up", func(t *testing.T) {
		// The source host has no agent, so the transfer never starts.
		create(t, migration(ns, "c-ready", "remote", b.name))
		waitPhase(t, ns, "c-ready", 10*time.Second, v1.MigrationTargetReady)
		setCancel(t, ns, "c-ready")
		m := waitPhase(t, ns, "c-ready", 10*time.Second, v1.MigrationCancelled)
		if m.Status.Target == nil || !m.Status.Target.Failed || !strings.Contains(m.Status.Target.Message, "stopped before any data arrived") {
			t.Fatalf("target half %+v: want the target agent to confirm its cleanup", m.Status.Target)
		}
		if !strings.Contains(m.Status.FailureReason, "the agents cleaned up") {
			t.Fatalf("failureReason %q: want the agents' confirmation", m.Status.FailureReason)
		}
	})
	t.Run("pre-copy: the source aborts and keeps the domain", func(t *testing.T) {
		create(t, migration(ns, "c-precopy", "web", b.name, strategy(v1.StrategyPreCopy), bandwidth("2Mi")))
		waitPhase(t, ns, "c-precopy", 20*time.Second, v1.MigrationPreCopy)
		setCancel(t, ns, "c-precopy")
		m := waitPhase(t, ns, "c-precopy", 20*time.Second, v1.MigrationCancelled)
		if m.Status.Source == nil || !m.Status.Source.Failed {
			t.Fatalf("source half %+v: want the source to confirm the abort", m.Status.Source)
		}
		if m.Status.DomainHost != a.name {
			t.Fatalf("domainHost %q, want %s", m.Status.DomainHost, a.name)
		}
		domainRunning(t, a, "web")
		noDomain(t, b, "web")
		waitDomainOn(t, ns, "web", a.name, 5*time.Second)
		waitEvents(t, m, v1.ReasonCancelled)
	})
	t.Run("post-copy: cancel is ignored past the point of no return", func(t *testing.T) {
		create(t, migration(ns, "c-postcopy", "web", b.name, strategy(v1.StrategyPostCopy), bandwidth("8Mi")))
		waitPhase(t, ns, "c-postcopy", 20*time.Second, v1.MigrationPostCopy)
		setCancel(t, ns, "c-postcopy")
		m := waitPhase(t, ns, "c-postcopy", 60*time.Second, v1.MigrationSucceeded)
		if c := condition(m, "CancelIgnored"); c == nil || c.Reason != v1.ReasonCancelIgnored {
			t.Fatalf("CancelIgnored condition %+v: want it set", c)
		}
		if !m.Status.Result.PostCopy {
			t.Fatalf("result %+v: want a post-copy migration", m.Status.Result)
		}
		waitDomainOn(t, ns, "web", b.name, 10*time.Second)
		domainRunning(t, b, "web")
		noDomain(t, a, "web")
	})
}

// The completion timeout cancels a pre-copy that may not switch to
// post-copy, and switches a hybrid one to post-copy.
func TestCompletionTimeout(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	d := controllers.DefaultDefaults
	d.MinCompletionTimeout = 500 * time.Millisecond
	startController(t, ctrlOpts{defaults: d})
	a := startAgent(t, ns+"-a", "1Gi",
		simDomain("busy", ns, "64Mi", 20, sharedDisk(t, disks, "busy"), 4),
		simDomain("busy2", ns, "64Mi", 20, sharedDisk(t, disks, "busy2"), 5))
	b := startAgent(t, ns+"-b", "1Gi")
	waitDomainOn(t, ns, "busy", a.name, 10*time.Second)
	waitDomainOn(t, ns, "busy2", a.name, 10*time.Second)
	perGiB := &metav1.Duration{Duration: 32 * time.Second} // 64 MiB → 2 s

	t.Run("pre-copy without post-copy is cancelled", func(t *testing.T) {
		create(t, migration(ns, "slow", "busy", b.name, strategy(v1.StrategyPreCopy), bandwidth("2Mi"),
			func(m *v1.VMMigration) { m.Spec.CompletionTimeoutPerGiB = perGiB }))
		m := waitPhase(t, ns, "slow", 30*time.Second, v1.MigrationFailed)
		c := condition(m, v1.CompletedCondition)
		if c == nil || c.Reason != v1.ReasonCompletionTimeout || !strings.Contains(c.Message, "post-copy is not allowed") {
			t.Fatalf("Completed condition %+v: want reason %s explaining post-copy was not allowed", c, v1.ReasonCompletionTimeout)
		}
		if m.Status.DomainHost != a.name {
			t.Fatalf("domainHost %q, want the source %s", m.Status.DomainHost, a.name)
		}
		domainRunning(t, a, "busy")
		noDomain(t, b, "busy")
	})
	t.Run("hybrid switches to post-copy at the timeout", func(t *testing.T) {
		create(t, migration(ns, "switch", "busy2", b.name, strategy(v1.StrategyHybrid), bandwidth("8Mi"),
			func(m *v1.VMMigration) { m.Spec.CompletionTimeoutPerGiB = perGiB }))
		m := waitPhase(t, ns, "switch", 60*time.Second, v1.MigrationSucceeded)
		if m.Status.Parameters.SwitchToPostCopyAfter.Duration != 2*time.Second {
			t.Fatalf("switchToPostCopyAfter %s, want 2s", m.Status.Parameters.SwitchToPostCopyAfter.Duration)
		}
		if m.Status.Result == nil || !m.Status.Result.PostCopy {
			t.Fatalf("result %+v: want a switch to post-copy", m.Status.Result)
		}
		waitDomainOn(t, ns, "busy2", b.name, 10*time.Second)
	})
}

// An agent that dies fails its migrations safe: the domain stays where it
// is known to run, and the reason says what happened. A restarted agent
// that had only prepared picks the migration up again.
func TestAgentKilledMidMigration(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	startController(t, ctrlOpts{heartbeat: 2 * time.Second, grace: 4 * time.Second})
	ghost := ns + "-ghost"
	fakeHost(t, ghost, "sim", 8<<30, 8<<30)
	fakeDomain(t, ns, "remote", ghost, 32<<20)
	fakeDomain(t, ns, "remote2", ghost, 32<<20)
	a := startAgent(t, ns+"-a", "1Gi", simDomain("web", ns, "64Mi", 20, sharedDisk(t, disks, "web"), 6))
	b := startAgent(t, ns+"-b", "1Gi")
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)
	// Restarted agents live as long as the whole test, so they log to it.
	T := t

	t.Run("a restarted target agent prepares again", func(t *testing.T) {
		create(t, migration(ns, "k-restart", "remote", b.name))
		m := waitPhase(t, ns, "k-restart", 10*time.Second, v1.MigrationTargetReady)
		old := m.Status.Target.AgentID
		b.stop()
		b.start(T)
		waitFor(t, "target half re-prepared by the new agent", 10*time.Second, func() (bool, string) {
			m = getMig(t, ns, "k-restart")
			return m.Status.Target != nil && m.Status.Target.AgentID == b.agent.ID() && m.Status.Target.Ready, describe(m)
		})
		if m.Status.Target.AgentID == old || m.Status.Phase != v1.MigrationTargetReady {
			t.Fatalf("after restart: %s", describe(m))
		}
		setCancel(t, ns, "k-restart")
		waitPhase(t, ns, "k-restart", 10*time.Second, v1.MigrationCancelled)
	})
	t.Run("a target agent that vanishes fails the migration safe", func(t *testing.T) {
		create(t, migration(ns, "k-target", "remote2", b.name))
		waitPhase(t, ns, "k-target", 10*time.Second, v1.MigrationTargetReady)
		b.stop()
		m := waitPhase(t, ns, "k-target", 15*time.Second, v1.MigrationFailed)
		c := condition(m, v1.CompletedCondition)
		if c == nil || c.Reason != v1.ReasonTargetAgentLost || !strings.Contains(c.Message, "stopped heartbeating") || !strings.Contains(c.Message, "the domain stays on the source") {
			t.Fatalf("Completed condition %+v: want %s saying the domain stays on the source", c, v1.ReasonTargetAgentLost)
		}
		if m.Status.DomainHost != ghost {
			t.Fatalf("domainHost %q, want %s", m.Status.DomainHost, ghost)
		}
		b.start(T)
		waitFor(t, "target agent back", 10*time.Second, func() (bool, string) {
			h := &v1.XenHost{}
			if err := k8s.Get(context.Background(), client.ObjectKey{Name: b.name}, h); err != nil {
				return false, err.Error()
			}
			return h.Status.AgentID == b.agent.ID(), h.Status.AgentID
		})
	})
	t.Run("a source agent killed during pre-copy leaves the domain running on the source", func(t *testing.T) {
		create(t, migration(ns, "k-source", "web", b.name, strategy(v1.StrategyPreCopy), bandwidth("2Mi")))
		waitPhase(t, ns, "k-source", 20*time.Second, v1.MigrationPreCopy)
		a.stop()
		m := waitPhase(t, ns, "k-source", 20*time.Second, v1.MigrationFailed)
		if m.Status.DomainHost != a.name || !strings.Contains(m.Status.FailureReason, "the domain stays on the source") {
			t.Fatalf("domainHost %q, failureReason %q: want the domain on %s", m.Status.DomainHost, m.Status.FailureReason, a.name)
		}
		t.Logf("failure reported: %s", m.Status.FailureReason)
		domainRunning(t, a, "web")
		noDomain(t, b, "web")
		// The restarted source agent finds the migration final and leaves the domain alone.
		a.start(T)
		waitDomainOn(t, ns, "web", a.name, 10*time.Second)
		domainRunning(t, a, "web")
	})
}

// Several migrations at once never exceed the cluster, outbound and inbound
// limits, and all of them finish.
func TestConcurrencyLimits(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	lim := controllers.Limits{Cluster: 2, OutboundPerHost: 1, InboundPerHost: 1}
	startController(t, ctrlOpts{limits: lim})
	a := startAgent(t, ns+"-a", "1Gi",
		simDomain("a1", ns, "32Mi", 2, sharedDisk(t, disks, "a1"), 11),
		simDomain("a2", ns, "32Mi", 2, sharedDisk(t, disks, "a2"), 12))
	b := startAgent(t, ns+"-b", "1Gi")
	c := startAgent(t, ns+"-c", "1Gi",
		simDomain("c1", ns, "32Mi", 2, sharedDisk(t, disks, "c1"), 13),
		simDomain("c2", ns, "32Mi", 2, sharedDisk(t, disks, "c2"), 14))
	for _, d := range []string{"a1", "a2"} {
		waitDomainOn(t, ns, d, a.name, 10*time.Second)
	}
	for _, d := range []string{"c1", "c2"} {
		waitDomainOn(t, ns, d, c.name, 10*time.Second)
	}

	var mu sync.Mutex
	maxTotal, maxOut, maxIn := 0, 0, 0
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			select {
			case <-quit:
				return
			case <-time.After(20 * time.Millisecond):
			}
			var l v1.VMMigrationList
			if err := k8s.List(context.Background(), &l); err != nil {
				continue
			}
			total, out, in := 0, map[string]int{}, map[string]int{}
			for _, m := range l.Items {
				if m.Namespace != ns || !m.Status.Phase.HoldsSlot() {
					continue
				}
				total++
				out[m.Status.SourceHost]++
				in[m.Status.TargetHost]++
			}
			mu.Lock()
			maxTotal = max(maxTotal, total)
			for _, n := range out {
				maxOut = max(maxOut, n)
			}
			for _, n := range in {
				maxIn = max(maxIn, n)
			}
			mu.Unlock()
		}
	}()
	// a1, a2 leave a (outbound 1); a1, c1 arrive at b and a2, c2 at c... c is
	// both a source and a target. Every pair conflicts somewhere.
	create(t, migration(ns, "m-a1", "a1", b.name, bandwidth("16Mi")))
	create(t, migration(ns, "m-a2", "a2", c.name, bandwidth("16Mi")))
	create(t, migration(ns, "m-c1", "c1", b.name, bandwidth("16Mi")))
	create(t, migration(ns, "m-c2", "c2", a.name, bandwidth("16Mi")))
	queued := false
	for _, n := range []string{"m-a1", "m-a2", "m-c1", "m-c2"} {
		m := waitPhase(t, ns, n, 90*time.Second, v1.MigrationSucceeded)
		if ev := strings.Join(events(t, m), ","); strings.Contains(ev, v1.ReasonWaitingForSlot) {
			queued = true
		}
	}
	close(quit)
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	t.Logf("max observed: %d in the cluster, %d out of one host, %d into one host (limits %+v)", maxTotal, maxOut, maxIn, lim)
	if maxTotal > lim.Cluster || maxOut > lim.OutboundPerHost || maxIn > lim.InboundPerHost {
		t.Fatalf("limits exceeded: %d/%d/%d, limits %+v", maxTotal, maxOut, maxIn, lim)
	}
	if maxTotal < 2 {
		t.Errorf("never saw two migrations at once; the test does not exercise the limits")
	}
	if !queued {
		t.Errorf("no migration was ever queued (WaitingForSlot event); the test does not exercise the limits")
	}
}

// Deleting a migration never hangs: agents that answer clean up at once,
// and without an answer the finalizer goes after the grace period.
func TestDeletionNeverHangs(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	grace := 3 * time.Second
	startController(t, ctrlOpts{grace: grace, heartbeat: 30 * time.Second})
	ghost, deaf := ns+"-ghost", ns+"-deaf"
	fakeHost(t, ghost, "sim", 8<<30, 8<<30)
	fakeHost(t, deaf, "sim", 8<<30, 8<<30)
	fakeDomain(t, ns, "remote", ghost, 32<<20)
	a := startAgent(t, ns+"-a", "1Gi", simDomain("web", ns, "64Mi", 20, sharedDisk(t, disks, "web"), 21))
	b := startAgent(t, ns+"-b", "1Gi")
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)

	gone := func(name string, within time.Duration) time.Duration {
		t.Helper()
		start := time.Now()
		waitFor(t, "VMMigration "+name+" deleted", within, func() (bool, string) {
			m := &v1.VMMigration{}
			err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: name}, m)
			if err != nil {
				return client.IgnoreNotFound(err) == nil, err.Error()
			}
			return false, describe(m)
		})
		return time.Since(start)
	}
	t.Run("pre-copy: the agents abort and the object goes at once", func(t *testing.T) {
		create(t, migration(ns, "d-precopy", "web", b.name, strategy(v1.StrategyPreCopy), bandwidth("2Mi")))
		m := waitPhase(t, ns, "d-precopy", 20*time.Second, v1.MigrationPreCopy)
		if err := k8s.Delete(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		took := gone("d-precopy", grace+5*time.Second)
		if took >= grace {
			t.Errorf("deletion took %s; the agents' confirmation should end it before the %s grace", took, grace)
		}
		domainRunning(t, a, "web")
		noDomain(t, b, "web")
	})
	t.Run("preparing a target whose agent never answers: the finalizer goes after the grace period", func(t *testing.T) {
		create(t, migration(ns, "d-deaf", "remote", deaf))
		m := waitPhase(t, ns, "d-deaf", 10*time.Second, v1.MigrationPreparingTarget)
		// A target agent that reports ready once and then never again.
		patch := []byte(`[{"op":"add","path":"/status/target","value":{"host":"` + deaf + `","agentID":"` + deaf + `-fake","address":"127.0.0.1:9","ready":true}}]`)
		if err := k8s.Status().Patch(context.Background(), m, client.RawPatch(types.JSONPatchType, patch)); err != nil {
			t.Fatal(err)
		}
		m = waitPhase(t, ns, "d-deaf", 10*time.Second, v1.MigrationTargetReady)
		if err := k8s.Delete(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		took := gone("d-deaf", grace+10*time.Second)
		t.Logf("deleted after %s (grace %s)", took.Round(time.Millisecond), grace)
		if took < grace-time.Second { // deletionTimestamp has a one-second resolution
			t.Errorf("deleted after %s, before the %s grace, although the target never confirmed", took, grace)
		}
	})
}
