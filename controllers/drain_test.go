package controllers

import (
	"bytes"
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/internal/testlog"
)

const guardNS = "xenferry-system"

// drainEnv starts a real API server with the drain controller, two hosts
// (Nodes of the same names) and two domains on h1.
func drainEnv(t *testing.T, maxInFlight ...int) (client.Client, string, *rest.Config) {
	t.Helper()
	c, scheme, env := pkiEnv(t)
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	for _, ns := range []string{guardNS, "tenant"} {
		if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}); err != nil {
			t.Fatal(err)
		}
	}
	now := metav1.Now()
	for _, h := range []string{"h1", "h2"} {
		if err := c.Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: h}}); err != nil {
			t.Fatal(err)
		}
		xh := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: h}}
		if err := c.Create(ctx, xh); err != nil {
			t.Fatal(err)
		}
		xh.Status = v1.XenHostStatus{Backend: "sim", Version: "4.17", CPUs: 2, CapacityBytes: 8 << 30, FreeBytes: 6 << 30, HeartbeatTime: &now}
		if err := c.Status().Update(ctx, xh); err != nil {
			t.Fatal(err)
		}
	}
	for _, d := range []string{"d1", "d2"} {
		xd := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: "tenant", Name: d},
			Spec: v1.XenDomainSpec{DomainName: d, MemoryBytes: 64 << 20}}
		if err := c.Create(ctx, xd); err != nil {
			t.Fatal(err)
		}
		xd.Status = v1.XenDomainStatus{Host: "h1", State: "Running"}
		if err := c.Status().Update(ctx, xd); err != nil {
			t.Fatal(err)
		}
	}
	mgr, err := ctrlbuilder.NewManager(env.Config, ctrlbuilder.Options{Scheme: scheme, Logger: testlog.New(t),
		Metrics: metricsserver.Options{BindAddress: "0"}, Controller: config.Controller{SkipNameValidation: ptr.To(true)}})
	if err != nil {
		t.Fatal(err)
	}
	r := &DrainReconciler{Namespace: guardNS, GuardImage: "xenferry/controller:test", GuardCommand: []string{"/xenferry-controller", "--pause"}}
	if len(maxInFlight) > 0 {
		r.MaxInFlight = maxInFlight[0]
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := mgr.Start(ctx); err != nil {
			t.Errorf("manager: %v", err)
		}
	}()
	t.Cleanup(func() { cancel(); <-done })
	// A kubeconfig for kubectl.
	u, err := env.AddUser(envUser(), nil)
	if err != nil {
		t.Fatal(err)
	}
	kc, err := u.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kc, 0o600); err != nil {
		t.Fatal(err)
	}
	return c, path, env.Config
}

func eventually(t *testing.T, limit time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %s waiting for %s", limit, what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func drainMigrations(t *testing.T, c client.Client, host string) []v1.VMMigration {
	t.Helper()
	var l v1.VMMigrationList
	if err := c.List(context.Background(), &l, client.MatchingLabels{v1.ReasonLabel: "drain", v1.DrainHostLabel: host}); err != nil {
		t.Fatal(err)
	}
	return l.Items
}

// complete plays the VMMigration controller and the agents for one
// evacuation: the domain now runs on the target and the migration succeeded.
func complete(t *testing.T, c client.Client, m *v1.VMMigration, target string) {
	t.Helper()
	ctx := context.Background()
	d := &v1.XenDomain{}
	if err := c.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, d); err != nil {
		t.Fatal(err)
	}
	d.Status.Host = target
	if err := c.Status().Update(ctx, d); err != nil {
		t.Fatal(err)
	}
	m.Status.Phase = v1.MigrationSucceeded
	m.Status.StartTime = &metav1.Time{Time: time.Now()}
	m.Status.SourceHost, m.Status.TargetHost = "h1", target
	if err := c.Status().Update(ctx, m); err != nil {
		t.Fatal(err)
	}

}

// kubectl drain NODE returns only once the host's domains moved: the guard
// Pod's PodDisruptionBudget makes every eviction answer 429 until then.
func TestKubectlDrainWaitsForEvacuation(t *testing.T) {
	kubectl, err := exec.LookPath("kubectl")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("CI is set but kubectl is not on PATH")
		}
		t.Skip("kubectl not on PATH")
	}
	c, kc, _ := drainEnv(t)
	ctx := context.Background()
	guard := types.NamespacedName{Namespace: guardNS, Name: GuardPrefix + "h1"}
	eventually(t, 45*time.Second, "the guard Pod and PodDisruptionBudget of h1", func() bool {
		return c.Get(ctx, guard, &corev1.Pod{}) == nil && c.Get(ctx, guard, &policyv1.PodDisruptionBudget{}) == nil
	})
	runGuard(t, c, guard)
	var out bytes.Buffer
	cmd := exec.Command(kubectl, "--kubeconfig", kc, "drain", "h1", "--ignore-daemonsets", "--timeout=90s")
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() { _ = cmd.Process.Kill() })

	// kubectl cordons the Node; the controller evacuates the host.
	eventually(t, 45*time.Second, "two evacuation migrations of h1", func() bool { return len(drainMigrations(t, c, "h1")) == 2 })
	for _, m := range drainMigrations(t, c, "h1") {
		if m.Spec.Priority != v1.PriorityEvacuation || m.Spec.TargetHost != "" {
			t.Errorf("evacuation %s: priority %q target %q; want Evacuation and a target chosen by the controller", m.Name, m.Spec.Priority, m.Spec.TargetHost)
		}
	}
	h := &v1.XenHost{}
	eventually(t, 30*time.Second, "Draining=True (NodeCordoned) on h1", func() bool {
		_ = c.Get(ctx, types.NamespacedName{Name: "h1"}, h)
		cond := meta.FindStatusCondition(h.Status.Conditions, v1.HostDrainingCondition)
		return cond != nil && cond.Status == metav1.ConditionTrue && cond.Reason == v1.DrainReasonNodeCordoned
	})
	select {
	case err := <-exited:
		t.Fatalf("kubectl drain returned before the domains moved (err %v):\n%s", err, out.String())
	case <-time.After(3 * time.Second):
	}

	// One domain moves: the drain still waits.
	migs := drainMigrations(t, c, "h1")
	complete(t, c, &migs[0], "h2")
	select {
	case err := <-exited:
		t.Fatalf("kubectl drain returned with a domain left (err %v):\n%s", err, out.String())
	case <-time.After(3 * time.Second):
	}
	complete(t, c, &migs[1], "h2")
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("kubectl drain failed: %v\n%s", err, out.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("kubectl drain did not return after the host was evacuated:\n%s", out.String())
	}
	eventually(t, 30*time.Second, "h1 Evacuated with 2 domains migrated and none left", func() bool {
		// Fresh: a zero count is omitted, and decoding into an object
		// read earlier would keep its old value.
		h := &v1.XenHost{}
		_ = c.Get(ctx, types.NamespacedName{Name: "h1"}, h)
		d := h.Status.Drain
		return meta.IsStatusConditionTrue(h.Status.Conditions, v1.HostEvacuatedCondition) && d != nil && d.Migrated == 2 && d.Domains == 0
	})
	if err := c.Get(ctx, guard, &corev1.Pod{}); !apierrors.IsNotFound(err) {
		t.Errorf("guard Pod still there after the drain: %v", err)
	}
	t.Logf("kubectl drain:\n%s", out.String())
}

// Undrain stops new evacuations and cancels those not past the point of
// no return; one that already resumed on its target is left to finish.
func TestUndrainCancelsEvacuations(t *testing.T) {
	c, _, _ := drainEnv(t)
	ctx := context.Background()
	h := &v1.XenHost{}
	if err := c.Get(ctx, types.NamespacedName{Name: "h1"}, h); err != nil {
		t.Fatal(err)
	}
	h.Spec.Drain = true
	if err := c.Update(ctx, h); err != nil {
		t.Fatal(err)
	}
	eventually(t, 45*time.Second, "two evacuation migrations", func() bool { return len(drainMigrations(t, c, "h1")) == 2 })
	migs := drainMigrations(t, c, "h1")
	// The first is past the point of no return.
	past := &migs[0]
	past.Status.Phase = v1.MigrationPostCopy
	past.Status.SourceHost, past.Status.TargetHost = "h1", "h2"
	past.Status.Target = &v1.TargetState{Host: "h2", Resumed: true}
	past.Status.Conditions = []metav1.Condition{{Type: v1.ResumedOnTargetCondition, Status: metav1.ConditionTrue, Reason: v1.ReasonResumed, LastTransitionTime: metav1.Now()}}
	if err := c.Status().Update(ctx, past); err != nil {
		t.Fatal(err)
	}
	if err := c.Get(ctx, types.NamespacedName{Name: "h1"}, h); err != nil {
		t.Fatal(err)
	}
	h.Spec.Drain = false
	if err := c.Update(ctx, h); err != nil {
		t.Fatal(err)
	}
	eventually(t, 45*time.Second, "the second evacuation cancelled", func() bool {
		m := &v1.VMMigration{}
		_ = c.Get(ctx, client.ObjectKeyFromObject(&migs[1]), m)
		return m.Spec.Cancel
	})
	m := &v1.VMMigration{}
	if err := c.Get(ctx, client.ObjectKeyFromObject(past), m); err != nil {
		t.Fatal(err)
	}
	if m.Spec.Cancel {
		t.Error("undrain cancelled a migration past the point of no return")
	}
	eventually(t, 30*time.Second, "Draining=False", func() bool {
		// A fresh object: decoding into h would keep its status.drain
		// from an earlier read when the server's answer omits it.
		h := &v1.XenHost{}
		_ = c.Get(ctx, types.NamespacedName{Name: "h1"}, h)
		cond := meta.FindStatusCondition(h.Status.Conditions, v1.HostDrainingCondition)
		return cond != nil && cond.Status == metav1.ConditionFalse && h.Status.Drain == nil
	})
	time.Sleep(2 * time.Second)
	if n := len(drainMigrations(t, c, "h1")); n != 2 {
		t.Errorf("%d evacuation migrations after the undrain; want the 2 from before", n)
	}
}

func envUser() envtest.User {
	return envtest.User{Name: "drain-admin", Groups: []string{"system:masters"}}
}

// runGuard does what the kubelet of the Node would: it runs the guard Pod
// (Running and Ready). A pending Pod is not protected by a
// PodDisruptionBudget: the eviction API deletes it directly.
func runGuard(t *testing.T, c client.Client, key types.NamespacedName) {
	t.Helper()
	pod := &corev1.Pod{}
	if err := c.Get(context.Background(), key, pod); err != nil {
		t.Fatal(err)
	}
	pod.Status.Phase = corev1.PodRunning
	pod.Status.Conditions = []corev1.PodCondition{{Type: corev1.PodReady, Status: corev1.ConditionTrue, LastTransitionTime: metav1.Now()}}
	if err := c.Status().Update(context.Background(), pod); err != nil {
		t.Fatal(err)
	}
}

// A Cluster API Machine being deleted drains its host; xenferry's pre-drain
// hook holds the Machine's drain until the domains moved.
func TestMachineDeletionDrainsBehindPreDrainHook(t *testing.T) {
	c, _, cfg := drainEnv(t)
	ctx := context.Background()
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{Paths: []string{filepath.Join("testdata", "capi")}}); err != nil {
		t.Fatal(err)
	}
	if err := c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "capi"}}); err != nil {
		t.Fatal(err)
	}
	m := &unstructured.Unstructured{}
	m.SetGroupVersionKind(machineGVK)
	m.SetNamespace("capi")
	m.SetName("md-0-h1")
	m.SetFinalizers([]string{"test.xenferry.io/hold"}) // stands in for Cluster API's own finalizer
	if err := c.Create(ctx, m); err != nil {
		t.Fatal(err)
	}
	node := &corev1.Node{}
	if err := c.Get(ctx, types.NamespacedName{Name: "h1"}, node); err != nil {
		t.Fatal(err)
	}
	node.Annotations = map[string]string{capiMachineAnnotation: "md-0-h1", capiNamespaceAnnotation: "capi"}
	if err := c.Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	hooked := func() bool {
		got := &unstructured.Unstructured{}
		got.SetGroupVersionKind(machineGVK)
		_ = c.Get(ctx, types.NamespacedName{Namespace: "capi", Name: "md-0-h1"}, got)
		_, ok := got.GetAnnotations()[PreDrainHookAnnotation]
		return ok
	}
	// The Node update is an event; the hook follows.
	eventually(t, 45*time.Second, "the pre-drain hook on the Machine of h1", hooked)
	if err := c.Delete(ctx, m); err != nil {
		t.Fatal(err)
	}
	eventually(t, 60*time.Second, "evacuations of h1 for the Machine's deletion", func() bool { return len(drainMigrations(t, c, "h1")) == 2 })
	// The evacuations are created before the reconcile writes the status.
	h := &v1.XenHost{}
	eventually(t, 30*time.Second, "drain reason "+v1.DrainReasonMachineDeleted, func() bool {
		_ = c.Get(ctx, types.NamespacedName{Name: "h1"}, h)
		return h.Status.Drain != nil && h.Status.Drain.Reason == v1.DrainReasonMachineDeleted
	})
	if !hooked() {
		t.Fatal("hook removed before the domains moved")
	}
	for _, mig := range drainMigrations(t, c, "h1") {
		complete(t, c, &mig, "h2")
	}
	eventually(t, 45*time.Second, "the hook removed once h1 is evacuated", func() bool { return !hooked() })
}

// With one evacuation at a time, the domain predicted to move fastest goes
// first, and the next starts when it ended.
func TestDrainMovesTheCheapestFirst(t *testing.T) {
	c, _, _ := drainEnv(t, 1)
	ctx := context.Background()
	for name, secs := range map[string]time.Duration{"d1": 30 * time.Second, "d2": 2 * time.Second} {
		d := &v1.XenDomain{}
		if err := c.Get(ctx, types.NamespacedName{Namespace: "tenant", Name: name}, d); err != nil {
			t.Fatal(err)
		}
		d.Status.PredictedCost = &v1.MigrationCost{Bytes: 1 << 20, Time: metav1.Duration{Duration: secs}}
		if err := c.Status().Update(ctx, d); err != nil {
			t.Fatal(err)
		}
	}
	h := &v1.XenHost{}
	if err := c.Get(ctx, types.NamespacedName{Name: "h1"}, h); err != nil {
		t.Fatal(err)
	}
	h.Spec.Drain = true
	if err := c.Update(ctx, h); err != nil {
		t.Fatal(err)
	}
	eventually(t, 45*time.Second, "the first evacuation", func() bool { return len(drainMigrations(t, c, "h1")) == 1 })
	time.Sleep(2 * time.Second)
	migs := drainMigrations(t, c, "h1")
	if len(migs) != 1 || migs[0].Spec.Domain != "d2" {
		t.Fatalf("evacuations %v; want only d2, the cheaper one", migs)
	}
	complete(t, c, &migs[0], "h2")
	eventually(t, 45*time.Second, "the second evacuation after the first ended", func() bool { return len(drainMigrations(t, c, "h1")) == 2 })
}
