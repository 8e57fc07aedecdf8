package agent

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"

	"github.com/go-logr/logr"

	"github.com/xenferry/xenferry/pkg/dedup"
	"github.com/xenferry/xenferry/pkg/xenmem"
	"github.com/xenferry/xenferry/pkg/xenmem/sim"
)

// OpenBackend opens the hypervisor backend of this host. stateDir is the
// agent's state dir: a sim host keeps its domain registry there, its
// guests outlive this process and the next agent adopts them, as a Xen
// host's domUs outlive the toolstack (configured domains boot only on the
// first start). "" (one-shot commands) makes guests die with the process.
func OpenBackend(name, simConfig, stateDir string, log logr.Logger) (xenmem.Host, error) {
	switch name {
	case "sim":
		if simConfig == "" {
			return nil, fmt.Errorf("--backend sim needs --sim-config FILE (a YAML host definition; see config/samples/sim/sim-host-a.yaml)")
		}
		cfg, err := sim.LoadConfig(simConfig)
		if err != nil {
			return nil, err
		}
		return sim.OpenHost(cfg, sim.Options{StateDir: stateDir}, log.WithName("sim"))
	case "xen":
		return openXen(log)
	}
	return nil, fmt.Errorf("unknown backend %q (want sim or xen)", name)
}

// SimHostName is the host name a sim host definition gives ("" if it
// cannot be read; OpenBackend then reports why).
func SimHostName(simConfig string) string {
	cfg, err := sim.LoadConfig(simConfig)
	if err != nil {
		return ""
	}
	return cfg.Name
}

// openXen is replaced by the Xen backend when it is built in.
var openXen = func(logr.Logger) (xenmem.Host, error) {
	return nil, fmt.Errorf("the xen backend is not built into this node-agent: %w", xenmem.ErrBackendAbsent)
}

// diskIndexes is the one dedup-index cache of a node agent, whichever
// command runs (run, serve) and whichever data path: it keeps every disk's
// index open, built on first use and persisted under DIR/index, where
// node-agent xl-send --state-dir DIR loads it too.
type diskIndexes struct {
	dir string
	log logr.Logger
	mu  sync.Mutex
	ix  map[string]*dedup.Index // by disk path; one per disk of this host
}

// newDiskIndexes persists under dir/index; dir "" persists nothing.
func newDiskIndexes(dir string, log logr.Logger) *diskIndexes {
	if dir != "" {
		dir = filepath.Join(dir, "index")
	}
	return &diskIndexes{dir: dir, log: log, ix: map[string]*dedup.Index{}}
}

// get returns the index of a disk: opened (loaded or built) on first use,
// refreshed after.
func (d *diskIndexes) get(ctx context.Context, path string, progress func(done, total int64)) (*dedup.Index, error) {
	d.mu.Lock()
	ix, ok := d.ix[path]
	d.mu.Unlock()
	if ok {
		if err := ix.Refresh(ctx); err != nil {
			return nil, fmt.Errorf("refresh index of %s: %w", path, err)
		}
		return ix, nil
	}
	ix, err := dedup.Open(ctx, path, dedup.Options{StateDir: d.dir, Log: d.log, Progress: progress})
	if err != nil {
		return nil, fmt.Errorf("index disk %s: %w", path, err)
	}
	d.mu.Lock()
	defer d.mu.Unlock()
	if old := d.ix[path]; old != nil {
		ix.Close() // opened twice at once: keep the first
		return old, nil
	}
	d.ix[path] = ix
	return ix, nil
}

// peek returns a disk's index if it is open, nil if not; it neither
// opens nor refreshes it.
func (d *diskIndexes) peek(path string) *dedup.Index {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ix[path]
}

// cached reports whether a disk's index is open.
func (d *diskIndexes) cached(path string) bool {
	d.mu.Lock()
	defer d.mu.Unlock()
	return d.ix[path] != nil
}

// catalog returns the catalog of disks, in the domain's order.
func (d *diskIndexes) catalog(ctx context.Context, disks []xenmem.Disk, progress func(path string) func(done, total int64)) (*dedup.Catalog, error) {
	var list []*dedup.Index
	for _, disk := range disks {
		var p func(done, total int64)
		if progress != nil {
			p = progress(disk.Path)
		}
		ix, err := d.get(ctx, disk.Path, p)
		if err != nil {
			return nil, err
		}
		list = append(list, ix)
	}
	return dedup.NewCatalog(list...), nil
}

func (d *diskIndexes) close() {
	d.mu.Lock()
	defer d.mu.Unlock()
	for _, ix := range d.ix {
		ix.Close()
	}
	d.ix = map[string]*dedup.Index{}
}
