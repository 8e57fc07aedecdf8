package controllers

import (
	"context"
	"time"

	"k8s.io/apimachinery/pkg/api/equality"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	ctrllog "sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"k8s.io/utils/clock"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
)

// SetupWithManager registers the reconciler with mgr; zero fields get defaults.
func (r *VMMigrationReconciler) SetupWithManager(mgr ctrlbuilder.Manager) error {
	if r.Client == nil {
		r.Client = mgr.GetClient()
	}
	if r.APIReader == nil {
		r.APIReader = mgr.GetAPIReader()
	}
	if r.Recorder == nil {
		r.Recorder = mgr.GetEventRecorder("xenferry-controller")
	}
	if r.Clock == nil {
		r.Clock = clock.RealClock{}
	}
	if r.Limits == (Limits{}) {
		r.Limits = DefaultLimits
	}
	if r.Defaults == (Defaults{}) {
		r.Defaults = DefaultDefaults
	}
	if r.HeartbeatTimeout == 0 {
		r.HeartbeatTimeout = 30 * time.Second
	}
	if r.AbortGrace == 0 {
		r.AbortGrace = 60 * time.Second
	}
	return ctrlbuilder.NewControllerManagedBy(mgr).
		For(&v1.VMMigration{}).
		// Queued migrations wait for hosts and slots: a host that changes
		// what it offers, and a migration that ends and frees its slot,
		// wake them instead of a poll.
		Watches(&v1.XenHost{}, handler.EnqueueRequestsFromMapFunc(r.waitingOn), builder.WithPredicates(hostOfferChange)).
		Watches(&v1.VMMigration{}, handler.EnqueueRequestsFromMapFunc(r.queuedBehind), builder.WithPredicates(slotFreed)).
		Named("vmmigration").
		// One worker: slot decisions are made one migration at a time.
		WithOptions(controller.Options{MaxConcurrentReconciles: 1}).
		Complete(r)
}

// hostOfferChange passes XenHost events that change what a queued
// migration waits for (spec, conditions, free memory, capabilities,
// certificate), not heartbeats.
var hostOfferChange = predicate.Funcs{
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*v1.XenHost)
		n, ok2 := e.ObjectNew.(*v1.XenHost)
		if !ok1 || !ok2 {
			return false
		}
		return o.Generation != n.Generation || o.Status.FreeBytes != n.Status.FreeBytes || o.Status.AgentID != n.Status.AgentID ||
			!equality.Semantic.DeepEqual(o.Status.Conditions, n.Status.Conditions) ||
			!equality.Semantic.DeepEqual(o.Status.Capabilities, n.Status.Capabilities) ||
			!equality.Semantic.DeepEqual(o.Status.TLS, n.Status.TLS)
	},
}

// slotFreed passes VMMigration updates that end a migration (its slot is free).
var slotFreed = predicate.Funcs{
	CreateFunc: func(event.CreateEvent) bool { return false },
	UpdateFunc: func(e event.UpdateEvent) bool {
		o, ok1 := e.ObjectOld.(*v1.VMMigration)
		n, ok2 := e.ObjectNew.(*v1.VMMigration)
		return ok1 && ok2 && !o.Status.Phase.IsFinal() && n.Status.Phase.IsFinal()
	},
	DeleteFunc:  func(event.DeleteEvent) bool { return true },
	GenericFunc: func(event.GenericEvent) bool { return false },
}

// wake lists, in one read of the cache, the migrations waiting to be
// scheduled and, when host is not "", those holding a slot from or to it.
func (r *VMMigrationReconciler) wake(ctx context.Context, host string) []reconcile.Request {
	var l v1.VMMigrationList
	if err := r.Client.List(ctx, &l); err != nil {
		ctrllog.FromContext(ctx).Error(err, "List VMMigrations to wake the waiting ones")
		return nil
	}
	var out []reconcile.Request
	for i := range l.Items {
		m := &l.Items[i]
		queued := m.Status.Phase == v1.MigrationScheduling || m.Status.Phase == v1.MigrationPending
		onHost := host != "" && m.Status.Phase.HoldsSlot() && (m.Status.SourceHost == host || m.Status.TargetHost == host)
		if queued || onHost {
			out = append(out, reconcile.Request{NamespacedName: types.NamespacedName{Namespace: m.Namespace, Name: m.Name}})
		}
	}
	return out
}

// waitingOn maps a XenHost to the queued migrations (any may pick it as
// target) and to those running from or to it.
func (r *VMMigrationReconciler) waitingOn(ctx context.Context, o client.Object) []reconcile.Request {
	return r.wake(ctx, o.GetName())
}

// queuedBehind maps a migration that ended to those waiting for its slot.
func (r *VMMigrationReconciler) queuedBehind(ctx context.Context, _ client.Object) []reconcile.Request {
	return r.wake(ctx, "")
}

// MetricsOptions serves the manager's /metrics at addr. secure (the default
// of the controller's --metrics-secure) is controller-runtime's secure
// serving: TLS with the certificate in certDir (tls.crt, tls.key; empty: a
// self-signed one generated at start) and the authentication and
// authorization filter, which admits a caller only if the API server accepts
// its bearer token (TokenReview) and allows it GET /metrics
// (SubjectAccessReview; ClusterRole xenferry-metrics-reader). The manager's
// own identity needs create on tokenreviews and subjectaccessreviews (in the
// controller's ClusterRole). Without secure, plain HTTP for anyone: only for
// a local control plane.
func MetricsOptions(addr, certDir string, secure bool) metricsserver.Options {
	if !secure {
		return metricsserver.Options{BindAddress: addr}
	}
	return metricsserver.Options{
		BindAddress: addr, SecureServing: true, CertDir: certDir,
		FilterProvider: filters.WithAuthenticationAndAuthorization,
	}
}
