package controllers

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	"k8s.io/apimachinery/pkg/api/resource"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/tools/events"
	"k8s.io/klog/v2"
	"k8s.io/utils/clock"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	ctrl "sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/controller/controllerutil"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// Drain: a host is evacuated while its XenHost asks for it (spec.drain) or
// the Kubernetes Node of its dom0 (same name) is cordoned, which is what
// `kubectl drain` does first. kubectl drain then evicts the node's pods and
// waits; xenferry keeps a guard Pod on every node that still runs domains
// that must move, behind a PodDisruptionBudget that admits no eviction, so
// the eviction API answers 429 and kubectl drain retries until the guard is
// removed, which the controller does once the host is evacuated.

// Guard objects: the Pod and its PodDisruptionBudget share this name prefix
// and the label GuardHostLabel.
const (
	GuardPrefix    = "xenferry-guard-"
	GuardHostLabel = "migration.xenferry.io/guard-host"
)

// Retry backoff of a domain whose evacuation migration failed.
const (
	drainRetryMin = 5 * time.Second
	drainRetryMax = 2 * time.Minute
	// drainResync re-reads a draining host for retries and capacity changes
	// that no watched object signals.
	drainResync = 10 * time.Second
)

// DrainReconciler evacuates XenHosts. One worker: the evacuation
// migrations it creates are decided on one host's fresh state at a time.
type DrainReconciler struct {
	Client    ctrl.Client
	APIReader ctrl.Reader
	Recorder  events.EventRecorder
	Clock     clock.PassiveClock
	// Namespace of the guard Pods (the operator's).
	Namespace string
	// GuardImage and GuardCommand run the guard container: it only has to
	// stay up (the controller's own image, which has a --pause mode).
	GuardImage   string
	GuardCommand []string
	// MaxInFlight bounds the evacuations of one host that exist at once:
	// the rest wait here, cheapest first, not as a queue of VMMigrations.
	// 0: every domain gets its VMMigration at once, and they wait for
	// slots (an undrain then cancels all that have not started).
	MaxInFlight int
}

// drainScope is what one reconcile of one host reads and decides.
type drainScope struct {
	host *v1.XenHost
	node *corev1.Node // nil: no Node of that name (a cluster without kubelets on dom0s)
	// machine is the Node's Cluster API Machine (nil without Cluster API).
	machine *unstructured.Unstructured
	now     time.Time
	// domains running on the host (status.host), and every other one.
	domains, all []v1.XenDomain
	// migrations of any reason, fresh from the API server.
	migs []v1.VMMigration
	// byDomain indexes migs by "namespace/domain"; bounded by migs.
	byDomain map[string][]*v1.VMMigration
	// requested and why.
	requested bool
	reason    string
	// decisions.
	create    []*v1.XenDomain
	cancel    []*v1.VMMigration
	mustMove  int // domains on the host that must leave before it is evacuated
	requeue   time.Duration
	evacuated bool
}

// Reconcile evacuates (or stops evacuating) one host. Steps run in order;
// condition setters are pure; the drain's summary is computed last.
func (r *DrainReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	// Fresh, and patched under optimistic locking below: the agent writes
	// this status too (heartbeats, its own conditions), and a merge patch
	// of the conditions list from a stale read would undo its writes.
	host := &v1.XenHost{}
	if err := r.APIReader.Get(ctx, req.NamespacedName, host); err != nil {
		return reconcile.Result{}, ctrl.IgnoreNotFound(err)
	}
	orig := host.DeepCopy()
	s := &drainScope{host: host, now: r.Clock.Now()}
	for _, step := range []func(context.Context, *drainScope) error{
		r.readState,
		r.decide,
		r.act,
		r.guard,
		r.preDrainHook,
	} {
		if err := step(ctx, s); err != nil {
			return reconcile.Result{}, err
		}
	}
	setDrainConditions(s)
	if !equality.Semantic.DeepEqual(orig.Status.Drain, host.Status.Drain) || !equality.Semantic.DeepEqual(orig.Status.Conditions, host.Status.Conditions) {
		if err := r.Client.Status().Patch(ctx, host, ctrl.MergeFromWithOptions(orig, ctrl.MergeFromWithOptimisticLock{})); err != nil {
			if apierrors.IsConflict(err) {
				return reconcile.Result{Requeue: true}, nil
			}
			return reconcile.Result{}, fmt.Errorf("patch drain status of XenHost %s: %w", host.Name, err)
		}
	}
	return reconcile.Result{RequeueAfter: s.requeue}, nil
}

// drainRequest says whether the host must be evacuated and why.
func drainRequest(h *v1.XenHost, node *corev1.Node, machine *unstructured.Unstructured) (bool, string) {
	switch {
	case h.Spec.Drain:
		return true, v1.DrainReasonRequested
	case node != nil && node.Spec.Unschedulable:
		return true, v1.DrainReasonNodeCordoned
	case machine != nil && machine.GetDeletionTimestamp() != nil:
		return true, v1.DrainReasonMachineDeleted
	}
	return false, ""
}

// readState reads the Node, the domains and the migrations.
func (r *DrainReconciler) readState(ctx context.Context, s *drainScope) error {
	node := &corev1.Node{}
	switch err := r.Client.Get(ctx, types.NamespacedName{Name: s.host.Name}, node); {
	case err == nil:
		s.node = node
	case !apierrors.IsNotFound(err):
		return fmt.Errorf("get Node %s: %w", s.host.Name, err)
	}
	m, err := machineOf(ctx, r.APIReader, s.node)
	if err != nil {
		return err
	}
	s.machine = m
	s.requested, s.reason = drainRequest(s.host, s.node, s.machine)
	var doms v1.XenDomainList
	if err := r.Client.List(ctx, &doms); err != nil {
		return fmt.Errorf("list XenDomains: %w", err)
	}
	s.all = doms.Items
	for i := range doms.Items {
		if doms.Items[i].Status.Host == s.host.Name {
			s.domains = append(s.domains, doms.Items[i])
		}
	}
	// Fresh: the decision to create a migration must see those created
	// by the reconcile before.
	var migs v1.VMMigrationList
	if err := r.APIReader.List(ctx, &migs); err != nil {
		return fmt.Errorf("list VMMigrations: %w", err)
	}
	s.migs = migs.Items
	s.byDomain = make(map[string][]*v1.VMMigration, len(s.migs))
	for i := range s.migs {
		m := &s.migs[i]
		k := m.Namespace + "/" + m.Spec.Domain
		s.byDomain[k] = append(s.byDomain[k], m)
	}
	return nil
}

// evacuationStrategy of a domain: its annotation, else its label, else LiveMigrate.
func evacuationStrategy(d *v1.XenDomain) string {
	if v := d.Annotations[v1.EvacuationStrategyKey]; v != "" {
		return v
	}
	if v := d.Labels[v1.EvacuationStrategyKey]; v != "" {
		return v
	}
	return v1.EvacuateLiveMigrate
}

// isDrainMigration reports whether m evacuates host.
func isDrainMigration(m *v1.VMMigration, host string) bool {
	return m.Labels[v1.ReasonLabel] == "drain" && m.Labels[v1.DrainHostLabel] == host
}

// decide computes, from the facts alone, which domains get an evacuation
// migration now, which migrations to cancel, and the drain's summary.
func (r *DrainReconciler) decide(_ context.Context, s *drainScope) error {
	h := s.host
	if !s.requested {
		for i := range s.migs {
			m := &s.migs[i]
			if isDrainMigration(m, h.Name) && !m.Status.Phase.IsFinal() && !m.Spec.Cancel && !resumed(m) {
				s.cancel = append(s.cancel, m)
			}
		}
		for i := range s.domains {
			if evacuationStrategy(&s.domains[i]) != v1.EvacuateNone {
				s.mustMove++
			}
		}
		return nil
	}
	next := v1.DrainStatus{Reason: s.reason}
	if prev := h.Status.Drain; prev != nil && prev.Reason == s.reason && prev.StartTime != nil {
		next.StartTime, next.CompletionTime = prev.StartTime, prev.CompletionTime
	} else {
		start := metav1.NewTime(s.now)
		next.StartTime = &start
	}
	// Per domain: the migrations that concern it.
	for i := range s.domains {
		d := &s.domains[i]
		strategy := evacuationStrategy(d)
		if strategy == v1.EvacuateNone {
			next.LeftBehind = appendBounded(next.LeftBehind, v1.BlockedDomain{Namespace: d.Namespace, Name: d.Name,
				Reason: "evacuationStrategy None: left to be shut down with the host"})
			continue
		}
		active, lastFail, fails := s.domainMigrations(d)
		if active == nil && d.Status.State != "Running" {
			next.Blocked = appendBounded(next.Blocked, v1.BlockedDomain{Namespace: d.Namespace, Name: d.Name,
				Reason: fmt.Sprintf("state %q: only running domains can be live-migrated; start it or shut it down", d.Status.State)})
			s.mustMove++
			continue
		}
		if active != nil {
			next.Migrating++
			s.mustMove++
			if c := findCondition(active, v1.ScheduledCondition); active.Status.Phase == v1.MigrationScheduling && c != nil && c.Reason == v1.ReasonNoTargetAvailable {
				if strategy == v1.EvacuateLiveMigrateIfPossible {
					next.Migrating--
					s.mustMove--
					next.LeftBehind = appendBounded(next.LeftBehind, v1.BlockedDomain{Namespace: d.Namespace, Name: d.Name,
						Reason: "evacuationStrategy LiveMigrateIfPossible and no host can take it (" + c.Message + "): left to be shut down with the host"})
					continue
				}
				next.Blocked = appendBounded(next.Blocked, v1.BlockedDomain{Namespace: d.Namespace, Name: d.Name,
					Reason: c.Message + "; free capacity, uncordon a host or add one"})
			}
			continue
		}
		s.mustMove++
		if lastFail != nil {
			wait := backoff(fails)
			at := lastFail.CreationTimestamp.Time
			if lastFail.Status.CompletionTime != nil {
				at = lastFail.Status.CompletionTime.Time
			}
			if left := at.Add(wait).Sub(s.now); left > 0 {
				next.Blocked = appendBounded(next.Blocked, v1.BlockedDomain{Namespace: d.Namespace, Name: d.Name,
					Reason: fmt.Sprintf("evacuation %s failed (%s); retry %d in %s", lastFail.Name, clip(lastFail.Status.FailureReason, 200), fails+1, left.Round(time.Second))})
				s.requeueAfter(left)
				continue
			}
		}
		s.create = append(s.create, d)
	}
	for i := range s.migs {
		m := &s.migs[i]
		if !isDrainMigration(m, h.Name) || m.CreationTimestamp.Before(next.StartTime) {
			continue
		}
		switch m.Status.Phase {
		case v1.MigrationSucceeded:
			next.Migrated++
		case v1.MigrationFailed:
			next.Failed++
		}
	}
	next.Domains = int32(s.mustMove)
	// Evacuated once no domain that must move runs here and every
	// evacuation ended: a domain the target took over may still be
	// completing its migration (post-copy) from this host.
	inFlight := 0
	for i := range s.migs {
		if m := &s.migs[i]; isDrainMigration(m, h.Name) && !m.Status.Phase.IsFinal() {
			inFlight++
		}
	}
	s.evacuated = s.mustMove == 0 && inFlight == 0
	next.Migrating = max(next.Migrating, int32(inFlight))
	// Shortest predicted migration first: the host empties sooner on
	// average, and a domain that cannot move does not hold the others.
	sort.SliceStable(s.create, func(i, j int) bool { return predictedSeconds(s.create[i]) < predictedSeconds(s.create[j]) })
	if r.MaxInFlight > 0 {
		room := max(r.MaxInFlight-inFlight, 0)
		if len(s.create) > room {
			s.create = s.create[:room] // the others wait their turn here: not blocked
		}
	}
	if s.evacuated && next.CompletionTime == nil {
		t := metav1.NewTime(s.now)
		next.CompletionTime = &t
	} else if !s.evacuated {
		next.CompletionTime = nil
	}
	h.Status.Drain = &next
	if !s.evacuated {
		s.requeueAfter(drainResync)
	}
	return nil
}

// predictedSeconds is the domain's predicted migration time, or its
// memory at the assumed link rate when its agent has not predicted one.
func predictedSeconds(d *v1.XenDomain) float64 {
	if c := d.Status.PredictedCost; c != nil && c.Time.Duration > 0 {
		return c.Time.Seconds()
	}
	return float64(d.Spec.MemoryBytes) / assumedLinkRate
}

func (s *drainScope) requeueAfter(d time.Duration) {
	if d < time.Second {
		d = time.Second
	}
	if s.requeue == 0 || d < s.requeue {
		s.requeue = d
	}
}

// domainMigrations returns the domain's migration in progress (any
// reason), and its latest failed evacuation of this host with the number of
// failures in a row.
func (s *drainScope) domainMigrations(d *v1.XenDomain) (active, lastFail *v1.VMMigration, fails int) {
	var drains []*v1.VMMigration
	for _, m := range s.byDomain[d.Namespace+"/"+d.Name] {
		if !m.Status.Phase.IsFinal() && m.DeletionTimestamp.IsZero() {
			active = m
		}
		if isDrainMigration(m, s.host.Name) && m.Status.Phase.IsFinal() {
			drains = append(drains, m)
		}
	}
	sort.Slice(drains, func(i, j int) bool { return drains[i].CreationTimestamp.After(drains[j].CreationTimestamp.Time) })
	for _, m := range drains {
		if m.Status.Phase == v1.MigrationSucceeded {
			break
		}
		if fails == 0 {
			lastFail = m
		}
		fails++
	}
	return active, lastFail, fails
}

func backoff(fails int) time.Duration {
	d := drainRetryMin
	for i := 1; i < fails && d < drainRetryMax; i++ {
		d *= 2
	}
	return min(d, drainRetryMax)
}

// appendBounded keeps the lists in status within their schema's bound.
func appendBounded(l []v1.BlockedDomain, b v1.BlockedDomain) []v1.BlockedDomain {
	if len(l) >= 256 {
		return l
	}
	return append(l, b)
}

func clip(s string, n int) string {
	if len(s) <= n {
		return s
	}
	return s[:n] + "…"
}

// act creates the evacuation migrations and cancels those of an undone drain.
func (r *DrainReconciler) act(ctx context.Context, s *drainScope) error {
	log := ctrllog.FromContext(ctx)
	for _, m := range s.cancel {
		patch := ctrl.MergeFrom(m.DeepCopy())
		m.Spec.Cancel = true
		if err := r.Client.Patch(ctx, m, patch); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("cancel evacuation %s: %w", klog.KObj(m), err)
		}
		log.Info("Cancelled evacuation: the drain was undone", "VMMigration", klog.KObj(m), "host", s.host.Name)
	}
	if len(s.cancel) > 0 {
		r.Recorder.Eventf(s.host, nil, corev1.EventTypeNormal, "DrainUndone", "Undrain",
			"Drain of %s undone: %d evacuation migrations not past the point of no return cancelled", s.host.Name, len(s.cancel))
	}
	for _, d := range s.create {
		m := &v1.VMMigration{
			ObjectMeta: metav1.ObjectMeta{
				Namespace:    d.Namespace,
				GenerateName: "drain-" + d.Name + "-",
				Labels:       map[string]string{v1.ReasonLabel: "drain", v1.DrainHostLabel: s.host.Name},
			},
			Spec: v1.VMMigrationSpec{Domain: d.Name, Priority: v1.PriorityEvacuation},
		}
		if err := r.Client.Create(ctx, m); err != nil {
			return fmt.Errorf("create evacuation of %s/%s: %w", d.Namespace, d.Name, err)
		}
		log.Info("Evacuating domain", "host", s.host.Name, "XenDomain", klog.KObj(d), "VMMigration", klog.KObj(m))
		r.Recorder.Eventf(s.host, m, corev1.EventTypeNormal, "Evacuating", "Drain",
			"Evacuating %s/%s from %s (%s): VMMigration %s", d.Namespace, d.Name, s.host.Name, s.reason, m.Name)
		if s.host.Status.Drain != nil {
			s.host.Status.Drain.Migrating++
		}
	}
	return nil
}

// guard keeps the guard Pod and its PodDisruptionBudget on the host's Node
// while domains that must move run there, and removes them once none do,
// which lets a waiting kubectl drain finish.
func (r *DrainReconciler) guard(ctx context.Context, s *drainScope) error {
	name := GuardPrefix + s.host.Name
	key := types.NamespacedName{Namespace: r.Namespace, Name: name}
	if s.node == nil || (s.requested && s.evacuated) || (!s.requested && s.mustMove == 0) {
		pdb := &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}}
		if err := r.Client.Delete(ctx, pdb); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete guard PodDisruptionBudget %s: %w", key, err)
		}
		pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}}
		if err := r.Client.Delete(ctx, pod, ctrl.GracePeriodSeconds(0)); err != nil && !apierrors.IsNotFound(err) {
			return fmt.Errorf("delete guard Pod %s: %w", key, err)
		}
		return nil
	}
	labels := map[string]string{"app.kubernetes.io/name": "xenferry-drain-guard", GuardHostLabel: s.host.Name}
	pdb := &policyv1.PodDisruptionBudget{ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name}}
	if err := r.Client.Get(ctx, key, pdb); apierrors.IsNotFound(err) {
		one := intstr.FromInt32(1)
		pdb.Labels = labels
		pdb.Spec = policyv1.PodDisruptionBudgetSpec{MinAvailable: &one, Selector: &metav1.LabelSelector{MatchLabels: labels}}
		if err := controllerutil.SetControllerReference(s.host, pdb, r.Client.Scheme()); err != nil {
			return fmt.Errorf("own guard PodDisruptionBudget: %w", err)
		}
		if err := r.Client.Create(ctx, pdb); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create guard PodDisruptionBudget %s: %w", key, err)
		}
	} else if err != nil {
		return fmt.Errorf("get guard PodDisruptionBudget %s: %w", key, err)
	}
	pod := &corev1.Pod{}
	if err := r.Client.Get(ctx, key, pod); apierrors.IsNotFound(err) {
		zero := int64(0)
		no, yes := false, true
		pod = &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name, Labels: labels,
				Annotations: map[string]string{"migration.xenferry.io/purpose": "holds `kubectl drain` of this node until xenferry has live-migrated its Xen domains away"}},
			Spec: corev1.PodSpec{
				NodeName:                      s.host.Name,
				Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
				TerminationGracePeriodSeconds: &zero,
				AutomountServiceAccountToken:  &no,
				SecurityContext: &corev1.PodSecurityContext{RunAsNonRoot: &yes,
					SeccompProfile: &corev1.SeccompProfile{Type: corev1.SeccompProfileTypeRuntimeDefault}},
				Containers: []corev1.Container{{
					Name: "guard", Image: r.GuardImage, Command: r.GuardCommand,
					Resources: corev1.ResourceRequirements{Requests: corev1.ResourceList{
						corev1.ResourceCPU: resource.MustParse("1m"), corev1.ResourceMemory: resource.MustParse("8Mi")}},
					SecurityContext: &corev1.SecurityContext{AllowPrivilegeEscalation: &no, ReadOnlyRootFilesystem: &yes,
						Capabilities: &corev1.Capabilities{Drop: []corev1.Capability{"ALL"}}},
				}},
			},
		}
		if err := controllerutil.SetControllerReference(s.host, pod, r.Client.Scheme()); err != nil {
			return fmt.Errorf("own guard Pod: %w", err)
		}
		if err := r.Client.Create(ctx, pod); err != nil && !apierrors.IsAlreadyExists(err) {
			return fmt.Errorf("create guard Pod %s: %w", key, err)
		}
	} else if err != nil {
		return fmt.Errorf("get guard Pod %s: %w", key, err)
	}
	return nil
}

// preDrainHook holds a Cluster API Machine's drain while domains that must
// move run on its Node, and releases it once they moved. Without events
// from Machines (their kind may not exist), a host with a Machine is read
// again periodically.
func (r *DrainReconciler) preDrainHook(ctx context.Context, s *drainScope) error {
	if s.machine == nil {
		return nil
	}
	s.requeueAfter(drainResync * 3)
	return setPreDrainHook(ctx, r.Client, s.machine, s.mustMove > 0)
}

// setDrainConditions derives Draining and Evacuated from the scope alone.
func setDrainConditions(s *drainScope) {
	h := s.host
	if !s.requested {
		if h.Status.Drain != nil || meta.IsStatusConditionTrue(h.Status.Conditions, v1.HostDrainingCondition) {
			msg := "Not draining"
			if len(s.cancel) > 0 {
				msg = fmt.Sprintf("Drain undone; %d evacuation migrations cancelled", len(s.cancel))
			}
			meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostDrainingCondition, Status: metav1.ConditionFalse,
				Reason: "NotRequested", Message: msg, ObservedGeneration: h.Generation})
		}
		meta.RemoveStatusCondition(&h.Status.Conditions, v1.HostEvacuatedCondition)
		h.Status.Drain = nil
		return
	}
	d := h.Status.Drain
	why := map[string]string{
		v1.DrainReasonRequested:      "spec.drain is set",
		v1.DrainReasonNodeCordoned:   "its Node is cordoned",
		v1.DrainReasonMachineDeleted: "its Cluster API Machine is being deleted",
	}[s.reason]
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostDrainingCondition, Status: metav1.ConditionTrue,
		Reason: s.reason, Message: fmt.Sprintf("Evacuating: %s; %d domains to move, %d migrating, %d moved, %d failed",
			why, d.Domains, d.Migrating, d.Migrated, d.Failed), ObservedGeneration: h.Generation})
	if s.evacuated {
		msg := "No domain that must move is left on the host"
		if n := len(d.LeftBehind); n > 0 {
			msg += fmt.Sprintf("; %d left to be shut down with it by their evacuationStrategy", n)
		}
		meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionTrue,
			Reason: "Evacuated", Message: msg, ObservedGeneration: h.Generation})
		return
	}
	var names []string
	for _, b := range d.Blocked {
		names = append(names, b.Namespace+"/"+b.Name+": "+b.Reason)
	}
	msg := fmt.Sprintf("%d domains still run on the host", d.Domains)
	reason := "InProgress"
	if len(names) > 0 {
		reason = "Blocked"
		msg += "; blocked: " + clip(strings.Join(names, "; "), 2000)
	}
	meta.SetStatusCondition(&h.Status.Conditions, metav1.Condition{Type: v1.HostEvacuatedCondition, Status: metav1.ConditionFalse,
		Reason: reason, Message: msg, ObservedGeneration: h.Generation})
}

// nodeCordonChange passes Node events that change spec.unschedulable or
// the Node's Cluster API Machine (and creations and deletions); kubelet
// status updates are frequent and irrelevant.
var nodeCordonChange = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*corev1.Node)
		n, ok2 := e.ObjectNew.(*corev1.Node)
		return ok1 && ok2 && (o.Spec.Unschedulable != n.Spec.Unschedulable ||
			o.Annotations[capiMachineAnnotation] != n.Annotations[capiMachineAnnotation] ||
			o.Annotations[capiNamespaceAnnotation] != n.Annotations[capiNamespaceAnnotation])
	},
}

// domainPlacementChange passes XenDomain events that change where or
// whether it runs, or its labels and annotations (evacuation strategy).
var domainPlacementChange = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*v1.XenDomain)
		n, ok2 := e.ObjectNew.(*v1.XenDomain)
		return ok1 && ok2 && (o.Status.Host != n.Status.Host || o.Status.State != n.Status.State ||
			!equality.Semantic.DeepEqual(o.Labels, n.Labels) || !equality.Semantic.DeepEqual(o.Annotations, n.Annotations))
	},
}

// migrationStepChange passes VMMigration events that change its phase or
// its scheduling condition, not every progress report.
var migrationStepChange = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*v1.VMMigration)
		n, ok2 := e.ObjectNew.(*v1.VMMigration)
		if !ok1 || !ok2 {
			return false
		}
		oc, nc := findCondition(o, v1.ScheduledCondition), findCondition(n, v1.ScheduledCondition)
		return o.Status.Phase != n.Status.Phase || (oc == nil) != (nc == nil) || oc != nil && nc != nil && oc.Reason != nc.Reason
	},
}

// SetupWithManager registers the drain controller: it watches XenHosts
// (spec), their Nodes (cordon), the domains on them, the evacuation
// migrations, and the guard objects it owns.
func (r *DrainReconciler) SetupWithManager(mgr ctrlbuilder.Manager) error {
	if r.Client == nil {
		r.Client = mgr.GetClient()
	}
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	if r.Recorder == nil {
		r.Recorder = mgr.GetEventRecorder("xenferry-drain")
	}
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	byName := func(_ context.Context, o ctrl.Object) []reconcile.Request {
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: o.GetName()}}}
	}
	domainHost := func(_ context.Context, o ctrl.Object) []reconcile.Request {
		d, ok := o.(*v1.XenDomain)
		if !ok || d.Status.Host == "" {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Name: d.Status.Host}}}
	}
	migHosts := func(_ context.Context, o ctrl.Object) []reconcile.Request {
		m, ok := o.(*v1.VMMigration)
		if !ok {
			return nil
		}
		var out []reconcile.Request
		for _, h := range []string{m.Labels[v1.DrainHostLabel], m.Status.SourceHost} {
			if h != "" {
				out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Name: h}})
			}
		}
		return out
	}
	// Heartbeats rewrite XenHost status every few seconds: only a change
	// of spec or of the conditions matters here.
	hostChange := predicate.Or(predicate.GenerationChangedPredicate{}, predicate.Funcs{
		UpdateFunc: func(e event.UpdateEvent) bool {
			o, ok1 := e.ObjectOld.(*v1.XenHost)
			n, ok2 := e.ObjectNew.(*v1.XenHost)
			return ok1 && ok2 && !equality.Semantic.DeepEqual(o.Status.Conditions, n.Status.Conditions)
		},
	})
	return ctrlbuilder.NewControllerManagedBy(mgr).
		Named("drain").
		For(&v1.XenHost{}, builder.WithPredicates(hostChange)).
		Watches(&corev1.Node{}, handler.EnqueueRequestsFromMapFunc(byName), builder.WithPredicates(nodeCordonChange)).
		Watches(&v1.XenDomain{}, handler.EnqueueRequestsFromMapFunc(domainHost), builder.WithPredicates(domainPlacementChange)).
		Watches(&v1.VMMigration{}, handler.EnqueueRequestsFromMapFunc(migHosts), builder.WithPredicates(migrationStepChange)).
		Owns(&corev1.Pod{}).
		Owns(&policyv1.PodDisruptionBudget{}).
		// One worker: evacuations are decided on fresh lists, one host at a time.
		WithOptions(controller.Options{MaxConcurrentReconciles: 1}).
		Complete(r)
}
