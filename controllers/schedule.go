package controllers

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/klog/v2"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// Requeue intervals while a migration waits: watches on XenHosts and on
// migrations that end wake it first; these are backstops for what no
// event signals (a stale heartbeat, a certificate being issued).
const (
	slotRetry   = 15 * time.Second
	targetRetry = 15 * time.Second
)

// invalid fails a migration whose spec or the objects it names make it impossible.
func (r *VMMigrationReconciler) invalid(s *scope, reason, msg string) {
	setCondition(s.mig, v1.ValidCondition, metav1.ConditionFalse, reason, msg)
	r.finish(s, v1.MigrationFailed, reason, msg, s.mig.Status.SourceHost)
}

// reconcileSchedule validates the migration (Pending), then waits for a
// concurrency slot and a target (Scheduling), seals the token to both agents and
// hands over to the target agent (PreparingTarget).
func (r *VMMigrationReconciler) reconcileSchedule(ctx context.Context, s *scope) error {
	m := s.mig
	log := ctrllog.FromContext(ctx)

	// The domain, where it runs, and that host's agent.
	dom := &v1.XenDomain{}
	if err := r.Client.Get(ctx, types.NamespacedName{Namespace: m.Namespace, Name: m.Spec.Domain}, dom); err != nil {
		if apierrors.IsNotFound(err) {
			r.invalid(s, v1.ReasonDomainNotFound, fmt.Sprintf("XenDomain %q does not exist in namespace %q; list the domains with: kubectl get xendomains -n %s", m.Spec.Domain, m.Namespace, m.Namespace))
			return nil
		}
		return fmt.Errorf("get XenDomain %s/%s: %w", m.Namespace, m.Spec.Domain, err)
	}
	if dom.Status.Host == "" || dom.Status.State != "Running" {
		r.invalid(s, v1.ReasonDomainNotRunning, fmt.Sprintf("XenDomain %s is not running (host %q, state %q); only running domains can be live-migrated", dom.Name, dom.Status.Host, dom.Status.State))
		return nil
	}
	src := &v1.XenHost{}
	if err := r.Client.Get(ctx, types.NamespacedName{Name: dom.Status.Host}, src); err != nil {
		if apierrors.IsNotFound(err) {
			r.invalid(s, v1.ReasonSourceAgentLost, fmt.Sprintf("XenDomain %s runs on %s, which has no XenHost: is its node agent running?", dom.Name, dom.Status.Host))
			return nil
		}
		return fmt.Errorf("get XenHost %s: %w", dom.Status.Host, err)
	}
	if !hostFresh(src, s.now, r.HeartbeatTimeout) {
		r.invalid(s, v1.ReasonSourceAgentLost, fmt.Sprintf("The agent of source host %s is not heartbeating (timeout %s); start it and create the migration again", src.Name, r.HeartbeatTimeout))
		return nil
	}
	m.Status.SourceHost = src.Name
	mem := dom.Spec.MemoryBytes
	m.Status.DomainMemoryBytes = mem
	if dom.Status.PredictedCost != nil && m.Status.Predicted == nil {
		m.Status.Predicted = dom.Status.PredictedCost.DeepCopy()
	}

	// Every migration, fresh from the API server: the slot decision must
	// see the decisions made just before.
	var all v1.VMMigrationList
	if err := r.APIReader.List(ctx, &all); err != nil {
		return fmt.Errorf("list VMMigrations: %w", err)
	}
	for i := range all.Items {
		o := &all.Items[i]
		if o.UID == m.UID || o.Namespace != m.Namespace || o.Spec.Domain != m.Spec.Domain || o.Status.Phase.IsFinal() || !o.DeletionTimestamp.IsZero() {
			continue
		}
		if o.Status.Phase.HoldsSlot() || o.CreationTimestamp.Before(&m.CreationTimestamp) ||
			(o.CreationTimestamp.Equal(&m.CreationTimestamp) && o.Name < m.Name) {
			r.invalid(s, v1.ReasonDomainBusy, fmt.Sprintf("VMMigration %s already migrates domain %s; wait for it to finish or cancel it", o.Name, m.Spec.Domain))
			return nil
		}
	}

	// An explicit target must exist, differ from the source, be schedulable,
	// compatible, and have room.
	var dst *v1.XenHost
	if t := m.Spec.TargetHost; t != "" {
		if t == src.Name {
			r.invalid(s, v1.ReasonTargetIsSource, fmt.Sprintf("Target host %s is the host domain %s already runs on; pick another host or leave targetHost empty", t, dom.Name))
			return nil
		}
		dst = &v1.XenHost{}
		if err := r.Client.Get(ctx, types.NamespacedName{Name: t}, dst); err != nil {
			if apierrors.IsNotFound(err) {
				r.invalid(s, v1.ReasonTargetNotFound, fmt.Sprintf("Target host %q has no XenHost; list the hosts with: kubectl get xenhosts", t))
				return nil
			}
			return fmt.Errorf("get XenHost %s: %w", t, err)
		}
		if dst.Spec.Unschedulable {
			r.invalid(s, v1.ReasonTargetUnschedulable, fmt.Sprintf("Target host %s is cordoned (spec.unschedulable); uncordon it or pick another host", t))
			return nil
		}
		if hostDraining(dst) {
			r.invalid(s, v1.ReasonTargetUnschedulable, fmt.Sprintf("Target host %s is being drained; undrain it (kubectl xenferry undrain %s, or uncordon its Node) or pick another host", t, t))
			return nil
		}
		if why := incompatibility(src, dst); why != "" {
			r.invalid(s, v1.ReasonIncompatibleHosts, "Hosts are incompatible: "+why)
			return nil
		}
		if !hostFresh(dst, s.now, r.HeartbeatTimeout) {
			r.invalid(s, v1.ReasonTargetAgentLost, fmt.Sprintf("The agent of target host %s is not heartbeating (timeout %s); start it and create the migration again", t, r.HeartbeatTimeout))
			return nil
		}
		if dst.Status.CapacityBytes < mem {
			r.invalid(s, v1.ReasonInsufficientCapacity, fmt.Sprintf("Target %s has %s of memory in total but domain %s needs %s", t, gib(dst.Status.CapacityBytes), dom.Name, gib(mem)))
			return nil
		}
	}

	// The policy and the parameters in force.
	var policy *v1.MigrationPolicy
	if ref := m.Spec.PolicyRef; ref != "" {
		policy = &v1.MigrationPolicy{}
		if err := r.Client.Get(ctx, types.NamespacedName{Name: ref}, policy); err != nil {
			if apierrors.IsNotFound(err) {
				r.invalid(s, v1.ReasonPolicyNotFound, fmt.Sprintf("MigrationPolicy %q does not exist; list them with: kubectl get migrationpolicies", ref))
				return nil
			}
			return fmt.Errorf("get MigrationPolicy %s: %w", ref, err)
		}
	} else {
		var pols v1.MigrationPolicyList
		if err := r.Client.List(ctx, &pols); err != nil {
			return fmt.Errorf("list MigrationPolicies: %w", err)
		}
		if len(pols.Items) > 0 {
			ns := &corev1.Namespace{}
			if err := r.Client.Get(ctx, types.NamespacedName{Name: m.Namespace}, ns); err != nil && !apierrors.IsNotFound(err) {
				return fmt.Errorf("get Namespace %s: %w", m.Namespace, err)
			}
			var errs []error
			policy, errs = selectPolicy(pols.Items, ns.Labels, dom.Labels)
			for _, e := range errs {
				log.Error(e, "Skipped MigrationPolicy with an invalid selector")
			}
		}
	}
	params := resolveParameters(&m.Spec, policy, mem, r.Defaults)
	// What the hosts' data paths can carry narrows the strategy; a spec they
	// cannot honour is refused now, never failed late.
	capHosts := []*v1.XenHost{src}
	if dst != nil {
		capHosts = append(capHosts, dst)
	}
	capNote, refusal := resolveCapabilities(&params, m.Spec.Strategy, capHosts...)
	if refusal != "" {
		r.invalid(s, v1.ReasonUnsupportedStrategy, "The hosts cannot carry this migration: "+refusal)
		return nil
	}
	m.Status.Parameters = &params

	if m.Status.Phase == v1.MigrationPending {
		msg := fmt.Sprintf("Domain %s (%s) runs on %s; strategy %s", dom.Name, gib(mem), src.Name, params.EngineStrategy)
		if capNote != "" {
			msg += " (" + capNote + ")"
		}
		if params.Policy != "" {
			msg += ", policy " + params.Policy
		}
		setCondition(m, v1.ValidCondition, metav1.ConditionTrue, v1.ReasonValidated, msg)
		r.setPhase(s, v1.MigrationScheduling)
	}

	// Concurrency slots: cluster, outbound from the source, inbound to the
	// target; granted by priority (a higher one waiting keeps them from
	// lower ones), and an evacuation may preempt a rebalancing migration.
	l := computeLoad(all.Items, string(m.UID))
	wait := func(reason, msg string) error {
		if c := findCondition(m, v1.ScheduledCondition); c == nil || c.Message != msg {
			r.event(m, corev1.EventTypeNormal, reason, "Schedule", msg)
		}
		setCondition(m, v1.ScheduledCondition, metav1.ConditionFalse, reason, msg)
		if reason == v1.ReasonWaitingForSlot {
			s.requeueAfter(slotRetry)
		} else {
			s.requeueAfter(targetRetry)
		}
		return nil
	}
	if o := blockedBy(waitingAhead(all.Items, m), m, src.Name, l, r.Limits); o != nil {
		return wait(v1.ReasonWaitingForSlot, fmt.Sprintf("Queued behind %s migration %s/%s (priority %s goes before %s)",
			strings.ToLower(string(priorityOf(o))), o.Namespace, o.Name, priorityOf(o), priorityOf(m)))
	}
	full := func(msg string, holds func(o *v1.VMMigration) bool) error {
		if priorityOf(m) == v1.PriorityEvacuation {
			if v := r.preempt(ctx, all.Items, m, holds); v != "" {
				msg += "; preempting rebalancing migration " + v
			}
		}
		return wait(v1.ReasonWaitingForSlot, msg)
	}
	if r.Limits.Cluster > 0 && l.total >= r.Limits.Cluster {
		return full(fmt.Sprintf("Queued: %d migrations run in the cluster (limit %d)", l.total, r.Limits.Cluster),
			func(*v1.VMMigration) bool { return true })
	}
	if r.Limits.OutboundPerHost > 0 && l.outbound[src.Name] >= r.Limits.OutboundPerHost {
		return full(fmt.Sprintf("Queued: %d migrations leave %s (outbound limit %d)", l.outbound[src.Name], src.Name, r.Limits.OutboundPerHost),
			func(o *v1.VMMigration) bool { return o.Status.SourceHost == src.Name })
	}
	if dst != nil {
		if r.Limits.InboundPerHost > 0 && l.inbound[dst.Name] >= r.Limits.InboundPerHost {
			return full(fmt.Sprintf("Queued: %d migrations arrive at %s (inbound limit %d)", l.inbound[dst.Name], dst.Name, r.Limits.InboundPerHost),
				func(o *v1.VMMigration) bool { return o.Status.TargetHost == dst.Name })
		}
		if why := fitReason(dst, mem, l); why != "" {
			if l.inboundMemory[dst.Name] == 0 {
				r.invalid(s, v1.ReasonInsufficientCapacity, "Not enough memory: "+why)
				return nil
			}
			return wait(v1.ReasonWaitingForSlot, "Queued: "+why)
		}
	} else {
		var hosts v1.XenHostList
		if err := r.Client.List(ctx, &hosts); err != nil {
			return fmt.Errorf("list XenHosts: %w", err)
		}
		avoid, err := r.antiAffinity(ctx, dom, all.Items)
		if err != nil {
			return err
		}
		var why string
		if dst, why = chooseTarget(hosts.Items, src, mem, l, r.Limits, s.now, r.HeartbeatTimeout, avoid); dst == nil {
			return wait(v1.ReasonNoTargetAvailable, "Waiting for a target: "+why)
		}
		// chooseTarget keeps to the source's backend, so the target carries
		// what the source does; checked all the same before the token binds it.
		if _, refusal := resolveCapabilities(&params, m.Spec.Strategy, src, dst); refusal != "" {
			return wait(v1.ReasonNoTargetAvailable, "Waiting for a target: "+refusal)
		}
		m.Status.Parameters = &params
	}

	if err := r.ensureToken(ctx, m, src, dst); err != nil {
		if errors.Is(err, errNoCertificate) {
			// Certificates arrive through XenHost status within moments of
			// an agent's start: look again soon.
			s.requeueAfter(time.Second)
			return wait(v1.ReasonWaitingForCertificate, "Waiting for certificates: "+err.Error())
		}
		return err
	}
	m.Status.TargetHost = dst.Name
	msg := fmt.Sprintf("Migrating %s from %s to %s (%s free)", dom.Name, src.Name, dst.Name, gib(dst.Status.FreeBytes-l.inboundMemory[dst.Name]))
	if m.Spec.TargetHost == "" {
		msg += ", chosen as the least loaded host"
	}
	setCondition(m, v1.ScheduledCondition, metav1.ConditionTrue, v1.ReasonTargetSelected, msg)
	r.event(m, corev1.EventTypeNormal, v1.ReasonTargetSelected, "Schedule", msg)
	ctrllog.FromContext(ctx).Info("Selected target host", "VMMigration", klog.KObj(m), "source", src.Name, "target", dst.Name)
	r.setPhase(s, v1.MigrationPreparingTarget)
	setCondition(m, v1.TargetReadyCondition, metav1.ConditionFalse, v1.ReasonWaitingForTargetAgent,
		fmt.Sprintf("Waiting for the agent of %s to prepare the receiver", dst.Name))
	if params.ProgressTimeout.Duration > 0 {
		s.requeueAfter(params.ProgressTimeout.Duration)
	}
	s.requeueAfter(r.HeartbeatTimeout / 2)
	return nil
}

// priorityOf is a migration's priority (User when unset, as defaulted).
func priorityOf(m *v1.VMMigration) v1.MigrationPriority {
	if m.Spec.Priority == "" {
		return v1.PriorityUser
	}
	return m.Spec.Priority
}

// waitingAhead returns the migrations of higher priority than m that wait
// for a slot or have not been scheduled yet, highest and oldest first.
func waitingAhead(all []v1.VMMigration, m *v1.VMMigration) []*v1.VMMigration {
	rank := priorityOf(m).Rank()
	var ahead []*v1.VMMigration
	for i := range all {
		o := &all[i]
		if o.UID == m.UID || priorityOf(o).Rank() <= rank || !o.DeletionTimestamp.IsZero() || o.Spec.Cancel {
			continue
		}
		switch o.Status.Phase {
		case "", v1.MigrationPending:
		case v1.MigrationScheduling:
			// Waiting for a target or a certificate is not waiting for a
			// slot: it must not hold others back.
			if c := findCondition(o, v1.ScheduledCondition); c != nil && c.Reason != v1.ReasonWaitingForSlot {
				continue
			}
		default:
			continue
		}
		ahead = append(ahead, o)
	}
	sort.Slice(ahead, func(i, j int) bool {
		a, b := ahead[i], ahead[j]
		if ra, rb := priorityOf(a).Rank(), priorityOf(b).Rank(); ra != rb {
			return ra > rb
		}
		return a.CreationTimestamp.Before(&b.CreationTimestamp)
	})
	return ahead
}

// blockedBy returns the waiting higher-priority migration that m must let
// go first, or nil: one leaving the same source (outbound slots), or any
// of them when the cluster has no more free slots than they need.
func blockedBy(ahead []*v1.VMMigration, m *v1.VMMigration, src string, l load, lim Limits) *v1.VMMigration {
	if len(ahead) == 0 {
		return nil
	}
	if lim.Cluster > 0 && lim.Cluster-l.total <= len(ahead) {
		return ahead[0]
	}
	for _, o := range ahead {
		if o.Status.SourceHost == src || (m.Spec.TargetHost != "" && o.Spec.TargetHost == m.Spec.TargetHost) {
			return o
		}
	}
	return nil
}

// preemptible reports whether a rebalancing migration may still give up
// its slot: before the stop-and-copy, never past the point of no return.
func preemptible(o *v1.VMMigration) bool {
	if priorityOf(o) != v1.PriorityRebalance || o.Status.AbortRequested || resumed(o) {
		return false
	}
	switch o.Status.Phase {
	case v1.MigrationPreparingTarget, v1.MigrationTargetReady, v1.MigrationPreCopy:
		return true
	}
	return false
}

// preempt asks one preemptible rebalancing migration that holds a slot m
// needs (holds) to give it up, by annotating it; its own reconcile aborts
// it. It returns that migration's name, "" if there is none.
func (r *VMMigrationReconciler) preempt(ctx context.Context, all []v1.VMMigration, m *v1.VMMigration, holds func(*v1.VMMigration) bool) string {
	for i := range all {
		o := &all[i]
		if !o.Status.Phase.HoldsSlot() || !holds(o) || !preemptible(o) {
			continue
		}
		if o.Annotations[v1.PreemptedByAnnotation] != "" {
			return o.Namespace + "/" + o.Name // already asked
		}
		patch := ctrl.MergeFrom(o.DeepCopy())
		if o.Annotations == nil {
			o.Annotations = map[string]string{}
		}
		o.Annotations[v1.PreemptedByAnnotation] = m.Namespace + "/" + m.Name
		if err := r.Client.Patch(ctx, o, patch); err != nil {
			ctrllog.FromContext(ctx).Error(err, "Could not preempt a rebalancing migration", "VMMigration", klog.KObj(o))
			return ""
		}
		msg := fmt.Sprintf("Preempting rebalancing migration %s/%s for evacuation %s/%s", o.Namespace, o.Name, m.Namespace, m.Name)
		r.event(m, corev1.EventTypeNormal, v1.ReasonPreempted, "Preempt", msg)
		return o.Namespace + "/" + o.Name
	}
	return ""
}

// antiAffinity returns the hosts the domain must avoid: those running, or
// receiving through an active migration, a domain that shares one of its
// anti-affinity label values.
func (r *VMMigrationReconciler) antiAffinity(ctx context.Context, dom *v1.XenDomain, all []v1.VMMigration) (map[string]string, error) {
	vals := antiAffinityValues(dom.Labels, nil)
	if len(vals) == 0 {
		return nil, nil
	}
	var doms v1.XenDomainList
	if err := r.Client.List(ctx, &doms); err != nil {
		return nil, fmt.Errorf("list XenDomains: %w", err)
	}
	avoid := antiAffinityAvoid(doms.Items, dom, vals)
	byName := map[string]*v1.XenDomain{} // bounded by the domains
	for i := range doms.Items {
		byName[doms.Items[i].Namespace+"/"+doms.Items[i].Name] = &doms.Items[i]
	}
	for i := range all {
		o := &all[i]
		if o.Status.Phase.IsFinal() || o.Status.TargetHost == "" || (o.Namespace == dom.Namespace && o.Spec.Domain == dom.Name) {
			continue
		}
		if od := byName[o.Namespace+"/"+o.Spec.Domain]; od != nil {
			for k, v := range vals {
				if od.Labels[k] == v {
					avoid[o.Status.TargetHost] = fmt.Sprintf("receives %s/%s with %s=%s (anti-affinity)", od.Namespace, od.Name, k, v)
				}
			}
		}
	}
	return avoid, nil
}

func findCondition(m *v1.VMMigration, typ string) *metav1.Condition {
	for i := range m.Status.Conditions {
		if m.Status.Conditions[i].Type == typ {
			return &m.Status.Conditions[i]
		}
	}
	return nil
}
