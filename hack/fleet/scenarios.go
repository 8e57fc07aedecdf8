package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/hack/internal/labkit"
)

// Scenario limits.
const (
	drainWait     = 5 * time.Minute
	streamWait    = 2 * time.Minute
	finalWait     = 4 * time.Minute
	afterUndrain  = 10 * time.Second // watched for new drain migrations once the old ones ended
	rebalanceWait = 6 * time.Minute
	quiesceWait   = 3 * time.Minute
	// streamingBytes sent make a drain migration "streaming" (undrain).
	streamingBytes = 1 << 20
)

// Rebalancing policy of the rebalance scenario: the defaults' band
// (trigger 20, target 10), cycles every 2s, load smoothed over 10s.
const (
	rebalancePolicyName = "fleet-balance"
	rebalanceInterval   = 2 * time.Second
	rebalanceSmoothing  = 10 * time.Second
	// rebalanceCooldown is short, so that only the band's hysteresis,
	// not the cooldown, keeps a domain from going back within the run.
	rebalanceCooldown = 15 * time.Second
	rebalanceTrigger  = 20
	rebalanceTarget   = 10
	minCycles         = 10
)

// common is what every scenario line carries.
type common struct {
	Scenario   string  `json:"scenario"`
	OK         bool    `json:"ok"`
	Hosts      int     `json:"hosts"`
	Domains    int     `json:"domains"`
	Seconds    float64 `json:"seconds"`
	Migrations int     `json:"migrations"`
	invariants
	// untruthful: domains whose last migration ended saying they run
	// elsewhere than they do.
	Untruthful int    `json:"untruthful"`
	Reason     string `json:"reason,omitempty"`
}

// session is one scenario on its own fleet.
type session struct {
	f     *fleet
	mo    *monitor
	res   *common
	goal  bool // the scenario's own outcome; ok needs it and clean invariants
	notes []string
}

func (s *session) note(format string, a ...any) { s.notes = append(s.notes, fmt.Sprintf(format, a...)) }

// scenario is a placement, controller limits and a driver that plays it
// and returns its line (embedding s.res).
type scenario struct {
	placement func(hosts, doms []string) map[string][]string
	limits    limits
	bandwidth string // per migration, in the fleet's MigrationPolicy (default fleetBandwidth)
	play      func(ctx context.Context, s *session) any
}

var scenarios = map[string]scenario{
	"drain": {placement: halfOnFirst, limits: limits{cluster: 4, outbound: 2, inbound: 1}, play: playDrain},
	// undrain: slow links, so that pre-copy lasts ~10 s and the undrain
	// lands while memory streams, before a hybrid switches to post-copy.
	"undrain":   {placement: halfOnFirst, limits: limits{cluster: 2, outbound: 1, inbound: 1}, bandwidth: "2Mi", play: playUndrain},
	"rebalance": {placement: crowded, limits: limits{cluster: 4, outbound: 2, inbound: 2}, play: playRebalance},
	"priority":  {placement: priorityPlacement, limits: limits{cluster: 1, outbound: 4, inbound: 4}, play: playPriority},
	// move is the harness's own check: user migrations only, no issue-12
	// logic, so it passes on any controller that migrates.
	"move": {placement: halfOnFirst, limits: limits{cluster: 4, outbound: 2, inbound: 2}, play: playMove},
}

var scenarioOrder = []string{"drain", "undrain", "rebalance", "priority", "move"}

// halfOnFirst: half the domains on the first host, the rest spread over
// the others.
func halfOnFirst(hosts, doms []string) map[string][]string {
	p := map[string][]string{}
	n := len(doms) / 2
	p[hosts[0]] = doms[:n]
	for i, d := range doms[n:] {
		h := hosts[1+i%(len(hosts)-1)]
		p[h] = append(p[h], d)
	}
	return p
}

// crowded: two thirds of the domains on the first host, the rest on the
// second, none elsewhere.
func crowded(hosts, doms []string) map[string][]string {
	n := (2*len(doms) + 2) / 3
	return map[string][]string{hosts[0]: doms[:n], hosts[1]: doms[n:]}
}

// priorityPlacement: three domains on the first host (drained), the rest
// on the middle hosts, the last host empty (where rebalancing sends them).
func priorityPlacement(hosts, doms []string) map[string][]string {
	p := map[string][]string{hosts[0]: doms[:3]}
	mid := hosts[1 : len(hosts)-1]
	for i, d := range doms[3:] {
		h := mid[i%len(mid)]
		p[h] = append(p[h], d)
	}
	return p
}

func isDrainOf(r migRecord, host string) bool {
	return r.labels[v1.ReasonLabel] == "drain" && r.labels[v1.DrainHostLabel] == host
}

// --- drain ---------------------------------------------------------------

type drainLine struct {
	*common
	LeftOnDrainedHost int `json:"leftOnDrainedHost"`
	MaxOutbound       int `json:"maxOutbound"`
	MaxOutboundSeen   int `json:"maxOutboundSeen"`
	MaxInbound        int `json:"maxInbound"`
	MaxInboundSeen    int `json:"maxInboundSeen"`
}

func playDrain(ctx context.Context, s *session) any {
	f := s.f
	host := f.spec.hosts[0]
	line := &drainLine{common: s.res, LeftOnDrainedHost: -1, MaxOutbound: f.spec.limits.outbound, MaxInbound: f.spec.limits.inbound}
	n := len(f.spec.placement[host])
	f.log("drain: %s with %d domains (limits: %d out, %d in per host)", host, n, line.MaxOutbound, line.MaxInbound)
	t0 := time.Now()
	if _, err := f.setDrain(ctx, host, true); err != nil {
		s.note("harness: %v", err)
		return line
	}
	evacuated := false
	var xh v1.XenHost
	err := waitFor(ctx, drainWait, 500*time.Millisecond, func() (bool, error) {
		if err := f.c.Get(ctx, client.ObjectKey{Name: host}, &xh); err != nil {
			return false, err
		}
		c := hostCondition(&xh, v1.HostEvacuatedCondition)
		evacuated = c != nil && c.Status == metav1.ConditionTrue
		return evacuated && xh.Status.Domains == 0, nil
	})
	s.res.Seconds = labkit.Round1(time.Since(t0).Seconds())
	if err != nil {
		s.note("%s not evacuated: %v (Evacuated %s, status.domains %d, drain %s)", host, err,
			condText(hostCondition(&xh, v1.HostEvacuatedCondition)), xh.Status.Domains, drainText(xh.Status.Drain))
	}
	if err := f.quiesce(ctx, quiesceWait); err != nil {
		s.note("%v", err)
	}
	obs := f.observe()
	line.LeftOnDrainedHost = 0
	for _, d := range f.domains {
		for _, h := range obs.runningOn(d) {
			if h == host {
				line.LeftOnDrainedHost++
			}
		}
	}
	line.MaxOutboundSeen, line.MaxInboundSeen, _, _, _ = s.mo.maxima()
	for _, r := range s.mo.snapshot() {
		switch {
		case !isDrainOf(r, host):
			s.note("migration %s is not labelled as a drain of %s (labels %v)", r.name, host, r.labels)
		case r.phase == v1.MigrationSucceeded:
			s.res.Migrations++
		default:
			s.note("drain migration %s of %s ended %s: %s", r.name, r.domain, r.phase, labkit.Clip(r.reason, 160))
		}
	}
	if err := f.c.Get(ctx, client.ObjectKey{Name: host}, &xh); err == nil {
		s.note("%s: Evacuated %s; Draining %s; drain %s", host, condText(hostCondition(&xh, v1.HostEvacuatedCondition)),
			condText(hostCondition(&xh, v1.HostDrainingCondition)), drainText(xh.Status.Drain))
	}
	if line.MaxOutboundSeen > line.MaxOutbound || line.MaxInboundSeen > line.MaxInbound {
		s.note("concurrency limits exceeded: %d out, %d in seen at once", line.MaxOutboundSeen, line.MaxInboundSeen)
	}
	s.goal = evacuated && line.LeftOnDrainedHost == 0 &&
		line.MaxOutboundSeen <= line.MaxOutbound && line.MaxInboundSeen <= line.MaxInbound
	return line
}

// --- undrain -------------------------------------------------------------

type undrainLine struct {
	*common
	Cancelled       int `json:"cancelled"`
	NewAfterUndrain int `json:"newAfterUndrain"`
	// cancelledStreaming: of the cancelled, those whose source had
	// started sending (the others were still queued).
	CancelledStreaming int `json:"cancelledStreaming"`
}

func playUndrain(ctx context.Context, s *session) any {
	f := s.f
	host := f.spec.hosts[0]
	line := &undrainLine{common: s.res, Cancelled: -1, NewAfterUndrain: -1, CancelledStreaming: -1}
	f.log("undrain: drain %s, undo it once a drain migration streams", host)
	t0 := time.Now()
	if _, err := f.setDrain(ctx, host, true); err != nil {
		s.note("harness: %v", err)
		return line
	}
	var streaming string
	err := waitFor(ctx, streamWait, 200*time.Millisecond, func() (bool, error) {
		for _, r := range s.mo.snapshot() {
			m := r.last
			if !isDrainOf(r, host) || m == nil || m.Status.Phase.IsFinal() {
				continue
			}
			// Streaming: memory on the wire, not just the handshake.
			if src := m.Status.Source; m.Status.Phase == v1.MigrationPreCopy &&
				src != nil && src.Progress != nil && src.Progress.BytesSent >= streamingBytes {
				streaming = fmt.Sprintf("%s (%s, %s)", r.name, m.Status.Phase, srcText(m))
				return true, nil
			}
		}
		return false, nil
	})
	if err != nil {
		s.note("no drain migration of %s streamed: %v", host, err)
		return line
	}
	undrainRV, err := f.setDrain(ctx, host, false)
	if err != nil {
		s.note("harness: %v", err)
		return line
	}
	undrainAt := time.Now()
	f.log("undrain: %s undrained while %s streamed", host, streaming)
	s.note("undrained at %s while %s streamed", undrainAt.UTC().Format("15:04:05.000"), streaming)
	err = waitFor(ctx, finalWait, 500*time.Millisecond, func() (bool, error) {
		for _, r := range s.mo.snapshot() {
			if isDrainOf(r, host) && !r.phase.IsFinal() {
				return false, nil
			}
		}
		return true, nil
	})
	s.res.Seconds = labkit.Round1(time.Since(t0).Seconds())
	if err != nil {
		s.note("drain migrations still open after the undrain: %v", err)
	}
	labkit.SleepCtx(ctx, afterUndrain)
	line.Cancelled, line.NewAfterUndrain, line.CancelledStreaming = 0, 0, 0
	urv := rvOf(undrainRV)
	for _, r := range s.mo.snapshot() {
		if !isDrainOf(r, host) {
			s.note("migration %s is not a drain of %s (labels %v)", r.name, host, r.labels)
			continue
		}
		after := r.createRV > urv
		if r.createRV == 0 { // first seen by a list: creation time, to the second
			after = r.created.After(undrainAt)
		}
		if after {
			line.NewAfterUndrain++
			s.note("drain migration %s created after the undrain", r.name)
		}
		switch r.phase {
		case v1.MigrationCancelled:
			line.Cancelled++
			if src := r.last.Status.Source; src != nil && src.StartTime != nil {
				line.CancelledStreaming++
			}
		case v1.MigrationSucceeded:
			s.res.Migrations++
			s.note("drain migration %s of %s succeeded (%s)", r.name, r.domain, whenResumed(r.last))
		default:
			s.note("drain migration %s ended %s: %s", r.name, phaseOrPending(r.phase), labkit.Clip(r.reason, 160))
		}
	}
	var xh v1.XenHost
	if err := f.c.Get(ctx, client.ObjectKey{Name: host}, &xh); err == nil {
		if c := hostCondition(&xh, v1.HostDrainingCondition); c != nil && c.Status == metav1.ConditionTrue {
			s.note("%s still Draining after the undrain: %s", host, condText(c))
		}
	}
	s.note("%d drain migrations cancelled (%d of them streaming), %d succeeded", line.Cancelled, line.CancelledStreaming, s.res.Migrations)
	s.goal = err == nil && line.Cancelled >= 1 && line.NewAfterUndrain == 0
	return line
}

// --- rebalance -----------------------------------------------------------

type rebalanceLine struct {
	*common
	ImbalanceBefore    int   `json:"imbalanceBefore"`
	ImbalanceAfter     int   `json:"imbalanceAfter"`
	TargetBand         int   `json:"targetBand"`
	Cycles             int64 `json:"cycles"`
	Oscillations       int   `json:"oscillations"`
	ImbalanceOwnBefore int   `json:"imbalanceOwnBefore"` // from XenHost status, unsmoothed
	ImbalanceOwnAfter  int   `json:"imbalanceOwnAfter"`
}

func playRebalance(ctx context.Context, s *session) any {
	f := s.f
	line := &rebalanceLine{common: s.res, ImbalanceBefore: -1, ImbalanceAfter: -1, TargetBand: rebalanceTarget,
		ImbalanceOwnBefore: -1, ImbalanceOwnAfter: -1, Oscillations: -1}
	// The agents' load samples first (the policy balances what they publish).
	var loads string
	if err := waitFor(ctx, time.Minute, time.Second, func() (bool, error) {
		imb, text, ok, err := f.ownImbalance(ctx)
		line.ImbalanceOwnBefore, loads = imb, text
		return ok, err
	}); err != nil {
		s.note("hosts publish no load yet (%v): %s", err, loads)
	}
	f.log("rebalance: load before: %s", loads)
	w := func(n int32) *int32 { return &n }
	p := &v1.RebalancePolicy{ObjectMeta: metav1.ObjectMeta{Name: rebalancePolicyName}, Spec: v1.RebalancePolicySpec{
		Mode: v1.RebalancePerformance, Weights: v1.LoadWeights{CPU: w(1), Memory: w(1)},
		TriggerImbalancePercent: w(rebalanceTrigger), TargetImbalancePercent: w(rebalanceTarget),
		Interval: &metav1.Duration{Duration: rebalanceInterval}, SmoothingWindow: &metav1.Duration{Duration: rebalanceSmoothing},
		Cooldown: &metav1.Duration{Duration: rebalanceCooldown}, MaxConcurrent: w(1), MaxPerHour: w(10),
	}}
	t0 := time.Now()
	if err := f.c.Create(ctx, p); err != nil {
		s.note("harness: create RebalancePolicy: %v", err)
		return line
	}
	mine := func() []migRecord {
		var out []migRecord
		for _, r := range s.mo.snapshot() {
			if r.labels[v1.RebalancePolicyLabel] == rebalancePolicyName {
				out = append(out, r)
			}
		}
		return out
	}
	settledSince := time.Time{}
	var last v1.RebalancePolicy
	err := waitFor(ctx, rebalanceWait, 250*time.Millisecond, func() (bool, error) {
		if err := f.c.Get(ctx, client.ObjectKey{Name: rebalancePolicyName}, &last); err != nil {
			return false, err
		}
		st := last.Status
		ms := mine()
		moved := false
		for _, r := range ms {
			moved = moved || r.phase == v1.MigrationSucceeded
		}
		// The policy's first view, before any move changed the load.
		if line.ImbalanceBefore < 0 && st.Cycles >= 1 && !moved {
			line.ImbalanceBefore = int(st.ImbalancePercent)
			f.log("rebalance: first cycle: imbalance %d%% (%s)", st.ImbalancePercent, hostsText(st.Hosts))
		}
		inFlight := 0
		for _, r := range ms {
			if !r.phase.IsFinal() {
				inFlight++
			}
		}
		settled := st.Cycles >= minCycles && st.ImbalancePercent <= rebalanceTarget && inFlight == 0 && !st.Active
		if !settled {
			settledSince = time.Time{}
			return false, nil
		}
		if settledSince.IsZero() {
			settledSince = time.Now()
		}
		// Settled past the cooldown and two more cycles: the moved
		// domains are free to go back, and only the band holds them.
		return time.Since(settledSince) >= rebalanceCooldown+2*rebalanceInterval, nil
	})
	s.res.Seconds = labkit.Round1(time.Since(t0).Seconds())
	st := last.Status
	if err != nil {
		s.note("no convergence: %v (cycles %d, imbalance %d%%, active %v, hosts %s, message %q)", err, st.Cycles,
			st.ImbalancePercent, st.Active, hostsText(st.Hosts), labkit.Clip(st.Message, 200))
	}
	if line.ImbalanceBefore < 0 {
		line.ImbalanceBefore = line.ImbalanceOwnBefore
		s.note("imbalanceBefore from XenHost status: the policy reported no cycle before its first move")
	}
	line.ImbalanceAfter, line.Cycles = int(st.ImbalancePercent), st.Cycles
	if err := f.quiesce(ctx, quiesceWait); err != nil {
		s.note("%v", err)
	}
	line.ImbalanceOwnAfter, loads, _, _ = f.ownImbalance(ctx)
	s.note("load after: %s; policy: %s", loads, hostsText(st.Hosts))
	var ms []migRecord
	for _, r := range mine() {
		if r.phase == v1.MigrationSucceeded {
			s.res.Migrations++
			ms = append(ms, r)
		} else {
			s.note("rebalance migration %s of %s ended %s: %s", r.name, r.domain, phaseOrPending(r.phase), labkit.Clip(r.reason, 120))
		}
	}
	sort.Slice(ms, func(i, j int) bool { return ms[i].finalRV < ms[j].finalRV })
	var path []string
	for _, r := range ms {
		path = append(path, fmt.Sprintf("%s:%s->%s", r.domain, r.source, r.target))
	}
	back := backAndForth(ms)
	line.Oscillations = len(back)
	s.notes = append(s.notes, back...)
	s.note("moves: %s", strings.Join(path, " "))
	s.goal = err == nil && line.ImbalanceAfter < line.ImbalanceBefore && line.ImbalanceAfter <= line.TargetBand &&
		line.Oscillations == 0 && line.Cycles >= minCycles
	return line
}

// ownImbalance computes host load as the contract defines it (weights 1:1;
// CPU% = status.load.cpuMillis over cpus, memory% = used over capacity)
// from XenHost status, unsmoothed: max - min, in percent. ok is false
// while a host has no load sample.
func (f *fleet) ownImbalance(ctx context.Context) (int, string, bool, error) {
	var parts []string
	lo, hi := 1e9, -1e9
	ok := true
	for _, h := range f.spec.hosts {
		var xh v1.XenHost
		if err := f.c.Get(ctx, client.ObjectKey{Name: h}, &xh); err != nil {
			return -1, "", false, err
		}
		st := xh.Status
		mem := 0.0
		if st.CapacityBytes > 0 {
			mem = 100 * float64(st.CapacityBytes-st.FreeBytes) / float64(st.CapacityBytes)
		}
		cpu := 0.0
		if st.Load == nil {
			ok = false
		} else if st.CPUs > 0 {
			cpu = 100 * float64(st.Load.CPUMillis) / float64(st.CPUs*1000)
		}
		load := (cpu + mem) / 2
		lo, hi = min(lo, load), max(hi, load)
		parts = append(parts, fmt.Sprintf("%s=%.0f%%(cpu %.1f mem %.0f, %d dom)", h, load, cpu, mem, st.Domains))
	}
	return int(hi - lo + 0.5), strings.Join(parts, " "), ok, nil
}

func hostsText(hs []v1.HostLoadStatus) string {
	var parts []string
	for _, h := range hs {
		parts = append(parts, fmt.Sprintf("%s=%d%%(cpu %d mem %d, %d dom)", h.Host, h.LoadPercent, h.CPUPercent, h.MemoryPercent, h.Domains))
	}
	return strings.Join(parts, " ")
}

// --- priority ------------------------------------------------------------

type priorityLine struct {
	*common
	OrderRespected bool `json:"orderRespected"`
	// rebalanceQueued: Rebalance migrations waiting for a slot when the
	// drain began; maxMigrationsSeen: slot holders at once (limit 1).
	RebalanceQueued   int `json:"rebalanceQueued"`
	Evacuations       int `json:"evacuations"`
	Preempted         int `json:"preempted"`
	MaxMigrations     int `json:"maxMigrations"`
	MaxMigrationsSeen int `json:"maxMigrationsSeen"`
}

func playPriority(ctx context.Context, s *session) any {
	f := s.f
	hosts := f.spec.hosts
	drainHost, to := hosts[0], hosts[len(hosts)-1]
	line := &priorityLine{common: s.res, MaxMigrations: f.spec.limits.cluster}
	// Rebalance-priority migrations of the second host's domains to the
	// empty host; with one slot in the cluster they queue.
	var rs []string
	for _, d := range f.spec.placement[hosts[1]] {
		if len(rs) == 4 {
			break
		}
		m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: domNamespace, Name: "prio-" + d},
			Spec: v1.VMMigrationSpec{Domain: d, TargetHost: to, Priority: v1.PriorityRebalance}}
		if err := f.c.Create(ctx, m); err != nil {
			s.note("harness: create %s: %v", m.Name, err)
			return line
		}
		rs = append(rs, m.Name)
	}
	isR := map[string]bool{}
	for _, n := range rs {
		isR[n] = true
	}
	f.log("priority: %d Rebalance migrations to %s, one slot; then drain %s", len(rs), to, drainHost)
	t0 := time.Now()
	if err := waitFor(ctx, streamWait, 200*time.Millisecond, func() (bool, error) {
		for _, r := range s.mo.snapshot() {
			if isR[r.name] && r.slotRV != 0 {
				return true, nil
			}
		}
		return false, nil
	}); err != nil {
		s.note("no Rebalance migration got a slot: %v", err)
		return line
	}
	drainRV, err := f.setDrain(ctx, drainHost, true)
	if err != nil {
		s.note("harness: %v", err)
		return line
	}
	drv := rvOf(drainRV)
	if err := waitFor(ctx, finalWait+drainWait, time.Second, func() (bool, error) {
		var xh v1.XenHost
		if err := f.c.Get(ctx, client.ObjectKey{Name: drainHost}, &xh); err != nil {
			return false, err
		}
		c := hostCondition(&xh, v1.HostEvacuatedCondition)
		if c == nil || c.Status != metav1.ConditionTrue {
			return false, nil
		}
		for _, r := range s.mo.snapshot() {
			if !r.phase.IsFinal() {
				return false, nil
			}
		}
		return true, nil
	}); err != nil {
		s.note("drain of %s or the Rebalance migrations did not end: %v", drainHost, err)
	}
	s.res.Seconds = labkit.Round1(time.Since(t0).Seconds())
	snap := s.mo.snapshot() // in the order slots were granted
	var es, rq []migRecord
	var order []string
	for _, r := range snap {
		if r.phase == v1.MigrationSucceeded {
			s.res.Migrations++
		}
		if r.endReason == v1.ReasonPreempted || r.preemptedBy != "" {
			line.Preempted++
			s.note("%s preempted (by %q, ended %s/%s)", r.name, r.preemptedBy, phaseOrPending(r.phase), r.endReason)
		}
		kind := "?"
		switch {
		case isR[r.name]:
			kind = "R"
			if r.slotRV == 0 || r.slotRV > drv {
				rq = append(rq, r)
			}
		case isDrainOf(r, drainHost):
			kind = "E"
			es = append(es, r)
		default:
			s.note("unexpected migration %s (labels %v)", r.name, r.labels)
		}
		slot := "never"
		if r.slotRV != 0 {
			slot = fmt.Sprintf("rv%d", r.slotRV)
		}
		end := phaseOrPending(r.phase)
		if r.endReason != "" && r.endReason != end {
			end += "/" + r.endReason
		}
		order = append(order, fmt.Sprintf("%s:%s@%s/%s(%s)", kind, r.domain, slot, ptPreparing(r.last), end))
	}
	line.RebalanceQueued, line.Evacuations = len(rq), len(es)
	_, _, line.MaxMigrationsSeen, _, _ = s.mo.maxima()
	s.note("slot order (by stored change; PreparingTarget times from status): %s", strings.Join(order, " "))
	// Every Rebalance migration that got its slot after an evacuation
	// existed must have got it after that evacuation got its own.
	violations := orderViolations(es, rq, drv)
	s.notes = append(s.notes, violations...)
	if len(es) == 0 {
		s.note("the drain created no evacuation migrations")
	}
	if len(rq) == 0 {
		s.note("no Rebalance migration was waiting when the drain began: order not tested")
	}
	if line.MaxMigrationsSeen > line.MaxMigrations {
		s.note("%d migrations held slots at once, limit %d", line.MaxMigrationsSeen, line.MaxMigrations)
	}
	line.OrderRespected = len(violations) == 0 && len(es) > 0 && len(rq) > 0
	s.goal = line.OrderRespected && line.MaxMigrationsSeen <= line.MaxMigrations
	return line
}

// ptPreparing is when the API says m entered PreparingTarget.
func ptPreparing(m *v1.VMMigration) string {
	if m == nil {
		return "-"
	}
	for _, t := range m.Status.PhaseTransitionTimestamps {
		if t.Phase == v1.MigrationPreparingTarget {
			return t.Time.UTC().Format("15:04:05")
		}
	}
	return "-"
}

func phaseOrPending(p v1.VMMigrationPhase) string {
	if p == "" {
		return "Pending"
	}
	return string(p)
}

func condText(c *metav1.Condition) string {
	if c == nil {
		return "absent"
	}
	return fmt.Sprintf("%s/%s %q", c.Status, c.Reason, labkit.Clip(c.Message, 120))
}

func drainText(d *v1.DrainStatus) string {
	if d == nil {
		return "absent"
	}
	t := fmt.Sprintf("{reason %s domains %d migrating %d migrated %d failed %d", d.Reason, d.Domains, d.Migrating, d.Migrated, d.Failed)
	for _, b := range d.Blocked {
		t += fmt.Sprintf(" blocked %s/%s: %s", b.Namespace, b.Name, labkit.Clip(b.Reason, 80))
	}
	return t + "}"
}

func srcText(m *v1.VMMigration) string {
	if s := m.Status.Source; s != nil && s.Progress != nil {
		return fmt.Sprintf("source %s, %d bytes sent", s.Phase, s.Progress.BytesSent)
	}
	return "no source progress"
}

// --- move ----------------------------------------------------------------

// playMove migrates the first host's domains, one user VMMigration each,
// round robin to the other hosts: a check of the harness itself (fleet,
// monitor, invariants) against the plain migration path.
func playMove(ctx context.Context, s *session) any {
	f := s.f
	hosts := f.spec.hosts
	var names []string
	for i, d := range f.spec.placement[hosts[0]] {
		m := &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: domNamespace, Name: "move-" + d},
			Spec: v1.VMMigrationSpec{Domain: d, TargetHost: hosts[1+i%(len(hosts)-1)]}}
		if err := f.c.Create(ctx, m); err != nil {
			s.note("harness: create %s: %v", m.Name, err)
			return s.res
		}
		names = append(names, m.Name)
	}
	t0 := time.Now()
	err := waitFor(ctx, finalWait, 500*time.Millisecond, func() (bool, error) {
		for _, r := range s.mo.snapshot() {
			if !r.phase.IsFinal() {
				return false, nil
			}
		}
		return len(s.mo.snapshot()) == len(names), nil
	})
	s.res.Seconds = labkit.Round1(time.Since(t0).Seconds())
	if err != nil {
		s.note("migrations did not end: %v", err)
	}
	for _, r := range s.mo.snapshot() {
		if r.phase == v1.MigrationSucceeded {
			s.res.Migrations++
		} else {
			s.note("%s ended %s: %s", r.name, phaseOrPending(r.phase), labkit.Clip(r.reason, 160))
		}
	}
	out, in, all, _, _ := s.mo.maxima()
	s.note("at once: %d out of one host, %d into one host, %d in all", out, in, all)
	s.goal = err == nil && s.res.Migrations == len(names)
	return s.res
}

// whenResumed says whether m resumed on its target before the undrain
// could stop it (the point of no return).
func whenResumed(m *v1.VMMigration) string {
	if t := m.Status.Target; t != nil && t.ResumeTime != nil {
		return "resumed on " + t.Host + " at " + t.ResumeTime.UTC().Format("15:04:05")
	}
	return "no resume time"
}

// backAndForth finds the oscillations among succeeded moves in the order
// they ended: a domain moved A->B, and its next move B->A.
func backAndForth(ms []migRecord) []string {
	last := map[string]migRecord{}
	var out []string
	for _, r := range ms {
		if p, ok := last[r.domain]; ok && r.source == p.target && r.target == p.source {
			out = append(out, fmt.Sprintf("%s moved %s->%s (%s) and back (%s)", r.domain, p.source, p.target, p.name, r.name))
		}
		last[r.domain] = r
	}
	return out
}

// orderViolations finds each Rebalance migration (rq: those still waiting
// when the drain began at resource version drainRV) that got its slot
// after an evacuation existed but before that evacuation got its own.
func orderViolations(es, rq []migRecord, drainRV int64) []string {
	var out []string
	for _, e := range es {
		created := e.createRV
		if created == 0 { // first seen by a list: the drain is a lower bound
			created = drainRV
		}
		for _, r := range rq {
			if r.slotRV == 0 || r.slotRV < created {
				continue
			}
			if e.slotRV == 0 || e.slotRV > r.slotRV {
				out = append(out, fmt.Sprintf("Rebalance %s got a slot (rv%d) before Evacuation %s (%s)", r.name, r.slotRV, e.name, rvText(e.slotRV)))
			}
		}
	}
	return out
}

func rvText(rv int64) string {
	if rv == 0 {
		return "never"
	}
	return fmt.Sprintf("rv%d", rv)
}
