// Command xenferry-controller is xenferry's controller manager: it runs the
// VMMigration controller against a Kubernetes API server.
package main

import (
	"flag"
	"fmt"
	"os"
	"time"

	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/controllers"
)

// caNamespace and caSecret locate the agents' CA Secret.
var caNamespace, caSecret string

func envOr(name, def string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return def
}

func main() {
	var (
		metricsAddr, probeAddr string
		leaderElect            bool
		metricsSecure          bool
		metricsCertDir         string
		lim                    = controllers.DefaultLimits
		heartbeat, abortGrace  time.Duration
		guardImage             string
		maxEvacuations         int
		pause                  bool
	)
	flag.StringVar(&metricsAddr, "metrics-bind-address", ":8443", "address of the Prometheus /metrics endpoint (0 disables)")
	flag.StringVar(&metricsCertDir, "metrics-cert-dir", "", "directory with tls.crt and tls.key for the metrics endpoint (empty: a self-signed certificate generated at start)")
	flag.BoolVar(&metricsSecure, "metrics-secure", true, "serve /metrics over HTTPS to callers that authenticate with a bearer token and may GET /metrics (TokenReview, SubjectAccessReview); false serves plain HTTP to anyone, for a local control plane only")
	flag.StringVar(&probeAddr, "health-probe-bind-address", ":8081", "address of /healthz and /readyz (0 disables)")
	flag.BoolVar(&leaderElect, "leader-elect", false, "elect a leader so that only one replica acts")
	flag.IntVar(&lim.Cluster, "max-migrations", lim.Cluster, "migrations running at once in the cluster")
	flag.IntVar(&lim.OutboundPerHost, "max-outbound-per-host", lim.OutboundPerHost, "migrations leaving one host at once")
	flag.IntVar(&lim.InboundPerHost, "max-inbound-per-host", lim.InboundPerHost, "migrations arriving at one host at once")
	flag.DurationVar(&heartbeat, "heartbeat-timeout", 30*time.Second, "an agent whose XenHost heartbeat is older is considered gone")
	flag.DurationVar(&abortGrace, "abort-grace", 60*time.Second, "how long to wait for agents to confirm an abort or a deletion")
	flag.StringVar(&caNamespace, "ca-namespace", envOr("POD_NAMESPACE", "xenferry-system"), "namespace of the Secret holding the agents' CA (created if absent; may be a cert-manager CA)")
	flag.StringVar(&caSecret, "ca-secret", controllers.DefaultCASecretName, "name of the CA Secret (the RBAC role grants this default name only)")
	flag.StringVar(&guardImage, "guard-image", envOr("GUARD_IMAGE", "xenferry/controller:latest"), "image of the drain guard Pods (this controller's image: they run it with --pause)")
	flag.IntVar(&maxEvacuations, "max-evacuations-per-host", 0, "evacuation migrations of one draining host that exist at once, shortest predicted first (0: one per domain at once, each waiting for a slot)")
	flag.BoolVar(&pause, "pause", false, "do nothing until terminated (the drain guard Pod's process)")
	opts := zap.Options{Development: true}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	if pause {
		<-ctrl.SetupSignalHandler().Done()
		return
	}
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	if !metricsSecure {
		log.Info("Serving metrics over plain HTTP without authentication: for a local control plane only", "address", metricsAddr)
	}
	if err := run(controllers.MetricsOptions(metricsAddr, metricsCertDir, metricsSecure), probeAddr, leaderElect, lim, heartbeat, abortGrace, guardImage, maxEvacuations); err != nil {
		log.Error(err, "Controller manager stopped")
		os.Exit(1)
	}
}

func run(metricsOpts metricsserver.Options, probeAddr string, leaderElect bool, lim controllers.Limits, heartbeat, abortGrace time.Duration, guardImage string, maxEvacuations int) error {
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return fmt.Errorf("build scheme: %w", err)
	}
	if err := v1.AddToScheme(scheme); err != nil {
		return fmt.Errorf("build scheme: %w", err)
	}
	cfg, err := ctrl.GetConfig()
	if err != nil {
		return fmt.Errorf("load kubeconfig (set --kubeconfig or KUBECONFIG): %w", err)
	}
	mgr, err := ctrl.NewManager(cfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsOpts,
		HealthProbeBindAddress: probeAddr,
		LeaderElection:         leaderElect,
		LeaderElectionID:       controllers.LeaderElectionID,
		// The drain guards live in the operator's namespace: cache them
		// there only (and need no cluster-wide access to Pods).
		Cache: cache.Options{ByObject: map[client.Object]cache.ByObject{
			&corev1.Pod{}:                   {Namespaces: map[string]cache.Config{caNamespace: {}}},
			&policyv1.PodDisruptionBudget{}: {Namespaces: map[string]cache.Config{caNamespace: {}}},
		}},
	})
	if err != nil {
		return fmt.Errorf("create manager: %w", err)
	}
	metrics := controllers.NewMetrics(mgr.GetClient())
	if err := metrics.Register(ctrlmetrics.Registry); err != nil {
		return fmt.Errorf("register metrics: %w", err)
	}
	r := &controllers.VMMigrationReconciler{Limits: lim, HeartbeatTimeout: heartbeat, AbortGrace: abortGrace, Metrics: metrics}
	r.PKI = &controllers.PKIReconciler{Namespace: caNamespace, SecretName: caSecret}
	if err := r.PKI.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("set up the agents' certificate authority: %w", err)
	}
	if err := r.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("set up VMMigration controller: %w", err)
	}
	drain := &controllers.DrainReconciler{Namespace: caNamespace, GuardImage: guardImage, GuardCommand: []string{"/xenferry-controller", "--pause"},
		MaxInFlight: maxEvacuations}
	if err := drain.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("set up drain controller: %w", err)
	}
	rebalance := &controllers.RebalanceReconciler{HeartbeatTimeout: heartbeat}
	if err := rebalance.SetupWithManager(mgr); err != nil {
		return fmt.Errorf("set up rebalance controller: %w", err)
	}
	if err := mgr.AddHealthzCheck("healthz", healthz.Ping); err != nil {
		return fmt.Errorf("add health check: %w", err)
	}
	if err := mgr.AddReadyzCheck("readyz", healthz.Ping); err != nil {
		return fmt.Errorf("add ready check: %w", err)
	}
	ctrl.Log.WithName("setup").Info("Starting controller manager", "limits", fmt.Sprintf("%+v", lim), "heartbeatTimeout", heartbeat)
	return mgr.Start(ctrl.SetupSignalHandler())
}
