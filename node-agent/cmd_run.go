package main

import (
	"context"
	"flag"
	"fmt"
	"os"
	"time"

	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	"github.com/xenferry/xenferry/internal/agent"
)

func init() {
	registerCommand(command{
		name:  "run",
		short: "run under Kubernetes: publish the host, serve and run its VMMigrations",
		run:   runAgent,
	})
}

// runAgent is `node-agent run`: the agent under Kubernetes, on this host's
// backend, until a signal.
func runAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	var (
		kubeconfig = fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file (empty: in-cluster config)")
		backend    = fs.String("backend", "sim", "hypervisor backend: sim or xen (xen when built in)")
		simConfig  = fs.String("sim-config", "", "sim backend: host configuration file (YAML)")
		cfg        agent.Config
	)
	fs.StringVar(&cfg.Host, "host", "", "XenHost name of this agent (default: the backend's host name)")
	fs.StringVar(&cfg.DataAddr, "data-addr", "127.0.0.1:0", "listen address of the migration data path")
	fs.StringVar(&cfg.AdvertiseAddr, "advertise-addr", "", "data address published to peers (default: the listener's)")
	fs.StringVar(&cfg.Namespace, "namespace", "default", "namespace of XenDomains whose configuration names none")
	fs.StringVar(&cfg.XL, "xl", "xl", "xen backend: the xl command (migrations run `xl migrate` with this program as its transport)")
	fs.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 5*time.Second, "XenHost heartbeat interval")
	fs.DurationVar(&cfg.StatusInterval, "status-interval", time.Second, "minimum interval between progress writes per migration")
	fs.Int64Var(&cfg.LinkRate, "link-rate", agent.DefaultLinkRate, "link throughput in bytes/s that predicted migration costs assume until an outbound migration measured one")
	fs.DurationVar(&cfg.ScanInterval, "scan-interval", agent.DefaultScanInterval, "least time between two scans of a domain's memory for its predicted migration cost")
	fs.Int64Var(&cfg.ScanBytesPerSec, "scan-rate", agent.DefaultScanRate, "bytes/s a memory scan for the predicted migration cost reads at most")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "directory for dedup indexes and in-flight migration state (default: $TMPDIR/xenferry-agent-HOST)")
	durableDir := fs.String("durable-dir", "auto", "shared directory (same path on every host) for durable post-copy mirrors and, on Xen, early resume's spool; "+
		"\"auto\": on the backend's shared storage when it knows one (sim: STATEDIR/xenferry-durable; xen: none), \"\": off")
	agent.BindMetricsFlags(fs)
	zopts := zap.Options{Development: true}
	zopts.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := zap.New(zap.UseFlagOptions(&zopts))
	ctrl.SetLogger(log)
	cfg.Log = log.WithName("agent")

	restCfg, err := agent.LoadRestConfig(*kubeconfig)
	if err != nil {
		return err
	}
	// The state dir must be known before the backend opens: a sim host
	// adopts the guests registered there.
	if cfg.StateDir == "" && *backend == "sim" {
		name := cfg.Host
		if name == "" {
			name = agent.SimHostName(*simConfig)
		}
		if name != "" {
			cfg.StateDir = agent.DefaultStateDir(name)
		}
	}
	host, err := agent.OpenBackend(*backend, *simConfig, cfg.StateDir, log)
	if err != nil {
		return fmt.Errorf("open %s backend: %w", *backend, err)
	}
	defer host.Close()
	if cfg.Host == "" {
		info, err := host.Info(ctx)
		if err != nil {
			return fmt.Errorf("host info from the %s backend: %w", *backend, err)
		}
		cfg.Host = info.Name
	}
	if cfg.StateDir == "" {
		cfg.StateDir = agent.DefaultStateDir(cfg.Host)
	}
	cfg.DurableDir = *durableDir
	if cfg.DurableDir == "auto" {
		cfg.DurableDir = agent.DefaultDurableDir(host)
	}
	cfg.Log.Info("Backend ready", "backend", *backend, "host", cfg.Host)
	a, err := agent.New(restCfg, host, cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}
