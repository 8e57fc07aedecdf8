package agent

// Test harness: a real kube-apiserver and etcd (envtest on bin/), the
// VMMigration controller in-process, and node agents on simulated hosts that
// migrate over loopback TCP.

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/xenferry/xenferry/internal/testlog"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/yaml"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/controllers"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
	"github.com/xenferry/xenferry/pkg/xenmem/xen"
)

var (
	envOnce    sync.Once
	envErr     error
	testEnv    *envtest.Environment
	restCfg    *rest.Config
	k8s        client.Client
	testScheme = runtime.NewScheme()
	envSkip    string
)

func TestMain(m *testing.M) {
	testRole() // the stand-in xl and node-agent of the xl path tests
	code := m.Run()
	if testEnv != nil {
		if err := testEnv.Stop(); err != nil {
			fmt.Fprintf(os.Stderr, "stop envtest: %v\n", err)
		}
	}
	os.Exit(code)
}

// requireEnv starts the API server once. Without bin/ tools it skips,
// unless CI is set: in CI the tools are built first and must be there.
func requireEnv(t *testing.T) {
	t.Helper()
	envOnce.Do(func() {
		assets := os.Getenv("KUBEBUILDER_ASSETS")
		if assets == "" {
			assets, _ = filepath.Abs("../../bin")
		}
		for _, b := range []string{"kube-apiserver", "etcd"} {
			if _, err := os.Stat(filepath.Join(assets, b)); err != nil {
				envSkip = fmt.Sprintf("%s not found in %s: run `make tools` (builds kube-apiserver and etcd from the Go module proxy, ~10 min cold)", b, assets)
				return
			}
		}
		_ = clientgoscheme.AddToScheme(testScheme)
		_ = v1.AddToScheme(testScheme)
		testEnv = &envtest.Environment{
			CRDDirectoryPaths:     []string{filepath.Join("..", "..", "config", "crd", "bases")},
			ErrorIfCRDPathMissing: true,
			BinaryAssetsDirectory: assets,
		}
		restCfg, envErr = testEnv.Start()
		if envErr != nil {
			return
		}
		k8s, envErr = client.New(restCfg, client.Options{Scheme: testScheme})
		if envErr == nil {
			envErr = installRBAC()
		}
	})
	if envSkip != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("CI is set but the envtest tools are missing: %s", envSkip)
		}
		t.Skip(envSkip)
	}
	if envErr != nil {
		t.Fatalf("start envtest: %v", envErr)
	}
}

// The controller and the agents run as users bound to the ClusterRoles in
// config/rbac, so the tests also prove those roles are sufficient.
const (
	controllerUser = "test:xenferry-controller"
	agentUser      = "test:xenferry-node-agent"
)

func installRBAC() error {
	ctx := context.Background()
	for file, user := range map[string]string{"role.yaml": controllerUser, "node_agent_role.yaml": agentUser} {
		raw, err := os.ReadFile(filepath.Join("..", "..", "config", "rbac", file))
		if err != nil {
			return err
		}
		for _, doc := range strings.Split(string(raw), "\n---") {
			if strings.TrimSpace(strings.Trim(doc, "-")) == "" {
				continue
			}
			var kind struct{ Kind string }
			if err := yaml.Unmarshal([]byte(doc), &kind); err != nil {
				return fmt.Errorf("%s: %w", file, err)
			}
			subjects := []rbacv1.Subject{{APIGroup: "rbac.authorization.k8s.io", Kind: "User", Name: user}}
			switch kind.Kind {
			case "ClusterRole":
				role := &rbacv1.ClusterRole{}
				if err := yaml.Unmarshal([]byte(doc), role); err != nil {
					return fmt.Errorf("%s: %w", file, err)
				}
				if err := k8s.Create(ctx, role); err != nil {
					return fmt.Errorf("create ClusterRole %s: %w", role.Name, err)
				}
				b := &rbacv1.ClusterRoleBinding{
					ObjectMeta: metav1.ObjectMeta{Name: role.Name},
					RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: role.Name},
					Subjects:   subjects,
				}
				if err := k8s.Create(ctx, b); err != nil {
					return fmt.Errorf("create ClusterRoleBinding %s: %w", b.Name, err)
				}
			case "Role":
				// The controller's rules in the operator's namespace.
				role := &rbacv1.Role{}
				if err := yaml.Unmarshal([]byte(doc), role); err != nil {
					return fmt.Errorf("%s: %w", file, err)
				}
				ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: role.Namespace}}
				if err := k8s.Create(ctx, ns); err != nil && !apierrors.IsAlreadyExists(err) {
					return fmt.Errorf("create Namespace %s: %w", ns.Name, err)
				}
				if err := k8s.Create(ctx, role); err != nil {
					return fmt.Errorf("create Role %s/%s: %w", role.Namespace, role.Name, err)
				}
				b := &rbacv1.RoleBinding{
					ObjectMeta: metav1.ObjectMeta{Namespace: role.Namespace, Name: role.Name},
					RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "Role", Name: role.Name},
					Subjects:   subjects,
				}
				if err := k8s.Create(ctx, b); err != nil {
					return fmt.Errorf("create RoleBinding %s/%s: %w", b.Namespace, b.Name, err)
				}
			default:
				return fmt.Errorf("%s: unexpected kind %q", file, kind.Kind)
			}
		}
	}
	return nil
}

// as returns a rest config that impersonates user.
func as(user string) *rest.Config {
	c := rest.CopyConfig(restCfg)
	c.Impersonate = rest.ImpersonationConfig{UserName: user}
	return c
}

// ctrlOpts tunes the in-process controller of one test.
type ctrlOpts struct {
	limits    controllers.Limits
	defaults  controllers.Defaults
	heartbeat time.Duration
	grace     time.Duration
}

// startController runs the VMMigration controller until the test ends.
func startController(t *testing.T, o ctrlOpts) *controllers.Metrics {
	t.Helper()
	if o.heartbeat == 0 {
		o.heartbeat = 3 * time.Second
	}
	if o.grace == 0 {
		o.grace = 5 * time.Second
	}
	if o.defaults == (controllers.Defaults{}) {
		o.defaults = controllers.DefaultDefaults
	}
	skip := true
	mgr, err := ctrl.NewManager(as(controllerUser), ctrl.Options{
		Scheme:                 testScheme,
		Metrics:                metricsserver.Options{BindAddress: "0"},
		HealthProbeBindAddress: "0",
		Logger:                 testlog.New(t).WithName("controller"),
		Controller:             config.Controller{SkipNameValidation: &skip},
	})
	if err != nil {
		t.Fatalf("controller manager: %v", err)
	}
	metrics := controllers.NewMetrics(mgr.GetClient())
	if err := metrics.Register(prometheus.NewRegistry()); err != nil {
		t.Fatalf("metrics: %v", err)
	}
	r := &controllers.VMMigrationReconciler{Limits: o.limits, Defaults: o.defaults, HeartbeatTimeout: o.heartbeat, AbortGrace: o.grace, Metrics: metrics}
	// The agents' CA lives in "default" for every test (one CA, created by
	// the first controller).
	r.PKI = &controllers.PKIReconciler{Namespace: "xenferry-system"}
	if err := r.PKI.SetupWithManager(mgr); err != nil {
		t.Fatalf("setup PKI: %v", err)
	}
	if err := r.SetupWithManager(mgr); err != nil {
		t.Fatalf("setup controller: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- mgr.Start(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("controller manager: %v", err)
		}
	})
	return metrics
}

// testAgent is one in-process node agent on a simulated host.
type testAgent struct {
	name  string
	host  *sim.Host
	agent *Agent
	stop  func()
	// stateDir outlives agent restarts, as a host's disk does (the agent's key,
	// and so the tokens sealed to it, survive a restart); advertise,
	// if set, is published instead of the listener's address.
	stateDir  string
	advertise string
	// durable and recovery set Config.DurableDir and RecoveryTimeout.
	durable  string
	recovery time.Duration
}

// simDomain is a small simulated domain with a disk on shared storage.
func simDomain(name, ns, mem string, dirtyMiBps float64, disk string, seed int64) sim.DomainSpec {
	return sim.DomainSpec{
		Name: name, Namespace: ns, Memory: mem, VCPUs: 1,
		Labels:  map[string]string{"app": name},
		Disks:   []sim.DiskSpec{{ID: "xvda", Path: disk, Size: mem}},
		Profile: sim.Profile{Zero: 0.2, Disk: 0.4, DirtyMiBps: dirtyMiBps, HotFraction: 0.1, HotWriteShare: 0.9, ReadMiBps: 8, Seed: seed},
	}
}

// startAgent starts a simulated host with domains and its agent.
func startAgent(t *testing.T, name, memory string, doms ...sim.DomainSpec) *testAgent {
	t.Helper()
	host, err := sim.NewHost(sim.Config{Name: name, Memory: memory, CPUs: 2, StateDir: t.TempDir(), Domains: doms},
		testlog.New(t).WithName("sim-"+name))
	if err != nil {
		t.Fatalf("sim host %s: %v", name, err)
	}
	ta := &testAgent{name: name, host: host, stateDir: t.TempDir()}
	ta.start(t)
	t.Cleanup(func() {
		ta.stop()
		host.Close()
		deleteHost(t, name)
	})
	return ta
}

// deleteHost removes a test's XenHost: XenHosts are cluster-scoped, and one
// left behind with a recent heartbeat would be a candidate target for the
// next test's migrations.
func deleteHost(t *testing.T, name string) {
	t.Helper()
	err := k8s.Delete(context.Background(), &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}})
	if client.IgnoreNotFound(err) != nil {
		t.Errorf("delete XenHost %s: %v", name, err)
	}
}

// start runs a fresh agent process (new identity) on the same host.
func (ta *testAgent) start(t *testing.T) {
	t.Helper()
	if ta.stateDir == "" {
		ta.stateDir = t.TempDir()
	}
	a, err := New(as(agentUser), ta.host, Config{
		Host: ta.name, DataAddr: "127.0.0.1:0", AdvertiseAddr: ta.advertise, Namespace: "default",
		HeartbeatInterval: 300 * time.Millisecond, StatusInterval: 200 * time.Millisecond,
		StateDir: ta.stateDir, DurableDir: ta.durable, RecoveryTimeout: ta.recovery, Log: testlog.New(t).WithName("agent-" + ta.name),
	})
	if err != nil {
		t.Fatalf("agent %s: %v", ta.name, err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	var once sync.Once
	ta.agent = a
	ta.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Logf("agent %s stopped: %v", ta.name, err)
			}
		})
	}
}

// fakeHost registers a XenHost without an agent and keeps its heartbeat
// fresh until the returned stop is called or the test ends.
func fakeHost(t *testing.T, name, backend string, capacity, free int64) (stop func()) {
	t.Helper()
	ctx := context.Background()
	h := &v1.XenHost{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := k8s.Create(ctx, h); err != nil {
		t.Fatalf("create XenHost %s: %v", name, err)
	}
	// Like an agent, a fake host asks for a certificate, so that the
	// controller can seal tokens to it.
	key, err := pki.GenerateKey()
	if err != nil {
		t.Fatal(err)
	}
	csr, err := pki.CreateCSR(key, name)
	if err != nil {
		t.Fatal(err)
	}
	beat := func() error {
		orig := h.DeepCopy()
		now := metav1.Now()
		tls := h.Status.TLS
		if tls == nil {
			tls = &v1.HostTLS{CSR: string(csr)}
		}
		h.Status = v1.XenHostStatus{Backend: backend, Version: sim.Version, AgentID: name + "-fake", CapacityBytes: capacity, FreeBytes: free, HeartbeatTime: &now, TLS: tls,
			Capabilities: fakeCapabilities(backend)}
		return k8s.Status().Patch(ctx, h, client.MergeFrom(orig))
	}
	if err := beat(); err != nil {
		t.Fatalf("heartbeat XenHost %s: %v", name, err)
	}
	quit := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		tk := time.NewTicker(300 * time.Millisecond)
		defer tk.Stop()
		for {
			select {
			case <-quit:
				return
			case <-tk.C:
				_ = beat()
			}
		}
	}()
	var once sync.Once
	stop = func() { once.Do(func() { close(quit); wg.Wait() }) }
	t.Cleanup(func() {
		stop()
		deleteHost(t, name)
	})
	return stop
}

// fakeCapabilities are what a real agent of backend publishes.
func fakeCapabilities(backend string) *v1.HostCapabilities {
	if backend == "xen" {
		return capabilitiesOf(xen.Capabilities)
	}
	return capabilitiesOf(sim.Capabilities)
}

// fakeDomain publishes a XenDomain running on host, without a real domain.
func fakeDomain(t *testing.T, ns, name, host string, mem int64) {
	t.Helper()
	ctx := context.Background()
	d := &v1.XenDomain{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: v1.XenDomainSpec{DomainName: name, MemoryBytes: mem, VCPUs: 1}}
	if err := k8s.Create(ctx, d); err != nil {
		t.Fatalf("create XenDomain %s: %v", name, err)
	}
	orig := d.DeepCopy()
	d.Status = v1.XenDomainStatus{Host: host, DomID: 7, State: "Running"}
	if err := k8s.Status().Patch(ctx, d, client.MergeFrom(orig)); err != nil {
		t.Fatalf("status of XenDomain %s: %v", name, err)
	}
}

var nsSeq int

// newNamespace creates a namespace for one test.
func newNamespace(t *testing.T) string {
	t.Helper()
	nsSeq++
	name := fmt.Sprintf("t%d-%s", nsSeq, strings.ToLower(strings.NewReplacer("/", "-", "_", "-").Replace(t.Name())))
	if len(name) > 50 {
		name = name[:50]
	}
	name = strings.TrimRight(name, "-")
	if err := k8s.Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatalf("create namespace: %v", err)
	}
	return name
}

// sharedDisk is a path on "shared storage" for a domain's disk.
func sharedDisk(t *testing.T, dir, name string) string {
	return filepath.Join(dir, name+".img")
}

func migration(ns, name, domain, target string, mut ...func(*v1.VMMigration)) *v1.VMMigration {
	m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name}, Spec: v1.VMMigrationSpec{Domain: domain, TargetHost: target}}
	for _, f := range mut {
		f(m)
	}
	return m
}

func create(t *testing.T, obj client.Object) {
	t.Helper()
	if err := k8s.Create(context.Background(), obj); err != nil {
		t.Fatalf("create %T %s: %v", obj, obj.GetName(), err)
	}
}

func getMig(t *testing.T, ns, name string) *v1.VMMigration {
	t.Helper()
	m := &v1.VMMigration{}
	if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: name}, m); err != nil {
		t.Fatalf("get VMMigration %s: %v", name, err)
	}
	return m
}

// waitFor polls until cond holds or the timeout passes.
func waitFor(t *testing.T, what string, timeout time.Duration, cond func() (bool, string)) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	last := ""
	for time.Now().Before(deadline) {
		ok, state := cond()
		if ok {
			return
		}
		last = state
		time.Sleep(50 * time.Millisecond)
	}
	t.Fatalf("timed out after %s waiting for %s; last state: %s", timeout, what, last)
}

// waitPhase waits until the migration is in one of phases.
func waitPhase(t *testing.T, ns, name string, timeout time.Duration, phases ...v1.VMMigrationPhase) *v1.VMMigration {
	t.Helper()
	var m *v1.VMMigration
	waitFor(t, fmt.Sprintf("VMMigration %s in %v", name, phases), timeout, func() (bool, string) {
		m = getMig(t, ns, name)
		for _, p := range phases {
			if m.Status.Phase == p {
				return true, ""
			}
		}
		if m.Status.Phase.IsFinal() {
			t.Fatalf("VMMigration %s ended %s (%s) while waiting for %v", name, m.Status.Phase, m.Status.FailureReason, phases)
		}
		return false, describe(m)
	})
	return m
}

func describe(m *v1.VMMigration) string {
	var b strings.Builder
	fmt.Fprintf(&b, "phase=%s reason=%q", m.Status.Phase, m.Status.FailureReason)
	for _, c := range m.Status.Conditions {
		fmt.Fprintf(&b, " [%s=%s %s: %s]", c.Type, c.Status, c.Reason, c.Message)
	}
	if s := m.Status.Source; s != nil {
		fmt.Fprintf(&b, " source{%s phase=%s failed=%v done=%v %s}", s.Host, s.Phase, s.Failed, s.Completed, s.Message)
	}
	if s := m.Status.Target; s != nil {
		fmt.Fprintf(&b, " target{%s ready=%v resumed=%v failed=%v %s}", s.Host, s.Ready, s.Resumed, s.Failed, s.Message)
	}
	return b.String()
}

func condition(m *v1.VMMigration, typ string) *metav1.Condition {
	for i := range m.Status.Conditions {
		if m.Status.Conditions[i].Type == typ {
			return &m.Status.Conditions[i]
		}
	}
	return nil
}

// waitDomainOn waits until the XenDomain names host.
func waitDomainOn(t *testing.T, ns, name, host string, timeout time.Duration) {
	t.Helper()
	waitFor(t, fmt.Sprintf("XenDomain %s on %s", name, host), timeout, func() (bool, string) {
		d := &v1.XenDomain{}
		if err := k8s.Get(context.Background(), types.NamespacedName{Namespace: ns, Name: name}, d); err != nil {
			if apierrors.IsNotFound(err) {
				return false, "absent"
			}
			return false, err.Error()
		}
		return d.Status.Host == host && d.Status.State == "Running", fmt.Sprintf("host=%s state=%s", d.Status.Host, d.Status.State)
	})
}

// events returns the reasons of the events about a migration.
func events(t *testing.T, m *v1.VMMigration) []string {
	t.Helper()
	var l corev1.EventList
	if err := k8s.List(context.Background(), &l, client.InNamespace(m.Namespace)); err != nil {
		t.Fatalf("list events: %v", err)
	}
	var out []string
	for _, e := range l.Items {
		if e.InvolvedObject.UID == m.UID {
			out = append(out, e.Reason)
		}
	}
	return out
}

// waitEvents waits until the events about a migration include every reason:
// the recorder sends them asynchronously, after the status that a test
// waited for may already show.
func waitEvents(t *testing.T, m *v1.VMMigration, reasons ...string) {
	t.Helper()
	waitFor(t, fmt.Sprintf("events %v about VMMigration %s", reasons, m.Name), 10*time.Second, func() (bool, string) {
		got := events(t, m)
		have := strings.Join(got, ",")
		for _, r := range reasons {
			if !slices.Contains(got, r) {
				return false, "events: " + have
			}
		}
		return true, ""
	})
}
