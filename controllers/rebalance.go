package controllers

import (
	"context"
	"fmt"
	"math"
	"sort"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// RebalancePolicy defaults.
const (
	defaultTrigger     = 20
	defaultTarget      = 10
	defaultLow         = 80
	defaultInterval    = 30 * time.Second
	defaultSmoothing   = 5 * time.Minute
	defaultCooldown    = 30 * time.Minute
	defaultMaxConc     = 1
	defaultMaxPerHour  = 10
	maxPlanMoves       = 64
	maxRecentMoves     = 256
	assumedLinkRate    = 1 << 30 // bytes/s, when a domain has no prediction
	minMoveCostSeconds = 0.1
)

// RebalanceReconciler plans and starts rebalancing migrations for each
// RebalancePolicy, once per interval.
type RebalanceReconciler struct {
	Client    ctrl.Client
	APIReader ctrl.Reader
	Recorder  events.EventRecorder
	Clock     clock.PassiveClock
	// HeartbeatTimeout: a host whose agent is stale takes no part.
	HeartbeatTimeout time.Duration

	mu sync.Mutex
	// smoothed host load per policy, percent; bounded by policies × hosts.
	smoothed map[string]map[string]float64
}

// policyParams are a policy's settings with defaults applied.
type policyParams struct {
	mode                          v1.RebalanceMode
	wCPU, wMem                    float64
	trigger, target, low          float64
	interval, smoothing, cooldown time.Duration
	maxConc, maxPerHour           int
}

func paramsOf(p *v1.RebalancePolicy) policyParams {
	i32 := func(v *int32, def int32) int32 {
		if v == nil {
			return def
		}
		return *v
	}
	dur := func(v *metav1.Duration, def time.Duration) time.Duration {
		if v == nil || v.Duration <= 0 {
			return def
		}
		return v.Duration
	}
	pp := policyParams{
		mode: p.Spec.Mode, wCPU: float64(i32(p.Spec.Weights.CPU, 1)), wMem: float64(i32(p.Spec.Weights.Memory, 1)),
		trigger: float64(i32(p.Spec.TriggerImbalancePercent, defaultTrigger)), target: float64(i32(p.Spec.TargetImbalancePercent, defaultTarget)),
		low:      float64(i32(p.Spec.LowThresholdPercent, defaultLow)),
		interval: dur(p.Spec.Interval, defaultInterval), smoothing: dur(p.Spec.SmoothingWindow, defaultSmoothing), cooldown: dur(p.Spec.Cooldown, defaultCooldown),
		maxConc: int(i32(p.Spec.MaxConcurrent, defaultMaxConc)), maxPerHour: int(i32(p.Spec.MaxPerHour, defaultMaxPerHour)),
	}
	if pp.mode == "" {
		pp.mode = v1.RebalancePerformance
	}
	if pp.wCPU+pp.wMem == 0 {
		pp.wCPU, pp.wMem = 1, 1
	}
	if pp.target >= pp.trigger {
		pp.target = pp.trigger - 1
	}
	return pp
}

// fleetHost is one host as the planner sees it.
type fleetHost struct {
	name     string
	cpus     float64 // millis of CPU the host has (cpus × 1000)
	capacity float64 // bytes
	free     float64 // bytes free for incoming domains (after reservations)
	dest     bool    // may receive domains
}

// fleetDomain is one domain as the planner sees it.
type fleetDomain struct {
	ns, name string
	host     string  // where it runs, or will run once its active migration ends
	measured string  // where it runs now
	cpu      float64 // millis
	mem      float64 // bytes
	movable  bool
	costSec  float64
	costB    int64
	costT    time.Duration
	anti     map[string]string
}

// fleet is the planner's whole input: pure data, so planning is a pure function.
type fleet struct {
	hosts   []fleetHost
	domains []fleetDomain
	p       policyParams
	// extra anti-affinity keys of the policy.
	antiKeys []string
}

// placeBy maps each domain to the index of the host host(d) names, -1
// when that host takes no part.
func (f *fleet) placeBy(host func(*fleetDomain) string) []int {
	idx := make(map[string]int, len(f.hosts))
	for i, h := range f.hosts {
		idx[h.name] = i
	}
	place := make([]int, len(f.domains))
	for i := range f.domains {
		place[i] = -1
		if h, ok := idx[host(&f.domains[i])]; ok {
			place[i] = h
		}
	}
	return place
}

// weighted is the load, in percent, that domain di puts on host h.
func (f *fleet) weighted(di, h int) float64 {
	d, fh := &f.domains[di], &f.hosts[h]
	var cpu, mem float64
	if fh.cpus > 0 {
		cpu = 100 * d.cpu / fh.cpus
	}
	if fh.capacity > 0 {
		mem = 100 * d.mem / fh.capacity
	}
	return (f.p.wCPU*cpu + f.p.wMem*mem) / (f.p.wCPU + f.p.wMem)
}

// loads returns each host's CPU, memory and weighted load in percent
// for a placement (domain index -> host index).
func (f *fleet) loads(place []int) (cpu, mem, load []float64) {
	n := len(f.hosts)
	cpu, mem, load = make([]float64, n), make([]float64, n), make([]float64, n)
	for i, d := range f.domains {
		h := place[i]
		if h < 0 {
			continue
		}
		if f.hosts[h].cpus > 0 {
			cpu[h] += 100 * d.cpu / f.hosts[h].cpus
		}
		if f.hosts[h].capacity > 0 {
			mem[h] += 100 * d.mem / f.hosts[h].capacity
		}
	}
	for h := range load {
		load[h] = (f.p.wCPU*cpu[h] + f.p.wMem*mem[h]) / (f.p.wCPU + f.p.wMem)
	}
	return cpu, mem, load
}

func spread(load []float64) float64 {
	if len(load) < 2 {
		return 0
	}
	lo, hi := math.Inf(1), math.Inf(-1)
	for _, l := range load {
		lo, hi = math.Min(lo, l), math.Max(hi, l)
	}
	return hi - lo
}

func variance(load []float64) float64 {
	if len(load) == 0 {
		return 0
	}
	var sum, sq float64
	for _, l := range load {
		sum += l
	}
	mean := sum / float64(len(load))
	for _, l := range load {
		sq += (l - mean) * (l - mean)
	}
	return sq / float64(len(load))
}

// plannedMove is one step of a plan.
type plannedMove struct {
	dom, from, to int
	after         float64 // imbalance after this move and the ones before
}

// plan returns up to max moves. Performance: each step takes the move that
// lowers the variance of load most per predicted second without widening
// the imbalance (max−min), among moves whose
// destination stays below the low threshold, and stops when the
// imbalance is within the target band or no move lowers it. Density: each
// step empties the least loaded host that can be emptied onto the others
// below the low threshold; it also returns those hosts.
func (f *fleet) plan(max int) ([]plannedMove, []string) {
	place := f.placeBy(func(d *fleetDomain) string { return d.host })
	free := make([]float64, len(f.hosts))
	for i, h := range f.hosts {
		free[i] = h.free
	}
	if f.p.mode == v1.RebalanceDensity {
		return f.planDensity(place, free, max)
	}
	var moves []plannedMove
	for len(moves) < max {
		_, _, load := f.loads(place)
		cur, curVar := spread(load), variance(load)
		if cur <= f.p.target {
			break
		}
		best, bestScore := plannedMove{dom: -1}, 0.0
		for di := range f.domains {
			d := &f.domains[di]
			from := place[di]
			if !d.movable || from < 0 || moved(moves, di) {
				continue
			}
			for to := range f.hosts {
				if to == from || !f.hosts[to].dest || free[to] < d.mem || f.conflicts(place, di, to) {
					continue
				}
				// Only the two hosts' loads change: try the move in place.
				lf, lt := load[from], load[to]
				load[from], load[to] = lf-f.weighted(di, from), lt+f.weighted(di, to)
				toAfter, varAfter, spreadAfter := load[to], variance(load), spread(load)
				load[from], load[to] = lf, lt
				if toAfter >= f.p.low {
					continue
				}
				// The objective is the variance of load: max−min alone
				// cannot tell moves to the emptiest host from others while
				// another host stays empty. A move must not widen the spread.
				gain := curVar - varAfter
				if gain <= 1e-6 || spreadAfter > cur+1e-9 {
					continue
				}
				score := gain / math.Max(d.costSec, minMoveCostSeconds)
				if score > bestScore {
					best, bestScore = plannedMove{dom: di, from: from, to: to, after: spreadAfter}, score
				}
			}
		}
		if best.dom < 0 {
			break
		}
		place[best.dom] = best.to
		free[best.to] -= f.domains[best.dom].mem
		free[best.from] += f.domains[best.dom].mem
		moves = append(moves, best)
	}
	return moves, nil
}

func moved(moves []plannedMove, di int) bool {
	for _, m := range moves {
		if m.dom == di {
			return true
		}
	}
	return false
}

// conflicts reports whether placing domain di on host to breaks anti-affinity.
func (f *fleet) conflicts(place []int, di, to int) bool {
	d := &f.domains[di]
	if len(d.anti) == 0 {
		return false
	}
	for oi := range f.domains {
		if oi == di || place[oi] != to {
			continue
		}
		for k, v := range d.anti {
			if f.domains[oi].anti[k] == v {
				return true
			}
		}
	}
	return false
}

func (f *fleet) planDensity(place []int, free []float64, max int) ([]plannedMove, []string) {
	var moves []plannedMove
	var empty []string
	done := map[int]bool{} // hosts emptied by the plan; bounded by hosts
	for {
		_, _, load := f.loads(place)
		// The least loaded host that still runs domains.
		order := make([]int, 0, len(f.hosts))
		for h := range f.hosts {
			if !done[h] {
				order = append(order, h)
			}
		}
		sort.Slice(order, func(i, j int) bool { return load[order[i]] < load[order[j]] })
		progress := false
		for _, src := range order {
			var doms []int
			ok := true
			for di, h := range place {
				if h == src {
					doms = append(doms, di)
					ok = ok && f.domains[di].movable
				}
			}
			if len(doms) == 0 || !ok {
				continue
			}
			trial := append([]int(nil), place...)
			tfree := append([]float64(nil), free...)
			var steps []plannedMove
			for _, di := range doms {
				_, _, l := f.loads(trial)
				// The most loaded destination that stays below the threshold.
				bestTo := -1
				for to := range f.hosts {
					if to == src || done[to] || !f.hosts[to].dest || tfree[to] < f.domains[di].mem || f.conflicts(trial, di, to) {
						continue
					}
					trial[di] = to
					_, _, after := f.loads(trial)
					trial[di] = src
					if after[to] >= f.p.low {
						continue
					}
					if bestTo < 0 || l[to] > l[bestTo] {
						bestTo = to
					}
				}
				if bestTo < 0 {
					ok = false
					break
				}
				trial[di] = bestTo
				tfree[bestTo] -= f.domains[di].mem
				_, _, after := f.loads(trial)
				steps = append(steps, plannedMove{dom: di, from: src, to: bestTo, after: spread(after)})
			}
			if !ok {
				continue
			}
			place, free = trial, tfree
			done[src] = true
			empty = append(empty, f.hosts[src].name)
			for _, st := range steps {
				if len(moves) < max {
					moves = append(moves, st)
				}
			}
			progress = true
			break
		}
		if !progress {
			return moves, empty
		}
	}
}

// Reconcile runs one planning cycle of a policy and schedules the next.
func (r *RebalanceReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	pol := &v1.RebalancePolicy{}
	if err := r.Client.Get(ctx, req.NamespacedName, pol); err != nil {
		if ctrl.IgnoreNotFound(err) == nil {
			r.mu.Lock()
			delete(r.smoothed, req.Name)
			r.mu.Unlock()
		}
		return reconcile.Result{}, ctrl.IgnoreNotFound(err)
	}
	pp := paramsOf(pol)
	now := r.Clock.Now()
	// One cycle per interval, whatever woke us.
	if last := pol.Status.LastCycleTime; last != nil && now.Sub(last.Time) < pp.interval-50*time.Millisecond {
		return reconcile.Result{RequeueAfter: pp.interval - now.Sub(last.Time)}, nil
	}
	orig := pol.DeepCopy()
	if err := r.cycle(ctx, pol, pp, now); err != nil {
		return reconcile.Result{}, err
	}
	if !equality.Semantic.DeepEqual(orig.Status, pol.Status) {
		if err := r.Client.Status().Patch(ctx, pol, ctrl.MergeFrom(orig)); err != nil {
			return reconcile.Result{}, fmt.Errorf("patch status of RebalancePolicy %s: %w", pol.Name, err)
		}
	}
	return reconcile.Result{RequeueAfter: pp.interval}, nil
}

// cycle measures, plans and (unless dry run or inactive) starts migrations.
func (r *RebalanceReconciler) cycle(ctx context.Context, pol *v1.RebalancePolicy, pp policyParams, now time.Time) error {
	log := ctrllog.FromContext(ctx)
	var hosts v1.XenHostList
	if err := r.Client.List(ctx, &hosts); err != nil {
		return fmt.Errorf("list XenHosts: %w", err)
	}
	var doms v1.XenDomainList
	if err := r.Client.List(ctx, &doms); err != nil {
		return fmt.Errorf("list XenDomains: %w", err)
	}
	var migs v1.VMMigrationList
	if err := r.APIReader.List(ctx, &migs); err != nil {
		return fmt.Errorf("list VMMigrations: %w", err)
	}
	var nss corev1.NamespaceList
	if pol.Spec.NamespaceSelector != nil {
		if err := r.Client.List(ctx, &nss); err != nil {
			return fmt.Errorf("list Namespaces: %w", err)
		}
	}
	f, byPolicy, err := r.buildFleet(pol, pp, hosts.Items, doms.Items, migs.Items, nss.Items, now)
	if err != nil {
		setPolicyMessage(pol, "InvalidSelector", err.Error())
		return nil
	}
	st := &pol.Status
	st.Cycles++
	t := metav1.NewTime(now)
	st.LastCycleTime = &t

	// Smoothed load of each host as it runs now (not projected).
	current := f.placeBy(func(d *fleetDomain) string { return d.measured })
	cpu, mem, load := f.loads(current)
	sm := r.smooth(pol.Name, f.hosts, load, pp, st.Cycles == 1)
	st.Hosts = st.Hosts[:0]
	for h, fh := range f.hosts {
		n := int32(0)
		for _, p := range current {
			if p == h {
				n++
			}
		}
		st.Hosts = append(st.Hosts, v1.HostLoadStatus{Host: fh.name, LoadPercent: int32(math.Round(sm[h])),
			CPUPercent: int32(math.Round(cpu[h])), MemoryPercent: int32(math.Round(mem[h])), Domains: n})
	}
	imb := spread(sm)
	st.ImbalancePercent = int32(math.Round(imb))
	switch {
	case !st.Active && imb > pp.trigger && pp.mode == v1.RebalancePerformance:
		st.Active = true
	case st.Active && imb <= pp.target:
		st.Active = false
	}
	if pp.mode == v1.RebalanceDensity {
		st.Active = true
	}

	// Budgets: concurrent moves of this policy, and per hour.
	running, lastHour := 0, 0
	for _, m := range byPolicy {
		if !m.Status.Phase.IsFinal() {
			running++
		}
		if now.Sub(m.CreationTimestamp.Time) < time.Hour {
			lastHour++
		}
	}
	st.MigrationsLastHour = int32(lastHour)
	budget := min(pp.maxConc-running, pp.maxPerHour-lastHour)
	moves, empty := f.plan(maxPlanMoves)
	st.EmptiableHosts = empty
	st.Plan = st.Plan[:0]
	for _, mv := range moves {
		d := f.domains[mv.dom]
		st.Plan = append(st.Plan, v1.PlannedMove{Namespace: d.ns, Domain: d.name, From: f.hosts[mv.from].name, To: f.hosts[mv.to].name,
			ImbalanceAfterPercent: int32(math.Round(mv.after)), PredictedBytes: d.costB, PredictedTime: metav1.Duration{Duration: d.costT}})
	}
	switch {
	case pol.Spec.DryRun:
		setPolicyMessage(pol, "DryRun", fmt.Sprintf("Dry run: imbalance %.0f%%, %d moves planned, none started", imb, len(moves)))
		return nil
	case !st.Active:
		setPolicyMessage(pol, "Balanced", fmt.Sprintf("Imbalance %.0f%% is within the trigger %.0f%%; nothing to do", imb, pp.trigger))
		return nil
	case len(moves) == 0:
		setPolicyMessage(pol, "NoMove", fmt.Sprintf("Imbalance %.0f%%: no move lowers it with every destination below %.0f%% (cooldown, selectors, anti-affinity and capacity considered)", imb, pp.low))
		return nil
	case budget <= 0:
		setPolicyMessage(pol, "Throttled", fmt.Sprintf("Imbalance %.0f%%: %d moves planned; waiting for %d running migrations (limit %d) or the hourly limit (%d of %d used)",
			imb, len(moves), running, pp.maxConc, lastHour, pp.maxPerHour))
		return nil
	}
	started := 0
	for i := range moves {
		if started >= budget {
			break
		}
		mv := moves[i]
		d := f.domains[mv.dom]
		m := &v1.VMMigration{
			ObjectMeta: metav1.ObjectMeta{Namespace: d.ns, GenerateName: "rebalance-" + d.name + "-",
				Labels: map[string]string{v1.ReasonLabel: "rebalance", v1.RebalancePolicyLabel: pol.Name}},
			Spec: v1.VMMigrationSpec{Domain: d.name, TargetHost: f.hosts[mv.to].name, Priority: v1.PriorityRebalance},
		}
		if err := r.Client.Create(ctx, m); err != nil {
			return fmt.Errorf("create rebalancing migration of %s/%s: %w", d.ns, d.name, err)
		}
		started++
		st.MigrationsStarted++
		st.MigrationsLastHour++
		st.Plan[i].Migration = m.Name
		st.RecentMoves = append(st.RecentMoves, v1.RecentMove{Namespace: d.ns, Domain: d.name, From: f.hosts[mv.from].name, To: f.hosts[mv.to].name, Time: t, Migration: m.Name})
		log.Info("Rebalancing", "RebalancePolicy", pol.Name, "VMMigration", klog.KObj(m), "from", f.hosts[mv.from].name, "to", f.hosts[mv.to].name, "imbalanceAfter", mv.after)
		r.Recorder.Eventf(pol, m, corev1.EventTypeNormal, "Rebalancing", "Plan",
			"Moving %s/%s from %s to %s: imbalance %.0f%% -> %.0f%%", d.ns, d.name, f.hosts[mv.from].name, f.hosts[mv.to].name, imb, mv.after)
	}
	// Forget moves older than the cooldown; keep the list bounded.
	keep := st.RecentMoves[:0]
	for _, rm := range st.RecentMoves {
		if now.Sub(rm.Time.Time) < pp.cooldown {
			keep = append(keep, rm)
		}
	}
	if len(keep) > maxRecentMoves {
		keep = keep[len(keep)-maxRecentMoves:]
	}
	st.RecentMoves = keep
	setPolicyMessage(pol, "Rebalancing", fmt.Sprintf("Imbalance %.0f%%: started %d of %d planned moves", imb, started, len(moves)))
	return nil
}

// setPolicyMessage records the cycle's decision in the Planned condition.
func setPolicyMessage(pol *v1.RebalancePolicy, reason, msg string) {
	pol.Status.Message = msg
	meta.SetStatusCondition(&pol.Status.Conditions, metav1.Condition{Type: "Planned", Status: metav1.ConditionTrue,
		Reason: reason, Message: msg, ObservedGeneration: pol.Generation})
}

// smooth folds this cycle's load into each host's exponential average.
func (r *RebalanceReconciler) smooth(policy string, hosts []fleetHost, load []float64, pp policyParams, reset bool) []float64 {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.smoothed == nil {
		r.smoothed = map[string]map[string]float64{}
	}
	prev := r.smoothed[policy]
	if prev == nil || reset {
		prev = map[string]float64{}
	}
	alpha := 1 - math.Exp(-pp.interval.Seconds()/pp.smoothing.Seconds())
	next := map[string]float64{}
	out := make([]float64, len(hosts))
	for i, h := range hosts {
		v, ok := prev[h.name]
		if !ok {
			v = load[i]
		} else {
			v += alpha * (load[i] - v)
		}
		next[h.name], out[i] = v, v
	}
	r.smoothed[policy] = next
	return out
}

// buildFleet turns the cluster's objects into the planner's input, and
// returns the policy's own migrations.
func (r *RebalanceReconciler) buildFleet(pol *v1.RebalancePolicy, pp policyParams, hosts []v1.XenHost, doms []v1.XenDomain,
	migs []v1.VMMigration, nss []corev1.Namespace, now time.Time) (*fleet, []*v1.VMMigration, error) {
	f := &fleet{p: pp, antiKeys: pol.Spec.AntiAffinityLabels}
	excludedHost := map[string]bool{}
	for _, h := range pol.Spec.ExcludedHosts {
		excludedHost[h] = true
	}
	excludedDom := map[string]bool{}
	for _, d := range pol.Spec.ExcludedDomains {
		excludedDom[d] = true
	}
	domSel := labels.Everything()
	if pol.Spec.DomainSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(pol.Spec.DomainSelector)
		if err != nil {
			return nil, nil, fmt.Errorf("spec.domainSelector: %w", err)
		}
		domSel = s
	}
	nsOK := func(string) bool { return true }
	if pol.Spec.NamespaceSelector != nil {
		s, err := metav1.LabelSelectorAsSelector(pol.Spec.NamespaceSelector)
		if err != nil {
			return nil, nil, fmt.Errorf("spec.namespaceSelector: %w", err)
		}
		ok := map[string]bool{}
		for _, ns := range nss {
			if s.Matches(labels.Set(ns.Labels)) {
				ok[ns.Name] = true
			}
		}
		nsOK = func(n string) bool { return ok[n] }
	}
	// Migrations in flight: the domain's placement once they end, and the
	// memory they reserve on their target.
	inflight := map[string]string{} // ns/domain -> target; bounded by migrations
	reserved := map[string]int64{}
	lastMove := map[string]time.Time{}
	var byPolicy []*v1.VMMigration
	for i := range migs {
		m := &migs[i]
		key := m.Namespace + "/" + m.Spec.Domain
		if m.Labels[v1.RebalancePolicyLabel] == pol.Name {
			byPolicy = append(byPolicy, m)
			if t := m.CreationTimestamp.Time; t.After(lastMove[key]) {
				lastMove[key] = t
			}
		}
		if m.Status.Phase.IsFinal() || !m.DeletionTimestamp.IsZero() {
			continue
		}
		inflight[key] = m.Status.TargetHost
		if m.Status.TargetHost == "" {
			inflight[key] = m.Spec.TargetHost
		}
		if m.Status.Phase.HoldsSlot() && (m.Status.Target == nil || !m.Status.Target.Resumed) {
			reserved[m.Status.TargetHost] += m.Status.DomainMemoryBytes
		}
	}
	for i := range hosts {
		h := &hosts[i]
		if excludedHost[h.Name] || !hostFresh(h, now, r.HeartbeatTimeout) || hostDraining(h) || h.Spec.Unschedulable {
			continue
		}
		f.hosts = append(f.hosts, fleetHost{name: h.Name, cpus: float64(h.Status.CPUs) * 1000, capacity: float64(h.Status.CapacityBytes),
			free: float64(h.Status.FreeBytes - reserved[h.Name]), dest: true})
	}
	for i := range doms {
		d := &doms[i]
		if d.Status.Host == "" {
			continue
		}
		key := d.Namespace + "/" + d.Name
		fd := fleetDomain{ns: d.Namespace, name: d.Name, host: d.Status.Host, measured: d.Status.Host, cpu: float64(d.Status.CPUMillis), mem: float64(d.Spec.MemoryBytes),
			anti: antiAffinityValues(d.Labels, pol.Spec.AntiAffinityLabels)}
		target, busy := inflight[key]
		if busy && target != "" {
			fd.host = target
		}
		fd.movable = !busy && d.Status.State == "Running" && !excludedDom[key] && nsOK(d.Namespace) && domSel.Matches(labels.Set(d.Labels)) &&
			(lastMove[key].IsZero() || now.Sub(lastMove[key]) >= pp.cooldown)
		if c := d.Status.PredictedCost; c != nil && c.Time.Duration > 0 {
			fd.costSec, fd.costB, fd.costT = c.Time.Seconds(), c.Bytes, c.Time.Duration
		} else {
			fd.costB = d.Spec.MemoryBytes
			fd.costT = time.Duration(float64(d.Spec.MemoryBytes) / assumedLinkRate * float64(time.Second))
			fd.costSec = fd.costT.Seconds()
		}
		f.domains = append(f.domains, fd)
	}
	sort.Slice(f.hosts, func(i, j int) bool { return f.hosts[i].name < f.hosts[j].name })
	sort.Slice(f.domains, func(i, j int) bool {
		return f.domains[i].ns+"/"+f.domains[i].name < f.domains[j].ns+"/"+f.domains[j].name
	})
	return f, byPolicy, nil
}

// SetupWithManager registers the rebalance controller. It runs each
// policy's cycle on a timer (RequeueAfter interval): load is a time series,
// so there is no object event to wait for.
func (r *RebalanceReconciler) SetupWithManager(mgr ctrlbuilder.Manager) error {
	if r.Client == nil {
		r.Client = mgr.GetClient()
	}
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	if r.Recorder == nil {
		r.Recorder = mgr.GetEventRecorder("xenferry-rebalance")
	}
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	if r.HeartbeatTimeout == 0 {
		r.HeartbeatTimeout = 30 * time.Second
	}
	return ctrlbuilder.NewControllerManagedBy(mgr).
		Named("rebalance").
		For(&v1.RebalancePolicy{}, builder.WithPredicates(predicate.GenerationChangedPredicate{})).
		WithOptions(controller.Options{MaxConcurrentReconciles: 1}).
		Complete(r)
}
