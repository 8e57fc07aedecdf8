package controllers

import (
	"fmt"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// fleetOf builds a planner input: hosts of 4 CPUs and 1 GiB, and domains
// of 64 MiB given as "host" per domain, each using cpu millis.
func fleetOf(mode v1.RebalanceMode, hosts int, placement []string, cpu float64) *fleet {
	f := &fleet{p: policyParams{mode: mode, wCPU: 1, wMem: 1, trigger: 20, target: 10, low: 80}}
	for i := 0; i < hosts; i++ {
		f.hosts = append(f.hosts, fleetHost{name: fmt.Sprintf("h%d", i), cpus: 4000, capacity: 1 << 30, free: 1 << 30, dest: true})
	}
	for i, h := range placement {
		f.domains = append(f.domains, fleetDomain{ns: "ns", name: fmt.Sprintf("d%02d", i), host: h, measured: h, cpu: cpu, mem: 64 << 20, movable: true, costSec: 1})
	}
	return f
}

func applyMoves(f *fleet, moves []plannedMove) []float64 {
	place := make([]int, len(f.domains))
	for i, d := range f.domains {
		for h := range f.hosts {
			if f.hosts[h].name == d.host {
				place[i] = h
			}
		}
	}
	for _, m := range moves {
		place[m.dom] = m.to
	}
	_, _, load := f.loads(place)
	return load
}

func TestPlanPerformanceConvergesIntoBand(t *testing.T) {
	var placement []string
	for i := 0; i < 12; i++ {
		placement = append(placement, "h0")
	}
	f := fleetOf(v1.RebalancePerformance, 4, placement, 300)
	_, _, before := f.loads(make([]int, 12))
	moves, _ := f.plan(64)
	after := applyMoves(f, moves)
	if spread(after) > f.p.target {
		t.Fatalf("imbalance %.1f -> %.1f after %d moves; want within the band %.0f", spread(before), spread(after), len(moves), f.p.target)
	}
	seen := map[int]bool{}
	for i, m := range moves {
		if seen[m.dom] {
			t.Errorf("move %d moves domain %d a second time", i, m.dom)
		}
		seen[m.dom] = true
		if i > 0 && m.after > moves[i-1].after {
			t.Errorf("move %d widens the imbalance (%.1f after %.1f)", i, m.after, moves[i-1].after)
		}
	}
	// A balanced fleet plans nothing: no flapping.
	for i := range f.domains {
		f.domains[i].host = f.hosts[i%4].name
	}
	if again, _ := f.plan(64); len(again) != 0 {
		t.Errorf("balanced fleet: %d moves planned; want none", len(again))
	}
}

func TestPlanRespectsLowThresholdAntiAffinityAndCost(t *testing.T) {
	// Two hosts, h1 nearly full: nothing may move there if it would cross 80%.
	f := fleetOf(v1.RebalancePerformance, 2, []string{"h0", "h0", "h0", "h0", "h1", "h1", "h1", "h1", "h1", "h1", "h1", "h1"}, 0)
	f.p.wCPU, f.p.wMem = 0, 1
	f.hosts[1].capacity = 640 << 20 // 8 × 64 MiB = 80%: already at the threshold
	moves, _ := f.plan(64)
	for _, m := range moves {
		if m.to == 1 {
			t.Errorf("moved domain %d onto h1 past the low threshold", m.dom)
		}
	}
	// Anti-affinity: d0 and d1 share a group; d1 sits on h1, so d0 may not go there.
	g := fleetOf(v1.RebalancePerformance, 2, []string{"h0", "h0", "h0", "h1"}, 0)
	for i := range g.domains {
		g.domains[i].anti = map[string]string{v1.AntiAffinityKey: fmt.Sprint(i)}
	}
	g.domains[0].anti = map[string]string{v1.AntiAffinityKey: "x"}
	g.domains[3].anti = map[string]string{v1.AntiAffinityKey: "x"}
	for _, m := range func() []plannedMove { m, _ := g.plan(64); return m }() {
		if m.dom == 0 {
			t.Errorf("d0 moved next to d3 of the same anti-affinity group")
		}
	}
	// Cost: of two domains that balance equally, the cheaper one moves.
	c := fleetOf(v1.RebalancePerformance, 2, []string{"h0", "h0"}, 0)
	c.p.target = 0
	c.domains[0].costSec = 10
	c.domains[1].costSec = 1
	if m, _ := c.plan(1); len(m) != 1 || m[0].dom != 1 {
		t.Errorf("plan %+v; want the cheaper domain d1 moved", m)
	}
}

func TestPlanDensityReportsEmptiableHosts(t *testing.T) {
	f := fleetOf(v1.RebalanceDensity, 3, []string{"h0", "h0", "h0", "h1", "h2", "h2"}, 100)
	moves, empty := f.plan(64)
	if len(empty) == 0 {
		t.Fatalf("no emptiable host reported; moves %+v", moves)
	}
	if empty[0] != "h1" {
		t.Errorf("first emptiable host %s; want h1 (the least loaded)", empty[0])
	}
	after := applyMoves(f, moves)
	for h, l := range after {
		if l >= f.p.low {
			t.Errorf("host %d at %.0f%% after consolidation; threshold %.0f", h, l, f.p.low)
		}
	}
}

func TestSlotsGoToHigherPriority(t *testing.T) {
	now := time.Now()
	mk := func(name string, p v1.MigrationPriority, phase v1.VMMigrationPhase, src string, age time.Duration) v1.VMMigration {
		return v1.VMMigration{
			ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, UID: types.UID(name), CreationTimestamp: metav1.NewTime(now.Add(-age))},
			Spec:       v1.VMMigrationSpec{Domain: name, Priority: p},
			Status:     v1.VMMigrationStatus{Phase: phase, SourceHost: src},
		}
	}
	all := []v1.VMMigration{
		mk("reb", v1.PriorityRebalance, v1.MigrationScheduling, "a", 3*time.Minute),
		mk("usr", v1.PriorityUser, v1.MigrationScheduling, "b", 2*time.Minute),
		mk("drain", v1.PriorityEvacuation, v1.MigrationPending, "", time.Minute),
		mk("running", v1.PriorityRebalance, v1.MigrationPreCopy, "c", 5*time.Minute),
	}
	lim := Limits{Cluster: 2, OutboundPerHost: 2, InboundPerHost: 2}
	l := computeLoad(all, "")
	ahead := waitingAhead(all, &all[0])
	if len(ahead) != 2 || ahead[0].Name != "drain" || ahead[1].Name != "usr" {
		t.Fatalf("ahead of the rebalance: %v; want drain then usr", names(ahead))
	}
	if o := blockedBy(ahead, &all[0], "a", l, lim); o == nil || o.Name != "drain" {
		t.Errorf("rebalance with 1 free slot and 2 waiting ahead: blocked by %v; want drain", o)
	}
	if o := blockedBy(waitingAhead(all, &all[2]), &all[2], "x", l, lim); o != nil {
		t.Errorf("the evacuation is blocked by %s", o.Name)
	}
	// With room for everyone, a lower priority from another host goes.
	lim.Cluster = 10
	if o := blockedBy(waitingAhead(all, &all[1]), &all[1], "b", l, lim); o != nil {
		t.Errorf("user migration blocked by %s with free slots and another source", o.Name)
	}
	if !preemptible(&all[3]) {
		t.Error("a rebalancing migration in pre-copy is not preemptible")
	}
	all[3].Status.Phase = v1.MigrationStopAndCopy
	if preemptible(&all[3]) {
		t.Error("a rebalancing migration in stop-and-copy is preemptible")
	}
}

func names(l []*v1.VMMigration) []string {
	var out []string
	for _, m := range l {
		out = append(out, m.Name)
	}
	return out
}
