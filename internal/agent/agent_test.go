package agent

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// A full migration through the controller and two agents, over loopback TCP.
func TestFullMigrationThroughControllerAndAgents(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	disks := t.TempDir()
	metrics := startController(t, ctrlOpts{})
	a := startAgent(t, ns+"-a", "1Gi", simDomain("web", ns, "64Mi", 4, sharedDisk(t, disks, "web"), 1))
	startAgent(t, ns+"-b", "1Gi")
	waitDomainOn(t, ns, "web", a.name, 10*time.Second)
	// The agent indexes the domain's disk when it finds the domain, ahead
	// of any migration, and says so in the XenDomain's status.
	waitFor(t, "web's disk indexed ahead of the migration", 30*time.Second, func() (bool, string) {
		d := &v1.XenDomain{}
		if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: "web"}, d); err != nil {
			return false, err.Error()
		}
		ix := d.Status.DiskIndexes
		return len(ix) == 1 && ix[0].Disk == "xvda" && ix[0].Ready && ix[0].Percent == 100, fmt.Sprintf("%+v", ix)
	})

	start := time.Now()
	create(t, migration(ns, "move-web", "web", ""))
	m := waitPhase(t, ns, "move-web", 60*time.Second, v1.MigrationSucceeded)
	t.Logf("migration took %s wall time", time.Since(start).Round(time.Millisecond))

	if m.Status.SourceHost != a.name || m.Status.TargetHost != ns+"-b" {
		t.Fatalf("hosts: source %q target %q, want %s → %s-b (the only other host)", m.Status.SourceHost, m.Status.TargetHost, a.name, ns)
	}
	if m.Status.Result == nil || !m.Status.Result.Verified {
		t.Fatalf("result %+v: want a verified result", m.Status.Result)
	}
	if m.Status.Progress == nil || m.Status.Progress.Percent != 100 || m.Status.ProgressText != "100%" {
		t.Fatalf("progress %+v %q: want 100%%", m.Status.Progress, m.Status.ProgressText)
	}
	if m.Status.Parameters == nil || m.Status.Parameters.EngineStrategy != "hybrid+dedup" {
		t.Fatalf("parameters %+v: want the default hybrid+dedup", m.Status.Parameters)
	}
	if m.Status.Result.Pages.Disk == 0 || m.Status.Result.DedupSavedBytes == 0 {
		t.Errorf("dedup: %d disk pages, %d bytes saved; want both > 0 (40%% of memory comes from the disk)", m.Status.Result.Pages.Disk, m.Status.Result.DedupSavedBytes)
	}
	for _, c := range []string{v1.ValidCondition, v1.ScheduledCondition, v1.TargetReadyCondition, v1.ResumedOnTargetCondition, v1.CompletedCondition} {
		if cond := condition(m, c); cond == nil || cond.Status != metav1.ConditionTrue {
			t.Errorf("condition %s = %+v, want True", c, cond)
		}
	}
	// Phases went forward through the handshake.
	var phases []string
	for _, p := range m.Status.PhaseTransitionTimestamps {
		phases = append(phases, string(p.Phase))
	}
	got := strings.Join(phases, ",")
	for _, want := range []string{"Pending", "Scheduling", "PreparingTarget", "TargetReady", "Succeeded"} {
		if !strings.Contains(got, want) {
			t.Errorf("phase transitions %s miss %s", got, want)
		}
	}
	// The domain now runs on the target, and only there.
	waitDomainOn(t, ns, "web", ns+"-b", 10*time.Second)
	if _, ok := a.host.Domain("web"); ok {
		t.Errorf("domain web still exists on the source host after a successful migration")
	}
	// The token Secret is gone once the migration is final.
	waitFor(t, "token Secret deleted", 10*time.Second, func() (bool, string) {
		var l corev1.SecretList
		if err := k8s.List(context.Background(), &l, client.InNamespace(ns)); err != nil {
			return false, err.Error()
		}
		return len(l.Items) == 0, "secrets remain"
	})
	waitEvents(t, m, v1.ReasonTargetSelected, v1.ReasonResumed, v1.ReasonSucceeded)
	t.Logf("reconciles for one migration: %.0f; result: %s total, %s downtime, %d bytes sent, %d saved by dedup",
		counterValue(t, metrics.Reconciles), m.Status.Result.TotalTime.Duration, m.Status.Result.Downtime.Duration,
		m.Status.Result.BytesSent, m.Status.Result.DedupSavedBytes)
}

// Specs that the API server refuses, with the message the user sees.
func TestAPIServerRejectsBadSpecs(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	neg := resource.MustParse("-1Mi")
	no := false
	cases := []struct {
		name string
		mig  *v1.VMMigration
		want string
	}{
		{"negative bandwidth is refused", migration(ns, "neg", "web", "", func(m *v1.VMMigration) { m.Spec.Bandwidth = &neg }), "bandwidth must not be negative"},
		{"an unknown strategy is refused", migration(ns, "strat", "web", "", func(m *v1.VMMigration) { m.Spec.Strategy = "Teleport" }), `supported values: "PreCopy", "PostCopy", "Hybrid"`},
		{"an empty domain is refused", migration(ns, "empty", "", ""), "spec.domain"},
		{"post-copy strategy without post-copy is refused", migration(ns, "pc", "web", "", func(m *v1.VMMigration) {
			m.Spec.Strategy = v1.StrategyPostCopy
			m.Spec.AllowPostCopy = &no
		}), "strategy PostCopy and Hybrid need allowPostCopy"},
		{"a zero max downtime is refused", migration(ns, "dt", "web", "", func(m *v1.VMMigration) { m.Spec.MaxDowntime = &metav1.Duration{} }), "maxDowntime must be a positive duration"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			err := k8s.Create(context.Background(), c.mig)
			if err == nil {
				t.Fatalf("created; want a rejection mentioning %q", c.want)
			}
			if !apierrors.IsInvalid(err) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("error %v; want Invalid mentioning %q", err, c.want)
			}
		})
	}
	// Immutability and cancel cannot be undone.
	m := migration(ns, "immut", "nothing-here", "", func(m *v1.VMMigration) { m.Spec.Cancel = true })
	create(t, m)
	m.Spec.Domain = "other"
	if err := k8s.Update(context.Background(), m); err == nil || !strings.Contains(err.Error(), "domain is immutable") {
		t.Fatalf("changing the domain: %v; want 'domain is immutable'", err)
	}
	m = getMig(t, ns, "immut")
	m.Spec.TargetHost = "elsewhere"
	if err := k8s.Update(context.Background(), m); err == nil || !strings.Contains(err.Error(), "targetHost is immutable") {
		t.Fatalf("setting the target host: %v; want 'targetHost is immutable'", err)
	}
	m = getMig(t, ns, "immut")
	m.Spec.Cancel = false
	if err := k8s.Update(context.Background(), m); err == nil || !strings.Contains(err.Error(), "cancel cannot be undone") {
		t.Fatalf("undoing cancel: %v; want 'cancel cannot be undone'", err)
	}
}

// Specs that are well-formed but impossible fail with a clear reason.
func TestControllerRejectsImpossibleMigrations(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	startController(t, ctrlOpts{})
	src, small, cordoned, xen := ns+"-src", ns+"-small", ns+"-cordoned", ns+"-xen"
	fakeHost(t, src, "sim", 8<<30, 4<<30)
	fakeHost(t, small, "sim", 512<<20, 512<<20)
	fakeHost(t, cordoned, "sim", 8<<30, 8<<30)
	fakeHost(t, xen, "xen", 8<<30, 8<<30)
	h := &v1.XenHost{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Name: cordoned}, h); err != nil {
		t.Fatal(err)
	}
	// A merge patch: the fake host's heartbeat writes its status meanwhile.
	cordon := client.MergeFrom(h.DeepCopy())
	h.Spec.Unschedulable = true
	if err := k8s.Patch(context.Background(), h, cordon); err != nil {
		t.Fatal(err)
	}
	fakeDomain(t, ns, "db", src, 1<<30)
	stopped := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "stopped"}, Spec: v1.XenDomainSpec{DomainName: "stopped", MemoryBytes: 1 << 20}}
	create(t, stopped)

	cases := []struct {
		name, domain, target, reason, msg string
	}{
		{"a missing domain fails", "ghost", "", v1.ReasonDomainNotFound, `XenDomain "ghost" does not exist`},
		{"a domain that is not running fails", "stopped", "", v1.ReasonDomainNotRunning, "is not running"},
		{"source equal to target fails", "db", src, v1.ReasonTargetIsSource, "is the host domain db already runs on"},
		{"an unknown target fails", "db", ns + "-nowhere", v1.ReasonTargetNotFound, "has no XenHost"},
		{"a target without capacity fails", "db", small, v1.ReasonInsufficientCapacity, "but domain db needs 1.00 GiB"},
		{"a cordoned target fails", "db", cordoned, v1.ReasonTargetUnschedulable, "is cordoned"},
		{"a target on another hypervisor fails", "db", xen, v1.ReasonIncompatibleHosts, `runs backend "sim" but target`},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			name := "bad-" + string(rune('a'+i))
			create(t, migration(ns, name, c.domain, c.target))
			m := waitPhase(t, ns, name, 20*time.Second, v1.MigrationFailed)
			cond := condition(m, v1.ValidCondition)
			if cond == nil || cond.Status != metav1.ConditionFalse || cond.Reason != c.reason || !strings.Contains(cond.Message, c.msg) {
				t.Fatalf("Valid condition %+v; want False/%s mentioning %q", cond, c.reason, c.msg)
			}
			if !strings.Contains(m.Status.FailureReason, c.msg) {
				t.Fatalf("failureReason %q does not explain (%q)", m.Status.FailureReason, c.msg)
			}
			if m.Status.TargetHost != "" || m.Status.Tokens != nil {
				t.Fatalf("a rejected migration chose target %q / sealed tokens %+v", m.Status.TargetHost, m.Status.Tokens)
			}
			// kubectl describe shows the decision as an event too.
			waitEvents(t, m, c.reason)
		})
	}
}

// counterValue reads a Prometheus counter.
func counterValue(t *testing.T, c prometheus.Collector) float64 {
	t.Helper()
	return testutil.ToFloat64(c)
}

// The most specific MigrationPolicy fills the parameters the spec leaves
// out, and the spec overrides it.
func TestMigrationPolicyDefaults(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	startController(t, ctrlOpts{})
	src, dst := ns+"-src", ns+"-dst"
	fakeHost(t, src, "sim", 8<<30, 8<<30)
	fakeHost(t, dst, "sim", 8<<30, 8<<30)
	fakeDomain(t, ns, "db", src, 1<<30)
	d := &v1.XenDomain{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: "db"}, d); err != nil {
		t.Fatal(err)
	}
	relabel := client.MergeFrom(d.DeepCopy())
	d.Labels = map[string]string{"app": "db", "tier": ns}
	if err := k8s.Patch(context.Background(), d, relabel); err != nil {
		t.Fatal(err)
	}
	bw := resource.MustParse("50Mi")
	broad := &v1.MigrationPolicy{ObjectMeta: metav1.ObjectMeta{Name: ns + "-broad"}, Spec: v1.MigrationPolicySpec{
		Selectors:           v1.MigrationPolicySelectors{DomainSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db"}}},
		MigrationParameters: v1.MigrationParameters{MaxDowntime: &metav1.Duration{Duration: time.Second}},
	}}
	specific := &v1.MigrationPolicy{ObjectMeta: metav1.ObjectMeta{Name: ns + "-specific"}, Spec: v1.MigrationPolicySpec{
		Selectors:           v1.MigrationPolicySelectors{DomainSelector: &metav1.LabelSelector{MatchLabels: map[string]string{"app": "db", "tier": ns}}},
		MigrationParameters: v1.MigrationParameters{MaxDowntime: &metav1.Duration{Duration: 120 * time.Millisecond}, Bandwidth: &bw},
	}}
	create(t, broad)
	create(t, specific)
	t.Cleanup(func() {
		_ = k8s.Delete(context.Background(), broad)
		_ = k8s.Delete(context.Background(), specific)
	})
	create(t, migration(ns, "pol", "db", dst, func(m *v1.VMMigration) { m.Spec.ProgressTimeout = &metav1.Duration{Duration: 42 * time.Second} }))
	m := waitPhase(t, ns, "pol", 10*time.Second, v1.MigrationPreparingTarget)
	p := m.Status.Parameters
	if p == nil || p.Policy != specific.Name || p.MaxDowntime.Duration != 120*time.Millisecond || p.BandwidthBytesPerSecond != 50<<20 || p.ProgressTimeout.Duration != 42*time.Second {
		t.Fatalf("parameters %+v: want policy %s (120ms, 50 MiB/s) with the spec's 42s progress timeout", p, specific.Name)
	}
	if c := condition(m, v1.ValidCondition); c == nil || !strings.Contains(c.Message, "policy "+specific.Name) {
		t.Fatalf("Valid condition %+v should name the policy", c)
	}
	setCancel(t, ns, "pol")
	waitPhase(t, ns, "pol", 10*time.Second, v1.MigrationCancelled)
}

// The agents' role lets them write their status halves but not create
// migrations or read Secrets in bulk; the controller cannot write agent
// objects. (Proves the envtest API server enforces the config/rbac roles
// the other tests run under.)
func TestRBACRolesAreEnforced(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	agent, err := client.New(as(agentUser), client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatal(err)
	}
	controller, err := client.New(as(controllerUser), client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := agent.Create(ctx, migration(ns, "sneaky", "web", "")); !apierrors.IsForbidden(err) {
		t.Fatalf("agent creating a VMMigration: %v, want Forbidden", err)
	}
	var secrets corev1.SecretList
	if err := agent.List(ctx, &secrets, client.InNamespace(ns)); !apierrors.IsForbidden(err) {
		t.Fatalf("agent listing Secrets: %v, want Forbidden", err)
	}
	if err := controller.Create(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: ns + "-h"}}); !apierrors.IsForbidden(err) {
		t.Fatalf("controller creating a XenHost: %v, want Forbidden", err)
	}
}

// Between stock Xen hosts (pre-copy through xl, no early resume) the
// controller narrows the default Hybrid to PreCopy with dedup and says so,
// and refuses PostCopy at validation.
func TestCapabilitiesResolveTheStrategy(t *testing.T) {
	requireEnv(t)
	ns := newNamespace(t)
	startController(t, ctrlOpts{grace: 2 * time.Second})
	a, b := ns+"-xa", ns+"-xb"
	fakeHost(t, a, "xen", 8<<30, 8<<30)
	fakeHost(t, b, "xen", 8<<30, 8<<30)
	fakeDomain(t, ns, "vm", a, 256<<20)

	t.Run("PostCopy between xen hosts is refused at validation", func(t *testing.T) {
		create(t, migration(ns, "post", "vm", b, strategy(v1.StrategyPostCopy)))
		m := waitPhase(t, ns, "post", 20*time.Second, v1.MigrationFailed)
		cond := condition(m, v1.ValidCondition)
		if cond == nil || cond.Status != metav1.ConditionFalse || cond.Reason != v1.ReasonUnsupportedStrategy || !strings.Contains(cond.Message, "needs early resume") {
			t.Fatalf("Valid condition %+v; want False/%s explaining early resume", cond, v1.ReasonUnsupportedStrategy)
		}
		if m.Status.TargetHost != "" || m.Status.Tokens != nil {
			t.Fatalf("a refused migration chose target %q / sealed tokens %+v", m.Status.TargetHost, m.Status.Tokens)
		}
		waitEvents(t, m, v1.ReasonUnsupportedStrategy)
	})
	t.Run("the default Hybrid runs as PreCopy with dedup", func(t *testing.T) {
		create(t, migration(ns, "auto", "vm", ""))
		m := waitPhase(t, ns, "auto", 20*time.Second, v1.MigrationPreparingTarget)
		if p := m.Status.Parameters; p == nil || p.EngineStrategy != "precopy+dedup" || p.AllowPostCopy {
			t.Fatalf("resolved parameters %+v; want precopy+dedup without post-copy", p)
		}
		cond := condition(m, v1.ValidCondition)
		if cond == nil || cond.Status != metav1.ConditionTrue || !strings.Contains(cond.Message, "Hybrid runs as PreCopy") {
			t.Fatalf("Valid condition %+v; want True saying Hybrid runs as PreCopy", cond)
		}
		if m.Status.TargetHost != b {
			t.Fatalf("target %q, want %s", m.Status.TargetHost, b)
		}
		// The fake hosts never answer: the finalizer lets the object go after
		// the grace period, so no slot stays taken for later tests.
		if err := k8s.Delete(context.Background(), m); err != nil {
			t.Fatal(err)
		}
		waitFor(t, "VMMigration auto deleted", 20*time.Second, func() (bool, string) {
			err := k8s.Get(context.Background(), client.ObjectKey{Namespace: ns, Name: "auto"}, &v1.VMMigration{})
			return apierrors.IsNotFound(err), fmt.Sprint(err)
		})
	})
}
