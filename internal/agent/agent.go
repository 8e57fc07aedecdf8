package agent

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
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

	v1 "github.com/xenferry/xenferry/api/v1alpha1"
	"github.com/xenferry/xenferry/pkg/engine"
	"github.com/xenferry/xenferry/pkg/pki"
	"github.com/xenferry/xenferry/pkg/xenmem"
)

// agentVersion is reported in XenHost.status.agentVersion.
var agentVersion = "v0.1.0-dev"

// Config configures the agent under Kubernetes.
type Config struct {
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
	// mirrors, the same path on every host (see DefaultDurableDir); "" off.
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

// DefaultStateDir is the agent's state dir when --state-dir is not given.
func DefaultStateDir(host string) string {
	return filepath.Join(os.TempDir(), "xenferry-agent-"+host)
}

// LoadRestConfig reads a kubeconfig file, or the in-cluster configuration
// when kubeconfig is "".
func LoadRestConfig(kubeconfig string) (*rest.Config, error) {
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
	cfg  Config
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
	// source and target run this host's halves of VMMigrations, each
	// writing only its own half of the status.
	source *SourceReconciler
	target *TargetReconciler
	// linkRate is the throughput (bytes/s) of the last outbound migration
	// that measured the link; 0: none yet.
	linkRate atomic.Int64
}

// New creates the agent's manager, listener and receiver.
func New(restCfg *rest.Config, host xenmem.Host, cfg Config) (*Agent, error) {
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
		cfg.LinkRate = DefaultLinkRate
	}
	if cfg.ScanInterval <= 0 {
		cfg.ScanInterval = DefaultScanInterval
	}
	if cfg.ScanBytesPerSec <= 0 {
		cfg.ScanBytesPerSec = DefaultScanRate
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
	a.source, a.target = &SourceReconciler{Agent: a}, &TargetReconciler{Agent: a}
	a.rcv = &engine.Receiver{Host: host, Authorize: a.target.authorize, Events: a.target.onReceiverEvent, Log: a.log.WithName("receiver"),
		Verified: a.target.recordVerified, DurableDir: cfg.DurableDir, RecoveryTimeout: cfg.RecoveryTimeout}
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
			errc <- a.target.serveXL(ctx)
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
	a.source.closeHeld()
	a.indexes.close()
	return err
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
