package main

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/cli-runtime/pkg/genericiooptions"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// syncBuffer is an io.Writer a running command writes while the test reads.
type syncBuffer struct {
	mu sync.Mutex
	b  strings.Builder
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// pluginEnv is a real API server (without a controller) and a kubeconfig
// file for the plugin's --kubeconfig.
type pluginEnv struct {
	t          *testing.T
	c          client.Client
	kubeconfig string
}

// startAPIServer starts kube-apiserver and etcd from KUBEBUILDER_ASSETS
// (default bin/; skipped when they are missing unless CI is set) with no
// CRDs installed: installCRDs adds them.
func startAPIServer(t *testing.T) (*pluginEnv, *envtest.Environment) {
	t.Helper()
	assets := os.Getenv("KUBEBUILDER_ASSETS")
	if assets == "" {
		assets, _ = filepath.Abs("../../bin")
	}
	for _, b := range []string{"kube-apiserver", "etcd"} {
		if _, err := os.Stat(filepath.Join(assets, b)); err != nil {
			if os.Getenv("CI") != "" {
				t.Fatalf("CI is set but %s is missing from %s", b, assets)
			}
			t.Skipf("%s not found in %s: run `make tools`", b, assets)
		}
	}
	env := &envtest.Environment{BinaryAssetsDirectory: assets}
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Logf("stop envtest: %v", err)
		}
	})
	scheme := runtime.NewScheme()
	_ = clientgoscheme.AddToScheme(scheme)
	_ = v1.AddToScheme(scheme)
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(kubeconfig, env.KubeConfig, 0o600); err != nil {
		t.Fatal(err)
	}
	return &pluginEnv{t: t, c: c, kubeconfig: kubeconfig}, env
}

// run runs the plugin's command line to the end.
func (e *pluginEnv) run(args ...string) (stdout, stderr string, err error) {
	var out, errOut syncBuffer
	err = e.start(context.Background(), &out, &errOut, args...)()
	return out.String(), errOut.String(), err
}

// start runs a command line in the background; wait returns its error.
func (e *pluginEnv) start(ctx context.Context, out, errOut *syncBuffer, args ...string) (wait func() error) {
	cmd := newRootCommand(genericiooptions.IOStreams{In: strings.NewReader(""), Out: out, ErrOut: errOut})
	cmd.SetArgs(append(args, "--kubeconfig", e.kubeconfig))
	done := make(chan error, 1)
	go func() { done <- cmd.ExecuteContext(ctx) }()
	return func() error {
		select {
		case err := <-done:
			return err
		case <-time.After(30 * time.Second):
			e.t.Fatalf("kubectl xenferry %s did not end; stdout:\n%s\nstderr:\n%s", strings.Join(args, " "), out, errOut)
			return nil
		}
	}
}

// migrate runs `migrate ARGS` and returns the created migration's name.
func (e *pluginEnv) migrate(args ...string) string {
	e.t.Helper()
	out, _, err := e.run(append([]string{"migrate"}, args...)...)
	if err != nil {
		e.t.Fatalf("migrate %v: %v", args, err)
	}
	return strings.TrimPrefix(strings.Fields(out)[0], "vmmigration/")
}

// waitFor waits until the output has a line containing want.
func (e *pluginEnv) waitFor(out *syncBuffer, want string) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !strings.Contains(out.String(), want) {
		if time.Now().After(deadline) {
			e.t.Fatalf("no %q in the output:\n%s", want, out)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// setStatus writes a migration's status as the controller would.
func (e *pluginEnv) setMigrationStatus(name string, f func(st *v1.VMMigrationStatus)) {
	e.t.Helper()
	ctx := context.Background()
	var m v1.VMMigration
	if err := e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: name}, &m); err != nil {
		e.t.Fatal(err)
	}
	f(&m.Status)
	if err := e.c.Status().Update(ctx, &m); err != nil {
		e.t.Fatalf("status of %s: %v", name, err)
	}
}

func (e *pluginEnv) setHostStatus(name string, f func(h *v1.XenHost)) {
	e.t.Helper()
	ctx := context.Background()
	var h v1.XenHost
	if err := e.c.Get(ctx, types.NamespacedName{Name: name}, &h); err != nil {
		e.t.Fatal(err)
	}
	f(&h)
	if err := e.c.Status().Update(ctx, &h); err != nil {
		e.t.Fatalf("status of %s: %v", name, err)
	}
}

func cond(typ string, status metav1.ConditionStatus, reason string) metav1.Condition {
	return metav1.Condition{Type: typ, Status: status, Reason: reason, Message: reason}
}

// TestPluginAgainstAPIServer runs the cobra commands against a real API
// server, with the test playing the controller's part in the status.
func TestPluginAgainstAPIServer(t *testing.T) {
	e, env := startAPIServer(t)
	ctx := context.Background()

	// Without the CRDs, the error says so and how to install them.
	if _, _, err := e.run("hosts"); err == nil || !strings.Contains(err.Error(), "CRDs are not installed") ||
		!strings.Contains(err.Error(), "kubectl apply -k config/crd") {
		t.Fatalf("hosts without CRDs: %v", err)
	}
	if _, err := envtest.InstallCRDs(env.Config, envtest.CRDInstallOptions{
		Paths: []string{filepath.Join("..", "..", "config", "crd", "bases")}, ErrorIfPathMissing: true,
	}); err != nil {
		t.Fatalf("install CRDs: %v", err)
	}

	if err := e.c.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}); err != nil {
		t.Fatal(err)
	}
	hosts := map[string]v1.XenHostStatus{
		"host-a": {Backend: "sim", CPUs: 4, CapacityBytes: 8 << 30, FreeBytes: 5 << 30, Domains: 2, Load: &v1.HostLoad{CPUMillis: 1500}},
		"host-b": {Backend: "sim", CPUs: 8, CapacityBytes: 16 << 30, FreeBytes: 16 << 30},
	}
	for name, st := range hosts {
		if err := e.c.Create(ctx, &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
			t.Fatal(err)
		}
		e.setHostStatus(name, func(h *v1.XenHost) {
			h.Status = st
			meta.SetStatusCondition(&h.Status.Conditions, cond(v1.HostAgentReadyCondition, metav1.ConditionTrue, "Heartbeat"))
		})
	}
	d := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Name: "web", Namespace: "demo"}, Spec: v1.XenDomainSpec{DomainName: "web", MemoryBytes: 1 << 30}}
	if err := e.c.Create(ctx, d); err != nil {
		t.Fatal(err)
	}
	d.Status.Host, d.Status.State = "host-a", "Running"
	if err := e.c.Status().Update(ctx, d); err != nil {
		t.Fatal(err)
	}

	t.Run("hosts lists every host with its capacity and load", func(t *testing.T) {
		out, _, err := e.run("hosts")
		if err != nil {
			t.Fatal(err)
		}
		for name := range hosts {
			var h v1.XenHost
			if err := e.c.Get(ctx, types.NamespacedName{Name: name}, &h); err != nil {
				t.Fatal(err)
			}
			want := fmt.Sprintf("%s %s True false False %d %s %s %s", name, h.Status.Backend, h.Status.Domains,
				memoryText(&h), cpuText(&h), freeText(&h))
			if !hasRow(out, want) {
				t.Errorf("no row %q in\n%s", want, out)
			}
		}
	})

	var created string
	t.Run("migrate creates a VMMigration for the domain", func(t *testing.T) {
		out, _, err := e.run("migrate", "web", "--to", "host-b", "--strategy", "precopy", "-n", "demo")
		if err != nil {
			t.Fatal(err)
		}
		var list v1.VMMigrationList
		if err := e.c.List(ctx, &list, client.InNamespace("demo")); err != nil {
			t.Fatal(err)
		}
		if len(list.Items) != 1 {
			t.Fatalf("want 1 VMMigration, got %d", len(list.Items))
		}
		m := list.Items[0]
		created = m.Name
		if m.GenerateName != "web-" || m.Spec.Domain != "web" || m.Spec.TargetHost != "host-b" || m.Spec.Strategy != v1.StrategyPreCopy || m.Spec.Cancel {
			t.Errorf("created %s: generateName %q, spec %+v", m.Name, m.GenerateName, m.Spec)
		}
		if !strings.Contains(out, "vmmigration/"+m.Name+" created") {
			t.Errorf("output does not name the migration: %q", out)
		}
	})

	t.Run("migrate refuses what cannot work, and says what to do", func(t *testing.T) {
		for _, tc := range []struct {
			args []string
			want string
		}{
			{[]string{"migrate", "nosuch", "-n", "demo"}, "kubectl get xendomains -n demo"},
			{[]string{"migrate", "web", "--to", "host-z", "-n", "demo"}, "kubectl xenferry hosts"},
			{[]string{"migrate", "web", "--to", "host-a", "-n", "demo"}, "already runs on host-a"},
			{[]string{"migrate", "web", "--strategy", "fast", "-n", "demo"}, "use PreCopy, PostCopy or Hybrid"},
		} {
			if _, _, err := e.run(tc.args...); err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("%v: error %v, want one with %q", tc.args, err, tc.want)
			}
		}
		var list v1.VMMigrationList
		if err := e.c.List(ctx, &list, client.InNamespace("demo")); err != nil || len(list.Items) != 1 {
			t.Errorf("a refused migrate created something: %d migrations, %v", len(list.Items), err)
		}
	})

	t.Run("status without a terminal prints a line per change, then the result", func(t *testing.T) {
		var out, errOut syncBuffer
		wait := e.start(ctx, &out, &errOut, "status", created, "--watch", "-n", "demo")
		e.waitFor(&out, created+" Pending")
		steps := []v1.MigrationProgress{
			{Round: 1, Percent: 10, BytesSent: 100 << 20, RemainingBytes: 900 << 20, TransferRate: 300 << 20},
			{Round: 2, Percent: 60, BytesSent: 600 << 20, RemainingBytes: 400 << 20, TransferRate: 200 << 20, Pages: v1.PageClasses{Disk: 2560}},
		}
		for _, p := range steps {
			e.setMigrationStatus(created, func(st *v1.VMMigrationStatus) {
				st.Phase, st.SourceHost, st.TargetHost = v1.MigrationPreCopy, "host-a", "host-b"
				st.Progress = p.DeepCopy()
			})
			var m v1.VMMigration
			_ = e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: created}, &m)
			e.waitFor(&out, created+" "+progressText(&m)+"\n")
		}
		e.setMigrationStatus(created, func(st *v1.VMMigrationStatus) {
			st.Phase = v1.MigrationSucceeded
			st.Result = &v1.MigrationResult{TotalTime: metav1.Duration{Duration: 3 * time.Second}, BytesSent: 700 << 20, DedupSavedBytes: 10 << 20}
		})
		if err := wait(); err != nil {
			t.Fatalf("status --watch of a Succeeded migration: %v", err)
		}
		var m v1.VMMigration
		_ = e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: created}, &m)
		lines := strings.Split(strings.TrimSuffix(out.String(), "\n"), "\n")
		if len(lines) != 4 || !strings.HasSuffix(lines[3], " "+resultLine(&m)) {
			t.Errorf("want Pending, two progress lines and the result line %q, got:\n%s", resultLine(&m), out.String())
		}
		if !strings.Contains(lines[2], "PreCopy 60%") || !strings.Contains(lines[2], "ETA 2.0s") || !strings.Contains(lines[2], "dedup saved 10.0MiB") {
			t.Errorf("progress line lacks percent, ETA or dedup: %q", lines[2])
		}

		table, _, err := e.run("status", "-n", "demo")
		if err != nil || !hasRow(table, created+" web Succeeded host-a host-b 100% User") {
			t.Errorf("status table (%v):\n%s", err, table)
		}
	})

	t.Run("cancel sets spec.cancel; status --watch exits 2 when cancelled", func(t *testing.T) {
		name := e.migrate("web", "-n", "demo")
		var watchOut, watchErr syncBuffer
		wait := e.start(ctx, &watchOut, &watchErr, "status", name, "-w", "-n", "demo")
		e.waitFor(&watchOut, name+" Pending")

		if _, _, err := e.run("cancel", name, "-n", "demo"); err != nil {
			t.Fatal(err)
		}
		var m v1.VMMigration
		if err := e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: name}, &m); err != nil || !m.Spec.Cancel {
			t.Fatalf("spec.cancel of %s: %t, %v", name, m.Spec.Cancel, err)
		}
		e.setMigrationStatus(name, func(st *v1.VMMigrationStatus) {
			st.Phase, st.FailureReason, st.SourceHost = v1.MigrationCancelled, "Cancelled: spec.cancel", "host-a"
		})
		err := wait()
		if exitCode(err, &strings.Builder{}) != exitOutcome {
			t.Errorf("status --watch of a cancelled migration: %v (exit %d), want exit %d", err, exitCode(err, &strings.Builder{}), exitOutcome)
		}
		if !strings.Contains(watchOut.String(), name+" Cancelled: Cancelled: spec.cancel; domain web runs on host-a") {
			t.Errorf("no result line:\n%s", watchOut.String())
		}
	})

	t.Run("cancel past the point of no return changes nothing and says so", func(t *testing.T) {
		name := e.migrate("web", "-n", "demo")
		e.setMigrationStatus(name, func(st *v1.VMMigrationStatus) {
			st.Phase, st.SourceHost, st.TargetHost = v1.MigrationPostCopy, "host-a", "host-b"
			meta.SetStatusCondition(&st.Conditions, cond(v1.ResumedOnTargetCondition, metav1.ConditionTrue, v1.ReasonResumed))
		})
		_, _, err := e.run("cancel", name, "-n", "demo")
		if err == nil || !strings.Contains(err.Error(), "past the point of no return") || !strings.Contains(err.Error(), "runs on host-b") {
			t.Errorf("cancel after the resume: %v", err)
		}
		var m v1.VMMigration
		if err := e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: name}, &m); err != nil || m.Spec.Cancel {
			t.Errorf("spec.cancel was set past the point of no return (%v)", err)
		}
		if _, _, err := e.run("cancel", "nosuch", "-n", "demo"); err == nil ||
			!strings.Contains(err.Error(), `VMMigration "nosuch" in namespace "demo" not found: list them with `+"`kubectl xenferry status -n demo`") {
			t.Errorf("cancel of a missing migration: %v", err)
		}
	})

	t.Run("drain and undrain flip spec.drain; drain --watch follows to Evacuated", func(t *testing.T) {
		drained := func() bool {
			var h v1.XenHost
			if err := e.c.Get(ctx, types.NamespacedName{Name: "host-a"}, &h); err != nil {
				t.Fatal(err)
			}
			return h.Spec.Drain
		}
		if _, _, err := e.run("drain", "host-a"); err != nil || !drained() {
			t.Fatalf("drain: %v, spec.drain %t", err, drained())
		}
		if _, _, err := e.run("undrain", "host-a"); err != nil || drained() {
			t.Fatalf("undrain: %v, spec.drain %t", err, drained())
		}

		var out, errOut syncBuffer
		wait := e.start(ctx, &out, &errOut, "drain", "host-a", "--watch")
		e.waitFor(&out, "host-a drain requested, waiting for the controller · Draining=- Evacuated=-")
		if !drained() {
			t.Fatal("drain --watch did not set spec.drain")
		}
		e.setHostStatus("host-a", func(h *v1.XenHost) {
			h.Status.Drain = &v1.DrainStatus{Reason: v1.DrainReasonRequested, Domains: 2, Migrating: 1,
				Blocked: []v1.BlockedDomain{{Namespace: "demo", Name: "db", Reason: "no host has room"}}}
			meta.SetStatusCondition(&h.Status.Conditions, cond(v1.HostDrainingCondition, metav1.ConditionTrue, v1.DrainReasonRequested))
			meta.SetStatusCondition(&h.Status.Conditions, cond(v1.HostEvacuatedCondition, metav1.ConditionFalse, "DomainsLeft"))
		})
		e.waitFor(&out, "host-a 2 left · 1 migrating · 0 migrated · 0 failed · Draining=True Evacuated=False · blocked: demo/db (no host has room)")
		e.setHostStatus("host-a", func(h *v1.XenHost) {
			start := metav1.NewTime(time.Now().Add(-5 * time.Second))
			end := metav1.Now()
			h.Status.Drain = &v1.DrainStatus{Reason: v1.DrainReasonRequested, Migrated: 2, StartTime: &start, CompletionTime: &end}
			meta.SetStatusCondition(&h.Status.Conditions, cond(v1.HostEvacuatedCondition, metav1.ConditionTrue, "Empty"))
		})
		if err := wait(); err != nil {
			t.Fatalf("drain --watch: %v\n%s", err, out.String())
		}
		if !strings.Contains(out.String(), "host host-a evacuated in 5.0s: 2 migrated") {
			t.Errorf("no summary line:\n%s", out.String())
		}
	})

	t.Run("Ctrl-C ends a watch cleanly", func(t *testing.T) {
		name := e.migrate("web", "-n", "demo")
		wctx, cancel := context.WithCancel(ctx)
		var watchOut, watchErr syncBuffer
		wait := e.start(wctx, &watchOut, &watchErr, "status", name, "--watch", "-n", "demo")
		e.waitFor(&watchOut, name+" Pending")
		cancel()
		if err := wait(); !errors.Is(err, errInterrupted) {
			t.Errorf("interrupted watch returned %v", err)
		}
		if !strings.Contains(watchErr.String(), "Stopped watching "+name+"; the migration goes on") {
			t.Errorf("no note on stderr: %q", watchErr.String())
		}
	})

	t.Run("status -l lists and watches only the matching migrations", func(t *testing.T) {
		drain := e.migrate("web", "-n", "demo")
		var m v1.VMMigration
		if err := e.c.Get(ctx, types.NamespacedName{Namespace: "demo", Name: drain}, &m); err != nil {
			t.Fatal(err)
		}
		m.Labels = map[string]string{v1.ReasonLabel: "drain", v1.DrainHostLabel: "host-a"}
		if err := e.c.Update(ctx, &m); err != nil {
			t.Fatal(err)
		}
		sel := v1.DrainHostLabel + "=host-a"
		table, _, err := e.run("status", "-A", "-l", sel)
		if rows := strings.Split(strings.TrimSpace(table), "\n"); err != nil || len(rows) != 2 || !hasRow(table, "demo "+drain+" web Pending") {
			t.Errorf("status -A -l %s (%v): want a header and %s alone:\n%s", sel, err, drain, table)
		}

		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		var out, errOut syncBuffer
		wait := e.start(wctx, &out, &errOut, "status", "-w", "-n", "demo", "-l", sel)
		e.waitFor(&out, drain+" Pending")
		e.setMigrationStatus(created, func(st *v1.VMMigrationStatus) { st.FailureReason = "touched" }) // not selected
		e.setMigrationStatus(drain, func(st *v1.VMMigrationStatus) {
			st.Phase, st.SourceHost, st.TargetHost = v1.MigrationScheduling, "host-a", "host-b"
		})
		e.waitFor(&out, drain+" Scheduling")
		cancel()
		if err := wait(); err != nil {
			t.Errorf("Ctrl-C on a list watch: %v", err)
		}
		if strings.Contains(out.String(), created) {
			t.Errorf("the watch showed a migration the selector leaves out:\n%s", out.String())
		}
	})

	t.Run("plan shows a RebalancePolicy's status", func(t *testing.T) {
		p := &v1.RebalancePolicy{ObjectMeta: metav1.ObjectMeta{Name: "spread"}}
		if err := e.c.Create(ctx, p); err != nil {
			t.Fatal(err)
		}
		p.Status = v1.RebalancePolicyStatus{Active: true, ImbalancePercent: 40,
			Hosts: []v1.HostLoadStatus{{Host: "host-a", LoadPercent: 50}, {Host: "host-b", LoadPercent: 10}},
			Plan:  []v1.PlannedMove{{Namespace: "demo", Domain: "web", From: "host-a", To: "host-b", ImbalanceAfterPercent: 8}}}
		if err := e.c.Status().Update(ctx, p); err != nil {
			t.Fatal(err)
		}
		out, _, err := e.run("plan", "spread")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(out, "active, imbalance 40%") || !hasRow(out, "1 demo/web host-a → host-b 8%") {
			t.Errorf("plan:\n%s", out)
		}
		if _, _, err := e.run("plan", "nosuch"); err == nil || !strings.Contains(err.Error(), "kubectl get rebalancepolicies") {
			t.Errorf("plan of a missing policy: %v", err)
		}
	})
}

// hasRow reports whether a line of a table starts with these fields.
func hasRow(table, fields string) bool {
	for _, l := range strings.Split(table, "\n") {
		if strings.HasPrefix(strings.Join(strings.Fields(l), " "), fields) {
			return true
		}
	}
	return false
}
