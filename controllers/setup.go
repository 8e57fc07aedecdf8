package controllers

import (
	"time"

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
		Named("vmmigration").
		// One worker: slot decisions are made one migration at a time.
		WithOptions(controller.Options{MaxConcurrentReconciles: 1}).
		Complete(r)
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
