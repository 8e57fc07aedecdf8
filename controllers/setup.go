package controllers

import (
	"time"

	"k8s.io/utils/clock"
	ctrlbuilder "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/controller"

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
		Named("vmmigration").
		// One worker: slot decisions are made one migration at a time.
		WithOptions(controller.Options{MaxConcurrentReconciles: 1}).
		Complete(r)
}
