package agent

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

func TestCounterRateAveragesOverAMinute(t *testing.T) {
	t0 := time.Unix(1000, 0)
	var c counterRate
	c.observe(10, t0)
	if c.valid {
		t.Fatalf("one sample gives no rate")
	}
	c.observe(10.2, t0.Add(100*time.Millisecond))
	if c.valid {
		t.Fatalf("a sample closer than %v was taken", minSampleGap)
	}
	c.observe(12, t0.Add(4*time.Second)) // 0.5/s: seeds the average
	if !c.valid || c.rate != 0.5 {
		t.Fatalf("first rate %v (valid %v), want 0.5", c.rate, c.valid)
	}
	// A step to 1.5/s for one time constant moves the average 1-1/e of the way.
	v, now := 12.0, t0.Add(4*time.Second)
	for range 12 {
		now = now.Add(5 * time.Second)
		v += 7.5
		c.observe(v, now)
	}
	if want := 0.5 + (1-1/2.718281828)*1.0; c.rate < want-0.01 || c.rate > want+0.01 {
		t.Errorf("after a minute at 1.5/s: %v, want %.3f", c.rate, want)
	}
	// The counter restarts (the domain came back): a new base, no negative rate.
	r := c.rate
	c.observe(1, now.Add(5*time.Second))
	if c.rate != r || c.last != 1 {
		t.Errorf("after a restart: rate %v last %v, want %v and 1", c.rate, c.last, r)
	}
}

func TestUsageMeterIsBoundedByTheDomainsHere(t *testing.T) {
	u := newUsageMeter()
	t0 := time.Unix(1000, 0)
	doms := []xenmem.DomainInfo{
		{Name: "a", MemoryBytes: 1 << 30, State: xenmem.StateRunning},
		{Name: "b", MemoryBytes: 512 << 20, State: xenmem.StateIncoming},
		{Name: "c", MemoryBytes: 256 << 20, State: xenmem.StateShutdown},
	}
	u.observe(doms, t0)
	doms[0].CPUTime, doms[0].PageWrites = 3*time.Second, 1024 // 1.5 CPUs, 512 pages/s
	doms[1].CPUTime = 500 * time.Millisecond
	u.observe(doms, t0.Add(2*time.Second))
	if got := u.cpuMillis("a"); got != 1500 {
		t.Errorf("cpuMillis(a) = %d, want 1500", got)
	}
	if got := u.dirtyRate("a"); got != 512*xenmem.PageSize {
		t.Errorf("dirtyRate(a) = %d, want %d", got, 512*xenmem.PageSize)
	}
	l := u.hostLoad(doms, t0)
	if l.MemoryUsedBytes != 1<<30+512<<20 || l.CPUMillis != 1750 {
		t.Errorf("host load %+v: want the memory of the running and incoming domains and 1750 millis", l)
	}
	u.observe(doms[:1], t0.Add(3*time.Second))
	if len(u.doms) != 1 {
		t.Errorf("%d domains tracked after two left, want 1", len(u.doms))
	}
	p := newCostPredictor()
	p.track(doms)
	p.track(doms[:1])
	if len(p.doms) != 1 {
		t.Errorf("predictor tracks %d domains after two left, want 1", len(p.doms))
	}
}

func TestPredictCost(t *testing.T) {
	const page = xenmem.PageSize
	gib := float64(1 << 30)
	cases := []struct {
		name      string
		c         scanCounts
		dirty     float64
		link      float64
		wantBytes int64
		wantTime  time.Duration
	}{
		{"a domain of zero pages sends nothing", scanCounts{pages: 1 << 18, zero: 1 << 18}, 0, gib, 0, 0},
		{"full pages go whole, disk pages as 40-byte references", scanCounts{pages: 1000, zero: 100, disk: 400}, 0, gib,
			500*page + 400*refWireBytes, time.Duration(float64(500*page+400*refWireBytes) / gib * float64(time.Second))},
		// 256 MiB at 1 GiB/s: 0.25 s; at 64 MiB/s dirty, 16 MiB in round 2
		// (1/64 s), 1 MiB in round 3, 64 KiB in round 4: 16 pages < 50, stop.
		{"dirty rounds shrink until fewer than 50 pages", scanCounts{pages: 1 << 16}, 64 << 20, gib,
			256<<20 + 16<<20 + 1<<20 + 64<<10, time.Duration(float64(256<<20+16<<20+1<<20+64<<10) / gib * float64(time.Second))},
		// Dirtying faster than the link: every round is bounded by memory,
		// and there are at most predictRounds of them.
		{"a domain that dirties faster than the link costs at most its memory per round", scanCounts{pages: 1 << 16}, 4 * gib, gib,
			(1 + predictRounds) * 256 << 20, time.Duration(float64((1+predictRounds)*256<<20) / gib * float64(time.Second))},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			b, d := predictCost(tc.c, tc.dirty, tc.link)
			if b != tc.wantBytes || (d-tc.wantTime).Abs() > time.Microsecond {
				t.Errorf("got %d bytes in %v, want %d in %v", b, d, tc.wantBytes, tc.wantTime)
			}
		})
	}
	mc := migrationCost(scanCounts{pages: 10, zero: 10}, 0, 0)
	if mc.LinkRate != 0 || mc.ScanTime != nil || mc.Bytes != 0 {
		t.Errorf("no scan, no link rate: %+v", mc)
	}
}

func TestStatusWritesOnlyWhenTheNumbersMove(t *testing.T) {
	now := metav1.Now()
	later := metav1.NewTime(now.Add(3 * time.Second))
	base := &v1.MigrationCost{Bytes: 1000, Time: metav1.Duration{Duration: time.Second}, LinkRate: 5, ScanTime: &now}
	cases := []struct {
		name string
		cur  *v1.MigrationCost
		want bool
	}{
		{"the same prediction", base.DeepCopy(), false},
		{"a few percent more bytes", &v1.MigrationCost{Bytes: 1050, Time: base.Time, LinkRate: 5, ScanTime: &now}, false},
		{"a fifth more bytes", &v1.MigrationCost{Bytes: 1200, Time: base.Time, LinkRate: 5, ScanTime: &now}, true},
		{"a new scan", &v1.MigrationCost{Bytes: 1000, Time: base.Time, LinkRate: 5, ScanTime: &later}, true},
		{"a new link rate", &v1.MigrationCost{Bytes: 1000, Time: base.Time, LinkRate: 6, ScanTime: &now}, true},
		{"none any more", nil, true},
	}
	for _, tc := range cases {
		if got := costChanged(base, tc.cur); got != tc.want {
			t.Errorf("%s: costChanged = %v, want %v", tc.name, got, tc.want)
		}
	}
	if cpuChanged(1000, 1040) || !cpuChanged(1000, 1200) || cpuChanged(0, 30) || !cpuChanged(0, 60) || !cpuChanged(300, 0) {
		t.Errorf("cpuChanged: want writes for a tenth and 50 millis, not for noise")
	}
}

// TestScanOfAZeroDomainPredictsLittle scans simulated domains: one of zero
// pages predicts almost nothing on the link, one of random pages its memory.
func TestScanOfAZeroDomainPredictsLittle(t *testing.T) {
	h, err := sim.NewHost(sim.Config{Name: "scan", Memory: "256Mi", CPUs: 2, StateDir: t.TempDir(), Domains: []sim.DomainSpec{
		{Name: "zeros", Memory: "32Mi", VCPUs: 1, Profile: sim.Profile{Zero: 1}},
		{Name: "full", Memory: "32Mi", VCPUs: 1, Profile: sim.Profile{Seed: 7}},
	}}, logr.Discard())
	if err != nil {
		t.Fatalf("sim host: %v", err)
	}
	defer h.Close()
	ctx := context.Background()
	pages := uint64(32<<20) / xenmem.PageSize
	zc, err := scanMemory(ctx, h, "zeros", pages, nil, 0, nil)
	if err != nil {
		t.Fatalf("scan zeros: %v", err)
	}
	zcost := migrationCost(zc, 0, DefaultLinkRate)
	if zc.zero != pages || zcost.Bytes > (32<<20)/100 || zcost.ScanTime == nil {
		t.Errorf("zero domain: %d of %d pages zero, predicted %d bytes: want all zero, under 1%% of 32 MiB, a scan time", zc.zero, pages, zcost.Bytes)
	}
	fc, err := scanMemory(ctx, h, "full", pages, nil, 512<<20, nil)
	if err != nil {
		t.Fatalf("scan full: %v", err)
	}
	if fcost := migrationCost(fc, 0, DefaultLinkRate); fcost.Bytes < (32<<20)*9/10 {
		t.Errorf("random domain: %d zero pages, predicted %d bytes: want about its 32 MiB", fc.zero, fcost.Bytes)
	}
	if _, err := scanMemory(ctx, h, "full", pages, nil, 0, func() bool { return true }); err != errScanStopped {
		t.Errorf("scan told to stop: %v, want errScanStopped", err)
	}
}

// TestAgentPublishesLoadAndCost runs an agent on a simulated host against
// the API server: the XenHost carries the domains' load, each XenDomain
// its CPU and predicted cost (a domain of zero pages far below its
// memory), and the controller's drain status and conditions survive the
// agent's heartbeats, also when the agent's own conditions change.
func TestAgentPublishesLoadAndCost(t *testing.T) {
	requireEnv(t)
	ctx := context.Background()
	ns := newNamespace(t)
	busy := simDomain("busy", ns, "32Mi", 16, sharedDisk(t, t.TempDir(), "busy"), 3)
	zeros := sim.DomainSpec{Name: "zeros", Namespace: ns, Memory: "32Mi", VCPUs: 1, Profile: sim.Profile{Zero: 1}}
	ta := startAgent(t, "load-a", "1Gi", busy, zeros)

	// The controller's part of the XenHost, written as the controller.
	ctrlClient, err := client.New(as(controllerUser), client.Options{Scheme: testScheme})
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the XenHost is registered", 30*time.Second, func() (bool, string) {
		var h v1.XenHost
		err := k8s.Get(ctx, client.ObjectKey{Name: "load-a"}, &h)
		return err == nil && h.Status.HeartbeatTime != nil, fmt.Sprint(err)
	})
	start := metav1.Now()
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var h v1.XenHost
		if err := ctrlClient.Get(ctx, client.ObjectKey{Name: "load-a"}, &h); err != nil {
			return err
		}
		h.Status.Drain = &v1.DrainStatus{Reason: "DrainRequested", StartTime: &start, Domains: 2}
		meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostDrainingCondition, Status: metav1.ConditionTrue, Reason: "DrainRequested", Message: "test"})
		return ctrlClient.Status().Update(ctx, &h)
	})
	if err != nil {
		t.Fatalf("controller status write: %v", err)
	}

	var h v1.XenHost
	waitFor(t, "the host's load", 30*time.Second, func() (bool, string) {
		if err := k8s.Get(ctx, client.ObjectKey{Name: "load-a"}, &h); err != nil {
			return false, err.Error()
		}
		l := h.Status.Load
		return l != nil && l.MemoryUsedBytes == 64<<20 && l.CPUMillis > 0 && l.Time != nil, fmt.Sprintf("load %+v", l)
	})
	var zd, bd v1.XenDomain
	waitFor(t, "the domains' CPU and predicted costs", 60*time.Second, func() (bool, string) {
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "zeros"}, &zd); err != nil {
			return false, err.Error()
		}
		if err := k8s.Get(ctx, client.ObjectKey{Namespace: ns, Name: "busy"}, &bd); err != nil {
			return false, err.Error()
		}
		zc, bc := zd.Status.PredictedCost, bd.Status.PredictedCost
		ok := zc != nil && zc.ScanTime != nil && bc != nil && bc.ScanTime != nil && bd.Status.CPUMillis > 0 && bc.DirtyRate > 0
		return ok, fmt.Sprintf("zeros %+v, busy cpu %d cost %+v", zc, bd.Status.CPUMillis, bc)
	})
	zc, bc := zd.Status.PredictedCost, bd.Status.PredictedCost
	t.Logf("zeros: %d bytes in %v; busy: cpu %d millis, %d bytes in %v (%d zero, %d disk of %d pages, dirty %d B/s)",
		zc.Bytes, zc.Time.Duration, bd.Status.CPUMillis, bc.Bytes, bc.Time.Duration, bc.ZeroPages, bc.DiskPages, bc.Pages, bc.DirtyRate)
	if zc.Bytes > (32<<20)/100 || zc.ZeroPages != zc.Pages || zc.LinkRate != DefaultLinkRate {
		t.Errorf("zero domain predicts %d bytes (%d of %d pages zero, link %d): want under 1%% of its 32 MiB", zc.Bytes, zc.ZeroPages, zc.Pages, zc.LinkRate)
	}
	if bc.DiskPages == 0 || bc.ZeroPages == 0 || bc.Bytes >= 32<<20+bc.DirtyRate {
		t.Errorf("busy domain: %d disk pages, %d zero pages, %d bytes: want both classes found and fewer bytes than memory", bc.DiskPages, bc.ZeroPages, bc.Bytes)
	}

	// A third domain changes the agent's BackendReady message, so its
	// patch carries the conditions list.
	if _, err := ta.host.CreateDomain(ctx, sim.DomainSpec{Name: "late", Namespace: ns, Memory: "8Mi", VCPUs: 1, Profile: sim.Profile{Zero: 1}}); err != nil {
		t.Fatalf("create domain: %v", err)
	}
	waitFor(t, "the agent reports 3 domains", 30*time.Second, func() (bool, string) {
		if err := k8s.Get(ctx, client.ObjectKey{Name: "load-a"}, &h); err != nil {
			return false, err.Error()
		}
		c := meta.FindStatusCondition(h.Status.Conditions, v1.HostBackendReadyCondition)
		return h.Status.Domains == 3 && c != nil && strings.Contains(c.Message, "3 domains"), fmt.Sprintf("domains %d", h.Status.Domains)
	})
	time.Sleep(time.Second) // a few more heartbeats
	if err := k8s.Get(ctx, client.ObjectKey{Name: "load-a"}, &h); err != nil {
		t.Fatal(err)
	}
	if c := meta.FindStatusCondition(h.Status.Conditions, v1.HostDrainingCondition); c == nil || c.Status != metav1.ConditionTrue || c.Message != "test" {
		t.Errorf("the controller's Draining condition: %+v, want it kept", c)
	}
	if d := h.Status.Drain; d == nil || d.Reason != "DrainRequested" || d.Domains != 2 {
		t.Errorf("the controller's drain status: %+v, want it kept", d)
	}
	if l := h.Status.Load; l == nil || l.MemoryUsedBytes != 72<<20 {
		t.Errorf("load after a domain arrived: %+v, want 72 MiB used", l)
	}
}

// TestDepartedDomainIsLeftForTheTarget: once an outgoing migration that
// moved a domain ended, the source leaves its XenDomain for the target to
// take over for a while, instead of deleting it at its next publish.
func TestDepartedDomainIsLeftForTheTarget(t *testing.T) {
	a := &Agent{runs: map[string]*run{}, departed: map[string]time.Time{}}
	moved := &run{uid: "u1", role: roleSource, domain: "web", done: true}
	failed := &run{uid: "u2", role: roleSource, domain: "db", failed: true}
	a.addRun(moved)
	a.addRun(failed)
	if !a.migratingOut("web") || !a.migratingOut("db") {
		t.Fatalf("domains of running outgoing migrations are not migrating out")
	}
	a.dropRun("u1")
	a.dropRun("u2")
	if !a.migratingOut("web") {
		t.Errorf("a domain that just moved away: its XenDomain would be deleted before the target takes it over")
	}
	if a.migratingOut("db") {
		t.Errorf("a domain whose migration failed before go counts as departed")
	}
	a.departed["web"] = time.Now().Add(-departedGrace)
	if a.migratingOut("web") || len(a.departed) != 0 {
		t.Errorf("after %v the departed domain is still kept (%d kept)", departedGrace, len(a.departed))
	}
}

// A domain that just arrived starts from the average its source published,
// and its own samples here move it from there.
func TestArrivedDomainStartsFromTheSourcesAverage(t *testing.T) {
	u := newUsageMeter()
	t0 := time.Unix(1000, 0)
	u.seed("a", 800)
	if got := u.cpuMillis("a"); got != 800 {
		t.Fatalf("cpuMillis after the seed = %d, want 800", got)
	}
	doms := []xenmem.DomainInfo{{Name: "a", State: xenmem.StateRunning}}
	u.observe(doms, t0)
	doms[0].CPUTime = 200 * time.Millisecond // 0.1 CPU over 2 s: post-copy, mostly waiting
	u.observe(doms, t0.Add(2*time.Second))
	if got := u.cpuMillis("a"); got <= 100 || got >= 800 {
		t.Errorf("cpuMillis after one light sample = %d, want between the sample (100) and the seed (800)", got)
	}
	u.seed("a", 5000) // a later seed does not override what was measured here
	if got := u.cpuMillis("a"); got >= 800 {
		t.Errorf("a second seed moved the average to %d", got)
	}
}
