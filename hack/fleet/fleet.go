package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// Fleet sizes and timings. Domains are small and their workloads light:
// the fleet shares a 2-core machine with its control plane.
const (
	domMemMiB      = 48
	hostMemMiB     = 512 // at least; one domain is ~9% of it
	hostCPUs       = 2
	dirtyMiBps     = 0.5
	readMiBps      = 1.0
	domNamespace   = "default"
	ctlNamespace   = "xenferry-system" // the controller's (CA Secret, guard pods)
	fleetPolicy    = "fleet"           // MigrationPolicy of every migration
	fleetBandwidth = "6Mi"             // per migration: drains take seconds
	// heartbeatTO is the controller's default: the scenarios test drains,
	// rebalancing and priorities on a healthy fleet, not the loss of an
	// agent (hack/faults does, with 8 s). On this shared 2-core machine
	// heartbeats of healthy agents were seen to pause for up to 24 s.
	heartbeatTO = 30 * time.Second
	// noteGap: heartbeat pauses longer than this are noted in reason.
	noteGap    = 5 * time.Second
	abortGrace = 20 * time.Second
	upWait     = 3 * time.Minute
)

// limits are the controller's concurrency flags.
type limits struct{ cluster, outbound, inbound int }

// fleetSpec is one scenario's fleet: which domains start on which host.
type fleetSpec struct {
	hosts     []string
	placement map[string][]string // host -> domains
	limits    limits
	bandwidth string // per migration (MigrationPolicy "fleet")
	hostMiB   int    // each host's memory for domains
}

// hostMemory is what each host gets: hostMemMiB, or more when the most
// crowded host's domains would fill over three quarters of it.
func hostMemory(placement map[string][]string) int {
	most := 0
	for _, ds := range placement {
		most = max(most, len(ds))
	}
	need := (most*domMemMiB*4/3 + 63) / 64 * 64
	return max(hostMemMiB, need)
}

// fleet is a running control plane, controller and agents.
type fleet struct {
	spec       fleetSpec
	root, dir  string // project root; this fleet's work directory
	bin, disks string
	log        func(format string, args ...any)
	ps         *labkit.Procs
	cp         *labkit.ControlPlane
	c          client.WithWatch
	controller *labkit.Proc
	agents     map[string]*agent
	domains    []string               // every domain, sorted
	fp         map[string]fingerprint // by domain, taken when the fleet came up
}

type agent struct {
	host     string
	p        *labkit.Proc
	stateDir string
	cfg      string
	kc       string
}

func hostNames(n int) []string {
	var hs []string
	for i := 1; i <= n; i++ {
		hs = append(hs, fmt.Sprintf("dom0-%d", i))
	}
	return hs
}

func domainNames(n int) []string {
	var ds []string
	for i := 1; i <= n; i++ {
		ds = append(ds, fmt.Sprintf("vm-%02d", i))
	}
	return ds
}

// agentUser is the API identity of host's agent (a static token; in
// system:masters, as in hack/faults: the local control plane has no
// ServiceAccount tokens).
func agentUser(host string) string { return "xenferry-agent:" + host }

// up starts the fleet: control plane, CRDs, the controller, one agent per
// host with its domains, and waits until every host and domain is
// published; then it fingerprints every domain's memory from /proc.
func (f *fleet) up(ctx context.Context) error {
	for _, d := range []string{f.dir, filepath.Join(f.dir, "logs"), f.disks} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	f.ps = &labkit.Procs{LogDir: filepath.Join(f.dir, "logs")}
	f.agents = map[string]*agent{}
	var users []labkit.APIUser
	for _, h := range f.spec.hosts {
		users = append(users, labkit.APIUser{Name: agentUser(h), Groups: []string{"system:masters"}})
	}
	t0 := time.Now()
	var err error
	// etcd without fsync: the fleet's etcd data is thrown away after each
	// scenario, and fsyncs on this shared machine slow every write.
	if f.cp, err = labkit.StartControlPlane(ctx, f.ps, labkit.ControlPlaneConfig{BinDir: filepath.Join(f.root, "bin"),
		Dir: filepath.Join(f.dir, "controlplane"), Users: users, Env: cleanEnv(), EtcdArgs: []string{"--unsafe-no-fsync"}}); err != nil {
		return fmt.Errorf("control plane: %w", err)
	}
	f.log("control plane ready in %.1fs on 127.0.0.1:%d", time.Since(t0).Seconds(), f.cp.Port)
	rc := f.cp.RESTConfig()
	if err := labkit.InstallCRDs(rc, f.root); err != nil {
		return fmt.Errorf("install CRDs: %w", err)
	}
	scheme, err := labkit.Scheme()
	if err != nil {
		return err
	}
	// Watches need no timeout of their own: they end with ctx.
	wrc := rest.CopyConfig(rc)
	wrc.Timeout = 0
	if f.c, err = client.NewWithWatch(wrc, client.Options{Scheme: scheme}); err != nil {
		return fmt.Errorf("API client: %w", err)
	}
	if err := f.seed(ctx); err != nil {
		return err
	}
	if err := f.startController(); err != nil {
		return err
	}
	for _, h := range f.spec.hosts {
		if err := f.startAgent(h); err != nil {
			return err
		}
	}
	if err := f.waitUp(ctx); err != nil {
		return err
	}
	return f.fingerprintAll()
}

// seed creates what a cluster has before xenferry runs: the controller's
// namespace, a Node per dom0 (a XenHost is named after its Node; no kubelet
// runs, nothing schedules), and the MigrationPolicy every migration uses.
func (f *fleet) seed(ctx context.Context) error {
	objs := []client.Object{&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ctlNamespace}}}
	for _, h := range f.spec.hosts {
		objs = append(objs, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: h, Labels: map[string]string{"kubernetes.io/hostname": h}}})
	}
	bw, err := resource.ParseQuantity(f.spec.bandwidth)
	if err != nil {
		return fmt.Errorf("bandwidth %q: %w", f.spec.bandwidth, err)
	}
	objs = append(objs, &v1.MigrationPolicy{ObjectMeta: metav1.ObjectMeta{Name: fleetPolicy},
		Spec: v1.MigrationPolicySpec{MigrationParameters: v1.MigrationParameters{Bandwidth: &bw,
			MaxDowntime: &metav1.Duration{Duration: time.Second}}}})
	for _, o := range objs {
		if err := f.c.Create(ctx, o); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create %T %s: %w", o, o.GetName(), err)
		}
	}
	return nil
}

func (f *fleet) startController() error {
	kc := filepath.Join(f.dir, "controller.kubeconfig")
	if err := f.cp.Kubeconfig(kc, f.cp.URL(), ""); err != nil {
		return err
	}
	l := f.spec.limits
	p, err := f.ps.Start("controller", cleanEnv("POD_NAMESPACE="+ctlNamespace), filepath.Join(f.bin, labkit.ControllerBin),
		"--kubeconfig", kc, "--metrics-bind-address", "0", "--health-probe-bind-address", "0",
		"--heartbeat-timeout", heartbeatTO.String(), "--abort-grace", abortGrace.String(), "--ca-namespace", ctlNamespace,
		"--max-migrations", fmt.Sprint(l.cluster), "--max-outbound-per-host", fmt.Sprint(l.outbound),
		"--max-inbound-per-host", fmt.Sprint(l.inbound))
	if err != nil {
		return err
	}
	f.controller = p
	return nil
}

// writeSimConfig writes host's sim configuration. Disks live in one
// directory every host uses: the shared storage. Domain i gets seed 100+i,
// so its disk image (kept between runs) is the same each time.
func (f *fleet) writeSimConfig(path, host string, doms []string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "name: %s\nmemory: %dMi\ncpus: %d\nstateDir: %s\ndomains:", host, f.spec.hostMiB, hostCPUs, f.disks)
	if len(doms) == 0 {
		b.WriteString(" []\n")
	}
	for _, d := range doms {
		var seed int
		fmt.Sscanf(d, "vm-%d", &seed)
		// hotWriteShare 1: every guest write lands in the hot set, so the
		// other pages never change (see fingerprint).
		fmt.Fprintf(&b, `
- name: %s
  namespace: %s
  memory: %dMi
  vcpus: 1
  disks: [{id: xvda, path: %s.img, size: %dMi}]
  profile: {zero: 0.25, disk: 0.35, dirtyMiBps: %g, hotFraction: 0.0625, hotWriteShare: 1, readMiBps: %g, seed: %d}
`, d, domNamespace, domMemMiB, d, domMemMiB+16, dirtyMiBps, readMiBps, 100+seed)
	}
	return os.WriteFile(path, []byte(b.String()), 0o644)
}

func (f *fleet) startAgent(host string) error {
	dir := filepath.Join(f.dir, host)
	a := &agent{host: host, stateDir: filepath.Join(dir, "state"), cfg: filepath.Join(dir, "sim.yaml"), kc: filepath.Join(dir, "kubeconfig")}
	if err := os.MkdirAll(a.stateDir, 0o755); err != nil {
		return err
	}
	if err := f.writeSimConfig(a.cfg, host, f.spec.placement[host]); err != nil {
		return err
	}
	if err := f.cp.Kubeconfig(a.kc, f.cp.URL(), agentUser(host)); err != nil {
		return err
	}
	p, err := f.ps.Start("agent-"+host, cleanEnv(), filepath.Join(f.bin, labkit.AgentBin),
		"run", "--kubeconfig", a.kc, "--backend", "sim", "--sim-config", a.cfg, "--host", host,
		"--data-addr", "127.0.0.1:0", "--state-dir", a.stateDir, "--heartbeat-interval", "1s", "--status-interval", "500ms")
	if err != nil {
		return err
	}
	a.p = p
	f.agents[host] = a
	return nil
}

// waitUp waits until every agent heartbeats with a certificate and every
// domain is published Running on the host it was placed on.
func (f *fleet) waitUp(ctx context.Context) error {
	want := map[string]string{}
	for h, ds := range f.spec.placement {
		for _, d := range ds {
			want[d] = h
			f.domains = append(f.domains, d)
		}
	}
	sort.Strings(f.domains)
	var missing []string
	err := waitFor(ctx, upWait, 500*time.Millisecond, func() (bool, error) {
		missing = nil
		if !f.controller.Alive() {
			return false, fmt.Errorf("controller exited: %s", f.controller.Tail(800))
		}
		for _, h := range f.spec.hosts {
			a := f.agents[h]
			if !a.p.Alive() {
				return false, fmt.Errorf("agent %s exited: %s", h, a.p.Tail(800))
			}
			xh := &v1.XenHost{}
			if err := f.c.Get(ctx, client.ObjectKey{Name: h}, xh); err != nil {
				missing = append(missing, "XenHost "+h)
				continue
			}
			if xh.Status.HeartbeatTime == nil || time.Since(xh.Status.HeartbeatTime.Time) > 5*time.Second {
				missing = append(missing, h+" heartbeat")
			}
			if xh.Status.TLS == nil || xh.Status.TLS.Certificate == "" {
				missing = append(missing, h+" certificate")
			}
		}
		for _, d := range f.domains {
			xd := &v1.XenDomain{}
			if err := f.c.Get(ctx, client.ObjectKey{Namespace: domNamespace, Name: d}, xd); err != nil ||
				xd.Status.Host != want[d] || xd.Status.State != "Running" {
				missing = append(missing, "XenDomain "+d)
			}
		}
		return len(missing) == 0, nil
	})
	if err != nil {
		return fmt.Errorf("fleet not up: %w (waiting for %s)", err, strings.Join(first(missing, 6), ", "))
	}
	return nil
}

// fingerprintAll records what must never change in each domain's memory,
// from its one guest process.
func (f *fleet) fingerprintAll() error {
	f.fp = map[string]fingerprint{}
	obs := f.observe()
	for _, d := range f.domains {
		cs := obs.copies[d]
		if len(cs) != 1 || !cs[0].running {
			return fmt.Errorf("domain %s: %d guest processes at start, want 1 running", d, len(cs))
		}
		mem, err := labkit.ReadMemory(cs[0].g.PID)
		if err != nil {
			return fmt.Errorf("domain %s: %w", d, err)
		}
		f.fp[d] = takeFingerprint(mem, cs[0].ctl)
	}
	return nil
}

// down stops every process and ends every guest of this fleet: through
// each agent's state dir (sim-destroy), then any guest process left whose
// stderr is under the fleet's directory.
func (f *fleet) down() {
	if f.ps != nil {
		f.ps.StopAll()
	}
	for _, a := range f.agents {
		out, err := exec.Command(filepath.Join(f.bin, labkit.AgentBin), "sim-destroy", "--state-dir", a.stateDir).CombinedOutput()
		if err != nil {
			f.log("sim-destroy %s: %v: %s", a.stateDir, err, strings.TrimSpace(string(out)))
		}
	}
	// sim-destroy's SIGKILLs take a moment to end the guests.
	_ = waitFor(context.Background(), 5*time.Second, 100*time.Millisecond, func() (bool, error) {
		return len(findGuests(f.dir)) == 0, nil
	})
	for _, g := range findGuests(f.dir) {
		f.log("ending guest %s of %s left behind (%s)", g.ID(), g.Domain, g.Stderr)
		killGuest(g)
	}
}

// setDrain sets host's spec.drain.
func (f *fleet) setDrain(ctx context.Context, host string, drain bool) (string, error) {
	xh := &v1.XenHost{}
	if err := f.c.Get(ctx, client.ObjectKey{Name: host}, xh); err != nil {
		return "", err
	}
	orig := xh.DeepCopy()
	xh.Spec.Drain = drain
	if err := f.c.Patch(ctx, xh, client.MergeFrom(orig)); err != nil {
		return "", fmt.Errorf("set drain=%v on %s: %w", drain, host, err)
	}
	return xh.ResourceVersion, nil
}

func hostCondition(xh *v1.XenHost, t string) *metav1.Condition {
	return meta.FindStatusCondition(xh.Status.Conditions, t)
}

// waitFor polls cond every step until it is true, fails, or limit passes;
// it retries what isTransient accepts.
func waitFor(ctx context.Context, limit, step time.Duration, cond func() (bool, error)) error {
	return labkit.WaitFor(ctx, limit, step, isTransient, cond)
}

// isTransient: API errors worth retrying within a wait: labkit.IsTransient's
// and, for the fleet's waits only (hack/faults' do not), a Conflict.
func isTransient(err error) bool {
	return labkit.IsTransient(err) || apierrors.IsConflict(err)
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("%d more", len(s)-n))
	}
	return s
}
