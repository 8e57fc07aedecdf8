package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/event"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// agentVersion is reported in XenHost.status.agentVersion.
var agentVersion = "v0.1.0-dev"

func init() {
	registerCommand(command{
		name:  "run",
		short: "run under Kubernetes: publish the host, serve and run its VMMigrations",
		run:   runK8sAgent,
	})
}

// AgentConfig configures the agent under Kubernetes.
type AgentConfig struct {
	// Host is the XenHost name; it must match the backend's host name.
	Host string
	// DataAddr is the listen address of the migration data path; the
	// address published must be reachable by the other agents.
	DataAddr string
	// AdvertiseAddr, if set, is published instead of the listener's address.
	AdvertiseAddr string
	// Namespace receives XenDomains whose configuration names none.
	Namespace string
	// HeartbeatInterval between XenHost refreshes (and XenDomain publishes).
	HeartbeatInterval time.Duration
	// StatusInterval is the minimum time between two progress writes of one
	// migration half (phase changes are written at once).
	StatusInterval time.Duration
	// StateDir holds the dedup indexes of disks, the in-flight state of
	// migrations (migrations/UID.json) and the agent's key.
	StateDir string
	// DurableDir is the directory on shared storage for durable post-copy
	// mirrors, the same path on every host (see defaultDurableDir); "" off.
	DurableDir string
	// RecoveryTimeout bounds how long a post-copy whose link broke waits
	// for the other side (both roles); 0: the engine's default.
	RecoveryTimeout time.Duration
	// DiskPath maps a disk of a XenDomain to this host's path of it, for
	// the grant of an incoming migration; nil: shared storage is mounted
	// at the same path on every host.
	DiskPath func(v1.DomainDisk) (string, error)
	// XL is the xl command of a host whose data path is the stock
	// toolstack (default "xl").
	XL string
	// NodeAgent is this program, run by xl as its transport (default: the
	// running executable).
	NodeAgent string
	// LinkRate is the link throughput (bytes/s) a predicted migration cost
	// assumes until an outbound migration of this agent measured one.
	LinkRate int64
	// ScanInterval is the least time between two scans of a domain's
	// memory for its predicted migration cost.
	ScanInterval time.Duration
	// ScanBytesPerSec bounds how fast such a scan reads memory.
	ScanBytesPerSec int64
	Log             logr.Logger
}

func runK8sAgent(ctx context.Context, args []string) error {
	fs := flag.NewFlagSet("run", flag.ContinueOnError)
	var (
		kubeconfig = fs.String("kubeconfig", os.Getenv("KUBECONFIG"), "kubeconfig file (empty: in-cluster config)")
		backend    = fs.String("backend", "sim", "hypervisor backend: sim or xen (xen when built in)")
		simConfig  = fs.String("sim-config", "", "sim backend: host configuration file (YAML)")
		cfg        AgentConfig
	)
	fs.StringVar(&cfg.Host, "host", "", "XenHost name of this agent (default: the backend's host name)")
	fs.StringVar(&cfg.DataAddr, "data-addr", "127.0.0.1:0", "listen address of the migration data path")
	fs.StringVar(&cfg.AdvertiseAddr, "advertise-addr", "", "data address published to peers (default: the listener's)")
	fs.StringVar(&cfg.Namespace, "namespace", "default", "namespace of XenDomains whose configuration names none")
	fs.StringVar(&cfg.XL, "xl", "xl", "xen backend: the xl command (migrations run `xl migrate` with this program as its transport)")
	fs.DurationVar(&cfg.HeartbeatInterval, "heartbeat-interval", 5*time.Second, "XenHost heartbeat interval")
	fs.DurationVar(&cfg.StatusInterval, "status-interval", time.Second, "minimum interval between progress writes per migration")
	fs.Int64Var(&cfg.LinkRate, "link-rate", defaultLinkRate, "link throughput in bytes/s that predicted migration costs assume until an outbound migration measured one")
	fs.DurationVar(&cfg.ScanInterval, "scan-interval", defaultScanInterval, "least time between two scans of a domain's memory for its predicted migration cost")
	fs.Int64Var(&cfg.ScanBytesPerSec, "scan-rate", defaultScanRate, "bytes/s a memory scan for the predicted migration cost reads at most")
	fs.StringVar(&cfg.StateDir, "state-dir", "", "directory for dedup indexes and in-flight migration state (default: $TMPDIR/xenferry-agent-HOST)")
	durableDir := fs.String("durable-dir", "auto", "shared directory (same path on every host) for durable post-copy mirrors; "+
		"\"auto\": on the backend's shared storage when it knows one (sim: STATEDIR/xenferry-durable; xen: none), \"\": off")
	bindMetricsFlags(fs)
	zopts := zap.Options{Development: true}
	zopts.BindFlags(fs)
	if err := fs.Parse(args); err != nil {
		return err
	}
	log := zap.New(zap.UseFlagOptions(&zopts))
	ctrl.SetLogger(log)
	cfg.Log = log.WithName("agent")

	restCfg, err := loadRestConfig(*kubeconfig)
	if err != nil {
		return err
	}
	// The state dir must be known before the backend opens: a sim host
	// adopts the guests registered there.
	if cfg.StateDir == "" && *backend == "sim" {
		name := cfg.Host
		if name == "" {
			name = simHostName(*simConfig)
		}
		if name != "" {
			cfg.StateDir = defaultStateDir(name)
		}
	}
	host, err := openBackend(*backend, *simConfig, cfg.StateDir, log)
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
		cfg.StateDir = defaultStateDir(cfg.Host)
	}
	cfg.DurableDir = *durableDir
	if cfg.DurableDir == "auto" {
		cfg.DurableDir = defaultDurableDir(host)
	}
	cfg.Log.Info("Backend ready", "backend", *backend, "host", cfg.Host)
	a, err := NewAgent(restCfg, host, cfg)
	if err != nil {
		return err
	}
	return a.Run(ctx)
}

// defaultStateDir is the agent's state dir when --state-dir is not given.
func defaultStateDir(host string) string {
	return filepath.Join(os.TempDir(), "xenferry-agent-"+host)
}

func loadRestConfig(kubeconfig string) (*rest.Config, error) {
	if kubeconfig == "" {
		c, err := rest.InClusterConfig()
		if err != nil {
			return nil, fmt.Errorf("no --kubeconfig and not in a cluster: %w", err)
		}
		return c, nil
	}
	c, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig %s: %w", kubeconfig, err)
	}
	return c, nil
}

// Agent is the node agent under Kubernetes: it publishes its XenHost and
// XenDomains, serves incoming migrations and runs outgoing ones.
type Agent struct {
	cfg  AgentConfig
	host xenmem.Host
	log  logr.Logger
	// id names this process; a restarted agent has a new one.
	id  string
	mgr ctrl.Manager
	c   client.Client
	api client.Reader
	ln  net.Listener
	rcv *engine.Receiver
	// transport is the backend's data path (xenmem.TransportEngine or
	// TransportXL): which receiver serves the data port and how the
	// source half runs.
	transport string
	// tls is the agent's key and, once the controller issued it, its
	// certificate and CA bundle; read at every handshake.
	tls *pki.Identity
	// installedBundle is the CA bundle last installed (certLoop only).
	installedBundle string

	// runCtx lives as long as Run; outgoing transfers derive from it.
	runCtx context.Context
	// kick asks the publisher to refresh XenHost and XenDomains now.
	kick chan struct{}
	// wake asks the migration reconciler to look at a migration now.
	wake chan event.GenericEvent

	// mu protects runs, departed and indexes.
	mu sync.Mutex
	// runs holds this agent's halves of migrations, by migration UID;
	// bounded by the controller's concurrency limits plus recent ones.
	runs map[string]*run
	// departed holds when an outgoing migration that moved a domain away
	// ended, by domain name, for departedGrace (see migratingOut); bounded
	// by the migrations of that long.
	departed map[string]time.Time
	// indexes is the agent's dedup-index cache, persisted under
	// STATEDIR/index (where xl-send loads it).
	indexes *diskIndexes
	// transfers counts running outgoing transfers; Run waits for them
	// before it drops the handles of held committed domains.
	transfers sync.WaitGroup
	// tokens records the single use of incoming migrations' tokens.
	tokens tokenUses
	// indexer builds the dedup indexes of this host's domains' disks
	// ahead of migrations.
	indexer *diskIndexer
	// usage averages the domains' CPU and page writes (status.load,
	// status.cpuMillis); costs holds their memory scans (predictedCost).
	usage *usageMeter
	costs *costPredictor
	// linkRate is the throughput (bytes/s) of the last outbound migration
	// that measured the link; 0: none yet.
	linkRate atomic.Int64
}

// NewAgent creates the agent's manager, listener and receiver.
func NewAgent(restCfg *rest.Config, host xenmem.Host, cfg AgentConfig) (*Agent, error) {
	if cfg.Host == "" {
		return nil, errors.New("agent: host name is empty")
	}
	if cfg.HeartbeatInterval <= 0 {
		cfg.HeartbeatInterval = 5 * time.Second
	}
	if cfg.StatusInterval <= 0 {
		cfg.StatusInterval = time.Second
	}
	if cfg.Namespace == "" {
		cfg.Namespace = "default"
	}
	if cfg.XL == "" {
		cfg.XL = "xl"
	}
	if cfg.LinkRate <= 0 {
		cfg.LinkRate = defaultLinkRate
	}
	if cfg.ScanInterval <= 0 {
		cfg.ScanInterval = defaultScanInterval
	}
	if cfg.ScanBytesPerSec <= 0 {
		cfg.ScanBytesPerSec = defaultScanRate
	}
	idb := make([]byte, 6)
	if _, err := rand.Read(idb); err != nil {
		return nil, fmt.Errorf("agent id: %w", err)
	}
	a := &Agent{
		cfg: cfg, host: host, log: cfg.Log.WithValues("host", cfg.Host),
		id:   cfg.Host + "-" + hex.EncodeToString(idb),
		kick: make(chan struct{}, 1), wake: make(chan event.GenericEvent, 64),
		runs: map[string]*run{}, departed: map[string]time.Time{}, indexer: newDiskIndexer(), indexes: newDiskIndexes(cfg.StateDir, cfg.Log.WithName("dedup")),
		usage: newUsageMeter(), costs: newCostPredictor(),
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("agent scheme: %w", err)
	}
	if err := v1.AddToScheme(scheme); err != nil {
		return nil, fmt.Errorf("agent scheme: %w", err)
	}
	mgr, err := ctrl.NewManager(restCfg, ctrl.Options{
		Scheme:                 scheme,
		Metrics:                metricsServerOptions(),
		HealthProbeBindAddress: "0",
		Logger:                 a.log,
	})
	if err != nil {
		return nil, fmt.Errorf("agent %s: create manager: %w", cfg.Host, err)
	}
	a.mgr, a.c, a.api = mgr, mgr.GetClient(), mgr.GetAPIReader()
	key, err := loadOrCreateKey(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("agent %s: %w", cfg.Host, err)
	}
	a.tls = pki.NewIdentity(key)
	ictx, icancel := context.WithTimeout(context.Background(), 30*time.Second)
	info, err := host.Info(ictx)
	icancel()
	if err != nil {
		return nil, fmt.Errorf("agent %s: host info: %w", cfg.Host, err)
	}
	a.transport = info.Capabilities.Transport
	ln, err := net.Listen("tcp", cfg.DataAddr)
	if err != nil {
		return nil, fmt.Errorf("agent %s: listen on %s: %w", cfg.Host, cfg.DataAddr, err)
	}
	a.ln = ln
	a.rcv = &engine.Receiver{Host: host, Authorize: a.authorize, Events: a.onReceiverEvent, Log: a.log.WithName("receiver"),
		Verified: a.recordVerified, DurableDir: cfg.DurableDir, RecoveryTimeout: cfg.RecoveryTimeout}
	if err := a.setupReconciler(mgr); err != nil {
		ln.Close()
		return nil, err
	}
	return a, nil
}

func (a *Agent) baseCtx() context.Context {
	a.mu.Lock()
	defer a.mu.Unlock()
	if a.runCtx == nil {
		return context.Background()
	}
	return a.runCtx
}

// ID is this agent process's identity (tests use it).
func (a *Agent) ID() string { return a.id }

// DataAddress is the address peers connect to.
func (a *Agent) DataAddress() string {
	if a.cfg.AdvertiseAddr != "" {
		return a.cfg.AdvertiseAddr
	}
	return a.ln.Addr().String()
}

// Run serves until ctx ends. Outgoing migrations before the point of no
// return are aborted on the way out (the domain keeps running here).
func (a *Agent) Run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	a.mu.Lock()
	a.runCtx = ctx
	a.mu.Unlock()
	var wg sync.WaitGroup
	errc := make(chan error, 6)
	wg.Add(6)
	go func() { defer wg.Done(); a.indexLoop(ctx); errc <- nil }()
	go func() { defer wg.Done(); a.predictLoop(ctx); errc <- nil }()
	// Only mTLS peers with a certificate of the cluster's CA get past the
	// handshake; the receiver bounds it with its handshake deadline.
	go func() {
		defer wg.Done()
		if a.usesXL() {
			errc <- a.serveXL(ctx)
			return
		}
		errc <- a.rcv.Serve(ctx, pki.Listener(a.ln, a.tls))
	}()
	go func() { defer wg.Done(); errc <- a.mgr.Start(ctx) }()
	go func() { defer wg.Done(); a.publishLoop(ctx); errc <- nil }()
	go func() { defer wg.Done(); a.certLoop(ctx); errc <- nil }()
	a.log.Info("Agent started", "agentID", a.id, "dataAddress", a.DataAddress())
	var err error
	select {
	case <-ctx.Done():
	case err = <-errc:
		if err != nil {
			err = fmt.Errorf("agent %s: %w", a.cfg.Host, err)
		}
	}
	cancel()
	a.stopRuns()
	wg.Wait()
	a.transfers.Wait()
	a.closeHeld()
	a.indexes.close()
	return err
}

// onReceiverEvent records what the receiver reports and wakes the
// reconciler to write it; it never blocks the data path.
func (a *Agent) onReceiverEvent(migrationID string, ev engine.Event) {
	telemetry.targetEvent(ev)
	a.mu.Lock()
	r := a.runs[migrationID]
	a.mu.Unlock()
	if r == nil {
		a.log.Info("Receiver event for an unknown migration", "migration", migrationID, "kind", ev.Kind)
		return
	}
	r.mu.Lock()
	now := time.Now()
	switch ev.Kind {
	case engine.EventPrepared:
		r.prepared = true
	case engine.EventResumed:
		r.resumed, r.resumeTime = true, now
	case engine.EventDone:
		r.done = true
	case engine.EventFailed:
		r.failed = true
		if ev.Err != nil {
			r.message = ev.Err.Error()
		} else {
			r.message = "the receiver aborted the migration"
		}
	case engine.EventDiscarded:
		// The domain resumed here failed verification and was destroyed
		// here; the source was told it may resume its copy.
		r.discarded, r.failed = true, true
		r.message = "discarded: the domain failed verification here and was destroyed; the source may resume it"
		if ev.Err != nil {
			r.message = "discarded: " + ev.Err.Error()
		}
	}
	r.changed = true
	r.mu.Unlock()
	a.log.Info("Incoming migration event", "migration", r.key, "kind", ev.Kind)
	if ev.Kind == engine.EventResumed || ev.Kind == engine.EventDone {
		a.kickPublish()
	}
	a.wakeUp(r)
}

func (a *Agent) kickPublish() {
	select {
	case a.kick <- struct{}{}:
	default:
	}
}

func (a *Agent) wakeUp(r *run) {
	select {
	case a.wake <- event.GenericEvent{Object: &v1.VMMigration{ObjectMeta: metav1.ObjectMeta{Namespace: r.key.Namespace, Name: r.key.Name}}}:
	default:
		// The reconciler is behind; the periodic status requeue catches up.
	}
}

// stopRuns cancels outgoing migrations that have not reached the point of no
// return; the engine then resumes the domain here.
func (a *Agent) stopRuns() {
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, r := range a.runs {
		if r.cancel != nil {
			r.cancel()
		}
	}
}

// domainObjectName maps a Xen domain name onto a DNS label.
func domainObjectName(name string) string {
	var b strings.Builder
	for _, c := range strings.ToLower(name) {
		switch {
		case c >= 'a' && c <= 'z', c >= '0' && c <= '9', c == '-':
			b.WriteRune(c)
		default:
			b.WriteByte('-')
		}
	}
	s := strings.Trim(b.String(), "-")
	if len(s) > 63 {
		s = strings.TrimRight(s[:63], "-")
	}
	if s == "" {
		s = "domain"
	}
	return s
}
